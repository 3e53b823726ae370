"""The opt-in CUTLASS FP8 grouped GEMM (csrc/fp8_grouped_cutlass*.cu): ``fp8_grouped_mm(..., backend="cutlass")``.

CUTLASS's block-scaled ptr-array kernels, for DeepSeek-V3's recipe: e4m3 a [M, K] with (1, 128) scales, e4m3
b [E, N, K] (K-major) with (128, 128) scales, bf16 out. Two builds of it, chosen by the GPU's compute capability:
Hopper's (example 68's, sm_90a: 9.0) and datacenter Blackwell's (example 81's, sm_100a: 10.0), each arch-specific
code that runs on its one capability. Built only where setup.py found CUTLASS's headers
(``moekernels._ext.CUTLASS_ERROR`` says why not) and the arch list has the capability (:data:`BUILT_ARCHS`).
Opt-in until a GPU run of benchmarks/device_check.sh validates it: neither the automatic choice nor
``MOEKERNELS_BACKEND=cuda`` takes it.

Also the CPU twins the tests check it by (no GPU needed):
- :func:`setup_twin`: the bytes the device set-up kernel writes from ``offs`` (each expert's problem shape,
  the pointers to its A, B, D and scales, and the strides; on sm_100a its scale layouts too), in the same layout;
- :func:`scale_layout`: CUTLASS's scale-factor layouts (``Sm1xxBlockwiseScaleConfig::tile_atom_to_shape_SFA/SFB``
  in cutlass/detail/blockwise_scale_layout.hpp) as (shape, stride) and :func:`cute_offset` their index map.
"""

from __future__ import annotations

import torch

from . import _backend, _ext

KERNEL = "fp8_grouped_mm_cutlass"  # the binding, and its name in moekernels._C.KERNELS (+ the arch's suffix)
# Compute capability -> (the arch its kernel is built for, the suffix of that kernel's bindings in moekernels._C)
KERNEL_ARCHS = {(9, 0): ("sm_90a", ""), (10, 0): ("sm_100a", "_sm100")}
# The archs whose kernel moekernels._C holds (setup.py: CUTLASS found, and the arch in TORCH_CUDA_ARCH_LIST)
BUILT_ARCHS: tuple[str, ...] = tuple(getattr(_ext.C, "CUTLASS_ARCHS", "").split()) if _ext.HAS_CUDA_EXT else ()
BLOCK = 128  # the scale blocks: (1, 128) for a, (128, 128) for b
# Scale-factor majorness both kernels are built with (Sm90/Sm100BlockwiseScaleConfig<1, 128, 128, K, K>): K-major.
SFA_MAJOR = SFB_MAJOR = "K"
SETUP_ARRAYS = ("A", "B", "D", "SFA", "SFB", "stride_A", "stride_B", "stride_D")  # the 8-byte arrays, in order
# sm_100a's set-up also writes each expert's SFA and SFB layouts (its collective takes one an expert): a cute
# Layout of K-major shape ((vec, blocks_MN), (128, K/128), L) and stride ((0, K/128), (0, 1), L's), stored as its
# non-static int32s in order: blocks_MN, K/128, L = 1, K/128, blocks_MN * K/128.
LAYOUT_INTS = 5


# ----------------------------------------------------------------------------- CUTLASS's layouts, emulated


