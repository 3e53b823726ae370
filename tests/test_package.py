"""The package: imports anywhere, and picks backends by the documented rules."""

import os
import subprocess
import sys

import pytest
import torch

import moekernels
from moekernels import _backend, _ext


def test_import_needs_no_gpu_and_no_extension():
    code = (
        "import sys; sys.modules['moekernels._C'] = None\n"  # as if never built
        "import moekernels, torch\n"
        "assert moekernels.HAS_CUDA_EXT is False, moekernels.HAS_CUDA_EXT\n"
        "w, ids = moekernels.topk_routing(torch.randn(3, 8), 2)\n"
        "assert ids.shape == (3, 2)\n"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_cpu_tensors_default_to_torch(monkeypatch):
    monkeypatch.delenv("MOEKERNELS_BACKEND", raising=False)
    assert _backend.choose("op", torch.device("cpu"), None) == "torch"


def test_cuda_tensors_default_to_the_fastest_built_backend(monkeypatch):
    monkeypatch.delenv("MOEKERNELS_BACKEND", raising=False)
    cuda = torch.device("cuda", 0)  # only the device type is read: no GPU needed
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(_ext, "no_image", lambda kernel, device: None)  # a GPU the build has code for
    assert _backend.choose("op", cuda, None) == "cuda"
    assert _backend.choose("op", cuda, None, cuda_reason="too many groups") == "triton"
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    assert _backend.choose("op", cuda, None) == "triton"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    assert _backend.choose("op", torch.device("cuda", 0), None) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.choose("op", torch.device("cpu"), "triton") == "triton"  # an argument beats it
    monkeypatch.setenv("MOEKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="MOEKERNELS_BACKEND .environment variable. must be one of"):
        _backend.choose("op", torch.device("cpu"), None)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.choose("op", torch.device("cpu"), "triton")


def test_forced_cuda_backend_is_checked(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", False)
    with pytest.raises(RuntimeError, match="not built"):
        _backend.choose("op", torch.device("cuda", 0), "cuda")
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _backend.choose("op", torch.device("cpu"), "cuda")
    with pytest.raises(ValueError, match="groups"):
        _backend.choose("op", torch.device("cuda", 0), "cuda", cuda_reason="n_group=64 > 32 groups")


def test_cuda_from_the_environment_skips_ops_without_a_cuda_kernel(monkeypatch):
    """MOEKERNELS_BACKEND=cuda runs every op that has a CUDA kernel; the others take triton.
    A backend="cuda" argument names one op, so there it raises."""
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", True)
    monkeypatch.setattr(_ext, "no_image", lambda kernel, device: None)  # a GPU the build has code for
    monkeypatch.setenv("MOEKERNELS_BACKEND", "cuda")
    cuda = torch.device("cuda", 0)
    assert _backend.choose("op", cuda, None) == "cuda"
    assert _backend.choose("plan_routing", cuda, None, cuda_reason=_backend.NO_CUDA_KERNEL) == "triton"
    with pytest.raises(ValueError, match="no CUDA kernel"):
        _backend.choose("plan_routing", cuda, "cuda", cuda_reason=_backend.NO_CUDA_KERNEL)


def test_import_survives_a_transformers_without_experts_interface():
    """``import moekernels`` registers the transformers backend only where it can: with a transformers that has no
    experts interface (4.x, here a bare stub) the import still works, and ``register_transformers()`` says why not."""
    code = (
        "import sys, types; sys.modules['transformers'] = types.ModuleType('transformers')\n"
        "import moekernels\n"
        "try:\n"
        "    moekernels.register_transformers()\n"
        "except ImportError as exc:\n"
        "    assert 'transformers >= 5' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('registered into a transformers without ExpertsInterface')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
