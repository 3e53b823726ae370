"""The benchmark harness, dry-run on the CPU: counters, derived numbers, reports, the suite's files."""

import importlib
import importlib.util
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekernels
from benchmarks import (
    bench_distributed, bench_fp8, bench_grouped_gemm, bench_moe, bench_permute, bench_plan, bench_route, harness, run,
    sanitize, tune_grouped_mm,
)
from benchmarks.shapes import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, GemmShape, MoEShape
from moekernels import _backend, configs

REPO = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_writes_the_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "route", "--tokens", "1,16"]) == 0

    printed = capsys.readouterr().out
    lines = printed.rstrip().splitlines()
    assert lines[0] == harness.CPU_DRY_RUN  # said up front, before the numbers
    assert run.NO_GPU in printed
    assert lines.count(harness.NO_MATPLOTLIB) == 1  # two sizes: a plot, but no matplotlib to draw it
    # The table comes last, then its legend: every implementation and column it shows.
    last_row = max(i for i, line in enumerate(lines) if line.startswith("deepseek-v3 fp32"))
    legend = lines[last_row + 2:]
    assert lines[last_row + 1] == "" and [line.split(":")[0].strip() for line in legend] == [
        "naive", "torch", "median us", "p20-p80 us", "GB/s", "x naive", "check", "timing"]
    assert "not torch's native op" in legend[1]

    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["meta"]["gpu"] == "cpu"
    assert payload["roofline"] is None
    records = payload["results"]
    groups = {"mixtral-8x7b fp32": MIXTRAL_8X7B, "qwen3-30b-a3b fp32": QWEN3_30B_A3B,
              "deepseek-v3 fp32": DEEPSEEK_V3}
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (g, t, impl) for g in groups for t in (1, 16) for impl in ("naive", "torch")}
    for r in records:
        shape = groups[r["group"]]
        assert r["error"] is None
        t = r["time_us"]
        assert 0 < t["min"] <= t["p20"] <= t["median"] <= t["p80"]
        assert r["bytes"] == bench_route.route_bytes(r["x"], shape.experts, shape.top_k, 4,
                                                     shape.correction_bias)
        assert r["gbps"] > 0 and r["tflops"] is None and r["roofline_fraction"] is None
        assert r["speedup_vs_naive"] > 0 and r["speedup_vs_native"] is None
        if r["impl"] == "naive":
            assert r["speedup_vs_naive"] == 1.0
        else:
            assert r["check"]["ok"] and r["check"]["ids_match"] == 1.0
    md = (tmp_path / "bench.md").read_text()
    assert "| case | T | impl | median us |" in md and harness.CPU_DRY_RUN in md
    assert "- `torch`: this library's reference backend" in md and "- `p20-p80 us`: 20th to 80th" in md


def test_route_bytes_counts_each_input_and_output_once():
    # DeepSeek-V3 at 40k tokens: fp32 logits, the fp32 bias, float32 weights + int32 ids.
    assert bench_route.route_bytes(40000, 256, 8, 4, True) == 40000 * 256 * 4 + 256 * 4 + 40000 * 8 * 8
    assert bench_route.route_bytes(16, 8, 2, 2, False) == 16 * 8 * 2 + 16 * 2 * 8


@pytest.mark.parametrize("shape", [MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3], ids=lambda s: s.name)
def test_naive_router_is_the_same_function_as_the_reference(shape):
    logits, bias = bench_route._inputs(shape, 64, torch.float32, "cpu")()
    naive = bench_route.naive_router(shape)(logits, bias)
    ref = moekernels.reference.topk_routing(
        logits, shape.top_k, scoring=shape.scoring, renormalize=shape.renormalize, bias=bias,
        n_group=shape.n_group, topk_group=shape.topk_group,
        routed_scaling_factor=shape.routed_scaling_factor)
    check = bench_route.compare(ref, naive)
    assert check["ok"] and check["ids_match"] == 1.0


def _record(impl, median_us, *, flops=0, nbytes=2_000_000, bound="memory", error=None):
    rec = {"bench": "b", "group": "g", "x_name": "T", "x": 8, "impl": impl, "flops": flops,
           "bytes": nbytes, "bound": bound, "error": error, "l2": "cold", "method": "graph"}
    if error is None:
        rec["time_us"] = {"median": median_us, "min": median_us, "p20": median_us, "p80": median_us}
    return rec


def test_derive_rates_roofline_fractions_and_speedups():
    roofline = {"copy_gbps": 4000.0, "mm_bf16_tflops": 800.0}
    naive, native, fast = _record("naive", 4.0), _record("native", 2.0), _record("triton", 1.0)
    matmul = _record("triton", 2.0, flops=10**9, nbytes=0, bound="compute")
    matmul["group"] = "mm"
    broken = _record("cuda", 0.0, error="RuntimeError: boom")
    records = [naive, native, fast, matmul, broken]
    harness.derive(records, roofline)
    assert fast["gbps"] == pytest.approx(2000.0)  # 2 MB in 1 us
    assert fast["roofline_fraction"] == pytest.approx(0.5)
    assert fast["speedup_vs_naive"] == pytest.approx(4.0)
    assert fast["speedup_vs_native"] == pytest.approx(2.0)
    assert matmul["tflops"] == pytest.approx(500.0)  # 1 GFLOP in 2 us
    assert matmul["roofline_fraction"] == pytest.approx(0.625)
    assert matmul["speedup_vs_naive"] is None  # no naive row in its group
    assert "gbps" not in broken
    assert harness.error_lines(records) == ["b g T=8 cuda: RuntimeError: boom"]


def test_tables_drop_empty_columns_and_show_errors():
    records = [_record("naive", 4.0), _record("triton", 1234.5), _record("cuda", 0.0, error="boom")]
    harness.derive(records, None)
    rows = harness.table_rows(records)
    assert [row["us"] for row in rows] == ["4.00", "1,234", "error"]

    text = harness.format_table(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["case", "T", "impl", "median", "us", "p20-p80", "us", "GB/s", "x",
                                "naive", "timing"]
    assert set(lines[1]) == {"-"} and len(lines) == 5
    assert "TFLOP/s" not in text and "x native" not in text and "of roofline" not in text

    md = harness.markdown_table(rows).splitlines()
    assert md[0] == "| case | T | impl | median us | p20-p80 us | GB/s | x naive | timing |"
    assert md[1] == "|:---|---:|:---|---:|---:|---:|---:|:---|"
    assert md[4] == "| g | 8 | cuda | error | - | - | - | - |"


def test_results_are_written_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    records = [_record("naive", 4.0), {**_record("naive", 9.0), "x": 16}]  # two sizes: a plot to draw
    harness.derive(records, None)
    paths, no_plots = harness.write_results(tmp_path, harness.metadata(quick=True), None, records, ["a note"])
    assert sorted(p.name for p in paths) == ["bench.json", "bench.md"] and no_plots == harness.NO_MATPLOTLIB
    assert "- a note" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("", "gpu"),
])
def test_gpu_slug(name, slug):
    assert harness.gpu_slug(name) == slug


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "device_check.sh")], check=True)


# ---------------------------------------------------------------- what a newcomer reads

class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class _Clock:
    """10 s a step: the fake time each call to the clock returns, from 0."""
    def __init__(self):
        self.now = -10.0

    def __call__(self) -> float:
        self.now += 10.0
        return self.now


@pytest.mark.parametrize("tty", [True, False], ids=["terminal", "log"])
def test_progress_shows_elapsed_time_and_eta(tty):
    stream = _Stream(tty)
    progress = harness.Progress(4, stream=stream, clock=_Clock())  # t0 = 0 s
    for name in "abcd":
        progress.step(f"bench {name}")  # at 10, 20, 30 and 40 s
    progress.close()  # at 50 s
    out = stream.getvalue()
    if tty:  # one line rewritten in place, a bar, cut to the terminal; a newline only at the end
        frames = out.split("\r\033[K")[1:]
        assert out.count("\n") == 1 and out.endswith("\n") and len(frames) == 5
        assert frames[0].startswith("[....................] 1/4 0:10 elapsed, ETA ?  bench a")
        # 1 step done in 20 s, 3 left: 60 s; then 2 in 30 s, 2 left: 30 s.
        assert frames[1].startswith("[#####...............] 2/4 0:20 elapsed, ETA 1:00  bench b")
        assert frames[2].startswith("[##########..........] 3/4 0:30 elapsed, ETA 0:30  bench c")
        assert frames[4] == "done: 4 timings in 0:50\n"
    else:  # one plain line per step, no control characters
        assert "\r" not in out and "\033" not in out
        assert out.splitlines() == ["[1/4] 0:10 elapsed, ETA ?: bench a", "[2/4] 0:20 elapsed, ETA 1:00: bench b",
                                    "[3/4] 0:30 elapsed, ETA 0:30: bench c", "[4/4] 0:40 elapsed, ETA 0:13: bench d",
                                    "done: 4 timings in 0:50"]


