"""Grouped GEMM: y[seg e] = x[seg e] @ w[e] over the expert-sorted rows, bf16, forward and forward+backward.

Cases: the expert GEMMs of real models (shapes.gate_up / shapes.down), the weights in nn.Linear's
layout (a transposed [E, K, N] view of the [E, N, K] tensor, read in place), over rows per expert
from 1 (decode) to 8192, with balanced and Zipf-skewed loads. The swept size is the mean rows per
expert (``--tokens`` sets it here). The contiguous [E, K, N] layout is timed inside fwd+bwd:
dx reads the weight that way. Groups are "<model> <gemm> <pass> <load>", for example
"qwen3-30b-a3b gate_up fwd+bwd zipf".

Implementations timed:
- naive:  a loop over experts, one torch.mm each (cuBLAS), the forward written into each expert's
          rows of one output (mm out=), fwd+bwd as torch.cat of the products (out= has no
          autograd); the expert bounds come from a host list made in make_inputs, so the loop
          captures in a CUDA graph. A model would read offs back first (one host sync a call,
          ~10-20 us on a GPU, not timed here: the naive rows flatter the loop);
- native: torch._grouped_mm(x, w, offs), torch's own op (CUTLASS on sm_90), on a GPU;
- dense:  torch.mm of x [M, K] with one [K, N] weight: the same FLOPs as one GEMM, the roofline
          a grouped GEMM aims at; it computes another product, so it has no check;
- torch:  moekernels.grouped_mm(backend="torch"), the library's float32 reference loop; it reads
          offs on the host, so it is timed eagerly; on a GPU only in the full suite and up to
          TORCH_MAX_FLOPS (it multiplies in float32 without tensor cores);
- triton: moekernels.grouped_mm(backend="triton"), on a GPU.
On the CPU: naive and torch only, at an eighth of Qwen3-30B-A3B's dims (a dry run of the code).
The quick GPU suite is Qwen3-30B-A3B's gate_up alone (14 cases); the full one every GEMM below
(400 cases after MAX_FLOPS, ~15-20 minutes on an H200, estimated).

Counted: 2*M*K*N FLOPs forward, 3x that for fwd+bwd (dx and dw are one GEMM each). At decode
(<= DECODE_ROWS rows per expert) the weights are the traffic, so those cases are judged in GB/s
against the device copy bandwidth; larger ones in TFLOP/s against the bf16 torch.mm roofline.
Every output is checked against a float32 reference on a sample (CHECK_ROWS rows of each of
CHECK_EXPERTS experts for y and dx, those experts' whole dw, and dw = 0 for an expert with no
rows), so a check costs milliseconds at any size.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

import moekernels
from .harness import Case, rel_err, target_line
from .shapes import (
    DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, QWEN3_235B_A22B, GemmShape, down, gate_up, token_sweep,
)

BENCH = "grouped_gemm"
ROWS_FULL = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
# 1 and 16 stand for decode (the swap-AB tiles), 512 for the targets' threshold, 4096 for a long
# prefill; the fwd+bwd at 4096 passes QUICK_MAX_FLOPS and is left to the full suite.
ROWS_QUICK = [1, 16, 512, 4096]
ROWS_CPU = [1, 16, 64]
# DeepSeek-V3 twice: E 32 is the slice one GPU holds at expert parallelism 8, E 256 one whole layer.
GEMMS = [
    gate_up(QWEN3_30B_A3B), down(QWEN3_30B_A3B), gate_up(QWEN3_235B_A22B),
    gate_up(DEEPSEEK_V3, 32), down(DEEPSEEK_V3, 32), gate_up(DEEPSEEK_V3), down(DEEPSEEK_V3),
    gate_up(MIXTRAL_8X7B),
]
# The quick suite's one shape: 128 experts share the Triton compiles of the GPU tests' shape. Its
# 14 cases are 56 timings of ~156 calls: ~12 s at the roofline's rates, ~25 s with ~5 Triton
# compiles on an H200 (estimated: no GPU has run it yet).
QUICK_GEMMS = GEMMS[:1]
CPU_GEMMS = [GemmShape(f"{g.name} /8", g.experts // 8, g.k // 8, g.n // 8) for g in GEMMS[:1]]
LOADS = ("balanced", "zipf")
# Zipf's exponent 1: with E 128 the busiest expert gets 18% of the rows (24x the mean) and at
# decode sizes many get none; more skewed than a trained router, a stress test of the schedule.
ZIPF_S = 1.0
DTYPE = torch.bfloat16
# A timing takes ~156 calls (GpuTimer: 6 warm-up and estimate, 10 calls x 15 replays at least).
# 2^44 FLOPs (17.6 TFLOP, ~26 ms at 680 TFLOP/s) keeps a case of 4 implementations under ~20 s;
# it drops e.g. Mixtral's fwd+bwd at 8192 rows per expert.
MAX_FLOPS = 2**44
# The quick suite's bound: 4 TFLOP, ~6 ms a call, ~4 s per case (Qwen3-30B-A3B's forward at 4096
# rows per expert is 3.3 TFLOP; its fwd+bwd, 9.9, is skipped).
QUICK_MAX_FLOPS = 4 * 10**12
# The torch backend multiplies in float32 on CUDA cores (~60 TFLOP/s on an H200): 2^37 FLOPs is
# ~2.5 ms a call, ~0.4 s a timing; past it the reference would take minutes of the full suite.
TORCH_MAX_FLOPS = 2**37
KERNELS = ("triton",)
# The legend under the table (harness.IMPLS has the common names): see the docstring.
IMPLS = {"dense": "one torch.mm of all the rows by one weight: the roofline a grouped GEMM aims at, not checked"}

# The targets, printed as information and never asserted.
DECODE_ROWS = 64  # decode: 1-64 rows per expert
TARGET_ROWS = 512  # the throughput targets apply at >= 512 rows per expert
TARGET_VS_NATIVE = 1.10  # forward and fwd+bwd, against torch._grouped_mm
TARGET_VS_DENSE = 0.80  # forward TFLOP/s, against dense torch.mm of the same FLOPs
TARGET_DECODE_FRACTION = 0.70  # forward, of the floor set by reading the touched experts' weights

CHECK_EXPERTS = 4
CHECK_ROWS = 64
# One bf16 rounding of each output is <= 2^-9 relative (a relative error norm of ~1.1e-3); the
# sums are float32 in every implementation. 2^-7 leaves 4x for a different order of the sums.
RTOL = 2**-7


# ----------------------------------------------------------------------------- inputs

@dataclass(eq=False)
class GemmInputs:
    x: torch.Tensor  # [M, K], rows sorted by expert
    w_store: torch.Tensor  # [E, N, K], nn.Linear's storage; the leaf that gets dw in fwd+bwd
    offs: torch.Tensor  # int32 [E], cumulative segment ends, offs[-1] = M
    sizes: list[int]  # rows of each expert, on the host: the naive loop's split sizes
    dy: torch.Tensor | None = None  # [M, N], the upstream gradient of fwd+bwd
    w0: torch.Tensor | None = None  # [N, K], dense's weight (expert 0's), its own leaf

    @property
    def w(self) -> torch.Tensor:
        """The [E, K, N] weight: a view, taken in each call so that autograd reaches w_store."""
        return self.w_store.transpose(1, 2)


def expert_counts(load: str, rows: int, experts: int) -> list[int]:
    """Rows of each expert, summing to ``rows``: equal (within one) or in proportion to
    1/(rank+1)^ZIPF_S, by largest remainders. Deterministic; make_inputs shuffles which expert
    gets which count."""
    if load == "balanced":
        base, extra = divmod(rows, experts)
        return [base + (e < extra) for e in range(experts)]
    weights = [(e + 1) ** -ZIPF_S for e in range(experts)]
    exact = [rows * w / sum(weights) for w in weights]
    counts = [int(v) for v in exact]
    for e in sorted(range(experts), key=lambda e: counts[e] - exact[e])[: rows - sum(counts)]:
        counts[e] += 1
    return counts


def _inputs(gemm: GemmShape, counts: list[int], backward: bool, device: str):
    def make():
        sizes = [counts[e] for e in torch.randperm(gemm.experts).tolist()]
        m = sum(sizes)
        x = torch.randn(m, gemm.k, device=device, dtype=DTYPE)
        # Generated in bf16 (DeepSeek-V3's 256 experts are 15 GB; float32 first would be 30 more).
        w_store = torch.randn(gemm.experts, gemm.n, gemm.k, device=device, dtype=DTYPE).mul_(gemm.k**-0.5)
        offs = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=device)
        inp = GemmInputs(x, w_store, offs, sizes)
        if backward:
            inp.dy = torch.randn(m, gemm.n, device=device, dtype=DTYPE)
            inp.w0 = w_store[0].clone().requires_grad_()
            x.requires_grad_()
            w_store.requires_grad_()
        else:
            inp.w0 = w_store[0]
        return (inp,)
    return make


# ----------------------------------------------------------------------------- implementations

def naive_forward(inp: GemmInputs) -> torch.Tensor:
    """One torch.mm per expert with rows, into its rows of the output."""
    y = inp.x.new_empty(inp.x.shape[0], inp.w_store.shape[1])
    for xe, we, ye, rows in zip(inp.x.split(inp.sizes), inp.w.unbind(0), y.split(inp.sizes), inp.sizes):
        if rows:
            torch.mm(xe, we, out=ye)
    return y


def naive_autograd(inp: GemmInputs) -> torch.Tensor:
    """The loop as a training step writes it. split and unbind, not slicing: each slice's
    backward would write a whole zero [M, K] (or [E, K, N]) gradient per expert."""
    return torch.cat([xe @ we for xe, we, rows in zip(inp.x.split(inp.sizes), inp.w.unbind(0), inp.sizes)
                      if rows])


def native(inp: GemmInputs) -> torch.Tensor:
    return torch._grouped_mm(inp.x, inp.w, inp.offs)


def dense(inp: GemmInputs) -> torch.Tensor:
    return torch.mm(inp.x, inp.w0.T)


def library(backend: str):
    return lambda inp: moekernels.grouped_mm(inp.x, inp.w, inp.offs, backend=backend)


def timed(fn, backward: bool, grouped: bool = True):
    """The timed call: fn's product, with ``backward`` also the gradients of x and the weight for
    the upstream gradient dy. Returns ((y,) or (y, dx, dw), the inputs for the reference check,
    or None for dense)."""
    def run(inp: GemmInputs):
        y = fn(inp)
        outs = (y,)
        if backward:
            outs += torch.autograd.grad(y, (inp.x, inp.w_store if grouped else inp.w0), inp.dy)
        return outs, (inp if grouped else None)
    return run


# ----------------------------------------------------------------------------- counters and checks

def grouped_mm_flops(m: int, k: int, n: int, backward: bool) -> int:
    """2*M*K*N for y; fwd+bwd adds dx = dy @ w^T and dw = x^T @ dy, as many again each."""
    return (3 if backward else 1) * 2 * m * k * n


def grouped_mm_bytes(m: int, k: int, n: int, experts: int, touched: int, itemsize: int, backward: bool) -> int:
    """x [M, K] and the touched experts' weights [K, N] read once, y [M, N] written once, int32
    offs [E] read; with backward also dy [M, N] read, dx [M, K] and dw [E, K, N] written (every
    expert's: an untouched one's is zeros)."""
    elems = m * k + touched * k * n + m * n
    if backward:
        elems += m * n + m * k + experts * k * n
    return elems * itemsize + experts * 4


def check_experts(sizes: list[int]) -> list[int]:
    """The experts checked: the first and last with rows, the busiest and the least busy."""
    used = [e for e, rows in enumerate(sizes) if rows]
    if not used:
        return []
    picks = [used[0], used[-1], max(used, key=sizes.__getitem__), min(used, key=sizes.__getitem__)]
    return list(dict.fromkeys(picks))[:CHECK_EXPERTS]


@torch.no_grad()
def reference_error(outs: tuple, inp: GemmInputs) -> float:
    """The largest relative error norm of y (and dx, dw) against float32 products, on the sample."""
    x, w, dy = inp.x.detach(), inp.w.detach(), inp.dy
    ends = list(itertools.accumulate(inp.sizes))
    got, want, errs = [[] for _ in outs[:2]], [[] for _ in outs[:2]], []
    for e in check_experts(inp.sizes):
        start, end = ends[e] - inp.sizes[e], ends[e]
        if end - start <= CHECK_ROWS:
            rows = torch.arange(start, end, device=x.device)
        else:  # spread over the segment, its first and last rows included
            rows = torch.linspace(start, end - 1, CHECK_ROWS, device=x.device).round().long()
        we = w[e].float()
        got[0].append(outs[0][rows])
        want[0].append(x[rows].float() @ we)
        if len(outs) == 3:
            got[1].append(outs[1][rows])
            want[1].append(dy[rows].float() @ we.T)
            # dw is the gradient of the [E, N, K] storage: expert e's is (x_e^T dy_e)^T.
            errs.append(rel_err(outs[2][e], dy[start:end].float().T @ x[start:end].float()))
    errs += [rel_err(torch.cat(g), torch.cat(r)) for g, r in zip(got, want) if g]
    empty = [e for e, rows in enumerate(inp.sizes) if not rows]
    if len(outs) == 3 and empty and outs[2][empty[0]].any():
        errs.append(1.0)  # a gradient for an expert that saw no row
    return max(errs, default=0.0)


def compare(out, naive_out) -> dict | None:
    """Against the float32 reference, with the naive loop's own error beside it; None for dense."""
    outs, inp = out
    if inp is None:
        return None
    err = reference_error(outs, inp)
    return {"ok": err <= RTOL, "rel_err": err, "naive_rel_err": reference_error(*naive_out)}


