"""Build script: the pure-Python package, plus the optional CUDA extension moekernels._C.

The extension (csrc/) is built when nvcc is found, by default for sm_80 (which also runs on 8.6 and
8.9), sm_90a, sm_100a and sm_120, plus PTX of compute_120 that the driver compiles for later GPUs.
It includes no torch headers, so it needs neither a GPU nor a matching torch to build.
- TORCH_CUDA_ARCH_LIST (PyTorch's convention for extensions, e.g. "9.0" or "8.0;12.0+PTX")
  builds for those compute capabilities instead: cuda_archs() below.
- MOEKERNELS_BUILD_CUDA=0 skips it.
- MOEKERNELS_BUILD_CUDA=1 makes a failed build an error (by default the package installs
  without it and warns, and moekernels.HAS_CUDA_EXT is False).
- CUDA_HOME points at the toolkit when nvcc is not on the PATH.
- CUTLASS's block-scaled FP8 grouped GEMMs are built where CUTLASS's headers are found: CUTLASS_PATH
  (a CUTLASS checkout), else the nvidia-cutlass wheel (a build requirement in pyproject.toml).
  csrc/fp8_grouped_cutlass.cu for sm_90a alone when the list has 9.0, csrc/fp8_grouped_cutlass_sm100.cu
  for sm_100a alone when it has 10.0 (moekernels._C.CUTLASS_ARCHS lists those built). Otherwise the
  extension is built without them, says why, and moekernels._C.CUTLASS_ERROR holds the reason.
"""

import os
import re
import shutil
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "csrc"
CU_SOURCES = ["route.cu", "permute.cu", "plan.cu", "quantize.cu"]
# CUTLASS's kernels, each built for its one arch alone: Hopper's (wgmma, TMA, setmaxnreg) and datacenter
# Blackwell's (tcgen05 MMA into TMEM). Not sm_120a (GeForce/RTX Blackwell, example 87's kernel): the list builds
# sm_120 + PTX, which arch-specific code cannot use.
CUTLASS_SOURCES = {("compute_90a", "sm_90a"): "fp8_grouped_cutlass.cu",
                   ("compute_100a", "sm_100a"): "fp8_grouped_cutlass_sm100.cu"}
# The compute capabilities built when TORCH_CUDA_ARCH_LIST is unset: Ampere (sm_80 SASS runs on 8.0,
# 8.6, 8.7 and 8.9), Hopper, datacenter and consumer Blackwell, and PTX of the newest for GPUs to come.
DEFAULT_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"
# Built as their arch-specific variant (sm_90a runs on 9.0 alone, sm_100a on 10.0 alone): their own
# instructions (wgmma and setmaxnreg on Hopper, tcgen05 on Blackwell) need it. Any other X.Y builds
# plain sm_XY, which also runs on X.Z for Z > Y; "12.0a" asks for sm_120a explicitly.
ARCH_SPECIFIC = ("9.0", "10.0")
MIN_CAPABILITY = (8, 0)  # bf16 arithmetic, and the oldest GPU the kernels were written for
# torch.utils.cpp_extension's names (torch 2.11), so that a list written for torch builds here too.
NAMED_ARCHES = {
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX",
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
}
BUILD_CUDA = os.environ.get("MOEKERNELS_BUILD_CUDA", "auto")


