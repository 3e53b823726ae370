"""FP8 (e4m3): block-scaled quantization, and the scaled dense and grouped GEMMs, on the DeepSeek-V3
recipe (activations 1 x 128 per token and channel group, weights 128 x 128 per block).

``quantize_fp8(x, granularity)`` -> (q, scale): one float32 scale per block of the last two dims,
``scale = max(amax(|block|), 1e-12) / 448`` (rounded up to a power of two with ``pow2_scale``),
``q = saturate(x / scale)`` rounded to nearest even; bit-exact on every backend (kernels/_fp8.py).

``fp8_mm`` / ``fp8_grouped_mm`` run the grouped GEMM kernel (kernels/_grouped_gemm.py) on fp8
operands (e4m3 wgmma) with the scales applied in the kernel:
    tensor x tensor: acc * sa * sb after the K loop;
    row x col:       acc * sa[m] * sb[n] after the K loop (torch._scaled_mm's rowwise mode);
    (1, 128) x (128, 128): each 128-wide K step's partial product is promoted to the float32
                     accumulator times sa[m, k/128] * sb[k/128, n/128] (DeepGEMM's promotion: the
                     fp8 tensor-core sum never runs longer than 128 products).
"""

from __future__ import annotations

import torch
import triton

from . import _backend, _checks, _sm90_registry, configs, reference

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
QUANT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)
NAMED = ("tensor", "row", "col")
# "row_major": scale [..., nbr, nbc] contiguous (the default). "col_major": the same logical
# scale, a transposed view of a contiguous [..., nbc, nbr]: for (1, 128) activation scales
# [M, K/128], one K step's M scales are contiguous (DeepGEMM's MN-major scales), so a GEMM
# tile loads them with one coalesced vector load instead of BLOCK_M strided 4-byte loads.
SCALE_LAYOUTS = ("row_major", "col_major")



def block_shape(granularity, rows: int, cols: int) -> tuple[int, int]:
    """The (block rows, block cols) of a granularity over a [rows, cols] matrix; a named one spans
    the whole extent (at least 1, so an empty matrix still has a shape)."""
    if granularity == "tensor":
        return max(rows, 1), max(cols, 1)
    if granularity == "row":
        return 1, max(cols, 1)
    if granularity == "col":
        return max(rows, 1), 1
    return tuple(granularity)


def _check_granularity(granularity) -> None:
    if isinstance(granularity, str) and granularity in NAMED:
        return
    # Any other value, a string included, gets the message that lists every form.
    ok = isinstance(granularity, (tuple, list)) and len(granularity) == 2
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in granularity)
    if not ok or any(v & (v - 1) for v in granularity):
        raise ValueError(f"granularity must be 'tensor', 'row', 'col' or a (rows, cols) pair of powers of two such "
                         f"as (1, 128) or (128, 128), got {granularity!r}")


# ----------------------------------------------------------------------------- quantization


CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cuda_reason(x, block_rows, block_cols, index, inverse):
    """Why csrc/quantize.cu cannot take a call, or None: it takes (1, 128) blocks of 2-D rows."""
    if (block_rows, block_cols) != (1, 128) or x.dim() != 2:
        return "csrc/quantize.cu takes (1, 128) blocks of a 2-D x"
    if index is not None and inverse is None:
        return "the gathered quantize on cuda needs the plan's dest_index"
    return None


def _launch_cuda(x, q, scale, pow2, inverse, top_k):
    from . import _ext

    x = x if x.stride(1) == 1 else x.contiguous()
    # 4 columns a lane in one access: every row start aligned to 4 elements.
    vec = x.shape[1] % 4 == 0 and x.stride(0) % 4 == 0 and x.data_ptr() % (4 * x.element_size()) == 0
    with _backend.device_guard(x):
        _ext.C.quantize_fp8_1x128(x.data_ptr(), _ext.dtype_code(x.dtype), inverse.data_ptr() if inverse is not None
                                  else 0, q.data_ptr(), scale.data_ptr(), *scale.stride(), x.shape[0],
                                  top_k if inverse is not None else 1, x.shape[1], x.stride(0), pow2, vec,
                                  _ext.stream(x))


