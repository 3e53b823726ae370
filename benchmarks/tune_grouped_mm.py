"""The offline tuner of the grouped GEMM's tile configs.

    python -m benchmarks.tune_grouped_mm [--quick] [--gpu NAME] [--out PATH] [--variant plain ...]

On a CUDA GPU: for each variant (plain, gated, scatter, dw), each expert GEMM of the benchmark's
models (bench_grouped_gemm.GEMMS) and each rows-per-expert class, times a small set of
candidate GemmConfigs (the default first) and keeps the fastest whose output matches the float32
reference; then writes the table moekernels.configs reads (``configs.table_path(gpu)``, or
``--out``):

    {"gpu", "torch", "triton", "commit", "date", "configs": {gemm_key: GemmConfig fields},
     "timings_us": {gemm_key: {"tuned": us, "default": us}}}

Entries of an existing table that this run does not tune are kept (a run per variant fits a
10-minute device call); delete the file to start over. The candidate is forced by replacing
``moekernels.configs.grouped_mm_config`` for the tuned variant only, while the call is captured
in a CUDA graph and timed by ``harness.GpuTimer`` (the L2 flushed before each replay).

The problems: plain is the forward (weights in nn.Linear's layout, read K-major) and, in the
full run, the backward's dx GEMM (the same weight read [E, N, K] row-major: its own key, N and
K swapped); dw the weight gradient, written in nn.Linear's layout; gated (SwiGLU) the gate_up
GEMMs; scatter (the weighted scatter of top-8 pairs) the down GEMMs. Loads are balanced, at
rows per expert equal to the class (1-16 rows all fall in class 16, whose tiles hold 16 rows).
DeepSeek-V3's E 32 and E 256 slices share keys (the key holds no E): the E 32 slice, the one
a GPU holds at expert parallelism 8, is tuned.

--quick: plain and dw of Qwen3-30B-A3B's two GEMMs, rows classes 16, 64 and 1024, four
candidates each: ~16 Triton compiles and 48 timings, 1-3 minutes on an H200 (estimated: no GPU
has run it yet). The full run, 168 problems, ~1,160 timings and ~220 compiles, is ~15 minutes:
run it a variant at a time (--variant) to fit 10-minute device calls.

Without a CUDA GPU it says that tuning needs one and exits 2: no table was written, and a
script that goes on to commit one must not go on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import harness
from .bench_grouped_gemm import GEMMS
from moekernels import configs
from moekernels.configs import GemmConfig

NO_GPU = "tuning the grouped GEMM needs a CUDA GPU: none found, no table written"
DTYPE = torch.bfloat16
ROWS_CLASSES = configs.ROWS_CLASSES
QUICK_ROWS_CLASSES = (16, 64, 1024)  # one class of each candidate list below
QUICK_GEMMS = GEMMS[:2]  # Qwen3-30B-A3B gate_up and down: both E 128, so they share compiles
# configs.GEMM_VARIANTS less "unaligned": weight rows that are not 16-byte aligned, which no
# model has (a correctness fallback, left to its default).
VARIANTS = ("plain", "gated", "scatter", "dw")
QUICK_VARIANTS = ("plain", "dw")
QUICK_CANDIDATES = 4  # the default and the first three of its list
TOP_K = 8  # the scatter variant's pairs per token
# Shared memory an sm_90 block can take (227 KB), and the TMA box limit of 256 per dimension.
SMEM_BYTES = 227 * 1024
MAX_BLOCK = 256
# One bf16 rounding of each output is <= 2^-9 relative; the sums are float32 in both.
RTOL = 2**-7

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SWAP_AB, num_warps, num_stages), best guesses first (the
# quick run takes the first three). gated halves BLOCK_N, as the default does (it holds two
# accumulators), except on swap-AB tiles, whose BLOCK_N is wgmma's M: 64 at least.
DECODE = [  # 1-16 rows per expert: swap-AB, the weight columns in wgmma's M; deep K in flight
    (16, 64, 128, 1, True, 4, 5), (16, 128, 128, 1, True, 4, 4), (16, 64, 256, 1, True, 4, 3),
    (16, 64, 64, 1, True, 4, 6), (16, 128, 64, 1, True, 4, 6), (16, 128, 128, 1, True, 8, 4),
]
MID = [  # 17-64 rows per expert
    (64, 64, 64, 8, False, 4, 4), (16, 128, 128, 1, True, 4, 4), (64, 128, 64, 8, False, 4, 5),
    (64, 128, 128, 8, False, 4, 3), (128, 128, 64, 8, False, 8, 3), (64, 256, 64, 8, False, 8, 3),
]
LARGE = [  # 65+ rows per expert
    (128, 256, 64, 8, False, 8, 3), (128, 128, 64, 8, False, 8, 4), (128, 128, 128, 8, False, 8, 3),
    (64, 128, 64, 8, False, 4, 4), (128, 128, 64, 4, False, 8, 3), (256, 128, 64, 8, False, 8, 3),
]
DW = [  # [BLOCK_K, BLOCK_N] of the gradient, BLOCK_M rows reduced a step
    (32, 128, 128, 8, False, 8, 4), (64, 128, 128, 8, False, 8, 4), (64, 256, 128, 8, False, 8, 3),
    (64, 128, 64, 8, False, 4, 4), (128, 128, 128, 8, False, 8, 3), (64, 128, 256, 8, False, 8, 3),
]


# ----------------------------------------------------------------------------- the pure parts

@dataclass(frozen=True)
class Problem:
    variant: str  # plain, gated, scatter or dw
    name: str  # the model GEMM's, for the log
    experts: int
    k: int
    n: int  # the weight's [E, K, N] as the kernel reads it: gated's N is 2x the output's
    rows: int  # per expert, balanced
    kmajor: bool  # the weight (dw: its gradient) in nn.Linear's [E, N, K] storage

    @property
    def key(self) -> str:
        out_n = self.n // 2 if self.variant == "gated" else self.n
        return configs.gemm_key(self.variant, self.rows, out_n, self.k, DTYPE)


def problems(quick: bool, variants: tuple[str, ...]) -> list[Problem]:
    """Every problem to tune, once per table key (the first GEMM with a key wins)."""
    gemms = QUICK_GEMMS if quick else GEMMS
    classes = QUICK_ROWS_CLASSES if quick else ROWS_CLASSES
    out = {}
    for g in gemms:
        proj = g.name.split()[1]  # "gate_up" or "down"
        kinds = {  # (K, N, K-major weight) of each problem of the variant
            "plain": [(g.k, g.n, True)] + ([] if quick else [(g.n, g.k, False)]),  # forward, then dx
            "gated": [(g.k, g.n, True)] if proj == "gate_up" else [],
            "scatter": [(g.k, g.n, True)] if proj == "down" else [],
            "dw": [(g.k, g.n, True)],
        }
        for variant in variants:
            for k, n, kmajor in kinds[variant]:
                for rows in classes:
                    p = Problem(variant, g.name, g.experts, k, n, rows, kmajor)
                    out.setdefault(p.key, p)
    return list(out.values())


def smem_bytes(variant: str, cfg: GemmConfig, itemsize: int) -> int:
    """The operand tiles in flight: num_stages x configs.stage_bytes (A tile + B tile(s))."""
    return cfg.num_stages * configs.stage_bytes(cfg, itemsize, variant)


def valid(variant: str, cfg: GemmConfig, itemsize: int) -> bool:
    """Power-of-two blocks in [16, 256] (tl.arange and the TMA box), shared memory within the
    227 KB of an sm_90 block, and SWAP_AB only on 16-row tiles of the forward kernel."""
    blocks = (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K)
    if any(b < 16 or b > MAX_BLOCK or b & (b - 1) for b in blocks):
        return False
    if cfg.SWAP_AB and (variant == "dw" or cfg.BLOCK_M != 16):
        return False
    return smem_bytes(variant, cfg, itemsize) <= SMEM_BYTES


def candidates(variant: str, rows_cls: int, itemsize: int, quick: bool = False) -> list[GemmConfig]:
    """The default config first, then the valid ones of the list for this variant and class."""
    if variant == "dw":
        grid = DW
    else:
        grid = DECODE if rows_cls <= 16 else MID if rows_cls <= 64 else LARGE
    cfgs = [GemmConfig(*c) for c in grid]
    if variant == "gated":
        cfgs = [c if c.SWAP_AB else GemmConfig(**{**asdict(c), "BLOCK_N": c.BLOCK_N // 2}) for c in cfgs]
    default = configs.default_gemm_config(variant, rows_cls, itemsize)
    out = [default] + [c for c in dict.fromkeys(cfgs) if c != default and valid(variant, c, itemsize)]
    return out[:QUICK_CANDIDATES] if quick else out


def tune(todo: list[Problem], prepare, quick: bool, log=print) -> tuple[dict, dict]:
    """Times each problem's candidates: ``prepare(problem)`` returns ``measure(cfg)``, which gives
    microseconds, or None for a wrong output (and may raise: a compile that does not fit).
    Returns ({key: fastest correct config}, {key: {"tuned": us, "default": us}})."""
    table, timings = {}, {}
    for i, p in enumerate(todo, 1):
        measure = prepare(p)
        times, failed = {}, []
        for cfg in candidates(p.variant, p.rows, DTYPE.itemsize, quick):
            try:
                us = measure(cfg)
            except Exception as exc:  # out of shared memory or registers: not a candidate here
                failed.append(f"{cfg}: " + f"{type(exc).__name__}: {exc}".splitlines()[0][:120])
                continue
            if us is None:
                failed.append(f"{cfg}: output differs")
            else:
                times[cfg] = us
        head = f"[{i}/{len(todo)}] {p.key} ({p.name}, E {p.experts})"
        for line in failed:
            log(f"{head}: skipped {line}")
        if not times:
            log(f"{head}: no candidate ran correctly; left to the default")
            continue
        best = min(times, key=times.get)
        default = configs.default_gemm_config(p.variant, p.rows, DTYPE.itemsize)
        table[p.key] = best
        timings[p.key] = {"tuned": times[best], "default": times.get(default)}
        vs = f", {times[default] / times[best]:.2f}x the default's {times[default]:.1f} us" if default in times else ""
        log(f"{head}: {times[best]:.1f} us{vs}, {len(times)} timed, {len(failed)} failed: {best}")
    return table, timings


def write_table(path: Path, gpu: str, table: dict, timings: dict) -> dict:
    """The JSON table, merged over the entries of an existing one."""
    import triton

    old = json.loads(path.read_text()) if path.exists() else {}
    payload = {
        "gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "commit": harness.git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "configs": {**old.get("configs", {}), **{k: asdict(c) for k, c in table.items()}},
        "timings_us": {**old.get("timings_us", {}), **timings},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return payload


# ----------------------------------------------------------------------------- on the GPU

@contextlib.contextmanager
def forced_config(variant: str, cfg: GemmConfig):
    """Every launch of ``variant`` takes ``cfg`` (grouped_gemm looks the function up at each call)."""
    original = configs.grouped_mm_config

    def pick(v, *args, **kwargs):
        return cfg if v == variant else original(v, *args, **kwargs)

    configs.grouped_mm_config = pick
    try:
        yield
    finally:
        configs.grouped_mm_config = original


def _weight(experts: int, k: int, n: int, kmajor: bool, device: str) -> torch.Tensor:
    shape = (experts, n, k) if kmajor else (experts, k, n)
    w = torch.randn(shape, device=device, dtype=DTYPE).mul_(k**-0.5)
    return w.transpose(1, 2) if kmajor else w


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = out.double(), ref.double()
    return (a - b).norm().item() / max(b.norm().item(), 1e-30)


def gpu_prepare(timer, device: str = "cuda"):
    """prepare(problem) for tune(): random inputs, the call, its float32 reference, and measure.
    (device "cpu" with a CpuTimer runs it under Triton's interpreter: the tests' dry run.)"""
    from moekernels import grouped_gemm as gg
    from moekernels import reference

    def prepare(p: Problem):
        if device == "cuda":
            torch.cuda.empty_cache()  # the last problem's inputs
        m = p.rows * p.experts
        x = torch.randn(m, p.k, device=device, dtype=DTYPE)
        offs = torch.arange(1, p.experts + 1, device=device, dtype=torch.int32) * p.rows
        if p.variant == "dw":
            dy = torch.randn(m, p.n, device=device, dtype=DTYPE)

            def call():
                return gg.grouped_mm_dw_op(x, dy, offs, None, 1, p.kmajor, "triton")
            ref = reference.grouped_mm_dw(x, dy, offs)
        else:
            w = _weight(p.experts, p.k, p.n, p.kmajor, device)
            scatter = p.variant == "scatter"
            index = torch.randperm(m, device=device).int() if scatter else None
            scale = torch.rand(m // TOP_K, TOP_K, device=device) if scatter else None
            act = "silu" if p.variant == "gated" else ""

            def call():
                return gg.grouped_mm_fused(x, w, offs, source_index=index, activation=act, scatter_weights=scale,
                                           backend="triton")
            ref = reference.grouped_mm_fused(x, w, offs, index if scatter else offs.new_empty(0), TOP_K, False, act,
                                             scale)

        def measure(cfg: GemmConfig) -> float | None:
            with forced_config(p.variant, cfg):
                if _rel_err(call(), ref) > RTOL:
                    return None
                return timer.time(call, [()]).summary()["median"]
        return measure
    return prepare


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_grouped_mm", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="two shapes, 3 rows classes, 4 candidates; plain and dw unless --variant says")
    p.add_argument("--gpu", help="the table's GPU name (default: this GPU's, h100 or h200)")
    p.add_argument("--out", type=Path, help="the JSON path (default: moekernels/configs/grouped_mm_<gpu>.json)")
    p.add_argument("--variant", action="append", choices=VARIANTS,
                   help="tune only this variant; may be repeated")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not harness.has_gpu():
        print(NO_GPU)
        return 2
    from moekernels.grouped_gemm import gpu_name

    gpu = args.gpu or gpu_name(torch.device("cuda")) or harness.gpu_name()
    if gpu not in ("h100", "h200"):
        print(f"note: moekernels reads tables for h100 and h200 only; one for {gpu!r} is not used")
    out = args.out or Path(configs.table_path(gpu))
    variants = tuple(args.variant or (QUICK_VARIANTS if args.quick else VARIANTS))
    todo = problems(args.quick, variants)
    print(f"tuning {len(todo)} problems on {torch.cuda.get_device_name()} into {out}")
    torch.manual_seed(0)
    table, timings = tune(todo, gpu_prepare(harness.GpuTimer(reps=10, target_ms=0.5)), args.quick)
    write_table(out, gpu, table, timings)
    configs.tuned_table.cache_clear()
    print(f"wrote {len(table)} configs to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
