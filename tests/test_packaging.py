"""The release path: sdist -> wheel built from that sdist -> install into a fresh venv.

The sdist must carry everything the wheel needs (the CUDA sources, the tuned config tables, the
license), so the wheel is built from the unpacked sdist, never from the repository, and imported
from outside the repository. No network: the wheel builds without build isolation (the test
extra installs setuptools and pybind11) and installs with --no-deps into a fresh venv that sees the
running interpreter's torch, triton and numpy (see ``_venv``). The nvcc build takes about a minute
on 2 cores, so it runs once per session (module fixtures).
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
import dataclasses
from pathlib import Path

import pytest
import torch

from moekernels import configs
from test_docs import relative_links

ROOT = Path(__file__).resolve().parents[1]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc: the wheel's CUDA extension cannot build")

# A table as benchmarks/tune_grouped_mm.py writes it, for a GPU name no real one has, with an
# entry unlike the default of its key: the installed package must find it and choose it.
TABLE_GPU = "testgpu"
TUNED = configs.GemmConfig(32, 64, 64, 4, False, 4, 2)
TUNED_KEY = ("plain", 64, 4, 256, 128)  # variant, rows, experts, N, K: rows class 16, bf16
# Left out of the copy: git, and earlier builds whose file lists setuptools would reuse. A built
# moekernels/_C*.so stays in: the sdist must not take it.
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", ".pytest_cache", ".whl")


def _run(cmd, *, cwd, env=None, timeout=900):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout + out.stderr


def _env(**extra):
    """The environment without the repository on PYTHONPATH (pytest's pythonpath is in-process only)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """The sdist of a copy of the repository holding one more tuned table; built with the CUDA
    extension off, so that nothing but MANIFEST.in and the package data puts files in it."""
    src = tmp_path_factory.mktemp("src") / "moekernels"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    key = configs.gemm_key(TUNED_KEY[0], configs.rows_class(*TUNED_KEY[1:3]), *TUNED_KEY[3:], torch.bfloat16)
    table = {"gpu": TABLE_GPU, "configs": {key: dataclasses.asdict(TUNED)}}
    (src / "moekernels" / "configs" / f"grouped_mm_{TABLE_GPU}.json").write_text(json.dumps(table))
    dist = tmp_path_factory.mktemp("sdist")
    code = "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])"
    _run([sys.executable, "-c", code, str(dist)], cwd=src, env=_env(MOEKERNELS_BUILD_CUDA="0"))
    (path,) = dist.glob("*.tar.gz")
    return path


@pytest.fixture(scope="module")
def wheel(sdist, tmp_path_factory):
    """The wheel pip builds from the sdist with MOEKERNELS_BUILD_CUDA=1 (a failed nvcc is an error), and the
    build's log (-v: pip shows a build's output only then). For sm_90a alone (TORCH_CUDA_ARCH_LIST, read
    through pip's build): the default list's images are test_cuda_ext's, and one arch is a fifth of the
    nvcc time (about 60 CPU-seconds less on the 2-core CI machine)."""
    out = tmp_path_factory.mktemp("wheel")
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-index",
                "--no-cache-dir", "-w", str(out), str(sdist)], cwd=out,
               env=_env(MOEKERNELS_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0"))
    (path,) = out.glob("moekernels-*.whl")
    return path, log


def _venv(root, python=sys.executable):
    """A fresh venv at ``root`` that sees ``python``'s packages after its own; returns its python.

    Not ``--system-site-packages``: that gives the venv the *base* interpreter's site-packages, and
    where ``python`` is itself a venv (a newcomer's, with torch installed into it) the base holds no
    torch. A .pth file in the new venv's site-packages instead adds ``python``'s site directories as
    ``--system-site-packages`` would add the base's (``site.addsitedir``, so their own .pth files,
    and those of a venv made this way, are read too). Without pip: ``python``'s pip, run by the
    venv's python, installs into the venv."""
    _run([str(python), "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    code = ("import json, os, site\n"
            "dirs = site.getsitepackages()\n"
            "user = site.getusersitepackages() if site.ENABLE_USER_SITE else None\n"
            "print(json.dumps([d for d in dirs + [user] if d and os.path.isdir(d)]))\n")
    dirs = json.loads(_run([str(python), "-c", code], cwd=root, env=_env()).splitlines()[-1])
    venv_python = root / "bin" / "python"
    purelib = _run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=root, env=_env()).splitlines()[-1]
    (Path(purelib) / "_moekernels_parent_site.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    return venv_python


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory):
    """A fresh venv that sees the running interpreter's packages, with only the wheel installed into it."""
    python = _venv(tmp_path_factory.mktemp("venv") / "env")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--no-cache-dir",
          str(wheel[0])], cwd=python.parents[2], env=_env())
    return python