def _launch_quantize(x3, q, scale, br, bc, pow2, index=None, gather_div=1):
    """x3 [B, R_in, C] (rows gathered by index when given: then R = len(index)), q [B, R, C],
    scale [B, nbr, nbc] of any strides (a transposed view for the column-major layout)."""
    from .kernels._fp8 import quantize_fp8_kernel

    batch, _, cols = x3.shape
    rows = q.shape[1]
    nbr, nbc = scale.shape[-2:]
    cfg = configs.quant_config(br, bc, rows, cols)
    grid = (triton.cdiv(rows, cfg.TR) * triton.cdiv(cols, cfg.TC), batch)
    amax = torch.zeros(batch, nbr, nbc, dtype=torch.float32, device=x3.device) if cfg.two_pass else scale
    idx = index if index is not None else scale
    args = (x3, idx, q, scale, amax, rows, cols, br, bc, nbr, nbc, gather_div, x3.stride(0), x3.stride(1),
            *scale.stride())
    meta = dict(POW2=pow2, GATHER=index is not None, FMAX=FP8_MAX, TR=cfg.TR, TC=cfg.TC, BRF=cfg.BRF,
                BCF=cfg.BCF, num_warps=cfg.num_warps)
    with _backend.device_guard(x3):
        for mode in (1, 2) if cfg.two_pass else (0,):
            quantize_fp8_kernel[grid](*args, MODE=mode, **meta)


def _quant_shapes(x, br, bc, index):
    rows = index.shape[0] if index is not None else x.shape[-2]
    lead = x.shape[:-2]
    return (*lead, rows, x.shape[-1]), (*lead, triton.cdiv(rows, br), triton.cdiv(x.shape[-1], bc))


def _new_scale(x, shape, col_major):
    """The float32 scale [..., nbr, nbc]: row-major, or a transposed view of a contiguous
    [..., nbc, nbr] (col_major: for activations, one K block's M scales are contiguous)."""
    if col_major:
        return x.new_empty(*shape[:-2], shape[-1], shape[-2], dtype=torch.float32).transpose(-1, -2)
    return x.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("moekernels::quantize_fp8", mutates_args=())
