"""The routing plan: a stable counting sort of the (token, slot) pairs by expert.

Three passes over the T*k pairs, split into chunks of BLOCK_N pairs (one program each), in the
order of a radix-sort pass; no atomics, so the plan is the same bits on every run:
1. ``plan_count_kernel``: each chunk's expert histogram, into its own row of ``partial``.
2. ``plan_scan_kernel``: per expert, the exclusive prefix of those rows over the chunks, in
   place, and the expert totals.
3. ``plan_scatter_kernel``: each pair's row = its expert's start + the earlier chunks' pairs of
   that expert + its rank among the same expert's pairs in its own chunk. The rank is a cumsum
   over a [SUB, BLOCK_E] one-hot tile, so within an expert the order is the pair order (stable).
When one chunk holds every pair (decode), pass 3 alone does it all (``SINGLE``): one launch.
``plan_pad_kernel`` then builds the block-padded layout, NB blocks of B rows per program.

A pair whose id is outside [0, E) is dropped: it is ranked as one more expert, E, after all
the others, and counts for none. Partial rows have E + 1 columns, the last for the dropped.
"""

import triton
import triton.language as tl


@triton.jit
def _pair_keys(ids_ptr, first, num_pairs, num_experts, BLOCK: tl.constexpr):
    """The pairs first..first+BLOCK-1: in range, valid (id in [0, E)), and the id as int32."""
    i = first + tl.arange(0, BLOCK)
    ok = i < num_pairs
    e = tl.load(ids_ptr + i, mask=ok, other=-1)
    valid = ok & (e >= 0) & (e < num_experts)  # compared in the ids' own width: int64 ids stay exact
    return i, ok, valid, tl.where(valid, e, 0).to(tl.int32)


@triton.jit
def _expert_starts(counts):
    ends = tl.cumsum(counts, axis=0)
    return ends - counts, ends


@triton.jit
def _one_hot(key, valid, ex):
    """[SUB, BLOCK_E] int32: pair i is expert ex (a dropped pair is no expert)."""
    return ((key[:, None] == ex[None, :]) & valid[:, None]).to(tl.int32)