def scale_layout(rows: int, cols: int, vec_rows: int, vec_cols: int, major: str):
    """(shape, stride) of ``tile_atom_to_shape_SFA`` (rows = M, vec_rows = ScaleGranularityM) or ``_SFB``
    (rows = N) with L = 1, as CUTLASS writes it: ((vec_rows, ceil(rows / vec_rows)), (vec_cols, ceil(cols /
    vec_cols)), 1), the vector modes of stride 0 (a scale covers them), the block modes MN- or K-major."""
    nr, nc = -(-rows // vec_rows), -(-cols // vec_cols)
    strides = ((0, 1), (0, nr)) if major == "MN" else ((0, nc), (0, 1))
    return ((vec_rows, nr), (vec_cols, nc), 1), (*strides, nr * nc)


def cute_offset(shape, stride, coord) -> int:
    """A cute Layout's index map: an integer coordinate of a mode split colexicographically over its sub-shape
    (cute's idx2crd), then the dot product with the strides (crd2idx)."""
    if isinstance(shape, tuple):
        if isinstance(coord, tuple):
            return sum(cute_offset(s, d, c) for s, d, c in zip(shape, stride, coord))
        total = 0
        for s, d in zip(shape, stride):
            size = _size(s)
            total += cute_offset(s, d, coord % size)
            coord //= size
        return total
    return coord * stride


def _size(shape) -> int:
    if isinstance(shape, tuple):
        out = 1
        for s in shape:
            out *= _size(s)
        return out
    return shape


def scale_offsets(rows: int, cols: int, vec_rows: int, vec_cols: int, major: str) -> torch.Tensor:
    """[ceil(rows / vec_rows), ceil(cols / vec_cols)] int64: where CUTLASS reads the scale of each block, in
    elements from the group's scale pointer (the layout's value at the block's first element)."""
    shape, stride = scale_layout(rows, cols, vec_rows, vec_cols, major)
    nr, nc = shape[0][1], shape[1][1]
    return torch.tensor([[cute_offset(shape, stride, (r * vec_rows, c * vec_cols, 0)) for c in range(nc)]
                         for r in range(nr)], dtype=torch.int64).reshape(nr, nc)


# ----------------------------------------------------------------------------- the device set-up's twin


def _arrays_start(groups: int) -> int:
    """Where the set-up buffer's 8-byte arrays start: after E (M, N, K) int32 triples, padded to 16 bytes."""
    return (groups * 12 + 15) // 16 * 16


def setup_bytes(groups: int, arch: str = "sm_90a") -> int:
    """The set-up buffer's size: E (M, N, K) int32 triples padded to 16 bytes, then 8 arrays of E 8-byte entries;
    on sm_100a then E SFA and E SFB layouts."""
    layouts = 2 * LAYOUT_INTS * 4 * groups if arch == "sm_100a" else 0
    return _arrays_start(groups) + len(SETUP_ARRAYS) * 8 * groups + layouts


def setup_twin(offs: torch.Tensor, n: int, k: int, a: int, b: int, d: int, sfa: int, sfb: int,
               arch: str = "sm_90a") -> torch.Tensor:
    """The bytes csrc/fp8_grouped_cutlass_setup.cuh's set-up writes for ``arch``'s kernel (uint8
    [setup_bytes(E, arch)]), in pure torch.

    ``a``, ``b``, ``d``, ``sfa``, ``sfb``: the base addresses (data_ptr) of e4m3 a [M, K], e4m3 b [E, N, K],
    bf16 out [M, N], float32 a scales [M, K / 128] and b scales [E, N / 128, K / 128], all row-major. Expert
    e's rows are [offs[e-1], offs[e]) (offs[-1] = 0), a count clamped at 0 (a decreasing offs gives an empty
    expert, not a negative M).
    """
    offs = offs.to(torch.int64).cpu()
    groups = offs.shape[0]
    start = torch.cat([offs.new_zeros(1), offs[:-1]])
    rows = (offs - start).clamp_min(0)
    kb, nb = k // BLOCK, n // BLOCK
    shapes = torch.stack([rows, torch.full_like(rows, n), torch.full_like(rows, k)], 1).to(torch.int32)
    expert = torch.arange(groups, dtype=torch.int64)
    arrays = torch.stack([
        a + start * k,  # e4m3: 1 byte an element
        b + expert * n * k,
        d + start * n * 2,  # bf16
        sfa + start * kb * 4,  # float32
        sfb + expert * nb * kb * 4,
        torch.full_like(rows, k),  # A [M_e, K] row-major: its M stride (K's is a static 1)
        torch.full_like(rows, k),  # B [N, K] K-major (CUTLASS's column-major): its N stride
        torch.full_like(rows, n),  # D [M_e, N] row-major
    ])
    out = torch.zeros(setup_bytes(groups, arch), dtype=torch.uint8)
    head = shapes.reshape(-1).view(torch.uint8)
    out[:head.numel()] = head
    start_arrays = _arrays_start(groups)
    end_arrays = start_arrays + arrays.numel() * 8
    out[start_arrays:end_arrays] = arrays.reshape(-1).view(torch.uint8)
    if arch == "sm_100a":  # Sm1xxBlockwiseScaleConfig<1, 128, 128, K, K>::tile_atom_to_shape_SFA/SFB's fields
        ones = torch.ones_like(rows)
        layout_a = torch.stack([rows, ones * kb, ones, ones * kb, rows * kb], 1)
        layout_b = torch.stack([ones * nb, ones * kb, ones, ones * kb, ones * nb * kb], 1)
        out[end_arrays:] = torch.cat([layout_a, layout_b]).to(torch.int32).reshape(-1).view(torch.uint8)
    return out


def read_setup(buf: torch.Tensor, groups: int, arch: str = "sm_90a") -> dict[str, torch.Tensor]:
    """The set-up buffer's arrays by name: "shapes" [E, 3] int32, the SETUP_ARRAYS [E] int64; on sm_100a
    "layout_SFA" and "layout_SFB" [E, LAYOUT_INTS] int32."""
    buf = buf.cpu()
    shapes = buf[:groups * 12].view(torch.int32).reshape(groups, 3)
    start_arrays = _arrays_start(groups)
    end_arrays = start_arrays + len(SETUP_ARRAYS) * 8 * groups
    arrays = buf[start_arrays:end_arrays].view(torch.int64).reshape(len(SETUP_ARRAYS), groups)
    out = {"shapes": shapes, **dict(zip(SETUP_ARRAYS, arrays))}
    if arch == "sm_100a":
        layouts = buf[end_arrays:].view(torch.int32).reshape(2, groups, LAYOUT_INTS)
        out.update(layout_SFA=layouts[0], layout_SFB=layouts[1])
    return out


# ----------------------------------------------------------------------------- the op


def unavailable(device: torch.device) -> str | None:
    """Why the CUTLASS kernel cannot run on ``device`` (None where it can)."""
    if not _ext.HAS_CUDA_EXT:
        return _ext.CUTLASS_ERROR
    if _ext.CUTLASS_ERROR:
        return f"moekernels._C was built without it: {_ext.CUTLASS_ERROR}"
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type} tensors"
    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) not in KERNEL_ARCHS:
        return (f"its kernels are arch-specific code for sm_90a (Hopper, 9.0) and sm_100a (B200/GB200, 10.0) alone; "
                f"{device} has compute capability {major}.{minor}"
                + (" (GeForce/RTX Blackwell would need CUTLASS's sm_120a kernel, which is not built)"
                   if major == 12 else ""))
    arch, suffix = KERNEL_ARCHS[major, minor]
    if arch not in BUILT_ARCHS:
        return (f"moekernels._C has its kernel for {', '.join(BUILT_ARCHS)} only, not {arch} ({device}'s): reinstall "
                f"with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
    return _ext.no_image(KERNEL + suffix, device)


def binding(name: str, device: torch.device):
    """moekernels._C's function ``name`` for the CUTLASS kernel of ``device``'s capability (unavailable() passed)."""
    return getattr(_ext.C, name + KERNEL_ARCHS[torch.cuda.get_device_capability(device)][1])


def operand_problem(a, a_scale, b, b_scale, offs, out_dtype) -> str | None:
    """Why these operands do not fit the kernel (None where they do): its layouts and alignments."""
    m, k = a.shape
    groups, _, n = b.shape
    if out_dtype != torch.bfloat16:
        return f"out_dtype must be torch.bfloat16 (its epilogue's), got {out_dtype}"
    if k % BLOCK or n % BLOCK:
        return f"K and N must be multiples of {BLOCK}, got K={k}, N={n}"
    if tuple(a_scale.shape) != (m, k // BLOCK) or tuple(b_scale.shape) != (groups, k // BLOCK, n // BLOCK):
        return (f"it takes (1, 128) x (128, 128) scales: a_scale [M, K/128] = {[m, k // BLOCK]} and b_scale "
                f"[E, K/128, N/128] = {[groups, k // BLOCK, n // BLOCK]}, got {list(a_scale.shape)} and "
                f"{list(b_scale.shape)}")
    if not a.is_contiguous():
        return f"a must be row-major contiguous [M, K], got strides {tuple(a.stride())}"
    if not b.transpose(1, 2).is_contiguous():
        return "b must be the transposed view of a contiguous [E, N, K] tensor (prepare_weight's)"
    if not b_scale.transpose(1, 2).is_contiguous():
        return "b_scale must be the transposed view of a contiguous [E, N/128, K/128] tensor (prepare_weight's)"
    if a.data_ptr() % 16 or b.data_ptr() % 16:
        return "a and b must start 16-byte aligned (TMA)"
    if offs.dtype != torch.int32 or offs.shape != (groups,):
        return f"offs must be int32 [E={groups}], got {offs.dtype} {list(offs.shape)}"
    return None


@torch.library.custom_op("moekernels::fp8_grouped_mm_cutlass", mutates_args=())
def grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
               offs: torch.Tensor) -> torch.Tensor:
    """bf16 [M, N] = (a * a_scale) @ (b[e] * b_scale[e]) on each expert's rows; rows at or after offs[-1] zero.

    a_scale column-major (``scale_layout="col_major"``) is copied to row-major first (the kernel's K-major
    SFA; 4 bytes a 128-byte block of a, 3% of a's bytes); the weight's scales are read in place.
    """
    m, k = a.shape
    groups, _, n = b.shape
    # Rows at or after offs[-1] are zeroed on the device (offs stays there: no sync to find them).
    if not m or not groups:
        return torch.zeros(m, n, dtype=torch.bfloat16, device=a.device)
    out = torch.empty(m, n, dtype=torch.bfloat16, device=a.device)
    a_scale = a_scale.contiguous()
    sm_count = torch.cuda.get_device_properties(a.device).multi_processor_count
    buf = torch.empty(binding("fp8_grouped_cutlass_setup_bytes", a.device)(groups), dtype=torch.uint8,
                      device=a.device)
    workspace = torch.empty(max(binding("fp8_grouped_cutlass_workspace_bytes", a.device)(groups, sm_count), 1),
                            dtype=torch.uint8, device=a.device)
    with _backend.device_guard(a):
        binding(KERNEL, a.device)(a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(),
                                  offs.data_ptr(), out.data_ptr(), groups, m, n, k, buf.data_ptr(),
                                  workspace.data_ptr(), sm_count, _ext.stream(a))
    return out


@grouped_mm.register_fake
def _(a, a_scale, b, b_scale, offs):
    return a.new_empty(a.shape[0], b.shape[2], dtype=torch.bfloat16)


def fp8_grouped_mm(a, a_scale, b, b_scale, offs, out_dtype) -> torch.Tensor:
    """fp8_grouped_mm's backend="cutlass" (its arguments checked there): raises naming why it cannot run."""
    reason = unavailable(a.device) or operand_problem(a, a_scale, b, b_scale, offs, out_dtype)
    if reason:
        raise RuntimeError(f"fp8_grouped_mm: backend='cutlass' cannot run this call: {reason}")
    return grouped_mm(a, a_scale, b, b_scale, offs)


# ----------------------------------------------------------------------------- the training paths
# grouped_mm_fp8(backend="cutlass") and fused_moe(precision="fp8", backend="cutlass"): fprop and dgrad on this
# kernel, everything around them (quantizes, gathers, SwiGLU, the combine, the fp8 wgrad: a K-grouped GEMM this
# kernel is not) on the automatic choice.


def others(backend: str) -> str:
    """The backend of the ops around the CUTLASS GEMMs: the automatic choice where the GEMMs are CUTLASS's."""
    return "" if backend == "cutlass" else backend


def check_training(op: str, x: torch.Tensor, name: str) -> None:
    """backend='cutlass' in ``op``'s training path: its bf16 epilogue needs a bf16 ``x`` (named ``name``), and
    the kernel a Hopper GPU it is built for; raises naming why not."""
    if x.dtype != torch.bfloat16:
        raise TypeError(f"{op}: backend='cutlass' writes bfloat16 (its epilogue's): {name} must be "
                        f"torch.bfloat16, got {x.dtype}")
    reason = unavailable(x.device)
    if reason:
        raise RuntimeError(f"{op}: backend='cutlass' cannot run this call: {reason}")


def product(a, a_scale, b, b_scale, offs) -> torch.Tensor:
    """bf16 (a * a_scale) @ (b * b_scale) per expert for the training paths (their operands checked there).

    b_scale in either layout: the forward's (the transposed view of [E, N/128, K/128], read in place) or the
    dgrad's (the forward's blocks transposed: [E, K/128, N/128] contiguous, MN-major for this product), which is
    copied to the kernel's K-major SFB: E N K / 16384 floats, 0.23 MB for E 32 x 4096 x 7168 (a second
    instantiation with MN-major SFB would cost ~1 min of nvcc for 2 us of copy)."""
    return fp8_grouped_mm(a, a_scale, b, b_scale.transpose(1, 2).contiguous().transpose(1, 2), offs,
                          torch.bfloat16)