def test_cpu_quick_runs_each_benchmarks_first_case(tmp_path, monkeypatch, capsys):
    modules = [importlib.import_module(f"benchmarks.{m}") for m in run.BENCHMARKS.values()]
    cases = [c for m in modules for c in m.cases("cpu", True)]  # builds cases only: no input is made
    picked = run.cpu_quick(cases)
    assert [c.bench for c in picked] == list(run.BENCHMARKS) and len(cases) > 4 * len(picked)
    assert all(c is next(d for d in cases if d.bench == c.bench) for c in picked)

    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    capsys.readouterr()
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "plan", "--only", "route"]) == 0
    assert capsys.readouterr().out.splitlines().count(harness.ONE_SIZE) == 1  # no plot, and the console says why
    records = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert [(r["bench"], r["group"], r["x"], r["impl"]) for r in records] == [
        ("plan", "mixtral-8x7b", 1, "naive"), ("plan", "mixtral-8x7b", 1, "torch"),
        ("route", "mixtral-8x7b fp32", 1, "naive"), ("route", "mixtral-8x7b fp32", 1, "torch")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no plot of lone points


def test_default_out_keeps_quick_runs_apart(tmp_path, monkeypatch):
    assert harness.IN_CLONE
    assert run.default_out("h200", quick=False) == REPO / "benchmarks" / "results" / "h200"
    assert run.default_out("h200", quick=True) == REPO / "benchmarks" / "results" / "h200" / "quick"
    monkeypatch.setattr(harness, "IN_CLONE", False)  # installed: in the current folder, not site-packages
    monkeypatch.chdir(tmp_path)
    assert run.default_out("cpu", quick=True) == tmp_path / "moekernels-bench-results" / "cpu" / "quick"
    # The device check's default is below the quick suite's, one folder a stage.
    script = (REPO / "benchmarks" / "device_check.sh").read_text()
    assert "print(gpu_name())')/quick/stage$STAGE}" in script


def test_legend_names_every_implementation():
    generic = {"naive", "native", "torch", "triton", "cuda"}
    assert set(harness.IMPLS) == generic and "not torch's native op" in harness.IMPLS["torch"]
    for name, module in run.BENCHMARKS.items():
        m = importlib.import_module(f"benchmarks.{module}")
        known = {**harness.IMPLS, **getattr(m, "IMPLS", {})}
        builds = [("cpu", True)] + ([] if m is bench_moe else [("cuda", True), ("cuda", False)])  # moe: below
        impls = {i for device, quick in builds for c in m.cases(device, quick) for i in c.impls}
        impls |= set(getattr(m, "HF_IMPLS", ()))
        assert impls <= set(known), (name, impls - set(known))
        assert not set(getattr(m, "IMPLS", {})) & generic, name  # a module adds names, never redefines one


def test_legend_explains_the_columns_a_table_shows():
    records = [_record("naive", 4.0), _record("triton", 1.0)]
    records[1]["check"] = {"ok": True}
    harness.derive(records, None)
    terms = harness.legend(records, {**harness.IMPLS, "triton": "mine"})
    shown = [h for k, h in harness._columns(harness.table_rows(records), "T") if k in harness.COLUMN_LEGEND]
    assert [t for t, _ in terms] == ["naive", "triton"] + shown
    assert shown == ["median us", "p20-p80 us", "GB/s", "x naive", "check", "timing"]
    assert dict(terms)["triton"] == "mine"
    text = harness.console_report(records)
    assert text.endswith("  timing: " + harness.COLUMN_LEGEND["timing"])


def test_sanitize_replaces_the_machines_paths(tmp_path):
    pairs = [("/work/main", "<repo>"), ("/work/main/.venv/lib/python3.12/site-packages", "<site-packages>"),
             ("/tmp", "<tmp>"), ("/root/out", "<out>"), ("/root", "~")]
    text = ("Obtaining file:///work/main\n"
            "  /work/main/.venv/lib/python3.12/site-packages/torch/jit/_script.py:365: DeprecationWarning\n"
            "  Stored in directory: /tmp/pip-ephem-wheel-cache-uvl59lj1/wheels/1e\n"
            "wrote /root/out/bench.json, /root/x; kept /work/mainline, /x/work/main and /tmpfs; cwd /work/main.\n")
    assert sanitize.sanitize(text, pairs) == (
        "Obtaining file://<repo>\n"
        "  <site-packages>/torch/jit/_script.py:365: DeprecationWarning\n"
        "  Stored in directory: <tmp>/pip-ephem-wheel-cache-uvl59lj1/wheels/1e\n"
        "wrote <out>/bench.json, ~/x; kept /work/mainline, /x/work/main and /tmpfs; cwd <repo>.\n")

    # This machine's own: the checkout, the interpreter's site-packages, the output folder.
    site_packages = Path(torch.__file__).resolve().parent.parent
    log = tmp_path / "build.log"
    log.write_text(f"Obtaining file://{REPO}\n{site_packages}/torch/__init__.py\nwrote {tmp_path}/bench.md\n")
    assert sanitize.main(["--root", str(REPO), "--out", str(tmp_path), str(log), str(tmp_path / "absent.log")]) == 0
    assert log.read_text() == "Obtaining file://<repo>\n<site-packages>/torch/__init__.py\nwrote <out>/bench.md\n"


def _device_check():
    return (REPO / "benchmarks" / "device_check.sh").read_text()


def _device_check_stages(script: str) -> dict[int, str]:
    """The lines each stage runs: the two branches of `if [ "$STAGE" = 1 ]`."""
    body = script[script.index('if [ "$STAGE" = 1 ]; then\n'):]
    one, two = body.split("\nelse\n", 1)
    return {1: one.split("\n", 1)[1], 2: two.split("\nfi\n", 1)[0]}


def _device_check_logs(block: str) -> set[str]:
    """The logs a stage writes: one a step (step NAME LIMIT LOG ...), and build.log where it builds."""
    logs = set(re.findall(r'^\s*step (?:\w+|"[^"]+") "\$\w+" (\w+\.log) ', block, re.M))
    return logs | ({"build.log"} if re.search(r"^\s*build ", block, re.M) else set())


def test_device_check_sanitizes_every_log_it_writes():
    script = _device_check()
    stages = _device_check_stages(script)
    assert _device_check_logs(stages[1]) == {"build.log", "smoke.log", "bench.log"}
    assert _device_check_logs(stages[2]) == {"build.log", "gpu_tests.log", "bench.log"}
    assert re.search(r'\bstep build "\$1" build\.log ', script)  # build()'s own step
    # Every log of the run is in OUT_DIR, and the report sanitizes them all.
    (call,) = [line for line in script.splitlines() if "benchmarks.sanitize" in line]
    assert '"$out"/*.log' in call and "out=$0" in script and '"$OUT_DIR" "${SUMMARY[@]}"' in script
    assert not re.search(r"(/work/|/tmp/|/opt/|site-packages)", (REPO / "benchmarks" / "results" / "h200"
                                                                 / "build.log").read_text())


def test_device_check_first_call_fits_5_minutes():
    """Issue 21 item 7: stage 1 runs nothing but its steps, each under one of its limits, and those add
    up to 300 s; stage 2's to what the 15 minutes leave (a call may run 600 s)."""
    script = _device_check()
    for stage, most in ((1, 300), (2, 450)):
        limits = {name: int(v) for name, v in re.findall(rf"^(S{stage}_\w+)=(\d+)$", script, re.M)}
        block = _device_check_stages(script)[stage]
        used = set(re.findall(r'"\$(S\d_\w+)"', block))
        rebuild = {f"S{stage}_BUILD"} if stage == 2 else set()  # only where a fresh machine lacks stage 1's build
        assert used == set(limits) and sum(limits[n] for n in limits if n not in rebuild) <= most, (stage, limits)
        commands, continued = [], False
        for line in block.splitlines():
            if not continued and line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.split()[0])
            continued = line.rstrip().endswith("\\")
        allowed = {"machine", "build", "step", "report", "rm"} | ({"if", "fi", "find"} if stage == 2 else set())
        assert set(commands) <= allowed and {"machine", "step", "report"} <= set(commands), commands
    # The functions spend no more than the limit they are given.
    assert 'timeout $(($1 - 5))' in script and "timeout 5 nvidia-smi" in script
    assert re.search(r'report\(\) \{[^\n]*\n\s*timeout "\$1" bash -c', script)


def test_device_check_names_the_headline_rows_it_times():
    stages = _device_check_stages(_device_check())
    assert "--part headline" in stages[1] and "--part rest" in stages[2]
    assert "tests/test_gpu_smoke.py" in stages[1] and "-m gpu" in stages[1]
    assert "--rows \"$OUT_DIR/rows.jsonl\"" in stages[1] and "--rows \"$OUT_DIR/rows.jsonl\"" in stages[2]


