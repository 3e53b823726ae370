"""Grouped GEMM over expert segments of the rows: y[offs[e-1]:offs[e]] = a[...] @ b[e].

``grouped_mm_kernel`` is persistent: ``num_programs`` programs (one per SM on a GPU) walk the
(expert, M tile, N tile) work items round-robin. The schedule is built on the device: each
program loads ``offs`` once as a [BLOCK_E] vector, turns it into per-expert tile counts and
their running sum, and finds the expert of a work item with one vector compare (no host sync,
so the launch is CUDA-graph safe and its grid is a static bound). After the experts' tiles come
the tail tiles, rows offs[E-1]..M, which get zeros (``torch._grouped_mm``'s rows past the last
group) from the same code with no K steps. Within an expert, tiles go in GROUP_M swizzled
order, so consecutive work items reuse the same weight columns and token rows from L2.

Operands: ``a`` rows come through a TMA descriptor (A_TMA) or, when gathered (GATHER: row r is
``a[a_index[r] // gather_div]``, the permutation of the MoE layer never written out) or not
16-byte aligned, through masked pointer loads. ``b`` is the [E, K, N] weight, through a 3-D TMA
descriptor of block [1, BK, BN] (B_TMA), or of block [1, BN, BK] over the [E, N, K] storage of
``nn.Linear`` (B_KMAJOR: the transposed view is read in place, never copied); the expert index
is a descriptor coordinate, so the K tail is zero-filled per expert and never reads the next
expert's rows. Rows past a segment's end are read (the next expert's rows) but never stored.

Epilogues: ACT (1 silu, 2 gelu) computes ``act(a @ b[:, :N]) * (a @ b[:, N:2N])`` from two
accumulators, so the [M, 2N] gate/up product is never written; SCATTER writes row r to
``c[c_index[r]]`` scaled by the float32 ``c_scale[c_index[r]]`` (the router weight of the pair),
ready for the combine. SWAP_AB (decode, at most 16 rows per tile) computes the transposed tile
``b^T a^T``: the weight columns fill wgmma's 64-row M and the few tokens its N of 16, instead of
padding 1-16 token rows to 64.

LORA (LoRA on the experts) adds a low-rank segment ``lora_x[r] @ lora_w[e]`` to the accumulators
after the main K loop (and the fp8 scales), before the epilogue: ``_lora_segment``, a second K
loop over the rank, so the [M, 2N] product with the segment is never written either.

Block-scaled fp8 (SCALE 3) promotes each 128-wide K step's product with its scales, which
triton 3.6 can only do after waiting for that step's wgmma; ``_block_scaled_loop`` (and
``_block_scaled_gated_loop``) order the steps so that another wgmma is in flight during each
promotion (see there).

``grouped_mm_dw_kernel`` is the K-grouped product of the weight gradient,
dw[e] = a[seg e]^T @ b[seg e]: one work item per (expert, K tile, N tile), a loop over the
expert's rows, masked at the segment's end (the rows of other experts must not enter the sum),
and zeros for an expert with no rows. bf16/fp16 read the rows as they are (wgmma takes their
tiles MN-major from shared memory); tf32 and e4m3 wgmma read both operands K-major only, here
token-contiguous, so fp32 and fp8 read tile-aligned transposed copies (TRANSPOSED) by TMA, where
fp32 rows as they are came by 4-byte cp.async.

Row offsets are int64 (a[M, K] with M*K past 2**31 at DeepSeek-V3 prefill: 131072 x 7168 = 9.4e8
elements, twice that for K = 14336); tile coordinates stay int32.
"""

import triton
import triton.language as tl

from ._math import INTERPRET, dot, e4m3_to_float


@triton.jit
def _expert_table(offs_ptr, num_experts, num_rows, BLOCK_M: tl.constexpr, num_n, BLOCK_E: tl.constexpr):
    """Per expert (a [BLOCK_E] vector): its index, segment end (clamped to [0, num_rows], so that
    offs past M can never address memory), its tiles, and their inclusive running sum. A work
    item reloads its expert's start and end: two scalar loads, not two more reductions."""
    e = tl.arange(0, BLOCK_E)
    ok = e < num_experts
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + e, mask=ok, other=0), 0), num_rows)
    starts = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=ok & (e > 0), other=0), 0), num_rows)
    tiles = tl.where(ok, tl.cdiv(tl.maximum(ends - starts, 0), BLOCK_M) * num_n, 0)
    return e, ends, tiles, tl.cumsum(tiles, 0)


