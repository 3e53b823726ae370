"""Shared @triton.jit math helpers.

``exp_f32`` is the kernel twin of :func:`moekernels.reference.exp_f32`: the same float32
operations in the same order, so that routing choices are bit-identical across backends.
Kernels that call it must be launched with ``enable_fp_fusion=False``; a fused multiply-add
rounds once instead of twice and would change the bits (the sm_90 compile test checks the
PTX for ``fma``).
"""

import os

import triton
import triton.language as tl

from ..reference import EXP_COEFFS, EXP_MAX, EXP_MIN, LN2_HI, LN2_LO, LOG2E

_C0: tl.constexpr = tl.constexpr(EXP_COEFFS[0])
_C1: tl.constexpr = tl.constexpr(EXP_COEFFS[1])
_C2: tl.constexpr = tl.constexpr(EXP_COEFFS[2])
_C3: tl.constexpr = tl.constexpr(EXP_COEFFS[3])
_C4: tl.constexpr = tl.constexpr(EXP_COEFFS[4])
_C5: tl.constexpr = tl.constexpr(EXP_COEFFS[5])
_C6: tl.constexpr = tl.constexpr(EXP_COEFFS[6])
_C7: tl.constexpr = tl.constexpr(EXP_COEFFS[7])
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_LN2_HI: tl.constexpr = tl.constexpr(LN2_HI)
_LN2_LO: tl.constexpr = tl.constexpr(LN2_LO)
_EXP_MIN: tl.constexpr = tl.constexpr(EXP_MIN)
_EXP_MAX: tl.constexpr = tl.constexpr(EXP_MAX)


@triton.jit
def exp_f32(x):
    y = exp_f32_in_range(tl.minimum(tl.maximum(x, _EXP_MIN), _EXP_MAX))
    y = tl.where(x < _EXP_MIN, 0.0, y)
    return tl.where(x > _EXP_MAX, float("inf"), y)


@triton.jit
def exp_f32_in_range(xc, NEG: tl.constexpr = False):
    """exp_f32 of xc in [EXP_MIN, EXP_MAX] (the clamped argument), without the selects that
    give 0 below and inf above. NEG: exp_f32 of -xc, bit for bit, without negating xc (-x is
    0 - x once compiled, an instruction an element): fl(-a * b) = -fl(a * b) = fl(a * -b), and
    fl(-xc - t) = fl(-t - xc), the same two operands."""
    if NEG:
        n = tl.floor(xc * -_LOG2E + 0.5)
        r = (n * -_LN2_HI - xc) - n * _LN2_LO
    else:
        n = tl.floor(xc * _LOG2E + 0.5)
        r = (xc - n * _LN2_HI) - n * _LN2_LO
    p = r * _C0 + _C1
    p = p * r + _C2
    p = p * r + _C3
    p = p * r + _C4
    p = p * r + _C5
    p = p * r + _C6
    p = p * r + _C7
    two_n = ((n.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return p * two_n


@triton.jit
def order_key(x):
    """float32 -> int32 whose signed order is the float order (-0.0 must be normalised first)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


# triton 3.6-3.9's interpreter multiplies the raw uint16 bits of bf16 dot operands: garbage.
# Every tl.dot of the library goes through ``dot`` below, which upcasts the operands when
# interpreting (fp16 and fp8 too: exact, the interpreter computes in float32 anyway). Read once
# at import, like triton.jit reads TRITON_INTERPRET.
INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def e4m3_to_float(bits, dtype: tl.constexpr):
    """e4m3fn values from their bytes (uint8), by integer operations, in ``dtype`` (bfloat16,
    float16 or float32: each holds every e4m3 value exactly). Where the GPU has no e4m3 MMA
    (sm_80, sm_86) Triton cannot name the type, so the launchers pass e4m3 tensors as their bytes.

    e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no inf; 0x7F and 0xFF are NaN. A
    normal number moves to float32's fields as they are, its exponent rebiased by 120 (127 - 7);
    a subnormal one (exponent 0) is m * 2**-9, exact in float32 (not a float32 subnormal: no
    flush-to-zero can touch it)."""
    b = bits.to(tl.int32)
    exp_mant = b & 0x7F
    normal = (exp_mant << 20) + (120 << 23)
    subnormal = ((b & 7).to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2**-9
    mag = tl.where((b & 0x78) == 0, subnormal, normal)
    mag = tl.where(exp_mant == 0x7F, 0x7FC00000, mag)
    return (mag | ((b & 0x80) << 24)).to(tl.float32, bitcast=True).to(dtype)


@triton.jit
def dot(a, b, acc):
    """acc + a @ b, float32 accumulation; the one place that works around the interpreter, and the
    architecture: a uint8 operand holds e4m3 bytes (see e4m3_to_float), decoded here to the other
    operand's type (bfloat16 when both are bytes), so the product runs on bf16 (fp16, tf32) MMA."""
    if a.dtype == tl.uint8:
        a = e4m3_to_float(a, tl.bfloat16 if b.dtype == tl.uint8 else b.dtype)
    if b.dtype == tl.uint8:
        b = e4m3_to_float(b, a.dtype)
    if INTERPRET:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        acc = tl.dot(a, b, acc)
    return acc