# ----------------------------------------------------------------------------- cases

def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    gpu = device == "cuda"
    sweep = token_sweep(device, quick, tokens, ROWS_FULL, ROWS_QUICK, ROWS_CPU)
    gemms = (QUICK_GEMMS if quick else GEMMS) if gpu else CPU_GEMMS
    max_flops = QUICK_MAX_FLOPS if quick else MAX_FLOPS
    itemsize = DTYPE.itemsize

    out = []
    for gemm in gemms:
        for backward in (False, True):
            for load in LOADS:
                for rows in sweep:
                    m = rows * gemm.experts
                    flops = grouped_mm_flops(m, gemm.k, gemm.n, backward)
                    if flops > max_flops:
                        continue
                    counts = expert_counts(load, m, gemm.experts)
                    touched = sum(1 for c in counts if c)
                    impls = {"naive": timed(naive_autograd if backward else naive_forward, backward)}
                    if gpu:
                        impls["native"] = timed(native, backward)
                        impls["dense"] = timed(dense, backward, grouped=False)
                    if not gpu or (not quick and flops <= TORCH_MAX_FLOPS):
                        impls["torch"] = timed(library("torch"), backward)
                    if gpu:
                        impls["triton"] = timed(library("triton"), backward)
                    pass_name = "fwd+bwd" if backward else "fwd"
                    out.append(Case(
                        bench=BENCH, group=f"{gemm.name} {pass_name} {load}", x=rows, x_name="rows/expert",
                        make_inputs=_inputs(gemm, counts, backward, device), impls=impls, flops=flops,
                        bytes=grouped_mm_bytes(m, gemm.k, gemm.n, gemm.experts, touched, itemsize, backward),
                        bound="memory" if rows <= DECODE_ROWS else "compute", compare=compare,
                        eager=("torch",),  # the reference reads offs on the host
                        params={"pass": pass_name, "load": load, "E": gemm.experts, "K": gemm.k, "N": gemm.n,
                                "M": m, "rows_per_expert": rows, "touched_experts": touched,
                                "max_expert_rows": max(counts), "weight_bytes": touched * gemm.k * gemm.n * itemsize,
                                "dtype": "bf16", "weight_layout": "[E, N, K] storage, transposed view"},
                    ))
    return out