@triton.jit
def _swizzle(local, num_m, num_n, GROUP_M: tl.constexpr):
    """Tile ``local`` of a num_m x num_n grid, in column groups of GROUP_M rows (L2 reuse)."""
    width = GROUP_M * num_n
    first_m = (local // width) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (local % width) % size, (local % width) // size


@triton.jit
def _load_a(a, src, row_ok, row0, k0, num_k, stride_am, A_TMA: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of a at rows ``src`` (the tile's rows, or their gathered
    sources), K from k0."""
    # Constexpr branches as if/else: the compiler, unlike the interpreter, would still build
    # the code after an early return (and a descriptor has no pointer arithmetic).
    if A_TMA:
        tile = a.load([row0, k0])
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        ptrs = a + src.to(tl.int64)[:, None] * stride_am + k[None, :]
        tile = tl.load(ptrs, mask=row_ok[:, None] & (k < num_k)[None, :], other=0.0)
    return tile


@triton.jit
def _load_b(b, e, k0, n0, num_k, width_b, stride_be, stride_bk, stride_bn,
            B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] tile of expert e's [K, width_b] weight at (k0, n0)."""
    if B_TMA:
        if B_KMAJOR:
            tile = tl.trans(b.load([e, n0, k0]).reshape(BLOCK_N, BLOCK_K))
        else:
            tile = b.load([e, k0, n0]).reshape(BLOCK_K, BLOCK_N)
    elif B_KMAJOR:  # [BLOCK_N, BLOCK_K] in storage order (K contiguous: coalesced), then transposed
        k = k0 + tl.arange(0, BLOCK_K)
        n = n0 + tl.arange(0, BLOCK_N)
        ptrs = b + e.to(tl.int64) * stride_be + n.to(tl.int64)[:, None] * stride_bn + k[None, :] * stride_bk
        tile = tl.trans(tl.load(ptrs, mask=(n < width_b)[:, None] & (k < num_k)[None, :], other=0.0))
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        n = n0 + tl.arange(0, BLOCK_N)
        ptrs = b + e.to(tl.int64) * stride_be + k.to(tl.int64)[:, None] * stride_bk + n[None, :] * stride_bn
        tile = tl.load(ptrs, mask=(k < num_k)[:, None] & (n < width_b)[None, :], other=0.0)
    return tile


@triton.jit
def _in_registers(x):
    """x, through an opaque identity (a ``mov`` that ptxas deletes): Triton makes a dot operand that
    comes straight from a load wgmma's shared-memory operand, and one computed in registers a
    register operand (AccelerateMatmul's comesFromLoadOrBlockArg)."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _mma(a, b, acc, SWAP_AB: tl.constexpr, B_KMAJOR: tl.constexpr = True):
    """acc + a @ b, or, SWAP_AB, its transpose: acc^T + b^T @ a^T.

    An N-major fp32 weight under SWAP_AB is wgmma's A operand, which tf32 reads from shared memory
    K-major only: Triton 3.6 copied each K step's tile out of shared memory and back transposed
    (local_load -> local_alloc, a fence, and wgmma depth 0). As a register operand (wgmma takes A
    from registers in the fragment layout, read once from the TMA tile) the K step's wgmma splits
    into four of K = 8, three left in flight (the sm_90 contract: grouped_mm/plain_prefill_fp32_ekn,
    132 -> 162 registers, still three programs an SM)."""
    if SWAP_AB:
        w = tl.trans(b)
        if not INTERPRET:  # the interpreter has no inline asm (nor wgmma operands)
            if not B_KMAJOR:
                if b.dtype == tl.float32:
                    w = _in_registers(w)
        acc = dot(w, tl.trans(a), acc)
    else:
        acc = dot(a, b, acc)
    return acc


@triton.jit
def _promote(acc, part, s, SWAP_AB: tl.constexpr):
    """acc + part * s[row]: a K step's product promoted with its scales (sa[row] * sb)."""
    if SWAP_AB:
        acc += part * s[None, :]
    else:
        acc += part * s[:, None]
    return acc


@triton.jit
def _scale_rows_cols(acc, sa, sb, SWAP_AB: tl.constexpr):
    """acc * sa[row] * sb[column] in acc's layout (transposed with SWAP_AB): the per row x per
    column fp8 scales, applied before the tile is transposed back so that a low-rank segment can
    follow in the same layout."""
    if SWAP_AB:
        acc *= sb[:, None] * sa[None, :]
    else:
        acc *= sa[:, None] * sb[None, :]
    return acc


@triton.jit
def _lora_segment(lora_x, lora_w, acc, acc_up, rows, row_ok, e, n0, N, R, num_r, width_b, stride_lxm, stride_lwe,
                  stride_lwk, stride_lwn, ACT: tl.constexpr, SWAP_AB: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """acc + lora_x[rows] @ lora_w[e][:, n0:n0 + BLOCK_N] (and acc_up + that of the up columns
    n0 + N.. with ACT): the low-rank segment as a second K loop of num_r steps of BLOCK_R over the
    rank, after the main loop. ``rows`` are the tile's sorted rows (lora_x is never gathered);
    masked pointer loads, so any r (1-128, no power of two needed) leaves a zero-filled tail."""
    for rr in range(0, num_r):
        r0 = rr * BLOCK_R
        x_tile = _load_a(lora_x, rows, row_ok, 0, r0, R, stride_lxm, False, BLOCK_R)
        w_tile = _load_b(lora_w, e, r0, n0, R, width_b, stride_lwe, stride_lwk, stride_lwn, False, False, BLOCK_R,
                         BLOCK_N)
        if ACT != 0:  # loaded with the others, so that the three loads are in flight together
            up = _load_b(lora_w, e, r0, n0 + N, R, width_b, stride_lwe, stride_lwk, stride_lwn, False, False,
                         BLOCK_R, BLOCK_N)
        acc = _mma(x_tile, w_tile, acc, SWAP_AB)
        if ACT != 0:
            acc_up = _mma(x_tile, up, acc_up, SWAP_AB)
    return acc, acc_up


@triton.jit
def _step_scales(a_scale_ptr, src64, row_ok, kk, num_k_tiles, stride_sam, stride_sak, sb_ptr, stride_sbk):
    """sa[row] * sb of K step kk (zeros past the last step): sb is one scalar, the tile's BLOCK_N
    <= 128 columns lying in one 128-column scale block. With column-major a_scale (stride_sam
    1) the tile's row scales are one contiguous run."""
    ok = kk < num_k_tiles
    # A select, not row_ok & ok: triton 3.9's interpreter makes a scalar condition anded into a
    # block an int32 mask, which tl.load rejects (tests/test_interpreter_workarounds.py).
    sa = tl.load(a_scale_ptr + src64 * stride_sam + kk * stride_sak, mask=tl.where(ok, row_ok, False), other=0.0)
    return sa * tl.load(sb_ptr + kk * stride_sbk, mask=ok, other=0.0)


@triton.jit
def _block_scaled_loop(a, b, acc, src, src64, row_ok, row0, e, e64, n0, K, num_k_tiles, width_b, stride_am,
                       stride_be, stride_bk, stride_bn, a_scale_ptr, b_scale_ptr, stride_sam, stride_sak, stride_sbe,
                       stride_sbk, stride_sbn, A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr,
                       SWAP_AB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (1, 128) x (128, 128) K loop, two K steps an iteration, so that a wgmma is in flight
    while the previous step's product is promoted. Each K step's product needs its own scales,
    so it is read in the loop, and triton 3.6's pipeliner then waits for that wgmma at once
    (pendings 0) unless the read comes after another wait 0 in the loop (WGMMAPipeline's rule
    3b). So step A's wgmma is waited for at once; that wait also retires step B's wgmma of the
    previous iteration, whose product is promoted then; step B's wgmma is issued next and runs
    while step A's product is promoted, and on into the next iteration. An odd step count gets a
    last step of zeros (TMA and masked loads past K read zeros; its scales are 0).

    The overlap holds a third 128x128 float32 tile (255 registers a thread at 8 warps, sm_90a).
    The e4m3 weight is K-major (the launcher rejects an N-major one: fp8.prepare_weight), so no
    transpose through shared memory adds to that (two steps of one would spill 28 bytes)."""
    sb_ptr = b_scale_ptr + e64 * stride_sbe + (n0 // 128) * stride_sbn
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    part_b = zero
    s_b = tl.zeros(src.shape, dtype=tl.float32)
    for kp in range(0, tl.cdiv(num_k_tiles, 2)):
        ka = kp * 2
        s_a = _step_scales(a_scale_ptr, src64, row_ok, ka, num_k_tiles, stride_sam, stride_sak, sb_ptr, stride_sbk)
        a_tile = _load_a(a, src, row_ok, row0, ka * BLOCK_K, K, stride_am, A_TMA, BLOCK_K)
        b_tile = _load_b(b, e, ka * BLOCK_K, n0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR,
                         BLOCK_K, BLOCK_N)
        part_a = _mma(a_tile, b_tile, zero, SWAP_AB)  # waited for at once
        acc = _promote(acc, part_b, s_b, SWAP_AB)  # the previous iteration's step B
        kb = ka + 1
        s_b = _step_scales(a_scale_ptr, src64, row_ok, kb, num_k_tiles, stride_sam, stride_sak, sb_ptr, stride_sbk)
        a_tile = _load_a(a, src, row_ok, row0, kb * BLOCK_K, K, stride_am, A_TMA, BLOCK_K)
        b_tile = _load_b(b, e, kb * BLOCK_K, n0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR,
                         BLOCK_K, BLOCK_N)
        part_b = _mma(a_tile, b_tile, zero, SWAP_AB)  # in flight across the promotion below
        acc = _promote(acc, part_a, s_a, SWAP_AB)
    acc = _promote(acc, part_b, s_b, SWAP_AB)
    return acc


@triton.jit
def _block_scaled_gated_loop(a, b, b_up, acc, acc_up, src, src64, row_ok, row0, e, e64, n0, up0, N, K, num_k_tiles,
                             width_b, stride_am, stride_be, stride_bk, stride_bn, a_scale_ptr, b_scale_ptr,
                             b_up_scale_ptr, stride_sam, stride_sak, stride_sbe, stride_sbk, stride_sbn,
                             A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, SWAP_AB: tl.constexpr,
                             BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The block-scaled K loop of the gated epilogue: the same overlap as _block_scaled_loop with
    its two products a K step, gate and up: the gate wgmma is waited for at once (retiring the
    previous step's up wgmma, promoted then), the up wgmma runs while the gate is promoted. The
    up tile is column up0 of b_up (n0 + N of b itself, or n0 of a separate up weight) with its
    scales in b_up_scale_ptr."""
    sb_row = b_scale_ptr + e64 * stride_sbe
    sb_up_row = b_up_scale_ptr + e64 * stride_sbe
    zero = tl.zeros(acc.shape, dtype=tl.float32)
    part_up = zero
    s_up = tl.zeros(src.shape, dtype=tl.float32)
    for kk in range(0, num_k_tiles):
        k0 = kk * BLOCK_K
        a_tile = _load_a(a, src, row_ok, row0, k0, K, stride_am, A_TMA, BLOCK_K)
        gate = _load_b(b, e, k0, n0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR, BLOCK_K, BLOCK_N)
        up = _load_b(b_up, e, k0, up0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR, BLOCK_K,
                     BLOCK_N)
        s_gate = _step_scales(a_scale_ptr, src64, row_ok, kk, num_k_tiles, stride_sam, stride_sak,
                              sb_row + (n0 // 128) * stride_sbn, stride_sbk)
        part_gate = _mma(a_tile, gate, zero, SWAP_AB)  # waited for at once
        acc_up = _promote(acc_up, part_up, s_up, SWAP_AB)  # the previous step's up
        s_up = _step_scales(a_scale_ptr, src64, row_ok, kk, num_k_tiles, stride_sam, stride_sak,
                            sb_up_row + (up0 // 128) * stride_sbn, stride_sbk)
        part_up = _mma(a_tile, up, zero, SWAP_AB)  # in flight across the promotion below
        acc = _promote(acc, part_gate, s_gate, SWAP_AB)
    return acc, _promote(acc_up, part_up, s_up, SWAP_AB)


@triton.jit
def _dequantized_loop(a, b, b_up, acc, acc_up, src64, row_ok, row0, e, e64, n0, up0, K, num_k_tiles, width_b,
                      stride_am, stride_be, stride_bk, stride_bn, a_scale_ptr, b_scale_ptr, b_up_scale_ptr, stride_sam,
                      stride_sak, stride_sbe, stride_sbk, stride_sbn, A_TMA: tl.constexpr, B_TMA: tl.constexpr,
                      B_KMAJOR: tl.constexpr, SWAP_AB: tl.constexpr, ACT: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """The (1, 128) x (128, 128) K loop where e4m3 arrives as bytes (no e4m3 MMA: sm_80, sm_86;
    or the weight-only route): each K step's e4m3 tiles decoded, times their scales, rounded to
    bf16 (x's type, weight-only, whose x is taken as it is: its scales are ones) and multiplied on
    bf16 MMA into the float32 accumulators. No per-step product beside them: mma.sync holds its
    operands in registers, and the wgmma loops' extra product tiles spilled 28 KB a thread there
    (ptxas, sm_80, 64 x 128 x 128 at 4 warps). Within bf16's rounding of the operands (2**-9)."""
    sb_ptr = b_scale_ptr + e64 * stride_sbe
    sb_up_ptr = b_up_scale_ptr + e64 * stride_sbe
    for kk in range(0, num_k_tiles):
        k0 = kk * BLOCK_K
        a_tile = _load_a(a, src64, row_ok, row0, k0, K, stride_am, A_TMA, BLOCK_K)
        if a_tile.dtype == tl.uint8:
            sa = tl.load(a_scale_ptr + src64 * stride_sam + kk * stride_sak, mask=row_ok, other=0.0)
            a_tile = (e4m3_to_float(a_tile, tl.float32) * sa[:, None]).to(tl.bfloat16)
        gate = _load_b(b, e, k0, n0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR, BLOCK_K, BLOCK_N)
        s_gate = tl.load(sb_ptr + kk * stride_sbk + (n0 // 128) * stride_sbn)
        acc = _mma(a_tile, (e4m3_to_float(gate, tl.float32) * s_gate).to(a_tile.dtype), acc, SWAP_AB)
        if ACT != 0:
            up = _load_b(b_up, e, k0, up0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR, BLOCK_K,
                         BLOCK_N)
            s_up = tl.load(sb_up_ptr + kk * stride_sbk + (up0 // 128) * stride_sbn)
            acc_up = _mma(a_tile, (e4m3_to_float(up, tl.float32) * s_up).to(a_tile.dtype), acc_up, SWAP_AB)
    return acc, acc_up


@triton.jit(do_not_specialize=["num_rows"])
def grouped_mm_kernel(a, a_index_ptr, b, c_ptr, c_index_ptr, c_scale_ptr, offs_ptr, a_scale_ptr, b_scale_ptr,
                      lora_x, lora_w, b_up, b_up_scale_ptr, num_rows, N, K, num_experts, gather_div, stride_am,
                      stride_be, stride_bk, stride_bn, stride_cm, stride_sam, stride_sak, stride_sbe, stride_sbk,
                      stride_sbn, R, stride_lxm, stride_lwe, stride_lwk, stride_lwn,
                      A_TMA: tl.constexpr, B_TMA: tl.constexpr, B_KMAJOR: tl.constexpr, GATHER: tl.constexpr,
                      SCATTER: tl.constexpr, ACT: tl.constexpr, SWAP_AB: tl.constexpr, SCALE: tl.constexpr,
                      LORA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr, GROUP_M: tl.constexpr,
                      SPLIT_UP: tl.constexpr):
    """c[r, :N] = epilogue(a[r] @ b[e]) for the rows r of expert e's segment; zeros past offs[E-1].

    N is the output width; with ACT the weight is [K, 2N], gate columns first, then up, or with
    SPLIT_UP two [K, N] weights, gate b and up b_up, of the same strides (and their scales
    b_scale, b_up_scale of the same strides): checkpoints that keep w1 and w3 apart are read in
    place, never concatenated. Without SPLIT_UP b_up and b_up_scale_ptr are unused. SCALE
    (fp8 operands): 0 none, 1 per tensor (a_scale [1], b_scale [E]), 2 per row x per column
    (a_scale [M], b_scale [E, N]), 3 (1, 128) x (128, 128) blocks (a_scale [M, K/128],
    b_scale [E, K/128, N/128], BLOCK_K = 128), each with the strides given.

    LORA adds the low-rank segment lora_x[r] @ lora_w[e] (lora_x [M, R] over the sorted rows,
    unit inner stride; lora_w [E, R, N or 2N] of any strides) to the accumulators after the main
    K loop and its fp8 scaling, before the epilogue: K steps of BLOCK_R, in acc's layout.
    """
    num_n = tl.cdiv(N, BLOCK_N)
    num_k_tiles = tl.cdiv(K, BLOCK_K)
    width_b = N * 2 if ACT != 0 and not SPLIT_UP else N
    width_lora = N * 2 if ACT != 0 else N  # lora_w is [E, R, 2N] with ACT in both forms
    # The up tiles' operand and scales: b's own columns N..2N (as before: b_up unused), or b_up's.
    if SPLIT_UP:
        up_b = b_up
        up_scales = b_up_scale_ptr
    else:
        up_b = b
        up_scales = b_scale_ptr
    e_idx, ends, tiles, cum = _expert_table(offs_ptr, num_experts, num_rows, BLOCK_M, num_n, BLOCK_E)
    total = tl.sum(tiles, 0)
    last = tl.sum(tl.where(e_idx == num_experts - 1, ends, 0), 0)
    work = total + tl.cdiv(num_rows - last, BLOCK_M) * num_n
    acc_shape: tl.constexpr = (BLOCK_N, BLOCK_M) if SWAP_AB else (BLOCK_M, BLOCK_N)
    # e4m3 weights as their bytes (grouped_gemm.fp8_bytes): no e4m3 MMA, or the weight-only route
    B_BYTES: tl.constexpr = (b.dtype if B_TMA else b.dtype.element_ty) == tl.uint8
    for t in range(tl.program_id(0), work, tl.num_programs(0)):
        in_expert = t < total
        # One reduction finds both the expert of t (how many experts' tiles all come before it)
        # and the tiles before that expert: count in the high half of an int64, tiles in the
        # low half. A cross-warp reduction costs a shared-memory round trip (~200 cycles);
        # one per work item instead of four is ~1% of a 128x128x2048 tile's ~18k cycles.
        before = tl.sum(tl.where(cum <= t, tiles.to(tl.int64) + (1 << 32), 0), 0)
        e = (before >> 32).to(tl.int32)
        end = tl.minimum(tl.maximum(tl.load(offs_ptr + e, mask=in_expert, other=0), 0), num_rows)
        start = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=in_expert & (e > 0), other=0), 0), end)
        start = tl.where(in_expert, start, last)
        end = tl.where(in_expert, end, num_rows)
        local = t - tl.where(in_expert, (before & 0xFFFFFFFF).to(tl.int32), total)
        pid_m, pid_n = _swizzle(local, tl.cdiv(end - start, BLOCK_M), num_n, GROUP_M)
        row0 = start + pid_m * BLOCK_M
        rows = row0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        src = rows  # the rows of a (and of its scales) the tile reads: loaded once per tile
        if GATHER:
            src = tl.load(a_index_ptr + rows, mask=row_ok, other=0) // gather_div
        src64 = src.to(tl.int64)
        n0 = pid_n * BLOCK_N
        up0 = n0 if SPLIT_UP else n0 + N  # the up tile's column in b_up (b itself without SPLIT_UP)
        e64 = e.to(tl.int64)
        acc = tl.zeros(acc_shape, dtype=tl.float32)
        acc_up = tl.zeros(acc_shape, dtype=tl.float32)
        num_steps = tl.where(in_expert, num_k_tiles, 0)  # tail tiles: no K steps, zeros
        if SCALE == 3 and B_BYTES:
            acc, acc_up = _dequantized_loop(a, b, up_b, acc, acc_up, src64, row_ok, row0, e, e64, n0, up0, K,
                                            num_steps, width_b, stride_am, stride_be, stride_bk, stride_bn,
                                            a_scale_ptr, b_scale_ptr, up_scales, stride_sam, stride_sak, stride_sbe,
                                            stride_sbk, stride_sbn, A_TMA, B_TMA, B_KMAJOR, SWAP_AB, ACT, BLOCK_K,
                                            BLOCK_N)
        elif SCALE == 3 and ACT != 0:
            acc, acc_up = _block_scaled_gated_loop(a, b, up_b, acc, acc_up, src, src64, row_ok, row0, e, e64, n0,
                                                   up0, N, K, num_steps, width_b, stride_am, stride_be, stride_bk,
                                                   stride_bn, a_scale_ptr, b_scale_ptr, up_scales, stride_sam,
                                                   stride_sak, stride_sbe, stride_sbk, stride_sbn, A_TMA, B_TMA,
                                                   B_KMAJOR, SWAP_AB, BLOCK_K, BLOCK_N)
        elif SCALE == 3:
            acc = _block_scaled_loop(a, b, acc, src, src64, row_ok, row0, e, e64, n0, K, num_steps, width_b,
                                     stride_am, stride_be, stride_bk, stride_bn, a_scale_ptr, b_scale_ptr,
                                     stride_sam, stride_sak, stride_sbe, stride_sbk, stride_sbn, A_TMA, B_TMA,
                                     B_KMAJOR, SWAP_AB, BLOCK_K, BLOCK_N)
        else:
            for kk in range(0, num_steps):
                k0 = kk * BLOCK_K
                a_tile = _load_a(a, src, row_ok, row0, k0, K, stride_am, A_TMA, BLOCK_K)
                b_tile = _load_b(b, e, k0, n0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR,
                                 BLOCK_K, BLOCK_N)
                if ACT != 0:
                    up = _load_b(up_b, e, k0, up0, K, width_b, stride_be, stride_bk, stride_bn, B_TMA, B_KMAJOR,
                                 BLOCK_K, BLOCK_N)
                acc = _mma(a_tile, b_tile, acc, SWAP_AB, B_KMAJOR)
                if ACT != 0:
                    acc_up = _mma(a_tile, up, acc_up, SWAP_AB, B_KMAJOR)
        cols = n0 + tl.arange(0, BLOCK_N)
        if SCALE == 1:
            s = tl.load(a_scale_ptr) * tl.load(b_scale_ptr + e64 * stride_sbe, mask=in_expert, other=0.0)
            acc *= s
            if SPLIT_UP:
                s = tl.load(a_scale_ptr) * tl.load(b_up_scale_ptr + e64 * stride_sbe, mask=in_expert, other=0.0)
            acc_up *= s
        elif SCALE == 2:
            sa = tl.load(a_scale_ptr + src64 * stride_sam, mask=row_ok, other=0.0)
            sb_row = b_scale_ptr + e64 * stride_sbe
            col_ok = tl.where(in_expert, cols < N, False)  # a select: see _step_scales
            acc = _scale_rows_cols(acc, sa, tl.load(sb_row + cols * stride_sbn, mask=col_ok, other=0.0), SWAP_AB)
            if ACT != 0:
                up_cols = cols + N
                if SPLIT_UP:
                    sb_row = b_up_scale_ptr + e64 * stride_sbe
                    up_cols = cols
                acc_up = _scale_rows_cols(acc_up, sa, tl.load(sb_row + up_cols * stride_sbn,
                                                              mask=col_ok, other=0.0), SWAP_AB)
        if LORA:  # after the fp8 scales: the low-rank segment is in the high-precision dtype
            num_r = tl.where(in_expert, tl.cdiv(R, BLOCK_R), 0)  # tail tiles: zeros
            acc, acc_up = _lora_segment(lora_x, lora_w, acc, acc_up, rows, row_ok, e, n0, N, R, num_r, width_lora,
                                        stride_lxm, stride_lwe, stride_lwk, stride_lwn, ACT, SWAP_AB, BLOCK_R,
                                        BLOCK_N)
        if SWAP_AB:
            acc = tl.trans(acc)
            acc_up = tl.trans(acc_up)
        if ACT == 1:  # silu(gate) * up
            acc = acc * tl.sigmoid(acc) * acc_up
        elif ACT == 2:  # gelu(gate) * up, the exact (erf) gelu of torch's default
            acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476)) * acc_up
        out_rows = rows
        if SCATTER:
            out_rows = tl.load(c_index_ptr + rows, mask=row_ok, other=0)
            acc = acc * tl.load(c_scale_ptr + out_rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        ptrs = c_ptr + out_rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < N)[None, :])


@triton.jit
def grouped_mm_dw_kernel(a, a_index_ptr, b, c_ptr, offs_ptr, sa_ptr, sb_ptr,
                         num_rows, K, N, num_experts, gather_div, stride_am, stride_ak, stride_bm, stride_bn,
                         stride_ce, stride_ck, stride_cn,
                         GATHER: tl.constexpr, TRANSPOSED: tl.constexpr, SCALED: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """c[e] = a[seg e]^T @ b[seg e] ([K, N] per expert; zeros for an empty one), a[r] gathered
    from ``a[a_index[r] // gather_div]`` with GATHER. The rows as they are come by masked pointer
    loads: a segment ends mid-tile, and a TMA box would bring the next expert's rows into the sum.

    TRANSPOSED: a and b are TMA descriptors of blocks [BLOCK_K, BLOCK_M] and [BLOCK_N, BLOCK_M]
    over the copies of kernels/_fp8.transpose_segments_kernel, a^T [K, tiles * BLOCK_M] and b^T
    [N, tiles * BLOCK_M], token tile g in columns g * BLOCK_M.. (the tokens, the reduction,
    contiguous, which wgmma needs of tf32 and e4m3 operands; zero past a partial tile's end, so no
    row mask: every tile is a dense, 16-byte aligned box, and the box zero-fills past K and N).
    Expert e's tiles follow the tiles of the experts before it (any gather was done by the copy).
    SCALED (the fp8 weight gradient, on the TRANSPOSED layout): e4m3 tiles with float32 scales
    sa [tiles, K] and sb [tiles, N]; each tile's product is promoted to the float32 sum times its
    scales (an fp8 sum never runs past 128 products, as in the forward)."""
    tl.static_assert(TRANSPOSED or not SCALED, "the fp8 weight gradient reads the transposed tiles")
    num_kt = tl.cdiv(K, BLOCK_K)
    num_n = tl.cdiv(N, BLOCK_N)
    per_expert = num_kt * num_n
    if TRANSPOSED:  # each expert's tiles, as the copy numbered them
        e_idx, ends_v, tiles_v, cum_v = _expert_table(offs_ptr, num_experts, num_rows, BLOCK_M, 1, BLOCK_E)
    for t in range(tl.program_id(0), num_experts * per_expert, tl.num_programs(0)):
        e = t // per_expert
        pid_k, pid_n = _swizzle(t % per_expert, num_kt, num_n, GROUP_M)
        k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        if TRANSPOSED:
            first = tl.sum(tl.where(e_idx == e, cum_v - tiles_v, 0), 0)
            last = tl.sum(tl.where(e_idx == e, cum_v, 0), 0)
            for g in range(first, last):
                # int32 is enough: g * BLOCK_M <= M + BLOCK_M * E, and the scales' g * K <= (M / 128 + E) * K.
                a_t = a.load([pid_k * BLOCK_K, g * BLOCK_M])
                b_t = tl.trans(b.load([pid_n * BLOCK_N, g * BLOCK_M]))
                if SCALED:
                    sa = tl.load(sa_ptr + g * K + k, mask=k < K, other=0.0)
                    sb = tl.load(sb_ptr + g * N + n, mask=n < N, other=0.0)
                    part = dot(a_t, b_t, tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32))
                    acc += part * sa[:, None] * sb[None, :]
                else:
                    acc = dot(a_t, b_t, acc)
        else:
            end = tl.minimum(tl.maximum(tl.load(offs_ptr + e), 0), num_rows)
            start = tl.minimum(tl.maximum(tl.load(offs_ptr + e - 1, mask=e > 0, other=0), 0), end)
            for r0 in range(start, end, BLOCK_M):
                rows = r0 + tl.arange(0, BLOCK_M)
                row_ok = rows < end
                src = rows
                if GATHER:
                    src = tl.load(a_index_ptr + rows, mask=row_ok, other=0) // gather_div
                a_r = tl.load(a + src.to(tl.int64)[:, None] * stride_am + k[None, :] * stride_ak,
                              mask=row_ok[:, None] & (k < K)[None, :], other=0.0)
                b_r = tl.load(b + rows.to(tl.int64)[:, None] * stride_bm + n[None, :] * stride_bn,
                              mask=row_ok[:, None] & (n < N)[None, :], other=0.0)
                acc = dot(tl.trans(a_r), b_r, acc)
        ptrs = c_ptr + e.to(tl.int64) * stride_ce + k.to(tl.int64)[:, None] * stride_ck + n[None, :] * stride_cn
        tl.store(ptrs, acc.to(c_ptr.dtype.element_ty), mask=(k < K)[:, None] & (n < N)[None, :])
