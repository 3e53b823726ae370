"""Expert parallelism over torch.distributed: each rank holds E / world_size experts, in contiguous
blocks (rank r holds experts r*E_loc .. (r+1)*E_loc - 1), and the (token, slot) pairs travel to
their expert's rank and back by all-to-all.

    handle, x_local = dispatch(x, topk_ids, topk_weights, num_experts, group=None, capacity=None)
    y = combine(y_local, handle)
    handle, (x_q, x_scale) = dispatch(..., fp8=True)      # e4m3 rows and (1, 128) scales on the wire
    x_local = dequantize((x_q, x_scale), handle)          # straight-through to x, if it needs one

``dispatch``: the plan over the E global experts sorts the pairs by expert, which also groups
them by destination rank (``plan_routing``, ``permute``); one all-to-all of the rows; on the
receiving rank a plan over its E_loc experts sorts the rows received from every rank by local
expert, ready for ``grouped_mm`` / ``fused_moe``-style kernels over ``handle.expert_offsets``.
``combine`` undoes each step and applies the router weights in the weighted sum over k
(``unpermute``): its result equals the single-process ``unpermute`` of the same rows.

Both are differentiable: the all-to-all's backward is the reverse all-to-all, and the other steps
are the library's ops with their own backward, so dispatch's backward is a combine without
weights and combine's a dispatch. Gradients reach x, topk_weights and the local expert weights.

Host sync. An all-to-all of variable rows needs the split sizes on the host: the default mode
exchanges each rank's per-expert counts (one small all-to-all of [world, E_loc + 2] int32, also
carrying x's dtype and H for a check across ranks) and reads it back: one host sync per layer.
``capacity=C`` instead sends exactly C rows to every rank (C * world rows, zero-padded), with no
host sync: pairs past C for a destination are dropped, contribute nothing to ``combine``, and are
counted in ``handle.dropped`` (an int64 tensor on the device, never hidden).

FP8 (``fp8=True``, DeepSeek-V3's dispatch). The rows are quantized to e4m3 in (1, 128) tiles as
they are gathered into expert order (``quantize_fp8_gathered``: never written in bf16), and a row
travels as its H bytes followed by its H / 128 float32 scales, in one uint8 all-to-all: 7,392 B a
row at H = 7168 against 14,336 in bf16 (0.516x; 0.258x of float32 rows). ``combine`` stays in
the rows' dtype. Quantization has no gradient: the (q, scale) pair is not differentiable, and
``dequantize`` gives the rows in x's dtype with a straight-through gradient, whose backward is the
reverse exchange of the gradient in x's dtype (as DeepSeek-V3's backward all-to-all is bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import _checks
from .fp8 import FP8, QUANT_INPUTS, dequantize_fp8, quantize_fp8_gathered
from .permute import permute, unpermute
from .plan import RoutingPlan, plan_routing

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
_FP8_CODE = len(_DTYPE_CODES)  # added to the dtype code in the count exchange by fp8 dispatch
# DeepSeek-V3's activation tiles: a scale per token per 128 channels.
_FP8_TILE = 128


class _AllToAll(torch.autograd.Function):
    """torch.distributed's all_to_all_single, differentiable: the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits) if out_splits is not None else x.shape[0], *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


@dataclass
class DispatchHandle:
    """What ``combine`` (and the local experts) need from ``dispatch``.

    Attributes:
        plan: the source rank's plan of its T*k pairs over the E global experts.
        topk_weights: [T, k] router weights, applied in ``combine``.
        expert_offsets: [E_loc] int32 cumulative ends of the local experts' rows in ``x_local``.
        local_plan: the sort of the received rows by local expert (k = 1; with a capacity, the
            padding rows are one more expert, after the real ones).
        send_splits, recv_splits: rows sent to / received from each rank (host ints); None with
            a capacity (C each).
        capacity: C, or None.
        slots: with a capacity, [T*k] the send-buffer row of each sorted pair (world * C: not sent).
        dropped: int64 [] pairs dropped by the capacity on this rank (0 without one).
        num_experts, num_local_experts, group: E, E_loc and the process group.
        x: with fp8, the x dispatched (``dequantize``'s straight-through gradient goes to it).
    """

    plan: RoutingPlan
    topk_weights: torch.Tensor
    expert_offsets: torch.Tensor
    local_plan: RoutingPlan
    send_splits: list[int] | None
    recv_splits: list[int] | None
    capacity: int | None
    slots: torch.Tensor | None
    dropped: torch.Tensor
    num_experts: int
    num_local_experts: int
    group: object
    x: torch.Tensor | None = None


