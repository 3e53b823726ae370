"""torchtitan's MoE experts, forward + backward: stock torchtitan 0.3.0 against moekernels' overrides.

The GPU image has no torchtitan (and torch 2.11, older than 0.3.0 wants), so stock's computation is
reproduced here without importing it, op for op; tests/test_bench_torchtitan.py checks the copy
against torchtitan's own modules on the CPU, and moekernels' rows against the integration's modules
(moekernels/integrations/torchtitan.py). Weights are bf16 (FSDP2's mixed precision gathers the
fp32 masters as bf16, so stock's `.bfloat16()` casts and `.type_as` are no-ops there) in
torchtitan's layout: w1 and w3 [E, F, D], w2 [E, D, F] (nn.Linear's out x in).

Groups, swept over the tokens per rank T:
- "<model> experts fwd+bwd": `GroupedExperts.forward(x_RD, num_tokens_per_expert_E)` alone, on
  R = T*k expert-sorted rows, and the gradients of x and the three weights. stock: offsets by
  int32 cumsum, then `torch._grouped_mm` three times (`silu(x w1^T) * (x w3^T)`, then `h w2^T`)
  with its `.bfloat16()` casts and `.type_as(x)`. experts: the `experts` override
  (MoekernelsGroupedExperts): the same three GEMMs on `moekernels.grouped_mm`. experts_fp8: the
  same with precision="fp8" (`moekernels.fp8.grouped_mm_fp8`, DeepSeek-V3's block recipe).
- "<model> routed fwd+bwd": `RoutedExperts.forward` with its `LocalTokenDispatcher` (no EP mesh),
  from the router's output (float32 scores and int64 ids [T, k], the counts a [E] int64) to the
  combined [T, D], and the gradients of x, the scores and the weights. stock: argsort of the ids
  (stable), the scores and tokens gathered in that order, the experts above, then the combine:
  the outputs times the scores in float32, cast back to bf16, and torchtitan's
  `deterministic_scatter_add` into zeros (scatter_add with deterministic algorithms on; its
  backward a gather). experts and experts_fp8: the same dispatch and combine around moekernels'
  experts (the `experts` override inside stock's RoutedExperts). fused: the `routed_experts` override
  (MoekernelsRoutedExperts): `fused_moe(x, (w1, w3), w2, scores, ids)`, gather, SwiGLU and
  weighted scatter in moekernels' kernels, w1 and w3 read in place. fused_fp8: the same with
  precision="fp8", where `fused_moe` takes the (w1, w3) pair in fp8 (fused_fp8_unsupported probes it
  once; else the row is left out and the notes say why).

Shapes: Qwen3-30B-A3B (D 2048, F 768, E 128, k 8) at expert parallelism 1: one GPU holds all 128
experts (1.2 GB of bf16 weights), the case the `routed_experts` override runs (without an EP mesh);
DeepSeek-V3 (D 7168, F 2048, E 256, k 8) at expert parallelism 8 (issue 20's 8-GPU command):
E_local = 32 experts a rank ("deepseek-v3 E32", ids drawn within the 32), experts group only, on
R = T*k rows (a balanced all-to-all brings each rank T*k rows); with an EP mesh the routed layer is
an all-to-all around the experts (the integration's dispatcher: moekernels.distributed, timed by
bench_distributed), not fused_moe, so it has no routed group here. T = 4096 and 16384 (the issue's). The
quick GPU suite (last in the device check's stage 2): Qwen3-30B-A3B experts and routed and
DeepSeek-V3 E32 experts, at T 4096 (3 cases, 10 timings, 11 with fused_fp8; ~20-35 s estimated:
DeepSeek-V3's fwd+bwd is 8.7 TFLOP, ~12-20 ms a call, ~156 calls an implementation, ~8 s for its 3;
Qwen3-30B-A3B's 0.9 TFLOP, ~2-3 ms; the Triton kernels compiled by the suite's other rows; no GPU has
run it). One T a case: no plot. On the CPU: every implementation on the torch backend
(stock on CPU torch._grouped_mm) at bench_moe's CPU_SHAPE (D 256, F 128, E 16, k 8), T 16 and 64.

Counted: 3 GEMMs forward, 2*R*D*F each, 6*R*D*F; fwd+bwd 3x that, 18*R*D*F (dx and dw, one GEMM each
per GEMM), R = T*k; the routed group's gathers, scores and scatter add no FLOPs to the count. Bytes,
the least the layer moves (bf16): x and y, the weights, and backward dy, dx and the weights' gradient.
Checked once against float32 on a sample (bench_moe's reference: CHECK_TOKENS rows or tokens and
two experts' whole dw): bf16 rows within bench_moe's RTOL["bf16"], fp8 rows within bench_fp8_train's
RTOL_FP8 against the bf16 weights (the recipe's own error is a few percent). The "x stock" column
is stock's median over the row's: the speed-up.

Targets (issue 20), printed and never asserted, measured only on a GPU: every bf16 moekernels row
(experts, fused) >= 1.2x stock, and every fp8 one >= 1.5x stock (bf16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import moekernels
from moekernels import fp8

from . import bench_moe as bm
from .bench_fp8_train import RTOL_FP8
from .harness import Case, rel_err, target_line
from .shapes import QWEN3_30B_A3B, MoEShape, token_sweep

BENCH = "torchtitan"
DTYPE = torch.bfloat16
TOKENS = [4096, 16384]
TOKENS_CPU = [16, 64]
EXPERTS_SHAPES = [QWEN3_30B_A3B, bm.DEEPSEEK_V3_E32]
ROUTED_SHAPES = [QWEN3_30B_A3B]  # EP 1 only: with an EP mesh the integration runs stock's dispatcher
QUICK = [("experts", QWEN3_30B_A3B, 4096), ("routed", QWEN3_30B_A3B, 4096), ("experts", bm.DEEPSEEK_V3_E32, 4096)]
IMPLS = {
    "stock": "torchtitan 0.3.0's own computation (GroupedExperts on torch._grouped_mm with its bf16 casts; "
             "RoutedExperts with LocalTokenDispatcher), reproduced without torchtitan: the baseline of 'x stock'",
    "experts": "the `experts` override: torchtitan's experts on moekernels.grouped_mm (stock dispatch and combine "
               "around them in the routed group)",
    "experts_fp8": "the `experts` override with precision=\"fp8\": moekernels.fp8.grouped_mm_fp8 "
                   "(DeepSeek-V3's recipe)",
    "fused": "the `routed_experts` override: moekernels.fused_moe(x, (w1, w3), w2, scores, ids), no EP mesh",
    "fused_fp8": "the `routed_experts` override with precision=\"fp8\"",
}
BF16_IMPLS = ("experts", "fused")
FP8_IMPLS = ("experts_fp8", "fused_fp8")
TARGET_BF16 = 1.2  # x stock
TARGET_FP8 = 1.5  # x stock (bf16)


# ----------------------------------------------------------------------------- stock torchtitan 0.3.0

def stock_experts(x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor, w1_EFD: torch.Tensor,
                  w2_EDF: torch.Tensor, w3_EFD: torch.Tensor) -> torch.Tensor:
    """torchtitan/models/common/moe.py's GroupedExperts.forward on plain tensors (no DTensor, no
    spmd_types checking), its `_grouped_mm` torch._grouped_mm."""
    offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    h_RF = F.silu(torch._grouped_mm(x_RD.bfloat16(), w1_EFD.bfloat16().transpose(-2, -1), offs=offsets_E))
    h_RF = h_RF * torch._grouped_mm(x_RD.bfloat16(), w3_EFD.bfloat16().transpose(-2, -1), offs=offsets_E)
    return torch._grouped_mm(h_RF, w2_EDF.bfloat16().transpose(-2, -1), offs=offsets_E).type_as(x_RD)


class DeterministicScatterAdd(torch.autograd.Function):
    """torchtitan/ops/scatter_add.py's deterministic_scatter_add (a custom op there): out.scatter_add
    along dim 0 with deterministic algorithms on; backward: grad_output for out, its gather for src."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        prev, prev_warn_only = torch.are_deterministic_algorithms_enabled(), \
            torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=False)
        try:
            return out.scatter_add(dim=0, index=index, src=src)
        finally:
            torch.use_deterministic_algorithms(prev, warn_only=prev_warn_only)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad_output, None, torch.gather(grad_output, dim=0, index=index)