def test_moekernels_bench_entry_point(monkeypatch, capsys):
    """pyproject ships benchmarks/ as moekernels.benchmarks with a console script; the suite's modules
    import relatively, so they load under that name (here by hand, as the wheel's layout has it)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert config["project"]["scripts"]["moekernels-bench"] == "moekernels.benchmarks.run:main"
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"] == {"moekernels.benchmarks": "benchmarks"}
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "moekernels").rglob("__init__.py")}
    assert set(setuptools["packages"]) == packages | {"moekernels.benchmarks"}  # every package, no other

    saved = {k: v for k, v in sys.modules.items() if k.startswith("moekernels.benchmarks")}
    spec = importlib.util.spec_from_file_location("moekernels.benchmarks", REPO / "benchmarks" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "benchmarks")])
    package = importlib.util.module_from_spec(spec)
    try:
        sys.modules["moekernels.benchmarks"] = package
        spec.loader.exec_module(package)
        main = importlib.import_module("moekernels.benchmarks.run").main
        with pytest.raises(SystemExit) as done:
            main(["--help"])
    finally:
        for k in [k for k in sys.modules if k.startswith("moekernels.benchmarks")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: moekernels-bench ")


# ---------------------------------------------------------------- plan and permute

def _dry_run(tmp_path, monkeypatch, bench):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", bench, "--tokens", "1,16"]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["roofline"] is None and run.NO_GPU in payload["notes"]
    records = payload["results"]
    for r in records:
        assert r["error"] is None, r
        assert r["gbps"] > 0 and r["tflops"] is None and r["speedup_vs_naive"] > 0
        if r["impl"] != "naive":
            assert r["check"]["ok"], r
    return records


def test_plan_cpu_dry_run(tmp_path, monkeypatch):
    records = _dry_run(tmp_path, monkeypatch, "plan")
    shapes = {"mixtral-8x7b": (MIXTRAL_8X7B, None), "qwen3-30b-a3b": (QWEN3_30B_A3B, None),
              "deepseek-v3": (DEEPSEEK_V3, None), "deepseek-v3 B=64": (DEEPSEEK_V3, 64)}
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (g, t, impl) for g in shapes for t in (1, 16) for impl in ("naive", "torch")}
    for r in records:
        shape, block_size = shapes[r["group"]]
        assert r["bytes"] == bench_plan.plan_bytes(r["x"], shape.experts, shape.top_k, block_size)
        if r["impl"] == "torch":
            assert r["check"]["fields_differ"] == []


def test_permute_cpu_dry_run(tmp_path, monkeypatch):
    records = _dry_run(tmp_path, monkeypatch, "permute")
    shapes = {s.name: s for s in (MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3)}
    want = {(f"{name} permute", t, impl) for name in shapes for t in (1, 16) for impl in ("naive", "torch")}
    want |= {(f"{name} unpermute", t, impl) for name in shapes for t in (1, 16)
             for impl in ("naive", "naive_loop", "torch")}
    assert {(r["group"], r["x"], r["impl"]) for r in records} == want
    for r in records:
        name, op = r["group"].split()
        shape = shapes[name]
        count = bench_permute.permute_bytes if op == "permute" else bench_permute.unpermute_bytes
        assert r["bytes"] == count(r["x"], shape.hidden, shape.top_k, 2)
        if op == "unpermute" and r["impl"] != "naive":
            assert r["check"]["rel_err"] <= bench_permute.UNPERMUTE_RTOL


@pytest.mark.parametrize("block_size", [None, 64, 16])
@pytest.mark.parametrize("shape", [MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3], ids=lambda s: s.name)
def test_naive_plan_is_the_reference_plan(shape, block_size):
    # 37 tokens: some of DeepSeek-V3's 256 experts get no pair, and some segments are not
    # multiples of the block.
    (ids,) = bench_plan._inputs(shape, 37, "cpu")()
    naive = bench_plan.naive_plan(ids, shape.experts, block_size)
    ref = moekernels.reference.plan_routing(ids, shape.experts, block_size=block_size)
    assert len(naive) == (7 if block_size else 4)
    assert bench_plan.compare(ref, naive) == {"ok": True, "fields_differ": []}
    for name, got in zip(bench_plan.FIELDS + bench_plan.PADDED_FIELDS, naive):
        want = getattr(ref, name)
        assert got.dtype == want.dtype == torch.int32 and torch.equal(got, want), name


def test_plan_compare_names_the_field_that_differs():
    (ids,) = bench_plan._inputs(QWEN3_30B_A3B, 16, "cpu")()
    naive = list(bench_plan.naive_plan(ids, QWEN3_30B_A3B.experts))
    naive[3] = naive[3].flip(0)
    check = bench_plan.compare(moekernels.reference.plan_routing(ids, QWEN3_30B_A3B.experts), naive)
    assert check == {"ok": False, "fields_differ": ["dest_index"]}


def test_plan_and_permute_bytes_count_each_input_and_output_once():
    # DeepSeek-V3 at 4096 tokens: int32 ids [T, 8], counts and offsets [256], source and dest [T*8].
    assert bench_plan.plan_bytes(4096, 256, 8) == 4096 * 8 * 4 + 2 * 256 * 4 + 2 * 4096 * 8 * 4
    # With B = 64: at most min(E, T*k) = 256 segments each pad < 64 rows: 32768 + 256*63 rows,
    # rounded down to 764 blocks of 64; plus one block expert per block and the row count.
    assert bench_plan.plan_bytes(4096, 256, 8, 64) == (
        bench_plan.plan_bytes(4096, 256, 8) + 764 * 64 * 4 + 764 * 4 + 4)
    # DeepSeek-V3 at the target size: bf16 x [T, H] read, x_sorted [T*k, H] written, int32 index per row.
    t, h, k = 16384, 7168, 8
    assert bench_permute.permute_bytes(t, h, k, 2) == t * h * 2 + t * k * h * 2 + t * k * 4
    # y_sorted read, float32 weights and int32 dest_index read, y written.
    assert bench_permute.unpermute_bytes(t, h, k, 2) == t * k * h * 2 + t * k * 8 + t * h * 2


def test_permute_sweeps_hold_the_target_and_skip_the_largest():
    quick = bench_permute.cases("cuda", quick=True)  # builds cases only: no input is made
    assert {(c.group, c.x) for c in quick} >= {("deepseek-v3 permute", 16384), ("deepseek-v3 unpermute", 16384)}
    full = {(c.group, c.x) for c in bench_permute.cases("cuda", quick=False)}
    assert ("deepseek-v3 unpermute", 65536) not in full  # 7.5 GB of sorted rows
    assert ("qwen3-30b-a3b unpermute", 65536) in full
    for c in quick:  # naive first: the harness checks every other implementation against it
        baselines = ["naive"] if c.group.endswith(" permute") else ["naive", "naive_loop"]
        kernels = ["triton"] + (["cuda"] if moekernels.HAS_CUDA_EXT else [])
        assert list(c.impls) == baselines + ["torch"] + kernels


def test_plan_and_permute_notes_report_the_targets():
    def rec(bench, group, x, impl, us, frac=None, method="graph"):
        return {"bench": bench, "group": group, "x": x, "impl": impl, "error": None,
                "time_us": {"median": us}, "roofline_fraction": frac, "method": method}

    plan = [rec("plan", "deepseek-v3", 4096, "triton", 12.0),
            rec("plan", "deepseek-v3 B=64", 4096, "triton", 21.0),
            rec("plan", "deepseek-v3", 4096, "torch", 500.0),  # not a kernel
            rec("plan", "deepseek-v3", 1024, "triton", 5.0)]  # not the target size
    lines = bench_plan.notes(plan)
    assert len(lines) == 2
    assert lines[0].startswith("plan deepseek-v3 T=4096 triton: 12.0 us") and lines[0].endswith(": met")
    assert lines[1].startswith("plan deepseek-v3 B=64 T=4096 triton") and lines[1].endswith("not met")
    # CPU timings (a dry run) meet or miss no target.
    assert bench_plan.notes([rec("plan", "deepseek-v3", 4096, "triton", 12.0, method="wall")]) == [
        f"plan deepseek-v3 T=4096 triton: 12.0 us, target <= 15 us (H200): {harness.NOT_MEASURED}"]

    permute = [rec("permute", "deepseek-v3 permute", 16384, "triton", 1.0, 0.85),
               rec("permute", "deepseek-v3 unpermute", 16384, "triton", 1.0, 0.5),
               rec("permute", "qwen3-30b-a3b permute", 16384, "triton", 1.0, 0.9),
               rec("permute", "deepseek-v3 permute", 16384, "naive", 1.0, 0.3)]
    lines = bench_permute.notes(permute)
    assert lines == [
        "permute deepseek-v3 permute T=16384 triton: 85% of the copy bandwidth, target >= 80%: met",
        "permute deepseek-v3 unpermute T=16384 triton: 50% of the copy bandwidth, target >= 80%: not met",
    ]


# ---------------------------------------------------------------- grouped GEMM

gg = bench_grouped_gemm


def test_grouped_gemm_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "grouped_gemm", "--tokens", "1,16"]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["roofline"] is None and run.NO_GPU in payload["notes"]
    records = payload["results"]
    (shape,) = gg.CPU_GEMMS
    assert (shape.experts, shape.k, shape.n) == (16, 256, 192)  # an eighth of Qwen3-30B-A3B's gate_up
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (f"{shape.name} {p} {load}", rows, impl) for p in ("fwd", "fwd+bwd") for load in ("balanced", "zipf")
        for rows in (1, 16) for impl in ("naive", "torch")}
    for r in records:
        assert r["error"] is None, r
        backward = r["params"]["pass"] == "fwd+bwd"
        m = r["x"] * shape.experts
        assert r["x_name"] == "rows/expert" and r["params"]["M"] == m
        assert r["flops"] == (3 if backward else 1) * 2 * m * shape.k * shape.n
        assert r["bytes"] == gg.grouped_mm_bytes(m, shape.k, shape.n, shape.experts, r["params"]["touched_experts"],
                                                 2, backward)
        assert r["bound"] == "memory"  # <= 64 rows per expert
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_fraction"] is None
        if r["impl"] == "torch":
            assert r["check"]["ok"] and r["check"]["rel_err"] <= gg.RTOL and r["check"]["naive_rel_err"] <= gg.RTOL
    zipf_1 = next(r for r in records if r["group"].endswith("fwd zipf") and r["x"] == 1)
    assert zipf_1["params"]["touched_experts"] < shape.experts  # Zipf leaves experts without rows
    assert "| case | rows/expert | impl |" in (tmp_path / "bench.md").read_text()


def test_grouped_gemm_counts_flops_and_bytes():
    # Qwen3-30B-A3B's gate_up at 512 rows per expert: M = 65536, K 2048, N 1536, all 128 experts touched.
    m, k, n, e = 65536, 2048, 1536, 128
    assert gg.grouped_mm_flops(m, k, n, False) == 2 * m * k * n  # 412 GFLOP
    assert gg.grouped_mm_flops(m, k, n, True) == 6 * m * k * n
    fwd = (m * k + e * k * n + m * n) * 2 + e * 4
    assert gg.grouped_mm_bytes(m, k, n, e, e, 2, False) == fwd
    # fwd+bwd: dy read, dx and every expert's dw written once more.
    assert gg.grouped_mm_bytes(m, k, n, e, e, 2, True) == fwd + (m * n + m * k + e * k * n) * 2
    # Decode: 3 experts touched of 128, dw still written for all of them.
    assert gg.grouped_mm_bytes(3, k, n, e, 3, 2, False) == (3 * k + 3 * k * n + 3 * n) * 2 + e * 4


def test_expert_counts_balanced_and_zipf():
    assert gg.expert_counts("balanced", 10, 4) == [3, 3, 2, 2]
    zipf = gg.expert_counts("zipf", 128 * 512, 128)
    assert sum(zipf) == 128 * 512 and zipf == sorted(zipf, reverse=True)
    assert zipf[0] == pytest.approx(128 * 512 / sum(1 / (i + 1) for i in range(128)), abs=1)  # 18% of the rows
    decode = gg.expert_counts("zipf", 128, 128)
    assert sum(decode) == 128 and 0 in decode


def _tiny_inputs(backward, load="zipf"):
    # 8 experts, a row each on average: Zipf gives [3, 1, 1, 1, 1, 1, 0, 0], shuffled.
    shape = GemmShape("tiny", 8, 32, 48)
    counts = gg.expert_counts(load, 8, shape.experts)
    (inp,) = gg._inputs(shape, counts, backward, "cpu")()
    return inp


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_grouped_gemm_implementations_agree_on_cpu(backward):
    """Every implementation of the GPU suite, on CPU tensors (torch._grouped_mm's backward fails
    on the CPU; Triton under the interpreter), checked as the harness checks them."""
    inp = _tiny_inputs(backward)
    assert 0 in inp.sizes
    naive = gg.timed(gg.naive_autograd if backward else gg.naive_forward, backward)(inp)
    impls = {"torch": gg.library("torch")} | ({} if backward else {"native": gg.native})
    if _backend.interpreting():
        impls["triton"] = gg.library("triton")
    for name, fn in impls.items():
        check = gg.compare(gg.timed(fn, backward)(inp), naive)
        assert check["ok"] and check["naive_rel_err"] <= 2**-8, (name, check)
    outs, none = gg.timed(gg.dense, backward, grouped=False)(inp)
    assert none is None and gg.compare((outs, none), naive) is None  # dense: another product, no check
    assert outs[0].shape == (8, 48) and (not backward or outs[2].shape == inp.w0.shape)


def test_grouped_gemm_check_catches_wrong_outputs():
    inp = _tiny_inputs(True)
    naive = gg.timed(gg.naive_autograd, True)(inp)
    (y, dx, dw), _ = naive
    busiest = max(range(8), key=inp.sizes.__getitem__)
    wrong_dw = dw.clone()
    wrong_dw[busiest] *= 1.1
    assert not gg.compare(((y, dx, wrong_dw), inp), naive)["ok"]
    ghost = dw.clone()
    ghost[inp.sizes.index(0)] = 1.0  # a gradient for an expert that saw no row
    assert not gg.compare(((y, dx, ghost), inp), naive)["ok"]
    wrong_y = y.detach().clone()
    wrong_y[-1] += 1.0  # the last row, which the check always samples
    assert not gg.compare(((wrong_y,), inp), naive)["ok"]


def test_grouped_gemm_gpu_sweeps():
    quick = gg.cases("cuda", quick=True)  # builds cases only: no input is made
    for c in quick:  # naive first: the harness's speed-ups and checks are against it
        assert list(c.impls) == ["naive", "native", "dense", "triton"]
        assert c.bound == ("memory" if c.x <= 64 else "compute") and c.eager == ("torch",)
    # Both loads; the fwd+bwd at 4096 rows per expert (9.9 TFLOP) is past QUICK_MAX_FLOPS.
    want = {("fwd", r) for r in (1, 16, 512, 4096)} | {("fwd+bwd", r) for r in (1, 16, 512)}
    for load in gg.LOADS:
        assert {(c.params["pass"], c.x) for c in quick if c.params["load"] == load} == want
    assert {c.group.split()[0] for c in quick} == {"qwen3-30b-a3b"}

    full = gg.cases("cuda", quick=False)
    assert all(c.flops <= gg.MAX_FLOPS for c in full)
    assert all(("torch" in c.impls) == (c.flops <= gg.TORCH_MAX_FLOPS) for c in full)
    groups = {c.group for c in full}
    assert {"deepseek-v3 gate_up E32 fwd zipf", "deepseek-v3 down fwd+bwd balanced",
            "mixtral-8x7b gate_up fwd balanced", "qwen3-235b-a22b gate_up fwd+bwd zipf"} <= groups
    # 17.6 TFLOP at most: Mixtral's forward at 8192 rows per expert (15.4) runs, its fwd+bwd does not.
    mixtral = {(c.params["pass"], c.x) for c in full if c.group.startswith("mixtral")}
    assert ("fwd", 8192) in mixtral and ("fwd+bwd", 8192) not in mixtral


def _gg_record(group, x, impl, us, *, pass_name="fwd", tflops=None, frac=None, vs_native=None,
               weight_bytes=0, nbytes=1):
    return {"bench": "grouped_gemm", "group": group, "x": x, "impl": impl, "error": None,
            "time_us": {"median": us}, "tflops": tflops, "roofline_fraction": frac,
            "speedup_vs_native": vs_native, "bytes": nbytes,
            "params": {"pass": pass_name, "weight_bytes": weight_bytes}}


def test_grouped_gemm_notes_report_the_targets():
    g, gb = "qwen3-30b-a3b gate_up fwd balanced", "qwen3-30b-a3b gate_up fwd+bwd balanced"
    records = [
        _gg_record(g, 512, "dense", 600.0, tflops=700.0),
        _gg_record(g, 512, "triton", 700.0, tflops=600.0, vs_native=1.2),
        _gg_record(g, 4096, "dense", 5000.0, tflops=700.0),
        _gg_record(g, 4096, "triton", 6000.0, tflops=500.0, vs_native=1.05),
        _gg_record(gb, 512, "triton", 2000.0, vs_native=1.3, pass_name="fwd+bwd"),
        # 800 MB of weights (of 1 GB moved) in 250 us: 3,200 GB/s, at 94% of the copy rate for all bytes
        _gg_record(g, 1, "triton", 250.0, frac=0.94, weight_bytes=800_000_000, nbytes=1_000_000_000),
        _gg_record(g, 16, "triton", 400.0, frac=0.5, weight_bytes=800_000_000, nbytes=1_000_000_000),
        _gg_record(g, 1, "naive", 900.0, frac=0.2, weight_bytes=800_000_000, nbytes=1_000_000_000),
    ]
    lines = gg.notes(records)
    assert lines == [
        "grouped_gemm forward at >= 512 rows/expert, triton vs torch._grouped_mm: target >= 1.10: met in 1 of 2; "
        f"worst {g} rows/expert=4096: 1.05",
        "grouped_gemm forward at >= 512 rows/expert, triton TFLOP/s of dense torch.mm's: target >= 80%: met in 1 of 2; "
        f"worst {g} rows/expert=4096: 71%",
        "grouped_gemm fwd+bwd at >= 512 rows/expert, triton vs torch._grouped_mm: target >= 1.10: met in 1 of 1; "
        f"worst {gb} rows/expert=512: 1.30",
        "grouped_gemm forward at <= 64 rows/expert, triton of the touched weights' read floor: target >= 70%: "
        f"met in 1 of 2; worst {g} rows/expert=16: 40%",
        f"grouped_gemm {g} triton, GB/s of the touched experts' weights (of the copy bandwidth) by rows/expert: "
        "1: 3,200 (75%), 16: 2,000 (40%)",
    ]
    assert gg.notes([r for r in records if r["impl"] != "triton"]) == []


# ---------------------------------------------------------------- the grouped GEMM tuner

tune = tune_grouped_mm


@pytest.mark.parametrize("variant", tune.VARIANTS)
@pytest.mark.parametrize("rows_cls", configs.ROWS_CLASSES)
def test_tuner_candidates_are_valid_and_start_with_the_default(variant, rows_cls):
    cands = tune.candidates(variant, rows_cls, 2)
    assert cands[0] == configs.default_gemm_config(variant, rows_cls, 2)
    assert len(cands) == len(set(cands)) >= 5
    assert all(tune.valid(variant, c, 2) for c in cands)
    assert tune.candidates(variant, rows_cls, 2, quick=True) == cands[:tune.QUICK_CANDIDATES]


def test_tuner_validity_filter():
    ok = configs.GemmConfig(128, 128, 64, 8, False, 8, 3)
    assert tune.smem_bytes("plain", ok, 2) == 3 * (128 * 64 + 64 * 128) * 2  # 96 KB
    assert tune.smem_bytes("gated", ok, 2) == 3 * (128 * 64 + 2 * 64 * 128) * 2
    assert tune.smem_bytes("dw", ok, 2) == 3 * 128 * (64 + 128) * 2
    assert tune.valid("plain", ok, 2)
    swap = configs.GemmConfig(16, 64, 128, 1, True, 4, 4)
    assert tune.valid("plain", swap, 2) and not tune.valid("dw", swap, 2)
    for bad in [configs.GemmConfig(64, 128, 64, 8, True, 4, 4),  # swap-AB needs 16-row tiles
                configs.GemmConfig(8, 128, 64, 8, False, 4, 4),  # a block under 16
                configs.GemmConfig(128, 512, 64, 8, False, 8, 2),  # over the TMA box's 256
                configs.GemmConfig(128, 96, 64, 8, False, 8, 3),  # not a power of two
                configs.GemmConfig(128, 256, 64, 8, False, 8, 5)]:  # 5 x 48 KB: 240 KB of shared memory
        assert not tune.valid("plain", bad, 2), bad
    # The gated epilogue's second weight tile: 128x256x64 in 3 stages fits plain (144 KB), not gated (240 KB).
    big = configs.GemmConfig(128, 256, 64, 8, False, 8, 3)
    assert tune.valid("plain", big, 2) and not tune.valid("gated", big, 2)


def test_tuner_problems():
    quick = tune.problems(True, tune.QUICK_VARIANTS)
    assert len(quick) == len({p.key for p in quick}) == 2 * 2 * 3  # 2 GEMMs x (plain, dw) x 3 classes
    assert "plain/bfloat16/m16/n1536/k2048" in {p.key for p in quick}
    full = {p.key: p for p in tune.problems(False, tune.VARIANTS)}
    assert full["gated/bfloat16/m64/n768/k2048"].n == 1536  # the key holds the output width
    assert "scatter/bfloat16/m64/n2048/k768" in full and "scatter/bfloat16/m64/n1536/k2048" not in full
    dx = full["plain/bfloat16/m128/n2048/k1536"]  # Qwen3-30B-A3B gate_up's dx: [E, N, K] read row-major
    assert not dx.kmajor and dx.name == "qwen3-30b-a3b gate_up"
    assert full["dw/bfloat16/m512/n4096/k7168"].experts == 32  # DeepSeek-V3's E 32 slice, not E 256


def test_tuner_keeps_the_fastest_correct_config_and_writes_the_table(tmp_path, monkeypatch):
    todo = [p for p in tune.problems(True, ("plain",)) if p.rows == 64]
    default = configs.default_gemm_config("plain", 64, 2)
    cands = tune.candidates("plain", 64, 2, quick=True)
    wrong, broken, fastest = cands[1], cands[2], cands[3]

    def measure(cfg):
        if cfg == broken:
            raise RuntimeError("out of resource: shared memory")
        return None if cfg == wrong else 5.0 if cfg == fastest else 10.0 + cands.index(cfg)

    logged = []
    table, timings = tune.tune(todo, lambda p: measure, quick=True, log=logged.append)
    assert table == {p.key: fastest for p in todo}
    assert timings[todo[0].key] == {"tuned": 5.0, "default": 10.0}
    assert any("output differs" in line for line in logged) and any("out of resource" in line for line in logged)

    path = tmp_path / "grouped_mm_h200.json"
    path.write_text(json.dumps({"configs": {"dw/bfloat16/m16/n8/k8": {**vars(default)}}, "timings_us": {}}))
    payload = tune.write_table(path, "h200", table, timings)
    assert payload["gpu"] == "h200" and {"torch", "triton", "commit", "date"} <= set(payload)
    assert set(json.loads(path.read_text())["configs"]) == {"dw/bfloat16/m16/n8/k8"} | set(table)  # merged
    monkeypatch.setattr(configs, "table_path", lambda gpu: str(path))
    configs.tuned_table.cache_clear()
    try:
        p = todo[0]
        assert configs.grouped_mm_config("plain", 64 * p.experts, p.experts, p.n, p.k, torch.bfloat16,
                                         "h200") == fastest
    finally:
        monkeypatch.undo()
        configs.tuned_table.cache_clear()


@pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("variant", tune.VARIANTS)
def test_tuner_measures_each_variant_under_the_interpreter(variant, monkeypatch):
    """The GPU path of the tuner on CPU tensors: inputs, the forced config, the reference check."""
    measure = tune.gpu_prepare(harness.CpuTimer(reps=1, target_ms=0.1), device="cpu")(
        tune.Problem(variant, "tiny", 4, 32, 48, 16, True))
    cands = tune.candidates(variant, 16, 2)
    assert measure(cands[0]) > 0 and measure(cands[-1]) > 0
    with pytest.raises(Exception, match="power of 2"):  # the forced config reaches the kernel
        measure(configs.GemmConfig(24, 48, 32, 1, False, 4, 2))
    monkeypatch.setattr(tune, "RTOL", -1.0)
    assert measure(cands[0]) is None  # an output off the reference is no candidate


def test_tuner_forced_config_replaces_one_variant_only():
    cfg = configs.GemmConfig(16, 64, 64, 1, True, 4, 3)
    with tune.forced_config("dw", cfg):
        assert configs.grouped_mm_config("dw", 64, 4, 64, 64, torch.bfloat16) == cfg
        assert configs.grouped_mm_config("plain", 64, 4, 64, 64, torch.bfloat16) != cfg
    assert configs.grouped_mm_config("dw", 64, 4, 64, 64, torch.bfloat16) != cfg


def test_tuner_without_a_gpu_exits_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    out = tmp_path / "table.json"
    assert tune.main(["--quick", "--out", str(out)]) == 2
    assert tune.NO_GPU in capsys.readouterr().out and not out.exists()


# ---------------------------------------------------------------- FP8

f8 = bench_fp8


def test_fp8_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the plots cost ~9 s here and are the harness's
    # --tokens: every case at the CPU's sizes (a bare --quick runs only the first on the CPU).
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "fp8", "--tokens", ",".join(map(str, f8.M_CPU))]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["roofline"] is None and run.NO_GPU in payload["notes"]
    records = payload["results"]
    ((n, k),) = f8.CPU_DENSE_NK
    assert (n, k) == (264, 896)  # an eighth of DeepGEMM's (2112, 7168): a partial 128-column block
    ((e, rows, cn, ck),) = f8.CPU_CONTIGUOUS
    want = {(f"dense N{n} K{k} {mode}", m) for mode in f8.MODES for m in f8.M_CPU}
    want |= {(f"contiguous {e}x{rows} N{cn} K{ck} {mode}", e * rows) for mode in f8.MODES}
    want |= {("quant 1x128 act K896", m) for m in f8.M_CPU} | {("quant 128x128 weight K896", 512)}
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (g, x, impl) for g, x in want for impl in ("naive", "torch")}
    for r in records:
        assert r["error"] is None, r
        assert r["x_name"] == "M" and r["gbps"] > 0 and r["roofline_fraction"] is None and r["speedup_vs_naive"] > 0
        p = r["params"]
        if p["kind"] == "quant":
            block = tuple(p["granularity"])
            assert r["flops"] == 0 and r["tflops"] is None and r["bound"] == "memory"
            assert r["bytes"] == f8.quant_bytes(p["rows"], p["cols"], block) == (
                p["rows"] * p["cols"] * 3 + p["rows"] // block[0] * (p["cols"] // block[1]) * 4)
            if r["impl"] == "torch":
                assert r["check"] == {"ok": True, "q_mismatch": 0.0, "scales_differ": 0}
            continue
        m = p["M"]
        assert r["flops"] == 2 * m * p["K"] * p["N"] and r["tflops"] > 0
        assert r["bytes"] == f8.fp8_mm_bytes(m, p["K"], p["N"], p["E"], p["mode"], p["kind"] == "contiguous")
        assert r["bound"] == "memory"  # <= 128 rows per expert
        if r["impl"] == "torch":
            check = r["check"]
            assert check["ok"] and check["rel_err"] <= f8.RTOL and check["naive_rel_err"] <= f8.RTOL, r
            # e4m3 keeps 3 mantissa bits: ~4% from the unquantized product on random data, in every mode.
            assert 0.01 < check["rel_err_unquantized"] < 0.1
    assert "| case | M | impl |" in (tmp_path / "bench.md").read_text()
    assert not (tmp_path / "fp8.png").exists()


def test_fp8_counts_flops_and_bytes():
    # DeepGEMM's dense N 4096 K 7168 at M 4096: 56 K-blocks of 128, 32 N-blocks.
    m, k, n = 4096, 7168, 4096
    assert f8.fp8_mm_flops(m, k, n) == 2 * m * k * n  # 241 GFLOP
    operands = m * k + k * n + 2 * m * n  # fp8 a and b, bf16 y
    assert f8.fp8_mm_bytes(m, k, n, 1, "block", False) == operands + 4 * (m * 56 + 56 * 32)
    assert f8.fp8_mm_bytes(m, k, n, 1, "rowwise", False) == operands + 4 * (m + n)
    assert f8.fp8_mm_bytes(m, k, n, 1, "tensor", False) == operands + 4 * 2
    # The grouped contiguous case 8 x 4096 rows: 8 experts' weights and scales, and the int32 offs.
    m, e = 8 * 4096, 8
    assert f8.fp8_mm_bytes(m, k, n, e, "block", True) == (
        m * k + e * k * n + 2 * m * n + 4 * (m * 56 + e * 56 * 32) + 4 * e)
    # N 2112 is 16.5 blocks of 128: 17 scales a K-block.
    assert f8.scale_bytes("block", 64, 7168, 2112, 1) == 4 * (64 * 56 + 56 * 17)
    # Activations [32768, 7168] per (1, 128): bf16 read, e4m3 and 56 scales a row written.
    assert f8.quant_bytes(32768, 7168, (1, 128)) == 32768 * 7168 * 3 + 32768 * 56 * 4
    assert f8.quant_bytes(4096, 7168, (128, 128)) == 4096 * 7168 * 3 + 32 * 56 * 4


def _fp8_inputs(mode, sizes=(5, 0, 9, 2), n=136, k=256):
    """Tiny inputs: an expert without rows, N not a multiple of 128 (a partial scale block)."""
    (inp,) = f8._gemm_inputs(list(sizes), n, k, mode, "cpu", dense=len(sizes) == 1)()
    return inp


@pytest.mark.parametrize("mode", f8.MODES)
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "grouped"])
def test_fp8_implementations_agree_on_cpu(mode, dense):
    """Every implementation of the GPU suite, on CPU tensors (torch._scaled_mm's CPU path; Triton
    under the interpreter), checked as the harness checks them."""
    inp = _fp8_inputs(mode, (16,) if dense else (5, 0, 9, 2))
    assert inp.dense == dense and inp.b.shape == (len(inp.sizes), 256, 136)
    naive = f8.timed(f8.naive)(inp)
    impls = {"torch": f8.timed(f8.library("torch"))}
    if dense and mode != "block":
        impls["native"] = f8.timed(f8.native)
    if _backend.interpreting():
        impls["triton"] = f8.timed(f8.library("triton"))
        impls["bf16"] = f8.timed(f8.bf16, ref="bf16")
    for name, fn in impls.items():
        out = fn(inp)
        assert out[0].shape == (sum(inp.sizes), 136) and out[0].dtype == torch.bfloat16
        check = f8.compare(out, naive)
        assert check["ok"] and check["naive_rel_err"] <= f8.RTOL, (name, check)
        assert check["rel_err_unquantized"] < 0.1, (name, check)


def test_fp8_check_samples_every_part_and_catches_wrong_outputs():
    picks = f8.check_rows([100, 0, 3, 50, 7, 0])
    assert [e for e, _ in picks] == [0, 2, 3, 4]  # first to last of the experts with rows
    assert picks[0][1][[0, -1]].tolist() == [0, 99] and len(picks[0][1]) == f8.CHECK_ROWS
    assert picks[1][1].tolist() == [100, 101, 102]
    inp = _fp8_inputs("block")
    naive = f8.timed(f8.naive)(inp)
    y, _, _ = f8.timed(f8.library("torch"))(inp)
    assert f8.compare((y, inp, "fp8"), naive)["ok"]
    wrong = y.clone()
    wrong[-1] += 1.0  # the last row, which the check always samples
    assert not f8.compare((wrong, inp, "fp8"), naive)["ok"]
    # The dequantized product is no answer for the bf16 baseline, nor the reverse.
    assert not f8.compare((y, inp, "bf16"), naive)["ok"]

    x = torch.randn(256, 384).bfloat16()
    q, s = f8.naive_quantize(x, (128, 128))
    assert (q.shape, s.shape) == ((256, 384), (2, 3))
    assert f8.compare_quant(moekernels.quantize_fp8(x, (128, 128), backend="torch"), (q, s))["ok"]
    flipped = q.view(torch.uint8).clone()
    flipped[7, 7] ^= 1
    check = f8.compare_quant((flipped.view(q.dtype), s), (q, s))
    assert not check["ok"] and check["q_mismatch"] == 1 / q.numel()
    assert not f8.compare_quant((q, s * 2), (q, s))["ok"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _backend.interpreting(), reason="needs TRITON_INTERPRET=1"))])
@pytest.mark.parametrize("granularity", [(1, 128), (128, 128)], ids=["1x128", "128x128"])
def test_fp8_naive_quantize_is_quantize_fp8(granularity, backend):
    x = torch.randn(256, 512).bfloat16() * torch.logspace(-3, 2, 512).bfloat16()
    x[3] = 0  # an all-zero block: scale 1e-12 / 448, q zeros
    assert f8.compare_quant(moekernels.quantize_fp8(x, granularity, backend=backend),
                            f8.naive_quantize(x, granularity))["ok"]


def test_fp8_gpu_sweeps():
    quick = f8.cases("cuda", quick=True)  # builds cases only: no input is made
    assert len(quick) == 10
    for c in quick:
        mode, kind = c.params.get("mode"), c.params["kind"]
        if kind == "quant":
            cuda = ["cuda"] if moekernels.HAS_CUDA_EXT and c.params["operand"] == "act" else []  # (1, 128) only
            assert list(c.impls) == ["naive", "torch", "triton"] + cuda and c.compare is f8.compare_quant
        elif mode == "block":
            # the torch reference: full suite only; the contiguous case adds CUTLASS's kernel where it runs
            # (an sm_90 GPU, built) and torch._scaled_grouped_mm where torch has it
            extra = [] if kind == "dense" else (["cutlass"] if f8.cutlass_usable("cuda") else []) + (
                ["scaled_grouped"] if hasattr(torch, "_scaled_grouped_mm") else [])
            assert list(c.impls) == ["naive", "bf16", "triton"] + extra
        else:
            assert kind == "dense" and list(c.impls) == ["naive", "native", "triton"]
        if kind != "quant":
            assert c.bound == ("memory" if c.x // c.params["E"] <= f8.MEMORY_ROWS else "compute")
    assert {(c.group, c.x) for c in quick if c.params["kind"] == "contiguous"} == {
        ("contiguous 8x4096 N4096 K7168 block", 32768)}
    assert {c.x for c in quick if c.params["kind"] == "dense"} == {128, 4096}

    full = f8.cases("cuda", quick=False)
    gemms = [c for c in full if c.params["kind"] != "quant"]
    # DeepGEMM's dense table x M x modes; its contiguous cases and DeepSeek-V3's 32 x 512 x modes
    assert len(gemms) == 5 * 3 * 3 + 5 * 3
    assert all(("torch" in c.impls) == (c.flops <= f8.TORCH_MAX_FLOPS) for c in gemms)
    assert all(("native" in c.impls) == (c.params["kind"] == "dense" and c.params["mode"] != "block")
               for c in gemms)
    assert all(("bf16" in c.impls) == (c.params["mode"] == "block") for c in gemms)
    groups = {c.group for c in full}
    assert {"dense N2112 K7168 tensor", "dense N7168 K16384 block", "contiguous 4x8192 N4096 K7168 block",
            "contiguous 8x4096 N7168 K2048 rowwise", "quant 1x128 act K2048", "quant 128x128 weight K2048"} <= groups
    assert f8.cases("cuda", quick=False, tokens=[1, 8])[0].x == 1  # --tokens sets the dense M


def _f8_record(group, x, impl, us, *, kind, mode=None, tflops=None, frac=None):
    return {"bench": "fp8", "group": group, "x": x, "impl": impl, "error": None, "time_us": {"median": us},
            "tflops": tflops, "roofline_fraction": frac, "params": {"kind": kind, "mode": mode}}


def test_fp8_notes_report_the_targets():
    c1, c2 = "contiguous 8x4096 N4096 K7168 block", "contiguous 4x8192 N4096 K7168 block"
    d = "dense N4096 K7168 block"
    records = [
        _f8_record(c1, 32768, "bf16", 3000.0, kind="contiguous", mode="block"),
        _f8_record(c1, 32768, "triton", 1500.0, kind="contiguous", mode="block", tflops=1283.0),
        _f8_record(c2, 32768, "bf16", 3000.0, kind="contiguous", mode="block"),
        _f8_record(c2, 32768, "triton", 2000.0, kind="contiguous", mode="block", tflops=962.0),
        _f8_record(d, 4096, "bf16", 400.0, kind="dense", mode="block"),
        _f8_record(d, 4096, "triton", 200.0, kind="dense", mode="block", tflops=1200.0),
        _f8_record("dense N4096 K7168 rowwise", 4096, "triton", 100.0, kind="dense", mode="rowwise"),
        _f8_record("quant 1x128 act K7168", 32768, "triton", 200.0, kind="quant", frac=0.82),
        _f8_record("quant 128x128 weight K7168", 32768, "triton", 300.0, kind="quant", frac=0.55),
        _f8_record("quant 1x128 act K7168", 32768, "torch", 900.0, kind="quant", frac=0.1),
        _f8_record("quant 1x128 act K7168", 32768, "cuda", 180.0, kind="quant", frac=0.91),
    ]
    assert f8.notes(records) == [
        "fp8 contiguous block-wise, triton vs bf16 grouped_mm: target >= 1.60: met in 1 of 2; "
        f"worst {c2} M=32768: 1.50",
        f"fp8 dense block-wise, triton vs bf16 grouped_mm: target >= 1.60: met in 1 of 1; worst {d} M=4096: 2.00",
        f"fp8 contiguous block-wise, triton TFLOP/s: target >= 1,100: met in 1 of 2; worst {c2} M=32768: 962",
        "fp8 quantize_fp8, triton of the copy bandwidth: target >= 70%: met in 1 of 2; "
        "worst quant 128x128 weight K7168 M=32768: 55%",
        "fp8 quantize_fp8, cuda of the copy bandwidth: target >= 70%: met in 1 of 1; "
        "worst quant 1x128 act K7168 M=32768: 91%",
    ]
    assert f8.notes([r for r in records if r["impl"] not in f8.KERNELS]) == []


def test_device_check_keeps_at_most_8_files():
    """Each call's logs, rows.jsonl, bench.json, bench.md and the plots it keeps: the device machine
    returns 8 files at most."""
    for stage, block in _device_check_stages(_device_check()).items():
        if 'rm -f "$OUT_DIR"/*.png' in block:
            plots = set()
        else:  # find ... -name '*.png' ! -name route.png ... -delete
            assert re.search(r"find \"\$OUT_DIR\" -maxdepth 1 -name '\*\.png' .*-delete", block)
            plots = set(re.findall(r"! -name (\w+\.png)", block))
            assert plots <= {f"{name}.png" for name in run.BENCHMARKS}
        files = _device_check_logs(block) | {"rows.jsonl", "bench.json", "bench.md"} | plots
        assert len(files) <= 8, (stage, sorted(files))


# ---------------------------------------------------------------- the device check's two parts

def _gpu_quick_cases():
    """The quick GPU suite's cases, built on the CPU (no input is made; bench_moe leaves out the
    transformers rows it cannot run here)."""
    return [c for module in run.BENCHMARKS.values()
            for c in importlib.import_module(f"benchmarks.{module}").cases("cuda", True, None)]


def test_headline_rows_are_quick_gpu_cases_in_priority_order():
    cases = _gpu_quick_cases()
    headline = run.select(cases, "headline")
    for bench, group, sizes, impls in run.HEADLINE:
        found = [c for c in headline if (c.bench, c.group) == (bench, group)]
        assert sorted(c.x for c in found) == sorted(sizes), (bench, group)
        known = {**harness.IMPLS, **getattr(importlib.import_module(f"benchmarks.{run.BENCHMARKS[bench]}"), "IMPLS", {})}
        assert impls is None or set(impls) <= set(known), impls
        assert all("naive" in c.impls for c in found)  # each row is checked against it
    order = [next(i for i, e in enumerate(run.HEADLINE) if (c.bench, c.group) == e[:2]) for c in headline]
    assert order == sorted(order) and [c.bench for c in headline][:3] == ["grouped_gemm"] * 2 + ["fp8"]
    assert {"native", "triton"} <= set(headline[0].impls)  # torch._grouped_mm and ours
    route = next(c for c in headline if c.bench == "route")
    assert route.x == 40000 and {"triton", "cuda"} <= set(route.impls)


def test_headline_and_rest_split_the_quick_suite():
    cases = _gpu_quick_cases()
    timed = lambda part: {(c.bench, c.group, c.x, i) for c in run.select(cases, part) for i in c.impls}  # noqa: E731
    every = timed("all")
    assert timed("headline") | timed("rest") == every and len(every) == sum(len(c.impls) for c in cases)
    # No timing twice, but naive, which a headline case's leftover implementations need for their check.
    assert {t for t in timed("headline") & timed("rest") if t[3] != "naive"} == set()
    assert run.select(cases, "all") is cases


def test_rows_are_written_as_they_are_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    seen = []  # the rows file's lines when each record is taken: one more each time
    record = harness.run_cases

    def run_cases(cases, timer, on_record=None):
        def spy(rec):
            on_record(rec)
            seen.append(len((tmp_path / "rows.jsonl").read_text().splitlines()))
        return record(cases, timer, spy)

    monkeypatch.setattr(harness, "run_cases", run_cases)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "plan", "--only", "route",
                     "--rows", str(tmp_path / "rows.jsonl")]) == 0
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert seen == [2, 3, 4, 5] and len(lines) == 5
    head = json.loads(lines[0])
    assert head["roofline"] is None and head["metadata"]["gpu"] == "cpu" and head["metadata"]["device_name"]
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    rows = [json.loads(line) for line in lines[1:]]
    assert [(r["bench"], r["group"], r["impl"], r["time_us"]) for r in rows] == [
        (r["bench"], r["group"], r["impl"], r["time_us"]) for r in results]
    # Cut off as it wrote the last row: the table has the rows before it.
    (tmp_path / "cut.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    table = run.rows_table(tmp_path / "cut.jsonl")
    assert table.splitlines()[0] == f"{head['metadata']['device_name']} (cpu), 3 rows"
    assert table.count("mixtral-8x7b") == 3


# ---------------------------------------------------------------- the MoE layer

bm = bench_moe


def test_moe_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "moe", "--tokens", "1,16"]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["roofline"] is None
    assert payload["notes"] == [run.NO_GPU]  # no targets without a roofline, no transformers line on the CPU
    records = payload["results"]
    shape = bm.CPU_SHAPE
    assert (shape.experts, shape.hidden, shape.intermediate, shape.top_k) == (16, 256, 128, 8)
    groups = [f"{shape.name} {p}" for p in ("fwd bf16", "fwd fp8", "fwd+bwd bf16")]  # fp8 is inference-only
    lora = [f"{shape.name} fwd+bwd {d} lora r16" for d in ("bf16", "fp8")]  # at the largest T only
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (g, t, impl) for g in groups for t in (1, 16) for impl in ("naive", "torch")} | {
        (g, 16, impl) for g in lora for impl in ("naive", "torch")} | {(lora[0], 16, "no_lora")}
    for r in records:
        assert r["error"] is None, r
        p = r["params"]
        backward, fp8 = p["pass"] == "fwd+bwd", p["dtype"] == "fp8"
        touched = bm.routing(shape, r["x"])[1].unique().numel()
        assert p["touched_experts"] == touched and p["transformers"] is None and not p["transformers_timed"]
        if r["group"] in lora:
            assert p["lora_rank"] == 16 and r["flops"] == bm.lora_flops(r["x"], 256, 128, 8, 16)
            assert r["bytes"] == bm.lora_bytes(r["x"], 256, 128, 16, 8, touched, fp8, 16)
            if r["impl"] != "naive":
                ref = "bf16" if r["impl"] == "no_lora" else f"{p['dtype']}+lora"
                assert r["check"]["ok"] and r["check"]["rel_err"] <= bm.RTOL[ref], r
                assert r["check"]["naive_rel_err"] <= bm.RTOL[f"{p['dtype']}+lora"], r
            continue
        assert r["flops"] == (3 if backward else 1) * 6 * r["x"] * 8 * 256 * 128
        assert r["bytes"] == bm.moe_bytes(r["x"], 256, 128, 16, 8, touched, fp8, backward)
        assert p["weight_bytes"] == bm.weight_bytes(touched, 256, 128, fp8)
        assert r["bound"] == "memory"  # <= 64 pairs per expert
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_fraction"] is None
        if r["impl"] == "torch":
            check, rtol = r["check"], bm.RTOL[p["dtype"]]
            assert check["ok"] and check["rel_err"] <= rtol and check["naive_rel_err"] <= rtol, r
            assert ("rel_err_unquantized" in check) == fp8
    assert "| case | T | impl | median us |" in (tmp_path / "bench.md").read_text()


def test_moe_counts_flops_and_bytes():
    # DeepSeek-V3's slice at 4096 tokens: 32768 pairs through H 7168, I 2048 (2.9 TFLOP forward).
    t, h, i, e, k = 4096, 7168, 2048, 32, 8
    fwd = 2 * t * k * h * 2 * i + 2 * t * k * i * h
    assert bm.moe_flops(t, h, i, k, False) == fwd == 6 * t * k * h * i
    assert bm.moe_flops(t, h, i, k, True) == 3 * fwd
    w = e * 3 * i * h * 2
    assert bm.weight_bytes(e, h, i, False) == w
    # fp8: a byte a weight and a float32 scale per (128, 128) block of [2I, H] and [H, I].
    assert bm.weight_bytes(e, h, i, True) == e * (3 * i * h + 4 * (32 * 56 + 56 * 16))
    assert bm.moe_bytes(t, h, i, e, k, e, False, False) == 2 * t * h * 2 + t * k * 8 + w
    # fwd+bwd: dy read, dx written, the float32 router weights' gradient and every expert's dw written.
    assert bm.moe_bytes(t, h, i, e, k, e, False, True) == 4 * t * h * 2 + t * k * 12 + 2 * w
    assert bm.moe_bytes(t, h, i, e, k, e, True, True) == 4 * t * h * 2 + t * k * 12 + w + bm.weight_bytes(e, h, i, True)
    # Qwen3-30B-A3B decode: one token reads 8 of the 128 experts; the weights are all but 8 KB of it.
    assert bm.moe_bytes(1, 2048, 768, 128, 8, 8, False, False) == 2 * 2048 * 2 + 8 * 8 + 8 * 3 * 768 * 2048 * 2


def test_moe_routing_is_fixed_balanced_and_renormalized():
    w, ids = bm.routing(QWEN3_30B_A3B, 4096)
    assert ids.shape == (4096, 8) and ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids, bm._routing.__wrapped__(128, 8, 4096)[1])  # the same from the seed, not only the cache
    assert all(len(set(row)) == 8 for row in ids.tolist())  # k distinct experts a token
    counts = torch.bincount(ids.reshape(-1).long(), minlength=128)
    assert counts.min() > 0 and counts.max() < 1.5 * 256  # 256 pairs an expert on average
    assert torch.allclose(w.sum(1), torch.ones(4096)) and (w[:, :-1] >= w[:, 1:]).all()
    (inp,) = bm.make_inputs(bm.CPU_SHAPE, 8, "fwd+bwd", "bf16", "cpu")()
    assert all(t.requires_grad for t in inp.leaves()) and inp.dy.shape == (8, 256)
    assert not bm.routing(bm.CPU_SHAPE, 8)[0].requires_grad  # make_inputs copies the shared routing
    assert torch.equal(inp.topk_ids_long, inp.topk_ids.long()) and inp.topk_ids_long.dtype == torch.int64


@pytest.mark.parametrize("pass_name, dtype", [("fwd", "bf16"), ("fwd+bwd", "bf16"), ("fwd", "fp8")])
def test_moe_implementations_agree_on_cpu(pass_name, dtype):
    """Every implementation the GPU suite times, on CPU tensors (transformers' where it imports,
    Triton under the interpreter), checked as the harness checks them."""
    torch.manual_seed(0)
    shape = MoEShape("tiny", hidden=256, intermediate=128, experts=8, top_k=4)
    hf, _ = bm.transformers_impls("cpu")
    (inp,) = bm.make_inputs(shape, 16, pass_name, dtype, "cpu", hf)()
    naive = bm.timed(bm.naive, dtype)(inp)
    impls = {"torch": bm.timed(bm.library("torch"), dtype)}
    if hf is not None:
        impls |= {name: bm.timed(bm.hf_impl(hf, name), "bf16") for name in bm.HF_IMPLS}
    if _backend.interpreting():
        impls["triton"] = bm.timed(bm.library("triton"), dtype)
    for name, fn in impls.items():
        out = fn(inp)
        outs = out[0]
        assert outs[0].shape == (16, 256) and outs[0].dtype == torch.bfloat16
        assert len(outs) == (5 if pass_name == "fwd+bwd" else 1)
        check = bm.compare(out, naive)
        assert check["ok"] and check["naive_rel_err"] <= bm.RTOL[dtype], (name, check)
        if dtype == "fp8":
            assert check["rel_err_unquantized"] < 0.1, (name, check)


def test_moe_check_catches_wrong_outputs():
    torch.manual_seed(0)
    assert bm.sample_tokens(100)[[0, -1]].tolist() == [0, 99] and len(bm.sample_tokens(100)) == bm.CHECK_TOKENS
    (inp,) = bm.make_inputs(bm.CPU_SHAPE, 32, "fwd+bwd", "bf16", "cpu")()
    naive = bm.timed(bm.naive, "bf16")(inp)
    outs, _, _ = bm.timed(bm.library("torch"), "bf16")(inp)
    assert bm.compare((outs, inp, "bf16"), naive)["ok"]
    (busiest, least), empty = bm.check_experts(inp.topk_ids, 16)
    counts = torch.bincount(inp.topk_ids.reshape(-1).long(), minlength=16)
    assert counts[busiest] == counts.max() and counts[least] == counts.min() and empty is None

    def broken(index, change):
        wrong = [t.detach().clone() for t in outs]
        change(wrong[index])
        return bm.compare((tuple(wrong), inp, "bf16"), naive)

    for index, change, part in [
            (0, lambda y: y[-1].add_(1.0), "y"),  # the last token, which the check always samples
            (1, lambda dx: dx[-1].mul_(2.0), "dx"),
            (2, lambda dtw: dtw[0].copy_(dtw[0].flip(0)), "d_topk_weights"),
            (3, lambda dw: dw[busiest].mul_(1.1), "dw_gate_up"),
            (4, lambda dw: dw[least].mul_(1.1), "dw_down")]:
        check = broken(index, change)
        assert not check["ok"] and check["worst"] == part, (part, check)

    (one,) = bm.make_inputs(bm.CPU_SHAPE, 1, "fwd+bwd", "bf16", "cpu")()  # 8 of the 16 experts
    outs, _, _ = bm.timed(bm.library("torch"), "bf16")(one)
    empty = bm.check_experts(one.topk_ids, 16)[1]
    ghost = [t.detach().clone() for t in outs]
    ghost[4][empty] = 1.0  # a gradient for an expert that saw no pair
    check = bm.compare((tuple(ghost), one, "bf16"), bm.timed(bm.naive, "bf16")(one))
    assert not check["ok"] and check["worst"] == "dw_untouched"

    # fp8: the quantized layer is no answer for the bf16 reference.
    (q,) = bm.make_inputs(bm.CPU_SHAPE, 16, "fwd", "fp8", "cpu")()
    y = bm.timed(bm.library("torch"), "fp8")(q)[0]
    naive = bm.timed(bm.naive, "fp8")(q)
    assert bm.compare((y, q, "fp8"), naive)["ok"] and not bm.compare((y, q, "bf16"), naive)["ok"]


def test_moe_transformers_impls_say_why_not(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    bm.transformers_impls.cache_clear()
    try:
        hf, why = bm.transformers_impls("cpu")
    finally:
        bm.transformers_impls.cache_clear()
    assert hf is None and why.startswith("transformers does not import: ")


def test_moe_transformers_module_holds_the_case_weights():
    hf, why = bm.transformers_impls("cpu")
    if hf is None:
        pytest.skip(why)
    assert why == f"transformers {hf.version}"
    (inp,) = bm.make_inputs(bm.CPU_SHAPE, 4, "fwd", "bf16", "cpu", hf)()
    assert inp.hf.gate_up_proj is inp.w_gate_up and inp.hf.down_proj is inp.w_down  # no copies
    assert hf.eager is getattr(hf.experts_cls.forward, "__wrapped__", hf.experts_cls.forward)


@pytest.mark.parametrize("with_hf", [True, False], ids=["transformers", "no-transformers"])
def test_moe_gpu_sweeps(with_hf, monkeypatch):
    hf = bm.HfExperts("9.9", None, None, None, None) if with_hf else None  # builds cases only: never called
    monkeypatch.setattr(bm, "transformers_impls", lambda device: (hf, "transformers 9.9" if hf else "why not"))
    quick = bm.cases("cuda", quick=True)  # no input is made
    assert [(c.group, c.x) for c in quick] == [
        ("qwen3-30b-a3b fwd bf16", 8), ("qwen3-30b-a3b fwd bf16", 4096), ("qwen3-30b-a3b fwd+bwd bf16", 4096),
        ("deepseek-v3 E32 fwd bf16", 512), ("deepseek-v3 E32 fwd fp8", 512),
        ("qwen3-30b-a3b fwd+bwd bf16 lora r16", 4096)]
    lora = quick.pop()  # ours with and without the adapters, and PEFT's materializing path
    assert list(lora.impls) == ["naive"] + (["peft_grouped_mm"] if hf else []) + ["triton", "no_lora"]
    assert lora.eager == ("naive",) and lora.params["lora_rank"] == 16 and lora.bound == "compute"
    for c in quick:  # naive first: the harness's speed-ups and checks are against it; torch: full suite only
        backward = c.params["pass"] == "fwd+bwd"
        hf_impls = [] if hf is None else ["hf_grouped_mm"] if backward else ["hf_eager", "hf_grouped_mm"]
        assert list(c.impls) == ["naive"] + hf_impls + ["triton"]
        assert c.eager == ("naive",) + (("hf_eager",) if "hf_eager" in hf_impls else ())
        assert c.bound == ("memory" if c.x * c.params["k"] <= 64 * c.params["E"] else "compute")
        assert c.params["transformers_timed"] == with_hf
        assert c.params["transformers"] == ("transformers 9.9" if with_hf else "why not")
    assert {(c.group, c.x) for c in bm.cases("cuda", quick=True, tokens=[1, 64])} == {
        (g, t) for g in ("qwen3-30b-a3b fwd bf16", "qwen3-30b-a3b fwd+bwd bf16", "deepseek-v3 E32 fwd bf16",
                         "deepseek-v3 E32 fwd fp8", "qwen3-30b-a3b fwd+bwd bf16 lora r16") for t in (1, 64)}

    full = bm.cases("cuda", quick=False)
    lora = [c for c in full if c.params.get("lora_rank")]
    # 2 shapes x bf16, fp8 x r 16, 64 x T 512, 4096, 16384, less DeepSeek-V3 E32's 16384 (MAX_FLOPS).
    assert len(lora) == 20 and {c.params["lora_rank"] for c in lora} == {16, 64}
    assert {(c.group, c.x) for c in lora if c.group.startswith("deepseek")} == {
        (f"deepseek-v3 E32 fwd+bwd {d} lora r{r}", t) for d in ("bf16", "fp8") for r in (16, 64) for t in (512, 4096)}
    for c in lora:  # no_lora in bf16 only: the layer on e4m3 experts has no backward without adapters
        assert ("no_lora" in c.impls) == (c.params["dtype"] == "bf16") and "triton" in c.impls
        assert ("peft_grouped_mm" in c.impls) == with_hf and "hf_grouped_mm" not in c.impls
    full = [c for c in full if c not in lora]
    assert len(full) == 70
    assert all(c.flops <= bm.MAX_FLOPS for c in full)
    assert all(("torch" in c.impls) == (c.flops <= bm.TORCH_MAX_FLOPS) for c in full)
    assert all(("hf_grouped_mm" in c.impls) == with_hf for c in full)
    # transformers' eager fwd+bwd (E^2 x one expert's weights of zero-fill a call): Mixtral's 8 experts only.
    assert {c.group for c in full if "hf_eager" in c.impls and c.params["pass"] == "fwd+bwd"} == (
        {"mixtral-8x7b fwd+bwd bf16"} if with_hf else set())
    groups = {(c.group, c.x) for c in full}
    for name in ("mixtral-8x7b", "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3 E32"):
        assert {(f"{name} {p}", t) for p in ("fwd bf16", "fwd fp8") for t in bm.TOKENS_FULL} <= groups
    assert not any(g.endswith("fwd+bwd fp8") for g, _ in groups)  # the fp8 path is inference-only
    # 17.6 TFLOP at most: Mixtral's and DeepSeek-V3 E32's fwd+bwd at 16384 tokens (34.6) are left out.
    assert ("mixtral-8x7b fwd+bwd bf16", 16384) not in groups and ("deepseek-v3 E32 fwd+bwd bf16", 16384) not in groups
    assert ("qwen3-235b-a22b fwd+bwd bf16", 16384) in groups
    e32 = next(c for c in full if c.group == "deepseek-v3 E32 fwd bf16" and c.x == 1)
    assert (e32.params["E"], e32.params["H"], e32.params["I"], e32.params["k"]) == (32, 7168, 2048, 8)


def _moe_record(group, x, impl, us, *, dtype="bf16", pass_name="fwd", frac=None, weight_bytes=0, nbytes=1,
                transformers="transformers 5.24.0", timed=True):
    return {"bench": "moe", "group": group, "x": x, "impl": impl, "error": None, "time_us": {"median": us},
            "roofline_fraction": frac, "bytes": nbytes,
            "params": {"pass": pass_name, "dtype": dtype, "weight_bytes": weight_bytes,
                       "transformers": transformers, "transformers_timed": timed}}


def test_moe_notes_report_the_targets():
    g, gb, gf = "qwen3-30b-a3b fwd bf16", "qwen3-30b-a3b fwd+bwd bf16", "deepseek-v3 E32 fwd fp8"
    records = [
        _moe_record(g, 4096, "hf_grouped_mm", 1300.0), _moe_record(g, 4096, "hf_eager", 20000.0),
        _moe_record(g, 4096, "triton", 1000.0),
        _moe_record(g, 16384, "hf_grouped_mm", 4000.0), _moe_record(g, 16384, "hf_eager", 30000.0),
        _moe_record(g, 16384, "triton", 3500.0),
        _moe_record(g, 512, "hf_grouped_mm", 900.0), _moe_record(g, 512, "triton", 1000.0),  # not prefill
        _moe_record(gb, 4096, "hf_grouped_mm", 5000.0, pass_name="fwd+bwd"),
        _moe_record(gb, 4096, "triton", 3000.0, pass_name="fwd+bwd"),
        _moe_record(gf, 4096, "hf_grouped_mm", 1200.0, dtype="fp8"),
        _moe_record(gf, 4096, "triton", 800.0, dtype="fp8"),
        # 75 MB of weights (of 75.5 MB moved) in 25 us at 75.5% of a 4,000 GB/s copy rate: 1.33x the floor
        _moe_record(g, 8, "triton", 25.0, frac=0.755, weight_bytes=75_000_000, nbytes=75_500_000),
        _moe_record(g, 1, "triton", 10.0, frac=0.375, weight_bytes=15_000_000, nbytes=15_000_000),
        _moe_record(g, 1, "naive", 900.0, frac=0.01, weight_bytes=15_000_000, nbytes=15_000_000),
    ]
    assert bm.notes(records) == [
        "moe: hf_eager and hf_grouped_mm are transformers 5.24.0's Qwen3MoeExperts.forward and "
        "ExpertsInterface['grouped_mm']; in the fp8 groups they run the unquantized bf16 weights "
        "(transformers' FP8 experts need the kernels package and a Hub download)",
        "moe forward bf16 at T >= 4096, triton vs transformers' grouped_mm: target >= 1.30: met in 1 of 2; "
        f"worst {g} T=16384: 1.14",
        "moe forward bf16 at T >= 4096, triton vs transformers' eager: target >= 10.00: met in 1 of 2; "
        f"worst {g} T=16384: 8.57",
        "moe fwd+bwd bf16 at T >= 4096, triton vs transformers' grouped_mm: target >= 1.30: met in 1 of 1; "
        f"worst {gb} T=4096: 1.67",
        "moe forward bf16 at T <= 64, triton time over the touched weights' read floor: target <= 1.50: "
        f"met in 1 of 2; worst {g} T=1: 2.67",
        f"moe {g} triton, GB/s of the touched experts' weights (time over the floor) by T: "
        "8: 3,000 (1.33x), 1: 1,500 (2.67x)",
        "moe forward fp8 at T >= 4096, triton vs transformers' grouped_mm: target >= 1.30: met in 1 of 1; "
        f"worst {gf} T=4096: 1.50",
    ]
    skipped = [_moe_record(g, 8, "naive", 900.0, transformers="transformers does not import: ImportError: x",
                           timed=False)]
    assert bm.notes(skipped) == ["moe: transformers' experts not timed: transformers does not import: ImportError: x"]
    assert bm.notes([r for r in records if r["impl"] not in bm.KERNELS and r["impl"] not in bm.HF_IMPLS]) == []


def test_moe_lora_counts_flops_and_bytes():
    # Qwen3-30B-A3B at 4096 tokens, r 16: the frozen layer's forward and dgrads, plus the adapters' 3 x forward.
    t, h, i, e, k, r = 4096, 2048, 768, 128, 8, 16
    adapters = 2 * t * k * r * (h + 2 * i) + 2 * t * k * r * (i + h)
    assert bm.lora_flops(t, h, i, k, r) == 2 * 6 * t * k * h * i + 3 * adapters
    assert 1.03 < bm.lora_flops(t, h, i, k, r) / bm.lora_flops(t, h, i, k, 0) < 1.04  # r 16 adds 3.3% of FLOPs
    # The forward's bytes, dy read, dx and the router weights' gradient written, the adapters read and written;
    # no weight gradient.
    lora = e * r * (2 * h + 3 * i) * 2
    assert bm.lora_bytes(t, h, i, e, k, e, False, r) == (bm.moe_bytes(t, h, i, e, k, e, False, False) + 2 * t * h * 2
                                                         + t * k * 4 + 2 * lora)
    assert bm.lora_bytes(t, h, i, e, k, e, True, r) - bm.lora_bytes(t, h, i, e, k, e, False, r) == (
        bm.weight_bytes(e, h, i, True) - bm.weight_bytes(e, h, i, False))


def _lora_impls(hf):
    impls = {"torch": bm.timed(bm.library("torch"), None), "no_lora": bm.timed(bm.library("torch", lora=False),
                                                                              "bf16", frozen=True)}
    if hf is not None:
        impls["peft_grouped_mm"] = bm.timed(bm.peft_grouped_mm(hf), "bf16+lora")
    return impls


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_moe_lora_implementations_agree_on_cpu(dtype):
    """The LoRA groups' implementations (PEFT's path where transformers imports), checked as the harness checks
    them: y, dx, the router weights' and the adapters' gradients. The triton row is the torch row's call with
    another backend (tests/test_lora*.py run the op on interpreted Triton; ~5 s a step here)."""
    torch.manual_seed(0)
    shape = MoEShape("tiny", hidden=128, intermediate=128, experts=8, top_k=2)
    hf, _ = bm.transformers_impls("cpu")
    (inp,) = bm.make_inputs(shape, 16, "fwd+bwd", dtype, "cpu", hf, lora_rank=4)()
    assert [t.shape for t in inp.lora] == [(8, 4, 128), (8, 256, 4), (8, 4, 128), (8, 128, 4)]
    assert not inp.w_gate_up.requires_grad and all(t.requires_grad for t in inp.leaves())
    ref = f"{dtype}+lora"
    naive = bm.timed(bm.naive, ref)(inp)
    for name, fn in _lora_impls(hf).items():
        if name == "no_lora" and dtype == "fp8":
            continue
        out = fn(inp)
        outs = (out[0], inp, out[2] or ref)
        assert len(outs[0]) == (3 if name == "no_lora" else 7)
        check = bm.compare(outs, naive)
        assert check["ok"] and check["naive_rel_err"] <= bm.RTOL[ref], (name, check)
        if name != "no_lora":  # the adapters change the layer: its plain reference is no answer
            assert not bm.compare(((outs[0][0],), inp, "bf16"), naive)["ok"], name


def test_moe_lora_check_catches_wrong_outputs():
    torch.manual_seed(0)
    shape = MoEShape("tiny", hidden=128, intermediate=128, experts=8, top_k=2)
    (inp,) = bm.make_inputs(shape, 16, "fwd+bwd", "bf16", "cpu", lora_rank=4)()
    naive = bm.timed(bm.naive, "bf16+lora")(inp)
    outs = bm.timed(bm.library("torch"), "bf16+lora")(inp)[0]
    assert bm.compare((outs, inp, "bf16+lora"), naive)["ok"]
    (busiest, least), _ = bm.check_experts(inp.topk_ids, 8)
    for index, change, part in [(3, lambda g: g[busiest].mul_(1.1), "d_a1"), (4, lambda g: g[least].mul_(1.1), "d_b1"),
                                (5, lambda g: g[busiest].neg_(), "d_a2"), (6, lambda g: g[least].zero_(), "d_b2")]:
        wrong = [t.detach().clone() for t in outs]
        change(wrong[index])
        check = bm.compare((tuple(wrong), inp, "bf16+lora"), naive)
        assert not check["ok"] and check["worst"] == part, (part, check)
    # A missing scale: the layer with s = 1 instead of LORA_SCALE.
    scaled = bm.timed(lambda i: moekernels.fused_moe(i.hidden, i.w_gate_up, i.w_down, i.topk_weights, i.topk_ids,
                                                     lora=moekernels.ExpertsLoRA(*i.lora)), "bf16+lora")(inp)
    assert not bm.compare(scaled, naive)["ok"]

    (one,) = bm.make_inputs(shape, 1, "fwd+bwd", "bf16", "cpu", lora_rank=4)()  # 2 of the 8 experts
    outs = bm.timed(bm.library("torch"), "bf16+lora")(one)[0]
    empty = bm.check_experts(one.topk_ids, 8)[1]
    assert not any(g[empty].any() for g in outs[3:])
    ghost = [t.detach().clone() for t in outs]
    ghost[5][empty] = 1.0  # a gradient for an expert that saw no pair
    check = bm.compare((tuple(ghost), one, "bf16+lora"), bm.timed(bm.naive, "bf16+lora")(one))
    assert not check["ok"] and check["worst"] == "d_lora_untouched"


def test_moe_peft_row_is_what_peft_computes():
    """peft_grouped_mm against PEFT itself: LoraConfig(target_parameters=[...]) on a Qwen3MoeExperts holding the
    case's weights, its lora_A / lora_B set to the case's adapters (PEFT's layout: A [E*r, in], B [out, r*E] with
    the experts innermost), through transformers' "grouped_mm" experts: the same output and gradients."""
    peft = pytest.importorskip("peft")
    hf, why = bm.transformers_impls("cpu")
    if hf is None:
        pytest.skip(why)
    torch.manual_seed(0)
    shape = MoEShape("tiny", hidden=64, intermediate=32, experts=4, top_k=2)
    (inp,) = bm.make_inputs(shape, 16, "fwd+bwd", "bf16", "cpu", hf, lora_rank=3)()
    want = bm.timed(bm.peft_grouped_mm(hf), "bf16+lora")(inp)[0]

    config = hf.config_cls(hidden_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                           hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    experts = hf.experts_cls(config)
    experts.gate_up_proj = torch.nn.Parameter(inp.w_gate_up, requires_grad=False)  # the same storage
    experts.down_proj = torch.nn.Parameter(inp.w_down, requires_grad=False)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = experts

        def forward(self, *args):
            return self.experts(*args)

    lora_config = peft.LoraConfig(r=3, lora_alpha=3 * bm.LORA_SCALE, target_modules=[],
                                  target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    block = peft.inject_adapter_in_model(lora_config, Block()).to(torch.bfloat16)
    wrappers = {m.parameter_name: m for m in block.modules() if type(m).__name__ == "ParamWrapper"}
    a1, b1, a2, b2 = inp.lora
    with torch.no_grad():
        for name, a, b in (("gate_up_proj", a1, b1), ("down_proj", a2, b2)):
            wrappers[name].lora_A["default"].weight.copy_(a.reshape(-1, a.shape[2]))
            wrappers[name].lora_B["default"].weight.copy_(b.permute(1, 2, 0).reshape(b.shape[1], -1))
    y = block(inp.hidden, inp.topk_ids_long, inp.topk_weights)
    trained = [wrappers[n].lora_A["default"].weight for n in ("gate_up_proj", "down_proj")] + [
        wrappers[n].lora_B["default"].weight for n in ("gate_up_proj", "down_proj")]
    grads = torch.autograd.grad(y, [inp.hidden, inp.topk_weights, *trained], inp.dy)
    da1, da2, db1, db2 = grads[2:]
    got = (y, grads[0], grads[1], da1.view(a1.shape), db1.view(b1.shape[1], 3, 4).permute(2, 0, 1),
           da2.view(a2.shape), db2.view(b2.shape[1], 3, 4).permute(2, 0, 1))
    for name, a, b in zip(("y", "dx", "d_topk_weights", *bm.LORA_GRADS), got, want):
        assert a.shape == b.shape and harness.rel_err(a, b) <= 1e-3, name  # the same bits on torch 2.13's CPU


def test_moe_lora_notes_report_the_targets():
    g, gf = "qwen3-30b-a3b fwd+bwd bf16 lora r16", "qwen3-30b-a3b fwd+bwd fp8 lora r16"
    g64 = "qwen3-30b-a3b fwd+bwd bf16 lora r64"

    def rec(group, x, impl, us, rank=16, dtype="bf16", **kw):
        r = _moe_record(group, x, impl, us, dtype=dtype, pass_name="fwd+bwd", **kw)
        r["params"] |= {"lora_rank": rank, "E": 128, "H": 2048, "I": 768}
        return r
    # Qwen3-30B-A3B's stacks: 128 x 3 x 2048 x 768 x 2 bytes = 1.21 GB; written and read at 4,000 GB/s: 604 us.
    decode = _moe_record("qwen3-30b-a3b fwd bf16", 8, "triton", 25.0, frac=0.5, weight_bytes=40_000, nbytes=50_000)
    decode["gbps"], decode["bound"] = 2000.0, "memory"  # this run's copy rate: 2,000 / 0.5
    records = [decode,
               rec(g, 4096, "triton", 1100.0), rec(g, 4096, "no_lora", 1000.0), rec(g, 4096, "peft_grouped_mm", 2000.0),
               rec(g, 16384, "triton", 4800.0), rec(g, 16384, "no_lora", 4000.0),
               rec(g, 512, "triton", 500.0), rec(g, 512, "no_lora", 100.0),  # not prefill
               rec(g64, 4096, "triton", 1500.0, rank=64), rec(g64, 4096, "no_lora", 1000.0, rank=64),
               rec(gf, 4096, "triton", 900.0, dtype="fp8"), rec(gf, 4096, "peft_grouped_mm", 1200.0, dtype="fp8")]
    lines = [line for line in bm.notes(records) if "LoRA" in line]
    assert lines == [
        "moe fwd+bwd bf16 LoRA r16 at T >= 4096, triton time over no_lora: target <= 1.15: met in 1 of 2; "
        f"worst {g} T=16384: 1.20",
        "moe fwd+bwd bf16 LoRA at T >= 4096, peft_grouped_mm - triton in writes and reads of the weight stacks at "
        f"4,000 GB/s: target >= 1.00: met in 1 of 1; worst {g} T=4096: 1.49",
        "moe fwd+bwd fp8 LoRA at T >= 4096, peft_grouped_mm - triton in writes and reads of the weight stacks at "
        f"4,000 GB/s: target >= 1.00: met in 0 of 1; worst {gf} T=4096: 0.50",
    ]
    assert not any("LoRA" in line for line in bm.notes(records[1:]) if "peft" in line)  # no copy rate: no line


# ---------------------------------------------------------------- expert parallelism

bd = bench_distributed
EP_IMPLS = ["naive", "local", "local_eager", "ep", "ep_capacity"]


def test_distributed_cpu_dry_run(tmp_path, monkeypatch):
    pytest.importorskip("moekernels.distributed")
    dist = torch.distributed
    assert not dist.is_initialized()
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "distributed", "--tokens", "1,16"]) == 0
    # The single-rank gloo group the ep rows made is gone: no later benchmark or test sees it.
    assert not dist.is_initialized() and bd._group is None
    payload = json.loads((tmp_path / "bench.json").read_text())
    assert payload["roofline"] is None
    records = payload["results"]
    assert [(r["group"], r["x"], r["impl"]) for r in records] == [
        ("deepseek-v3 ws1", t, impl) for t in (1, 16) for impl in EP_IMPLS]
    for r in records:
        assert r["error"] is None, r
        p = r["params"]
        assert (p["E"], p["k"], p["H"], p["world_size"], p["process_group"]) == (256, 8, 7168, 1, "gloo")
        assert p["capacity"] == r["x"] * 8  # one rank takes every pair: nothing dropped
        assert r["bytes"] == bench_permute.permute_bytes(r["x"], 7168, 8, 2) + bench_permute.unpermute_bytes(
            r["x"], 7168, 8, 2)
        assert p["a2a_bytes"] == 2 * r["x"] * 8 * 7168 * 2
        assert r["bound"] == "memory" and r["flops"] == 0 and r["gbps"] > 0
        if r["impl"] != "naive":
            assert r["check"]["ok"] and r["check"]["rel_err"] <= bench_permute.UNPERMUTE_RTOL, r
    lines = [n for n in payload["notes"] if n.startswith("distributed ")]
    assert [n.split(":")[0] for n in lines] == ["distributed deepseek-v3 T=1", "distributed deepseek-v3 T=16"]
    assert all("default +" in n or "default -" in n for n in lines)


