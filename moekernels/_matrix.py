"""The compile matrix (issue 21 item 4): every shipped Triton variant, with the config its launcher
picks on each architecture (configs.arch_limits, configs.fit_gemm_config), compiled for that
architecture on a machine with no GPU, and held to its limits: it compiles, spills nothing
(``ptxas -v`` with the ptxas Triton used), fits a block's shared memory and the register file
(``cuobjdump -res-usage`` of the cubin Triton built), and a matrix kernel multiplies with the
architecture's MMA family (mma.sync; wgmma on sm_90a; tcgen05 on sm_100a). A variant that cannot
run on an architecture (configs.variant_fallback) is not compiled but listed with what runs
instead; ``--check-fallbacks`` compiles those too, to show that each still fails (a listed
fallback that compiles is stale).

Lighter than moekernels/_sm90.py's contract: no disassembly, no K-loop facts. Those stay with the
sm_90 contract (tests/test_sm90_compile.py), which also compiles every variant for sm_90.

``python -m moekernels._matrix [--arch 80,89,...] [--check-fallbacks]`` prints one JSON cell per
(variant, architecture); ``--table`` prints the Markdown table kept in benchmarks/NOTES.md. Run it
without ``TRITON_INTERPRET=1`` (as ``python -m moekernels._sm90``).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field

from . import _sm90, configs

ARCHS = (80, 89, 90, 100, 120)
# An MMA family's instructions in the PTX.
MMA_PTX = {"mma.sync": r"\bmma\.sync\.aligned\b", "wgmma": r"\bwgmma\.mma_async\b", "tcgen05": r"\btcgen05\.mma\b"}


@dataclass
class Cell:
    """One shipped variant compiled for one architecture (or the fallback that runs instead)."""

    name: str
    capability: int
    matrix: bool
    config: str = ""  # the launcher's choice on this architecture: tiles, warps, stages
    fallback: str | None = None  # what runs instead (configs.variant_fallback); None: the variant runs
    error: str | None = None  # the compile's error (for a fallback: why it cannot run)
    registers: int = -1  # per thread
    spill_stores: int = -1  # bytes per thread (ptxas -v)
    spill_loads: int = -1
    stack: int = -1  # bytes per thread: spills, local arrays and calls (a division's slow path) take it
    shared: int = -1  # bytes per block: Triton's dynamic allocation plus ptxas's static
    threads: int = 0
    mma: list = field(default_factory=list)  # the MMA families in the PTX
    e4m3: bool = False  # an e4m3 type in the PTX (none may be where configs.fp8_path is "bytes")
    programs_per_sm: int = 0
    limited_by: str = ""


def config_of(v: _sm90.Variant) -> str:
    """A variant's tiles, warps and stages, as the table shows them."""
    cx = v.constexprs
    tiles = "x".join(str(cx[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in cx)
    return f"{tiles} w{v.options.get('num_warps', 4)}s{v.options.get('num_stages', 3)}".strip()


def compile_cell(v: _sm90.Variant, arch: configs.ArchLimits) -> Cell:
    cell = Cell(v.name, arch.capability, v.matrix, config_of(v))
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        kernel, log = _sm90.compile_kernel(v, arch.capability, with_log=True)
        usage = _sm90.res_usage(kernel.asm["cubin"])
        # The ptxas Triton built the cubin with (ptxas-blackwell from sm_100 on, in Triton 3.6): its
        # own -v log, or a run of it where the compile was cached.
        info = _sm90._ptxas_info(kernel.asm["ptx"], v.options.get("enable_fp_fusion", True), arch.target,
                                 get_ptxas(arch.capability).path, log=log)
    except Exception as exc:  # report every cell, not just the first failure
        cell.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        return cell
    ptx = kernel.asm["ptx"]
    cell.registers, cell.stack = usage["registers"], usage["stack"]
    cell.spill_stores, cell.spill_loads = info["spill_stores"], info["spill_loads"]
    cell.shared = kernel.metadata.shared + usage["shared_static"]
    cell.threads = kernel.metadata.num_warps * 32
    cell.mma = [name for name, pattern in MMA_PTX.items() if re.search(pattern, ptx)]
    cell.e4m3 = "e4m3" in ptx
    cell.programs_per_sm, cell.limited_by = _sm90.occupancy(cell.registers, cell.threads, cell.shared,
                                                            info["barriers"], arch)
    return cell


def cells(capability: int, check_fallbacks: bool = False) -> list[Cell]:
    """The row of one architecture: a cell per shipped variant, compiled, or its fallback."""
    arch = configs.arch_limits(capability)
    out = []
    for v in _sm90.shipped_variants(capability):
        fallback = configs.variant_fallback(v.name, arch)
        if fallback is None or check_fallbacks:
            cell = compile_cell(v, arch)
            cell.fallback = fallback
        else:
            cell = Cell(v.name, capability, v.matrix, config_of(v), fallback=fallback)
        out.append(cell)
    return out


def table(rows: list[dict]) -> str:
    """The Markdown table of benchmarks/NOTES.md: a row per variant, a column per architecture,
    each cell "registers / shared KB / programs an SM" (and warps / stages of a matrix kernel), or
    its fallback."""
    archs = sorted({r["capability"] for r in rows})
    by = {(r["name"], r["capability"]): r for r in rows}
    names = list(dict.fromkeys(r["name"] for r in rows))
    head = " | ".join(configs.arch_limits(a).target for a in archs)
    lines = [f"| variant | {head} |", "|---|" + "---:|" * len(archs)]

    def show(r: dict) -> str:
        if r["fallback"] is not None:
            return f"falls back: {r['fallback']}"
        if r["error"] is not None:
            return f"**fails**: {r['error'][:60]}"
        stage = f" {r['config'].split()[-1]}" if r["matrix"] else ""
        spills = f" **spills {r['spill_stores']} B**" if r["spill_stores"] else ""
        return f"{r['registers']} / {r['shared'] / 1024:.0f} / {r['programs_per_sm']}{stage}{spills}"

    for name in names:
        lines.append(f"| {name} | " + " | ".join(show(by[name, a]) if (name, a) in by else "" for a in archs) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    archs = ARCHS
    if "--arch" in argv:
        archs = tuple(int(a) for a in argv[argv.index("--arch") + 1].split(","))
    rows = [asdict(c) for a in archs for c in cells(a, "--check-fallbacks" in argv)]
    print(table(rows) if "--table" in argv else json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