def _quantize_op(x: torch.Tensor, block_rows: int, block_cols: int, pow2_scale: bool, index: torch.Tensor | None,
                 inverse: torch.Tensor | None, gather_div: int, col_major_scale: bool,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """index: row r of the rows quantized is x[index[r] // gather_div] (the plan's source_index);
    inverse: its inverse (dest_index), which the cuda kernel walks instead (a token read once);
    col_major_scale: the scale as a transposed view of a contiguous [..., nbc, nbr] tensor."""
    reason = _cuda_reason(x, block_rows, block_cols, index, inverse)
    name = _backend.choose("quantize_fp8", x.device, backend or None, cuda_reason=reason)
    q_shape, s_shape = _quant_shapes(x, block_rows, block_cols, index)
    scale = _new_scale(x, s_shape, col_major_scale)
    if name == "torch":
        rows = x if index is None else reference.permute_rows(x, index, gather_div)
        q, want = reference.quantize_fp8(rows, (block_rows, block_cols), pow2_scale=pow2_scale)
        return q, scale.copy_(want)
    q = torch.empty(q_shape, dtype=FP8, device=x.device)
    if q.numel() and name == "cuda":
        _launch_cuda(x, q, scale, pow2_scale, inverse, gather_div)
    elif q.numel():
        x3 = x.reshape(-1, *x.shape[-2:])
        x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
        _launch_quantize(x3, q.view(-1, *q_shape[-2:]), scale.view(-1, *s_shape[-2:]), block_rows, block_cols,
                         pow2_scale, index, gather_div)
    return q, scale


@_quantize_op.register_fake
def _(x, block_rows, block_cols, pow2_scale, index, inverse, gather_div, col_major_scale, backend):
    q_shape, s_shape = _quant_shapes(x, block_rows, block_cols, index)
    return x.new_empty(q_shape, dtype=FP8), _new_scale(x, s_shape, col_major_scale)


def quantize_fp8(x: torch.Tensor, granularity="row", *, dtype: torch.dtype = FP8, pow2_scale: bool = False,
                 scale_layout: str = "row_major", backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize to float8_e4m3fn with one float32 scale per block of the last two dims [R, C].

    Args:
        x: [..., R, C] float32, bfloat16 or float16; leading dims (experts, say) are batch dims.
        granularity: ``"tensor"`` (one R x C block), ``"row"`` (1 x C), ``"col"`` (R x 1), or a
            (br, bc) pair of powers of two: (1, 128) per token and channel group, (128, 128) per
            weight block (DeepSeek-V3).
        dtype: torch.float8_e4m3fn (the only one).
        pow2_scale: round each scale up to a power of two (UE8M0, as DeepGEMM on Blackwell).
        scale_layout: ``"row_major"`` (default: scale contiguous) or ``"col_major"``: the same
            logical scale, stored [..., C / bc, R / br] (the returned scale is its transposed
            view). The fast layout for the activation scales of :func:`fp8_mm` and
            :func:`fp8_grouped_mm` ((1, 128): one K step's scales are one contiguous vector).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic).

    Returns:
        q: x's shape, float8_e4m3fn, ``q = saturate(x / scale)`` rounded to nearest even, so that
            ``x ~ q.float() * scale`` broadcast over the blocks.
        scale: float32 ``x.shape[:-2] + (ceil(R / br), ceil(C / bc))``,
            ``max(amax(|block|), 1e-12) / 448``: an all-zero block gets 1e-12 / 448 and zeros.

    Transposes compose: "row" scales of an [N, K] weight, transposed with it, are valid "col"
    scales of the logical [K, N] matrix (and likewise for blocks). The same bits on every backend.
    """
    _checks.tensor("x", x, dtypes=QUANT_INPUTS)
    if x.dim() < 2:
        raise ValueError(f"x must have at least 2 dims (the blocks are over the last two), got shape {tuple(x.shape)}")
    if dtype != FP8:
        raise TypeError(f"dtype must be torch.float8_e4m3fn, got {dtype}")
    _check_granularity(granularity)
    _checks.choice("scale_layout", scale_layout, SCALE_LAYOUTS)
    br, bc = block_shape(granularity, x.shape[-2], x.shape[-1])
    return _quantize_op(x, br, bc, bool(pow2_scale), None, None, 1, scale_layout == "col_major", backend or "")


def quantize_fp8_gathered(x: torch.Tensor, plan, granularity=(1, 128), *, pow2_scale: bool = False,
                          scale_layout: str = "row_major", backend: str | None = None):
    """``quantize_fp8(permute(x, plan), granularity)`` in one kernel: the tokens [T, H] are
    quantized as they are gathered into expert order, never written in bf16 (the Triton kernel
    gathers row r from ``x[source_index[r] // k]``; the cuda one, (1, 128) only, quantizes token t
    once and writes it to its k rows ``dest_index[t*k + j]``).

    Returns q [T*k, H] float8_e4m3fn and scale [T*k / br, H / bc] float32 (internal API: the fp8
    MoE path), ``scale_layout`` as in :func:`quantize_fp8`. Not differentiable.
    """
    from .plan import RoutingPlan

    _checks.tensor("x", x, ndim=2, dtypes=QUANT_INPUTS)
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a moekernels.RoutingPlan, got {type(plan).__name__}")
    if plan.source_index.device != x.device or plan.source_index.shape[0] != x.shape[0] * plan.top_k:
        raise ValueError(f"plan must hold the {x.shape[0]} x {plan.top_k} pairs of x's tokens, on {x.device}")
    _check_granularity(granularity)
    _checks.choice("scale_layout", scale_layout, SCALE_LAYOUTS)
    br, bc = block_shape(granularity, plan.source_index.shape[0], x.shape[1])
    return _quantize_op(x, br, bc, bool(pow2_scale), plan.source_index, plan.dest_index, plan.top_k,
                        scale_layout == "col_major", backend or "")


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 ``q * scale``, the scale broadcast over its blocks (block dims from the shapes)."""
    return reference.dequantize_fp8(q, scale)


# ----------------------------------------------------------------------------- sm_90 variants

# (granularity, R, C, input dtype, gather): activations per token group, weights per block,
# rowwise and per tensor (two passes), and the quantize fused with the permute's gather.
SM90_QUANTS = {
    "quant_1x128_bf16": ((1, 128), 4096, 7168, torch.bfloat16, False),
    "quant_128x128_bf16": ((128, 128), 4096, 7168, torch.bfloat16, False),
    "quant_row_bf16": ("row", 4096, 7168, torch.bfloat16, False),
    "quant_col_fp32": ("col", 4096, 7168, torch.float32, False),
    "quant_tensor_bf16": ("tensor", 4096, 7168, torch.bfloat16, False),
    "quant_1x128_gather_bf16": ((1, 128), 32768, 7168, torch.bfloat16, True),
}


# (grouped_mm_kernel variant, rows per expert, N, K, scaling mode, weight storage): the scaled
# GEMMs of the fp8 MoE path (DeepSeek-V3's gate/up and down, a 7168 x 4096 dense slice).
# "+colscale": column-major (1, 128) activation scales, as the MoE layer quantizes them.
SM90_FP8_GEMMS = {
    "fp8_block_prefill_kmajor": ("plain", 512, 4096, 7168, 3, True),
    "fp8_block_prefill_kmajor_colscale": ("plain+colscale", 512, 4096, 7168, 3, True),
    "fp8_block_decode_kmajor": ("plain", 4, 4096, 7168, 3, True),
    "fp8_block_ekn": ("plain", 512, 4096, 7168, 3, False),
    "fp8_rowcol_prefill_kmajor": ("plain", 512, 4096, 7168, 2, True),
    "fp8_tensor_prefill_kmajor": ("plain", 512, 4096, 7168, 1, True),
    "fp8_block_gather_gated_kmajor": ("gather+gated+colscale", 512, 2048, 7168, 3, True),
    "fp8_block_gather_gated_decode": ("gather+gated+colscale", 4, 2048, 7168, 3, True),
    "fp8_block_scatter_kmajor": ("scatter+colscale", 512, 7168, 2048, 3, True),
}


@_sm90_registry.register
def sm90_variants():
    from . import _sm90, grouped_gemm
    from .kernels._fp8 import quantize_fp8_kernel as fn

    out = []
    for name, (variant, per_expert, n, k, scale, kmajor) in SM90_FP8_GEMMS.items():
        cfg = grouped_gemm.sm90_config(variant, per_expert, n, k, FP8)
        launch = "+".join(p for p in variant.split("+") if p != "colscale")
        out.append(grouped_gemm.forward_variant(f"fp8_grouped_mm/{name}", launch, cfg, FP8, kmajor, scale=scale,
                                                out_dtype=torch.bfloat16, col_major_a_scale=launch != variant))
    for name, (granularity, rows, cols, dtype, gather) in SM90_QUANTS.items():
        br, bc = block_shape(granularity, rows, cols)
        cfg = configs.quant_config(br, bc, rows, cols)
        for mode in (1, 2) if cfg.two_pass else (0,):
            cx = dict(MODE=mode, POW2=False, GATHER=gather, FMAX=FP8_MAX, TR=cfg.TR, TC=cfg.TC, BRF=cfg.BRF,
                      BCF=cfg.BCF)
            sig = _sm90.signature(fn, cx, x_ptr=_sm90.ptr(dtype), idx_ptr="*i32", q_ptr=_sm90.ptr(FP8),
                                  scale_ptr="*fp32", amax_ptr="*fp32")
            out.append(_sm90.Variant(f"quantize_fp8/{name}" + (f"_pass{mode}" if cfg.two_pass else ""), fn, sig, cx,
                                     dict(num_warps=cfg.num_warps), aligned=("x_ptr", "q_ptr", "C", "stride_xr"),
                                     rows=True))
    return out


# ----------------------------------------------------------------------------- scaled GEMMs

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_scaled(a, a_scale, b, b_scale, out_dtype, b_ndim):
    _checks.tensor("a", a, ndim=2, dtypes=(FP8,))
    _checks.tensor("b", b, ndim=b_ndim, dtypes=(FP8,), device=a.device)
    _checks.tensor("a_scale", a_scale, ndim=2, dtypes=(torch.float32,), device=a.device)
    _checks.tensor("b_scale", b_scale, ndim=b_ndim, dtypes=(torch.float32,), device=a.device)
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if b.shape[-2] != a.shape[1]:
        raise ValueError(f"K mismatch: a is [M, K={a.shape[1]}] but b is [..., K={b.shape[-2]}, N]")


def fp8_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   offs: torch.Tensor, *, out_dtype: torch.dtype = torch.bfloat16,
                   backend: str | None = None) -> torch.Tensor:
    """Scaled fp8 grouped GEMM: ``y[seg e] = (a[seg e] * sa) @ (b[e] * sb)``, in float32, to out_dtype.

    Args:
        a: [M, K] float8_e4m3fn, rows sorted by expert.
        a_scale: float32 from :func:`quantize_fp8` of the [M, K] rows: [1, 1] ("tensor"),
            [M, 1] ("row") or [M, K / 128] ((1, 128)), in either layout, read by its strides;
            column-major (``scale_layout="col_major"``, [K / 128, M] in memory) is the fast one.
        b: [E, K, N] float8_e4m3fn, usually the transposed view of an [E, N, K] weight.
        b_scale: float32 scales of the logical [E, K, N]: [E, 1, 1] ("tensor"), [E, 1, N]
            ("col", or "row" of the [E, N, K] storage, transposed) or [E, K / 128, N / 128]
            ((128, 128), or the transposed (128, 128) scales of the storage).
        offs: [E] int32 cumulative segment ends, as in :func:`moekernels.grouped_mm`.
        out_dtype: bfloat16 (default), float16 or float32.

    Scaling pairs: tensor x tensor, row x col, and (1, 128) x (128, 128) (K % 128 == 0), where
    every 128-wide K step's partial product is promoted to float32 with its scales. No padding
    of M per expert; rows at or after offs[-1] are zero. Not differentiable (inference).
    """
    _check_scaled(a, a_scale, b, b_scale, out_dtype, 3)
    from .grouped_gemm import grouped_mm_fused

    return grouped_mm_fused(a, b, offs, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, backend=backend)


def _check_mm_scales(a, a_scale, b, b_scale) -> None:
    """fp8_mm's scaling pair, reported in its own 2-D shapes: the grouped check it delegates to
    would show b as [1, K, N], an expert dim the caller never wrote."""
    from .grouped_gemm import scaling_mode

    (m, k), n = a.shape, b.shape[1]
    kb, nb = -(-k // 128), -(-n // 128)
    try:
        scaling_mode(a, a_scale, b.unsqueeze(0), b_scale.unsqueeze(0))
    except ValueError:
        if (tuple(a_scale.shape), tuple(b_scale.shape)) == ((m, kb), (kb, nb)):
            raise  # a supported pair with K % 128 != 0: that message has no expert dim
        raise ValueError(
            f"unsupported scaling pair: a_scale {tuple(a_scale.shape)} and b_scale {tuple(b_scale.shape)} for "
            f"a [{m}, {k}] and b [{k}, {n}]; supported: per tensor ((1, 1) and (1, 1)), per row x per column "
            f"(({m}, 1) and (1, {n})), and (1, 128) x (128, 128) blocks (({m}, {kb}) and ({kb}, {nb}))") from None


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, *,
           out_dtype: torch.dtype = torch.bfloat16, backend: str | None = None) -> torch.Tensor:
    """Scaled fp8 GEMM ``(a * sa) @ (b * sb)``: a [M, K], b [K, N] (usually the transposed view of
    an [N, K] weight), scales as in :func:`fp8_grouped_mm` without the expert dim ([1, 1], [1, N]
    or [K / 128, N / 128] for b). The grouped kernel with one group."""
    _check_scaled(a, a_scale, b, b_scale, out_dtype, 2)
    _check_mm_scales(a, a_scale, b, b_scale)
    offs = torch.full((1,), a.shape[0], dtype=torch.int32, device=a.device)
    return fp8_grouped_mm(a, a_scale, b.unsqueeze(0), b_scale.unsqueeze(0), offs, out_dtype=out_dtype,
                          backend=backend)
