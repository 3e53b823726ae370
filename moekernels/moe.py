"""Stage 5, the layer: router output -> combined tokens, in a few fused kernels.

``fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids)`` is the custom op
``moekernels::fused_moe``:
    plan (the expert-sorted order of the T*k pairs, no host sync)
    -> GEMM 1: rows gathered from hidden in its prologue, act(gate) * up in its epilogue: h [T*k, I]
    -> GEMM 2: each row times its router weight, written to its pair's row: [T*k, H] token-major
    -> the sum over the k rows of a token (a fixed-order reduction: deterministic)
The permuted copy of hidden and the [T*k, 2I] gate/up product are never written. With
float8_e4m3fn weights and their (128, 128) scales it is the w8a8 block path: hidden and h are
quantized (1, 128) on the fly and both GEMMs run on fp8 tensor cores (inference only).

Backward (bf16 / fp16 / fp32): the plan and the gate/up product are recomputed (one grouped
GEMM: [T*k, 2I] activations are not kept between forward and backward), then
    dh = w * (g @ w_down)             grad of the router weights: <g @ w_down, h> per pair
    dz = act'(gate) ...               the gated activation's derivative (torch, elementwise)
    dx = sum_j (dz @ w_gate_up)       a grouped GEMM, then the unweighted combine of permute
    dw_down, dw_gate_up               K-grouped GEMMs, in the weights' own layout
All of it is the grouped GEMM kernels of grouped_gemm.py and the ops of plan.py / permute.py.

``MoE`` is the nn.Module: a router (softmax or sigmoid top-k, DeepSeek-V3's groups and
correction bias), the experts in the layout above, optional shared experts, and the router
losses in training mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import torch
from torch import nn

from . import _autocast, _checks, _cutlass, reference
from .fp8 import FP8, activation_operand, dw_fp8_op, prepare_weight, quantize_op, segments_op
from .fp8 import weight_operands as _fp8_weight_operands
from .grouped_gemm import ACTIVATIONS, fused_op, grouped_mm_dw_op, grouped_mm_op
from .lora import ExpertsLoRA
from .lora import check as check_lora
from .permute import _permute_op, _unpermute_op, permute_backward_op
from .plan import plan_routing_op
from .route import (
    check_arguments, load_balancing_loss, router_z_loss, sequence_balance_loss, topk_routing, update_correction_bias,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ID_DTYPES = (torch.int32, torch.int64)


def _plan(topk_ids, num_experts, backend):
    """The expert offsets, source and dest index of the pairs (RoutingPlan's unpadded fields)."""
    _, offsets, source, dest, *_ = plan_routing_op(topk_ids, num_experts, 0, backend)
    return offsets, source, dest


@torch.library.custom_op("moekernels::fused_moe", mutates_args=())
def _fused_moe_op(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, activation: str, w_gate_up_scale: torch.Tensor | None,
                  w_down_scale: torch.Tensor | None, backend: str, a1: torch.Tensor | None = None,
                  b1: torch.Tensor | None = None, a2: torch.Tensor | None = None, b2: torch.Tensor | None = None,
                  scale1: float = 1.0, scale2: float = 1.0, w_up: torch.Tensor | None = None,
                  w_up_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer, and t1 = s1 (x_rows A1^T) [T*k, r1] of the gate_up adapter (its gradients read
    it: kept, not recomputed; [0, 0] without one). With ``w_up`` [E, I, H] (and ``w_up_scale``),
    ``w_gate_up`` is the gate alone, [E, I, H]: the pair is read in place, never concatenated."""
    num_tokens, top_k = topk_ids.shape
    hid = hidden.shape[1]
    no_t1 = hidden.new_empty(0, 0)
    if num_tokens == 0:
        return hidden.new_zeros(0, hid), no_t1
    offsets, source, _ = _plan(topk_ids, w_gate_up.shape[0], backend)
    lora1 = _low_rank(hidden, a1, b1, scale1, offsets, source, top_k, backend)
    t1 = lora1[0] if a1 is not None else no_t1
    if w_gate_up.dtype == FP8:
        # Column-major activation scales: one K step's scales are one contiguous vector in the GEMMs
        # (or hidden itself, weight-only, where the GPU has no e4m3 MMA).
        qx, sx = activation_operand(hidden, False, backend)
        return _fp8_experts(qx, sx, _gate_up_operands(w_gate_up, w_gate_up_scale, w_up, w_up_scale),
                            (w_down.transpose(1, 2), w_down_scale.transpose(1, 2)), topk_weights, offsets, source,
                            activation, hidden.dtype, False, backend, lora1, (a2, b2, scale2)), t1
    h = fused_op(hidden, w_gate_up.transpose(1, 2), offsets, source, top_k, True, activation, None, None, None,
                 None, backend, *lora1, *_up_operands(w_up))
    lora2 = _low_rank(h, a2, b2, scale2, offsets, None, 1, backend)
    pairs = fused_op(h, w_down.transpose(1, 2), offsets, source, top_k, False, "", topk_weights, None, None,
                     None, backend, *lora2)
    # torch accumulates a bf16 / fp16 sum in float32 and rounds once.
    return pairs.view(num_tokens, top_k, hid).sum(1), t1


def _up_operands(w_up, scale=None):
    """fused_op's (w_up, up_scale) of a separate up weight [E, I, H]: its transposed view (no copy),
    or () for the fused [E, 2I, H] form."""
    if w_up is None:
        return ()
    return w_up.transpose(1, 2), scale.transpose(1, 2) if scale is not None else None


def _gate_up_operands(w_gate_up, scale, w_up, up_scale):
    """GEMM 1's e4m3 operands for _fp8_experts: the K-major gate(-up) view and its scales, then
    those of a separate up weight (none for the fused form)."""
    return (w_gate_up.transpose(1, 2), scale.transpose(1, 2), *_up_operands(w_up, up_scale))


def _low_rank(x, a, b, scale, offsets, source, top_k, backend):
    """An adapter's operands of the fused low-rank segment (``fused_op``'s lora_x, lora_w):
    t = scale * (x_rows @ a[e]^T) [T*k, r] in x's dtype (x_rows gathered as GEMM 1 gathers them
    with ``source``; x itself, already in sorted order, without), and b[e]^T [E, r, N]. (None,
    None) without an adapter."""
    if a is None:
        return None, None
    if source is not None:
        t = fused_op(x, a.transpose(1, 2), offsets, source, top_k, True, "", None, None, None, None, backend)
    else:
        t = grouped_mm_op(x, a.transpose(1, 2), offsets, backend)
    return _scaled(t, scale), b.transpose(1, 2)


def _scaled(t, scale, w=None):
    """scale * t (times the per-row router weights w [rows, 1] float32), rounded once to t's dtype."""
    out = t.float() * scale
    return (out if w is None else out * w).to(t.dtype)


def _fp8_experts(qx, sx, gate_up, down, topk_weights, offsets, source, activation, dtype, pow2_h, backend,
                 lora1=(None, None), down_lora=(None, None, 1.0)):
    """The layer on e4m3 from the quantized tokens: GEMM 1 gathering them, with act(gate) * up,
    h quantized (1, 128) (power-of-two scales with ``pow2_h``), GEMM 2 scattering with the router
    weights, the sum over k. Tokens not quantized (sx None: fp8.activation_operand's weight-only
    route) leave h unquantized too. ``gate_up`` and ``down``: each K-major e4m3 operand and its scales
    (``gate_up`` then the up weight's and its scales where gate and up are apart).
    ``lora1``: GEMM 1's low-rank segment (:func:`_low_rank`); ``down_lora``: (a2, b2, scale2) of
    GEMM 2's adapter, applied to the high-precision h."""
    num_tokens, top_k = topk_weights.shape
    h = fused_op(qx, gate_up[0], offsets, source, top_k, True, activation, None, sx, gate_up[1], dtype, backend,
                 *lora1, *gate_up[2:])
    lora2 = _low_rank(h, *down_lora, offsets, None, 1, backend)
    qh, sh = quantize_op(h, 1, 128, pow2_h, None, None, 1, True, backend) if sx is not None else (h, None)
    pairs = fused_op(qh, down[0], offsets, source, top_k, False, "", topk_weights, sh, down[1], dtype, backend,
                     *lora2)
    return pairs.view(num_tokens, top_k, -1).sum(1)