def test_distributed_leaves_an_existing_group_alone(tmp_path):
    dist = torch.distributed
    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        group = bd.ensure_group("cpu")
        assert not group.created and group.backend == "gloo"
        assert bd.ensure_group("cpu") is group
        bd.destroy_group()
        assert dist.is_initialized() and bd._group is None  # not ours to destroy
    finally:
        dist.destroy_process_group()
    group = bd.ensure_group("cpu")  # none initialized: made, and destroyed with its store folder
    assert group.created and dist.is_initialized() and Path(group.store_dir).is_dir()
    bd.destroy_group()
    assert not dist.is_initialized() and not Path(group.store_dir).exists()


def test_distributed_naive_is_the_local_path():
    torch.manual_seed(0)
    shape = MoEShape("tiny", hidden=64, intermediate=32, experts=16, top_k=4)
    x, ids, weights = bd._inputs(shape, 37, "cpu")()
    plan = moekernels.plan_routing(ids, shape.experts)
    ref = moekernels.unpermute(moekernels.permute(x, plan), plan, weights)
    check = bench_permute.compare_unpermute(bd.naive(x, ids, weights), ref)
    assert check["ok"] and check["rel_err"] < 1e-2
    # Identity experts and weights that sum to 1 over k: y is x, up to bf16 rounding.
    assert bench_permute.compare_unpermute(ref, x)["rel_err"] < 1e-2


