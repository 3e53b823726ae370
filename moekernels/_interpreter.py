"""Makes Triton's interpreter convert floats as the GPU does (installed when ``TRITON_INTERPRET=1``).

CI runs every Triton kernel on CPU tensors under the interpreter, so its float conversions are
what the CPU tests see. Triton 3.6's (``triton.runtime.interpreter``) gets four wrong:
- float32 -> bfloat16 truncates (its bit-level ``_convert_float`` without a rounding mode, which
  ``tl.store``'s implicit cast and ``.to(tl.bfloat16)`` both reach). The GPU rounds to nearest
  even (``cvt.rn.bf16.f32``): of 4,096 random values 2,028 came out one ulp smaller in magnitude,
  and a bf16 ``grouped_mm``'s error against float32 went from 2.9e-3 to 4.0e-3.
- bfloat16 subnormals -> float32 come out wrong ([0, 1e-40, -1, -2] in bf16 ranked [0, 1] by
  top-2 instead of torch's [1, 0]).
- float64 <-> bfloat16 goes through numpy's ``astype`` on the raw uint16 bits (0 or garbage).
- float32 -> e4m3 rounds half up without carrying into the exponent, and overflows to NaN where
  the GPU saturates (``cvt.rn.satfinite.e4m3x2.f32``: beyond +-448, inf included, gives +-448).

``install`` replaces the interpreter's float <-> float conversion, for the types below, by torch's
(round to nearest even, subnormals kept, NaN stays NaN), with e4m3 saturated first. That covers
every store, explicit cast and fp8 dot operand of every kernel at one place (fp16 goes through
torch too: numpy's ``astype`` already rounded it right, so nothing changes there); integer casts
are left as they are. Round-toward-zero
conversions (``fp_downcast_rounding="rtz"``) keep the interpreter's own code.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


@functools.cache
def _torch_dtypes() -> dict:
    import triton.language as tl

    return {tl.float32: torch.float32, tl.float64: torch.float64, tl.float16: torch.float16,
            tl.bfloat16: torch.bfloat16, tl.float8e4nv: torch.float8_e4m3fn}


def convert(data: np.ndarray, src, dst) -> np.ndarray | None:
    """``data`` (the interpreter's array: bf16 and fp8 as their uint16/uint8 bits) converted from
    triton dtype ``src`` to ``dst`` as the GPU rounds, in the interpreter's storage dtype; None
    where this module does not handle the pair."""
    types = _torch_dtypes()
    if src not in types or dst not in types or src == dst:
        return None
    source, target = types[src], types[dst]
    array = np.ascontiguousarray(data)
    if source in _RAW_BITS:  # stored as uint16 / uint8: torch reads them through a signed view
        array = array.view(_RAW_BITS[source][0])
    values = torch.from_numpy(array).view(source)
    if target == torch.float8_e4m3fn:
        values = values.float().clamp(-E4M3_MAX, E4M3_MAX)  # satfinite; clamp keeps NaN
    out = values.to(target)
    if target in _RAW_BITS:
        signed, unsigned = _RAW_BITS[target]
        return out.view(torch.int16 if signed == np.int16 else torch.int8).numpy().view(unsigned)
    return out.numpy()


# float types the interpreter keeps as raw bits: (the signed numpy view torch reads, its storage type)
_RAW_BITS = {torch.bfloat16: (np.int16, np.uint16), torch.float8_e4m3fn: (np.int8, np.uint8)}


def install() -> None:
    """Patch the interpreter's float conversions once (a no-op on a Triton without them)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    tensor_handle = getattr(interpreter, "TensorHandle", None)
    original = getattr(interpreter, "_convert_float", None)
    if builder is None or tensor_handle is None or original is None or getattr(original, "_moekernels", False):
        return
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def _convert_float(data, src, dst, rounding_mode):
        out = None if rounding_mode == rtz else convert(data, src, dst)
        return original(data, src, dst, rounding_mode) if out is None else out

    _convert_float._moekernels = True
    interpreter._convert_float = _convert_float  # cast_impl, create_fp_to_fp and create_dot look it up here
    cast_impl = builder.cast_impl

    def patched_cast_impl(self, src, dst_type):
        out = convert(src.data, src.dtype.scalar, dst_type.scalar)
        if out is None:
            return cast_impl(self, src, dst_type)
        return tensor_handle(out, dst_type.scalar)

    builder.cast_impl = patched_cast_impl
    for name in ("create_fp_ext", "create_fp_trunc"):  # lambdas bound to the original cast_impl
        setattr(builder, name, lambda self, src, dst_type: self.cast_impl(src, dst_type))


def numpy_problem() -> str | None:
    """Why this numpy cannot run the installed Triton's interpreter, or None."""
    import triton

    triton_version = tuple(int(p) for p in triton.__version__.split(".")[:2])
    numpy_version = tuple(int(p) for p in np.__version__.split(".")[:2])
    if triton_version < (3, 7) and numpy_version >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter needs numpy < 2.4, found numpy {np.__version__}: "
                "pip install 'numpy<2.4'")
    return None