def world_and_rank(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("moekernels.distributed needs an initialized torch.distributed process group: call "
                           "torch.distributed.init_process_group first (group=None means the default group)")
    return dist.get_world_size(group), dist.get_rank(group)


def _local_ids(recv_counts: torch.Tensor, rows: int, pad_to: int | None) -> torch.Tensor:
    """The local expert of each received row: the rows from rank s come as recv_counts[s, j] rows of
    expert j, in order. With ``pad_to`` = C, rank s's rows sit at s*C .. s*C + sum_j - 1 and the
    rest are padding, expert E_loc."""
    world, num_local = recv_counts.shape
    device = recv_counts.device
    if pad_to is None:
        experts = torch.arange(num_local, device=device).repeat(world)
        return torch.repeat_interleave(experts, recv_counts.reshape(-1).long(), output_size=rows)
    ends = recv_counts.long().cumsum(1)  # [world, E_loc] within each rank's C rows
    i = torch.arange(pad_to, device=device)
    expert = (ends.unsqueeze(1) <= i.view(1, -1, 1)).sum(-1)  # [world, C]: E_loc past the rank's rows
    return expert.reshape(-1)


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int, group=None,
             capacity: int | None = None, fp8: bool = False):
    """Send each (token, slot) pair's row of x to the rank that owns its expert.

    Args:
        x: [T, H] this rank's tokens (T may differ across ranks, and be 0).
        topk_ids: [T, k] int32 / int64 global expert ids in [0, E).
        topk_weights: [T, k] router weights (kept for ``combine``).
        num_experts: E, divisible by the world size; rank r owns experts r*E/W .. (r+1)*E/W - 1.
        group: the process group (None: the default one).
        capacity: None (exchange the counts: a host sync), or C rows per pair of ranks (no sync;
            overflow dropped and counted in ``handle.dropped``).
        fp8: send e4m3 rows quantized in (1, 128) tiles with their float32 scales (H + H / 32
            bytes a row instead of 2H in bf16); x float32, bfloat16 or float16 with H % 128 == 0.

    Returns:
        (handle, x_local): x_local [rows received, H] sorted by local expert, its segments
        ``handle.expert_offsets`` (with a capacity, the padding rows come last, past
        ``expert_offsets[-1]``, and are zero). Differentiable with respect to x.
        With ``fp8``, x_local is the pair (q [rows, H] float8_e4m3fn, scale [rows, H / 128]
        float32), bit for bit ``quantize_fp8(rows, (1, 128))`` of the rows the default path
        returns (padding rows: q and scale 0), ready for ``fp8_grouped_mm`` with (128, 128)
        weight scales. Not differentiable: ``dequantize(x_local, handle)`` is, straight through.
    """
    _checks.tensor("x", x, ndim=2, dtypes=QUANT_INPUTS if fp8 else tuple(_DTYPE_CODES))
    if fp8 and x.shape[1] % _FP8_TILE:
        raise ValueError(f"fp8 dispatch quantizes x in (1, {_FP8_TILE}) tiles: x's H must be a multiple of "
                         f"{_FP8_TILE}, got x of shape {tuple(x.shape)}")
    world, _ = world_and_rank(group)
    _checks.integer("num_experts", num_experts, low=1)
    if num_experts % world:
        raise ValueError(f"num_experts={num_experts} must be divisible by the world size {world}: experts are split "
                         f"in equal contiguous blocks across ranks")
    if capacity is not None:
        _checks.integer("capacity", capacity, low=1)
    num_local = num_experts // world
    plan = plan_routing(topk_ids, num_experts)
    if fp8:  # [T*k, H + 4H/128] bytes: each sorted row's e4m3 values, then its scales
        q, scale = quantize_fp8_gathered(x.detach(), plan, (1, _FP8_TILE))
        rows = torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], 1)
    else:
        rows = permute(x, plan)  # [T*k, H], by global expert: by destination rank too
    counts = plan.expert_counts.view(world, num_local)
    code = _DTYPE_CODES[x.dtype] + (_FP8_CODE if fp8 else 0)
    meta = torch.tensor([code, x.shape[1]], dtype=torch.int32, device=x.device)
    send_meta = torch.cat([counts, meta.expand(world, 2)], 1).contiguous()
    if capacity is not None:  # the counts this rank will actually send: each destination cut at C
        before = counts.cumsum(1) - counts
        send_meta[:, :num_local] = (capacity - before).clamp(min=0).minimum(counts)
    recv_meta = torch.empty_like(send_meta)
    dist.all_to_all_single(recv_meta, send_meta, group=group)
    if capacity is None:
        both = torch.cat([recv_meta, send_meta]).tolist()  # the one host sync of the default mode
        _check_peers(both[:world], x, fp8)
        recv_splits = [sum(r[:num_local]) for r in both[:world]]
        send_splits = [sum(r[:num_local]) for r in both[world:]]
        received = _AllToAll.apply(rows[:sum(send_splits)], recv_splits, send_splits, group)
        local_ids = _local_ids(recv_meta[:, :num_local], sum(recv_splits), None)
        slots, dropped = None, torch.zeros((), dtype=torch.int64, device=x.device)
        local_experts = num_local
    else:
        if _checks.debug():
            _check_peers(recv_meta.tolist(), x, fp8)
        send, slots, dropped = _pack(rows, plan, world, num_local, capacity)
        received = _AllToAll.apply(send, None, None, group)
        local_ids = _local_ids(recv_meta[:, :num_local], world * capacity, capacity)
        send_splits = recv_splits = None
        local_experts = num_local + 1  # the padding rows: one more expert, after the real ones
    local_plan = plan_routing(local_ids.view(-1, 1).int(), local_experts)
    if fp8:  # k = 1: local row r is received row source_index[r]; each part gathered straight to contiguous
        order, hidden = local_plan.source_index.long(), x.shape[1]
        x_local = (received[:, :hidden].index_select(0, order).view(FP8),
                   received[:, hidden:].index_select(0, order).view(torch.float32))
    else:
        x_local = permute(received, local_plan)
    handle = DispatchHandle(plan, topk_weights, local_plan.expert_offsets[:num_local], local_plan, send_splits,
                            recv_splits, capacity, slots, dropped, num_experts, num_local, group,
                            x if fp8 else None)
    return handle, x_local