def cuda_archs(arch_list=None):
    """TORCH_CUDA_ARCH_LIST's value (None: the default) -> nvcc's (virtual, real) -gencode pairs.

    Entries are compute capabilities, "X.Y", "X.Ya" (arch-specific) or "X.Y+PTX" (PTX of compute_XY
    beside the SASS), or torch's names ("Hopper"), separated by ";" or spaces. Those below 8.0 are
    dropped with a warning (none left: []); "native" asks nvidia-smi for the GPUs of this machine.
    """
    text = (arch_list or DEFAULT_ARCH_LIST).strip()
    if text == "native":
        text = native_arch_list()
    for name in sorted(NAMED_ARCHES, key=len, reverse=True):  # "Ampere+Tegra" before "Ampere"
        text = text.replace(name, NAMED_ARCHES[name])
    pairs, dropped = [], []
    for entry in text.replace(" ", ";").split(";"):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d)(a?)(\+PTX)?", entry)
        if m is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} in {arch_list!r}: expected compute "
                             f"capabilities such as '9.0', '9.0a', '12.0+PTX' or a name such as 'Hopper'")
        major, minor, specific, ptx = m.groups()
        if (int(major), int(minor)) < MIN_CAPABILITY:
            dropped.append(entry)
            continue
        num = major + minor
        suffix = "a" if specific or f"{major}.{minor}" in ARCH_SPECIFIC else ""
        pairs.append((f"compute_{num}{suffix}", f"sm_{num}{suffix}"))
        if ptx:  # plain compute_XY: an arch-specific variant's PTX runs on that one capability alone
            pairs.append((f"compute_{num}", f"compute_{num}"))
    if dropped:
        warnings.warn(f"TORCH_CUDA_ARCH_LIST: moekernels' CUDA kernels need compute capability "
                      f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: {', '.join(dropped)} dropped", stacklevel=2)
    # Deduplicated, in capability order (the recorded list reads sm_80 ... compute_120).
    return sorted(dict.fromkeys(pairs), key=lambda p: (int(re.sub(r"\D", "", p[1])), p[1].startswith("compute")))


def native_arch_list():
    """TORCH_CUDA_ARCH_LIST=native: this machine's GPUs, the newest with PTX, as torch builds it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST=native needs nvidia-smi to name this machine's GPUs: {exc}")
    caps = sorted(set(out), key=lambda c: tuple(map(int, c.split("."))))
    if not caps:
        raise ValueError("TORCH_CUDA_ARCH_LIST=native: nvidia-smi lists no GPU")
    return ";".join(caps) + "+PTX"


def nvcc_flags(archs):
    return [
        "-O3",
        "-std=c++17",
        "-Xcompiler", "-fPIC",
        # One thread per -gencode: the device passes of a file (one per arch) run side by side.
        "--threads", "0",
        *(f"-gencode=arch={virtual},code={real}" for virtual, real in archs),
    ]


def cutlass_flags():
    """nvcc flags CUTLASS's headers need beyond ours: constexpr calls across host and device (cute), and
    its device asserts off (NDEBUG), as CUTLASS's own CMake builds them."""
    return ["--expt-relaxed-constexpr", "-DNDEBUG"]


def find_cutlass():
    """(include dirs, None) of CUTLASS's headers, or (None, why not).

    CUTLASS_PATH (a CUTLASS checkout or install: include/ and tools/util/include/) comes first, then the
    nvidia-cutlass wheel's copy (cutlass_library/source/). Only its headers are used; nothing is linked.
    """
    root = os.environ.get("CUTLASS_PATH")
    where = "CUTLASS_PATH"
    if not root:
        import importlib.util

        spec = importlib.util.find_spec("cutlass_library")  # located, not imported (its generator is large)
        if spec is None or not spec.origin:
            return None, ("CUTLASS's headers were not found: install nvidia-cutlass==4.2.0.0 (a build requirement; "
                          "without build isolation, install it first) or set CUTLASS_PATH")
        root = os.path.join(os.path.dirname(spec.origin), "source")
        where = "the nvidia-cutlass wheel"
    dirs = [os.path.join(root, "include"), os.path.join(root, "tools", "util", "include")]
    if not os.path.exists(os.path.join(dirs[0], "cutlass", "cutlass.h")):
        return None, f"{where} ({root}) has no include/cutlass/cutlass.h"
    return dirs, None


def arch_names(archs):
    """The pairs as the build records them (moekernels._C.ARCHS) and cuobjdump names them."""
    return " ".join(real for _, real in archs)


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

    All of it runs at once: the four nvcc processes (each with its archs on threads), and one more for
    each CUTLASS file built (fp8_grouped_cutlass.cu, fp8_grouped_cutlass_sm100.cu), while the C++
    compiler builds bindings.cpp; the link waits for the objects. Always relinked: setuptools would skip
    the link when the .so is newer than bindings.cpp, keeping a stale .so after an edit of a .cu file or
    a new TORCH_CUDA_ARCH_LIST (an editable install builds the .so in place).

    Measured with nvcc 13.0 on this project's 2-core x86 machine, shared (load 17-22), one build after
    the other: the default 4 archs + PTX take 76 CPU-seconds (360 s wall there), sm_90a + sm_80 took
    45 (197 s). Each virtual arch is one more cicc pass of every file (route.cu: ~5 CPU-s an arch,
    ~3-4 s of host compile once; the sm_120 SASS beside compute_120's PTX adds ~1 s); bindings.cpp
    ~6.5. So, estimated, about 40 s on 2 free cores and 10-15 s on 16; TORCH_CUDA_ARCH_LIST=9.0 builds one arch.
    fp8_grouped_cutlass.cu (one arch, CUTLASS's templates) is ~47 CPU-s on its own (65 s wall at load ~2), the
    longest job: pip install -e . went from 60 to 107 CPU-s (134 to 187 s wall at load 5-10).
    fp8_grouped_cutlass_sm100.cu is ~47 CPU-s more (46 s wall alone): build_ext --inplace went from 99-105
    to 149-157 CPU-s (64 to 76 s wall at load ~2-3, 95 to 132 s at load ~5).
    """

    def build_extensions(self):
        self.force = True
        try:
            with ThreadPoolExecutor(max_workers=len(CU_SOURCES) + len(CUTLASS_SOURCES)) as pool:
                pending = [job for ext in self.extensions for job in self._start_nvcc(ext, pool)]
                link = self.compiler.link

                def link_after_nvcc(*args, **kwargs):
                    for job in pending:
                        job.result()
                    return link(*args, **kwargs)

                self.compiler.link = link_after_nvcc
                super().build_extensions()
                for job in pending:  # an nvcc failure raises here if the link did not wait for it
                    job.result()
        except Exception as exc:
            if BUILD_CUDA == "1":
                raise
            print(f"WARNING: moekernels._C not built ({exc}); the torch and triton backends still work",
                  file=sys.stderr)

    def _start_nvcc(self, ext, pool):
        nvcc = os.path.join(ext.cuda_home, "bin", "nvcc")
        os.makedirs(self.build_temp, exist_ok=True)
        archs = ", ".join(real for _, real in ext.archs)
        announce(f"moekernels: building the CUDA extension moekernels._C with nvcc ({', '.join(ext.cu_sources)} "
                 f"for {archs}; about a minute on 2 cores). MOEKERNELS_BUILD_CUDA=0 skips it.")
        jobs = []
        for arch in ext.cutlass_archs:  # first: at ~1 min of one core each they are the longest
            source = CUTLASS_SOURCES[arch]
            announce(f"moekernels: building {source} (CUTLASS's FP8 grouped GEMM, {arch[1]}) against "
                     f"{ext.cutlass_includes[0]}")
            src = os.path.join(CSRC, source)
            obj = os.path.join(self.build_temp, source + ".o")
            includes = [flag for d in ext.cutlass_includes for flag in ("-I", d)]
            cmd = [nvcc, *nvcc_flags([arch]), *cutlass_flags(), "-I", CSRC, *includes, "-c", src, "-o", obj]
            jobs.append(pool.submit(run_nvcc, cmd))
            ext.extra_objects.append(obj)
        for src in ext.cu_sources:
            obj = os.path.join(self.build_temp, os.path.basename(src) + ".o")
            jobs.append(pool.submit(run_nvcc, [nvcc, *nvcc_flags(ext.archs), "-I", CSRC, "-c", src, "-o", obj]))
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
    archs = cuda_archs(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    if not archs:
        if BUILD_CUDA == "1":
            raise RuntimeError("MOEKERNELS_BUILD_CUDA=1 but TORCH_CUDA_ARCH_LIST names no compute capability "
                               f">= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}")
        print("TORCH_CUDA_ARCH_LIST names no GPU the CUDA kernels run on: installing moekernels without its "
              "CUDA extension", file=sys.stderr)
        return []
    import pybind11

    lib = next(
        d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "targets", "x86_64-linux", "lib"))
        if os.path.exists(os.path.join(d, "libcudart_static.a"))
    )
    cutlass_archs = [arch for arch in CUTLASS_SOURCES if arch in archs]
    cutlass_includes = None
    cutlass_error = "TORCH_CUDA_ARCH_LIST has neither 9.0 nor 10.0 (its kernels are sm_90a's and sm_100a's)"
    if cutlass_archs:
        cutlass_includes, cutlass_error = find_cutlass()
    if cutlass_error:
        announce(f"moekernels: building the CUDA extension without the CUTLASS FP8 grouped GEMM "
                 f"(fp8_grouped_mm's backend='cutlass'): {cutlass_error}")
        cutlass_archs = []
    macros = [("MOEKERNELS_ARCHS", f'"{arch_names(archs)}"'),
              ("MOEKERNELS_CUTLASS_ERROR", '"' + (cutlass_error or "").replace('"', "'") + '"'),
              ("MOEKERNELS_CUTLASS_ARCHS", f'"{arch_names(cutlass_archs)}"')]
    # bindings.cpp binds each built kernel: MOEKERNELS_WITH_CUTLASS_SM90, MOEKERNELS_WITH_CUTLASS_SM100.
    macros += [(f"MOEKERNELS_WITH_CUTLASS_SM{real[3:-1]}", "1") for _, real in cutlass_archs]
    ext = Extension(
        "moekernels._C",
        sources=[os.path.join(CSRC, "bindings.cpp")],
        include_dirs=[pybind11.get_include(), os.path.join(cuda_home, "include"), CSRC],
        library_dirs=[lib],
        # cudart linked statically: the .so needs only the driver's libcuda at run time.
        libraries=["cudart_static", "dl", "rt", "pthread"],
        extra_compile_args=["-O3", "-std=c++17"],
        # The list moekernels._C.ARCHS reports, so that an error can name it without a GPU.
        # and whether the CUTLASS kernels are in (MOEKERNELS_CUTLASS_ERROR: "" where they are, else why not).
        define_macros=macros,
        language="c++",
    )
    ext.cuda_home = cuda_home
    ext.archs = archs
    ext.cu_sources = [os.path.join(CSRC, s) for s in CU_SOURCES]
    ext.cutlass_includes = cutlass_includes
    ext.cutlass_archs = cutlass_archs
    return [ext]


if __name__ == "__main__":  # tests import this file for cuda_archs() (setuptools runs it as __main__)
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