@_fused_moe_op.register_fake
def _(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, w_gate_up_scale, w_down_scale, backend,
      a1=None, b1=None, a2=None, b2=None, scale1=1.0, scale2=1.0, w_up=None, w_up_scale=None):
    rows, rank = (topk_ids.numel(), a1.shape[1]) if a1 is not None and topk_ids.shape[0] else (0, 0)
    return hidden.new_empty(topk_ids.shape[0], hidden.shape[1]), hidden.new_empty(rows, rank)


def _router_weight_grad(dh_unweighted, h, src, topk_weights):
    """d loss / d topk_weights [T, k]: per sorted row r, <dh_r / w_r, h_r> (the down GEMM's input
    gradient before the router weight, dotted with its input), written to its pair src[r], in
    float32 before topk_weights' dtype; zero for a dropped pair."""
    grad = torch.zeros(topk_weights.numel(), dtype=torch.float32, device=h.device)
    grad[src] = (dh_unweighted.float() * h.float()).sum(-1)
    return grad.view(topk_weights.shape).to(topk_weights.dtype)


# The op's tensor inputs by position (needs_input_grad's indices).
_HIDDEN, _W1, _W2, _TW, _A1, _B1, _A2, _B2, _WUP = 0, 1, 2, 3, 9, 10, 11, 12, 15
_INPUTS = 17


def _setup(ctx, inputs, output):
    inputs = list(inputs) + [None] * (_INPUTS - len(inputs))  # the dispatcher drops trailing defaults
    hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, s1, s2, backend, a1, b1, a2, b2 = inputs[:13]
    scale1, scale2, w_up, s_up = inputs[13:]
    ctx.save_for_backward(hidden, w_gate_up, w_down, topk_weights, topk_ids, s1, s2, a1, b1, a2, b2, output[1],
                          w_up, s_up)
    ctx.mark_non_differentiable(output[1])
    scales = (1.0 if scale1 is None else scale1, 1.0 if scale2 is None else scale2)
    ctx.activation, ctx.backend, ctx.scales = activation, backend, scales