# ----------------------------------------------------------------------------- notes

# One note line per target: harness.target_line with this benchmark's name and swept size.
_target = functools.partial(target_line, BENCH, x_name="rows/expert")


def decode_weight_gbps(r: dict) -> tuple[float, float | None]:
    """GB/s of reading the touched experts' weights, and its fraction of the copy bandwidth."""
    weight_bytes = r["params"]["weight_bytes"]
    gbps = weight_bytes / (r["time_us"]["median"] * 1e-6) / 1e9
    frac = r["roofline_fraction"]  # gbps / copy at decode: the records' bytes are all operands'
    return gbps, (frac * weight_bytes / r["bytes"] if frac is not None else None)


def notes(records: list[dict]) -> list[str]:
    """The issue's targets for each kernel that ran, one line each, and the decode bandwidth per group."""
    ok = [r for r in records if r["bench"] == BENCH and r["error"] is None]
    dense_tflops = {(r["group"], r["x"]): r["tflops"] for r in ok if r["impl"] == "dense"}
    lines = []
    for impl in KERNELS:
        mine = [r for r in ok if r["impl"] == impl]
        fwd = [r for r in mine if r["params"]["pass"] == "fwd"]
        big = [r for r in fwd if r["x"] >= TARGET_ROWS]
        bwd = [r for r in mine if r["params"]["pass"] == "fwd+bwd" and r["x"] >= TARGET_ROWS]
        lines += _target(f"forward at >= {TARGET_ROWS} rows/expert, {impl} vs torch._grouped_mm",
                         [(r, r["speedup_vs_native"]) for r in big if r["speedup_vs_native"]], TARGET_VS_NATIVE,
                         ".2f")
        lines += _target(f"forward at >= {TARGET_ROWS} rows/expert, {impl} TFLOP/s of dense torch.mm's",
                         [(r, r["tflops"] / dense_tflops[r["group"], r["x"]]) for r in big
                          if dense_tflops.get((r["group"], r["x"]))], TARGET_VS_DENSE, ".0%")
        lines += _target(f"fwd+bwd at >= {TARGET_ROWS} rows/expert, {impl} vs torch._grouped_mm",
                         [(r, r["speedup_vs_native"]) for r in bwd if r["speedup_vs_native"]], TARGET_VS_NATIVE,
                         ".2f")
        decode = [r for r in fwd if r["x"] <= DECODE_ROWS and r["roofline_fraction"] is not None]
        lines += _target(f"forward at <= {DECODE_ROWS} rows/expert, {impl} of the touched weights' read floor",
                         [(r, decode_weight_gbps(r)[1]) for r in decode], TARGET_DECODE_FRACTION, ".0%")
        for group in dict.fromkeys(r["group"] for r in decode):
            cells = [f"{r['x']}: {gbps:,.0f} ({frac:.0%})" for r in decode if r["group"] == group
                     for gbps, frac in [decode_weight_gbps(r)]]
            lines.append(f"{BENCH} {group} {impl}, GB/s of the touched experts' weights "
                         f"(of the copy bandwidth) by rows/expert: " + ", ".join(cells))
    return lines