def stock_dispatch(x_TD: torch.Tensor, topk_scores_TK: torch.Tensor, topk_expert_ids_TK: torch.Tensor):
    """LocalTokenDispatcher._local_reorder: (routed_input_ND, token_indices_experts_sorted_N,
    topk_scores_experts_sorted_N)."""
    top_k = topk_expert_ids_TK.shape[-1]
    token_indices_N = torch.argsort(topk_expert_ids_TK.view(-1), stable=True)
    scores_N = topk_scores_TK.view(-1)[token_indices_N]
    token_indices_N = token_indices_N // top_k
    return x_TD[token_indices_N], token_indices_N, scores_N


def stock_combine(routed_output_RD: torch.Tensor, token_indices_N: torch.Tensor, scores_N: torch.Tensor,
                  x_TD: torch.Tensor) -> torch.Tensor:
    """LocalTokenDispatcher.combine: the scores applied in float32, cast back, scatter-added into zeros."""
    out_TD = torch.zeros_like(x_TD)
    routed_output_RD = (routed_output_RD.to(torch.float32) * scores_N.reshape(-1, 1)).to(routed_output_RD.dtype)
    index = token_indices_N.reshape(-1, 1).expand(-1, x_TD.shape[-1])
    return DeterministicScatterAdd.apply(out_TD, index, routed_output_RD)


