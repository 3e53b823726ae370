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
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
CU_SOURCES = ["route.cu", "permute.cu", "plan.cu", "quantize.cu"]
ARCHS = [("compute_90a", "sm_90a"), ("compute_80", "sm_80")]
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "-Xcompiler", "-fPIC",
    # One thread per -gencode: the sm_90a and sm_80 device passes of a file run side by side.
    "--threads", "0",
    *(f"-gencode=arch={virtual},code={real}" for virtual, real in ARCHS),
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
    """Compiles the .cu files with nvcc, then links them with pybind11's bindings.cpp.

    All of it runs at once: the four nvcc processes (each with its archs on threads) while the C++
    compiler builds bindings.cpp; the link waits for the objects. Of the ~36 CPU-seconds (x86 CPU,
    nvcc 13.0) route.cu takes 13, bindings.cpp 6.5: with free cores the build takes about as
    long as route.cu; on a busy 2-core machine it is CPU-bound either way (40-60 s).
    """

    def build_extensions(self):
        try:
            with ThreadPoolExecutor(max_workers=len(CU_SOURCES)) as pool:
                pending = [job for ext in self.extensions for job in self._start_nvcc(ext, pool)]
                link = self.compiler.link

                def link_after_nvcc(*args, **kwargs):
                    for job in pending:
                        job.result()
                    return link(*args, **kwargs)

                self.compiler.link = link_after_nvcc
                super().build_extensions()
                for job in pending:  # the link is skipped where the .so is up to date
                    job.result()
        except Exception as exc:
            if BUILD_CUDA == "1":
                raise
            print(f"WARNING: moekernels._C not built ({exc}); the torch and triton backends still work",
                  file=sys.stderr)

    def _start_nvcc(self, ext, pool):
        nvcc = os.path.join(ext.cuda_home, "bin", "nvcc")
        os.makedirs(self.build_temp, exist_ok=True)
        archs = " and ".join(real for _, real in ARCHS)
        announce(f"moekernels: building the CUDA extension moekernels._C with nvcc ({', '.join(ext.cu_sources)} "
                 f"for {archs}; about a minute on 2 cores). MOEKERNELS_BUILD_CUDA=0 skips it.")
        jobs = []
        for src in ext.cu_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            jobs.append(pool.submit(run_nvcc, [nvcc, *NVCC_FLAGS, "-I", CSRC, "-c", src, "-o", obj]))
            ext.extra_objects.append(obj)
        return jobs


def run_nvcc(cmd):
    """One nvcc run, its output kept whole (four run at once), raised with the command on failure."""
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {out.returncode}):\n{out.stdout}")
    print(" ".join(cmd) + ("\n" + out.stdout if out.stdout.strip() else ""), file=sys.stderr)


def announce(line):
    """Prints the line to stderr, and to the terminal when pip holds stderr back.

    pip shows a build's output only with -v or when it fails: without the terminal, a plain
    `pip install .` would sit silent through the whole nvcc build.
    """
    print(line, file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        return
    try:
        with open("/dev/tty", "w") as tty:
            tty.write("\n" + line + "\n")  # off pip's spinner line
    except OSError:  # no terminal (CI, a pipe): stderr is all there is
        pass


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
