"""Fused expert routing: scores, group selection, top-k, renormalisation, in one kernel.

A program routes BLOCK_T tokens. Each token's E logits are held as a [BLOCK_R, BLOCK_C] tile
of rows of ``row_len`` experts. With groups a row is a group, so expert groups of any
size (DeepSeek-V2: 160 = 8 x 20) are plain row reductions; without groups a row is 32 experts.

Triton gives the lanes, then the warps, to the fastest dim first, and the tile's order puts the
tokens before the rows. A row wider than a warp's 32 lanes, or lanes left over for the rows,
spreads a token over several warps, and every reduction then goes through shared memory and
barriers (18 barriers and 81 shared-memory accesses per token at E = 128, seen in the sm_90
SASS). So rows hold at most 32 experts and every reduction stays inside a warp:

* ``ROW`` = 0 (the fallback): ``row_len`` stays a run-time value (``do_not_specialize``), so the
  loads are not vectorised, the 32 lanes span a row and a warp takes a token.
* ``ROW`` = 32 (configs.route_config: fp32 logits on 16-byte rows): the loads are 16 bytes, a
  thread holds 4 adjacent experts of every row, 8 lanes span a row and a warp takes 4 tokens.
  A row reduction is 3 shuffle steps instead of 5, and each instruction serves 4 tokens.

Either way a thread holds its columns of every row, so a reduction over the rows, picking a row
or copying rows is register work (``_row``).

Selection uses an int32 key per expert: the float32 choice mapped to an order-preserving int32
(-0.0 folded onto +0.0). A pick is a max-reduction of the keys, then a min-reduction of the ids
of the experts holding that max: the tie goes to the lower id, and that one expert is retired
(its key set below every real key, -inf's included) and its score read from the tile. (One
int64 key of (choice, E - 1 - id) did both in one reduction, but every int64 max, compare and
select is 2 instructions: twice the work per expert per pick.) With groups, the kept groups
are copied into ``SLOTS`` slots in id order first, so the picks scan KEPT groups, not all.

Non-finite logits follow reference.py's policy: ``_sanitize`` where a logit is loaded (NaN ->
-inf, +inf -> FLT_MAX: a select and a min per element, no extra pass over memory); sigmoid
scores fold it into their own select (``_sigmoid``), and with a bias sanitize the bias instead.
"""

import triton
import triton.language as tl

from ..reference import EXP_MAX, EXP_MIN, FLT_MAX
from ._math import INTERPRET, exp_f32, exp_f32_in_range, order_key

# Key of an ineligible expert: below order_key(-inf) = -2139095041, and no sanitized choice is NaN.
_NONE: tl.constexpr = tl.constexpr(-2147483648)
_NO_EXPERT: tl.constexpr = tl.constexpr(2147483647)
_FLT_MAX: tl.constexpr = tl.constexpr(FLT_MAX)
_EXP_MIN: tl.constexpr = tl.constexpr(EXP_MIN)
_EXP_MAX: tl.constexpr = tl.constexpr(EXP_MAX)


@triton.jit
def _sanitize(x):
    """reference.sanitize_logits: NaN -> -inf, +inf -> FLT_MAX, -inf and finite values kept."""
    return tl.where(x != x, float("-inf"), tl.minimum(x, _FLT_MAX))


@triton.jit
def _sigmoid(x):
    """reference.routing_scores' sigmoid of _sanitize(x), bit for bit, from the raw logit x:
    1 / (1 + exp_f32(-x)) with exp_f32's two selects and _sanitize folded into one. Below
    EXP_MIN (x > 87, +inf) the clamped exp is 1.6e-38 and 1 + it rounds to 1, as 1 + 0 does; x
    below -EXP_MAX (exp inf, sigmoid 0), -inf and NaN (sanitized to -inf) fail x >= -EXP_MAX.
    (-4 selects, compares and mins an expert: DeepSeek-V3 x 32 a thread.)"""
    xc = tl.minimum(tl.maximum(x, -_EXP_MAX), -_EXP_MIN)  # -xc: exp_f32's clamp of -x
    if INTERPRET:  # numpy's maximum keeps a NaN and warns casting it to int; the select drops it
        xc = tl.where(x != x, 0.0, xc)
    e = exp_f32_in_range(xc, NEG=True)
    return tl.where(x >= -_EXP_MAX, tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + e), 0.0)