def test_distributed_counts_bytes():
    t, h, k = 4096, 7168, 8
    # x read, T*k rows written with an int32 index each; the rows read with an int32 index and a float32
    # weight each, y written.
    assert bd.dispatch_combine_bytes(t, h, k, 2) == (t * h * 2 + t * k * h * 2 + t * k * 4) + (
        t * k * h * 2 + t * k * 8 + t * h * 2)
    assert bd.a2a_bytes(t, h, k, 2) == 2 * t * k * h * 2
    assert bd.row_bytes(h, fp8=False) == 14336
    assert bd.row_bytes(h, fp8=True) == 7168 + 4 * 56  # e4m3 and a float32 scale per 128 columns
    assert bd.row_bytes(200, fp8=True) == 200 + 4 * 2  # a partial last block has its scale too


def test_distributed_scaling_table():
    (w8, w8_fp8), (w64, w64_fp8) = bd.scaling_table()
    row, row_fp8 = 7168 * 2, 7168 + 224
    pairs = 4096 * 8
    # Bytes leaving a GPU per token per layer: k rows out (dispatch) and k back (combine), (ws - 1) / ws of them.
    assert w8["bytes_per_token"] == 8 * 2 * row * 7 // 8 == 200_704 and w8["ib_bytes_per_token"] == 0
    assert w8_fp8["bytes_per_token"] == 8 * (row_fp8 + row) * 7 // 8 == 152_096
    assert w64["bytes_per_token"] == 8 * 2 * row * 63 // 64 == 225_792
    assert w64["ib_bytes_per_token"] == 8 * 2 * row * 56 // 64 == 200_704  # 56 of the 64 ranks are in other nodes
    # Each phase at link rate: NVLink 450 GB/s each way; at 64 GPUs the IB part (50 GB/s) is the longer one.
    assert w8["dispatch_ms"] == w8["combine_ms"] == pytest.approx(pairs * 7 / 8 * row / 450e9 * 1e3)
    assert w8["a2a_ms"] == pytest.approx(1.8269, abs=1e-4)
    assert w8_fp8["dispatch_ms"] == pytest.approx(pairs * 7 / 8 * row_fp8 / 450e9 * 1e3)
    assert w64["dispatch_ms"] == pytest.approx(pairs * 56 / 64 * row / 50e9 * 1e3)
    assert w64["a2a_ms"] == pytest.approx(16.4417, abs=1e-4)
    assert w64_fp8["a2a_ms"] == pytest.approx(pairs * 56 / 64 * (row_fp8 + row) / 50e9 * 1e3)
    # The expert GEMMs: bench_moe's count, 6*T*k*H*I, at 680 TFLOP/s, whatever the world size.
    gemm_ms = 6 * pairs * 7168 * 2048 / 680e12 * 1e3
    for r in (w8, w8_fp8, w64, w64_fp8):
        assert r["gemm_ms"] == pytest.approx(gemm_ms) == pytest.approx(4.2444, abs=1e-4)
        assert r["exposed_ms"] == pytest.approx(max(r["a2a_ms"] - gemm_ms, 0.0))
    assert w8["exposed_ms"] == 0 and w64["a2a_over_gemm"] == pytest.approx(3.874, abs=1e-3)
    # Both scale with T: the ratio does not depend on it.
    assert bd.scaling_row(8, tokens=512)["a2a_over_gemm"] == pytest.approx(w8["a2a_over_gemm"])


