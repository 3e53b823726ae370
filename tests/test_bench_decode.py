"""The decode-step benchmark (benchmarks/bench_decode.py), dry-run on the CPU."""

import json

import pytest
import torch

from benchmarks import bench_decode, harness, run
from benchmarks.shapes import DEEPSEEK_V3, QWEN3_30B_A3B


def formula_bytes(shape, t, quantize):
    """A decode step's bytes, written out: fp32 logits, the fp32 bias, the ids and weights (8 bytes
    a pair), the bf16 tokens read once, and the moved rows (bf16, or e4m3 with a float32 scale
    per 128)."""
    e, k, h = shape.experts, shape.top_k, shape.hidden
    moved = t * k * (h + h // 128 * 4) if quantize else t * k * h * 2
    return t * e * 4 + e * 4 + t * k * 8 + t * h * 2 + moved


def test_decode_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "decode", "--tokens", "1,3"]) == 0
    records = json.loads((tmp_path / "bench.json").read_text())["results"]
    groups = {"deepseek-v3 bf16": (DEEPSEEK_V3, False), "deepseek-v3 fp8": (DEEPSEEK_V3, True),
              "qwen3-30b-a3b bf16": (QWEN3_30B_A3B, False)}
    assert {(r["group"], r["x"], r["impl"]) for r in records} == {
        (g, t, impl) for g in groups for t in (1, 3) for impl in ("naive", "torch")}
    for r in records:
        assert r["error"] is None, r
        assert r["bytes"] == formula_bytes(*groups[r["group"]][:1], r["x"], groups[r["group"]][1])
        if r["impl"] == "torch":
            assert r["check"]["ok"] and r["check"]["rows_equal"], r


@pytest.mark.parametrize("quantize", [False, True])
def test_decode_check_catches_a_wrong_row(quantize):
    torch.manual_seed(0)
    inputs = bench_decode._inputs(DEEPSEEK_V3, 4, "cpu")()
    ref = bench_decode.naive_step(DEEPSEEK_V3, quantize)(*inputs)
    out = bench_decode.library_step(DEEPSEEK_V3, quantize, "torch")(*inputs)
    assert bench_decode.compare(out, ref)["ok"]
    moved = out[2].clone()
    moved.view(torch.uint8)[5, 7] ^= 1  # one bit of one moved value (a bf16 or an e4m3 byte)
    assert not bench_decode.compare(out[:2] + (moved,) + out[3:], ref)["ok"]


def test_decode_bytes_count_each_input_and_output_once():
    for shape in (DEEPSEEK_V3, QWEN3_30B_A3B):
        for quantize in (False, True):
            assert bench_decode.step_bytes(shape, 16, quantize) == formula_bytes(shape, 16, quantize)


def test_decode_notes_report_the_target():
    def record(impl, x, us, group="deepseek-v3 bf16"):
        return {"bench": "decode", "impl": impl, "x": x, "group": group, "error": None,
                "time_us": {"median": us}}
    records = [record("triton", 16, 42.0), record("cuda", 16, 21.5), record("torch", 16, 900.0),
               record("cuda", 16, 10.0, group="qwen3-30b-a3b bf16")]
    assert bench_decode.notes(records) == [
        "decode deepseek-v3 bf16 T=16 triton: 42.0 us, target <= 30 us (H200): not met",
        "decode deepseek-v3 bf16 T=16 cuda: 21.5 us, target <= 30 us (H200): met",
    ]