@triton.jit
def _top2(a1, a2, b1, b2):
    """Combine two (largest, second largest) pairs: the top two of a multiset (a tie gives
    top1 == top2, like reference's topk(2)). choice has no NaN."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _row(x, row, g: tl.constexpr):
    """x[:, g, :] of an int32 [T, R, C] tile whose rows are in-thread: where + sum fold to
    register moves once compiled (a float sum would keep its + 0.0)."""
    return tl.sum(tl.where(row[None, :, None] == g, x, 0), axis=1)


@triton.jit
def _row_f32(x, row, g: tl.constexpr):
    return _row(x.to(tl.int32, bitcast=True), row, g).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["row_len"])
def topk_routing_kernel(
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    num_tokens, num_experts, stride_t, top_k,
    n_group, row_len, topk_group, routed_scaling_factor, denom_scale,
    SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr, RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr, K_IN_TILE: tl.constexpr,
    ROW: tl.constexpr, FULL: tl.constexpr, KEPT: tl.constexpr, SLOTS: tl.constexpr,
):
    if ROW > 0:  # known rows: 16-byte loads, and the layout they bring (see the module doc)
        row_len = ROW
    # int64 token offsets: T * E passes 2**31 at 2M tokens of 1024 experts.
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    row = tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_C)
    expert = row[:, None] * row_len + col[None, :]  # [R, C]
    if FULL:  # E = BLOCK_R * BLOCK_C in rows of BLOCK_C: no padding expert, no masks
        valid = tl.full([BLOCK_R, BLOCK_C], 1, tl.int1)
    else:
        valid = (col[None, :] < row_len) & (expert < num_experts)
    tmask = tok < num_tokens
    ptrs = logits_ptr + tok[:, None, None] * stride_t + expert[None, :, :]
    raw = tl.load(ptrs, mask=tmask[:, None, None] & valid[None, :, :], other=0.0).to(tl.float32)
    # Padding experts get -inf: a zero score, and never chosen. Padding tokens keep 0 logits,
    # so their (unstored) rows stay finite.
    raw = tl.where(valid[None, :, :], raw, float("-inf"))
    x = _sanitize(raw)  # unused (compiled out) by sigmoid with a bias, which ranks the scores

    if SOFTMAX:
        row_max = tl.max(tl.max(x, axis=1), axis=1)
        # A row of -inf (all NaN / -inf logits): 0, so every exp is 0 and the weights 0 / 0 = NaN
        # on every backend (-inf - -inf would put NaN into exp_f32, whose clamp differs there).
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        # reference.softmax_scores: the exps scaled by 2**s (exact), their integer parts summed in
        # float64. Every partial sum is an integer <= 2**53, exact, so tl.sum's order (unspecified,
        # numpy's when interpreting) cannot change the bits; rounded once to float32.
        e = exp_f32(x - row_max[:, None, None]) * denom_scale
        denom = tl.sum(tl.sum(tl.floor(e).to(tl.float64), axis=1), axis=1).to(tl.float32)
        scores = tl.math.div_rn(e, denom[:, None, None])
    else:
        scores = _sigmoid(raw if HAS_BIAS else x)  # no bias: x is live anyway (ranked)

    if HAS_BIAS:
        b = tl.load(bias_ptr + expert, mask=valid, other=0.0)
        if SOFTMAX:
            choice = _sanitize(scores + b[None, :, :])  # NaN scores of a row with no softmax
        else:  # the same for scores in [0, 1] (FLT_MAX + 1 rounds to FLT_MAX), on the bias as loaded:
            choice = scores + _sanitize(b)[None, :, :]  # (1 element a thread, before its conversion)
        choice = tl.where(valid[None, :, :], choice, float("-inf"))
    else:
        choice = x  # softmax and sigmoid are monotone: rank the logits, no rounding involved
    if GROUPED:
        if HAS_BIAS:  # DeepSeek-V3: a group scores the sum of its two best experts
            top1, top2 = tl.reduce((choice, tl.full(choice.shape, float("-inf"), tl.float32)), 2, _top2)
            group_score = top1 + top2
        else:  # DeepSeek-V2: a group scores its best expert
            group_score = tl.max(choice, axis=2)
        gkey = tl.where(row[None, :] < n_group, order_key(group_score + 0.0), _NONE)
        # KEPT max-and-retire rounds, unrolled. (A rank of 8 x 8 in-thread compares counted the
        # same, 907, and left DeepSeek-V2 an 8-byte stack frame.)
        keep = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.int1)
        for _ in tl.static_range(KEPT):
            gbest = tl.max(gkey, axis=1)
            g = tl.min(tl.where(gkey == gbest[:, None], row[None, :], BLOCK_R), axis=1)
            picked = row[None, :] == g[:, None]
            keep = keep | picked
            gkey = tl.where(picked, _NONE, gkey)
        if SLOTS < BLOCK_R:
            # The picks scan only the kept groups: slot s of a [BLOCK_T, SLOTS, BLOCK_C] tile
            # holds the s-th kept group, so the slots keep the groups' order and a tie on the
            # tile's index is a tie on the expert id. A thread holds its columns of every row,
            # so the copy is register selects (DeepSeek-V3: 8 rows -> 4 slots, half the picks' work).
            kept = keep.to(tl.int32)
            first = tl.zeros([BLOCK_T, BLOCK_R], dtype=tl.int32)  # kept groups before a row: its slot
            for h in tl.static_range(BLOCK_R - 1):  # (tl.cumsum went through shared memory)
                first += tl.where(h < row[None, :], tl.sum(tl.where(row[None, :] == h, kept, 0), axis=1)[:, None], 0)
            slot_of = tl.where(keep, first, SLOTS)
            sl = tl.arange(0, SLOTS)
            c_choice = tl.zeros([BLOCK_T, SLOTS, BLOCK_C], tl.float32)
            c_score = tl.zeros([BLOCK_T, SLOTS, BLOCK_C], tl.float32)  # (compiled out by RELOAD)
            c_group = tl.zeros([BLOCK_T, SLOTS], tl.int32)
            for r in tl.static_range(BLOCK_R):
                # Row r can only fill the slots KEPT - BLOCK_R + r ..= r: constant-false selects fold
                # away (DeepSeek-V3: 20 of 32 row-slot pairs left).
                into = tl.sum(tl.where(row[None, :] == r, slot_of, 0), axis=1)[:, None] == sl[None, :]
                into = into & ((sl <= r) & (sl >= KEPT - BLOCK_R + r))[None, :]
                c_group = tl.where(into, r, c_group)
                c_choice = tl.where(into[:, :, None], _row_f32(choice, row, r)[:, None, :], c_choice)
                c_score = tl.where(into[:, :, None], _row_f32(scores, row, r)[:, None, :], c_score)
            choice, scores = c_choice, c_score
            expert = c_group[:, :, None] * row_len + col[None, None, :]
            # slots past KEPT (DeepSeek-V2 keeps 3 in 4) and columns past a group's size
            valid = (sl[:, None] < KEPT) & ((col[None, :] < row_len) | FULL)
        else:
            valid = valid[None, :, :] & keep[:, :, None]
            expert = expert[None, :, :]
    else:
        valid = valid[None, :, :]
        expert = expert[None, :, :]
    key = tl.where(valid, order_key(choice + 0.0), _NONE)

    # top_k <= BLOCK_K (config: up to 32): the picks gather in a [BLOCK_T, BLOCK_K] register tile,
    # stored once. With sigmoid scores the picks gather only the ids, and the weights are the
    # sigmoids of the picked logits, reloaded (the block just read them: L1 / L2) into that tile:
    # a sigmoid a thread at DeepSeek-V3 ([32, 8] over 256 threads) instead of summing each pick's
    # score out of the score tile (16 selects, 15 adds and 3 shuffle steps a pick, and the copy of
    # the scores into the slots). Larger top_k stores each pick as it is made (a tile would cost
    # top_k * BLOCK_K selects per token, 1M at top_k = 1024, and spill) and renormalises by
    # reading the row back.
    out = tok * top_k
    slot = tl.arange(0, BLOCK_K)
    tile_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    tile_id = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    total = tl.zeros([BLOCK_T], dtype=tl.float32)
    RELOAD: tl.constexpr = K_IN_TILE and not SOFTMAX
    for j in range(top_k):
        # Rows first: each thread holds its columns of every row, so this order shuffles once
        # per token instead of once per row.
        kbest = tl.max(tl.max(key, axis=1), axis=1)
        eid = tl.min(tl.min(tl.where(key == kbest[:, None, None], expert, _NO_EXPERT), axis=1), axis=1)
        hit = expert == eid[:, None, None]
        key = tl.where(hit, _NONE, key)
        if RELOAD:
            tile_id = tl.where(slot[None, :] == j, eid[:, None], tile_id)
        elif K_IN_TILE:
            w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=1)
            total += w
            tile_w = tl.where(slot[None, :] == j, w[:, None], tile_w)
            tile_id = tl.where(slot[None, :] == j, eid[:, None], tile_id)
        else:
            w = tl.sum(tl.sum(tl.where(hit, scores, 0.0), axis=1), axis=1)
            total += w
            if not RENORMALIZE:
                w = w * routed_scaling_factor
            tl.store(weights_ptr + out + j, w, mask=tmask)
            tl.store(ids_ptr + out + j, eid, mask=tmask)

    if RELOAD:
        m = tmask[:, None] & (slot[None, :] < top_k)
        picked = tl.load(logits_ptr + tok[:, None] * stride_t + tile_id, mask=m, other=0.0)
        tile_w = tl.where(m, _sigmoid(picked.to(tl.float32)), 0.0)
        for j in tl.static_range(BLOCK_K):  # in pick order, as the loop above adds (+ 0.0 past top_k)
            total += tl.reshape(tl.gather(tile_w, tl.full([BLOCK_T, 1], j, tl.int32), axis=1), [BLOCK_T])
    if RENORMALIZE:
        norm = routed_scaling_factor / (total + 1e-20)
    else:
        norm = tl.full([BLOCK_T], 1.0, tl.float32) * routed_scaling_factor
    if K_IN_TILE:
        offs = out[:, None] + slot[None, :]
        m = tmask[:, None] & (slot[None, :] < top_k)
        tl.store(weights_ptr + offs, tile_w * norm[:, None], mask=m)
        tl.store(ids_ptr + offs, tile_id, mask=m)
    elif RENORMALIZE:
        tl.debug_barrier()  # the weights this block just stored are read back below
        for k0 in range(0, top_k, BLOCK_K):
            slot_k = k0 + slot
            offs = out[:, None] + slot_k[None, :]
            m = tmask[:, None] & (slot_k[None, :] < top_k)
            w = tl.load(weights_ptr + offs, mask=m, other=0.0)
            tl.store(weights_ptr + offs, w * norm[:, None], mask=m)


@triton.jit
def router_loss_kernel(logits_ptr, ids_ptr, prob_sum_ptr, count_ptr, z_ptr,
                       num_tokens, num_experts, top_k, stride_t,
                       ACC: tl.constexpr, BALANCE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per-program partial sums of the router losses over BLOCK_T tokens, in a program's own row
    (the launcher sums the rows in a fixed order: no atomics, deterministic).

    BALANCE: the column sums of softmax(logits) and the expert counts of the ids (an id outside
    [0, E) matches no column). Otherwise: the sum of logsumexp(logits)**2.
    """
    pid = tl.program_id(0)
    t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    t64 = t.to(tl.int64)
    ex = tl.arange(0, BLOCK_E)
    m = t_ok[:, None] & (ex < num_experts)[None, :]
    x = tl.load(logits_ptr + t64[:, None] * stride_t + ex[None, :], mask=m, other=float("-inf")).to(ACC)
    row_max = tl.where(t_ok, tl.max(x, axis=1), 0.0)
    p = tl.exp(x - row_max[:, None])
    total = tl.where(t_ok, tl.sum(p, axis=1), 1.0)
    if BALANCE:
        tl.store(prob_sum_ptr + pid * BLOCK_E + ex, tl.sum(p / total[:, None], axis=0))
        counts = tl.zeros([BLOCK_E], dtype=tl.int32)
        for j in range(top_k):
            e = tl.load(ids_ptr + t64 * top_k + j, mask=t_ok, other=-1)
            counts += tl.sum((e[:, None] == ex[None, :]).to(tl.int32), axis=0)
        tl.store(count_ptr + pid * BLOCK_E + ex, counts)
    else:
        lse = row_max + tl.log(total)
        tl.store(z_ptr + pid, tl.sum(tl.where(t_ok, lse * lse, 0.0), axis=0))
