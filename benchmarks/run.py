"""The benchmark suite.

    python -m benchmarks.run [--quick] [--out DIR] [--only route] [--tokens 1,16,...]

With a CUDA GPU: measures the roofline (bf16 torch.mm and device copy), times
every case, writes bench.json, bench.md and one PNG per benchmark (where
matplotlib is installed) under benchmarks/results/<gpu>/, and prints the table
last. Without one: times the naive and reference paths on the CPU at small
sizes, says so, and writes the same files under benchmarks/results/cpu/.

A benchmark is a module with
    cases(device: str, quick: bool, tokens: list[int] | None) -> list[harness.Case]
    notes(records: list[dict]) -> list[str]
and one line in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from benchmarks import harness

BENCHMARKS = {
    "route": "benchmarks.bench_route",
    "plan": "benchmarks.bench_plan",
    "permute": "benchmarks.bench_permute",
    "grouped_gemm": "benchmarks.bench_grouped_gemm",
    "fp8": "benchmarks.bench_fp8",
    "moe": "benchmarks.bench_moe",
    "decode": "benchmarks.bench_decode",
    "distributed": "benchmarks.bench_distributed",
}

NO_GPU = ("no CUDA GPU found: kernel timings (triton, cuda) need a CUDA GPU; "
          "timed the reference and naive paths on the CPU only")


def _tokens(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repetitions (the device check's suite)")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<gpu>/)")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                   help="run only this benchmark; may be repeated")
    p.add_argument("--tokens", type=_tokens, help="comma-separated token counts T, instead of each benchmark's own")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = [importlib.import_module(BENCHMARKS[name]) for name in (args.only or BENCHMARKS)]
    out_dir = args.out or Path(__file__).resolve().parent / "results" / harness.gpu_name()
    torch.manual_seed(0)

    gpu = harness.has_gpu()
    notes = []
    if gpu:
        # Graph replays are cheap, so even the quick suite takes 15 replays of >= 0.5 ms.
        timer = harness.GpuTimer(reps=15 if args.quick else 50, target_ms=0.5 if args.quick else 1.0)
        roofline = harness.measure_roofline(timer)
    else:
        timer = harness.CpuTimer(reps=5 if args.quick else 15, target_ms=2.0)
        roofline = None
        notes.append(NO_GPU)

    cases = [c for m in modules for c in m.cases("cuda" if gpu else "cpu", args.quick, args.tokens)]
    records = harness.run_cases(cases, timer)
    harness.derive(records, roofline)
    errors = harness.error_lines(records)
    notes += [line for m in modules for line in m.notes(records)] + errors
    paths = harness.write_results(out_dir, harness.metadata(args.quick), roofline, records, notes)

    if roofline is not None:
        print(f"roofline: bf16 torch.mm {roofline['mm_bf16_tflops']:.0f} TFLOP/s, "
              f"device copy {roofline['copy_gbps']:.0f} GB/s")
    print("wrote " + ", ".join(str(p) for p in paths))
    for line in notes:
        print(line)
    print()
    print(harness.console_report(records))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
