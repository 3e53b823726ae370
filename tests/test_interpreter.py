"""Triton's interpreter converts floats as the GPU does once moekernels is imported (moekernels/_interpreter.py).

Without the patch, Triton 3.6's interpreter truncates float32 -> bf16, mis-converts bf16 subnormals,
turns float64 -> bf16 into garbage and overflows e4m3 to NaN; each case below failed then.
"""

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import moekernels
from moekernels import _backend, _interpreter

from conftest import rel_err

pytestmark = pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")


@triton.jit
def _store_kernel(x_ptr, implicit_ptr, explicit_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(implicit_ptr + offs, x, mask=mask)  # tl.store's own cast to the pointer's type
    tl.store(explicit_ptr + offs, x.to(DTYPE).to(tl.float32), mask=mask)


_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float8_e4m3fn: tl.float8e4nv}


def _hard_float32(dtype) -> torch.Tensor:
    """Random values plus the ones rounding gets wrong: exact halfway points of ``dtype`` (ties
    go to even), subnormals of float32 and of ``dtype``, overflow, +-inf, NaN and -0."""
    g = torch.Generator().manual_seed(0)
    values = [torch.randn(4096, generator=g) * 10.0 ** torch.randint(-6, 6, (4096,), generator=g)]
    base = (torch.randn(512, generator=g) * 4).clamp(-400, 400).to(dtype)
    bits = base.view(torch.int16 if dtype.itemsize == 2 else torch.int8)
    above = (bits + 1).view(dtype).float()  # the next representable value away from zero
    values.append((base.float() + above) / 2)  # exact ties: round half to even
    values.append(torch.tensor([1e-40, -1e-40, 3e-39, 1e-45, -0.0, 0.0, float("inf"), float("-inf"),
                                float("nan"), 3.4e38, -3.4e38, 65504.0, 65520.0, 448.0, 464.0, 1000.0,
                                -1e6, 2.0 ** -9, 2.0 ** -10, 1.5 * 2.0 ** -9]))
    return torch.cat(values)


def _gpu_cast(x: torch.Tensor, dtype) -> torch.Tensor:
    """What the GPU stores: round to nearest even; e4m3 saturates (cvt.rn.satfinite)."""
    if dtype == torch.float8_e4m3fn:
        x = x.clamp(-448.0, 448.0)
    return x.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise: equal bits, or both NaN (NaN payloads are not specified)."""
    return (a.view(torch.uint8).reshape(a.shape[0], -1) == b.view(torch.uint8).reshape(b.shape[0], -1)).all(1) | (
        a.float().isnan() & b.float().isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float8_e4m3fn], ids=str)
def test_float32_stores_and_casts_round_as_the_gpu(dtype):
    x = _hard_float32(dtype)
    implicit = torch.empty(x.shape, dtype=dtype)
    explicit = torch.empty_like(x)
    _store_kernel[(1,)](x, implicit, explicit, x.numel(), DTYPE=_TL[dtype], BLOCK=triton.next_power_of_2(x.numel()))
    want = _gpu_cast(x, dtype)
    assert _same(implicit, want).all(), x[~_same(implicit, want)][:8]
    assert _same(explicit, want.float()).all(), x[~_same(explicit, want.float())][:8]


@triton.jit
def _convert_kernel(x_ptr, out_ptr, n, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(DTYPE), mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=str)
def test_every_bit_pattern_upcasts_exactly(dtype):
    """All 65,536 bf16 (all 256 e4m3) bit patterns, subnormals included, to float32."""
    int_type = torch.int16 if dtype == torch.bfloat16 else torch.int8
    bits = torch.arange(-(2 ** (8 * dtype.itemsize - 1)), 2 ** (8 * dtype.itemsize - 1), dtype=torch.int32)
    x = bits.to(int_type).view(dtype)
    out = torch.empty(x.shape)
    _convert_kernel[(1,)](x, out, x.numel(), DTYPE=tl.float32, BLOCK=x.numel())
    assert _same(out, x.float()).all(), bits[~_same(out, x.float())][:8]


def test_float64_to_bfloat16():
    x = _hard_float32(torch.bfloat16).double()
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    _convert_kernel[(1,)](x, out, x.numel(), DTYPE=tl.bfloat16, BLOCK=triton.next_power_of_2(x.numel()))
    assert _same(out, x.to(torch.bfloat16)).all()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bf16_subnormal_logits_route_as_torch(scoring):
    logits = torch.tensor([[0.0, 1e-40, -1.0, -2.0]]).bfloat16()
    assert logits[0, 1] != 0  # a bf16 subnormal, not flushed
    ids = {b: moekernels.topk_routing(logits, 2, scoring=scoring, backend=b)[1] for b in ("torch", "triton")}
    assert ids["triton"].tolist() == ids["torch"].tolist() == [[1, 0]]


def test_bf16_grouped_mm_rounds_like_the_torch_backend():
    """Truncation made the interpreted bf16 output's error 1.4x the torch backend's (4.0e-3 vs 2.9e-3)."""
    g = torch.Generator().manual_seed(1)
    offs = torch.tensor([40, 40, 41, 97], dtype=torch.int32)  # an empty expert, a single row, odd sizes
    x = torch.randn(97, 64, generator=g)
    w = torch.randn(4, 64, 48, generator=g) / 8
    exact = moekernels.reference.grouped_mm(x.double(), w.double(), offs)
    errs = {b: rel_err(moekernels.grouped_mm(x.bfloat16(), w.bfloat16(), offs, backend=b).float(),
                       moekernels.reference.grouped_mm(x.bfloat16().double(), w.bfloat16().double(), offs))
            for b in ("torch", "triton")}
    assert errs["triton"] <= 1.1 * errs["torch"], errs
    assert exact.abs().sum() > 0


def test_interpreter_set_after_import_gives_a_clear_error():
    """triton.jit reads TRITON_INTERPRET when the kernels are defined: set after the import, the
    library says so instead of Triton's 'Cannot call @triton.jit'd outside of the scope of a kernel'."""
    code = ("import os, torch, moekernels\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "try:\n"
            "    moekernels.topk_routing(torch.randn(4, 8), 2, backend='triton')\n"
            "except ValueError as e:\n"
            "    print('ERROR', e)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOEKERNELS_BACKEND")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR" in out.stdout and "set after moekernels was imported" in out.stdout, out.stdout + out.stderr


def test_numpy_too_new_for_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(_interpreter.np, "__version__", "2.4.1")
    assert "numpy < 2.4" in _interpreter.numpy_problem()
    with pytest.raises(RuntimeError, match="numpy < 2.4"):
        _backend.choose("topk_routing", torch.device("cpu"), "triton")
    monkeypatch.setattr(_interpreter.np, "__version__", "2.3.5")
    assert _interpreter.numpy_problem() is None
    monkeypatch.setattr(triton, "__version__", "3.9.0")
    monkeypatch.setattr(_interpreter.np, "__version__", "2.4.1")
    assert _interpreter.numpy_problem() is None
