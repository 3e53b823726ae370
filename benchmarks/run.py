"""The benchmark suite.

    python -m benchmarks.run [--quick] [--out DIR] [--only route] [--tokens 1,16,...]   # in a clone
    moekernels-bench [--quick] [--out DIR] [--only route] [--tokens 1,16,...]           # installed

With a CUDA GPU: measures the roofline (bf16 torch.mm and device copy), times
every case, writes bench.json, bench.md and one PNG per benchmark (where
matplotlib is installed and a case ran at two sizes or more; the console
says why when it writes none) and prints the table last. Without one: times the
naive and reference paths on the CPU at small sizes, says so, and writes the
same files. They go to benchmarks/results/<gpu>/ in a clone and to
./moekernels-bench-results/<gpu>/ when installed; a --quick run to quick/
below that, so that it never overwrites a full run.

A benchmark is a module with
    cases(device: str, quick: bool, tokens: list[int] | None) -> list[harness.Case]
    notes(records: list[dict]) -> list[str]
and optionally IMPLS (its own implementations' names -> one line for the legend), and one line
in BENCHMARKS.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

from . import harness

BENCHMARKS = {  # the registry name -> the module, in this package
    "route": "bench_route",
    "plan": "bench_plan",
    "permute": "bench_permute",
    "grouped_gemm": "bench_grouped_gemm",
    "fp8": "bench_fp8",
    "moe": "bench_moe",
    "decode": "bench_decode",
    "fp8_train": "bench_fp8_train",
    "distributed": "bench_distributed",
}

NO_GPU = ("no CUDA GPU found: kernel timings (triton, cuda) need a CUDA GPU; "
          "timed the reference and naive paths on the CPU only")


def _tokens(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def default_out(gpu: str, quick: bool) -> Path:
    """benchmarks/results/<gpu>/ in a clone, ./moekernels-bench-results/<gpu>/ installed (never
    inside site-packages); a quick run's in quick/ below it, so that it never replaces a full run's."""
    base = harness.HERE / "results" if harness.IN_CLONE else Path.cwd() / "moekernels-bench-results"
    return base / gpu / "quick" if quick else base / gpu


def cpu_quick(cases: list[harness.Case]) -> list[harness.Case]:
    """--quick on the CPU: each benchmark's first case. The CPU times say nothing about the
    kernels, so its quick run is a smoke test of every benchmark's code paths: each benchmark's
    first case (the README's Times table has the measured time)."""
    first: dict[str, harness.Case] = {}
    for case in cases:
        first.setdefault(case.bench, case)
    return list(first.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    prog = "moekernels-bench" if __package__ == "moekernels.benchmarks" else "python -m benchmarks.run"
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer sizes and repetitions (the device check's suite); on the CPU, each benchmark's "
                        "first case only (every case at the sizes --tokens gives)")
    p.add_argument("--out", type=Path,
                   help="output folder (default: benchmarks/results/<gpu>/ in a clone, ./moekernels-bench-results/"
                        "<gpu>/ installed; quick/ below it with --quick)")
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                   help="run only this benchmark; may be repeated")
    p.add_argument("--tokens", type=_tokens, help="comma-separated token counts T, instead of each benchmark's own")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modules = {name: importlib.import_module(f".{BENCHMARKS[name]}", __package__) for name in (args.only or BENCHMARKS)}
    out_dir = args.out or default_out(harness.gpu_name(), args.quick)
    torch.manual_seed(0)

    gpu = harness.has_gpu()
    notes = []
    if gpu:
        # Graph replays are cheap, so even the quick suite takes 15 replays of >= 0.5 ms.
        timer = harness.GpuTimer(reps=15 if args.quick else 50, target_ms=0.5 if args.quick else 1.0)
        roofline = harness.measure_roofline(timer)
    else:
        print(harness.CPU_DRY_RUN, flush=True)  # up front: before minutes of numbers that mean nothing
        timer = harness.CpuTimer(reps=5 if args.quick else 15, target_ms=2.0)
        roofline = None
        notes.append(NO_GPU)

    cases = [c for m in modules.values() for c in m.cases("cuda" if gpu else "cpu", args.quick, args.tokens)]
    if args.quick and not gpu and args.tokens is None:
        cases = cpu_quick(cases)
    records = harness.run_cases(cases, timer)
    harness.derive(records, roofline)
    errors = harness.error_lines(records)
    notes += [line for m in modules.values() for line in m.notes(records)] + errors
    impls = {name: {**harness.IMPLS, **getattr(m, "IMPLS", {})} for name, m in modules.items()}
    paths, no_plots = harness.write_results(out_dir, harness.metadata(args.quick), roofline, records, notes, impls)

    if roofline is not None:
        print(f"roofline: bf16 torch.mm {roofline['mm_bf16_tflops']:.0f} TFLOP/s, "
              f"device copy {roofline['copy_gbps']:.0f} GB/s")
    print("wrote " + ", ".join(str(p) for p in paths))
    if no_plots:
        print(no_plots)
    for line in notes:
        print(line)
    print()
    print(harness.console_report(records, impls))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
