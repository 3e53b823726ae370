"""Build script: the pure-Python package, plus the optional CUDA extension moekernels._C.

The extension (csrc/) is built when nvcc is found, for sm_90a (wgmma, TMA) and a generic sm_80.
It includes no torch headers, so it needs neither a GPU nor a matching torch to build.
- MOEKERNELS_BUILD_CUDA=0 skips it.
- MOEKERNELS_BUILD_CUDA=1 makes a failed build an error (by default the package installs
  without it and warns, and moekernels.HAS_CUDA_EXT is False).
- CUDA_HOME points at the toolkit when nvcc is not on the PATH.
"""

import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
CU_SOURCES = ["route.cu", "permute.cu", "plan.cu", "quantize.cu"]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-Xcompiler", "-fPIC",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
]
BUILD_CUDA = os.environ.get("MOEKERNELS_BUILD_CUDA", "auto")


def find_cuda_home():
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


class BuildExt(build_ext):
    """Compiles the .cu files with nvcc, then links them with pybind11's bindings.cpp."""

    def build_extensions(self):
        try:
            for ext in self.extensions:
                self._nvcc(ext)
            super().build_extensions()
        except Exception as exc:
            if BUILD_CUDA == "1":
                raise
            print(f"WARNING: moekernels._C not built ({exc}); the torch and triton backends still work",
                  file=sys.stderr)

    def _nvcc(self, ext):
        nvcc = os.path.join(ext.cuda_home, "bin", "nvcc")
        os.makedirs(self.build_temp, exist_ok=True)
        for src in ext.cu_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            cmd = [nvcc, *NVCC_FLAGS, "-I", CSRC, "-c", src, "-o", obj]
            print(" ".join(cmd))
            subprocess.check_call(cmd)
            ext.extra_objects.append(obj)


def extensions():
    if BUILD_CUDA == "0":
        return []
    cuda_home = find_cuda_home()
    if cuda_home is None:
        if BUILD_CUDA == "1":
            raise RuntimeError("MOEKERNELS_BUILD_CUDA=1 but no CUDA toolkit (nvcc) was found")
        print("nvcc not found: installing moekernels without its CUDA extension", file=sys.stderr)
        return []
    import pybind11

    lib = next(
        d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
        if os.path.exists(os.path.join(d, "libcudart_static.a"))
    )
    ext = Extension(
        "moekernels._C",
        sources=[os.path.join(CSRC, "bindings.cpp")],
        include_dirs=[pybind11.get_include(), os.path.join(cuda_home, "include"), CSRC],
        library_dirs=[lib],
        # cudart linked statically: the .so needs only the driver's libcuda at run time.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3", "-std=c++17"],
        language="c++",
    )
    ext.cuda_home = cuda_home
    ext.cu_sources = [os.path.join(CSRC, s) for s in CU_SOURCES]
    return [ext]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