@triton.jit
def _chunk_counts(ids_ptr, first, num_pairs, num_experts,
                  BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    """Expert histogram and dropped count of the pairs first..first+BLOCK_N-1, as sums of
    one-hot tiles: plain reductions, the primitive the rank pass uses anyway. tl.histogram
    lowers to warp ballots and shared-memory atomics, one more mechanism to trust, for 8-bin
    Mixtral tiles too, before a GPU run has checked it."""
    ex = tl.arange(0, BLOCK_E)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    dropped = 0
    for s in range(0, BLOCK_N, SUB):
        _, ok, valid, key = _pair_keys(ids_ptr, first + s, num_pairs, num_experts, SUB)
        counts += tl.sum(_one_hot(key, valid, ex), axis=0)
        dropped += tl.sum((ok & ~valid).to(tl.int32), axis=0)
    return counts, dropped


@triton.jit
def plan_count_kernel(ids_ptr, partial_ptr, num_pairs, num_experts,
                      BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr):
    chunk = tl.program_id(0)
    counts, dropped = _chunk_counts(ids_ptr, chunk * BLOCK_N, num_pairs, num_experts, BLOCK_N, SUB, BLOCK_E)
    ex = tl.arange(0, BLOCK_E)
    row = partial_ptr + chunk.to(tl.int64) * (num_experts + 1)
    tl.store(row + ex, counts, mask=ex < num_experts)
    tl.store(row + num_experts, dropped)


@triton.jit
def plan_scan_kernel(partial_ptr, counts_ptr, num_chunks, num_experts,
                     BLOCK_CH: tl.constexpr, BLOCK_EB: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_EB + tl.arange(0, BLOCK_EB)
    col_ok = cols <= num_experts  # E + 1 columns: the last one counts the dropped pairs
    carry = tl.zeros([BLOCK_EB], dtype=tl.int32)
    for c0 in range(0, num_chunks, BLOCK_CH):
        rows = c0 + tl.arange(0, BLOCK_CH)
        m = (rows < num_chunks)[:, None] & col_ok[None, :]
        ptrs = partial_ptr + rows.to(tl.int64)[:, None] * (num_experts + 1) + cols[None, :]
        p = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(p, axis=0) - p + carry[None, :], mask=m)
        carry += tl.sum(p, axis=0)
    tl.store(counts_ptr + cols, carry, mask=cols < num_experts)


@triton.jit
def plan_scatter_kernel(ids_ptr, partial_ptr, counts_ptr, offsets_ptr, source_ptr, dest_ptr,
                        num_pairs, num_experts,
                        BLOCK_N: tl.constexpr, SUB: tl.constexpr, BLOCK_E: tl.constexpr, SINGLE: tl.constexpr):
    chunk = tl.program_id(0)
    ex = tl.arange(0, BLOCK_E)
    ex_ok = ex < num_experts
    if SINGLE:  # one chunk holds every pair: count here, no partial rows
        counts, _ = _chunk_counts(ids_ptr, 0, num_pairs, num_experts, BLOCK_N, SUB, BLOCK_E)
        tl.store(counts_ptr + ex, counts, mask=ex_ok)
        before = tl.zeros([BLOCK_E], dtype=tl.int32)
        dropped_before = 0
    else:
        counts = tl.load(counts_ptr + ex, mask=ex_ok, other=0)
        row = partial_ptr + chunk.to(tl.int64) * (num_experts + 1)
        before = tl.load(row + ex, mask=ex_ok, other=0)
        dropped_before = tl.load(row + num_experts)
    starts, ends = _expert_starts(counts)
    if chunk == 0:
        tl.store(offsets_ptr + ex, ends, mask=ex_ok)
    base = starts + before  # the next row of each expert
    dropped_base = tl.sum(counts, axis=0) + dropped_before
    for s in range(0, BLOCK_N, SUB):
        i, ok, valid, key = _pair_keys(ids_ptr, chunk * BLOCK_N + s, num_pairs, num_experts, SUB)
        onehot = _one_hot(key, valid, ex)
        rank = tl.cumsum(onehot, axis=0) - 1 + base[None, :]
        pos = tl.sum(tl.where(onehot != 0, rank, 0), axis=1)
        dropped = (ok & ~valid).to(tl.int32)
        pos = tl.where(valid, pos, dropped_base + tl.cumsum(dropped, axis=0) - 1)
        tl.store(dest_ptr + i, pos, mask=ok)
        tl.store(source_ptr + pos, i, mask=ok)
        base += tl.sum(onehot, axis=0)
        dropped_base += tl.sum(dropped, axis=0)


@triton.jit
def plan_pad_kernel(counts_ptr, source_ptr, padded_ptr, block_expert_ptr, num_padded_ptr,
                    num_pairs, num_experts, block_size, num_blocks,
                    NB: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    """NB blocks of the padded layout: each block's expert, and its B rows (the sentinel T*k in
    padding). A block's expert is the number of padded segments ending at or before it."""
    b = tl.program_id(0) * NB + tl.arange(0, NB)
    b_ok = b < num_blocks
    ex = tl.arange(0, BLOCK_E)
    ex_ok = ex < num_experts
    counts = tl.load(counts_ptr + ex, mask=ex_ok, other=0)
    starts, _ = _expert_starts(counts)
    padded_counts = (counts + block_size - 1) // block_size * block_size
    padded_starts, padded_ends = _expert_starts(padded_counts)
    total = tl.sum(padded_counts, axis=0)
    row0 = b * block_size  # [NB]
    expert = tl.sum(((padded_ends[None, :] <= row0[:, None]) & ex_ok[None, :]).to(tl.int32), axis=1)
    sel = ex[None, :] == expert[:, None]  # [NB, BLOCK_E]: a block's expert; none past the end
    r = tl.arange(0, BLOCK_B)
    within = (row0 - tl.sum(tl.where(sel, padded_starts[None, :], 0), axis=1))[:, None] + r[None, :]
    count = tl.sum(tl.where(sel, counts[None, :], 0), axis=1)
    start = tl.sum(tl.where(sel, starts[None, :], 0), axis=1)
    has = (within < count[:, None]) & (row0 < total)[:, None]
    src = tl.load(source_ptr + start[:, None] + within, mask=has, other=num_pairs)
    rows = row0.to(tl.int64)[:, None] + r[None, :]
    tl.store(padded_ptr + rows, src, mask=b_ok[:, None] & (r < block_size)[None, :])
    tl.store(block_expert_ptr + b, tl.where(row0 < total, expert, -1), mask=b_ok)
    if tl.program_id(0) == 0:
        tl.store(num_padded_ptr, total)
