"""Loads the optional compiled extension ``moekernels._C`` (see csrc/).

Importing moekernels never needs it, nor a GPU: ``HAS_CUDA_EXT`` says whether it loaded, and
``LOAD_ERROR`` why not.
"""

from __future__ import annotations

import importlib

try:
    C = importlib.import_module("moekernels._C")

    HAS_CUDA_EXT = True
    LOAD_ERROR = None
except ImportError as exc:  # not built (no nvcc, or MOEKERNELS_BUILD_CUDA=0)
    C = None
    HAS_CUDA_EXT = False
    LOAD_ERROR = str(exc)

# torch dtype name -> the extension's dtype code (csrc/common.cuh, enum class DType)
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}


def stream(tensor) -> int:
    """The handle of the current CUDA stream on the tensor's device, as the csrc/ functions take it."""
    import torch

    return torch.cuda.current_stream(tensor.device).cuda_stream


def dtype_code(dtype) -> int:
    """The csrc/ DType code of a torch dtype (common.cuh)."""
    return DTYPE_CODES[str(dtype).removeprefix("torch.")]
