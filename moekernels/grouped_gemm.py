"""Stage 4, grouped GEMM: the expert weights applied to the expert-sorted rows.

``grouped_mm(x, w, offs)``: ``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]``, rows at or
after ``offs[-1]`` zero; the 2D x 3D case of ``torch._grouped_mm`` (its 2D x 2D, 3D x 3D and 3D x 2D
forms are compositions of the two kernels below: see :func:`grouped_mm`). Differentiable:
    dx = grouped_mm(dy, w^T)                  (the same kernel, the weight read transposed)
    dw[e] = x[seg e]^T @ dy[seg e]            (a K-grouped GEMM, zeros for an empty expert)

The fused variants the MoE layer needs (internal: :func:`grouped_mm_fused`) are the same
kernel with a gather prologue (row r of x is ``x[source_index[r] // k]``: the permutation is
never written), a gated epilogue (``act(gate) * up`` from the two halves of a [K, 2N] weight: the
[M, 2N] product is never written) and a weighted-scatter epilogue (row r scaled by its pair's
router weight and written to the pair's row ``source_index[r]`` of a [T*k, N] output, ready for
the combine). Their backward recomputes the gate/up (or unscaled) product with one grouped GEMM
instead of saving [M, 2N] activations, then runs the two gradient GEMMs above; the gather's
backward is the unweighted combine of :func:`moekernels.permute`'s backward. Elementwise glue
(the activation's derivative, the per-pair dot of the router-weight gradient) is torch.

Backends: ``torch`` (reference.py, a loop over experts in float32) and ``triton``
(kernels/_grouped_gemm.py). Everything is on the device: the tile schedule is built in the
kernel from ``offs``, the grid is a static bound, and no call reads a tensor on the host, so
the ops capture in CUDA graphs and trace under ``torch.compile(fullgraph=True)``.

Dtypes: bfloat16 and float16 accumulate in float32. float32 inputs run on the tensor cores as
tf32 (10-bit mantissa, as torch with ``allow_tf32``): about 1e-3 relative error on a GPU.
"""

from __future__ import annotations

import functools

import torch
import triton

from . import _autocast, _backend, _checks, _sm90_registry, configs, reference

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ACTIVATIONS = {"": 0, "silu": 1, "gelu": 2}
# Programs of the persistent grid under the interpreter: a few, so that each walks several
# work items as it does on a GPU (one per SM there).
INTERPRETER_PROGRAMS = 3


@functools.cache
def _gpu_props(index: int):
    return torch.cuda.get_device_properties(index)


def gpu_name(device: torch.device) -> str | None:
    """"h100" or "h200" (the tuned tables' names), else None. Cached: no query per call."""
    if device.type != "cuda":
        return None
    name = _gpu_props(device.index if device.index is not None else torch.cuda.current_device()).name
    return next((g for g in ("h200", "h100") if g in name.lower()), None)


def device_arch(device: torch.device) -> configs.ArchLimits:
    """The architecture limits the configs of a launch on ``device`` are fitted to: its compute
    capability's (configs.device_limits, checked against what the device reports, once per device);
    Hopper's for CPU tensors, whose interpreted launches take the configs the sm_90 contract holds."""
    if device.type != "cuda":
        return configs.HOPPER
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _device_limits(index: int) -> configs.ArchLimits:
    return configs.device_limits(_gpu_props(index))


def num_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _gpu_props(device.index if device.index is not None else torch.cuda.current_device()).multi_processor_count


def fp8_emulated(device: torch.device) -> bool:
    """Whether e4m3 tensors reach this device's kernels as their bytes (uint8): on a GPU without
    e4m3 MMA (configs.fp8_path "bytes": sm_80, sm_86), where Triton cannot name the type. The GEMMs
    then decode e4m3 tiles to bf16 as they load them (kernels/_math.py, ``dot``) and multiply on
    bf16 MMA; the quantize kernels encode e4m3 by integer operations; permute moves the bytes.
    CPU tensors stand for Hopper (device_arch); tests force the route through configs.fp8_path."""
    return configs.fp8_path(device_arch(device)) == "bytes"


def fp8_bytes(t: torch.Tensor, force: bool = False) -> torch.Tensor:
    """t as a kernel argument: an e4m3 tensor as its bytes (a uint8 view) where its device has no
    e4m3 MMA, or with ``force`` (a weight-only product: no MMA takes e4m3 times bf16); any other
    tensor as it is."""
    if t.dtype == torch.float8_e4m3fn and (force or fp8_emulated(t.device)):
        return t.view(torch.uint8)
    return t


def _tma_ok(t: torch.Tensor) -> bool:
    """A TMA descriptor needs a 16-byte aligned base, unit inner stride, 16-byte outer strides and
    positive extents (K = 0 reaches a launch with a LoRA segment: pointer loads, no K steps)."""
    return (t.numel() > 0 and t.data_ptr() % 16 == 0 and t.stride(-1) == 1
            and all(s * t.element_size() % 16 == 0 for s in t.stride()[:-1]))