def test_distributed_scaling_rate_is_the_measured_h200_roofline():
    roofline = json.loads((REPO / "benchmarks" / "results" / "h200" / "bench.json").read_text())["roofline"]
    assert round(roofline["mm_bf16_tflops"]) == bd.MM_BF16_TFLOPS


def test_api_docs_scaling_section_holds_the_computed_table():
    api = (REPO / "docs" / "API.md").read_text()
    headings = re.findall(r"^## .*$", api, flags=re.M)
    assert headings.index("## Expert parallelism: scaling") + 1 == headings.index("## Backends")
    section = api.split("## Expert parallelism: scaling")[1].split("## Backends")[0]
    assert bd.scaling_markdown() in section


def test_distributed_gpu_sweeps():
    quick = bd.cases("cuda", quick=True)  # builds cases only: no input, no process group
    assert [c.x for c in quick] == [16, 512, 4096]
    assert [c.x for c in bd.cases("cuda", quick=False)] == bd.TOKENS_FULL
    assert [c.x for c in bd.cases("cuda", quick=True, tokens=[64])] == [64]
    for c in quick:
        assert list(c.impls) == EP_IMPLS  # naive first: the checks are against it
        assert c.eager == ("local_eager", "ep", "ep_capacity")  # the default mode syncs; see the docstring
        assert c.group == "deepseek-v3 ws1" and c.bound == "memory"
        assert c.params["process_group"] == "nccl" and c.params["capacity"] == c.x * 8
    assert not torch.distributed.is_initialized()


