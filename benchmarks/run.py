"""The benchmark suite.

    python -m benchmarks.run [--quick] [--out DIR] [--only route] [--tokens 1,16,...]   # in a clone
    moekernels-bench [--quick] [--out DIR] [--only route] [--tokens 1,16,...]           # installed
    python -m benchmarks.run --quick --part headline --rows rows.jsonl   # the device check's first call

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
import dataclasses
import importlib
import json
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
    "torchtitan": "bench_torchtitan",  # last: the device check's stage 2 cuts the last rows first
}

# The rows that matter most (issue 21 item 7), in this order: what the device check's first call times
# (--part headline), and --part rest leaves out. (benchmark, case group, sizes, implementations or None
# for all; a case keeps naive, which its check compares against). Quick GPU cases all: tests check it.
HEADLINE = [
    ("grouped_gemm", "qwen3-30b-a3b gate_up fwd balanced", (512, 4096), None),  # bf16, against torch._grouped_mm
    ("fp8", "dense N4096 K7168 block", (4096,), None),  # FP8 block-wise against bf16
    ("fp8", "contiguous 8x4096 N4096 K7168 block", (32768,), None),
    ("route", "deepseek-v3 fp32", (40000,), None),  # cuda and triton
    ("moe", "qwen3-30b-a3b fwd bf16", (4096,), ("naive", "triton", "hf_grouped_mm")),  # prefill
    ("decode", "deepseek-v3 bf16", (1, 64), None),
    ("decode", "deepseek-v3 fp8", (1, 64), None),
]
PARTS = ("all", "headline", "rest")

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


def select(cases: list[harness.Case], part: str) -> list[harness.Case]:
    """The cases (and implementations) of one part: all, the HEADLINE rows in its order, or the rest."""
    if part == "all":
        return cases
    picked, rest = [], []
    for case in cases:
        entry = next((e for e in HEADLINE if (case.bench, case.group) == e[:2] and case.x in e[2]), None)
        if entry is None:
            rest.append(case)
            continue
        keep = set(case.impls) if entry[3] is None else set(entry[3]) | {"naive"}
        picked.append((HEADLINE.index(entry), dataclasses.replace(
            case, impls={k: fn for k, fn in case.impls.items() if k in keep})))
        left = {k: fn for k, fn in case.impls.items() if k not in keep}
        if left:  # the implementations the headline leaves out, with naive for their check
            rest.append(dataclasses.replace(case, impls={k: fn for k, fn in case.impls.items()
                                                         if k in left or k == "naive"}))
    return [case for _, case in sorted(picked, key=lambda p: p[0])] if part == "headline" else rest


def rows_table(path: Path) -> str:
    """The console table of a --rows file: what a run cut off before its report had measured."""
    first, *rest = Path(path).read_text().splitlines()
    head, records = json.loads(first), []
    for line in rest:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the last line, when the run was killed as it wrote it
            pass
    harness.derive(records, head["roofline"])
    meta = head["metadata"]
    return f"{meta['device_name']} ({meta['gpu']}), {len(records)} rows\n" + harness.console_report(records)


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
    p.add_argument("--part", choices=PARTS, default="all",
                   help="headline: only the rows that matter most (HEADLINE in run.py), in its order; rest: the "
                        "others (the device check's two calls)")
    p.add_argument("--rows", type=Path,
                   help="also append each row to this JSON-lines file as soon as it is measured (the first line: "
                        "the machine), so that a run cut off keeps what it measured")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only or (dict.fromkeys(e[0] for e in HEADLINE) if args.part == "headline" else BENCHMARKS)
    modules = {name: importlib.import_module(f".{BENCHMARKS[name]}", __package__) for name in names}
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
    cases = select(cases, args.part)
    if args.quick and not gpu and args.tokens is None:
        cases = cpu_quick(cases)
    on_record = None
    if args.rows is not None:
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        rows = args.rows.open("w")
        rows.write(json.dumps({"metadata": harness.metadata(args.quick), "roofline": roofline}) + "\n")
        rows.flush()

        def on_record(rec: dict) -> None:
            rows.write(json.dumps(rec, default=str) + "\n")
            rows.flush()

    records = harness.run_cases(cases, timer, on_record)
    if args.rows is not None:
        rows.close()
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