def _weight_storage(w: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The [E, K, N] weight as the kernel reads it: itself (N inner), or the [E, N, K] tensor it is
    a transposed view of (K inner, ``kmajor``: nn.Linear's storage, read in place). Where both
    dims are unit-stride (K or N of 1), fp8 takes the K-major reading, the only one it accepts."""
    if w.stride(1) == 1 and (w.stride(2) != 1 or w.dtype == torch.float8_e4m3fn):
        return w.transpose(1, 2), True
    if w.stride(2) == 1:
        return w, False
    return w.contiguous(), False  # neither dim is unit-stride: one copy, then the fast path


def _descriptor_strides(storage: torch.Tensor) -> list[int]:
    """The [E, rows, cols] weight storage's strides for its TMA descriptor. With one expert the
    outer stride is never stepped, but a view may carry any (``b.unsqueeze(0)`` of a transposed
    [N, K] weight has outer stride K, less than the N * K it spans): give it the expert's span,
    so the descriptor is well-formed (each stride at least the extent of the dims inside it)."""
    strides = list(storage.stride())
    if storage.shape[0] == 1:
        strides[0] = storage.shape[1] * strides[1]
    return strides


def is_kmajor(w: torch.Tensor) -> bool:
    return _weight_storage(w)[1]


def check_fp8_weight(name: str, w: torch.Tensor) -> None:
    """An e4m3 weight w [..., K, N] must be K-major (``w.stride(-2) == 1``: the transposed view of
    a [..., N, K] tensor): wgmma reads e4m3 operands K-major only, so an N-major one would be
    transposed through shared memory every K step (issue 13, item 3). Transposed once instead,
    by moekernels.fp8.prepare_weight."""
    if w.stride(-2) == 1 or not w.numel():
        return
    lead = "E, " if w.dim() == 3 else ""
    raise ValueError(
        f"{name} must be K-major: the transposed view of a contiguous [{lead}N, K] float8_e4m3fn tensor "
        f"(wgmma reads e4m3 operands K-major only), got {name} {list(w.shape)} with strides {tuple(w.stride())}. "
        f"Prepare the weight once with moekernels.fp8.prepare_weight(w) from the high-precision [{lead}K, N] "
        f"weight, or prepare_weight(q, scale=s) from an fp8 one (one transpose of its bytes)")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# ----------------------------------------------------------------------------- launchers


def num_stages(cfg, scale_mode: int, act: int, weight_bytes: bool = False) -> int:
    """Software-pipeline stages of a forward launch. The block-scaled fp8 loop without an
    activation takes two K steps an iteration (kernels/_grouped_gemm.py, _block_scaled_loop; its
    weight is always K-major), so half the stages (at least 2) prefetch as many K steps: 2 stages
    of two 128x128x128 fp8 steps are 128 KB of shared memory, where 3 would be 192 KB. Not with
    the weight as bytes (``weight_bytes``, see fp8_bytes: _dequantized_loop, one step an iteration)."""
    two_steps = scale_mode == 3 and not act and not weight_bytes
    return max(2, (cfg.num_stages + 1) // 2) if two_steps else cfg.num_stages


def _launch(x, w, offs, out, *, variant, rows, act=0, a_index=None, gather_div=1, c_index=None, c_scale=None,
            scales=None, lora=None, w_up=None, up_scale=None):
    """out[:, :N] = epilogue(A @ w[e] + lora_x @ lora_w[e]) over ``rows`` rows of A (x, or x
    gathered by a_index).

    ``w_up`` (with ``act``): the up half as its own [E, K, N] weight beside the gate ``w`` [E, K, N]
    (``up_scale`` its scales, as b_scale): both read in place by one launch (SPLIT_UP), never
    concatenated; a w_up whose storage strides differ from w's is made like w's (one copy).

    ``scales`` (fp8 operands): (mode, a_scale, b_scale) with mode 1 (per tensor: a_scale [1, 1],
    b_scale [E, 1, 1]), 2 (rows x columns: [M, 1] and [E, 1, N]) or 3 ((1, 128) x (128, 128)
    blocks: [M, K/128] and [E, K/128, N/128]); any strides. x may be e4m3 or, with an e4m3 w, of
    a 16-bit type (the weight-only route: a_scale all ones). ``lora``: (lora_x [rows, r] over the
    sorted rows, lora_w [E, r, w.shape[2]] of any strides), or None.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .kernels._grouped_gemm import grouped_mm_kernel

    num_experts, k, _ = w.shape
    n = out.shape[1]
    x = _rows(x)
    storage, kmajor = _weight_storage(w)
    split = w_up is not None
    if split:
        up_storage = (w_up.transpose(1, 2) if kmajor else w_up)
        if up_storage.stride() != storage.stride():  # one kernel, one set of strides: both made dense
            storage, up_storage = storage.contiguous(), up_storage.contiguous()
    if scales is not None and not kmajor:
        check_fp8_weight("w", w)  # raises: the kernel has no N-major e4m3 path
    arch = device_arch(x.device)
    # e4m3 as bytes, decoded to the other operand's type in the kernel (kernels/_math.py, dot).
    x, storage = fp8_bytes(x), fp8_bytes(storage, force=x.dtype != w.dtype)
    if split:
        up_storage = fp8_bytes(up_storage, force=x.dtype != w.dtype)
    # Descriptors only where the architecture has TMA: Triton 3.6 lowers them on sm_80 and sm_89 to
    # plain loads, unpipelined (the 128x128x64 bf16 tiles took 32 KB of shared memory, one stage)
    # and spilling at 255 registers (the decode tiles: 228 B); 16-byte pointer loads pipeline by
    # cp.async there without spills (_matrix, sm_80: the decode tiles at 168 registers).
    a_tma = a_index is None and _tma_ok(x) and arch.tma
    # The up half of a gated [K, 2N] weight starts at column N: with N inner (not kmajor) that
    # tile's start must be 16-byte aligned too (bf16 N = 4 is 8 bytes: the interpreter asserts).
    aligned = _tma_ok(storage) and (kmajor or not act or n * storage.element_size() % 16 == 0)
    if split:  # its up tiles start at column 0 of its own storage
        aligned = _tma_ok(storage) and _tma_ok(up_storage)
    if not aligned:  # weight rows not 16-byte aligned (an odd K or N): small tiles, see default_gemm_config
        variant = "unaligned"
    b_tma = aligned and arch.tma
    cfg = configs.grouped_mm_config(variant, rows, num_experts, n, k, w.dtype, gpu_name(x.device),
                                    block_scaled=scales is not None and scales[0] == 3, kmajor=kmajor, arch=arch)
    if cfg.SPLIT_GATED:  # a decode step too small to fill the GPU: see configs.split_gated_decode
        z = out.new_empty(rows, 2 * n, dtype=torch.float32)  # float32: one rounding, as the fused epilogue
        if split:  # gate and up products into the two halves of z, each with its half of the segment
            halves = ((w, z[:, :n], scales, lora and (lora[0], lora[1][..., :n])),
                      (w_up, z[:, n:], scales and (scales[0], scales[1], up_scale),
                       lora and (lora[0], lora[1][..., n:])))
            for w_half, z_half, s_half, lora_half in halves:
                _launch(x, w_half, offs, z_half, variant="plain", rows=rows, a_index=a_index, gather_div=gather_div,
                        scales=s_half, lora=lora_half)
        else:
            _launch(x, w, offs, z, variant="plain", rows=rows, a_index=a_index, gather_div=gather_div, scales=scales,
                    lora=lora)
        out.copy_(reference.gated_activation(z, next(name for name, v in ACTIVATIONS.items() if v == act)))
        return
    a = TensorDescriptor(x, [rows, k], [x.stride(0), 1], [cfg.BLOCK_M, cfg.BLOCK_K]) if a_tma else x
    block_b = [1, cfg.BLOCK_N, cfg.BLOCK_K] if kmajor else [1, cfg.BLOCK_K, cfg.BLOCK_N]
    b = TensorDescriptor(storage, list(storage.shape), _descriptor_strides(storage), block_b) if b_tma else storage
    if split:
        b_up = (TensorDescriptor(up_storage, list(up_storage.shape), _descriptor_strides(up_storage), block_b)
                if b_tma else up_storage)
    # Strides of the logical [E, K, N] weight, for the pointer path.
    se, sk, sn = storage.stride(0), *(storage.stride()[::-1][:2] if kmajor else storage.stride()[1:])
    bound = (triton.cdiv(rows, cfg.BLOCK_M) + num_experts) * triton.cdiv(n, cfg.BLOCK_N)  # work items, at most
    # Unused placeholders without fp8 (out, any float tensor); out may be a column slice (a split z's half).
    placeholder = out.view(1, 1, -1) if out.is_contiguous() else out[:1, :1].unsqueeze(0)
    scale_mode, a_scale, b_scale = scales if scales is not None else (0, out, placeholder)
    lora_x, lora_w = (_rows(lora[0]), lora[1]) if lora is not None else (offs, placeholder)
    rank = lora_w.shape[1]
    cx = kernel_constexprs(cfg, a_tma=a_tma, b_tma=b_tma, kmajor=kmajor, gather=a_index is not None,
                           scatter=c_index is not None, act=act, scale=scale_mode,
                           block_e=triton.next_power_of_2(num_experts), rank=rank if lora is not None else None,
                           split_up=split)
    stages = num_stages(cfg, scale_mode, act, storage.dtype == torch.uint8)
    per_sm = programs_per_sm(cfg, cx, x.dtype, out.dtype, stages, arch) if x.is_cuda else 1
    dummy = offs
    if scale_mode == 3:
        assert cfg.BLOCK_K == 128 and 128 % cfg.BLOCK_N == 0, f"block-scaled fp8 needs 128-wide K steps: {cfg}"
    with _backend.device_guard(x):
        grouped_mm_kernel[(min(num_programs(x.device) * per_sm, bound),)](
            a, a_index if a_index is not None else dummy, b, out, c_index if c_index is not None else dummy,
            c_scale if c_scale is not None else out, offs, a_scale, b_scale, lora_x, lora_w,
            b_up if split else b, up_scale if split and up_scale is not None else b_scale, rows, n, k, num_experts,
            gather_div, x.stride(0), se, sk, sn, out.stride(0),
            a_scale.stride(0), a_scale.stride(-1), *b_scale.stride(), rank, lora_x.stride(0), *lora_w.stride(),
            **cx, num_warps=cfg.num_warps, num_stages=stages,
        )


def kernel_constexprs(cfg, *, a_tma, b_tma, kmajor, gather, scatter, act, scale, block_e, rank=None,
                      split_up=False) -> dict:
    """grouped_mm_kernel's constexprs of one launch (the launcher and the sm_90 variants share it);
    ``rank``: the low-rank segment's r, None without one; ``split_up``: gate and up as two weights
    (SPLIT_UP; configs.launch_key names it only when set: the fused form's keys stay as they were)."""
    return dict(SPLIT_UP=split_up, A_TMA=a_tma, B_TMA=b_tma, B_KMAJOR=kmajor, GATHER=gather, SCATTER=scatter, ACT=act,
                SWAP_AB=cfg.SWAP_AB, SCALE=scale, LORA=rank is not None,
                BLOCK_R=configs.lora_block(rank, act != 0) if rank is not None else 0, BLOCK_M=cfg.BLOCK_M,
                BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, BLOCK_E=block_e, GROUP_M=cfg.GROUP_M)


def programs_per_sm(cfg, cx: dict, dtype, out_dtype, stages: int, arch: configs.ArchLimits = configs.HOPPER) -> int:
    """Persistent programs per SM of a grouped_mm_kernel launch: on sm_90, what its sm_90a compile
    allows (configs/sm90_resources.json, registers and shared memory read from ptxas's cubin), so
    that the grid never holds a second wave it assumed resident; the estimate for ``arch``
    otherwise, and for a config the table lacks (a tuned table's config not among the shipped ones)."""
    if arch.capability == 90:
        key = configs.launch_key("grouped_mm_kernel", dtype, out_dtype, cx, cfg.num_warps, stages)
        per_sm = configs.sm90_programs_per_sm(key)
        if per_sm is not None:
            return per_sm
    if cx["LORA"]:  # the segment's tiles add 1-90 registers (configs.lora_block): never assume a second program
        return 1
    # float32 tiles held: block-scaled fp8 adds the per-step products (two, in flight and being
    # promoted, without an activation; one with it).
    scaled = cx["SCALE"] == 3
    accumulators = (2 if cx["ACT"] else 1) * (2 if scaled else 1) + (scaled and not cx["ACT"])
    return configs.programs_per_sm(cfg, dtype.itemsize, "gated" if cx["ACT"] else "plain", accumulators, arch)


# Channels a program of the segment transpose: TILE x 64 values (fp8's 128-token tiles: 32 float32
# a thread at 8 warps).
SEGMENT_COLS = 64


def segment_columns(rows: int, num_experts: int, tile: int) -> int:
    """Columns of a segment transpose of ``rows`` sorted rows: tiles = ceil(rows / tile) + E, the
    static bound (each segment adds at most one partial tile), so no host sync sizes them."""
    return (triton.cdiv(rows, tile) + num_experts) * tile


def transpose_segments(x, offs, rows, q, scale=None, *, tile, a_index=None, gather_div=1, pow2=False, fmax=1.0):
    """Launch kernels/_fp8.transpose_segments_kernel: the ``rows`` sorted rows of x (row r is
    ``x[a_index[r] // gather_div]`` with a_index) into q [C, segment_columns(rows, E, tile)], each
    expert's token tiles transposed into tile-aligned columns; quantized with ``scale`` [tiles, C]
    (the fp8 weight gradient), or copied as they are without it."""
    from .kernels._fp8 import transpose_segments_kernel

    x = _rows(x)
    q = fp8_bytes(q)  # e4m3 encoded by integer operations where the GPU has no e4m3 type
    num_experts = offs.shape[0]
    with _backend.device_guard(x):
        transpose_segments_kernel[(q.shape[1] // tile, triton.cdiv(x.shape[1], SEGMENT_COLS))](
            x, a_index if a_index is not None else offs, offs, q, scale if scale is not None else q, rows, x.shape[1],
            num_experts, gather_div, x.stride(0), q.stride(0), QUANT=scale is not None, GATHER=a_index is not None,
            POW2=pow2, FMAX=fmax, TILE=tile, BC=SEGMENT_COLS, BLOCK_E=triton.next_power_of_2(num_experts),
            num_warps=8)


def _launch_dw(a, grad, offs, out, *, a_index=None, gather_div=1):
    """out[e] = A[seg e]^T @ grad[seg e], out [E, K, N] of any strides."""
    num_experts, k, n = out.shape
    rows = grad.shape[0]
    cfg = configs.grouped_mm_config("dw", rows, num_experts, n, k, a.dtype, gpu_name(a.device),
                                    arch=device_arch(a.device))
    if a.dtype != torch.float32:
        launch_dw_kernel(_rows(a), _rows(grad), offs, out, cfg, rows, a_index=a_index, gather_div=gather_div)
        return
    # tf32 wgmma reads both operands K-major (here: token-contiguous) only, so fp32 rows as they
    # are came by 4-byte cp.async (48 a thread a K step at 64 x 128 x 64); their tile-aligned
    # transposes (the fp8 weight gradient's layout, unquantized, gathered while copied) come by
    # TMA, for 8 * M * (K + N) bytes written and read once (benchmarks/NOTES.md).
    cols = segment_columns(rows, num_experts, cfg.BLOCK_M)
    a_t, grad_t = a.new_empty(k, cols), grad.new_empty(n, cols)
    transpose_segments(a, offs, rows, a_t, tile=cfg.BLOCK_M, a_index=a_index, gather_div=gather_div)
    transpose_segments(grad, offs, rows, grad_t, tile=cfg.BLOCK_M)
    launch_dw_kernel(a_t, grad_t, offs, out, cfg, rows, transposed=True)


def launch_dw_kernel(a, b, offs, out, cfg, rows, *, transposed=False, a_index=None, gather_div=1, scales=None):
    """grouped_mm_dw_kernel into out [E, K, N] over ``rows`` sorted rows: a [*, K] (gathered by
    a_index) and b [rows, N] with unit inner strides, or (``transposed``) the segment copies
    a^T [K, cols] and b^T [N, cols] of transpose_segments, read by TMA; ``scales`` (sa, sb): the fp8
    weight gradient's tile scales."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .kernels._grouped_gemm import grouped_mm_dw_kernel

    num_experts, k, n = out.shape
    a, b = fp8_bytes(a), fp8_bytes(b)  # e4m3 tiles decoded to bf16 where the GPU has no e4m3 MMA
    if transposed:
        strides = (1, a.stride(0), 1, b.stride(0))
        a = TensorDescriptor(a, list(a.shape), [a.stride(0), 1], [cfg.BLOCK_K, cfg.BLOCK_M])
        b = TensorDescriptor(b, list(b.shape), [b.stride(0), 1], [cfg.BLOCK_N, cfg.BLOCK_M])
    else:
        strides = (a.stride(0), 1, b.stride(0), 1)
    sa, sb = scales if scales is not None else (offs, offs)
    # One program per work item: the hardware balances experts of unequal rows better than a
    # static round-robin would.
    items = num_experts * triton.cdiv(k, cfg.BLOCK_K) * triton.cdiv(n, cfg.BLOCK_N)
    grid = min(items, num_programs(out.device)) if out.device.type != "cuda" else items
    with _backend.device_guard(out):
        grouped_mm_dw_kernel[(grid,)](
            a, a_index if a_index is not None else offs, b, out, offs, sa, sb,
            rows, k, n, num_experts, gather_div, *strides, *out.stride(),
            GATHER=a_index is not None, TRANSPOSED=transposed, SCALED=scales is not None, BLOCK_M=cfg.BLOCK_M,
            BLOCK_K=cfg.BLOCK_K, BLOCK_N=cfg.BLOCK_N, BLOCK_E=triton.next_power_of_2(num_experts) if transposed else 1,
            GROUP_M=cfg.GROUP_M, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


def _choose(op, tensor, backend):
    return _backend.choose(op, tensor.device, backend or None, cuda_reason=_backend.NO_CUDA_KERNEL)


def new_weight_grad(w_shape, like: torch.Tensor, transposed: bool) -> torch.Tensor:
    """[E, K, N], laid out as the weight is: a transposed [E, N, K] tensor for nn.Linear storage,
    so the gradient reaches the parameter without a copy."""
    e, k, n = w_shape
    if transposed:
        return like.new_empty(e, n, k).transpose(1, 2)
    return like.new_empty(e, k, n)


# ----------------------------------------------------------------------------- grouped_mm


@torch.library.custom_op("moekernels::grouped_mm", mutates_args=())
def grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    # A data check, inside the op so that dynamo never traces it (fullgraph=True keeps working).
    _checks.offsets_in_range("offs", offs, x.shape[0])
    if _choose("grouped_mm", x, backend) == "torch":
        return reference.grouped_mm(x, w, offs)
    out = x.new_empty(x.shape[0], w.shape[2])
    if out.numel():
        if w.shape[1] == 0:
            return out.zero_()
        _launch(x, w, offs, out, variant="plain", rows=x.shape[0])
    return out


@grouped_mm_op.register_fake
def _(x, w, offs, backend):
    return x.new_empty(x.shape[0], w.shape[2])


@torch.library.custom_op("moekernels::grouped_mm_dw", mutates_args=())
def grouped_mm_dw_op(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, a_index: torch.Tensor | None,
                      gather_div: int, transposed: bool, backend: str) -> torch.Tensor:
    """dw[e] = A[seg e]^T @ grad[seg e], A[r] = a[a_index[r] // gather_div] (a itself without a_index)."""
    _checks.offsets_in_range("offs", offs, grad.shape[0])
    out = new_weight_grad((offs.shape[0], a.shape[1], grad.shape[1]), grad, transposed)
    if _choose("grouped_mm", grad, backend) == "torch":
        out.copy_(reference.grouped_mm_dw(a, grad, offs, a_index, gather_div))
    elif out.numel():
        _launch_dw(a, grad, offs, out, a_index=a_index, gather_div=gather_div)
    return out


@grouped_mm_dw_op.register_fake
def _(a, grad, offs, a_index, gather_div, transposed, backend):
    return new_weight_grad((offs.shape[0], a.shape[1], grad.shape[1]), grad, transposed)


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offs, backend = inputs
    ctx.save_for_backward(x, w, offs)
    ctx.backend = backend


def _grouped_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_op(grad, w.transpose(1, 2), offs, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_dw_op(x, grad, offs, None, 1, is_kmajor(w), ctx.backend)
    return dx, dw, None, None


grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _dw_setup(ctx, inputs, output):
    a, grad, offs, a_index, gather_div, transposed, backend = inputs
    ctx.save_for_backward(a, grad, offs)
    ctx.gathered, ctx.backend = a_index is not None, backend


def _dw_backward(ctx, dout):
    """out[e] = A[seg e]^T grad[seg e], so dA[seg e] = grad[seg e] dout[e]^T and
    dgrad[seg e] = A[seg e] dout[e]: two 2D x 3D grouped GEMMs (the 2D x 2D form's backward, and
    grouped_mm's double backward)."""
    a, grad, offs = ctx.saved_tensors
    if ctx.gathered:
        raise NotImplementedError("grouped_mm_dw with a_index (the fused layers' backward) has no backward")
    da = dgrad = None
    if ctx.needs_input_grad[0]:
        da = grouped_mm_op(grad, dout.transpose(1, 2), offs, ctx.backend)
    if ctx.needs_input_grad[1]:
        dgrad = grouped_mm_op(a, dout, offs, ctx.backend)
    return da, dgrad, None, None, None, None, None


grouped_mm_dw_op.register_autograd(_dw_backward, setup_context=_dw_setup)
_autocast.register("grouped_mm", (0, 1))
_autocast.register("grouped_mm_dw", (0, 1))


# ----------------------------------------------------------------------------- fused variants


def scaling_mode(a, a_scale, b, b_scale) -> int:
    """The fp8 scaling pair of operands a [M, K] and b [E, K, N] from their scales' shapes:
    3 for (1, 128) x (128, 128) blocks, 2 for per row x per column, 1 for per tensor. Raises
    ValueError, naming the scales, for any other pair."""
    (m, k), (e, _, n) = a.shape, b.shape
    kb = -(-k // 128)
    # Per tensor and per row x column first: where K <= 128 and N <= 128 their shapes can be the
    # block mode's too ([M, 1] and [E, 1, 1] at N = 1 or M = 1), with the same product, and
    # they take any K. quantize_fp8(a, "tensor") of M = 0 rows gives a [0, 1] scale.
    if tuple(a_scale.shape) in ((1, 1), (min(m, 1), 1)) and tuple(b_scale.shape) == (e, 1, 1):
        return 1
    if tuple(a_scale.shape) == (m, 1) and tuple(b_scale.shape) == (e, 1, n):
        return 2
    if tuple(a_scale.shape) == (m, kb) and tuple(b_scale.shape) == (e, kb, -(-n // 128)):
        if k % 128:
            raise ValueError(f"block-wise fp8 ((1, 128) x (128, 128) scales) needs K % 128 == 0, got K={k}")
        return 3
    raise ValueError(
        f"unsupported scaling pair: a_scale {tuple(a_scale.shape)} and b_scale {tuple(b_scale.shape)} for a [{m}, {k}] "
        f"and b [{e}, {k}, {n}]; supported: per tensor ((1, 1) and (1, 1) per expert), per row x per column "
        f"(({m}, 1) and (1, {n})), and (1, 128) x (128, 128) blocks (({m}, {kb}) and ({kb}, {-(-n // 128)}))")



def unit_scale(x: torch.Tensor, b_scale: torch.Tensor) -> torch.Tensor:
    """The a_scale of a weight-only product (x unscaled) that pairs with b_scale's mode: ones,
    [1, 1] beside per-tensor b scales, else [M, K/128] or [M, 1], one element's stride-0 view."""
    rows = 1 if tuple(b_scale.shape[1:]) == (1, 1) else x.shape[0]
    return torch.ones(1, 1, dtype=torch.float32, device=x.device).expand(rows, b_scale.shape[1])


@torch.library.custom_op("moekernels::grouped_mm_fused", mutates_args=())
def fused_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, source_index: torch.Tensor,
              top_k: int, gather: bool, activation: str, scatter_weights: torch.Tensor | None,
              a_scale: torch.Tensor | None, b_scale: torch.Tensor | None, out_dtype: torch.dtype | None,
              backend: str, lora_x: torch.Tensor | None = None, lora_w: torch.Tensor | None = None,
              w_up: torch.Tensor | None = None, up_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``w_up``: the up weight [E, K, N] apart from the gate ``w`` [E, K, N] (``up_scale`` its fp8
    scales), read in place: the pair is never concatenated. With an activation the output is
    act(gate) * up [M, N]; without one the two products side by side [M, 2N] (the backward's z)."""
    rows = source_index.shape[0] if gather else x.shape[0]
    _checks.offsets_in_range("offs", offs, rows)
    width = w.shape[2] // 2 if activation and w_up is None else w.shape[2]
    if w_up is not None and not activation:
        width = 2 * w.shape[2]
    dtype = out_dtype or x.dtype
    if _choose("grouped_mm", x, backend) == "torch":
        if b_scale is not None:  # fp8: the product of the dequantized operands, in float32
            w = reference.dequantize_fp8(w, b_scale)
            w_up = reference.dequantize_fp8(w_up, up_scale) if w_up is not None else None
        if a_scale is not None:
            x = reference.dequantize_fp8(x, a_scale)
        lora = (lora_x, lora_w) if lora_x is not None else None
        if w_up is not None:  # the gate and up products apart, then the activation of the pair
            n = w.shape[2]
            z = torch.cat([reference.grouped_mm_fused(x, w_half, offs, source_index, top_k, gather, "", None,
                                                      lora and (lora[0], lora[1][..., i * n:(i + 1) * n]))
                           for i, w_half in enumerate((w, w_up))], 1)
            return (reference.gated_activation(z, activation) if activation else z).to(dtype)
        out = reference.grouped_mm_fused(x, w, offs, source_index, top_k, gather, activation, scatter_weights, lora)
        return out.to(dtype)
    out = x.new_empty(rows, width, dtype=dtype)
    if not out.numel():
        return out
    scatter = scatter_weights is not None
    if b_scale is not None and a_scale is None:  # the weight-only route: x unscaled
        a_scale = unit_scale(x, b_scale)
    scales = None if a_scale is None else (scaling_mode(x, a_scale, w, b_scale), a_scale, b_scale)
    if w.shape[1] == 0 and lora_x is None:
        return out.zero_()
    if w_up is not None and not activation:  # the gate and up products into the two halves of out
        n = w.shape[2]
        for i, (w_half, s_half) in enumerate(((w, b_scale), (w_up, up_scale))):
            _launch(x, w_half, offs, out[:, i * n:(i + 1) * n], variant="plain", rows=rows,
                    a_index=source_index if gather else None, gather_div=top_k,
                    scales=None if scales is None else (scales[0], a_scale, s_half),
                    lora=(lora_x, lora_w[..., i * n:(i + 1) * n]) if lora_x is not None else None)
        return out
    _launch(x, w, offs, out, variant="gated" if activation else ("scatter" if scatter else "plain"), rows=rows,
            act=ACTIVATIONS[activation], a_index=source_index if gather else None, gather_div=top_k,
            c_index=source_index if scatter else None,
            c_scale=scatter_weights.reshape(-1).contiguous() if scatter else None, scales=scales,
            lora=(lora_x, lora_w) if lora_x is not None else None, w_up=w_up, up_scale=up_scale)
    return out


@fused_op.register_fake
def _(x, w, offs, source_index, top_k, gather, activation, scatter_weights, a_scale, b_scale, out_dtype, backend,
      lora_x=None, lora_w=None, w_up=None, up_scale=None):
    rows = source_index.shape[0] if gather else x.shape[0]
    width = w.shape[2] if w_up is None else 2 * w.shape[2]
    return x.new_empty(rows, width // 2 if activation else width, dtype=out_dtype or x.dtype)


def _fused_setup(ctx, inputs, output):
    x, w, offs, source_index, top_k, gather, activation, scatter_weights, _, _, _, backend, lora_x, lora_w, *up = inputs
    if up and up[0] is not None:  # only fused_moe passes a separate up weight, and differentiates itself
        raise NotImplementedError("grouped_mm_fused with a separate up weight (w_up) has no backward: "
                                  "moekernels.fused_moe differentiates its (w_gate, w_up) pair")
    ctx.save_for_backward(x, w, offs, source_index, scatter_weights, lora_x, lora_w)
    ctx.top_k, ctx.gather, ctx.activation, ctx.backend = top_k, gather, activation, backend


def _fused_backward(ctx, grad):
    x, w, offs, source_index, scatter_weights, lora_x, lora_w = ctx.saved_tensors
    if w.dtype == torch.float8_e4m3fn:  # only x of the weight-only route can require grad
        raise NotImplementedError("grouped_mm_fused with a float8_e4m3fn w is inference-only: it has no backward")
    k, backend = ctx.top_k, ctx.backend
    # The product before the epilogue, recomputed ([M, 2N] with an activation: not saved).
    z = fused_op(x, w, offs, source_index, k, ctx.gather, "", None, None, None, None, backend, lora_x, lora_w)
    grad_sw = None
    if scatter_weights is not None:
        src = source_index.long()
        h = reference.gated_activation(z, ctx.activation) if ctx.activation else z
        g = grad.index_select(0, src).float()
        grad_sw = torch.zeros_like(scatter_weights.reshape(-1), dtype=torch.float32)
        grad_sw[src] = (g * h.float()).sum(-1)
        grad_sw = grad_sw.view_as(scatter_weights).to(scatter_weights.dtype)
        grad = (g * scatter_weights.reshape(-1).index_select(0, src).float().unsqueeze(-1)).to(z.dtype)
    if ctx.activation:
        grad = reference.gated_activation_backward(grad, z, ctx.activation)
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = grouped_mm_op(grad, w.transpose(1, 2), offs, backend)
        if ctx.gather:
            from .permute import permute_backward_op

            dest = torch.empty_like(source_index)
            dest[source_index.long()] = torch.arange(source_index.shape[0], device=dest.device, dtype=dest.dtype)
            dx = permute_backward_op(dx, dest, k, backend)
    if ctx.needs_input_grad[1]:
        dw = grouped_mm_dw_op(x, grad, offs, source_index if ctx.gather else None, k, is_kmajor(w), backend)
    # The dispatcher drops trailing arguments left at their defaults: 12 inputs without a segment.
    needs = ctx.needs_input_grad
    d_lora_x = d_lora_w = None
    if len(needs) > 12 and needs[12]:
        d_lora_x = grouped_mm_op(grad, lora_w.transpose(1, 2), offs, backend)
    if len(needs) > 13 and needs[13]:
        d_lora_w = grouped_mm_dw_op(lora_x, grad, offs, None, 1, is_kmajor(lora_w), backend)
    return (dx, dw, None, None, None, None, None, grad_sw, None, None, None, None, d_lora_x, d_lora_w, None,
            None)[:len(needs)]


fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)
# Not scatter_weights: router weights stay float32. The LoRA operands are GEMM operands: cast.
_autocast.register("grouped_mm_fused", (0, 1, 12, 13, 14))


# ----------------------------------------------------------------------------- public


def check_operands(x, w, offs, dtypes=DTYPES, name="x", w_dtype=None):
    _checks.tensor(name, x, ndim=2, dtypes=dtypes)
    _checks.tensor("w", w, ndim=3, dtypes=(w_dtype or x.dtype,), device=x.device)
    _checks.tensor("offs", offs, ndim=1, dtypes=(torch.int32,), device=x.device)
    if offs.shape[0] != w.shape[0]:
        raise ValueError(f"offs must have one entry per expert: w has E={w.shape[0]}, offs has {offs.shape[0]}")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"K mismatch: x is [M, K={x.shape[1]}] but w is [E, K={w.shape[1]}, N]")


def check_form(x, w, offs):
    """The checks of the forms other than 2D x 3D (torch._grouped_mm's, with our dtypes)."""
    _checks.tensor("x", x, dtypes=DTYPES)
    _checks.tensor("w", w, dtypes=(x.dtype,), device=x.device)
    if x.dim() not in (2, 3) or w.dim() not in (2, 3):
        raise ValueError(f"x and w must be 2-D or 3-D, got x {tuple(x.shape)} and w {tuple(w.shape)}")
    if x.shape[-1] != w.shape[-2]:
        raise ValueError(f"K mismatch: x is {tuple(x.shape)} and w is {tuple(w.shape)} (x's last dim is w's "
                         f"second to last)")
    if x.dim() == 3 and w.dim() == 3:
        if offs is not None:
            raise ValueError("offs must be None for 3D x 3D (a batched matmul)")
        if x.shape[0] != w.shape[0]:
            raise ValueError(f"x and w must have the same batch (groups): x {tuple(x.shape)}, w {tuple(w.shape)}")
        return
    if offs is None:
        raise ValueError(f"offs is required for {x.dim()}D x {w.dim()}D")
    _checks.tensor("offs", offs, ndim=1, dtypes=(torch.int32,), device=x.device)
    if x.dim() == 3 and offs.shape[0] != x.shape[0]:
        raise ValueError(f"offs must have one entry per group: x has G={x.shape[0]}, offs has {offs.shape[0]}")


def compose_form(x, w, offs, mm, kgrouped):
    """torch._grouped_mm's 2D x 2D, 3D x 3D and 3D x 2D forms from a 2D x 3D product ``mm(a, b, offs)``
    and a 2D x 2D one ``kgrouped(x, w, offs)``, each differentiable as they are (the ops here, and
    their e4m3 forms in fp8.grouped_mm_fp8)."""
    if x.dim() == 2:  # out[g] = x[:, seg g] @ w[seg g]
        return kgrouped(x, w, offs)
    if w.dim() == 3:  # bmm: G uniform segments of M rows (offsets built on the device: no sync)
        groups, rows = x.shape[0], x.shape[1]
        uniform = torch.arange(1, groups + 1, device=x.device, dtype=torch.int32) * rows
        return mm(x.reshape(groups * rows, x.shape[2]), w, uniform).view(groups, rows, -1)
    # out[:, seg g] = x[g] @ w[:, seg g], transposed: out^T[seg g] = w^T[seg g] @ x[g]^T, a 2D x 3D product
    return mm(w.t(), x.transpose(1, 2), offs).t().contiguous()


def grouped_mm_form(x, w, offs, backend):
    """2D x 2D, 3D x 3D and 3D x 2D as the 2D x 3D op and the K-grouped (dw) op, each with its autograd;
    2D x 2D is the dw op over the K-sorted rows of x^T and w."""
    return compose_form(x, w, offs, lambda a, b, o: grouped_mm_op(a, b, o, backend),
                        lambda a, b, o: grouped_mm_dw_op(a.t(), b, o, None, 1, False, backend))


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None = None, *,
               backend: str | None = None) -> torch.Tensor:
    """Grouped GEMM over row segments: ``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]``.

    Args:
        x: [M, K] bfloat16, float16 or float32 (tf32 on the GPU), rows sorted by expert.
        w: [E, K, N], x's dtype: contiguous, or the transposed view ``w_t.transpose(1, 2)`` of an
            [E, N, K] tensor (nn.Linear's layout, read in place, never copied).
        offs: [E] int32, the cumulative ends of the segments (``RoutingPlan.expert_offsets``),
            non-decreasing, ``offs[-1] <= M``. Segments need no padding.
        backend: ``"torch"``, ``"triton"`` or None (automatic).

    Returns:
        [M, N] in x's dtype, accumulated in float32; rows at or after ``offs[-1]`` are zero.
        Differentiable with respect to x and w (``torch._grouped_mm``'s 2D x 3D semantics).
        Under ``torch.autocast`` x and w are cast to its dtype (see moekernels/_autocast.py).

    The other forms of ``torch._grouped_mm``, with its semantics, also differentiable (any
    strides; a layout the kernels cannot read in place is copied once):
        2D x 2D, offs [G] along K: x [M, K], w [K, N] -> [G, M, N], ``out[g] = x[:, seg g] @ w[seg g]``
            (the weight-gradient form: the K-grouped kernel; zero for an empty group);
        3D x 3D, offs None: x [G, M, K], w [G, K, N] -> [G, M, N], ``out[g] = x[g] @ w[g]``;
        3D x 2D, offs [G] along N: x [G, M, K], w [K, N] -> [M, N], ``out[:, seg g] = x[g] @ w[:, seg g]``,
            columns at or after ``offs[-1]`` zero (torch leaves them unwritten).
    """
    x, w = _autocast.cast(x, w)
    if isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and (x.dim() == 3 or w.dim() == 2):
        check_form(x, w, offs)
        return grouped_mm_form(x, w, offs, backend or "")
    check_operands(x, w, offs)
    return grouped_mm_op(x, w, offs, backend or "")


def grouped_mm_fused(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, source_index: torch.Tensor | None = None,
                     top_k: int = 1, gather: bool = False, activation: str | None = None,
                     scatter_weights: torch.Tensor | None = None, a_scale: torch.Tensor | None = None,
                     b_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                     backend: str | None = None, lora_x: torch.Tensor | None = None,
                     lora_w: torch.Tensor | None = None) -> torch.Tensor:
    """The grouped GEMM with the MoE layer's fusions (internal API; see the module doc).

    Args:
        x: [M, K] sorted rows, or with ``gather`` [T, K] token rows: row r of the product is
            ``x[source_index[r] // top_k]`` (M = T*k = len(source_index)).
        w: [E, K, N], or [E, K, 2N] with ``activation`` (gate columns, then up), as in grouped_mm.
        offs: [E] int32 segment ends over the M sorted rows.
        source_index: [M] int32, ``RoutingPlan.source_index``: needed by gather and scatter.
        activation: None, ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, exact erf gelu): the output is
            ``act(gate) * up``, [M, N].
        scatter_weights: [T, k] router weights: row r is scaled by ``scatter_weights.flat[p]`` and
            written to row ``p = source_index[r]`` of a [T*k, N] output (token-major pairs), so
            the combine is ``out.view(T, k, N).sum(1)``. Dropped pairs' rows are zero.
        a_scale, b_scale: with float8_e4m3fn x and w, their float32 scales (see
            :func:`moekernels.fp8_grouped_mm`; a_scale has a row per row of x, gathered with it).
            The block-wise mode with an activation needs N % 128 == 0 (up starts a scale block).
            b_scale alone, with a float8_e4m3fn w and x of x's usual dtypes: the weight-only
            route (w8a16, vLLM's Marlin's): w decoded to x's type as its tiles load, x unscaled.
        out_dtype: the output dtype (default x's, bfloat16 for fp8 x).
        lora_x, lora_w: a low-rank segment (LoRA on the experts), given together: lora_x [M, r]
            over the M sorted rows (never gathered; already times the LoRA scale) and lora_w
            [E, r, N] ([E, r, 2N] with ``activation``, gate then up, as w), any strides (the
            transposed view of PEFT's B [E, N, r] is read in place), both in the compute dtype
            (x's; out_dtype's for fp8). The result is ``epilogue(A @ w[e] + lora_x @ lora_w[e])``:
            the segment is added to the float32 product (after the fp8 scales) before the
            activation and the router weight, in the same launch.

    Differentiable with respect to x, w, scatter_weights, lora_x and lora_w (not in fp8).
    """
    activation = activation or ""
    x, w, lora_x, lora_w = _autocast.cast(x, w, lora_x, lora_w)
    _checks.choice("activation", activation, tuple(ACTIVATIONS))
    scaled = a_scale is not None or b_scale is not None
    weight_only = a_scale is None and b_scale is not None
    fp8 = torch.float8_e4m3fn
    check_operands(x, w, offs, DTYPES if not scaled or weight_only else (fp8,), w_dtype=fp8 if scaled else None)
    if scaled:
        if not weight_only:
            _checks.tensor("a_scale", a_scale, ndim=2, dtypes=(torch.float32,), device=x.device)
        _checks.tensor("b_scale", b_scale, ndim=3, dtypes=(torch.float32,), device=x.device)
        check_fp8_weight("w", w)
        mode = scaling_mode(x, unit_scale(x, b_scale) if weight_only else a_scale, w, b_scale)
        if mode == 3 and activation and (w.shape[2] // 2) % 128:
            raise ValueError(f"block-scaled w with an activation needs N % 128 == 0 (w is [E, K, 2N={w.shape[2]}])")
        out_dtype = out_dtype or (x.dtype if weight_only else torch.bfloat16)
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"out_dtype must be one of {DTYPES}, got {out_dtype}")
    if gather or scatter_weights is not None:
        if source_index is None:
            raise ValueError("source_index is required with gather or scatter_weights")
        _checks.tensor("source_index", source_index, ndim=1, dtypes=(torch.int32,), device=x.device)
    rows = source_index.shape[0] if gather else x.shape[0]
    if activation and w.shape[2] % 2:
        raise ValueError(f"w must be [E, K, 2N] (gate, then up) with activation, got N={w.shape[2]}")
    if gather:
        _checks.integer("top_k", top_k, low=1)
        if rows != x.shape[0] * top_k:
            raise ValueError(f"source_index has {rows} pairs but x has {x.shape[0]} tokens of top_k={top_k}")
    if scatter_weights is not None:
        _checks.tensor("scatter_weights", scatter_weights, ndim=2, device=x.device,
                       dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if scatter_weights.numel() != rows or source_index.shape[0] != rows:
            raise ValueError(f"scatter_weights must hold one weight per row: {rows} rows, "
                             f"got shape {tuple(scatter_weights.shape)}")
        top_k = scatter_weights.shape[1]
    if (lora_x is None) != (lora_w is None):
        raise ValueError("lora_x and lora_w must be given together (or neither)")
    if lora_x is not None:
        compute = out_dtype if scaled else x.dtype  # the weight-only route's: out_dtype, x's by default
        _checks.tensor("lora_x", lora_x, ndim=2, dtypes=(compute,), device=x.device)
        _checks.tensor("lora_w", lora_w, ndim=3, dtypes=(compute,), device=x.device)
        if lora_x.shape[0] != rows or tuple(lora_w.shape) != (w.shape[0], lora_x.shape[1], w.shape[2]):
            raise ValueError(f"lora_x must be [M={rows}, r] and lora_w [E={w.shape[0]}, r, {w.shape[2]}], got lora_x "
                             f"{tuple(lora_x.shape)} and lora_w {tuple(lora_w.shape)}")
    if source_index is None:
        source_index = offs.new_empty(0)
    return fused_op(x, w, offs, source_index, top_k, gather, activation, scatter_weights, a_scale, b_scale,
                     out_dtype, backend or "", lora_x, lora_w)


# ----------------------------------------------------------------------------- sm_90 variants

# (variant, rows per expert, N, K, dtype, weight storage[, output dtype]): the shipped configs
# compiled for sm_90 by the test suite. Every rows class of the default table, both weight
# storages, each fusion.
SM90_GEMMS = {
    "plain_decode_bf16_kmajor": ("plain", 1, 4096, 7168, torch.bfloat16, True),
    "plain_m64_bf16": ("plain", 64, 2048, 768, torch.bfloat16, False),
    "plain_prefill_bf16_kmajor": ("plain", 512, 1536, 2048, torch.bfloat16, True),
    "plain_prefill_fp16": ("plain", 512, 28672, 4096, torch.float16, False),
    "plain_prefill_fp32": ("plain", 512, 3072, 4096, torch.float32, True),
    # fp32 on a contiguous [E, K, N] weight (N inner): tf32 wgmma reads B only K-major.
    "plain_prefill_fp32_ekn": ("plain", 512, 3072, 4096, torch.float32, False),
    "gather_prefill_bf16_kmajor": ("gather", 512, 1536, 2048, torch.bfloat16, True),
    # Rows or weight strides not 16-byte aligned (K or N odd): pointer loads on both operands.
    "unaligned_prefill_bf16_kmajor": ("unaligned", 512, 1536, 2048, torch.bfloat16, True),
    "gated_decode_bf16_kmajor": ("gated", 8, 2048, 7168, torch.bfloat16, True),
    "gated_prefill_bf16_kmajor": ("gated", 512, 768, 2048, torch.bfloat16, True),
    "gather_gated_prefill_bf16_kmajor": ("gather+gated", 512, 768, 2048, torch.bfloat16, True),
    # The MoE layer's decode step (fused_moe at T = 8: GEMM 1 gathers, with SwiGLU, in swap-AB
    # tiles) and its backward's dx GEMM over the [E, 2I, H] weight as stored (N contiguous).
    "gather_gated_decode_bf16_kmajor": ("gather+gated", 4, 768, 2048, torch.bfloat16, True),
    "plain_decode_bf16": ("plain", 4, 2048, 1536, torch.bfloat16, False),
    "scatter_prefill_bf16_kmajor": ("scatter", 512, 2048, 768, torch.bfloat16, True),
    "scatter_decode_bf16_kmajor": ("scatter", 4, 7168, 2048, torch.bfloat16, True),
    # LoRA on the experts (issue 16): the layer's two GEMMs with a rank-16 segment fused, to be
    # compared with their base variants above (registers, programs per SM, the K loops).
    "gather_gated_prefill_bf16_kmajor_lora16": ("gather+gated+lora16", 512, 768, 2048, torch.bfloat16, True),
    "scatter_prefill_bf16_kmajor_lora16": ("scatter+lora16", 512, 2048, 768, torch.bfloat16, True),
    "gather_gated_decode_bf16_kmajor_lora16": ("gather+gated+lora16", 4, 768, 2048, torch.bfloat16, True),
    "gather_gated_prefill_bf16_kmajor_lora64": ("gather+gated+lora64", 512, 768, 2048, torch.bfloat16, True),
    # Gate and up as two weights (fused_moe's (w_gate, w_up) pair, issue 20): GEMM 1 reading the up
    # tiles from a second descriptor, to be compared with the fused weight's variants above.
    "gather_gated_prefill_bf16_kmajor_split": ("gather+gated+split", 512, 768, 2048, torch.bfloat16, True),
    "gather_gated_decode_bf16_kmajor_split": ("gather+gated+split", 4, 768, 2048, torch.bfloat16, True),
    # The split gated decode (configs.split_gated_decode): Qwen3-30B-A3B's GEMM 1 at T = 1 as the
    # plain kernel over the [K, 2I] weight into a float32 product, gathered (fused_moe) or not.
    "gather_split_decode_bf16_kmajor": ("gather", 1, 1536, 2048, torch.bfloat16, True, torch.float32),
    "split_decode_fp16": ("plain", 1, 1536, 2048, torch.float16, False, torch.float32),
    "dw_bf16": ("dw", 512, 1536, 2048, torch.bfloat16, False),
    "dw_gather_fp16": ("dw_gather", 512, 1536, 2048, torch.float16, False),
    "dw_fp32": ("dw", 512, 1536, 2048, torch.float32, False),
}


def _dw_variant(name, cfg, dtype, gather, *, scaled=False):
    """The sm_90 compile job of a grouped_mm_dw_kernel launch; ``scaled``: the fp8 weight gradient
    (fp8.grouped_mm_fp8's wgrad: e4m3 operands, float32 out). fp8 and fp32 read the transposed
    segment copies (TRANSPOSED: TMA descriptors; the copy gathers), bf16/fp16 the rows."""
    from . import _sm90
    from .kernels._grouped_gemm import grouped_mm_dw_kernel as fn

    ptr = _sm90.ptr(dtype)
    transposed = scaled or dtype == torch.float32
    # stride_cn = 1 (a contiguous gradient), and the contiguous dim of a and b (channels; tokens
    # when transposed): Triton specialises an integer argument of 1.
    unit = dict(stride_am=1, stride_bm=1) if transposed else dict(stride_ak=1, stride_bn=1)
    cx = dict(GATHER=gather and not transposed, TRANSPOSED=transposed, SCALED=scaled, BLOCK_M=cfg.BLOCK_M,
              BLOCK_K=cfg.BLOCK_K, BLOCK_N=cfg.BLOCK_N, BLOCK_E=256 if transposed else 1, GROUP_M=cfg.GROUP_M,
              stride_cn=1, **unit)
    elem = ptr.removeprefix("*")
    operands = (dict(a=f"tensordesc<{elem}[{cfg.BLOCK_K}, {cfg.BLOCK_M}]>",
                     b=f"tensordesc<{elem}[{cfg.BLOCK_N}, {cfg.BLOCK_M}]>") if transposed else dict(a=ptr, b=ptr))
    sig = _sm90.signature(fn, cx, c_ptr=_sm90.ptr(torch.float32) if scaled else ptr, a_index_ptr="*i32",
                          offs_ptr="*i32", sa_ptr="*fp32", sb_ptr="*fp32", **operands)
    rows = () if transposed else ("a", "b", "stride_am", "stride_bm")
    aligned = ("c_ptr", "K", "N", "stride_ce", "stride_ck") + rows
    # The contract: the transposed copies' dense tiles (masked at K and N only) by TMA; the rows
    # as they are by cp.async, 16-byte when gathered (a TMA box would cross a segment's end).
    loads = ({"x": "tma", "dy": "tma"} if transposed else {"x": "cp.async" if gather else "tma", "dy": "tma"})
    return _sm90.Variant(name, fn, sig, cx, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), matrix=True,
                         aligned=aligned, loads=loads)


def segments_variant(name, dtype, out_dtype, tile, *, fmax=None, gather=False):
    """The sm_90 compile job of a transpose_segments launch (a row kernel: 16-byte accesses):
    the fp8 weight gradient's quantize to +-``fmax``, or without it the fp32 weight gradient's copy."""
    from . import _sm90
    from .kernels._fp8 import transpose_segments_kernel as fn

    cx = dict(QUANT=fmax is not None, GATHER=gather, POW2=False, FMAX=fmax or 1.0, TILE=tile, BC=SEGMENT_COLS,
              BLOCK_E=256)
    sig = _sm90.signature(fn, cx, x_ptr=_sm90.ptr(dtype), idx_ptr="*i32", offs_ptr="*i32", q_ptr=_sm90.ptr(out_dtype),
                          scale_ptr="*fp32")
    return _sm90.Variant(name, fn, sig, cx, dict(num_warps=8), rows=True,
                         aligned=("x_ptr", "q_ptr", "C", "stride_xr", "stride_qc"))


def forward_variant(name, variant, cfg, dtype, kmajor, *, scale=0, out_dtype=None, col_major_a_scale=False,
                    weight_bytes=False, tma=True):
    """The sm_90 compile job of one grouped_mm_kernel launch: ``variant`` is plain, gather (rows by
    pointer), unaligned (both operands by pointer), gated or scatter, and ``+lora<r>`` for a
    low-rank segment of rank r (lora_x [M, r] contiguous, lora_w the [E, r, N] view of PEFT's
    [E, N, r] B: its rank stride 1, which Triton specialises; in the output dtype, fp8's compute
    dtype); ``scale`` the fp8 mode; ``col_major_a_scale``: a_scale's row stride 1, specialised too;
    ``weight_bytes``: the launch of a GPU without e4m3 MMA, or of the weight-only route (a 16-bit
    dtype), every e4m3 operand as its bytes (fp8_bytes: fp8.sm90_variants on sm_80); ``tma``: whether the
    architecture has TMA (without it, 16-byte aligned pointers, as _launch); ``+split``: gated with
    the up half as a second weight (SPLIT_UP, b_up of b's type and strides)."""
    from . import _sm90
    from .kernels._grouped_gemm import grouped_mm_kernel as fn

    parts = variant.split("+")
    gather, unaligned = "gather" in parts, "unaligned" in parts
    pointers = gather or unaligned or not tma
    rank = next((int(p.removeprefix("lora")) for p in parts if p.startswith("lora")), None)
    cx = kernel_constexprs(cfg, a_tma=not pointers, b_tma=tma and not unaligned, kmajor=kmajor, gather=gather,
                           scatter="scatter" in parts, act=1 if "gated" in parts else 0, scale=scale, block_e=128,
                           rank=rank, split_up="split" in parts)
    stages = num_stages(cfg, scale, cx["ACT"], weight_bytes)
    key = configs.launch_key("grouped_mm_kernel", dtype, out_dtype or dtype, cx, cfg.num_warps, stages)
    # The contract: gathered rows by 16-byte cp.async, every other tile (the gated epilogue's gate
    # and up halves are two) by TMA; the unaligned fallback's plain loads claim nothing.
    b_path = "pointer" if unaligned else ("tma" if tma else "cp.async")
    loads = {"a": "cp.async" if gather or not tma else ("pointer" if unaligned else "tma"),
             **({"w_gate": b_path, "w_up": b_path} if cx["ACT"] else {"w": b_path})}
    if not cx["B_TMA"]:  # the weight's unit stride, which Triton specialises as the constant 1
        cx["stride_bk" if kmajor else "stride_bn"] = 1
    if col_major_a_scale:
        cx["stride_sam"] = 1
    if rank is not None:
        cx["stride_lwk"] = 1
    ptr = _sm90.ptr(dtype)
    elem = ptr.removeprefix("*")
    block_b = [cfg.BLOCK_N, cfg.BLOCK_K] if kmajor else [cfg.BLOCK_K, cfg.BLOCK_N]
    a_type = ptr if pointers else f"tensordesc<{elem}[{cfg.BLOCK_M}, {cfg.BLOCK_K}]>"
    b_type = ptr if not cx["B_TMA"] else f"tensordesc<{elem}[1, {block_b[0]}, {block_b[1]}]>"
    if weight_bytes:
        a_type = a_type.replace("fp8e4nv", "u8")
        b_type = b_type.replace(elem, "u8")
    sig = _sm90.signature(fn, cx, a=a_type, b=b_type, b_up=b_type, b_up_scale_ptr="*fp32",
                          c_ptr=_sm90.ptr(out_dtype or dtype), c_index_ptr="*i32",
                          c_scale_ptr="*fp32", a_index_ptr="*i32", offs_ptr="*i32", a_scale_ptr="*fp32",
                          b_scale_ptr="*fp32", **dict.fromkeys(("lora_x", "lora_w"), _sm90.ptr(out_dtype or dtype)))
    # Pointers are specialised as 16-byte aligned, as a launch on torch's allocations is: cp.async
    # pipelining of the pointer loads depends on it. So are r = 16 and its multiples.
    lora = ("lora_x", "lora_w", "stride_lxm", "stride_lwe", "stride_lwn") if rank is not None and rank % 16 == 0 else ()
    options = dict(num_warps=cfg.num_warps, num_stages=stages)
    # Without TMA the aligned operands' pointers and outer strides, as a launch specialises them.
    no_tma = ("a", "b", "stride_be", "stride_bn" if kmajor else "stride_bk") if not tma and not unaligned else ()
    return _sm90.Variant(name, fn, sig, cx, options, matrix=True,
                         aligned=tuple(dict.fromkeys(("c_ptr", "N", "K", "stride_am", "stride_cm")
                                                     + (("a",) if gather else ()) + lora + no_tma)),
                         loads=loads, launch_key=key)


def sm90_config(variant, per_expert, n, k, dtype, block_scaled=False, kmajor=True, arch=configs.HOPPER):
    """The config a launch of ``variant`` at ``per_expert`` rows per expert (of 128) picks on ``arch``."""
    return configs.grouped_mm_config(config_variant(variant), per_expert * 128, 128, n, k, dtype,
                                     block_scaled=block_scaled, kmajor=kmajor, arch=arch)


def config_variant(variant: str) -> str:
    """The config table's variant of a launch: "gather+gated" -> "gated", "gather" -> "plain"."""
    parts = variant.split("+")
    return next((v for v in ("dw", "gated", "scatter", "unaligned") if any(p.startswith(v) for p in parts)), "plain")


@_sm90_registry.register
def sm90_variants(capability: int = 90):
    """The shipped launches, with the configs they pick on ``capability`` (the compile matrix's)."""
    out = []
    for name, (variant, per_expert, n, k, dtype, kmajor, *out_dtype) in SM90_GEMMS.items():
        cfg = sm90_config(variant, per_expert, n, k, dtype, kmajor=kmajor, arch=configs.arch_limits(capability))
        if variant.startswith("dw"):
            out.append(_dw_variant(f"grouped_mm/{name}", cfg, dtype, variant == "dw_gather"))
            if dtype == torch.float32:  # its operands' copies (x gathered, as the fused layers' x is)
                for copy, gather in (("x_gather", True), ("dy", False)):
                    out.append(segments_variant(f"grouped_mm/{name}_transpose_{copy}", dtype, dtype, cfg.BLOCK_M,
                                                gather=gather))
        else:
            out.append(forward_variant(f"grouped_mm/{name}", variant, cfg, dtype, kmajor,
                                       out_dtype=out_dtype[0] if out_dtype else None,
                                       tma=configs.arch_limits(capability).tma))
    return out
