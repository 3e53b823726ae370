#!/usr/bin/env bash
# The device check, in two calls of a lent GPU machine (H100 or H200, no network). A lent GPU gives 15
# minutes of device time in all, its start included, and a call at most 600 s: so the first call
# takes at most 300 s and returns what matters most, the second the rest.
#
#   bash benchmarks/device_check.sh 1 [OUT_DIR]   # build; a GPU smoke test of every public op; the headline rows
#   bash benchmarks/device_check.sh 2 [OUT_DIR]   # the full GPU tests; the rest of the quick suite
#
# Default OUT_DIR: benchmarks/results/<gpu>/quick/stage1 or stage2 (below where run.py files a quick
# run, so that a full run's results stay). On the lent machine pass "$OUT", so that the logs and results come back, and run
# stage 2 at once after stage 1 (the machine stays warm 30 s; a fresh one builds again, +75 s).
# Every command runs under `timeout` with its stage's limit, so a slow step loses only itself,
# and the benchmark rows go to OUT_DIR/rows.jsonl one by one as they are measured (the first line
# names the machine: GPU, driver, versions): a suite cut off keeps every row it timed.
# Files left in OUT_DIR (the device machine returns at most 8):
#   stage 1: build.log, smoke.log, bench.log, rows.jsonl, bench.json, bench.md (no plots)
#   stage 2: [build.log,] gpu_tests.log, bench.log, rows.jsonl, bench.json, bench.md, route.png, permute.png
# The logs leave with the machine's absolute paths replaced (benchmarks/sanitize.py). A short
# summary, naming the GPU, comes last. Exits non-zero if any step failed or ran out of time.
#
# Stage 1's limits add up to 300 s (tests/test_benchmarks.py checks it), none of them measured on
# the lent GPUs yet; each is ~1.5-2x its estimate:
# - S1_INFO 20 s: nvidia-smi, nvcc and Python's imports of torch and triton (~5-10 s).
# - S1_BUILD 80 s: pip install -e ., the nvcc build for sm_80, sm_90a, sm_100a, sm_120 and PTX
#   (setup.py: 76 CPU-s measured on 2 cores; ~10-15 s estimated on the machine's 16, ~20-30 s
#   with pip's own work), and csrc/fp8_grouped_cutlass.cu (CUTLASS's FP8 grouped GEMM, sm_90a
#   alone; ~40 CPU-s, in parallel with the others: ~25-35 s its own, the build's longest). The
#   image has no nvidia-cutlass and no network: its wheel (6.4 MB, only its headers are used) is
#   carried in the checkout's ignored .whl/ folder and installed first (pip download
#   nvidia-cutlass==4.2.0.0 --no-deps -d .whl; the run tool's carry: [".whl"]). Without it the
#   extension builds without the CUTLASS kernel and its tests skip, saying why.
# - S1_SMOKE 80 s: tests/test_gpu_smoke.py (13 tests, one small call of each public op and
#   backend, ~30 Triton compiles), the extension's GPU test and tests/test_cutlass.py (the
#   CUTLASS kernel against the Triton FP8 path and the reference at E 32, N 4096, K 7168: one
#   Triton compile, ~11k rows), on 8 pytest-xdist workers: ~40-55 s estimated, most of it the
#   workers' imports and the compiles.
# - S1_BENCH 110 s: run.py --part headline, 39 timings: bf16 grouped GEMM against
#   torch._grouped_mm, FP8 block against bf16 (contiguous: also CUTLASS and torch._scaled_grouped_mm), DeepSeek-V3 routing at 40k tokens (cuda, triton),
#   the fused MoE prefill against transformers' grouped_mm experts, the decode step. ~60-90 s
#   estimated: the roofline (~5 s), imports with transformers (~10 s), ~25 Triton compiles
#   (~40 s) and the timings (15 graph replays of >= 0.5 ms each, ~1 s a timing).
# - S1_REPORT 10 s: sanitize and the summary.
# Stage 2's limits add up to 450 s (525 with a rebuild): what the 15 minutes leave after stage 1
# and the machine's start (~1-2 min), inside a call's 600 s. A fresh machine (stage 2 not run at
# once) costs another start and the build: then rerun stage 2 with less, e.g. pytest -m gpu alone.
# - the full GPU tests (pytest -m gpu, ~450 tests, mostly Triton's first compiles; 70 took 57 s
#   serially at 01310c1) on 8 workers: S2_TESTS 180 s, ~1-1.5 min estimated. Without
#   pytest-xdist they run serially and are expected to hit the limit (reported as TIMED OUT).
# - the rest of the quick suite in run.py's order (route, plan, permute, the other grouped GEMM,
#   FP8, MoE (LoRA too) and decode rows, FP8 training, expert parallelism, torchtitan's experts;
#   316 timings): S2_BENCH 240 s, ~250 s estimated before torchtitan's 10 timings (the whole suite's
#   ~300-350 s less the headline rows), ~20-35 s more with them (bench_torchtitan's docstring): the
#   last benchmarks may be cut off, their rows then missing from rows.jsonl; torchtitan's come last,
#   so they go first. Its quick cases run at one T each: no plot (route.png and permute.png stay).
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

