"""The shared benchmark harness: timing, counters, roofline and reports.

A benchmark module (``bench_<stage>.py``) describes its problems as ``Case``
objects; ``run.py`` hands them to ``run_cases`` with a ``GpuTimer`` (or a
``CpuTimer`` where there is no GPU), then ``derive`` turns the raw times into
GB/s, TFLOP/s, fractions of the roofline and speed-ups, and ``write_results``
writes the JSON, Markdown and plots.

Conventions a module follows:
- the implementation named ``naive`` is the plain PyTorch baseline every other
  one is compared with, and comes first in ``Case.impls``;
- the one named ``native`` is torch's own op for the same job, where one exists;
- the one named ``stock`` is the library a benchmark integrates with, as it runs unchanged
  (bench_torchtitan): the baseline of 'x stock'. A case without a naive row has every row
  checked by its ``compare`` against the case's own reference.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Callable

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
# In a clone the suite is the repository's benchmarks/ folder, beside pyproject.toml; installed
# (the wheel maps it to the package moekernels.benchmarks) it sits in site-packages/moekernels/.
IN_CLONE = HERE.name == "benchmarks" and (REPO_ROOT / "pyproject.toml").is_file()

# One graph replays at most this many input sets in turn. Past it a set is
# smaller than 2 x L2 / 64 (under 2 MB on a 60 MB L2), so the sets would not
# evict each other and rotating them buys nothing: one set is reused instead.
MAX_SETS = 64
# One graph holds at most this many calls: a naive router is ~15 kernels a
# call, so 500 calls keep a graph under ~10k nodes and its capture under a second.
MAX_CALLS = 500
# Fewest calls per timed replay, so the two events' ~1 us resolution stays
# well under the replay's length.
MIN_CALLS = 10


# ---------------------------------------------------------------- the machine

def has_gpu() -> bool:
    return torch.cuda.is_available()


_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def gpu_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100', else a dashed slug."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w not in _VENDOR_WORDS]
    # A data-centre part is named by one model word first (H200, A100, L40S, GH200).
    if words and re.fullmatch(r"[a-z]{1,3}[0-9]+[a-z]*", words[0]):
        return words[0]
    return "-".join(words) or "gpu"


def gpu_name() -> str:
    """The short name results are filed under: 'h200', 'h100', ... or 'cpu'."""
    return gpu_slug(torch.cuda.get_device_name()) if has_gpu() else "cpu"


def l2_bytes() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size


def git_commit() -> str | None:
    # The device machine gets a copy of the work tree without .git: the caller names the commit.
    if os.environ.get("MOEKERNELS_COMMIT"):
        return os.environ["MOEKERNELS_COMMIT"]
    if not IN_CLONE:  # site-packages may sit in a venv inside another project's git repository
        return None
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(quick: bool) -> dict:
    import moekernels

    gpu = has_gpu()
    meta = {
        "gpu": gpu_name(),
        "device_name": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": np.__version__,
        "python": platform.python_version(),
        "moekernels": getattr(moekernels, "__version__", None),
        "has_cuda_ext": bool(moekernels.HAS_CUDA_EXT),
        "git_commit": git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
    }
    if gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["l2_bytes"] = props.L2_cache_size
        meta["sm_count"] = props.multi_processor_count
    return meta


# ---------------------------------------------------------------- the cases

@dataclass
class Case:
    """One problem, timed once per implementation.

    ``flops`` and ``bytes`` are the least the problem needs: each input read
    once, each output written once. A case with no meaningful arithmetic
    (routing, permutes) gives ``flops=0``.
    """

    bench: str                      # the registry name in run.py, e.g. "route"
    group: str                      # one line of the plots and tables, e.g. "deepseek-v3 fp32"
    x: int                          # the swept size, the token count T so far
    make_inputs: Callable[[], tuple]  # one fresh random input set, on the device
    impls: dict[str, Callable]      # name -> fn(*inputs); "naive" first
    flops: int
    bytes: int
    bound: str                      # "memory" or "compute": which roofline the fraction is taken against
    params: dict = field(default_factory=dict)  # the rest of the problem, for the JSON
    x_name: str = "T"
    # (out, naive_out) -> {"ok": bool, ...}: checked once, outside the timing,
    # because a fast wrong kernel makes a meaningless row.
    compare: Callable[[object, object], dict] | None = None
    # Implementations that sync with the host (torch.bincount, nonzero): timed eagerly with
    # events, never captured, since a failed capture is not worth risking on a device run.
    eager: tuple[str, ...] = ()


@dataclass
class Timing:
    samples_us: list[float]         # one per repetition, each the mean of `calls` calls
    calls: int
    method: str                     # "graph", "events" (graph capture failed) or "wall" (CPU)

    def summary(self) -> dict:
        s = np.asarray(self.samples_us)
        return {"median": float(np.median(s)), "min": float(s.min()),
                "p20": float(np.percentile(s, 20)), "p80": float(np.percentile(s, 80))}


# ---------------------------------------------------------------- timing

class GpuTimer:
    """Times fn(*inputs) on the GPU.

    ``calls`` calls, cycling through the input sets, are captured into one
    CUDA graph, so launch gaps stay out; each of ``reps`` replays is timed with
    two events, and the L2 is flushed (a write of 2 x L2 bytes) before each.
    Within a replay the sets evict each other when together they pass 2 x L2
    ("cold" in the records); smaller sets stay L2-resident after the first call
    ("warm"), which for routing is also what a model sees: its gate GEMM has
    just written the logits.
    """

    def __init__(self, reps: int, target_ms: float):
        self.reps = reps
        self.target_ms = target_ms
        self.l2_bytes = l2_bytes()
        self._flush = torch.empty(2 * self.l2_bytes, dtype=torch.int8, device="cuda")

    def n_sets(self, set_bytes: int) -> int:
        need = math.ceil(2 * self.l2_bytes / max(set_bytes, 1))
        return need if need <= MAX_SETS else 1

    def time(self, fn: Callable, sets: list[tuple], *, graph: bool = True) -> Timing:
        stream = torch.cuda.current_stream()
        # Warm-up on a side stream, as torch asks before a capture; it also
        # keeps Triton's JIT compile and any first-call setup out of the numbers.
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            for inputs in sets + sets[:2]:
                fn(*inputs)
        stream.wait_stream(side)

        # Eager estimate of one call, launch overhead included, to size the graph.
        n_est = max(3, len(sets))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(n_est):
            fn(*sets[i % len(sets)])
        end.record()
        end.synchronize()
        est_ms = max(start.elapsed_time(end) / n_est, 1e-3)
        calls = min(max(math.ceil(self.target_ms / est_ms), MIN_CALLS), MAX_CALLS)
        calls = math.ceil(calls / len(sets)) * len(sets)

        def eager():
            for i in range(calls):
                fn(*sets[i % len(sets)])

        run, method, captured = eager, "events", None
        if graph:
            captured = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(captured):
                    eager()
                run, method = captured.replay, "graph"
            except RuntimeError:
                # Something in fn cannot be captured (a host sync, say): time it eagerly.
                torch.cuda.synchronize()
                captured = None

        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.reps)]
        for start, end in events:
            self._flush.zero_()
            start.record()
            run()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) * 1e3 / calls for start, end in events]
        del captured
        return Timing(samples, calls, method)


class CpuTimer:
    """Wall-clock timing for the no-GPU path: median of ``reps`` loops of ~``target_ms``."""

    l2_bytes = None

    def __init__(self, reps: int, target_ms: float):
        self.reps = reps
        self.target_ms = target_ms

    def n_sets(self, set_bytes: int) -> int:
        return 1

    def time(self, fn: Callable, sets: list[tuple], *, graph: bool = False) -> Timing:  # no graphs on a CPU
        # One thread: with two cores shared with another busy process, torch's
        # intra-op threads waited on each other for whole scheduler slices
        # (a 40 us router read 8,000 us). These numbers are a dry run, not a result.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            inputs = sets[0]
            fn(*inputs)
            t0 = perf_counter()
            fn(*inputs)
            est_ms = max((perf_counter() - t0) * 1e3, 1e-3)
            calls = min(max(math.ceil(self.target_ms / est_ms), 1), MAX_CALLS)
            samples = []
            for _ in range(self.reps):
                t0 = perf_counter()
                for _ in range(calls):
                    fn(*inputs)
                samples.append((perf_counter() - t0) * 1e6 / calls)
        finally:
            torch.set_num_threads(threads)
        return Timing(samples, calls, "wall")


def measure_roofline(timer: GpuTimer) -> dict:
    """The two ceilings, measured now on this GPU: dense bf16 mm and device copy."""
    n = 8192
    # Random operands: an H200 ran this product 13% faster on zeros.
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    # ~0.1 s of products first, so the clocks have left idle (345 MHz seen) before anything is timed.
    for _ in range(70):
        torch.mm(a, b)
    mm = timer.time(torch.mm, [(a, b)]).summary()
    mm_tflops = 2 * n**3 / (mm["median"] * 1e-6) / 1e12
    del a, b

    # 1 GiB each way, ~18x a 60 MB L2, so the copy runs from HBM.
    free, _ = torch.cuda.mem_get_info()
    nbytes = min(1 << 30, free // 8) // 4 * 4
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    # Eager: a 1 GiB copy dwarfs its launch. Captured in a graph it measured 2.8 TB/s on an
    # H200 (commit 9c61fbb), where eager copies on these machines have moved ~4.3 TB/s.
    copy = timer.time(lambda s, d: d.copy_(s), [(src, dst)], graph=False).summary()
    copy_gbps = 2 * nbytes / (copy["median"] * 1e-6) / 1e9
    del src, dst
    return {"mm_bf16_tflops": mm_tflops, "mm_shape": [n, n, n], "mm_time_us": mm,
            "copy_gbps": copy_gbps, "copy_bytes_each_way": nbytes, "copy_time_us": copy}


# ---------------------------------------------------------------- running

def _clock(seconds: float) -> str:
    """65.2 -> '1:05', 3725 -> '1:02:05'."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


