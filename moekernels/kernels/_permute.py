"""Moving rows between token order [T, H] and expert-sorted order [T*k, H].

Both kernels walk tokens, not sorted rows: a program takes BLOCK_T tokens and, tile by tile of
BLOCK_H columns over its ``h_span`` of the columns, their k pairs, whose sorted rows are
``dest_index[t*k + j]``. A token's row is read once for its k copies (T*H + T*k*H bytes for
permute, not 2*T*k*H), and every output element has one writer, so nothing needs atomics and
every result is deterministic.

The grid is 2-D, (token blocks, column spans of one tile): at decode (T = 16, H = 7168, 4 x 7
programs) the columns spread over programs instead of queueing in one. The backward scatter
sums a dot over all the columns, so there one program takes them all (h_span >= H).

Rows are addressed as ``row.to(int64) * stride``: at T*k = 131072 and H = 7168, T*k*H is 9.4e8,
and DeepSeek-V3 prefill at T = 65536 passes 2**31. A BLOCK_H of 16 bytes per thread per row
lets the 16-byte vector loads and stores through when H is a multiple of 16 (Triton
specialises integer arguments divisible by 16). ACC, the accumulator type, is float32, or
float64 for float64 payloads (gradcheck runs on those).

Slot j + 1's destination rows are loaded before slot j's rows move, so a row load never waits
on the index load issued just before it: one DRAM round trip per slot, not two dependent ones
(issue 13, item 6). Holding the block's whole [BLOCK_T, k] index tile instead cost 32 more
registers a thread at k = 8 (unpermute bf16: 56 -> 133 registers, a third of the resident
warps), for the same overlap; the one-ahead index costs BLOCK_T = 4 registers.

A dropped pair (an id outside [0, E), see kernels/_plan.py) has a sorted row at or after
``num_valid = expert_offsets[E - 1]``; unpermute and its backward skip it.
"""

import triton
import triton.language as tl



@triton.jit
def scatter_rows_kernel(x_ptr, dest_ptr, w_ptr, y_ptr, out_ptr, grad_w_ptr, offsets_ptr,
                        num_tokens, hidden, h_span, top_k, num_experts, stride_x, stride_y, stride_out,
                        BACKWARD: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """permute: out[dest[t*k + j]] = x[t].

    BACKWARD, unpermute's backward with x = grad_y and y = y_sorted:
    out[dest[t*k + j]] = w[t, j] * x[t], and grad_w[t, j] = <x[t], y[dest[t*k + j]]>;
    both zero for dropped pairs.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    t64 = t.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    if BACKWARD:
        num_valid = tl.load(offsets_ptr + num_experts - 1)
        dots = tl.zeros([BLOCK_T, BLOCK_K], dtype=ACC)
    h_lo = tl.program_id(1) * h_span
    for h0 in range(h_lo, h_lo + h_span, BLOCK_H):  # h_span is whole tiles; the mask cuts at H
        h = h0 + tl.arange(0, BLOCK_H)
        m = t_ok[:, None] & (h < hidden)[None, :]
        x = tl.load(x_ptr + t64[:, None] * stride_x + h[None, :], mask=m)
        dest_next = tl.load(dest_ptr + t64 * top_k, mask=t_ok, other=0)
        for j in range(top_k):
            dest = dest_next.to(tl.int64)
            # The last pair reloads its own index (unused) rather than masking the next token's
            # off: a scalar condition in a block mask is an int32 mask under triton 3.9's interpreter.
            dest_next = tl.load(dest_ptr + t64 * top_k + tl.minimum(j + 1, top_k - 1), mask=t_ok, other=0)
            out = out_ptr + dest[:, None] * stride_out + h[None, :]
            if BACKWARD:
                valid = (dest < num_valid)[:, None] & m
                w = tl.load(w_ptr + t64 * top_k + j, mask=t_ok, other=0).to(ACC)
                y = tl.load(y_ptr + dest[:, None] * stride_y + h[None, :], mask=valid, other=0).to(ACC)
                xa = tl.where(valid, x.to(ACC), 0)
                tl.store(out, (w[:, None] * xa).to(out_ptr.dtype.element_ty), mask=m)
                dots += tl.where(kk[None, :] == j, tl.sum(xa * y, axis=1)[:, None], 0)
            else:
                tl.store(out, x, mask=m)
    if BACKWARD:
        pairs = t64[:, None] * top_k + kk[None, :]
        tl.store(grad_w_ptr + pairs, dots.to(grad_w_ptr.dtype.element_ty),  # float64 dots for bf16 weights
                 mask=t_ok[:, None] & (kk < top_k)[None, :])


@triton.jit
def combine_rows_kernel(y_ptr, dest_ptr, w_ptr, offsets_ptr, out_ptr,
                        num_tokens, hidden, h_span, top_k, num_experts, stride_y, stride_out,
                        WEIGHTED: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """WEIGHTED (unpermute): out[t] = sum_j w[t, j] * y[dest[t*k + j]] over the pairs not dropped.
    Otherwise (permute's backward): out[t] = sum_j y[dest[t*k + j]] over all pairs.
    Summed in order j = 0..k-1 in float32 (float64 for float64 payloads)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    t64 = t.to(tl.int64)
    if WEIGHTED:
        num_valid = tl.load(offsets_ptr + num_experts - 1)
    h_lo = tl.program_id(1) * h_span
    for h0 in range(h_lo, h_lo + h_span, BLOCK_H):  # h_span is whole tiles; the mask cuts at H
        h = h0 + tl.arange(0, BLOCK_H)
        h_ok = (h < hidden)[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=ACC)
        dest_next = tl.load(dest_ptr + t64 * top_k, mask=t_ok, other=0)
        for j in range(top_k):
            dest = dest_next.to(tl.int64)
            # The last pair reloads its own index (unused) rather than masking the next token's
            # off: a scalar condition in a block mask is an int32 mask under triton 3.9's interpreter.
            dest_next = tl.load(dest_ptr + t64 * top_k + tl.minimum(j + 1, top_k - 1), mask=t_ok, other=0)
            if WEIGHTED:
                valid = t_ok & (dest < num_valid)
                w = tl.load(w_ptr + t64 * top_k + j, mask=valid, other=0).to(ACC)
                y = tl.load(y_ptr + dest[:, None] * stride_y + h[None, :], mask=valid[:, None] & h_ok, other=0)
                acc += w[:, None] * y.to(ACC)
            else:
                y = tl.load(y_ptr + dest[:, None] * stride_y + h[None, :], mask=t_ok[:, None] & h_ok, other=0)
                acc += y.to(ACC)
        tl.store(out_ptr + t64[:, None] * stride_out + h[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & h_ok)
