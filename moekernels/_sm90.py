"""Compile shipped Triton kernel configs for Hopper on a machine with no GPU.

``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` gives PTX and a cubin without a device.
Register and spill counts on a ``CompiledKernel`` are only filled in when it is loaded on a
GPU, so the wheel's own ``ptxas -v --gpu-name sm_90a`` is run on the PTX instead.

``python -m moekernels._sm90`` prints one JSON report per shipped variant. It must run without
``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` gives objects that cannot be
compiled), which is why the test suite calls it in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

HOPPER_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block can opt into on sm_90
# Triton's pointer type of each torch dtype a shipped kernel takes (names, so torch stays unimported).
TRITON_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float8_e4m3fn": "*fp8e4nv"}


def ptr(dtype) -> str:
    """The Triton signature type of a pointer to ``dtype`` elements."""
    return TRITON_PTR[str(dtype).removeprefix("torch.")]


@dataclass
class Variant:
    """One shipped kernel config: what ``triton.compile`` needs."""

    name: str
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict
    options: dict  # num_warps, num_stages, enable_fp_fusion, ...
    matrix: bool = False  # a matrix kernel must use wgmma
    # Arguments the launch specialises as divisible by 16, as Triton does for 16-byte-aligned
    # pointers and integers that are multiples of 16: what the vectorised loads depend on.
    aligned: tuple = ()


@dataclass
class Report:
    name: str
    matrix: bool
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    wgmma: bool
    fma: bool
    vector16: bool = False  # a 16-byte global load or store (ld/st.global.v4 of 32-bit words)
    tma: bool = False  # a TMA bulk tensor copy (cp.async.bulk.tensor): descriptor loads
    wgmma_fp8: bool = False  # a wgmma on e4m3 operands
    error: str | None = None


def ptxas_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_info(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [ptxas_path(), "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = out.stdout + out.stderr

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"ptxas -v printed no {pattern!r}:\n{log}")
        return int(m.group(1))

    return {
        "registers": grab(r"Used (\d+) registers"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
    }


def compile_variant(v: Variant) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(v.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in v.aligned}
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=v.options)
    ptx = kernel.asm["ptx"]
    return Report(
        name=v.name,
        matrix=v.matrix,
        shared=kernel.metadata.shared,
        wgmma="wgmma" in ptx,
        fma=re.search(r"\bfma\.rn\.f32\b", ptx) is not None,
        vector16=re.search(r"\b(ld|st)\.global(\.\w+)*\.v4\.(b32|f32|u32|s32)\b", ptx) is not None,
        tma="cp.async.bulk.tensor" in ptx,
        wgmma_fp8=re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx) is not None,
        **_ptxas_info(ptx),
    )


def signature(fn, constexprs: dict, **types) -> dict:
    """A kernel's Triton signature: ``types`` for the named arguments (pointers, floats), "i32"
    for the other run-time ones, "constexpr" for the constexprs."""
    return {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }


def shipped_variants() -> list[Variant]:
    from . import fp8, grouped_gemm, plan, route
    from .permute import sm90_variants as permute_variants  # moekernels.permute is the function

    return (route.sm90_variants() + plan.sm90_variants() + permute_variants() + grouped_gemm.sm90_variants()
            + fp8.sm90_variants())


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    reports = []
    for v in shipped_variants():
        try:
            reports.append(compile_variant(v))
        except Exception as exc:  # report every variant, not just the first failure
            reports.append(Report(v.name, v.matrix, -1, -1, -1, -1, -1, False, False,
                                  error=f"{type(exc).__name__}: {exc}"))
    print(json.dumps([asdict(r) for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