def test_a_venv_made_for_the_wheel_sees_the_running_interpreters_packages(tmp_path):
    """The venv the wheel goes into imports this interpreter's torch, also when this interpreter is itself a venv
    with packages of its own (here `outer`, holding a module its base has not): from a venv, a newcomer's setup,
    ``--system-site-packages`` gave the base's packages only, and the wheel's import failed on 'No module named
    torch'. Fast, no build: it runs without the slow tests too."""
    outer = _venv(tmp_path / "outer")
    purelib = _run([str(outer), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=tmp_path, env=_env()).splitlines()[-1]
    (Path(purelib) / "moekernels_venv_probe.py").write_text("HERE = True\n")
    inner = _venv(tmp_path / "inner", python=outer)
    code = "import sys, torch, moekernels_venv_probe; print(sys.prefix); print(torch.__file__)"
    for python in (outer, inner):
        prefix, torch_file = _run([str(python), "-c", code], cwd=tmp_path, env=_env()).splitlines()[-2:]
        assert Path(prefix) == python.parents[1]
        assert Path(torch_file).resolve() == Path(torch.__file__).resolve()  # the running interpreter's torch


def _sdist_names(sdist):
    with tarfile.open(sdist) as tar:
        top = sdist.name.removesuffix(".tar.gz")  # moekernels-0.1.0
        return {n.removeprefix(top + "/") for n in tar.getnames()}


def test_sdist_is_complete(sdist):
    names = _sdist_names(sdist)
    csrc = {f"csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")}
    assert {"csrc/route.cu", "csrc/common.cuh", "csrc/bindings.cpp"} <= csrc
    assert csrc <= names, f"missing from the sdist: {sorted(csrc - names)}"
    assert {"LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} <= names
    assert f"moekernels/configs/grouped_mm_{TABLE_GPU}.json" in names
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc"))]


@pytest.mark.slow  # the wheel's nvcc build: about a minute (CI runs it; -m "not slow" leaves it out)
@needs_nvcc
def test_wheel_from_the_sdist_has_the_extension_tables_and_license(wheel):
    path, log = wheel
    # setup.py's one line on what nvcc compiles and how to skip it.
    (line,) = [ln for ln in log.splitlines() if "MOEKERNELS_BUILD_CUDA=0 skips it" in ln]
    assert all(f"csrc/{cu}" in line for cu in ("route.cu", "permute.cu", "plan.cu", "quantize.cu")), line
    assert "sm_90a" in line and "sm_80" not in line, line  # TORCH_CUDA_ARCH_LIST=9.0 reached setup.py
    assert "not built" not in log
    with zipfile.ZipFile(path) as whl:
        names = set(whl.namelist())
        dist_info = "-".join(path.name.split("-")[:2]) + ".dist-info"  # moekernels-0.1.0.dist-info
        metadata = whl.read(f"{dist_info}/METADATA").decode()
    assert [n for n in names if n.startswith("moekernels/_C.") and n.endswith(".so")], sorted(names)
    assert f"moekernels/configs/grouped_mm_{TABLE_GPU}.json" in names
    assert f"{dist_info}/licenses/LICENSE" in names
    # What the sdist carries for the README's links stays out of the installed package.
    assert not [n for n in names if n.startswith(("docs/", "examples/")) or "/results/" in n], sorted(names)
    headers = dict(ln.split(": ", 1) for ln in metadata.split("\n\n", 1)[0].splitlines() if ": " in ln)
    assert headers.get("License-Expression") == "Apache-2.0", metadata[:2000]
    assert headers.get("License-File") == "LICENSE"
    assert "License" not in headers  # the deprecated free-text field of license = {text = ...}


@pytest.mark.slow
@needs_nvcc
def test_installed_wheel_imports_with_its_extension_outside_the_repository(venv_python, tmp_path):
    code = (
        "import dataclasses, json, sys, torch, moekernels\n"
        "from moekernels import _ext, configs\n"
        f"cfg = configs.grouped_mm_config(*{TUNED_KEY!r}, torch.bfloat16, {TABLE_GPU!r})\n"
        "print(json.dumps({'file': moekernels.__file__, 'prefix': sys.prefix, 'ext': moekernels.HAS_CUDA_EXT,\n"
        "                  'error': _ext.LOAD_ERROR, 'kernels': sorted(_ext.C.KERNELS) if _ext.C else None,\n"
        "                  'config': dataclasses.astuple(cfg)}))\n"
    )
    out = subprocess.run([str(venv_python), "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    got = json.loads(out.stdout.splitlines()[-1])
    assert Path(got["file"]).is_relative_to(Path(got["prefix"])), got  # the venv's copy, not the repository's
    assert Path(got["prefix"]).is_relative_to(venv_python.parents[1])
    assert got["ext"] is True, got["error"]
    assert "topk_routing" in got["kernels"]
    assert TUNED != configs.default_gemm_config("plain", configs.rows_class(*TUNED_KEY[1:3]), 2)
    assert got["config"] == list(dataclasses.astuple(TUNED))  # the shipped table's entry, not the default


def test_sdist_holds_every_file_the_readme_and_docs_link_to(sdist):
    """The README is the package's description and links to docs/ and examples/; docs/ links on (a plot)."""
    names = _sdist_names(sdist)
    docs = ["README.md", *(n for n in sorted(names) if n.startswith("docs/") and n.endswith(".md"))]
    assert "docs/API.md" in docs
    for doc in docs:
        for target, _ in relative_links(ROOT / doc):
            if target:
                assert target in names or any(n.startswith(target + "/") for n in names), \
                    f"{doc} links to {target}, which the sdist does not hold"