S1_INFO=20
S1_BUILD=80
S1_SMOKE=80
S1_BENCH=110
S1_REPORT=10
S2_INFO=20
S2_BUILD=75
S2_TESTS=180
S2_BENCH=240
S2_REPORT=10

STAGE=${1:-}
if [ "$STAGE" != 1 ] && [ "$STAGE" != 2 ]; then
    echo "usage: bash benchmarks/device_check.sh 1|2 [OUT_DIR]" >&2
    exit 2
fi
OUT_DIR=${2:-benchmarks/results/$(python3 -c 'from benchmarks.harness import gpu_name; print(gpu_name())')/quick/stage$STAGE}
mkdir -p "$OUT_DIR"
rm -f "$OUT_DIR"/*.log "$OUT_DIR"/*.png "$OUT_DIR/rows.jsonl" "$OUT_DIR/bench.json" "$OUT_DIR/bench.md"
SUMMARY=()  # one line a step, printed as it ends and again last
failed=0

# step NAME LIMIT LOG COMMAND...: runs COMMAND under `timeout LIMIT`, its output to OUT_DIR/LOG,
# and records one line: ok / TIMED OUT / FAILED, and the seconds it took.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local t0=$SECONDS rc verdict
    timeout "$limit" "$@" >"$OUT_DIR/$log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then verdict="ok"
    elif [ "$rc" -eq 124 ]; then verdict="TIMED OUT after $limit s"
    else verdict="FAILED (rc $rc)"
    fi
    [ "$rc" -eq 0 ] || failed=1
    SUMMARY+=("$(printf '%-10s %s in %d s (limit %d s; log %s)' "$name:" "$verdict" $((SECONDS - t0)) "$limit" "$log")")
    echo "${SUMMARY[-1]}"
    if [ "$rc" -ne 0 ]; then tail -n 25 "$OUT_DIR/$log"; echo; fi
    return "$rc"
}

machine() {  # the GPU first: the results are this card's (5 s of the limit for its name)
    SUMMARY+=("gpu:       $(timeout 5 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -n 1)")
    timeout $(($1 - 5)) bash -c '
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader \
            || echo "nvidia-smi failed"
        nvcc --version 2>/dev/null | tail -n 1 || echo "nvcc not found"
        python3 -c "import sys, torch, triton
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"CUDA\", torch.version.cuda,
      \"| triton\", triton.__version__, \"| cuda available:\", torch.cuda.is_available())"' \
        || echo "machine info TIMED OUT or failed"
}

build() {  # pip install -e . (the nvcc build); fails unless the extension then loads, and says its archs
    # The carried nvidia-cutlass wheel first (headers for csrc/fp8_grouped_cutlass.cu), where there is one.
    step build "$1" build.log bash -c 'for whl in .whl/nvidia_cutlass-*.whl; do
    [ -f "$whl" ] && python3 -m pip install --no-deps "$whl"
done
python3 -m pip install --no-build-isolation --no-deps -e . && python3 -c "
import sys, moekernels._ext as e
print(\"moekernels._C:\", \"built for \" + \" \".join(e.BUILD_ARCHS) if e.HAS_CUDA_EXT else \"NOT loaded: \" + str(e.LOAD_ERROR))
print(\"cutlass:\", e.CUTLASS_ERROR or \"fp8_grouped_mm(backend=cutlass) built for \" + \" \".join(e.C.CUTLASS_ARCHS.split()))
sys.exit(not e.HAS_CUDA_EXT)"'
    SUMMARY+=("extension: $(grep -a '^moekernels._C:' "$OUT_DIR/build.log" | tail -n 1)")
    echo "${SUMMARY[-1]}"
    SUMMARY+=("$(grep -a '^cutlass:' "$OUT_DIR/build.log" | tail -n 1)")
    echo "${SUMMARY[-1]}"
}

workers=""  # pytest-xdist's workers where installed: Triton compiles are single-threaded
python3 -c 'import xdist' 2>/dev/null && workers="-n 8"

report() {  # sanitize the logs; the summary; the rows measured, from bench.md or, if cut off, rows.jsonl
    timeout "$1" bash -c '
        out=$0
        python3 -m benchmarks.sanitize --out "$out" "$out"/*.log || echo "sanitize failed: the logs keep this machine'"'"'s paths"
        echo
        echo "================================ summary"
        printf "%s\n" "$@"
        echo
        if [ -f "$out/bench.md" ]; then
            cat "$out/bench.md"
        elif [ -f "$out/rows.jsonl" ]; then
            echo "(the suite was cut off: the rows it measured, from rows.jsonl)"
            python3 -c "import sys; from benchmarks import run; print(run.rows_table(sys.argv[1]))" "$out/rows.jsonl"
        fi' "$OUT_DIR" "${SUMMARY[@]}" || echo "report TIMED OUT or failed"
}

echo "== device check, stage $STAGE: $OUT_DIR"
if [ "$STAGE" = 1 ]; then
    machine "$S1_INFO"
    build "$S1_BUILD"
    # $workers unquoted: nothing, or the two words "-n 8".
    step smoke "$S1_SMOKE" smoke.log python3 -m pytest -m gpu -q -p no:cacheprovider $workers \
        tests/test_gpu_smoke.py tests/test_cuda_ext.py tests/test_cutlass.py
    step headline "$S1_BENCH" bench.log python3 -m benchmarks.run --quick --part headline \
        --rows "$OUT_DIR/rows.jsonl" --out "$OUT_DIR"
    rm -f "$OUT_DIR"/*.png  # 6 files without them
    report "$S1_REPORT"
else
    machine "$S2_INFO"
    # A warm machine kept stage 1's build; a fresh one needs its own.
    if ! python3 -c 'import moekernels, sys; sys.exit(not moekernels.HAS_CUDA_EXT)' 2>/dev/null; then
        build "$S2_BUILD"
    fi
    step "gpu tests" "$S2_TESTS" gpu_tests.log python3 -m pytest -m gpu -q -p no:cacheprovider $workers
    step rest "$S2_BENCH" bench.log python3 -m benchmarks.run --quick --part rest \
        --rows "$OUT_DIR/rows.jsonl" --out "$OUT_DIR"
    # 8 files at most: the logs, rows.jsonl, bench.json, bench.md and two plots; the others' rows are in bench.md.
    find "$OUT_DIR" -maxdepth 1 -name '*.png' ! -name route.png ! -name permute.png -delete
    report "$S2_REPORT"
fi
exit "$failed"
