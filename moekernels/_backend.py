"""Which backend runs an op: ``torch`` (the reference), ``triton`` or ``cuda`` (csrc/).

The choice, in order:
1. the op's ``backend=`` argument, else the ``MOEKERNELS_BACKEND`` environment variable
   (``cuda`` there runs every op that has a CUDA kernel, and ``triton`` the others);
2. otherwise CUDA tensors take the op's fastest built backend and CPU tensors ``torch``; ``cuda``
   only where moekernels._C has code the GPU runs (``_ext.no_image``), else ``triton``.
``triton`` on CPU tensors runs Triton's interpreter, which needs ``TRITON_INTERPRET=1`` set
before moekernels is imported (``triton.jit`` reads it when the kernel is defined).
The backend never changes results beyond rounding, and index outputs not at all.
"""

from __future__ import annotations

import contextlib
import os

import torch

from . import _ext, _interpreter

BACKENDS = ("torch", "triton", "cuda")
# The cuda_reason of an op whose CUDA kernel is not written yet: the automatic choice takes triton.
NO_CUDA_KERNEL = "no CUDA kernel for this op yet"
# The op -> the moekernels._C binding whose kernel _ext.no_image asks about, where the names differ. An op's
# backward (permute's permute_backward) is in the same .cu file, built for the same archs.
CUDA_KERNELS = {"quantize_fp8": "quantize_fp8_1x128"}


def device_guard(tensor: torch.Tensor):
    """Make the tensor's CUDA device current for a launch (cuda:1 tensors, say); a no-op on CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# triton.jit reads TRITON_INTERPRET when a kernel is defined, at moekernels' import: set later, the
# kernels are still compiled ones, and Triton's own error ("Cannot call @triton.jit'd outside of
# the scope of a kernel") says nothing of the cause. choose() compares the two.
INTERPRETING_AT_IMPORT = interpreting()
if INTERPRETING_AT_IMPORT:
    _interpreter.install()  # the interpreter's float conversions round as the GPU's do


def choose(op: str, device: torch.device, requested: str | None, *, cuda_reason: str | None = None) -> str:
    """Resolve the backend for one call of ``op`` on ``device``.

    ``cuda_reason`` is set when the op's CUDA kernel cannot take this call (say, too many
    groups); the automatic choice then falls back to ``triton``, and a forced ``cuda`` raises.
    So does a GPU the extension has no code for (``_ext.no_image``: asked once per kernel and GPU).
    """
    name = requested or os.environ.get("MOEKERNELS_BACKEND") or None
    # Errors name where the choice came from: the argument, or the environment variable that a
    # user may have set long ago in another shell.
    source = f"backend={name!r}" if requested else f"MOEKERNELS_BACKEND={name!r} (environment variable)"
    no_image = None
    if name in (None, "auto", "cuda") and cuda_reason is None and device.type == "cuda" and _ext.HAS_CUDA_EXT:
        no_image = _ext.no_image(CUDA_KERNELS.get(op, op), device)
    if not requested and name == "cuda" and device.type == "cuda" and (cuda_reason or no_image):
        # The variable means "cuda for every op that has a CUDA kernel"; an argument means this op.
        name = "triton"
    if name is None or name == "auto":
        if device.type != "cuda":
            return "torch"
        return "cuda" if _ext.HAS_CUDA_EXT and cuda_reason is None and no_image is None else "triton"
    if name not in BACKENDS:
        what = "backend" if requested else "MOEKERNELS_BACKEND (environment variable)"
        raise ValueError(f"{what} must be one of {BACKENDS} or 'auto', got {name!r}")
    if name == "triton" and device.type != "cuda":
        if not interpreting():
            raise ValueError(
                f"{op}: {source} on {device.type} tensors needs Triton's interpreter: "
                "set TRITON_INTERPRET=1 before importing moekernels"
            )
        if not INTERPRETING_AT_IMPORT:
            raise ValueError(
                f"{op}: {source} on {device.type} tensors: TRITON_INTERPRET=1 was set after moekernels "
                "was imported, but triton.jit reads it when the kernels are defined; set it before "
                "importing moekernels (or triton)"
            )
        problem = _interpreter.numpy_problem()
        if problem:
            raise RuntimeError(f"{op}: {source} on {device.type} tensors: {problem}")
    if name == "cuda":
        if not _ext.HAS_CUDA_EXT:
            raise RuntimeError(f"{op}: {source} but moekernels._C is not built ({_ext.LOAD_ERROR})")
        if device.type != "cuda":
            raise ValueError(f"{op}: {source} needs CUDA tensors, got {device.type} tensors")
        if cuda_reason is not None:
            raise ValueError(f"{op}: {source} cannot run this call: {cuda_reason}")
        if no_image is not None:
            raise RuntimeError(f"{op}: {source} but {no_image}")
    return name
