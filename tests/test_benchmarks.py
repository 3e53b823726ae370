"""The benchmark harness, dry-run on the CPU: counters, derived numbers, reports, the suite's files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekernels
from benchmarks import bench_route, harness, run
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