def _check_peers(recv_meta: list[list[int]], x: torch.Tensor, fp8: bool) -> None:
    """Every rank's x has this rank's dtype and H, and every rank the same fp8 (read from the count
    exchange)."""
    codes = {code: dtype for dtype, code in _DTYPE_CODES.items()}
    for src, row in enumerate(recv_meta):
        code, hidden = row[-2], row[-1]
        if code != _DTYPE_CODES[x.dtype] + (_FP8_CODE if fp8 else 0) or hidden != x.shape[1]:
            raise ValueError(f"x differs across ranks: rank {src} has dtype {codes.get(code % _FP8_CODE)}, H={hidden} "
                             f"and fp8={code >= _FP8_CODE}, this rank {x.dtype}, H={x.shape[1]} and fp8={fp8}")


def _pack(rows, plan, world, num_local, capacity):
    """The [world * C, H] send buffer of the capacity mode: destination d's first C sorted rows at
    d*C .. d*C + C - 1, zeros after. Returns it, each sorted row's slot (-1: not sent) and the
    number of pairs dropped (by the capacity; pairs with ids outside [0, E) are not counted)."""
    num_pairs = rows.shape[0]
    offsets = plan.expert_offsets.long()
    r = torch.arange(num_pairs, device=rows.device)
    expert = torch.searchsorted(offsets, r, right=True)  # E for the dropped ids past offsets[-1]
    dest = (expert // num_local).clamp(max=world - 1)
    rank_ends = offsets.view(world, num_local)[:, -1]
    rank_starts = rank_ends - plan.expert_counts.view(world, num_local).long().sum(1)
    within = r - rank_starts[dest]
    valid = expert < offsets.shape[0]
    keep = valid & (within < capacity)
    # Rows not sent go to one spare row past the buffer, cut off after: no boolean indexing (its
    # output size would need a host sync).
    slots = torch.where(keep, dest * capacity + within, world * capacity)
    send = rows.new_zeros(world * capacity + 1, rows.shape[1]).index_put((slots,), rows)[:-1]
    dropped = (valid & ~keep).sum()
    return send, slots, dropped


def combine(y_local: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Send the local experts' rows back and apply the router weights: y [T, H] on the rank that
    dispatched, equal to the single-process ``unpermute`` of the same rows. Pairs that were not
    sent (dropped by a capacity, or ids outside [0, E)) contribute nothing. Differentiable."""
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle must be the DispatchHandle of dispatch, got {type(handle).__name__}")
    return _combine(y_local, handle, None)


def _combine(y_local, handle, weights):
    local = handle.local_plan
    if y_local.dim() != 2 or y_local.shape[0] != local.source_index.shape[0]:
        raise ValueError(f"y_local must be [{local.source_index.shape[0]}, H] (the rows of x_local), got "
                         f"{tuple(y_local.shape)}")
    ones = torch.ones(y_local.shape[0], 1, dtype=torch.float32, device=y_local.device)
    received_order = unpermute(y_local, local, ones)  # back to the order the rows arrived in
    back = _AllToAll.apply(received_order, handle.send_splits, handle.recv_splits, handle.group)
    num_pairs, hidden = handle.plan.source_index.shape[0], y_local.shape[1]
    if handle.capacity is None:
        y_sorted = torch.cat([back, back.new_zeros(num_pairs - back.shape[0], hidden)])
    else:  # the rows not sent read the zero row appended at world * C
        y_sorted = torch.cat([back, back.new_zeros(1, hidden)]).index_select(0, handle.slots)
    return unpermute(y_sorted, handle.plan, handle.topk_weights if weights is None else weights)


class _Fp8StraightThrough(torch.autograd.Function):
    """The dequantized rows, with the gradient of the rows the bf16 path would have sent: a combine
    without router weights (the reverse exchange, summed over each token's k pairs)."""

    @staticmethod
    def forward(ctx, x, q, scale, handle):
        ctx.handle = handle
        return dequantize_fp8(q, scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.handle.plan
        ones = torch.ones(plan.source_index.shape[0] // plan.top_k, plan.top_k, dtype=torch.float32,
                          device=grad.device)
        return _combine(grad, ctx.handle, ones), None, None, None


def dequantize(x_local, handle: DispatchHandle) -> torch.Tensor:
    """The rows of an fp8 dispatch in x's dtype, ``q * scale`` (an expert layer that does not take
    the fp8 pair; padding rows 0). Differentiable with respect to the x given to ``dispatch``,
    straight through the quantization: x's gradient is what the default path gives for the same
    gradient of x_local, sent back in x's dtype."""
    if not isinstance(handle, DispatchHandle) or handle.x is None:
        raise TypeError("handle must be the DispatchHandle of dispatch(..., fp8=True)")
    if not (isinstance(x_local, (tuple, list)) and len(x_local) == 2):
        raise TypeError("x_local must be the (q, scale) pair of dispatch(..., fp8=True)")
    q, scale = x_local
    return _Fp8StraightThrough.apply(handle.x, q, scale, handle)
