#!/usr/bin/env bash
# The device check: one call on a bare GPU machine (no network) that builds the
# CUDA extension, runs the GPU tests and the quick benchmark suite, and prints a
# short summary last.
#
#   bash benchmarks/device_check.sh [OUT_DIR]    # default: benchmarks/results/<gpu>/
#
# On the lent device machine pass "$OUT", so that the logs and results come back.
# It leaves at most 8 files in OUT_DIR (build.log, gpu_tests.log, bench.log,
# bench.json, bench.md, and the plots route.png, permute.png, grouped_gemm.png):
# the device machine returns at most 8. The suite plots each of its 4 benchmarks,
# so plan.png is deleted after it (plan's times are in bench.md and bench.json);
# a fifth benchmark needs another file dropped here.
# Exits non-zero if the build, the GPU tests or the benchmark suite failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# Each stage is cut off at its limit; 90 + 200 + 190 s plus ~30 s of version
# checks keeps the whole check within 8.5 minutes (give the device call 560 s).
# Expected: the nvcc build ~50 s (48 s on 2 CPU cores; 90 s is still 1.8x), the
# GPU tests ~2-3 min (265 of them, 66 the grouped GEMM's, not timed on a GPU yet;
# most of the time is Triton's first compiles: 70 tests took 57 s at 01310c1),
# the quick suite ~2-2.5 min: route, plan, permute with triton and cuda rows
# ~1.5-2 min, and the grouped GEMM's Qwen3-30B-A3B rows ~25 s (estimated: ~5
# Triton compiles and 56 timings of ~156 calls of at most 6 ms), for which
# BENCH_LIMIT went from 160 to 190 s and BUILD_LIMIT from 120 to 90 s.
BUILD_LIMIT=90
TEST_LIMIT=200
BENCH_LIMIT=190

OUT_DIR=${1:-benchmarks/results/$(python3 -c 'from benchmarks.harness import gpu_name; print(gpu_name())')}
mkdir -p "$OUT_DIR"

verdict() {  # verdict RC LIMIT -> ok / TIMED OUT / FAILED
    if [ "$1" -eq 0 ]; then echo "ok"
    elif [ "$1" -eq 124 ]; then echo "TIMED OUT after $2 s"
    else echo "FAILED (rc $1)"
    fi
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader \
    || echo "nvidia-smi failed"
nvcc --version 2>/dev/null | tail -n 1 || echo "nvcc not found"
python3 -c 'import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "CUDA", torch.version.cuda,
      "| triton", triton.__version__, "| cuda available:", torch.cuda.is_available())'

echo "== build: pip install -e . (log: $OUT_DIR/build.log)"
t0=$SECONDS
timeout "$BUILD_LIMIT" python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT_DIR/build.log" 2>&1
build_rc=$?
build_s=$((SECONDS - t0))
if [ "$build_rc" -ne 0 ]; then
    echo "build $(verdict "$build_rc" "$BUILD_LIMIT"); its last lines:"
    tail -n 40 "$OUT_DIR/build.log"
fi
ext=$(python3 -c 'import moekernels._ext as e
print(e.HAS_CUDA_EXT, "" if e.HAS_CUDA_EXT else getattr(e, "LOAD_ERROR", ""))' 2>&1 | tail -n 1)

echo "== GPU tests: pytest -m gpu (log: $OUT_DIR/gpu_tests.log)"
t0=$SECONDS
timeout "$TEST_LIMIT" python3 -m pytest -m gpu -q -p no:cacheprovider >"$OUT_DIR/gpu_tests.log" 2>&1
test_rc=$?
test_s=$((SECONDS - t0))

echo "== quick benchmark suite (log: $OUT_DIR/bench.log)"
rm -f "$OUT_DIR/bench.json" "$OUT_DIR/bench.md"  # a stale report must not pass for this run's
t0=$SECONDS
timeout "$BENCH_LIMIT" python3 -m benchmarks.run --quick --out "$OUT_DIR" >"$OUT_DIR/bench.log" 2>&1
bench_rc=$?
bench_s=$((SECONDS - t0))
rm -f "$OUT_DIR/plan.png"  # the 9th file: see the header

echo
echo "================================ summary"
echo "build:      $(verdict "$build_rc" "$BUILD_LIMIT") in ${build_s} s; CUDA extension loaded: $ext"
if [ "$test_rc" -eq 5 ]; then
    tests_line="no test collected (pytest rc 5): is the gpu marker on the GPU tests?"
elif [ "$test_rc" -eq 124 ]; then
    tests_line="TIMED OUT after $TEST_LIMIT s"
else
    tests_line="$(grep -v '^\s*$' "$OUT_DIR/gpu_tests.log" | tail -n 1) (rc $test_rc)"
fi
echo "gpu tests:  $tests_line, ${test_s} s"
grep -E '^(FAILED|ERROR) ' "$OUT_DIR/gpu_tests.log" | head -n 10
echo "benchmarks: $(verdict "$bench_rc" "$BENCH_LIMIT") in ${bench_s} s"
echo
if [ -f "$OUT_DIR/bench.md" ]; then
    cat "$OUT_DIR/bench.md"
else
    tail -n 30 "$OUT_DIR/bench.log"
fi

[ "$build_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
