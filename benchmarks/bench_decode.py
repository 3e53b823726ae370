"""The decode step before the expert GEMMs, end to end: router logits [T, E] and tokens [T, H] ->
topk_routing -> plan_routing -> permute (bf16), or the gather fused with the (1, 128) fp8
quantization (quantize_fp8_gathered, the w8a8 layer's input).

At decode (T = 1 to 64) each of these kernels moves kilobytes, so the step is launch- and
latency-bound: what counts is the whole chain, timed as one CUDA graph (the harness captures
each implementation's call, here three or four kernels). Implementations:
- naive:  transformers' router, the sort-based plan and index_select (bench_route, bench_plan,
          bench_permute), and for fp8 the plain-PyTorch quantizer of bench_fp8;
- torch:  the library's reference backend for every stage;
- triton, cuda: the library's kernels (cuda where moekernels._C is built; the stages without a
          CUDA kernel take triton, as MOEKERNELS_BACKEND=cuda does).

The target (issue 7), printed and never asserted: the DeepSeek-V3 step at T <= 64 in at most
30 us on an H200.
"""

from __future__ import annotations

import torch

import moekernels
from moekernels import fp8

from .bench_fp8 import naive_quantize
from .bench_plan import naive_plan
from .bench_route import compare as compare_route
from .bench_route import naive_router
from . import harness
from .harness import Case, library_backends
from .shapes import DEEPSEEK_V3, QWEN3_30B_A3B, MoEShape, token_sweep

TOKENS_FULL = [1, 4, 16, 64]
TOKENS_QUICK = [1, 16, 64]
TOKENS_CPU = [1, 16]
KERNELS = ("triton", "cuda")
TARGET_US = 30.0
QUANT_BLOCK = (1, 128)


def naive_step(shape: MoEShape, quantize: bool):
    route = naive_router(shape)

    def step(logits, bias, x):
        weights, ids = route(logits, bias)
        source = naive_plan(ids, shape.experts)[2]
        rows = x.index_select(0, source.long() // shape.top_k)
        return (weights, ids) + (naive_quantize(rows, QUANT_BLOCK) if quantize else (rows,))
    return step


def library_step(shape: MoEShape, quantize: bool, backend: str):
    def step(logits, bias, x):
        weights, ids = moekernels.topk_routing(
            logits, shape.top_k, scoring=shape.scoring, renormalize=shape.renormalize, bias=bias,
            n_group=shape.n_group, topk_group=shape.topk_group,
            routed_scaling_factor=shape.routed_scaling_factor, backend=backend)
        plan = moekernels.plan_routing(ids, shape.experts, backend=backend)
        if quantize:  # the (1, 128) gather-quantize has a CUDA kernel; its other granularities do not
            return (weights, ids) + tuple(fp8.quantize_fp8_gathered(x, plan, QUANT_BLOCK, backend=backend))
        return weights, ids, moekernels.permute(x, plan, backend=backend)
    return step


def step_bytes(shape: MoEShape, tokens: int, quantize: bool) -> int:
    """Logits (fp32) and the bias read, weights and ids written; each token row read once and
    written k times, as bf16, or as e4m3 with a float32 scale per 128 columns."""
    route = tokens * shape.experts * 4 + shape.experts * 4 + tokens * shape.top_k * 8
    out_row = shape.hidden + shape.hidden // 128 * 4 if quantize else shape.hidden * 2
    return route + tokens * shape.hidden * 2 + tokens * shape.top_k * out_row


def compare(out, ref) -> dict:
    """The routing as bench_route judges it; where both chose the same experts for every token
    (no tie broken differently; the slot order may differ: DeepSeek-V3's naive top-k is unsorted),
    each expert's segment holds the same tokens in token order, so the moved rows (and the fp8
    bytes and scales) must be equal bit for bit."""
    result = compare_route(out[:2], ref[:2])
    if torch.equal(out[1].long().sort(dim=1).values, ref[1].long().sort(dim=1).values):
        rows_equal = all(torch.equal(a.view(torch.uint8) if a.dtype == fp8.FP8 else a,
                                     b.view(torch.uint8) if b.dtype == fp8.FP8 else b)
                         for a, b in zip(out[2:], ref[2:]))
        result.update(ok=result["ok"] and rows_equal, rows_equal=rows_equal)
    return result


def _inputs(shape: MoEShape, tokens: int, device: str):
    def make():
        logits = torch.randn(tokens, shape.experts, device=device)
        bias = 0.1 * torch.rand(shape.experts, device=device) if shape.correction_bias else None
        x = torch.randn(tokens, shape.hidden, device=device, dtype=torch.bfloat16)
        return logits, bias, x
    return make


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    tokens = token_sweep(device, quick, tokens, TOKENS_FULL, TOKENS_QUICK, TOKENS_CPU)
    backends = library_backends(device)
    setups = [(DEEPSEEK_V3, False), (DEEPSEEK_V3, True), (QWEN3_30B_A3B, False)]
    out = []
    for shape, quantize in setups:
        impls = {"naive": naive_step(shape, quantize)}
        impls.update({b: library_step(shape, quantize, b) for b in backends})
        for t in tokens:
            out.append(Case(
                bench="decode", group=f"{shape.name} {'fp8' if quantize else 'bf16'}", x=t,
                make_inputs=_inputs(shape, t, device), impls=impls, flops=0,
                bytes=step_bytes(shape, t, quantize), bound="memory", compare=compare,
                eager=("naive", "torch"),  # the sort-based and reference plans read counts on the host
                params={"T": t, "E": shape.experts, "k": shape.top_k, "H": shape.hidden, "fp8": quantize},
            ))
    return out


def notes(records: list[dict]) -> list[str]:
    """The 30 us target for the DeepSeek-V3 step, for each kernel backend that ran."""
    lines = []
    for r in records:
        if (r["bench"] == "decode" and r["impl"] in KERNELS and r["error"] is None
                and r["group"].startswith(DEEPSEEK_V3.name)):
            us = r["time_us"]["median"]
            lines.append(f"decode {r['group']} T={r['x']} {r['impl']}: {us:.1f} us, target <= {TARGET_US:.0f} us "
                         f"(H200): {harness.verdict(r, us <= TARGET_US)}")
    return lines