def stock_routed(x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E, w1, w2, w3,
                 experts=stock_experts) -> torch.Tensor:
    """RoutedExperts.forward with the LocalTokenDispatcher (on [T, D]: its [B, L, D] views aside),
    ``experts`` the inner experts."""
    routed_RD, token_indices_N, scores_N = stock_dispatch(x_TD, topk_scores_TK, topk_expert_ids_TK)
    out_RD = experts(routed_RD, num_local_tokens_per_expert_E, w1, w2, w3)
    return stock_combine(out_RD, token_indices_N, scores_N, x_TD)


# ----------------------------------------------------------------------------- moekernels' overrides

def moekernels_experts(precision: str | None, backend: str | None, dtype: torch.dtype = DTYPE):
    """The computation of MoekernelsGroupedExperts.forward (the `experts` override): stock's
    signature and casts (x and the weights to ``dtype``), its GEMMs moekernels.grouped_mm, or
    fp8.grouped_mm_fp8 with precision="fp8" (which quantizes the cast weights)."""
    mm = functools.partial(moekernels.grouped_mm if precision is None else fp8.grouped_mm_fp8, backend=backend)

    def forward(x_RD, num_tokens_per_expert_E, w1, w2, w3):
        offs = torch.cumsum(num_tokens_per_expert_E, 0, dtype=torch.int32)
        x = x_RD.to(dtype)
        w1, w2, w3 = (w.to(dtype) for w in (w1, w2, w3))
        h = F.silu(mm(x, w1.transpose(-2, -1), offs)) * mm(x, w3.transpose(-2, -1), offs)
        return mm(h, w2.transpose(-2, -1), offs).type_as(x_RD)
    return forward


