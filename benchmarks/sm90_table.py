"""The static performance contract as a table: what each shipped Triton variant does on Hopper,
read from its sm_90a compile on the CPU (moekernels/_sm90.py; tests/test_sm90_compile.py asserts it).

    python -m benchmarks.sm90_table            # Markdown on stdout (benchmarks/NOTES.md keeps it)
    python -m benchmarks.sm90_table --json r.json  # from a saved ``python -m moekernels._sm90`` report

Run without TRITON_INTERPRET. Columns: registers per thread and shared memory per program (Triton's
allocation plus ptxas's static 1 KB), threads, programs resident per SM and the limit that binds,
the wgmma groups in flight in the K loop (wgmma.wait_group N; "+ wgmma segment": a second K loop,
a LoRA segment's, and what it multiplies with), CTA barriers per K step (BAR.SYNC
in the SASS K loop), a transpose through shared memory in the K loop, and how operands arrive per
K step (TMA copies, 16-byte and narrower cp.async per thread; 16-byte ld/st.global for row kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict


def paths(r: dict) -> str:
    if r["rows"]:
        return "ld/st.global.v4" if r["vector16"] else "no 16-byte access"
    if not r["matrix"]:
        return "-"
    parts = [f"TMA x{r['k_tma']}"] if r["k_tma"] else []
    parts += [f"cp.async 16 B x{r['k_cp16']}"] if r["k_cp16"] else []
    parts += [f"cp.async <16 B x{r['k_cp_narrow']}"] if r["k_cp_narrow"] else []
    return ", ".join(parts) or "plain loads"


def markdown(reports: list[dict]) -> str:
    def cell(value):
        return "-" if value is None else str(value)

    rows = ["| variant | regs | smem KB | threads | programs/SM (limit) | wgmma depth | barriers/K step "
            "| smem round trip | operands per K step |",
            "|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in reports:
        if r["error"]:
            rows.append(f"| {r['name']} | compile error: {r['error'].splitlines()[0]} |||||||")
            continue
        smem = (r["shared"] + r["shared_static"]) / 1024
        segment = f" + {r['segment_mma']} segment" if r.get("segment_mma") else ""
        rows.append(f"| {r['name']} | {r['registers']} | {smem:.1f} | {r['threads']} | "
                    f"{r['programs_per_sm']} ({r['limited_by']}) | {cell(r['wgmma_depth'])}{segment} | "
                    f"{cell(r['k_barriers'])} | "
                    f"{'yes' if r['smem_round_trip'] else ('no' if r['matrix'] else '-')} | {paths(r)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="a saved `python -m moekernels._sm90` report instead of compiling")
    args = parser.parse_args(argv)
    if args.json:
        with open(args.json) as f:
            reports = json.load(f)
    else:
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
            return 2
        from moekernels import _sm90

        reports = [asdict(r) for r in _sm90.compile_all()]
    print(markdown(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
