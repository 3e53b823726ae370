"""FP8 (e4m3): block-scaled quantization, and the scaled dense and grouped GEMMs, on the DeepSeek-V3
recipe (activations 1 x 128 per token and channel group, weights 128 x 128 per block).

``quantize_fp8(x, granularity)`` -> (q, scale): one float32 scale per block of the last two dims,
``scale = max(amax(|block|), 1e-12) / 448`` (rounded up to a power of two with ``pow2_scale``),
``q = saturate(x / scale)`` rounded to nearest even; bit-exact on every backend (kernels/_fp8.py).

``prepare_weight(w, granularity)`` -> (q, scale): a weight quantized K-major, once (the GEMMs
take e4m3 weights K-major only and reject an N-major one).

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

from . import _autocast, _backend, _checks, _cutlass, _sm90_registry, configs, reference

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
    from .grouped_gemm import fp8_bytes
    from .kernels._fp8 import quantize_fp8_kernel

    batch, _, cols = x3.shape
    rows = q.shape[1]
    nbr, nbc = scale.shape[-2:]
    cfg = configs.quant_config(br, bc, rows, cols)
    grid = (triton.cdiv(rows, cfg.TR) * triton.cdiv(cols, cfg.TC), batch)
    amax = torch.zeros(batch, nbr, nbc, dtype=torch.float32, device=x3.device) if cfg.two_pass else scale
    idx = index if index is not None else scale
    q = fp8_bytes(q)  # e4m3 encoded by integer operations where the GPU has no e4m3 type
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
def quantize_op(x: torch.Tensor, block_rows: int, block_cols: int, pow2_scale: bool, index: torch.Tensor | None,
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


@quantize_op.register_fake
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
    return quantize_op(x, br, bc, bool(pow2_scale), None, None, 1, scale_layout == "col_major", backend or "")


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
    return quantize_op(x, br, bc, bool(pow2_scale), plan.source_index, plan.dest_index, plan.top_k,
                        scale_layout == "col_major", backend or "")


def activation_operand(x: torch.Tensor, pow2_scale: bool, backend: str):
    """The activation operand (a, a_scale) of a GEMM on e4m3 weights: x quantized (1, 128) with
    column-major scales (w8a8, DeepSeek-V3's), or, where the GPU has no e4m3 MMA
    (grouped_gemm.fp8_emulated: sm_80, sm_86), (x, None): the weight-only route of vLLM's Marlin,
    x kept in its own type. There an e4m3 x would only be decoded back to bf16 by the GEMM: a
    quantize pass and e4m3's rounding for nothing."""
    from .grouped_gemm import fp8_emulated

    if fp8_emulated(x.device):
        return x, None
    return quantize_op(x, 1, 128, pow2_scale, None, None, 1, True, backend)


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


# (grouped_mm_kernel variant, rows per expert, N, K, scaling mode): the scaled GEMMs of the fp8
# MoE path (DeepSeek-V3's gate/up and down, a 7168 x 4096 dense slice), every weight K-major (an
# N-major e4m3 weight is rejected: prepare_weight). "+colscale": column-major (1, 128) activation
# scales, as the MoE layer quantizes them.
SM90_FP8_GEMMS = {
    "fp8_block_prefill_kmajor": ("plain", 512, 4096, 7168, 3),
    "fp8_block_prefill_kmajor_colscale": ("plain+colscale", 512, 4096, 7168, 3),
    "fp8_block_decode_kmajor": ("plain", 4, 4096, 7168, 3),
    "fp8_rowcol_prefill_kmajor": ("plain", 512, 4096, 7168, 2),
    "fp8_tensor_prefill_kmajor": ("plain", 512, 4096, 7168, 1),
    "fp8_block_gather_gated_kmajor": ("gather+gated+colscale", 512, 2048, 7168, 3),
    "fp8_block_gather_gated_decode": ("gather+gated+colscale", 4, 2048, 7168, 3),
    # GEMM 1 with a rank-16 LoRA segment in bf16 (issue 16), against fp8_block_gather_gated_kmajor.
    "fp8_block_gather_gated_kmajor_lora16": ("gather+gated+colscale+lora16", 512, 2048, 7168, 3),
    "fp8_block_scatter_kmajor": ("scatter+colscale", 512, 7168, 2048, 3),
    # GEMM 1 with gate and up as two e4m3 weights, each with its own (128, 128) scales (fused_moe's
    # (w_gate, w_up) pair: e4m3 inference and precision="fp8"), against the two above.
    "fp8_block_gather_gated_kmajor_split": ("gather+gated+split+colscale", 512, 2048, 7168, 3),
    "fp8_block_gather_gated_decode_split": ("gather+gated+split+colscale", 4, 2048, 7168, 3),
}


# The weight-only GEMMs (bf16 tokens, e4m3 weights: fused_moe where the GPU has no e4m3 MMA) at
# DeepSeek-V3's shapes: GEMM 1 gathering with SwiGLU (prefill and decode), GEMM 2 scattering.
WEIGHT_ONLY_GEMMS = {
    "w8a16_block_gather_gated_kmajor": ("gather+gated", 512, 2048, 7168),
    "w8a16_block_gather_gated_decode": ("gather+gated", 4, 2048, 7168),
    "w8a16_block_scatter_kmajor": ("scatter", 512, 7168, 2048),
}


@_sm90_registry.register
def sm90_variants(capability: int = 90):
    """The fp8 kernels' compile jobs for ``capability``. Where the GPU has no e4m3 MMA
    (configs.fp8_path "bytes": sm_80, sm_86) every e4m3 operand is its bytes (``u8``:
    grouped_gemm.fp8_bytes), and the weight-only GEMMs that fused_moe runs there are added."""
    import dataclasses

    from . import _sm90, grouped_gemm
    from .kernels._fp8 import quantize_fp8_kernel as fn

    arch = configs.arch_limits(capability)
    as_bytes = configs.fp8_path(arch) == "bytes"
    out = []
    for name, (variant, per_expert, n, k, scale) in SM90_FP8_GEMMS.items():
        cfg = grouped_gemm.sm90_config(variant, per_expert, n, k, FP8, block_scaled=scale == 3, arch=arch)
        launch = "+".join(p for p in variant.split("+") if p != "colscale")
        out.append(grouped_gemm.forward_variant(f"fp8_grouped_mm/{name}", launch, cfg, FP8, True, scale=scale,
                                                out_dtype=torch.bfloat16, col_major_a_scale=launch != variant,
                                                weight_bytes=as_bytes, tma=arch.tma))
    for name, (variant, per_expert, n, k) in WEIGHT_ONLY_GEMMS.items() if as_bytes else ():
        # The launcher picks an e4m3 weight's config (128-wide K steps) for a bf16 x too.
        cfg = grouped_gemm.sm90_config(variant, per_expert, n, k, FP8, block_scaled=True, arch=arch)
        out.append(grouped_gemm.forward_variant(f"fp8_grouped_mm/{name}", variant, cfg, torch.bfloat16, True,
                                                scale=3, weight_bytes=True, tma=arch.tma))
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
    # FP8 training: the wgrad operands' quantize + transpose, and the fp8 weight-gradient GEMM, at
    # DeepSeek-V3's shapes (x [T*k, 7168] and dy [T*k, 2048] rows: K = 7168, N = 2048 per expert).
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out.append(grouped_gemm.segments_variant(f"quantize_fp8_segments/{name}", dtype, FP8, SEGMENT_TILE,
                                                 fmax=FP8_MAX))
    cfg = wgrad_config(32768, 256, 2048, 7168, "h200" if capability == 90 else None, arch)
    out.append(grouped_gemm._dw_variant("fp8_grouped_mm/wgrad_segments", cfg, FP8, False, scaled=True))
    if as_bytes:  # the rest as their bytes too; Hopper's resource table has no row for them
        out = [dataclasses.replace(v, signature={a: t.replace("fp8e4nv", "u8") for a, t in v.signature.items()},
                                   launch_key=None) for v in out]
    return out


# ----------------------------------------------------------------------------- scaled GEMMs

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _check_scaled(a, a_scale, b, b_scale, out_dtype, b_ndim):
    from .grouped_gemm import check_fp8_weight

    _checks.tensor("a", a, ndim=2, dtypes=(FP8,))
    _checks.tensor("b", b, ndim=b_ndim, dtypes=(FP8,), device=a.device)
    check_fp8_weight("b", b)
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
        b: [E, K, N] float8_e4m3fn, K-major: the transposed view of a contiguous [E, N, K]
            tensor (nn.Linear's storage, or :func:`prepare_weight`'s output). wgmma reads e4m3
            operands K-major only; an N-major b (a contiguous [E, K, N]) raises ValueError
            rather than be transposed through shared memory every K step: prepare it once.
        b_scale: float32 scales of the logical [E, K, N]: [E, 1, 1] ("tensor"), [E, 1, N]
            ("col", or "row" of the [E, N, K] storage, transposed) or [E, K / 128, N / 128]
            ((128, 128), or the transposed (128, 128) scales of the storage).
        offs: [E] int32 cumulative segment ends, as in :func:`moekernels.grouped_mm`.
        out_dtype: bfloat16 (default), float16 or float32.
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, None (automatic), or ``"cutlass"``: CUTLASS's
            block-scaled grouped kernels (csrc/fp8_grouped_cutlass*.cu: sm_90 and sm_100 GPUs, chosen by
            capability; (1, 128) x (128, 128) scales, bfloat16 out, K and N multiples of 128). Opt-in only,
            until a GPU validates it: the automatic choice and MOEKERNELS_BACKEND never take it; it raises
            naming why where it cannot run.

    Scaling pairs: tensor x tensor, row x col, and (1, 128) x (128, 128) (K % 128 == 0), where
    every 128-wide K step's partial product is promoted to float32 with its scales. No padding
    of M per expert; rows at or after offs[-1] are zero. Not differentiable (inference).
    """
    _check_scaled(a, a_scale, b, b_scale, out_dtype, 3)
    if backend == "cutlass":
        return _cutlass.fp8_grouped_mm(a, a_scale, b, b_scale, offs, out_dtype)
    from .grouped_gemm import grouped_mm_fused

    return grouped_mm_fused(a, b, offs, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype, backend=backend)


WEIGHT_GRANULARITIES = ("tensor", "col", (128, 128))


def prepare_weight(w: torch.Tensor, granularity=(128, 128), *, scale: torch.Tensor | None = None,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 weight operand of :func:`fp8_grouped_mm` / :func:`fp8_mm`, K-major, made once at
    load time (as DeepGEMM prepares its weights): wgmma reads e4m3 operands K-major only.

    Args:
        w: the logical weight [E, K, N] (or [K, N] for fp8_mm), in either storage: contiguous, or
            the transposed view of an [E, N, K] tensor. float32, bfloat16 or float16: quantized.
            float8_e4m3fn with ``scale``: an already-quantized weight, whose bytes are only
            transposed (no re-quantization; returned as is if already K-major).
        granularity: of the logical [K, N]: ``(128, 128)`` blocks (default; DeepSeek-V3),
            ``"col"`` (one scale per output column n) or ``"tensor"``: the GEMMs' weight scales.
        scale: with an fp8 w, its float32 scales of the logical [.., K, N] (passed through).
        backend: the quantizer's (``quantize_fp8``'s).

    Returns:
        q: [E, K, N] float8_e4m3fn, the transposed view of a contiguous [E, N, K] tensor;
            bit for bit ``quantize_fp8(w, granularity)``'s values, only laid out K-major.
        scale: float32 [E, K / 128, N / 128], [E, 1, N] or [E, 1, 1] (its strides are the
            transpose's too; the GEMMs read any strides).

    The quantization runs on the [E, N, K] storage, whose blocks and scales are the logical ones
    transposed (a block's amax does not depend on its orientation); a contiguous [E, K, N] w is
    copied once to that storage first.
    """
    if w.dtype == FP8:
        if scale is None:
            raise ValueError("scale is required with a float8_e4m3fn w: its float32 scales of the logical "
                             "[.., K, N] (prepare_weight only transposes an fp8 weight's bytes)")
        _checks.tensor("scale", scale, ndim=w.dim(), dtypes=(torch.float32,), device=w.device)
        if w.dim() not in (2, 3):
            raise ValueError(f"w must be [K, N] or [E, K, N], got shape {tuple(w.shape)}")
        return w.transpose(-1, -2).contiguous().transpose(-1, -2), scale
    _checks.tensor("w", w, dtypes=QUANT_INPUTS)
    if w.dim() not in (2, 3):
        raise ValueError(f"w must be [K, N] or [E, K, N], got shape {tuple(w.shape)}")
    if scale is not None:
        raise ValueError("scale goes with a float8_e4m3fn w only (a high-precision w is quantized here)")
    # On the [.., N, K] storage: the transposed granularity ("col" of [K, N] is "row" of [N, K]).
    key = tuple(granularity) if isinstance(granularity, (tuple, list)) else granularity
    storage = {"tensor": "tensor", "col": "row", (128, 128): (128, 128)}.get(key) if isinstance(key, (str, tuple)) \
        else None
    if storage is None:
        raise ValueError(f"granularity must be one of the GEMMs' weight scalings {WEIGHT_GRANULARITIES} (of the "
                         f"logical [K, N]), got {granularity!r}")
    q, s = quantize_fp8(w.transpose(-1, -2), storage, backend=backend)
    return q.contiguous().transpose(-1, -2), s.transpose(-1, -2)


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
    """Scaled fp8 GEMM ``(a * sa) @ (b * sb)``: a [M, K], b [K, N] K-major (the transposed view of
    a contiguous [N, K] weight, or :func:`prepare_weight`'s output; an N-major b raises
    ValueError), scales as in :func:`fp8_grouped_mm` without the expert dim ([1, 1], [1, N] or
    [K / 128, N / 128] for b). The grouped kernel with one group; ``backend`` as there (``"cutlass"``
    included: CUTLASS's grouped kernel with one group)."""
    _check_scaled(a, a_scale, b, b_scale, out_dtype, 2)
    _check_mm_scales(a, a_scale, b, b_scale)
    offs = torch.full((1,), a.shape[0], dtype=torch.int32, device=a.device)
    return fp8_grouped_mm(a, a_scale, b.unsqueeze(0), b_scale.unsqueeze(0), offs, out_dtype=out_dtype,
                          backend=backend)


# ----------------------------------------------------------------------------- FP8 training
# DeepSeek-V3's recipe (technical report, section 3.3) for a grouped GEMM y = x @ w[e] in training:
#   fprop  x in (1, 128) tiles along K, w in (128, 128) blocks;
#   dgrad  dy in (1, 128) tiles along N, times w^T: the forward's blocks, transposed with their scales;
#   wgrad  dw[e] = x_e^T @ dy_e over expert e's tokens, both quantized in (128 tokens x 1 channel)
#          tiles that never cross a segment (quantize_fp8_segments), each tile's product promoted
#          to the float32 sum with its scales.
# Every fp8 product is summed over at most 128 values before it is promoted.

SEGMENT_TILE = 128  # tokens per wgrad tile: DeepSeek-V3's 128 x 1
RECIPES = ("block", "row")


def _segments_shapes(x, offs):
    """q [C, tiles * 128] and scale [tiles, C] (grouped_gemm.segment_columns: a static bound)."""
    from .grouped_gemm import segment_columns

    cols = segment_columns(x.shape[0], offs.shape[0], SEGMENT_TILE)
    return (x.shape[1], cols), (cols // SEGMENT_TILE, x.shape[1])


@torch.library.custom_op("moekernels::quantize_fp8_segments", mutates_args=())
def segments_op(x: torch.Tensor, offs: torch.Tensor, pow2_scale: bool, backend: str) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    q_shape, s_shape = _segments_shapes(x, offs)
    rows = x.shape[0]
    name = _backend.choose("quantize_fp8", x.device, backend or None, cuda_reason=_backend.NO_CUDA_KERNEL)
    if name == "torch":
        return reference.quantize_fp8_segments(x, offs, tile=SEGMENT_TILE, pow2_scale=pow2_scale)
    from .grouped_gemm import transpose_segments

    # Every tile's program writes its columns and scales (zeros for the spare ones): no memset.
    q = torch.empty(q_shape, dtype=FP8, device=x.device)
    scale = torch.empty(s_shape, dtype=torch.float32, device=x.device)
    if not x.shape[0] or not x.shape[1]:
        return q.zero_(), scale.zero_()
    transpose_segments(x, offs, rows, q, scale, tile=SEGMENT_TILE, pow2=pow2_scale, fmax=FP8_MAX)
    return q, scale


@segments_op.register_fake
def _(x, offs, pow2_scale, backend):
    q_shape, s_shape = _segments_shapes(x, offs)
    return x.new_empty(q_shape, dtype=FP8), x.new_empty(s_shape, dtype=torch.float32)


def quantize_fp8_segments(x: torch.Tensor, offs: torch.Tensor, *, pow2_scale: bool = False,
                          backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize and transpose expert-sorted rows for the fp8 weight gradient, in one read.

    Args:
        x: [M, C] float32, bfloat16 or float16, rows sorted by expert (the layer's x or dy).
        offs: [E] int32 cumulative segment ends (``RoutingPlan.expert_offsets``).
        pow2_scale: round each scale up to a power of two.

    Returns:
        q: [C, tiles * 128] float8_e4m3fn, tiles = ceil(M / 128) + E (a static bound: no host sync).
            Token tile g fills columns [128 g, 128 g + 128): ``q[c, 128 g + j] = x[r, c] / scale[g, c]``
            for the tile's j-th token r; the token dim is contiguous (the K-major operand of a
            reduction over tokens) and every tile starts 16-byte aligned. Zeros past a partial
            tile's end and in the spare tiles.
        scale: [tiles, C] float32: one scale per (tile of 128 tokens, channel). The tiles never
            cross a segment, so a segment's last tile is partial; expert e's tiles are numbered
            after those of the experts before it (``reference.segment_tiles``), and the spare rows
            are 0. Rows at or after offs[-1] belong to no tile.

    The same bits on every backend; a NaN or an inf in a tile makes its channel's scale and values
    NaN (as :func:`quantize_fp8`'s blocks).
    """
    _checks.tensor("x", x, ndim=2, dtypes=QUANT_INPUTS)
    _checks.tensor("offs", offs, ndim=1, dtypes=(torch.int32,), device=x.device)
    _checks.offsets_in_range("offs", offs, x.shape[0])
    return segments_op(x, offs, bool(pow2_scale), backend or "")


def wgrad_config(rows: int, num_experts: int, n: int, k: int, gpu: str | None, arch=configs.HOPPER):
    """The fp8 weight gradient's tiles: the weight-gradient config with one token tile (128) a K
    step, and a 64 x 128 output tile for one warpgroup a program. Each token tile's product is
    promoted after a wait_group 0 (triton 3.6), so a second resident program has to fill the
    tensor cores meanwhile, as in the forward's block loop (configs.default_gemm_config): at
    64 x 128 x 128, 4 warps and 3 stages ptxas (sm_90a) gives 255 registers, no spills, 73 KB: two
    programs an SM; the 128 x 128 tile at 8 warps (247 registers, 96 KB) fits one. Fitted to ``arch``
    (configs.fit_gemm_config) after the change of tiles."""
    import dataclasses

    cfg = dataclasses.replace(configs.grouped_mm_config("dw", rows, num_experts, n, k, FP8, gpu, arch=arch),
                              BLOCK_M=SEGMENT_TILE, BLOCK_K=64, num_warps=4)
    return configs.fit_gemm_config(cfg, FP8.itemsize, "dw", arch)


@torch.library.custom_op("moekernels::grouped_mm_dw_fp8", mutates_args=())
def dw_fp8_op(a_t: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
               offs: torch.Tensor, rows: int, transposed: bool, out_dtype: torch.dtype, backend: str) -> torch.Tensor:
    """dw[e] = x_e^T @ dy_e from two quantize_fp8_segments outputs over ``rows`` tokens, laid out
    as the weight is (``transposed``: an [E, N, K] tensor's transpose)."""
    from .grouped_gemm import new_weight_grad

    num_experts, k, n = offs.shape[0], a_t.shape[0], b_t.shape[0]
    out = new_weight_grad((num_experts, k, n), a_scale.new_empty(0, dtype=out_dtype), transposed)
    if _backend.choose("grouped_mm", a_t.device, backend or None, cuda_reason=_backend.NO_CUDA_KERNEL) == "torch":
        out.copy_(reference.grouped_mm_dw_fp8(a_t, a_scale, b_t, b_scale, offs, rows, tile=SEGMENT_TILE))
        return out
    if out.numel():
        from .grouped_gemm import device_arch, gpu_name, launch_dw_kernel

        cfg = wgrad_config(rows, num_experts, n, k, gpu_name(a_t.device), device_arch(a_t.device))
        launch_dw_kernel(a_t, b_t, offs, out, cfg, rows, transposed=True, scales=(a_scale, b_scale))
    return out


@dw_fp8_op.register_fake
def _(a_t, a_scale, b_t, b_scale, offs, rows, transposed, out_dtype, backend):
    from .grouped_gemm import new_weight_grad

    return new_weight_grad((offs.shape[0], a_t.shape[0], b_t.shape[0]), a_scale.new_empty(0, dtype=out_dtype),
                            transposed)


def weight_operands(w: torch.Tensor, recipe: str, backend: str, *, dgrad: bool = True):
    """The fp8 copies of a high-precision weight w (logical [E, K, N], either storage) that the
    GEMMs read, each K-major for its product (wgmma takes e4m3 operands K-major only):
    (fprop b [E, K, N] over [E, N, K] storage, its scale, dgrad b = w^T [E, N, K] over [E, K, N]
    storage, its scale), both by :func:`prepare_weight`. "block": one (128, 128) quantization, its
    blocks and scales transposed for dgrad (exact: a block's scale does not depend on its
    orientation), plus one e4m3 transpose; "row": per output column for each product, two
    quantizations. ``dgrad=False`` (a forward that keeps nothing for backward) skips the dgrad
    copy and returns None for it."""
    b, bs = prepare_weight(w, (128, 128) if recipe == "block" else "col", backend=backend)
    if not dgrad:
        return b, bs, None, None
    if recipe == "block":
        return b, bs, b.contiguous().transpose(1, 2), bs.transpose(1, 2)
    b_t, bs_t = prepare_weight(w.transpose(1, 2), "col", backend=backend)
    return b, bs, b_t, bs_t.contiguous()


def _act_block(recipe: str, cols: int) -> tuple[int, int]:
    return (1, 128) if recipe == "block" else (1, max(cols, 1))


def _fp8_forward(x, w, offs, recipe, keep, backend):
    gemm, backend = backend, _cutlass.others(backend)
    bx = _act_block(recipe, x.shape[1])
    # K-block-major scales for the Triton GEMM; row-major for CUTLASS's K-major SFA (no copy there)
    xq, xs = quantize_op(x, *bx, False, None, None, 1, recipe == "block" and gemm != "cutlass", backend)
    b, bs, b_t, bs_t = weight_operands(w, recipe, backend, dgrad=keep)
    y = grouped_mm_fp8_product(xq, xs, b, bs, offs, x.dtype, gemm)
    if not keep:  # no backward will run: neither the wgrad copy of x nor w^T's
        return (y, *_nothing(x))
    xq_t, xs_t = segments_op(x, offs, False, backend)
    # The e4m3 copies leave as their bytes: outputs of an integer dtype need no gradient (and
    # autograd's checks sum float outputs, which float8 cannot).
    return y, xq_t.view(torch.uint8), xs_t, b_t.transpose(1, 2).view(torch.uint8), bs_t


def grouped_mm_fp8_product(a, a_scale, b, b_scale, offs, out_dtype, backend):
    if backend == "cutlass":  # fprop and dgrad of grouped_mm_fp8(backend="cutlass"): bf16 out
        return _cutlass.product(a, a_scale, b, b_scale, offs)
    from .grouped_gemm import fused_op

    return fused_op(a, b, offs, offs, 1, False, "", None, a_scale, b_scale, out_dtype, backend)


def _nothing(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four backward outputs of a forward that keeps nothing: distinct empty tensors (outputs
    of a custom op may not alias one another)."""
    return tuple(x.new_empty(0, dtype=dtype) for dtype in (torch.uint8, torch.float32, torch.uint8, torch.float32))


def _keep(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a backward may run: then the forward also makes the wgrad copy of x and w^T's."""
    return torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)


@torch.library.custom_op("moekernels::grouped_mm_fp8", mutates_args=())
def _grouped_mm_fp8_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: str, keep: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """y = grouped_mm(x, w, offs) on e4m3, and what its backward keeps, in fp8 (as uint8 bytes): x
    quantized for the weight gradient (quantize_fp8_segments), and w^T's fp8 copy [E, K, N] storage
    with its scale. ``keep=False`` (nothing requires grad): those four are empty, never computed."""
    return _fp8_forward(x, w, offs, recipe, keep, backend)


@_grouped_mm_fp8_op.register_fake
def _(x, w, offs, recipe, keep, backend):
    (m, k), (e, _, n) = x.shape, w.shape
    if not keep:
        return (x.new_empty(m, n), *_nothing(x))
    q_shape, s_shape = _segments_shapes(x, offs)
    ws_shape = (e, -(-n // 128), -(-k // 128)) if recipe == "block" else (e, 1, k)
    return (x.new_empty(m, n), x.new_empty(q_shape, dtype=torch.uint8), x.new_empty(s_shape, dtype=torch.float32),
            x.new_empty(e, k, n, dtype=torch.uint8), x.new_empty(ws_shape, dtype=torch.float32))


def _fp8_setup(ctx, inputs, output):
    x, w, offs, recipe, _, backend = inputs
    _, xq_t, xs_t, wq_t, ws_t = output
    ctx.save_for_backward(offs, xq_t, xs_t, wq_t, ws_t)
    ctx.mark_non_differentiable(xs_t, ws_t)
    from .grouped_gemm import is_kmajor

    ctx.recipe, ctx.backend, ctx.rows, ctx.dtype, ctx.w_dtype = recipe, backend, x.shape[0], x.dtype, w.dtype
    ctx.kmajor = is_kmajor(w)


def _fp8_backward(ctx, grad, *_):
    offs, xq_t, xs_t, wq_t, ws_t = ctx.saved_tensors
    xq_t, wq_t = xq_t.view(FP8), wq_t.view(FP8)
    dx = dw = None
    grad = grad.contiguous()
    gemm, backend = ctx.backend, _cutlass.others(ctx.backend)  # wgrad stays on Triton: a K-grouped GEMM
    if ctx.needs_input_grad[0]:  # dgrad: dy (1, 128) along N times w^T's blocks (K-major: wq_t's storage)
        gq, gs = quantize_op(grad, *_act_block(ctx.recipe, grad.shape[1]), False, None, None, 1,
                              ctx.recipe == "block" and gemm != "cutlass", backend)
        dx = grouped_mm_fp8_product(gq, gs, wq_t.transpose(1, 2), ws_t, offs, ctx.dtype, gemm)
    if ctx.needs_input_grad[1]:  # wgrad: x and dy in (128 tokens x 1 channel) tiles within segments
        gq_t, gs_t = segments_op(grad, offs, False, backend)
        dw = dw_fp8_op(xq_t, xs_t, gq_t, gs_t, offs, ctx.rows, ctx.kmajor, ctx.w_dtype, backend)
    return dx, dw, None, None, None, None


_grouped_mm_fp8_op.register_autograd(_fp8_backward, setup_context=_fp8_setup)
_autocast.register("grouped_mm_fp8", (0, 1))  # under autocast it quantizes the autocast dtype's operands


# torch._grouped_mm's other forms on e4m3, composed as grouped_gemm.compose_form composes them:
# 3D x 3D and 3D x 2D are the 2D x 3D op above over reshaped or transposed operands (its fp8
# fprop, dgrad and wgrad); 2D x 2D, offs along K, is the wgrad product itself: x^T and w in
# (128 along K x 1 channel) tiles that never cross a group, and the fp8 K-grouped GEMM.


@torch.library.custom_op("moekernels::grouped_mm_fp8_kgrouped", mutates_args=())
def _kgrouped_fp8_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    """out[g] = x[:, seg g] @ w[seg g] (x [M, K], w [K, N], offs [G] along K) on e4m3, in x's dtype."""
    _checks.offsets_in_range("offs", offs, x.shape[1])
    xq_t, xs_t = segments_op(x.t(), offs, False, backend)
    wq_t, ws_t = segments_op(w, offs, False, backend)
    return dw_fp8_op(xq_t, xs_t, wq_t, ws_t, offs, x.shape[1], False, x.dtype, backend)


@_kgrouped_fp8_op.register_fake
def _(x, w, offs, backend):
    return x.new_empty(offs.shape[0], x.shape[0], w.shape[1])


def _kgrouped_setup(ctx, inputs, output):
    x, w, offs, backend = inputs
    ctx.save_for_backward(x, w, offs)
    ctx.backend = backend


def _kgrouped_backward(ctx, grad):
    """In the inputs' precision, grouped_mm's ops (differentiable again): dx[:, seg g] = dout[g] @
    w[seg g]^T (3D x 2D) and dw[seg g] = x[:, seg g]^T @ dout[g] (2D x 3D). This form is itself a
    weight gradient, rarely on a training step's path; fp8 products here would need M % 128 and
    N % 128 under the block recipe where its forward needs neither, and the high-precision x and w
    it keeps cost 2-4 bytes an element where fp8 copies would take 1."""
    from .grouped_gemm import grouped_mm_form, grouped_mm_op

    x, w, offs = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_form(grad, w.t(), offs, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_op(x.t(), grad, offs, ctx.backend)
    return dx, dw, None, None


_kgrouped_fp8_op.register_autograd(_kgrouped_backward, setup_context=_kgrouped_setup)
_autocast.register("grouped_mm_fp8_kgrouped", (0, 1))


def _check_block(recipe: str, k: int, n: int, n_name: str = "N", why: str = "") -> None:
    """The block recipe's (1, 128) tiles along K and (128, 128) blocks of the [K, N] operand."""
    if recipe == "block" and (k % 128 or n % 128):
        raise ValueError(f"recipe='block' needs K % 128 == 0 and {n_name} % 128 == 0 (its (1, 128) tiles and "
                         f"(128, 128) blocks{why}), got K={k}, {n_name}={n}; use recipe='row' or pad the operands")


def grouped_mm_fp8(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None = None, *, recipe: str = "block",
                   backend: str | None = None) -> torch.Tensor:
    """A differentiable drop-in for :func:`moekernels.grouped_mm` whose three GEMMs run on e4m3, for
    training with high-precision (master) weights; x and w are quantized on the fly.

    Args:
        x: [M, K] float32, bfloat16 or float16, rows sorted by expert.
        w: [E, K, N], x's dtype: contiguous, or the transposed view of an [E, N, K] tensor.
        offs: [E] int32 cumulative segment ends.
        recipe: ``"block"`` (DeepSeek-V3: x, dy in (1, 128) tiles, w in (128, 128) blocks; needs
            K % 128 == 0 and N % 128 == 0) or ``"row"`` (torchao's: per row x per column).
        backend: ``"torch"``, ``"triton"``, ``"cuda"``, None (automatic), or ``"cutlass"``: fprop and
            dgrad on :func:`fp8_grouped_mm`'s CUTLASS kernel (opt-in, as there: bfloat16 x, recipe
            "block", the 2D x 3D form, sm_90), the quantizes and the wgrad (a K-grouped GEMM) on the
            automatic choice; raises naming why where it cannot run.

    fprop ``y = x @ w``, dgrad ``dx = dy @ w^T`` (w^T reuses the forward's fp8 blocks, transposed
    with their scales: no second quantization), wgrad ``dw[e] = x_e^T @ dy_e`` from
    :func:`quantize_fp8_segments` of x and dy (tiles of 128 tokens x 1 channel that never cross a
    segment). Every fp8 product is promoted to float32 after at most 128 terms (per K step in the
    block recipe, per token tile in wgrad). y, dx and dw come back in x's (and w's) dtype.

    Saved for backward: x's fp8 wgrad copy ([K, M] e4m3 and its scales) and w^T's fp8 copy
    ([E, K, N] e4m3 and its scales): ~1 byte an element instead of x's 2-4 and no re-quantization
    of the weight in backward.

    The other forms of ``torch._grouped_mm`` (see :func:`moekernels.grouped_mm`), with its
    semantics, also differentiable:
        2D x 2D, offs [G] along K: x [M, K], w [K, N] -> [G, M, N], ``out[g] = x[:, seg g] @ w[seg g]``:
            the wgrad product (x^T and w by :func:`quantize_fp8_segments`, the fp8 K-grouped GEMM),
            the same for both recipes, no alignment needed; its backward runs in x's precision
            (grouped_mm's 2D x 3D and 3D x 2D products: see _kgrouped_backward);
        3D x 3D, offs None: x [G, M, K], w [G, K, N] -> [G, M, N], the 2D x 3D op over G segments
            of M rows ("block": K and N % 128);
        3D x 2D, offs [G] along N: x [G, M, K], w [K, N] -> [M, N], the 2D x 3D op transposed,
            ``out^T[seg g] = w^T[seg g] @ x[g]^T``: w^T is the (1, 128)-tiled operand and x[g]^T
            [K, M] the (128, 128)-blocked one ("block": K and M % 128); columns past offs[-1] zero.
    """
    from .grouped_gemm import check_form, check_operands, compose_form

    x, w = _autocast.cast(x, w)
    backend = backend or ""
    if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and (x.dim() == 3 or w.dim() == 2):
        check_form(x, w, offs)
        if backend == "cutlass":
            raise ValueError(f"grouped_mm_fp8: backend='cutlass' runs the 2D x 3D form alone (x [M, K], w [E, K, N]), "
                             f"got x {list(x.shape)} and w {list(w.shape)}")
        _checks.choice("recipe", recipe, RECIPES)
        if x.dim() == 3 and w.dim() == 3:
            _check_block(recipe, x.shape[2], w.shape[2])
        elif x.dim() == 3:
            _check_block(recipe, x.shape[2], x.shape[1], "M", "; 3D x 2D runs transposed: x[g]^T [K, M] is blocked")
        return compose_form(x, w, offs, lambda a, b, o: _grouped_mm_fp8_op(a, b, o, recipe, _keep(a, b), backend)[0],
                            lambda a, b, o: _kgrouped_fp8_op(a, b, o, backend))
    check_operands(x, w, offs, dtypes=QUANT_INPUTS)
    _checks.choice("recipe", recipe, RECIPES)
    _check_block(recipe, w.shape[1], w.shape[2])
    if backend == "cutlass":
        if recipe != "block":
            raise ValueError(f"grouped_mm_fp8: backend='cutlass' runs recipe='block' alone (its (1, 128) x (128, 128) "
                             f"scales), got recipe={recipe!r}")
        _cutlass.check_training("grouped_mm_fp8", x, "x")
    return _grouped_mm_fp8_op(x, w, offs, recipe, _keep(x, w), backend)[0]
