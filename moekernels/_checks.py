"""Argument checks shared by every op and every backend. Each error names the argument."""

from __future__ import annotations

import os

import torch


def tensor(name: str, value, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}; got {str(value.dtype).removeprefix('torch.')}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")
    return value


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def choice(name: str, value, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def debug() -> bool:
    """``MOEKERNELS_DEBUG=1``: check data (ids in range) on CUDA too, at the cost of a host sync."""
    return os.environ.get("MOEKERNELS_DEBUG", "0") == "1"


def ids_in_range(name: str, ids: torch.Tensor, num_experts: int) -> None:
    """Raise if an id is outside [0, E). Reads the data, so it runs on CPU tensors, and on CUDA
    ones only under MOEKERNELS_DEBUG=1 (a host sync); otherwise CUDA kernels drop such pairs."""
    if ids.device.type == "cuda" and not debug():
        return
    bad = (ids < 0) | (ids >= num_experts)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise ValueError(
            f"{name} holds ids outside [0, num_experts={num_experts}): {name}{where} = {ids[tuple(where)].item()}"
        )


def offsets_in_range(name: str, offs: torch.Tensor, rows: int) -> None:
    """Raise unless ``offs`` is non-decreasing within [0, rows]. Reads the data, so CPU tensors
    only, or CUDA ones under MOEKERNELS_DEBUG=1; the kernels clamp offsets to [0, rows] anyway,
    so bad offsets there give wrong rows, never an out-of-bounds access."""
    if not offs.numel() or (offs.device.type == "cuda" and not debug()):
        return
    if bool((offs < 0).any()) or bool((offs[1:] < offs[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing and >= 0 (cumulative segment ends), got {offs.tolist()}")
    if int(offs[-1]) > rows:
        raise ValueError(f"{name}[-1] = {int(offs[-1])} exceeds the {rows} rows it segments")