def _backward(ctx, grad_y, _):
    hidden, w_gate_up, w_down, topk_weights, topk_ids, s1, s2, a1, b1, a2, b2, t1, w_up, s_up = ctx.saved_tensors
    lora, fp8 = a1 is not None or a2 is not None, s1 is not None
    if fp8 and not lora:
        raise NotImplementedError("fused_moe with float8_e4m3fn weights is inference-only: it has no backward. To train "
                                  "on e4m3, keep high-precision (master) weights and pass precision='fp8', or train "
                                  "LoRA adapters on the frozen e4m3 experts (lora=moekernels.ExpertsLoRA(...))")
    act, backend, (scale1, scale2) = ctx.activation, ctx.backend, ctx.scales
    num_tokens, top_k = topk_ids.shape
    need = list(ctx.needs_input_grad)
    need += [False] * (_INPUTS - len(need))  # a call that left the adapters to their defaults has 9 inputs
    if lora:  # the base weights are frozen under an adapter: no gradient, even where they require one
        need[_W1] = need[_W2] = False
    grads = [None] * len(ctx.needs_input_grad)
    if num_tokens == 0:
        for i, t in zip((_HIDDEN, _W1, _W2, _TW, _A1, _B1, _A2, _B2, _WUP),
                        (hidden, w_gate_up, w_down, topk_weights, a1, b1, a2, b2, w_up)):
            if need[i]:
                grads[i] = torch.zeros_like(t)
        return tuple(grads)
    offsets, source, dest = _plan(topk_ids, w_gate_up.shape[0], backend)
    src = source.long()
    dtype = hidden.dtype
    # The gate/up product, recomputed ([T*k, 2I] activations are not kept between forward and
    # backward), with GEMM 1's low-rank segment (t1 kept from the forward); then h = act(gate) * up.
    t1, b1_t = (t1, b1.transpose(1, 2)) if a1 is not None else (None, None)
    if fp8:
        qx, sx = activation_operand(hidden, False, backend)
        z = fused_op(qx, w_gate_up.transpose(1, 2), offsets, source, top_k, True, "", None, sx, s1.transpose(1, 2),
                     dtype, backend, t1, b1_t, *_up_operands(w_up, s_up))
    else:
        z = fused_op(hidden, w_gate_up.transpose(1, 2), offsets, source, top_k, True, "", None, None, None, None,
                     backend, t1, b1_t, *_up_operands(w_up))
    h = reference.gated_activation(z, act)
    g = grad_y.index_select(0, src // top_k)  # row r's gradient: its token's
    w = topk_weights.reshape(-1).index_select(0, src).float().unsqueeze(-1)
    # dh / w = g W2 (+ s2 (g B2) A2: the base dgrad with the down adapter's low-rank segment).
    v2 = grouped_mm_op(g, b2, offsets, backend) if a2 is not None else None  # [T*k, r2]
    lora_dh = (_scaled(v2, scale2), a2) if a2 is not None else (None, None)
    if fp8:  # e4m3 gradient tiles with power-of-two scales (DeepSeek-V3), gathered per pair by the GEMM
        qg, sg = activation_operand(grad_y.contiguous(), True, backend)
        w2_t, s2_t = prepare_weight(w_down, scale=s2)  # K-major for g @ w_down: one e4m3 transpose
        dh_unweighted = fused_op(qg, w2_t, offsets, source, top_k, True, "", None, sg, s2_t, dtype, backend,
                                 *lora_dh)
    else:
        dh_unweighted = fused_op(g, w_down, offsets, source, top_k, False, "", None, None, None, None, backend,
                                 *lora_dh)  # [T*k, I]; zero past offsets[-1]
    if need[_TW]:
        grads[_TW] = _router_weight_grad(dh_unweighted, h, src, topk_weights)
    if need[_W2] or need[_B2]:
        gw = (g.float() * w).to(g.dtype)
        if need[_W2]:  # d(w_down^T)[e] = h_e^T (w g)_e, written in w_down's [E, H, I] layout
            grads[_W2] = grouped_mm_dw_op(h, gw, offsets, None, 1, True, backend).transpose(1, 2)
        if need[_B2]:  # dB2[e] = (w g)_e^T (s2 h A2^T)_e  [H, r2]
            t2 = _low_rank(h, a2, b2, scale2, offsets, None, 1, backend)[0]
            grads[_B2] = grouped_mm_dw_op(gw, t2, offsets, None, 1, False, backend)
    if need[_A2]:  # dA2[e] = (s2 w g B2)_e^T h_e  [r2, I]
        grads[_A2] = grouped_mm_dw_op(_scaled(v2, scale2, w), h, offsets, None, 1, False, backend)
    if lora:
        need[_WUP] = False
    if not (need[_HIDDEN] or need[_W1] or need[_WUP] or need[_A1] or need[_B1]):
        return tuple(grads)
    dz = reference.gated_activation_backward((dh_unweighted.float() * w).to(h.dtype), z, act)
    v1 = grouped_mm_op(dz, b1, offsets, backend) if a1 is not None and (need[_HIDDEN] or need[_A1]) else None
    if need[_HIDDEN]:  # dx = sum_j dz W1 (+ s1 (dz B1) A1: the base dgrad with the gate_up adapter's segment)
        lora_dx = (_scaled(v1, scale1), a1) if a1 is not None else (None, None)
        if w_up is None:
            dx = _dgrad(dz, w_gate_up, s1, offsets, source, top_k, fp8, dtype, dtype, backend, lora_dx)
        else:  # dz_gate W_gate + dz_up W_up: two launches in float32, rounded once
            inter = w_up.shape[1]
            dx = (_dgrad(dz[:, :inter], w_gate_up, s1, offsets, source, top_k, fp8, dtype, torch.float32, backend,
                         lora_dx)
                  + _dgrad(dz[:, inter:], w_up, s_up, offsets, source, top_k, fp8, dtype, torch.float32, backend,
                           (None, None))).to(dtype)
        grads[_HIDDEN] = permute_backward_op(dx, dest, top_k, backend)
    # Each weight's gradient from its own columns of dz, written to its own tensor.
    dz_gate = dz if w_up is None else dz[:, :w_up.shape[1]]
    if need[_W1]:
        grads[_W1] = grouped_mm_dw_op(hidden, dz_gate, offsets, source, top_k, True, backend).transpose(1, 2)
    if need[_WUP]:
        grads[_WUP] = grouped_mm_dw_op(hidden, dz[:, w_up.shape[1]:], offsets, source, top_k, True,
                                       backend).transpose(1, 2)
    if need[_B1]:  # dB1[e] = dz_e^T t1_e  [2I, r1]
        grads[_B1] = grouped_mm_dw_op(dz, t1, offsets, None, 1, False, backend)
    if need[_A1]:  # dA1[e] = (s1 dz B1)_e^T x_rows_e  [r1, H]: the transpose of x_rows^T (s1 v1)
        grads[_A1] = grouped_mm_dw_op(hidden, _scaled(v1, scale1), offsets, source, top_k, True,
                                      backend).transpose(1, 2)
    return tuple(grads)


def _dgrad(dz, w, scale, offsets, source, top_k, fp8, dtype, out_dtype, backend, lora_dx):
    """dz @ w per expert ([T*k, H], sorted rows) for w [E, N, H] (the gate/up weight or one half), on
    e4m3 (dz quantized (1, 128), w transposed once: fp8.prepare_weight) where w is; out_dtype's
    float32 keeps a sum of the two halves' products to one rounding."""
    if fp8:
        qz, sz = activation_operand(dz, False, backend)
        w_t, s_t = prepare_weight(w, scale=scale)
        return fused_op(qz, w_t, offsets, source, top_k, False, "", None, sz, s_t, out_dtype, backend, *lora_dx)
    return fused_op(dz, w, offsets, source, top_k, False, "", None, None, None, out_dtype, backend, *lora_dx)


_fused_moe_op.register_autograd(_backward, setup_context=_setup)
# not topk_weights: router weights stay float32
_autocast.register("fused_moe", (0, 1, 2, 9, 10, 11, 12, 15))


# ----------------------------------------------------------------------------- FP8 training
# fused_moe(precision="fp8") with high-precision weights: DeepSeek-V3's recipe on both GEMMs,
# forward and backward (moekernels/fp8.py's training section has the per-GEMM recipe).
# Saved for backward: the tokens in e4m3 with their (1, 128) scales (T x H bytes + T x H / 32
# for the scales, about half of the bf16 tokens), the router outputs and the weights themselves
# (parameters: no copy). The fp8 weight copies are made again in backward (one more read of each
# weight, 3 x E x H x I elements: the same bits as the forward's) rather than kept alive between
# forward and backward (2.5 bytes an expert parameter); the gate/up product is recomputed from
# the saved e4m3 tokens, as the bf16 path recomputes it from bf16 ones.


def _fp8_weights(w: torch.Tensor, backend: str, dgrad: bool = True):
    """An [E, N, K]-stored weight as the fp8 operands of its products: (b [E, K, N], its scale) for
    x @ w^T and (b^T [E, N, K], its scale) for dy @ w, from one (128, 128) quantization (without
    the second pair, and its e4m3 transpose, for ``dgrad=False``)."""
    return _fp8_weight_operands(w.transpose(1, 2), "block", backend, dgrad=dgrad)


def _fp8_gate_up(w_gate_up, w_up, backend, dgrad=True):
    """GEMM 1's weights as _fp8_weights' operands: [those of w_gate_up], or [the gate's, the up
    weight's], each from its own (128, 128) quantization (the pair is never concatenated: with I a
    multiple of 128 the blocks are the fused tensor's, so are the bits)."""
    return [_fp8_weights(w, backend, dgrad=dgrad) for w in (w_gate_up, w_up) if w is not None]


def _gate_up_fprop(ops):
    """_fp8_experts' / fused_op's GEMM 1 operands of _fp8_gate_up's list: (b, scale) of the fused
    weight, or (b_gate, scale, b_up, up_scale), read in one launch (SPLIT_UP)."""
    return tuple(t for op in ops for t in op[:2])


@torch.library.custom_op("moekernels::fused_moe_fp8", mutates_args=())
def _fused_moe_fp8_op(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                      topk_weights: torch.Tensor, topk_ids: torch.Tensor, activation: str,
                      backend: str, w_up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """fused_moe on e4m3 with high-precision weights; also returns the tokens' e4m3 bytes and their
    (1, 128) scales, which its backward keeps. With ``w_up`` [E, I, H], ``w_gate_up`` is the gate
    alone, [E, I, H]: each quantized in its own blocks, both read in place. ``backend="cutlass"``: both
    GEMMs (and their dgrads) on CUTLASS's kernel, the rest on the automatic choice (_cutlass_experts)."""
    gemm, backend = backend, _cutlass.others(backend)
    qx, sx = quantize_op(hidden, 1, 128, False, None, None, 1, False, backend)  # an output: row-major scales
    if topk_ids.shape[0] == 0:
        return hidden.new_zeros(0, hidden.shape[1]), qx.view(torch.uint8), sx
    offsets, source, dest = _plan(topk_ids, w_gate_up.shape[0], backend)
    gate_up = _gate_up_fprop(_fp8_gate_up(w_gate_up, w_up, backend, dgrad=False))
    down = _fp8_weights(w_down, backend, dgrad=False)[:2]
    if gemm == "cutlass":
        y = _cutlass_experts(qx, sx, gate_up, down, topk_weights, offsets, source, dest, activation, backend)
    else:  # power-of-two scales for h, before the down GEMM (DeepSeek-V3)
        y = _fp8_experts(qx, sx, gate_up, down, topk_weights, offsets, source, activation, hidden.dtype, True,
                         backend)
    return y, qx.view(torch.uint8), sx


def _cutlass_gathered(q, s, weights, offsets, source, dest, top_k, backend):
    """CUTLASS's GEMMs on (1, 128)-quantized tokens gathered into expert order (permute moves the e4m3 rows and
    their scales, row-major: the operands the Triton GEMM's gathering prologue reads, at T*k*H + T*k*H/32 bytes
    written and read back), one product for each (b, scale) pair in ``weights``, side by side in bf16."""
    rows = _permute_op(q, source, dest, top_k, backend)
    scales = _permute_op(s, source, dest, top_k, backend)
    out = [_cutlass.product(rows, scales, b, bs, offsets) for b, bs in zip(weights[::2], weights[1::2])]
    return out[0] if len(out) == 1 else torch.cat(out, 1)


def _cutlass_experts(qx, sx, gate_up, down, topk_weights, offsets, source, dest, activation, backend):
    """_fp8_experts with CUTLASS's GEMMs (its epilogue writes plain bf16, so nothing is fused into them): GEMM 1
    on the gathered tokens -> z = [gate | up] bf16 [T*k, 2I] -> act(gate) * up and h's (1, 128) quantize
    (power-of-two scales) -> GEMM 2 -> bf16 [T*k, H] sorted rows -> the weighted combine (unpermute). Against
    the Triton path, z and the sorted rows are each rounded to bf16 once more (its SwiGLU reads the float32
    accumulator, and its scatter rounds acc * weight): within a bf16 rounding."""
    z = _cutlass_gathered(qx, sx, gate_up, offsets, source, dest, topk_weights.shape[1], backend)
    qh, sh = quantize_op(reference.gated_activation(z, activation), 1, 128, True, None, None, 1, False, backend)
    return _unpermute_op(_cutlass.product(qh, sh, *down, offsets), dest, offsets, topk_weights, backend)


@_fused_moe_fp8_op.register_fake
def _(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, backend, w_up=None):
    num_tokens, hid = hidden.shape
    return (hidden.new_empty(topk_ids.shape[0], hid), hidden.new_empty(num_tokens, hid, dtype=torch.uint8),
            hidden.new_empty(num_tokens, -(-hid // 128), dtype=torch.float32))


def _fp8_setup(ctx, inputs, output):
    hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, backend, *up = inputs  # w_up: dropped if None
    _, qx, sx = output
    ctx.save_for_backward(qx, sx, w_gate_up, w_down, topk_weights, topk_ids, up[0] if up else None)
    ctx.mark_non_differentiable(sx)
    ctx.activation, ctx.backend, ctx.dtype = activation, backend, hidden.dtype


def _fp8_backward(ctx, grad_y, *_):
    qx, sx, w_gate_up, w_down, topk_weights, topk_ids, w_up = ctx.saved_tensors
    qx = qx.view(FP8)
    act, dtype = ctx.activation, ctx.dtype
    gemm, backend = ctx.backend, _cutlass.others(ctx.backend)  # the wgrads stay on Triton: K-grouped GEMMs
    cutlass = gemm == "cutlass"
    num_tokens, top_k = topk_ids.shape
    need = list(ctx.needs_input_grad) + [False]  # [7]: w_up's, False where the call had none
    need_x, need_w2, need_tw = need[0], need[2], need[3]
    # GEMM 1's weights, each with its input's index (its gradient reads its own columns of dz).
    weights = [(1, w_gate_up)] if w_up is None else [(1, w_gate_up), (7, w_up)]
    grads = [None] * len(ctx.needs_input_grad)
    if num_tokens == 0:
        grads[:4] = [torch.zeros(qx.shape, dtype=dtype, device=qx.device), torch.zeros_like(w_gate_up),
                     torch.zeros_like(w_down), torch.zeros_like(topk_weights)]
        if w_up is not None:
            grads[7] = torch.zeros_like(w_up)
        return tuple(grads)
    offsets, source, dest = _plan(topk_ids, w_gate_up.shape[0], backend)
    src = source.long()
    rows = src.shape[0]
    gate_up = _fp8_gate_up(w_gate_up, w_up, backend)
    _, _, b2_t, s2_t = _fp8_weights(w_down, backend)
    # The gate/up product, recomputed on e4m3 from the saved tokens: [T*k, 2I] (the pair's two
    # products into its halves).
    b1, s1, *up = _gate_up_fprop(gate_up)
    if cutlass:
        z = _cutlass_gathered(qx, sx, (b1, s1, *up), offsets, source, dest, top_k, backend)
    else:
        z = fused_op(qx, b1, offsets, source, top_k, True, "", None, sx, s1, dtype, backend, None, None, *up)
    h = reference.gated_activation(z, act)
    # The tokens' gradient in (1, 128) tiles with power-of-two scales, gathered per pair by the
    # GEMM as GEMM 1 gathers the tokens; the router weight multiplies afterwards, in float32.
    qg, sg = quantize_op(grad_y.contiguous(), 1, 128, True, None, None, 1, not cutlass, backend)
    if cutlass:  # dgrad of GEMM 2 on the forward's blocks transposed (b2_t: K-major for it)
        dh_unweighted = _cutlass_gathered(qg, sg, (b2_t, s2_t), offsets, source, dest, top_k, backend)
    else:
        dh_unweighted = fused_op(qg, b2_t, offsets, source, top_k, True, "", None, sg, s2_t, dtype, backend)
    w = topk_weights.reshape(-1).index_select(0, src).float().unsqueeze(-1)
    if need_tw:
        grads[3] = _router_weight_grad(dh_unweighted, h, src, topk_weights)
    if need_w2:  # d(w_down^T)[e] = h_e^T (w g)_e on e4m3, in w_down's [E, H, I] layout
        gw = (grad_y.index_select(0, src // top_k).float() * w).to(dtype)
        hq_t, hs_t = segments_op(h, offsets, True, backend)
        gq_t, gs_t = segments_op(gw, offsets, False, backend)
        grads[2] = dw_fp8_op(hq_t, hs_t, gq_t, gs_t, offsets, rows, True, w_down.dtype, backend).transpose(1, 2)
    need_w1 = any(need[i] for i, _ in weights)
    if not (need_x or need_w1):
        return tuple(grads)
    dz = reference.gated_activation_backward((dh_unweighted.float() * w).to(h.dtype), z, act)
    cols = w_gate_up.shape[1]  # dz's columns of each weight: all 2I, or I each for the pair
    if need_x:
        # dz in (1, 128) tiles once: I is a multiple of 128, so each half's tiles and scales are
        # its columns of them. The pair: dz_gate W_gate + dz_up W_up, two launches in float32
        # rounded once (the fused form's one K loop over 2I sums the same block products).
        # CUTLASS: each weight's columns quantized apart (its a: contiguous rows, row-major scales; the same
        # bits), each product in bf16, their sum in float32 rounded once more.
        if cutlass:
            parts = [_cutlass.product(*quantize_op(dz[:, j * cols:(j + 1) * cols], 1, 128, False, None, None, 1,
                                                   False, backend), op[2], op[3], offsets)
                     for j, op in enumerate(gate_up)]
        else:
            qz, sz = quantize_op(dz, 1, 128, False, None, None, 1, True, backend)
            out_dtype = dtype if w_up is None else torch.float32
            parts = [fused_op(qz[:, j * cols:(j + 1) * cols], op[2], offsets, source, top_k, False, "", None,
                              sz[:, j * cols // 128:(j + 1) * cols // 128], op[3], out_dtype, backend)
                     for j, op in enumerate(gate_up)]
        dx = parts[0] if w_up is None else (parts[0].float() + parts[1]).to(dtype)
        grads[0] = permute_backward_op(dx, dest, top_k, backend)
    if need_w1:  # the tokens' e4m3 copy, gathered and re-quantized along the tokens (DeepSeek-V3 does too)
        x_rows = reference.dequantize_fp8(qx, sx).to(dtype).index_select(0, src // top_k)
        xq_t, xs_t = segments_op(x_rows, offsets, False, backend)
        for j, (i, weight) in enumerate(weights):  # each weight's gradient from its own columns of dz
            if need[i]:
                zq_t, zs_t = segments_op(dz[:, j * cols:(j + 1) * cols], offsets, False, backend)
                grads[i] = dw_fp8_op(xq_t, xs_t, zq_t, zs_t, offsets, rows, True, weight.dtype,
                                     backend).transpose(1, 2)
    return tuple(grads)


_fused_moe_fp8_op.register_autograd(_fp8_backward, setup_context=_fp8_setup)
_autocast.register("fused_moe_fp8", (0, 1, 2, 7))  # the operands it quantizes; router weights stay float32


def _split_pair(name, value, scale_name, scale):
    """(w_gate, w_up, their scales) of ``w_gate_up`` given as the pair (w_gate, w_up); (w_gate_up,
    None, scale, None) of the fused tensor. Raises TypeError, naming the argument, for any other form."""
    if isinstance(value, torch.Tensor):
        if isinstance(scale, (tuple, list)):
            raise TypeError(f"{scale_name} is a pair but {name} is one tensor: pass the pair (w_gate, w_up) with "
                            f"the pair of their scales, or one [E, 2I, H] tensor with one scale tensor")
        return value, None, scale, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a tensor [E, 2I, H] or a pair (w_gate, w_up) of tensors [E, I, H], got "
                        f"{type(value).__name__}" + (f" of length {len(value)}" if isinstance(value, (tuple, list))
                                                      else ""))
    if scale is not None and (not isinstance(scale, (tuple, list)) or len(scale) != 2):
        raise TypeError(f"{scale_name} must be the pair (w_gate's scales, w_up's scales) when {name} is the pair "
                        f"(w_gate, w_up): each half keeps its own (128, 128) blocks")
    return (*value, *(scale if scale is not None else (None, None)))


def _check(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, s1, s2, w_up=None, s_up=None):
    """The arguments of fused_moe; with ``w_up``, w_gate_up is the gate alone [E, I, H] (and s_up
    the up weight's scales)."""
    _checks.tensor("hidden", hidden, ndim=2, dtypes=DTYPES)
    device = hidden.device
    split = w_up is not None
    gate_name = "w_gate_up[0] (w_gate)" if split else "w_gate_up"
    fp8 = w_gate_up.dtype == FP8 if isinstance(w_gate_up, torch.Tensor) else False
    weight_dtypes = (FP8,) if fp8 else (hidden.dtype,)
    _checks.tensor(gate_name, w_gate_up, ndim=3, dtypes=weight_dtypes, device=device)
    if split:
        _checks.tensor("w_gate_up[1] (w_up)", w_up, ndim=3, dtypes=(w_gate_up.dtype,), device=device)
    _checks.tensor("w_down", w_down, ndim=3, dtypes=weight_dtypes, device=device)
    _checks.tensor("topk_weights", topk_weights, ndim=2, dtypes=WEIGHT_DTYPES, device=device)
    _checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=ID_DTYPES, device=device)
    _checks.choice("activation", activation, tuple(a for a in ACTIVATIONS if a))
    num_experts, two_i, hid = w_gate_up.shape
    if split:
        if hid != hidden.shape[1]:
            raise ValueError(f"w_gate_up[0] (w_gate) must be [E, I, H] with H={hidden.shape[1]}, got "
                             f"{tuple(w_gate_up.shape)}")
        if w_up.shape != w_gate_up.shape:
            raise ValueError(f"w_gate_up[1] (w_up) must have w_gate's shape [E, I, H] = {tuple(w_gate_up.shape)}, "
                             f"got {tuple(w_up.shape)}")
        two_i *= 2
    elif hid != hidden.shape[1] or two_i % 2:
        raise ValueError(f"w_gate_up must be [E, 2I, H] with H={hidden.shape[1]} (gate rows, then up rows), "
                         f"got {tuple(w_gate_up.shape)}")
    if tuple(w_down.shape) != (num_experts, hid, two_i // 2):
        raise ValueError(f"w_down must be [E, H, I] = {(num_experts, hid, two_i // 2)} to match w_gate_up "
                         f"{tuple(w_gate_up.shape) if not split else (tuple(w_gate_up.shape), tuple(w_up.shape))}, "
                         f"got {tuple(w_down.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_weights and topk_ids must both be [T, k] with T={hidden.shape[0]}, got "
                         f"{tuple(topk_weights.shape)} and {tuple(topk_ids.shape)}")
    if not fp8:
        if s1 is not None or s2 is not None or s_up is not None:
            raise ValueError("w_gate_up_scale and w_down_scale go with float8_e4m3fn weights only")
        return
    weights = [("w_gate_up", "w_gate_up_scale", w_gate_up, s1), ("w_down", "w_down_scale", w_down, s2)]
    if split:
        weights[:1] = [("w_gate_up[0] (w_gate)", "w_gate_up_scale[0]", w_gate_up, s1),
                       ("w_gate_up[1] (w_up)", "w_gate_up_scale[1]", w_up, s_up)]
    for name, scale_name, w, s in weights:
        want = (w.shape[0], -(-w.shape[1] // 128), -(-w.shape[2] // 128))
        if s is None:
            raise ValueError(f"{scale_name} is required with float8_e4m3fn {name}: its (128, 128) scales {want}")
        _checks.tensor(scale_name, s, ndim=3, dtypes=(torch.float32,), device=device)
        if w.stride(2) != 1 and w.shape[2] > 1:  # the GEMMs read w^T: K-major only for e4m3 (fp8.prepare_weight)
            raise ValueError(f"{name} must be stored with its last dim contiguous (K-major for the GEMM: wgmma "
                             f"reads float8_e4m3fn weights K-major only), got strides {tuple(w.stride())}; "
                             f"use {name}.contiguous() once at load time (see moekernels.fp8.prepare_weight)")
        if tuple(s.shape) != want:
            raise ValueError(f"{scale_name} must be the (128, 128) block scales of {name}: shape {want}, "
                             f"got {tuple(s.shape)}")
    if hid % 128 or (two_i // 2) % 128:
        raise ValueError(f"the fp8 path needs H and I multiples of 128 (its 128-wide blocks), got H={hid}, "
                         f"I={two_i // 2}")


PRECISIONS = (None, "fp8")


def fused_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor | tuple[torch.Tensor, torch.Tensor], w_down: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, activation: str = "silu",
              w_gate_up_scale: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
              w_down_scale: torch.Tensor | None = None, precision: str | None = None,
              lora: ExpertsLoRA | None = None, backend: str | None = None) -> torch.Tensor:
    """The experts of an MoE layer: ``y[t] = sum_j w[t, j] * w_down[e] @ (act(w_gate[e] @ x) * (w_up[e] @ x))``
    with ``e = topk_ids[t, j]``.

    Args:
        hidden: [T, H] bfloat16, float16 or float32 tokens.
        w_gate_up: [E, 2I, H], gate rows then up rows (transformers v5 experts, vLLM's w13), in
            hidden's dtype, or float8_e4m3fn with ``w_gate_up_scale``. Or the pair ``(w_gate, w_up)``,
            each [E, I, H] (torchtitan's w1 and w3, Megatron's): both read in place, never
            concatenated; with e4m3 weights ``w_gate_up_scale`` is then the pair of their own
            (128, 128) scales. Each of the pair gets its own gradient.
        w_down: [E, H, I] (vLLM's w2), likewise.
        topk_weights: [T, k] router weights (float32, bfloat16 or float16).
        topk_ids: [T, k] int32 or int64 expert ids (an id outside [0, E) raises on CPU tensors).
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, exact erf gelu).
        w_gate_up_scale, w_down_scale: the float32 (128, 128) block scales of fp8 weights, from
            ``quantize_fp8(w, (128, 128))``: [E, 2I/128, H/128] (a pair of [E, I/128, H/128] for
            the pair of weights) and [E, H/128, I/128]. Activations
            are then quantized (1, 128) on the fly (DeepSeek-V3's w8a8 block recipe; H and I
            multiples of 128).
        precision: None (compute in the weights' dtype) or ``"fp8"``: DeepSeek-V3's FP8 training
            recipe with float32, bfloat16 or float16 (master) weights, quantized on the fly: both
            GEMMs, their dgrads and wgrads on e4m3 ((1, 128) activation and gradient tiles,
            (128, 128) weight blocks, 128-token x 1-channel wgrad tiles within each expert,
            power-of-two scales around the down projection); the router weights, the combine and
            the activation's backward stay in float32. Saves the tokens in e4m3 for backward.
            H and I multiples of 128. The pair (w_gate, w_up) too: each quantized in its own
            (128, 128) blocks (the fused tensor's blocks, I being a multiple of 128), never
            concatenated, each with its own gradient.
        lora: :class:`moekernels.ExpertsLoRA`, LoRA adapters on the experts (fine-tuning):
            ``gate_up = x W1_e^T + s1 (x A1_e^T) B1_e^T`` and ``y = h W2_e^T + s2 (h A2_e^T) B2_e^T``,
            computed without ever forming ``W + s B A``; adapters in hidden's dtype. The base
            weights (bf16, fp16, fp32, or float8_e4m3fn with their scales) are then frozen: they
            get no gradient even where they require one; hidden, topk_weights and the adapters do.
        backend: ``"torch"``, ``"triton"`` or None (automatic); with ``precision="fp8"`` also
            ``"cutlass"``: both GEMMs and their dgrads on :func:`moekernels.fp8_grouped_mm`'s CUTLASS
            kernel (opt-in, as there: bfloat16 hidden, sm_90), the gather, SwiGLU, h's quantize, the
            combine and the wgrads around them on the automatic choice; raises naming why where it
            cannot run.

    Returns:
        [T, H] in hidden's dtype. Differentiable with respect to hidden, w_gate_up, w_down and
        topk_weights (not with fp8 weights, which only ``lora`` adapters train on;
        ``precision="fp8"`` trains). No host sync: it captures in CUDA graphs (decode
        steps of 1-64 tokens take the grouped GEMM's decode tiles) and traces under
        ``torch.compile(fullgraph=True)``. Under ``torch.autocast`` hidden and the (non-fp8)
        weights are cast to its dtype and the result is in it; topk_weights stay as they are.
    """
    w_gate_up, w_up, w_gate_up_scale, w_up_scale = _split_pair("w_gate_up", w_gate_up, "w_gate_up_scale",
                                                              w_gate_up_scale)
    up = () if w_up is None else (w_up,)
    adapters = lora.tensors() if isinstance(lora, ExpertsLoRA) else ()
    hidden, w_gate_up, w_down, *rest = _autocast.cast(hidden, w_gate_up, w_down, *up, *adapters)
    up, adapters = rest[:len(up)], rest[len(up):]
    w_up = up[0] if up else None
    _check(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, w_gate_up_scale, w_down_scale, w_up,
           w_up_scale)
    _checks.choice("precision", precision, PRECISIONS)
    if backend == "cutlass":
        if precision != "fp8" or lora is not None:
            raise ValueError("backend='cutlass' runs the GEMMs of fused_moe(precision='fp8') alone (CUTLASS's FP8 "
                             "grouped GEMM, opt-in); the other paths take 'torch', 'triton', 'cuda' or None")
        _cutlass.check_training("fused_moe", hidden, "hidden")
    # The separate up weight (and its scales) after the op's other inputs: none for the fused form.
    split = (1.0, 1.0, w_up, w_up_scale) if w_up is not None else ()
    if lora is not None:
        if not isinstance(lora, ExpertsLoRA):
            raise TypeError(f"lora must be a moekernels.ExpertsLoRA, got {type(lora).__name__}")
        lora = replace(lora, **dict(zip(("a1", "b1", "a2", "b2"), adapters)))
        check_lora(lora, hidden, w_gate_up.shape[0], w_gate_up.shape[1] * (2 if w_up is not None else 1))
        if precision is not None:
            raise ValueError("lora trains adapters on frozen base weights; precision='fp8' (which trains the base "
                             "weights on e4m3) does not take lora. For adapters on e4m3 experts pass the "
                             "float8_e4m3fn weights and their scales (w_gate_up_scale, w_down_scale)")
        return _fused_moe_op(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, w_gate_up_scale,
                             w_down_scale, backend or "", *lora.tensors(), *lora.scales, *split[2:])[0]
    if precision == "fp8":
        if w_gate_up.dtype == FP8:
            raise ValueError("precision='fp8' quantizes high-precision weights on the fly; float8_e4m3fn weights "
                             "already run the fp8 inference path (leave precision=None)")
        hid, inter = hidden.shape[1], w_down.shape[2]
        if hid % 128 or inter % 128:
            raise ValueError(f"precision='fp8' needs H and I multiples of 128 (its 128-wide tiles and blocks), got "
                             f"H={hid}, I={inter}")
        return _fused_moe_fp8_op(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, backend or "",
                                 *(() if w_up is None else (w_up,)))[0]
    return _fused_moe_op(hidden, w_gate_up, w_down, topk_weights, topk_ids, activation, w_gate_up_scale,
                         w_down_scale, backend or "", *((None,) * 4 if split else ()), *split)[0]


# ----------------------------------------------------------------------------- the module


class SharedExperts(nn.Module):
    """The always-on experts of DeepSeek-V2/V3: one SwiGLU MLP of intermediate size I * n."""

    def __init__(self, hidden_size, intermediate_size, *, dtype=None, device=None):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """An MoE layer: router, routed experts (``fused_moe``), optional shared experts.

    Args:
        hidden_size, intermediate_size: H and the routed experts' I.
        num_experts, top_k: E and k.
        scoring: ``"softmax"`` (Mixtral, Qwen) or ``"sigmoid"`` (DeepSeek-V3).
        renormalize: divide the k chosen weights by their sum (Mixtral, Qwen3, DeepSeek-V3).
        n_group, topk_group: group-limited routing (DeepSeek-V3: 8 and 4).
        routed_scaling_factor: multiplies the routed output's weights (DeepSeek-V3: 2.5).
        num_shared_experts: shared experts of intermediate size I * num_shared_experts.
        correction_bias: keep DeepSeek-V3's ``e_score_correction_bias`` [E] (float32, a buffer:
            it is adjusted outside the gradient, by :meth:`update_bias`).
        bias_update_rate: the speed gamma of :meth:`update_bias` (DeepSeek-V3: 1e-3).
        activation: ``"silu"`` or ``"gelu"``.
        dtype, device: of the parameters. x must be in that dtype, except under ``torch.autocast``,
            which casts x and the experts' weights to its dtype (as it does an nn.Linear's input
            and weight): there a float32 layer takes bf16 x (Trainer's ``bf16=True``) and a bf16
            layer float32 x.
        router_dtype: of the router's weight and logits (default: dtype). DeepSeek-V3 keeps its
            router in float32 when the model is bf16: routing on bf16 logits picks other experts
            near ties. Set, the router runs with ``torch.autocast`` off, so its logits stay in it
            under autocast too (by default the router follows autocast, as an nn.Linear does).
        expert_parallel_group: a torch.distributed process group (``torch.distributed.group.WORLD``
            for every rank), or None: no expert parallelism. Then this rank holds only its E / world_size
            experts (rank r: experts r*E/W .. (r+1)*E/W - 1, ``expert_offset`` the first), and the
            forward is route -> ``distributed.dispatch`` -> local experts -> ``distributed.combine``.
            The router and shared experts are replicated: all-reduce their gradients as DDP does.
        capacity: with expert parallelism, None (exchange the counts: one host sync a layer) or
            the rows each pair of ranks exchanges (no sync; overflow dropped, ``dropped`` counts it).
        precision: None (the experts compute in the parameters' dtype) or ``"fp8"``: the routed
            experts run DeepSeek-V3's FP8 training recipe (``fused_moe(precision="fp8")``) on the
            high-precision parameters, which stay the master weights; H and I multiples of 128.
            The router and the shared experts keep the parameters' dtype.
        lora_rank, lora_alpha: with ``lora_rank`` r > 0, LoRA adapters on the routed experts
            (``fused_moe(lora=...)``, scale ``lora_alpha / r``, alpha default r): parameters
            ``lora_a1`` [E, r, H], ``lora_b1`` [E, 2I, r], ``lora_a2`` [E, r, I] and ``lora_b2``
            [E, H, r] (A as nn.Linear's default init, B zeros: the layer starts as the base one),
            and the expert weights frozen (``requires_grad=False``; they get no gradient).
            :meth:`quantize_experts` then puts the frozen experts in e4m3.
        backend: the backend of every op (None: automatic).

        split_gate_up: keep the gate and up projections as two parameters ``w_gate`` and ``w_up``
            [E, I, H] (torchtitan's w1 and w3, Megatron's checkpoints; tensor parallelism shards
            each on I) instead of one ``w_gate_up``; fused_moe reads the pair in place, with the
            same math and initialization; with precision='fp8' each is quantized in its own
            (128, 128) blocks and gets its own gradient. Not with expert_parallel_group.

    Parameters: ``gate`` (nn.Linear H -> E, no bias), ``w_gate_up`` [E, 2I, H], ``w_down``
    [E, H, I], ``shared_experts``, and the adapters. In training mode the forward sets ``aux_loss`` (the
    load-balancing loss of transformers' ``load_balancing_loss_func``), ``z_loss`` (ST-MoE's) and
    ``seq_aux_loss`` (DeepSeek-V3's sequence-wise balance loss, :func:`sequence_balance_loss` over
    the sequences of an x [B, S, H]; x [T, H] is one sequence; it counts the top-k of the unbiased,
    ungrouped scores, as the report does); add them to the model's loss with coefficients of your
    choice (DeepSeek-V3: 1e-4 times ``seq_aux_loss`` alone).

    DeepSeek-V3's auxiliary-loss-free balancing: with ``correction_bias=True`` each training
    forward adds its (token, slot) counts per expert to the buffer ``expert_load`` [E] (int64, on
    the device, no sync), and :meth:`update_bias`, called after ``optimizer.step()``, moves the
    bias by ``bias_update_rate * sign(mean load - load_e)`` and zeroes ``expert_load``. With data
    or expert parallelism, all-reduce ``expert_load`` over the ranks that share the router first.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, *,
                 scoring: str = "softmax", renormalize: bool = True, n_group: int | None = None,
                 topk_group: int | None = None, routed_scaling_factor: float = 1.0, num_shared_experts: int = 0,
                 correction_bias: bool = False, activation: str = "silu", dtype=None, device=None,
                 router_dtype=None, expert_parallel_group=None, capacity: int | None = None,
                 precision: str | None = None, backend: str | None = None, bias_update_rate: float = 1e-3,
                 lora_rank: int = 0, lora_alpha: float | None = None, split_gate_up: bool = False):
        super().__init__()
        _checks.integer("hidden_size", hidden_size, low=1)
        _checks.integer("intermediate_size", intermediate_size, low=1)
        _checks.integer("num_experts", num_experts, low=1)
        _checks.integer("num_shared_experts", num_shared_experts, low=0)
        _checks.choice("activation", activation, ("silu", "gelu"))
        # Every routing argument now, not at the first forward (the same checks as topk_routing).
        check_arguments(num_experts, top_k, scoring, renormalize, correction_bias, n_group, topk_group,
                        routed_scaling_factor)
        _checks.choice("precision", precision, PRECISIONS)
        _checks.integer("lora_rank", lora_rank, low=0)
        if lora_rank and (precision is not None or expert_parallel_group is not None):
            raise ValueError("lora_rank > 0 trains adapters on frozen experts: not with precision='fp8' (which trains "
                             "the experts themselves) or expert_parallel_group")
        if split_gate_up and expert_parallel_group is not None:
            raise ValueError("split_gate_up keeps w_gate and w_up apart: not with expert_parallel_group yet (its "
                             "local experts read one w_gate_up)")
        if precision == "fp8" and (hidden_size % 128 or intermediate_size % 128):
            raise ValueError(f"precision='fp8' needs hidden_size and intermediate_size multiples of 128, got "
                             f"{hidden_size} and {intermediate_size}")
        if precision == "fp8" and expert_parallel_group is not None:
            raise ValueError("precision='fp8' with expert_parallel_group is not supported yet: the local experts "
                             "run bf16 grouped GEMMs")
        for name, value in (("dtype", dtype), ("router_dtype", router_dtype)):
            if value is not None and value not in DTYPES:
                raise TypeError(
                    f"{name} must be one of torch.bfloat16, float16 or float32 (or None), got {value}"
                    + (". MoE trains in those; for fp8 inference quantize a trained layer's weights, "
                       "q1, s1 = moekernels.quantize_fp8(moe.w_gate_up, (128, 128)) and likewise w_down, and call "
                       "moekernels.fused_moe(x, q1, q2, topk_weights, topk_ids, w_gate_up_scale=s1, "
                       "w_down_scale=s2) (see docs/API.md's FP8 section)" if value == FP8 else ""))
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k = num_experts, top_k
        self.scoring, self.renormalize = scoring, renormalize
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor, self.num_shared_experts = routed_scaling_factor, num_shared_experts
        self.activation, self.backend, self.precision = activation, backend, precision
        self.router_dtype = router_dtype
        self.group, self.capacity = expert_parallel_group, capacity
        local, self.expert_offset = num_experts, 0
        if expert_parallel_group is not None:
            from .distributed import world_and_rank

            world, rank = world_and_rank(expert_parallel_group)
            if num_experts % world:
                raise ValueError(f"num_experts={num_experts} must be divisible by the expert-parallel world size "
                                 f"{world}")
            local = num_experts // world
            self.expert_offset = rank * local
        self.num_local_experts = local
        self.dropped = None
        kw = dict(dtype=dtype, device=device)
        self.gate = nn.Linear(hidden_size, num_experts, bias=False, dtype=router_dtype or dtype, device=device)
        self.split_gate_up = split_gate_up
        # Their names: the fused [E, 2I, H] parameter, or the gate and up ones [E, I, H].
        self._gate_up_names = ("w_gate", "w_up") if split_gate_up else ("w_gate_up",)
        for name in self._gate_up_names:
            rows = intermediate_size if split_gate_up else 2 * intermediate_size
            setattr(self, name, nn.Parameter(torch.empty(local, rows, hidden_size, **kw)))
        self.w_down = nn.Parameter(torch.empty(local, hidden_size, intermediate_size, **kw))
        bias = torch.zeros(num_experts, dtype=torch.float32, device=device) if correction_bias else None
        self.register_buffer("e_score_correction_bias", bias)
        load = torch.zeros(num_experts, dtype=torch.int64, device=device) if correction_bias else None
        self.register_buffer("expert_load", load, persistent=False)  # not in checkpoints: one step's counts
        self.bias_update_rate = bias_update_rate
        self.shared_experts = (SharedExperts(hidden_size, intermediate_size * num_shared_experts, **kw)
                               if num_shared_experts else None)
        self.aux_loss = self.z_loss = self.seq_aux_loss = None
        self.lora_rank, self.lora_scale = lora_rank, (lora_rank if lora_alpha is None else lora_alpha) / max(lora_rank, 1)
        for name in self._gate_up_names:  # the e4m3 experts' (128, 128) scales: quantize_experts
            self.register_buffer(f"{name}_scale", None)
        self.register_buffer("w_down_scale", None)
        if lora_rank:
            r, hid, inter = lora_rank, hidden_size, intermediate_size
            self.lora_a1 = nn.Parameter(torch.empty(local, r, hid, **kw))
            self.lora_b1 = nn.Parameter(torch.empty(local, 2 * inter, r, **kw))
            self.lora_a2 = nn.Parameter(torch.empty(local, r, inter, **kw))
            self.lora_b2 = nn.Parameter(torch.empty(local, hid, r, **kw))
            for name in self._gate_up_names:
                getattr(self, name).requires_grad_(False)
            self.w_down.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self):
        """nn.Linear's default for each expert matrix and LoRA A: uniform in +-1/sqrt(fan_in);
        LoRA B zeros (PEFT's init: the adapted layer starts as the base one)."""
        with torch.no_grad():
            mats = [*self._gate_up(), self.w_down] if self.w_down_scale is None else []
            for w in mats + ([self.lora_a1, self.lora_a2] if self.lora_rank else []):
                bound = 1 / math.sqrt(w.shape[2])
                w.uniform_(-bound, bound)
            if self.lora_rank:
                self.lora_b1.zero_()
                self.lora_b2.zero_()

    def _gate_up(self, suffix: str = "") -> tuple:
        """(w_gate_up,) or (w_gate, w_up), or with suffix "_scale" their scales."""
        return tuple(getattr(self, name + suffix) for name in self._gate_up_names)

    @staticmethod
    def _gate_up_arg(pair: tuple):
        """fused_moe's w_gate_up (or scale) argument: the tensor, or the pair."""
        return pair if len(pair) == 2 else pair[0]

    def lora(self) -> ExpertsLoRA | None:
        """The adapters as fused_moe takes them (None without lora_rank)."""
        if not self.lora_rank:
            return None
        return ExpertsLoRA(self.lora_a1, self.lora_b1, self.lora_a2, self.lora_b2, scale=self.lora_scale)

    def quantize_experts(self) -> None:
        """Freeze the routed experts in e4m3 with (128, 128) block scales (DeepSeek-V3's checkpoint
        format), in place: ``w_gate_up`` and ``w_down`` become float8_e4m3fn buffers beside their
        float32 scales ``w_gate_up_scale`` and ``w_down_scale`` (with split_gate_up, ``w_gate`` and
        ``w_up`` each with its own: ``w_gate_scale``, ``w_up_scale``), and the forward runs the fp8 GEMMs
        (activations quantized (1, 128) on the fly). For inference, or LoRA fine-tuning
        (``lora_rank``) on the frozen e4m3 experts; a DeepSeek-V3 checkpoint's own e4m3 weights and
        ``weight_scale_inv`` load into these buffers. H and I multiples of 128. Cast the layer
        (``moe.to(dtype)``) before, not after: ``Module.to`` would cast the e4m3 buffers too."""
        if self.w_down.dtype == FP8:
            return
        if self.hidden_size % 128 or self.intermediate_size % 128:
            raise ValueError(f"quantize_experts needs hidden_size and intermediate_size multiples of 128, got "
                             f"{self.hidden_size} and {self.intermediate_size}")
        if self.precision is not None or self.group is not None:
            raise ValueError("quantize_experts freezes the experts: not with precision='fp8' or expert parallelism")
        from .fp8 import quantize_fp8

        self.experts_dtype = self.w_down.dtype
        for name in (*self._gate_up_names, "w_down"):  # w_gate and w_up each with its own blocks
            q, scale = quantize_fp8(getattr(self, name).detach(), (128, 128), backend=self.backend)
            delattr(self, name)
            self.register_buffer(name, q)
            setattr(self, f"{name}_scale", scale)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits [T, E], topk_weights [T, k] float32, topk_ids [T, k] int32) of x [T, H]."""
        # With router_dtype set, autocast off: bf16 logits gave 63 of 2,048 tokens another expert
        # set (H = 64, E = 64 sigmoid scores in 8 groups, 4 kept, top-8: DeepSeek-V3's router).
        with _autocast.disabled(x.device.type) if self.router_dtype is not None else contextlib.nullcontext():
            logits = self.gate(x.to(self.gate.weight.dtype))
        weights, ids = topk_routing(
            logits, self.top_k, scoring=self.scoring, renormalize=self.renormalize,
            bias=self.e_score_correction_bias, n_group=self.n_group, topk_group=self.topk_group,
            routed_scaling_factor=self.routed_scaling_factor, backend=self.backend)
        return logits, weights, ids

    def extra_repr(self) -> str:
        groups = f"n_group={self.n_group}, topk_group={self.topk_group}, " if self.n_group is not None else ""
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation!r}, "
                f"scoring={self.scoring!r}, {groups}renormalize={self.renormalize}, "
                f"routed_scaling_factor={self.routed_scaling_factor}, num_shared_experts={self.num_shared_experts}, "
                f"correction_bias={self.e_score_correction_bias is not None}"
                + (f", precision={self.precision!r}" if self.precision else "")
                + (f", lora_rank={self.lora_rank}, lora_scale={self.lora_scale:g}" if self.lora_rank else "")
                + (", split_gate_up=True" if self.split_gate_up else "")
                + (", experts in float8_e4m3fn" if self.w_down_scale is not None else "")
                + (f", local experts {self.expert_offset}..{self.expert_offset + self.num_local_experts - 1}"
                   if self.group is not None else ""))

    def _check_input(self, x) -> None:
        """Name the input as the cause: fused_moe's own checks would blame the layer's weights.
        Under autocast x's dtype may differ from the layer's where autocast casts both to its
        dtype (_autocast.cast_dtype), as fused_moe then does: an fp32 layer takes an autocast
        nn.Linear's bf16 output."""
        _checks.tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        dtype = self.w_down.dtype
        if dtype == FP8:  # e4m3 experts (quantize_experts) compute in the adapters' or the former weights' dtype
            dtype = self.lora_a1.dtype if self.lora_rank else self.experts_dtype
        if _autocast.cast_dtype(x.dtype, x.device.type) != _autocast.cast_dtype(dtype, x.device.type):
            raise TypeError(f"x has dtype {str(x.dtype).removeprefix('torch.')} but the layer's parameters are "
                            f"{str(dtype).removeprefix('torch.')}: cast the input "
                            f"(x.to({dtype})) or the layer (moe.to(...))")
        if x.device != self.w_down.device:
            raise ValueError(f"x is on {x.device} but the layer's parameters are on {self.w_down.device}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        logits, weights, ids = self.route(x2)
        if self.group is None:
            scales = self._gate_up("_scale")
            y = fused_moe(x2, self._gate_up_arg(self._gate_up()), self.w_down, weights, ids,
                          activation=self.activation, w_down_scale=self.w_down_scale,
                          w_gate_up_scale=self._gate_up_arg(scales) if scales[0] is not None else None,
                          precision=self.precision, lora=self.lora(), backend=self.backend)
        else:
            y = self._expert_parallel(x2, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x2)
        if self.training:
            self.aux_loss = load_balancing_loss(logits, ids, self.num_experts, backend=self.backend)
            self.z_loss = router_z_loss(logits, backend=self.backend)
            plain = self.e_score_correction_bias is None and (self.n_group or 1) == 1
            self.seq_aux_loss = sequence_balance_loss(
                logits, ids if plain else logits.topk(self.top_k, dim=-1).indices, self.num_experts,
                max(shape[-2] if x.dim() > 2 else x2.shape[0], 1), scoring=self.scoring)
            if self.expert_load is not None:
                with torch.no_grad():
                    self.expert_load += reference.pair_counts(ids, self.num_experts, torch.int64)
        return y.view(shape)

    def update_bias(self) -> None:
        """DeepSeek-V3's end-of-step bias update from the loads counted since the last call
        (:func:`update_correction_bias` with ``bias_update_rate``), then zero the counts."""
        if self.e_score_correction_bias is None:
            raise ValueError("update_bias needs correction_bias=True: this MoE has no e_score_correction_bias")
        update_correction_bias(self.e_score_correction_bias, self.expert_load, self.bias_update_rate)
        self.expert_load.zero_()

    def _expert_parallel(self, x, weights, ids):
        """dispatch -> the local experts (two grouped GEMMs over the received rows) -> combine."""
        from .distributed import combine, dispatch
        from .grouped_gemm import grouped_mm, grouped_mm_fused

        handle, x_local = dispatch(x, ids, weights, self.num_experts, self.group, self.capacity)
        offs = handle.expert_offsets
        h = grouped_mm_fused(x_local, self.w_gate_up.transpose(1, 2), offs, activation=self.activation,
                             backend=self.backend)
        y_local = grouped_mm(h, self.w_down.transpose(1, 2), offs, backend=self.backend)
        self.dropped = handle.dropped
        return combine(y_local, handle)
