"""torch.autocast for the GEMM ops: under ``torch.autocast(device_type, dtype)`` on CPU or CUDA they
compute in the autocast dtype, as ``torch.mm`` does, instead of in their inputs' float32.

Two places cast, with one rule (:func:`cast`: float32 / float16 / bfloat16 tensors to the autocast
dtype of their device; float8 and float64 ones, and everything outside autocast, as they are):

* the public functions, before their checks, so that a bf16 activation meets fp32 master weights
  (what an autocast region hands a layer) and the dtype checks see the cast operands;
* the custom ops themselves (:func:`register`: an Autocast kernel on CPU and CUDA), for callers
  of ``torch.ops.moekernels.*``; it runs the op with autocast off, so the op's own torch glue
  (the reference's float32 matmuls) keeps its precision.

``MoE`` follows the same rule: its input check accepts an x whose dtype differs from the layer's
where :func:`cast` would give both the same (:func:`cast_dtype`), as ``nn.Linear`` accepts an
fp32 layer's bf16 input under autocast; and a router with ``router_dtype`` set runs with
autocast off (:func:`disabled`), so its logits are in that dtype.

Only the GEMM operands are cast: router weights (``topk_weights``, ``scatter_weights``) stay
float32, and fp8 scales float32. ``torch.library.register_autocast`` casts every floating input
to one fixed dtype, which would round the router weights to bf16 and ignore an fp16 region.
The casts are differentiable ``Tensor.to`` calls, so float32 parameters get float32 gradients.
"""

from __future__ import annotations

import contextlib

import torch

CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cpu", "cuda")  # the autocast devices of the ops
_LIB = torch.library.Library("moekernels", "FRAGMENT")  # noqa: TOR901 (kernels for existing ops)


def autocast_dtype(device_type: str | None) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` where autocast is on there, else None."""
    if device_type not in DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype :func:`cast` gives a tensor of ``dtype`` on ``device_type``, without casting it
    (a check of dtypes need not copy a layer's weights)."""
    target = autocast_dtype(device_type)
    return target if target is not None and dtype in CAST_DTYPES else dtype


def disabled(device_type: str):
    """A context with autocast off on ``device_type`` (a no-op context on other devices, which
    ``torch.autocast`` may not know)."""
    return torch.autocast(device_type, enabled=False) if device_type in DEVICE_TYPES else contextlib.nullcontext()


def cast(*tensors):
    """``tensors`` in the autocast dtype of their device where autocast is on there, else as
    they are (anything but a float32, float16 or bfloat16 tensor always as it is)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = autocast_dtype(first.device.type if first is not None else None)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in CAST_DTYPES else t for t in tensors)


def register(name: str, positions: tuple[int, ...]) -> None:
    """Give the custom op ``moekernels::<name>`` an Autocast kernel on CPU and CUDA that casts its
    arguments at ``positions`` with :func:`cast`, then runs the op with autocast off."""
    overload = getattr(torch.ops.moekernels, name).default

    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(*args, device_type=device_type):
            args = list(args)
            present = [i for i in positions if i < len(args)]  # the dispatcher drops trailing defaults
            for i, t in zip(present, cast(*(args[i] for i in present))):
                args[i] = t
            with disabled(device_type):
                return overload(*args)

        _LIB.impl(name, kernel, key)
