"""Picks the backends the suite can run here.

Without a GPU the Triton kernels run on CPU tensors under Triton's interpreter: that needs
TRITON_INTERPRET=1 before moekernels (and so triton.jit) is imported, which is why it is set
here, at the top of the first file pytest loads. With a GPU the kernels run compiled, and the
tests marked ``gpu`` run too (benchmarks/device_check.sh runs them).
"""

import os

import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

import moekernels  # noqa: E402
from moekernels import _backend  # noqa: E402

# tests/test_properties.py: "ci" (default) draws the same examples on every run and keeps no
# example database; HYPOTHESIS_PROFILE=dev draws fresh ones and saves failures in .hypothesis/.
# Both print the falsifying example (with its drawn seed) and a @reproduce_failure blob.
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]  # interpreted Triton is slow by design
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None,
                          suppress_health_check=_SLOW)
settings.register_profile("dev", derandomize=False, print_blob=True, deadline=None, suppress_health_check=_SLOW)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


_NEEDS_INTERPRETER = () if _backend.interpreting() else (pytest.mark.skip(reason="needs TRITON_INTERPRET=1"),)
_NEEDS_EXT = () if moekernels.HAS_CUDA_EXT else (pytest.mark.skip(reason="moekernels._C not built"),)


def cpu_backends():
    """Backends that run CPU tensors here: the reference, and Triton when interpreting."""
    return ["torch", pytest.param("triton", marks=_NEEDS_INTERPRETER)]


def gpu_backends():
    return ["triton", pytest.param("cuda", marks=_NEEDS_EXT)]


def device_backends(*, cuda: bool = True):
    """(device, backend) pairs: every backend on CPU tensors here, and on CUDA tensors (``gpu``).
    ``cuda=False`` for ops that have no CUDA kernel (a forced ``backend="cuda"`` raises there)."""
    params = [
        pytest.param("cpu", "torch", id="cpu-torch"),
        pytest.param("cpu", "triton", marks=_NEEDS_INTERPRETER, id="cpu-triton"),
        pytest.param("cuda", "triton", marks=pytest.mark.gpu, id="cuda-triton"),
    ]
    if cuda:
        params.append(pytest.param("cuda", "cuda", marks=(pytest.mark.gpu, *_NEEDS_EXT), id="cuda-cuda"))
    return params


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are empty or zero)."""
    a, b = a.double().cpu(), b.double().cpu()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den else num