class Progress:
    """The suite's progress on stderr, with the time so far and an estimate of the time left.

    On a terminal: one bar rewritten in place (\\r), cut to the terminal's width; in a log (or a
    pipe): one plain line per step. The estimate assumes the steps left take as long as the
    finished ones on average (a full GPU suite's sizes grow along it, so it runs low at first).
    """

    BAR = 20  # characters

    def __init__(self, total: int, stream=None, clock: Callable[[], float] = perf_counter):
        self.total = total
        self.done = 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.t0 = clock()

    def _times(self) -> str:
        """'0:12 elapsed, ETA 0:40' from the steps finished so far (one before the one starting)."""
        elapsed = self.clock() - self.t0
        finished = self.done - 1
        eta = _clock(elapsed / finished * (self.total - finished)) if finished else "?"
        return f"{_clock(elapsed)} elapsed, ETA {eta}"

    def step(self, text: str) -> None:
        """Announces the step about to run."""
        self.done += 1
        count = f"{self.done:>{len(str(self.total))}}/{self.total}"
        if self.tty:
            filled = self.BAR * (self.done - 1) // max(self.total, 1)
            line = f"[{'#' * filled}{'.' * (self.BAR - filled)}] {count} {self._times()}  {text}"
            width = shutil.get_terminal_size().columns
            self.stream.write("\r\033[K" + line[:max(width - 1, 20)])
        else:
            self.stream.write(f"[{count}] {self._times()}: {text}\n")
        self.stream.flush()

    def close(self) -> None:
        """Ends the bar (or the lines) with the total time."""
        line = f"done: {self.done} timings in {_clock(self.clock() - self.t0)}"
        self.stream.write(("\r\033[K" if self.tty else "") + line + "\n")
        self.stream.flush()


