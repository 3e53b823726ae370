"""FP8 (e4m3) quantization with one float32 scale per block of a [B, R, C] tensor.

A program takes a [TR, TC] tile. Blocks are (br, bc) rows x columns; each is either within the
tile or (two-pass) larger than it along an axis, so the tile reshapes to
[TR/BRF, BRF, TC/BCF, BCF] with BRF = min(block rows, TR), BCF likewise, and the block maxima
are two reductions. MODE 0: every block lies within one tile, so one pass computes |x|'s max,
the scale and q from registers. Blocks larger than a tile (per tensor, per column, rows past
16384 elements) take two launches: MODE 1 writes each tile's block maxima with atomic_max (max
is exact and order-free: deterministic) into a zeroed [B, nbr, nbc] buffer, MODE 2 reads them
back and quantizes. The scale of a block is written by the one program holding its first row
and column.

Bit-exact against the reference (torch): the scale is ``max(amax, 1e-12) / fmax`` with an IEEE
division (``div_rn``; Triton's ``/`` is the 2-ulp ``div.full``), rounded up to a power of two
by exponent bits with pow2; q rounds ``x / scale`` to the e4m3 grid in float32 arithmetic
(``round_e4m3``) before the cast, because triton 3.6's interpreter rounds float32 -> fp8
wrongly near binade edges (127.2 -> 64 instead of 128: 1633 of 69638 random values), and a
value already on the grid converts exactly everywhere.

Non-finite input is a data error: a block holding a NaN or an inf gets the NaN scale (the
canonical 0x7FC00000) and all its values NaN, as the reference. |x| enters the block max with
NaN mapped to inf (``abs_or_inf``), because the compiled max and atomic_max drop NaN.

The scale is written with its strides: row-major, or column-major (stride_sr = 1: a tile's
(1, 128) scales of one column block are a contiguous run of TR floats).

With GATHER, row r of the tile is row ``idx[r] // gather_div`` of x: the tokens are quantized
while they are gathered into expert order (the permute of the MoE layer).
"""

import triton
import triton.language as tl

