"""The FP8 training benchmark (benchmarks/bench_fp8_train.py): its cases, checks and target notes."""

import json

import torch

from benchmarks import bench_fp8_train as b8, harness, run


def test_fp8_train_cpu_dry_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "fp8_train", "--tokens", "16"]) == 0
    # CPU timings meet or miss no target: the wgrad target (the one a CPU run reaches) is not measured.
    wgrad = f"fp8_train fp8 wgrad TFLOP/s of the fp8 fprop's: target >= 70%: {harness.NOT_MEASURED}"
    notes = json.loads((tmp_path / "bench.json").read_text())["notes"]
    assert wgrad in notes and wgrad in capsys.readouterr().out
    assert not any(" met" in n for n in notes), notes
    records = json.loads((tmp_path / "bench.json").read_text())["results"]
    groups = {r["group"] for r in records}
    assert all({r["impl"] for r in records if r["group"] == g} == {"naive", "torch", "fp8"} for g in groups)
    assert groups == {"qwen3-30b-a3b /8 layer fwd+bwd", "cpu E4 K256 N128 fwd+bwd", "cpu E4 K256 N128 fprop",
                      "cpu E4 K256 N128 wgrad"}
    for r in records:
        assert r["error"] is None, r
        if r["impl"] != "naive":
            assert r["check"]["ok"] and 0 < r["check"]["rel_err"] <= b8.RTOL_FP8, r


def test_fp8_train_check_catches_a_wrong_gradient():
    case = next(c for c in b8.cases("cpu", True, [16]) if c.group.endswith(" wgrad"))
    (inp,) = case.make_inputs()
    out = case.impls["fp8"](inp)
    assert case.compare(out, None)["ok"]
    (dw,), _ = out
    assert not case.compare(((dw * 1.5,), inp), None)["ok"]


def test_fp8_train_gpu_sweeps():
    """The quick suite (the device check's) times Qwen3-30B-A3B at the targets' sizes, with the bf16
    kernels beside fp8 and torch's native grouped GEMM in the fwd+bwd rows."""
    quick = b8.cases("cuda", True)
    assert [(c.group, c.x) for c in quick] == [
        ("qwen3-30b-a3b layer fwd+bwd", b8.TARGET_T), ("qwen3-30b-a3b gate_up fwd+bwd", 512),
        ("qwen3-30b-a3b gate_up fprop", 512), ("qwen3-30b-a3b gate_up wgrad", 512)]
    assert list(quick[0].impls) == ["naive", "triton", "fp8"]
    assert set(quick[1].impls) == {"naive", "triton", "fp8", "native"}
    full = b8.cases("cuda", False)
    assert {c.group for c in full if "layer" in c.group} == {
        "qwen3-30b-a3b layer fwd+bwd", "qwen3-235b-a22b layer fwd+bwd", "deepseek-v3 E32 layer fwd+bwd"}


def test_fp8_train_notes_report_the_targets():
    def rec(group, impl, x, us, tflops=None, what="layer", pass_name="fwd+bwd"):
        return {"bench": "fp8_train", "group": group, "impl": impl, "x": x, "error": None,
                "time_us": {"median": us}, "tflops": tflops, "params": {"what": what, "pass": pass_name}}
    records = [rec("q layer fwd+bwd", "triton", 8192, 1500.0), rec("q layer fwd+bwd", "fp8", 8192, 1000.0),
               rec("q layer fwd+bwd", "triton", 4096, 800.0), rec("q layer fwd+bwd", "fp8", 4096, 1000.0),
               rec("g fprop", "fp8", 512, 10.0, 1000.0, "gemm", "fprop"),
               rec("g wgrad", "fp8", 512, 16.0, 600.0, "gemm", "wgrad")]
    assert b8.notes(records) == [
        "fp8_train layer fwd+bwd at T >= 8192, fp8 vs the bf16 layer: target >= 1.40: met in 1 of 1; "
        "worst q layer fwd+bwd T=8192: 1.50",
        "fp8_train fp8 wgrad TFLOP/s of the fp8 fprop's: target >= 70%: met in 0 of 1; worst g wgrad "
        "rows/expert=512: 60%",
    ]
