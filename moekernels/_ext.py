"""Loads the optional compiled extension ``moekernels._C`` (see csrc/).

Importing moekernels never needs it, nor a GPU: ``HAS_CUDA_EXT`` says whether it loaded, and
``LOAD_ERROR`` why not; ``CUTLASS_ERROR`` why its CUTLASS kernels are not built in ("" where they are).
``BUILD_ARCHS`` lists the architectures it was built for, and
``no_image(kernel, device)`` says why a kernel cannot run on a GPU (None where it can).
"""

from __future__ import annotations

import functools
import importlib
import warnings

try:
    C = importlib.import_module("moekernels._C")

    HAS_CUDA_EXT = True
    LOAD_ERROR = None
except ImportError as exc:  # not built (no nvcc, or MOEKERNELS_BUILD_CUDA=0)
    C = None
    HAS_CUDA_EXT = False
    LOAD_ERROR = str(exc)
if C is not None and not hasattr(C, "kernel_image"):  # an in-place .so left by an older checkout
    C = None
    HAS_CUDA_EXT = False
    LOAD_ERROR = "moekernels._C predates this moekernels (it has no kernel_image): rebuild it with pip install -e ."

# nvcc's code= names (setup.py's TORCH_CUDA_ARCH_LIST): sm_XY is SASS, compute_XY PTX for later GPUs.
BUILD_ARCHS: tuple[str, ...] = tuple(C.ARCHS.split()) if C is not None else ()

# Why the CUTLASS FP8 grouped GEMM (csrc/fp8_grouped_cutlass*.cu, fp8_grouped_mm's backend="cutlass") is not in
# the build, "" where it is: setup.py builds it for sm_90a and sm_100a where the arch list has them and it finds
# CUTLASS's headers.
if C is None:
    CUTLASS_ERROR = f"moekernels._C is not built ({LOAD_ERROR})"
else:
    CUTLASS_ERROR = getattr(C, "CUTLASS_ERROR",
                            "moekernels._C predates the CUTLASS kernel: rebuild it with pip install -e .")

# torch dtype name -> the extension's dtype code (csrc/common.cuh, enum class DType)
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def stream(tensor) -> int:
    """The handle of the current CUDA stream on the tensor's device, as the csrc/ functions take it."""
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


def dtype_code(dtype) -> int:
    """The csrc/ DType code of a torch dtype (common.cuh)."""
    return DTYPE_CODES[str(dtype).removeprefix("torch.")]


def no_image(kernel: str, device) -> str | None:
    """Why the CUDA kernel of the binding ``kernel`` (one of ``C.KERNELS``) cannot run on the CUDA
    ``device``, or None where it can.

    The build may lack code for the device's compute capability: an sm_80 image runs on 8.x, sm_90a
    on 9.0 alone, PTX on its capability and later ones (the driver compiles it). The driver decides
    (``C.kernel_image``: cudaFuncGetAttributes), once per kernel and device; then cached. The first
    time a kernel has none, a warning names the GPU, its capability and the build's list.
    """
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return _no_image(kernel, index)


@functools.cache
def _no_image(kernel: str, index: int) -> str | None:
    import torch

    with torch.cuda.device(index):
        error, _binary_version, _ptx_version = C.kernel_image(kernel)
    if error == "cudaSuccess":
        return None
    major, minor = torch.cuda.get_device_capability(index)
    gpu = f"{torch.cuda.get_device_name(index)} (cuda:{index}, compute capability {major}.{minor})"
    reason = (f"moekernels._C has no {kernel} code that {gpu} can run ({error}): it was built for "
              f"{', '.join(BUILD_ARCHS)}; reinstall with TORCH_CUDA_ARCH_LIST={major}.{minor} to build for it")
    # One warning a device: the text names no kernel, so Python's registry shows it once.
    warnings.warn(f"moekernels._C has no code that {gpu} can run (built for {', '.join(BUILD_ARCHS)}): the "
                  f"ops with a CUDA kernel run their Triton kernels there; reinstall with "
                  f"TORCH_CUDA_ARCH_LIST={major}.{minor} to build for it", RuntimeWarning, stacklevel=2)
    return reason