def moekernels_fused(precision: str | None, backend: str | None, dtype: torch.dtype = DTYPE):
    """The computation of MoekernelsRoutedExperts.forward without an EP mesh (the `routed_experts` override)."""
    def forward(x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E, w1, w2, w3):
        return moekernels.fused_moe(x_TD.to(dtype), (w1.to(dtype), w3.to(dtype)), w2.to(dtype), topk_scores_TK,
                                    topk_expert_ids_TK, precision=precision, backend=backend).type_as(x_TD)
    return forward


@functools.lru_cache(maxsize=None)
def fused_fp8_unsupported() -> str | None:
    """None where fused_moe(precision="fp8") takes the (w1, w3) pair, else its error: another change
    adds it (issue 20 item 2). Probed once on a 1-token CPU layer (torch backend)."""
    w = torch.zeros(1, 128, 128)
    try:
        moekernels.fused_moe(torch.zeros(1, 128), (w, w), w, torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64),
                             precision="fp8", backend="torch")
    except (ValueError, TypeError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


# ----------------------------------------------------------------------------- inputs

@dataclass(eq=False)
class TitanInputs:
    x: torch.Tensor  # experts: x_RD [R, D], expert-sorted rows; routed: x_TD [T, D]
    w1: torch.Tensor  # [E, F, D] bf16
    w2: torch.Tensor  # [E, D, F]
    w3: torch.Tensor  # [E, F, D]
    counts: torch.Tensor  # int64 [E]: num_tokens_per_expert_E (routed: num_local_tokens_per_expert_E)
    scores: torch.Tensor | None = None  # routed: float32 [T, k]
    ids: torch.Tensor | None = None  # routed: int64 [T, k]
    dy: torch.Tensor | None = None
    moe_view: bm.MoEInputs | None = None  # the check's view for bench_moe's reference (routed), made once

    @property
    def routed(self) -> bool:
        return self.ids is not None

    def leaves(self) -> tuple[torch.Tensor, ...]:
        """What fwd+bwd differentiates: x, the scores (routed), w1, w2, w3."""
        return (self.x,) + ((self.scores,) if self.routed else ()) + (self.w1, self.w2, self.w3)


def make_inputs(shape: MoEShape, tokens: int, routed: bool, device: str):
    """Weights scaled so that every product is O(1); the routing of bench_moe (top-k of random logits,
    k distinct experts a token, softmax weights), ids int64 as torchtitan's router gives them; the
    counts from it (a bincount, as MoE.forward's routing map sum); the experts group's R = T*k rows."""
    e, d, f = shape.experts, shape.hidden, shape.intermediate

    def make():
        weights, ids = bm.routing(shape, tokens)
        counts = torch.bincount(ids.reshape(-1).long(), minlength=e).to(device)
        rows = tokens if routed else tokens * shape.top_k
        inp = TitanInputs(
            x=torch.randn(rows, d, device=device, dtype=DTYPE),
            w1=torch.randn(e, f, d, device=device, dtype=DTYPE).mul_(d**-0.5),
            w2=torch.randn(e, d, f, device=device, dtype=DTYPE).mul_(f**-0.5),
            w3=torch.randn(e, f, d, device=device, dtype=DTYPE).mul_(d**-0.5),
            counts=counts, dy=torch.randn(rows, d, device=device, dtype=DTYPE))
        if routed:
            inp.scores, inp.ids = weights.to(device, copy=True), ids.to(device, torch.int64)
        for t in inp.leaves():
            t.requires_grad_()
        return (inp,)
    return make


def timed(fn, kind: str):
    """The timed call: the layer's output and the gradients of inp.leaves() for dy; with the inputs
    and the reference that checks it ("bf16" or "fp8")."""
    def run(inp: TitanInputs):
        if inp.routed:
            y = fn(inp.x, inp.scores, inp.ids, inp.counts, inp.w1, inp.w2, inp.w3)
        else:
            y = fn(inp.x, inp.counts, inp.w1, inp.w2, inp.w3)
        return (y, *torch.autograd.grad(y, inp.leaves(), inp.dy)), inp, kind
    return run


def routed_with(experts):
    """Stock's RoutedExperts (local dispatch and combine) around other inner experts."""
    return functools.partial(stock_routed, experts=experts)


# ----------------------------------------------------------------------------- counters

def experts_flops(rows: int, dim: int, hidden: int) -> int:
    """fwd+bwd of the three GEMMs on R rows: forward 3 x 2*R*D*F, backward 2x the forward (dx, dw)."""
    return 3 * (3 * 2 * rows * dim * hidden)


def experts_bytes(tokens: int, dim: int, hidden: int, experts: int) -> int:
    """bf16: x read and y written, the weights read ([T, D] each, 3*E*D*F), then dy read, dx written and
    the weights' gradient written. T is the experts' R rows, or the routed layer's tokens."""
    return (4 * tokens * dim + 2 * 3 * experts * dim * hidden) * DTYPE.itemsize


# ----------------------------------------------------------------------------- checks

def experts_errors(outs: tuple, inp: TitanInputs) -> dict[str, float]:
    """The experts group against float32: y and dx on bench_moe's sample of rows, dw1, dw2 and dw3 of
    two experts (the busiest and the least busy) over all their rows."""
    x, dy = inp.x.detach(), inp.dy
    experts = inp.counts.shape[0]
    expert_of = torch.repeat_interleave(torch.arange(experts, device=x.device), inp.counts)

    def weights(e, grad=False):  # expert e's in float32 (one at a time: DeepSeek-V3 E32's are 5.6 GB)
        return [t[e].detach().float().requires_grad_(grad) for t in (inp.w1, inp.w2, inp.w3)]

    def mlp(xe, w1, w2, w3):
        return (F.silu(xe @ w1.T) * (xe @ w3.T)) @ w2.T
    rows = bm.sample_tokens(x.shape[0]).to(x.device)
    xs = x[rows].float().requires_grad_()
    ys = torch.zeros_like(xs)
    with torch.enable_grad():
        for e in torch.unique(expert_of[rows]).tolist():
            sel = torch.where(expert_of[rows] == e)[0]
            ys = ys.index_add(0, sel, mlp(xs[sel], *weights(e)))
        (dxs,) = torch.autograd.grad(ys, xs, dy[rows].float())
    errs = {"y": rel_err(outs[0][rows], ys), "dx": rel_err(outs[1][rows], dxs)}
    picks, _ = bm.check_experts(expert_of, experts)
    for e in picks:
        sel = expert_of == e
        we = weights(e, grad=True)
        with torch.enable_grad():
            want = torch.autograd.grad(mlp(x[sel].float(), *we), we, dy[sel].float())
        for name, got, d in zip(("dw1", "dw2", "dw3"), outs[2:], want):
            errs[name] = max(errs.get(name, 0.0), rel_err(got[e], d))
    return errs


def routed_errors(outs: tuple, inp: TitanInputs) -> dict[str, float]:
    """The routed group against bench_moe's float32 reference, on a view of the inputs in its layout
    (w1 and w3 concatenated once, for the check only): y, dx and the scores' gradient on its token
    sample, the weights' gradients of its two experts."""
    if inp.moe_view is None:
        w_gate_up = torch.cat([inp.w1.detach(), inp.w3.detach()], 1)
        inp.moe_view = bm.MoEInputs(hidden=inp.x, w_gate_up=w_gate_up, w_down=inp.w2.detach(),
                                    topk_weights=inp.scores, topk_ids=inp.ids, topk_ids_long=inp.ids, dy=inp.dy)
    y, dx, dscores, dw1, dw2, dw3 = outs
    return bm.reference_errors((y, dx, dscores, torch.cat([dw1, dw3], 1), dw2), inp.moe_view, "bf16")


def compare(out, naive_out) -> dict:
    """Against float32 (there is no naive row: every row is checked, stock's too): bf16 rows within
    bench_moe's RTOL["bf16"], fp8 rows within RTOL_FP8."""
    outs, inp, kind = out
    errs = routed_errors(outs, inp) if inp.routed else experts_errors(outs, inp)
    worst = max(errs, key=errs.get)
    return {"ok": errs[worst] <= (RTOL_FP8 if kind == "fp8" else bm.RTOL["bf16"]), "rel_err": errs[worst],
            "worst": worst}


# ----------------------------------------------------------------------------- cases and notes

def _case(group: str, shape: MoEShape, tokens: int, device: str) -> Case:
    backend = "triton" if device == "cuda" else "torch"
    routed = group == "routed"
    if routed:
        impls = {"stock": timed(stock_routed, "bf16"),
                 "experts": timed(routed_with(moekernels_experts(None, backend)), "bf16"),
                 "fused": timed(moekernels_fused(None, backend), "bf16"),
                 "experts_fp8": timed(routed_with(moekernels_experts("fp8", backend)), "fp8")}
        if fused_fp8_unsupported() is None:
            impls["fused_fp8"] = timed(moekernels_fused("fp8", backend), "fp8")
    else:
        impls = {"stock": timed(stock_experts, "bf16"), "experts": timed(moekernels_experts(None, backend), "bf16"),
                 "experts_fp8": timed(moekernels_experts("fp8", backend), "fp8")}
    rows = tokens * shape.top_k
    return Case(
        bench=BENCH, group=f"{shape.name} {group} fwd+bwd", x=tokens, x_name="T",
        make_inputs=make_inputs(shape, tokens, routed, device), impls=impls,
        flops=experts_flops(rows, shape.hidden, shape.intermediate),
        bytes=experts_bytes(tokens if routed else rows, shape.hidden, shape.intermediate, shape.experts),
        bound="compute", compare=compare,
        # The torch backend reads the offsets on the host; on the CPU nothing is captured anyway.
        eager=tuple(impls) if device != "cuda" else (),
        params={"what": group, "pass": "fwd+bwd", "E": shape.experts, "D": shape.hidden, "F": shape.intermediate,
                "k": shape.top_k, "R": rows},
    )


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    """``tokens`` (--tokens) replaces T; in the quick suite each of its cases runs at those T."""
    if device == "cuda" and quick:
        picked = [(g, s, t) for g, s, _ in QUICK for t in tokens] if tokens is not None else QUICK
    else:
        shapes = ([bm.CPU_SHAPE], [bm.CPU_SHAPE]) if device != "cuda" else (EXPERTS_SHAPES, ROUTED_SHAPES)
        sweep = token_sweep(device, quick, tokens, TOKENS, TOKENS, TOKENS_CPU)
        picked = [(g, s, t) for g, group_shapes in zip(("experts", "routed"), shapes) for s in group_shapes
                  for t in sweep]
    return [_case(g, s, t, device) for g, s, t in picked]


_target = functools.partial(target_line, BENCH)


def notes(records: list[dict]) -> list[str]:
    """The two targets against stock (x stock), and why fused_fp8 is missing where it is."""
    ok = [r for r in records if r["bench"] == BENCH and r["error"] is None and r.get("speedup_vs_stock")]
    if not any(r["bench"] == BENCH for r in records):
        return []
    lines = _target("bf16 (experts, fused) vs stock", [(r, r["speedup_vs_stock"]) for r in ok
                                                       if r["impl"] in BF16_IMPLS], TARGET_BF16, ".2f", x_name="T")
    lines += _target("fp8 (experts_fp8, fused_fp8) vs stock bf16", [(r, r["speedup_vs_stock"]) for r in ok
                                                                    if r["impl"] in FP8_IMPLS],
                     TARGET_FP8, ".2f", x_name="T")
    why = fused_fp8_unsupported()
    if why is not None:
        lines.append(f"{BENCH} fused_fp8 not timed: fused_moe(precision=\"fp8\") does not take the (w1, w3) "
                     f"pair here ({why})")
    return lines
