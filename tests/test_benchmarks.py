"""The benchmark harness, dry-run on the CPU: counters, derived numbers, reports, the suite's files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekernels
from benchmarks import bench_permute, bench_plan, bench_route, harness, run
from benchmarks.shapes import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B

REPO = Path(__file__).resolve().parent.parent


def test_cpu_dry_run_writes_the_records(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "route", "--tokens", "1,16"]) == 0

    printed = capsys.readouterr().out
    assert run.NO_GPU in printed
    assert printed.rstrip().splitlines()[-1].startswith("deepseek-v3 fp32")  # the table comes last

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
    assert "| case | T | impl | median us |" in (tmp_path / "bench.md").read_text()


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
    records = [_record("naive", 4.0)]
    harness.derive(records, None)
    paths = harness.write_results(tmp_path, harness.metadata(quick=True), None, records, ["a note"])
    assert sorted(p.name for p in paths) == ["bench.json", "bench.md"]
    assert "- a note" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H200", "h200"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA GeForce RTX 4090", "rtx-4090"), ("", "gpu"),
])
def test_gpu_slug(name, slug):
    assert harness.gpu_slug(name) == slug


def test_device_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "device_check.sh")], check=True)


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
    def rec(bench, group, x, impl, us, frac=None):
        return {"bench": bench, "group": group, "x": x, "impl": impl, "error": None,
                "time_us": {"median": us}, "roofline_fraction": frac}

    plan = [rec("plan", "deepseek-v3", 4096, "triton", 12.0),
            rec("plan", "deepseek-v3 B=64", 4096, "triton", 21.0),
            rec("plan", "deepseek-v3", 4096, "torch", 500.0),  # not a kernel
            rec("plan", "deepseek-v3", 1024, "triton", 5.0)]  # not the target size
    lines = bench_plan.notes(plan)
    assert len(lines) == 2
    assert lines[0].startswith("plan deepseek-v3 T=4096 triton: 12.0 us") and lines[0].endswith(": met")
    assert lines[1].startswith("plan deepseek-v3 B=64 T=4096 triton") and lines[1].endswith("not met")

    permute = [rec("permute", "deepseek-v3 permute", 16384, "triton", 1.0, 0.85),
               rec("permute", "deepseek-v3 unpermute", 16384, "triton", 1.0, 0.5),
               rec("permute", "qwen3-30b-a3b permute", 16384, "triton", 1.0, 0.9),
               rec("permute", "deepseek-v3 permute", 16384, "naive", 1.0, 0.3)]
    lines = bench_permute.notes(permute)
    assert lines == [
        "permute deepseek-v3 permute T=16384 triton: 85% of the copy bandwidth, target >= 80%: met",
        "permute deepseek-v3 unpermute T=16384 triton: 50% of the copy bandwidth, target >= 80%: not met",
    ]