def _free_device_memory() -> None:
    if has_gpu():
        torch.cuda.empty_cache()


def run_cases(cases: list[Case], timer, on_record: Callable[[dict], None] | None = None) -> list[dict]:
    """Times every implementation of every case; an implementation that raises is recorded, not fatal.
    ``on_record`` gets each record as soon as it is measured (run.py --rows writes it to disk)."""
    records = []
    progress = Progress(sum(len(c.impls) for c in cases))
    for case in cases:
        n_sets = timer.n_sets(case.bytes)
        sets = [case.make_inputs() for _ in range(n_sets)]
        if timer.l2_bytes is None:
            l2 = "n/a"
        else:
            l2 = "cold" if n_sets * case.bytes >= 2 * timer.l2_bytes else "warm"
        naive_out = None
        for impl, fn in case.impls.items():
            progress.step(f"{case.bench} {case.group} {case.x_name}={case.x} {impl}")
            rec = {"bench": case.bench, "group": case.group, "x_name": case.x_name, "x": case.x,
                   "impl": impl, "params": case.params, "flops": case.flops, "bytes": case.bytes,
                   "bound": case.bound, "input_sets": n_sets, "l2": l2, "error": None}
            try:
                out = fn(*sets[0])
                if impl == "naive":
                    naive_out = out
                elif case.compare is not None and (naive_out is not None or "naive" not in case.impls):
                    # Without a naive row (bench_torchtitan: stock is the baseline) compare checks
                    # every row against its own reference.
                    rec["check"] = case.compare(out, naive_out)
                del out
                timing = timer.time(fn, sets, graph=impl not in case.eager)
                rec.update(time_us=timing.summary(), reps=len(timing.samples_us),
                           calls_per_rep=timing.calls, method=timing.method)
            except Exception as exc:  # one broken implementation must not stop the suite
                rec["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            records.append(rec)
            if on_record is not None:
                on_record(rec)
        del sets, naive_out
        _free_device_memory()
    progress.close()
    return records


def derive(records: list[dict], roofline: dict | None) -> None:
    """Adds GB/s, TFLOP/s, the fraction of the roofline and the speed-ups, in place."""
    medians = {}
    for r in records:
        if r["error"] is None:
            medians[(r["bench"], r["group"], r["x"], r["impl"])] = r["time_us"]["median"]
    for r in records:
        if r["error"] is not None:
            continue
        seconds = r["time_us"]["median"] * 1e-6
        r["gbps"] = r["bytes"] / seconds / 1e9 if r["bytes"] else None
        r["tflops"] = r["flops"] / seconds / 1e12 if r["flops"] else None
        r["roofline_fraction"] = None
        if roofline is not None:
            if r["bound"] == "memory" and r["gbps"] is not None:
                r["roofline_fraction"] = r["gbps"] / roofline["copy_gbps"]
            elif r["bound"] == "compute" and r["tflops"] is not None:
                r["roofline_fraction"] = r["tflops"] / roofline["mm_bf16_tflops"]
        for other in ("naive", "native", "stock"):  # stock: an integration's stock library (bench_torchtitan)
            base = medians.get((r["bench"], r["group"], r["x"], other))
            r[f"speedup_vs_{other}"] = base / r["time_us"]["median"] if base else None


# ---------------------------------------------------------------- reports

CPU_DRY_RUN = ("CPU timings are a dry run of the benchmarks' code paths (the naive and reference ones) "
               "at small sizes: they say nothing about the kernels, which need a CUDA GPU")


def _fmt(value, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "us":
        return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:,.0f}"
    if kind == "rate":
        return f"{value:.2f}" if value < 10 else f"{value:.0f}"
    if kind == "pct":
        return f"{100 * value:.1f}%" if value < 0.1 else f"{100 * value:.0f}%"
    if kind == "x":
        return f"{value:.2f}x"
    return str(value)


COLUMNS = [  # (key, header)
    ("group", "case"), ("x", "T"), ("impl", "impl"), ("us", "median us"), ("spread", "p20-p80 us"),
    ("gbps", "GB/s"), ("tflops", "TFLOP/s"), ("roof", "of roofline"),
    ("vs_naive", "x naive"), ("vs_native", "x native"), ("vs_stock", "x stock"), ("check", "check"),
    ("timing", "timing"),
]


def table_rows(records: list[dict]) -> list[dict[str, str]]:
    rows = []
    for r in records:
        row = {"group": r["group"], "x": str(r["x"]), "impl": r["impl"]}
        if r["error"] is not None:
            row["us"] = "error"
        else:
            t = r["time_us"]
            check = r.get("check")
            row.update(
                us=_fmt(t["median"], "us"),
                spread=f"{_fmt(t['p20'], 'us')}-{_fmt(t['p80'], 'us')}",
                gbps=_fmt(r["gbps"], "rate"), tflops=_fmt(r["tflops"], "rate"),
                roof=_fmt(r["roofline_fraction"], "pct"),
                vs_naive=_fmt(r["speedup_vs_naive"], "x"), vs_native=_fmt(r["speedup_vs_native"], "x"),
                vs_stock=_fmt(r.get("speedup_vs_stock"), "x"),
                check="-" if check is None else ("ok" if check["ok"] else "DIFFERS"),
                timing=f"{r['method']}/{r['l2']}",
            )
        rows.append(row)
    return rows


def _columns(rows: list[dict[str, str]], x_name: str) -> list[tuple[str, str]]:
    """The columns with something in them; the size column is named after the swept size."""
    cols = [(k, x_name if k == "x" else h) for k, h in COLUMNS]
    return [(k, h) for k, h in cols if any(row.get(k, "-") != "-" for row in rows)]


def format_table(rows: list[dict[str, str]], x_name: str = "T") -> str:
    """A plain aligned console table: text columns left, numbers right."""
    cols = _columns(rows, x_name)
    left = {"group", "impl", "check", "timing"}
    widths = {k: max([len(h)] + [len(row.get(k, "-")) for row in rows]) for k, h in cols}

    def line(cells: dict[str, str]) -> str:
        return "  ".join(cells.get(k, "-").ljust(widths[k]) if k in left else cells.get(k, "-").rjust(widths[k])
                         for k, _ in cols).rstrip()

    header = line({k: h for k, h in cols})
    return "\n".join([header, "-" * len(header)] + [line(row) for row in rows])


def markdown_table(rows: list[dict[str, str]], x_name: str = "T") -> str:
    cols = _columns(rows, x_name)
    left = {"group", "impl", "check", "timing"}
    out = ["| " + " | ".join(h for _, h in cols) + " |",
           "|" + "|".join(":---" if k in left else "---:" for k, _ in cols) + "|"]
    out += ["| " + " | ".join(row.get(k, "-") for k, _ in cols) + " |" for row in rows]
    return "\n".join(out)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (the absolute norm when ref is zero): the benchmarks' check."""
    a, b = out.detach().double(), ref.detach().double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den else (a - b).norm().item()


# A target's verdict where its numbers are CPU timings: they say nothing about the kernels (CPU_DRY_RUN).
NOT_MEASURED = "not measured (CPU timings, a dry run)"


def dry_run(record: dict) -> bool:
    """Whether ``record`` was timed on the CPU's clock (CpuTimer): a number no target is judged on."""
    return record.get("method") == "wall"


def verdict(record: dict, met: bool) -> str:
    """"met" or "not met" of one record's target; NOT_MEASURED on a dry run."""
    return NOT_MEASURED if dry_run(record) else "met" if met else "not met"


def target_line(bench: str, label: str, values: list[tuple[dict, float]], target: float, fmt: str, *, x_name: str,
                at_most: bool = False) -> list[str]:
    """A benchmark's note on one target: how many cases meet it (>=, or <= with at_most), and the
    worst; ``values`` are (record, value) pairs, ``x_name`` names the records' swept size. On a
    dry run, NOT_MEASURED instead."""
    if not values:
        return []
    goal = f"{bench} {label}: target {'<=' if at_most else '>='} {target:{fmt}}"
    if any(dry_run(r) for r, _ in values):
        return [f"{goal}: {NOT_MEASURED}"]
    met = sum(1 for _, v in values if (v <= target if at_most else v >= target))
    worst, v = (max if at_most else min)(values, key=lambda p: p[1])
    return [f"{goal}: met in {met} of {len(values)}; worst {worst['group']} {x_name}={worst['x']}: {v:{fmt}}"]


def library_backends(device: str) -> list[str]:
    """The library backends a benchmark times: the torch reference, and on a GPU triton, plus cuda
    where moekernels._C is built."""
    import moekernels

    if device != "cuda":
        return ["torch"]
    return ["torch", "triton"] + (["cuda"] if moekernels.HAS_CUDA_EXT else [])


def _by_bench(records: list[dict]) -> dict[str, list[dict]]:
    benches: dict[str, list[dict]] = {}
    for r in records:
        benches.setdefault(r["bench"], []).append(r)
    return benches


def error_lines(records: list[dict]) -> list[str]:
    return [f"{r['bench']} {r['group']} {r['x_name']}={r['x']} {r['impl']}: {r['error']}"
            for r in records if r["error"] is not None]


# What each implementation is; a benchmark module adds its own in a module-level IMPLS.
IMPLS = {
    "naive": "plain PyTorch written the obvious way: the baseline of 'x naive' and 'check'",
    "native": "torch's own op for the same job",
    "torch": "this library's reference backend (backend=\"torch\", pure PyTorch), not torch's native op",
    "triton": "this library's Triton kernels (backend=\"triton\")",
    "cuda": "this library's CUDA extension, moekernels._C (backend=\"cuda\")",
}

# What each column says, for the legend under a table: only the columns the table shows.
COLUMN_LEGEND = {
    "us": "median over the repetitions; each repetition times N calls and gives the mean of one",
    "spread": "20th to 80th percentile of the repetitions: the middle 60% of them, the timing's noise",
    "gbps": "the least bytes the problem moves (inputs read once, outputs written once) / median",
    "tflops": "the problem's FLOPs / median",
    "roof": "GB/s of the device copy's, or TFLOP/s of bf16 torch.mm's, both measured in this run",
    "vs_naive": "naive's median / this row's: above 1x is faster than naive",
    "vs_native": "torch's native op's median / this row's",
    "vs_stock": "stock's median / this row's (the library integrated with, unchanged): above 1x is faster",
    "check": "output against naive's (without a naive row, against the case's float32 reference), once, outside "
             "the timing: ok, DIFFERS, or - (naive itself, or unchecked)",
    "timing": "graph: a CUDA graph of N calls; events: N eager calls between CUDA events (it syncs with "
              "the host); wall: the CPU's clock / cold: the input sets together pass 2x L2; warm: they fit",
}


def legend(records: list[dict], impls: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(term, meaning) pairs for one benchmark's table: its implementations, then its columns."""
    impls = IMPLS if impls is None else impls
    out = [(impl, impls.get(impl, "see the benchmark's docstring"))
           for impl in dict.fromkeys(r["impl"] for r in records)]
    rows = table_rows(records)
    return out + [(header, COLUMN_LEGEND[key]) for key, header in _columns(rows, records[0]["x_name"])
                  if key in COLUMN_LEGEND]


def console_report(records: list[dict], impls: dict[str, dict[str, str]] | None = None) -> str:
    """Each benchmark's table with its legend below; ``impls`` maps a benchmark to its IMPLS."""
    parts = []
    for bench, recs in _by_bench(records).items():
        lines = [f"  {term}: {text}" for term, text in legend(recs, (impls or {}).get(bench))]
        parts.append(f"== {bench}\n" + format_table(table_rows(recs), recs[0]["x_name"]) + "\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def _header_lines(meta: dict, roofline: dict | None) -> list[str]:
    ext = "yes" if meta["has_cuda_ext"] else "no"
    lines = [
        f"- device: {meta['device_name']} ({meta['gpu']}); torch {meta['torch']}, CUDA {meta['cuda']}, "
        f"triton {meta['triton']}, moekernels {meta['moekernels']} (CUDA extension: {ext})",
        f"- commit {meta['git_commit'] or 'unknown'}, {meta['timestamp']}, {'quick' if meta['quick'] else 'full'} suite",
    ]
    if roofline is not None:
        lines.append(
            f"- roofline, measured in this run: bf16 torch.mm 8192^3 {roofline['mm_bf16_tflops']:.0f} TFLOP/s; "
            f"device copy {roofline['copy_gbps']:.0f} GB/s (bytes read + written)")
        lines.append("- timing: CUDA graph of N calls, median of the replays, L2 flushed before each replay; "
                     "'cold': the rotated input sets together pass 2x L2")
    else:
        lines.append("- timing: wall clock on the CPU, median of the repetitions; no roofline without a GPU")
        lines.append(f"- {CPU_DRY_RUN}")
    return lines


def markdown_report(meta: dict, roofline: dict | None, records: list[dict], notes: list[str],
                    impls: dict[str, dict[str, str]] | None = None) -> str:
    parts = [f"# moekernels benchmarks: {meta['gpu']}", "\n".join(_header_lines(meta, roofline))]
    for bench, recs in _by_bench(records).items():
        lines = [f"- `{term}`: {text}" for term, text in legend(recs, (impls or {}).get(bench))]
        parts.append(f"## {bench}\n\n" + markdown_table(table_rows(recs), recs[0]["x_name"]) + "\n\n"
                     + "\n".join(lines))
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts) + "\n"


# Why a run wrote no plot, said once on the console (run.py): they were skipped silently before.
NO_MATPLOTLIB = "no plots: matplotlib is not installed (pip install matplotlib, or the moekernels[bench] extra)"
ONE_SIZE = ("no plots: every case ran at one size, and a plot draws each case over its sizes (a --quick run on the "
            "CPU times one size a benchmark; --tokens 1,16 gives two)")


def write_plots(out_dir: Path, records: list[dict], roofline: dict | None) -> tuple[list[Path], str | None]:
    """One PNG per benchmark: time (top) and achieved rate against the roofline (bottom), one column
    per case; and, where it wrote none, why (ONE_SIZE or NO_MATPLOTLIB), else None."""
    benches = {}
    for bench, recs in _by_bench(records).items():
        recs = [r for r in recs if r["error"] is None]
        groups = list(dict.fromkeys(r["group"] for r in recs))
        # A line needs two sizes: plots of lone points say nothing, and took ~20 of the ~35 s of
        # the CPU's quick run (one case a benchmark).
        if any(len({r["x"] for r in recs if r["group"] == g}) > 1 for g in groups):
            benches[bench] = (recs, groups)
    if not benches:
        return [], ONE_SIZE
    try:
        import matplotlib
    except ImportError:  # matplotlib is the optional "bench" extra
        return [], NO_MATPLOTLIB
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for bench, (recs, groups) in benches.items():
        fig, axes = plt.subplots(2, len(groups), figsize=(4.2 * len(groups), 7), squeeze=False)
        for col, group in enumerate(groups):
            in_group = [r for r in recs if r["group"] == group]
            memory = in_group[0]["bound"] == "memory"
            rate_key, rate_name = ("gbps", "GB/s") if memory else ("tflops", "TFLOP/s")
            top, bottom = axes[0][col], axes[1][col]
            for impl in dict.fromkeys(r["impl"] for r in in_group):
                pts = sorted((r["x"], r["time_us"]["median"], r[rate_key]) for r in in_group if r["impl"] == impl)
                top.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
                bottom.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=impl)
            if roofline is not None:
                ceiling = roofline["copy_gbps"] if memory else roofline["mm_bf16_tflops"]
                bottom.axhline(ceiling, color="grey", linestyle="--",
                               label="device copy" if memory else "bf16 torch.mm")
            top.set_title(group)
            top.set_ylabel("median time (us)")
            bottom.set_ylabel(rate_name)
            for ax in (top, bottom):
                ax.set_xscale("log")
                ax.set_yscale("log")  # rates span 0.1 to 4,000 GB/s across T
                ax.set_xlabel(in_group[0]["x_name"])
                ax.grid(True, which="both", alpha=0.3)
            bottom.legend(fontsize="small")
        fig.suptitle(f"{bench} on {'the CPU' if roofline is None else 'the GPU'}")
        fig.tight_layout()
        path = out_dir / f"{bench}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths, None


def write_results(out_dir: Path, meta: dict, roofline: dict | None, records: list[dict], notes: list[str],
                  impls: dict[str, dict[str, str]] | None = None) -> tuple[list[Path], str | None]:
    """bench.json (every raw number), bench.md, and one PNG per benchmark where matplotlib is there:
    the paths written, and why no plot was where none was (write_plots).

    Few files on purpose: the device machine returns at most 8 from its output folder.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "roofline": roofline, "results": records, "notes": notes}
    json_path = out_dir / "bench.json"
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md_path = out_dir / "bench.md"
    md_path.write_text(markdown_report(meta, roofline, records, notes, impls))
    plots, no_plots = write_plots(out_dir, records, roofline)
    return [json_path, md_path] + plots, no_plots