def test_distributed_notes():
    def rec(x, impl, us, error=None, method="events"):
        return {"bench": "distributed", "x": x, "impl": impl, "error": error, "time_us": {"median": us},
                "method": method}

    records = [rec(16, "naive", 50.0), rec(16, "local", 20.0, method="graph"), rec(16, "local_eager", 40.0),
               rec(16, "ep", 100.0), rec(16, "ep_capacity", 60.0),
               rec(4096, "local", 500.0, method="graph"), rec(4096, "local_eager", 520.0), rec(4096, "ep", 1300.0),
               rec(4096, "ep_capacity", 0.0, error="RuntimeError: boom"),
               rec(512, "ep", 100.0),  # no baseline: no line
               # On the CPU nothing is captured: no comparison with a CUDA graph.
               rec(1, "local", 10.0, method="wall"), rec(1, "local_eager", 10.0, method="wall"),
               rec(1, "ep_capacity", 15.0, method="wall")]
    assert bd.notes(records) == [
        "distributed deepseek-v3 T=1: dispatch + combine over the local path, both eager: capacity +5.0 us (1.50x)",
        "distributed deepseek-v3 T=16: dispatch + combine over the local path, both eager: default +60.0 us (2.50x), "
        "capacity +20.0 us (1.50x); capacity mode over the local path in a CUDA graph 3.00x",
        "distributed deepseek-v3 T=4096: dispatch + combine over the local path, both eager: "
        "default +780.0 us (2.50x)",
    ]