AMAX_FLOOR: tl.constexpr = tl.constexpr(1e-12)  # the scale of an all-zero block: finite and > 0
F32_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def round_e4m3(v):
    """float32 |v| <= 448 -> the nearest e4m3 value (ties to even), still float32.

    Adding c = 2**(e + 20), e the e4m3 exponent of v (at least -6, the subnormal floor), leaves
    the sum with an ulp of 2**(e - 3), e4m3's spacing at v: float32's own round-to-nearest-even
    does the rounding, and subtracting c is exact. The sign bit is copied back (-0.0 stays -0.0).
    """
    bits = v.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    c = ((e + 147) << 23).to(tl.float32, bitcast=True)  # 2**(e + 20)
    r = (tl.abs(v) + c) - c
    return (r.to(tl.int32, bitcast=True) | (bits & -2147483648)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits(v):
    """float32 -> e4m3fn bytes (uint8) by integer operations, as the GPU's cvt.rn.satfinite:
    rounded to nearest even, saturated to +-448 (inf too), NaN -> 0x7F. For GPUs whose Triton
    cannot name e4m3 (sm_80, sm_86: kernels/_math.py, e4m3_to_float). torch's CPU cast gives the
    same bytes, but for a negative NaN (0xFF)."""
    c = tl.minimum(tl.maximum(v, -448.0, propagate_nan=tl.PropagateNan.ALL), 448.0,
                   propagate_nan=tl.PropagateNan.ALL)
    r = round_e4m3(c)
    bits = r.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 120  # e4m3's biased exponent (bias 7 = 127 - 120)
    # Below 2**-6 the value is a subnormal m * 2**-9, m = 0..7 (exact: r is on e4m3's grid).
    mag = tl.where(exp > 0, (exp << 3) | ((bits >> 20) & 7), (tl.abs(r) * 512.0).to(tl.int32))
    out = tl.where(r == r, mag | ((bits >> 24) & 0x80), 0x7F)
    return out.to(tl.uint8)


@triton.jit
def to_output(q, dtype: tl.constexpr):
    """q as the output's element type: uint8 is e4m3's bytes where the GPU has no e4m3 type
    (e4m3_bits); float8e4nv, or the unquantized copy's own type, a cast."""
    if dtype == tl.uint8:
        out = e4m3_bits(q)
    else:
        out = q.to(dtype)
    return out


@triton.jit
def abs_or_inf(x):
    """|x|, with NaN mapped to +inf: the compiled max (max.f32, atomic max) drops NaN, but keeps
    inf, so a block's max is inf exactly when the block holds a NaN or an inf."""
    a = tl.abs(x)
    return tl.where(a <= F32_MAX, a, float("inf"))


@triton.jit
def block_scale(amax, FMAX: tl.constexpr, POW2: tl.constexpr):
    s = tl.math.div_rn(tl.maximum(amax, AMAX_FLOOR), tl.full(amax.shape, FMAX, tl.float32))
    if POW2:  # round up to a power of two (UE8M0): bump the exponent unless the mantissa is 0
        bits = s.to(tl.int32, bitcast=True)
        up = tl.where((bits & 0x7FFFFF) != 0, ((bits >> 23) + 1) << 23, bits)
        s = up.to(tl.float32, bitcast=True)
    # A non-finite block (amax = inf from abs_or_inf) gets the canonical NaN, as the reference.
    nan = tl.full(amax.shape, 0x7FC00000, tl.int32).to(tl.float32, bitcast=True)
    return tl.where(amax <= F32_MAX, s, nan)


@triton.jit
def quantize_fp8_kernel(x_ptr, idx_ptr, q_ptr, scale_ptr, amax_ptr,
                        R, C, br, bc, nbr, nbc, gather_div, stride_xb, stride_xr, stride_sb, stride_sr, stride_sc,
                        MODE: tl.constexpr, POW2: tl.constexpr, GATHER: tl.constexpr, FMAX: tl.constexpr,
                        TR: tl.constexpr, TC: tl.constexpr, BRF: tl.constexpr, BCF: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    n_ct = tl.cdiv(C, TC)
    r0 = (tl.program_id(0) // n_ct) * TR
    c0 = (tl.program_id(0) % n_ct) * TC
    rows = r0 + tl.arange(0, TR)
    cols = c0 + tl.arange(0, TC)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < C)[None, :]
    NBR: tl.constexpr = TR // BRF
    NBC: tl.constexpr = TC // BCF
    sub_r = r0 + tl.arange(0, NBR) * BRF  # first row of each block-row part in the tile
    sub_c = c0 + tl.arange(0, NBC) * BCF
    blk_r = (sub_r // br)[:, None]
    blk_c = (sub_c // bc)[None, :]
    blk = b * nbr * nbc + blk_r * nbc + blk_c  # in the contiguous amax buffer
    blk_ok = (sub_r < R)[:, None] & (sub_c < C)[None, :]
    src = rows
    if GATHER:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0) // gather_div
    x = tl.load(x_ptr + b * stride_xb + src.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=mask,
                other=0.0).to(tl.float32)
    if MODE == 2:
        amax = tl.load(amax_ptr + blk, mask=blk_ok, other=0.0)
    else:
        amax = tl.max(tl.max(tl.reshape(abs_or_inf(x), (NBR, BRF, NBC, BCF)), axis=3), axis=1)
        if MODE == 1:
            tl.atomic_max(amax_ptr + blk, amax, mask=blk_ok)
    if MODE != 1:
        scale = block_scale(amax, FMAX, POW2)
        first = ((sub_r % br) == 0)[:, None] & ((sub_c % bc) == 0)[None, :]
        tl.store(scale_ptr + b * stride_sb + blk_r * stride_sr + blk_c * stride_sc, scale, mask=blk_ok & first)
        s = tl.reshape(tl.broadcast_to(tl.reshape(scale, (NBR, 1, NBC, 1)), (NBR, BRF, NBC, BCF)), (TR, TC))
        out = q_ptr + b * R * C + rows.to(tl.int64)[:, None] * C + cols[None, :]
        tl.store(out, to_output(quantize_values(x, s, FMAX), q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def quantize_values(x, s, FMAX: tl.constexpr):
    """x / s saturated to +-FMAX and rounded to the e4m3 grid, float32 (cast it to e4m3 to store)."""
    # x / NaN is NaN, and the clamp keeps it (a plain min/max would turn it into -448).
    v = tl.maximum(tl.math.div_rn(x, s), -FMAX, propagate_nan=tl.PropagateNan.ALL)
    q = round_e4m3(tl.minimum(v, FMAX, propagate_nan=tl.PropagateNan.ALL))
    # A NaN with e4m3's three mantissa bits set (0x7FF00000): the GPU converts any NaN to
    # e4m3's NaN, the interpreter keeps the top mantissa bits (0x7FC00000 would become 384).
    return tl.where(q == q, q, tl.full(q.shape, 0x7FF00000, tl.int32).to(tl.float32, bitcast=True))


@triton.jit
def transpose_segments_kernel(x_ptr, idx_ptr, offs_ptr, q_ptr, scale_ptr, R, C, num_experts, gather_div, stride_xr,
                              stride_qc, QUANT: tl.constexpr, GATHER: tl.constexpr, POW2: tl.constexpr,
                              FMAX: tl.constexpr, TILE: tl.constexpr, BC: tl.constexpr, BLOCK_E: tl.constexpr):
    """The weight gradient's operand: rows of x [R, C] (sorted by expert, segments ending at offs;
    with GATHER row r is ``x[idx[r] // gather_div]``, gathered while it is transposed) cut into
    tiles of TILE tokens that never cross a segment, written transposed into tile-aligned columns:
    q [C, tiles * TILE], tile g in columns g * TILE.. (zeros past a partial tile's end). Program
    (g, channel block) takes token tile g: the tiles are numbered segment by segment
    (reference.segment_tiles), and g's expert is the count of experts whose tiles all come before
    it, from one [BLOCK_E] vector of offs. A program past the last tile (the bound has a spare
    tile an expert) writes zeros: no memset of the outputs.

    QUANT (the fp8 weight gradient): each (tile x 1 channel) block quantized to q's e4m3 with its
    float32 scale, scale [tiles, C]; without it q holds x's values as they are (the fp32 weight
    gradient: tf32 wgmma reads both operands reduction-contiguous too), and scale_ptr is unused.

    Tile-aligned columns are what lets the wgrad GEMM read a tile with 16-byte copies: a segment
    starts at any token, and a token-contiguous copy of it would start at any byte.

    Non-finite input: a NaN or an inf in a tile makes its channel's scale and values NaN, as
    quantize_fp8_kernel and the reference do."""
    g = tl.program_id(0)
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx < num_experts
    ends = tl.minimum(tl.maximum(tl.load(offs_ptr + e_idx, mask=e_ok, other=0), 0), R)
    starts = tl.maximum(tl.minimum(tl.load(offs_ptr + e_idx - 1, mask=e_ok & (e_idx > 0), other=0), ends), 0)
    tiles = tl.where(e_ok, tl.cdiv(ends - starts, TILE), 0)
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= g).to(tl.int32), 0)
    in_tile = e < num_experts
    first = tl.sum(tl.where(e_idx == e, cum - tiles, 0), 0)
    start = tl.sum(tl.where(e_idx == e, starts, 0), 0)
    end = tl.where(in_tile, tl.sum(tl.where(e_idx == e, ends, 0), 0), 0)
    j = tl.arange(0, TILE)
    rows = start + (g - first) * TILE + j
    row_ok = rows < end
    cols = tl.program_id(1) * BC + tl.arange(0, BC)
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    src = rows
    if GATHER:
        src = tl.load(idx_ptr + rows, mask=row_ok, other=0) // gather_div
    x = tl.load(x_ptr + src.to(tl.int64)[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0)
    if QUANT:
        x = x.to(tl.float32)
        scale = tl.where(in_tile, block_scale(tl.max(abs_or_inf(x), axis=0), FMAX, POW2), 0.0)
        tl.store(scale_ptr + g.to(tl.int64) * C + cols, scale, mask=col_ok)
        x = tl.where(mask, quantize_values(x, scale[None, :], FMAX), 0.0)  # padding and spare tiles: zeros
    tl.store(q_ptr + cols.to(tl.int64)[None, :] * stride_qc + (g.to(tl.int64) * TILE + j)[:, None],
             to_output(x, q_ptr.dtype.element_ty), mask=col_ok[None, :])
