"""The interpreter's faults that the kernels work around, checked on the Triton that runs the suite:
3.6 (the GPU image's, .ci/run) and 3.9 (the newest, .ci/triton39). Each fault's first test shows it
is still there (the raw operation is wrong under the interpreter), so a Triton that fixes it fails
that test and the workaround can go; the second shows the workaround is right. The float
conversions (float32 -> bf16 truncated, bf16 subnormals, float64 -> bf16, e4m3 overflow) are
patched in the interpreter itself at import (moekernels/_interpreter.py, tests/test_interpreter.py).
"""

import pytest
import torch
import triton
import triton.language as tl

from moekernels import _backend
from moekernels.kernels._math import dot

pytestmark = pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")
TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2])


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr, RAW: tl.constexpr):
    i = tl.arange(0, N)
    a = tl.load(a_ptr + i[:, None] * N + i[None, :])
    b = tl.load(b_ptr + i[:, None] * N + i[None, :])
    if RAW:
        c = tl.dot(a, b, tl.zeros((N, N), tl.float32))
    else:
        c = dot(a, b, tl.zeros((N, N), tl.float32))
    tl.store(c_ptr + i[:, None] * N + i[None, :], c)


@triton.jit
def _scalar_mask_kernel(x_ptr, y_ptr, n, m, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=(i < n) & (m > 0), other=-1.0), mask=i < n)


def _rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "dot"])
def test_bf16_dot(raw):
    """tl.dot of bf16 operands multiplies their raw uint16 bits under the interpreter (a relative
    error ~1e9 on 3.6 and 3.9); kernels/_math.dot upcasts them there."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16, RAW=raw)
    err = _rel(c, a.float() @ b.float())
    assert (err > 1.0) if raw else (err < 1e-6), err


def test_scalar_comparison_in_a_block_mask():
    """triton 3.9's interpreter types a comparison of scalars as its operands (i32) and a block made
    of it holds int32, which a load rejects as a mask ("mask has unsupported dtype"); 3.6 keeps it
    bool. So no kernel ands a scalar comparison into a block mask: combine_rows_kernel clamps its
    next index (kernels/_permute.py), the fp8 scale loads select (kernels/_grouped_gemm.py)."""
    x, y = torch.arange(8, dtype=torch.float32), torch.zeros(8)
    if TRITON >= (3, 9):
        with pytest.raises(Exception, match="mask has unsupported dtype"):
            _scalar_mask_kernel[(1,)](x, y, 5, 1, N=8)
    else:
        _scalar_mask_kernel[(1,)](x, y, 5, 1, N=8)
        assert torch.equal(y, torch.tensor([0.0, 1, 2, 3, 4, 0, 0, 0]))
