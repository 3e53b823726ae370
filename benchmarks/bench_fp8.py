"""FP8 (e4m3): the scaled GEMMs fp8_mm / fp8_grouped_mm, and quantize_fp8, against torch and bf16.

Three kinds of case, one group each per shape and scaling mode; the swept size is M, the rows of
the left operand (for quantization, the rows of the matrix quantized):
- dense:      y [M, N] = (a * sa) @ (b * sb) through fp8_mm, on DeepGEMM's dense table (N, K) of
              (2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048) at M 64,
              128 and 4096; groups "dense N4096 K7168 block";
- contiguous: fp8_grouped_mm over E experts of equal segments, DeepGEMM's grouped contiguous
              cases (4 x 8192 and 8 x 4096 rows, N 4096 K 7168 and N 7168 K 2048) and DeepSeek-V3's
              prefill on 32 local experts (32 x 512 rows, N 4096 K 7168; full suite); groups
              "contiguous 8x4096 N4096 K7168 block";
- quant:      quantize_fp8 of bf16 activations [M, K] per (1, 128) and of weights [N, K] per
              (128, 128); groups "quant 1x128 act K7168", "quant 128x128 weight K7168" (x = N).
Scaling modes (a's granularity x the [E, N, K] weight storage's, both quantized with the torch
backend in make_inputs, the weight then transposed to the logical [E, K, N] as a model holds it):
block (1, 128) x (128, 128), DeepSeek-V3's; rowwise: per row x per output column; tensor.

Implementations timed:
- naive:  a and the weights dequantized to bf16 (float32 products of q and the broadcast scales),
          then one torch.mm per expert into its rows of the output (the expert bounds from a host
          list made in make_inputs, so the loop captures in a CUDA graph); for quant, the plain
          PyTorch blocking (view into blocks, amax, divide, clamp, cast), the same function as
          quantize_fp8 (so the check is bit for bit);
- native: torch._scaled_mm, dense rowwise and tensor groups only, on a GPU: a row-major [M, K],
          b the column-major [K, N] view of the [N, K] storage, float32 scales [M, 1] and [1, N]
          (rowwise, bf16 output only) or one each (tensor), use_fast_accum=False (torch's default:
          the fp8 sums are promoted, as block mode does). Its block-wise recipe and
          torch._scaled_grouped_mm are not timed;
- bf16:   moekernels.grouped_mm (Triton) on the bf16 operands the fp8 ones were quantized from,
          the same shapes (one group for dense), block groups only, on a GPU: the baseline of the
          1.6x target. Its check is against the float32 product of those bf16 operands;
- torch:  the library's reference (backend="torch": dequantize, then a float32 matmul per expert,
          timed eagerly since it reads offs on the host; quantize_fp8's reference for quant);
          GEMMs on a GPU only in the full suite up to TORCH_MAX_FLOPS (float32 on CUDA cores);
- triton: fp8_mm / fp8_grouped_mm / quantize_fp8 with backend="triton", on a GPU;
- cuda:   quantize_fp8(backend="cuda") (csrc/quantize.cu), activations per (1, 128) only (the
          one granularity it takes), where the extension is built;
- cutlass: fp8_grouped_mm(backend="cutlass"), CUTLASS's Hopper block-scaled grouped kernel
          (csrc/fp8_grouped_cutlass.cu), contiguous block cases on an sm_90 GPU where it is built;
- scaled_grouped: torch._scaled_grouped_mm, contiguous block cases on a GPU where torch has it, on
          the same bf16 operands quantized per row and per output column (its sm_90 recipe: it takes
          no block scales), made with the inputs; checked against those operands' product.
On the CPU: naive and torch only, at an eighth of the shapes (a dry run of the code, seconds).
The quick GPU suite: dense N4096 K7168 at M 128 and 4096 in all three modes, the contiguous
8 x 4096 N4096 K7168 case in block mode, and three quantizations (10 cases, 34 timings, ~30-40 s
on an H200 with ~5 Triton compiles, estimated: no GPU has run it yet); the full one 70 cases
(~245 timings with the CUTLASS and torch._scaled_grouped_mm rows, ~3-5 minutes, estimated).

Counted: 2*M*K*N FLOPs; bytes are a and the weights in fp8, their float32 scales, the bf16 output
and (grouped) the int32 offs, each once: the fp8 problem's, also for the bf16 and naive rows
(which move more). Up to MEMORY_ROWS rows per expert the weights are the traffic: those cases are
judged in GB/s against the device copy bandwidth, larger ones in TFLOP/s against the bf16
torch.mm roofline (fp8 tensor cores peak at twice bf16's: up to ~200% of it). Quantization: input
read, q and scales written, in GB/s against the copy bandwidth.
Every GEMM output is checked on a sample (CHECK_ROWS rows of each of up to CHECK_EXPERTS experts)
against the float32 product of the dequantized operands, and its error against the product of
the unquantized bf16 operands is recorded beside it (rel_err_unquantized: what fp8 costs).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

import torch

import moekernels
from .harness import Case, rel_err, target_line
from .shapes import token_sweep
from moekernels import fp8

BENCH = "fp8"
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(float8_e4m3fn).max
DTYPE = torch.bfloat16
MODES = ("block", "rowwise", "tensor")
# (a's granularity, the [E, N, K] weight storage's) per mode.
GRANULARITY = {"block": ((1, 128), (128, 128)), "rowwise": ("row", "row"), "tensor": ("tensor", "tensor")}

# DeepGEMM's dense table (N, K); M 64 and 128 read the weights (memory-bound), 4096 is compute-bound.
DENSE_NK = [(2112, 7168), (24576, 1536), (7168, 16384), (4096, 7168), (7168, 2048)]
M_FULL = [64, 128, 4096]
# N 4096 K 7168 is the shape of the GPU tests' fp8 GEMMs; 128 rows stand for decode-sized products.
QUICK_DENSE_NK = [(4096, 7168)]
M_QUICK = [128, 4096]
# An eighth of (2112, 7168): N 264 leaves a partial 128-column block of the weight's scales.
CPU_DENSE_NK = [(264, 896)]
M_CPU = [16, 64]
# DeepGEMM's grouped contiguous cases: (experts, rows per expert, N, K); then DeepSeek-V3's prefill on one
# GPU of an 8-way expert-parallel group (32 local experts, 512 rows each: issue 23's target shape).
CONTIGUOUS = [(4, 8192, 4096, 7168), (4, 8192, 7168, 2048), (8, 4096, 4096, 7168), (8, 4096, 7168, 2048),
              (32, 512, 4096, 7168)]
# E 8, N 4096, K 7168 at >= 128 rows per expert is the tile config and BLOCK_E the GPU tests
# (test_fp8.py::test_gpu_deepseek_shapes) compile for fp8 and bf16: the device check runs them
# first, so this case's kernels come from Triton's cache. The E 4 cases compile anew (BLOCK_E 4).
QUICK_CONTIGUOUS = [(8, 4096, 4096, 7168)]
CPU_CONTIGUOUS = [(4, 32, 512, 896)]
# Activations [M, K]: DeepSeek-V3's hidden size (gate_up's input) and intermediate (down's);
# 32768 rows are its 4096 tokens x top-8 in expert order.
QUANT_ACT_K = [7168, 2048]
QUANT_M_FULL = [128, 4096, 32768]
QUANT_M_QUICK = [4096, 32768]
CPU_QUANT_ACT_K = [896]
# Weights [N, K]: one expert's gate_up (2 x 2048 rows) and 8 experts' stacked; the down weights.
# Every N and K is a multiple of 128: the naive blocking views [N/128, 128, K/128, 128].
QUANT_WEIGHTS = [(7168, [4096, 32768]), (2048, [7168, 57344])]
QUICK_QUANT_WEIGHTS = [(7168, [32768])]
CPU_QUANT_WEIGHTS = [(896, [512])]

# Up to 128 rows per expert reading the weights bounds a GEMM: 2*M FLOPs per fp8 weight byte
# (<= 256) under an H200's fp8 ridge of ~300-460 FLOP/byte (1,300-1,979 TFLOP/s over the 4.3 TB/s
# copy rate).
MEMORY_ROWS = 128
# As in bench_grouped_gemm: the float32 reference on CUDA cores (~60 TFLOP/s on an H200): 2^37
# FLOPs is ~2.5 ms a call, ~0.4 s a timing; past it the reference would take minutes.
TORCH_MAX_FLOPS = 2**37
KERNELS = ("triton", "cuda", "cutlass")
# The legend under the table (harness.IMPLS has the common names): see the docstring.
IMPLS = {"bf16": "moekernels.grouped_mm (Triton) on the bf16 operands: the baseline of the 1.6x target",
         "cutlass": "fp8_grouped_mm(backend=\"cutlass\"): CUTLASS's Hopper block-scaled grouped kernel (opt-in)",
         "scaled_grouped": "torch._scaled_grouped_mm, rowwise scales (its sm_90 recipe), the same bf16 operands"}

# The targets, printed as information and never asserted.
TARGET_VS_BF16 = 1.6  # block-wise fp8 over our bf16 grouped_mm on the same shapes
TARGET_CONTIGUOUS_TFLOPS = 1100.0  # block-wise, DeepGEMM's grouped contiguous cases
TARGET_QUANT_FRACTION = 0.70  # quantize_fp8, of the copy bandwidth

CHECK_EXPERTS = 4
CHECK_ROWS = 64
# The bf16 output's rounding alone measured a relative error norm of 1.7e-3 (the torch reference
# in the CPU dry run); the naive path also rounds the dequantized operands to bf16 (2.8e-3), and
# the Triton kernels under the interpreter read 3.2e-3 (fp8) and 3.4e-3 (bf16). 2^-7 (7.8e-3)
# leaves 2.4x over those for the fp8 tensor cores' accumulation over K up to 16384.
RTOL = 2**-7


# ----------------------------------------------------------------------------- inputs

@dataclass(eq=False)
class Fp8Inputs:
    x: torch.Tensor  # [M, K] bf16, rows sorted by expert: what qa was quantized from
    w_store: torch.Tensor  # [E, N, K] bf16, nn.Linear's storage: what qw_store was quantized from
    qa: torch.Tensor  # [M, K] e4m3
    sa: torch.Tensor  # float32 [1, 1], [M, 1] or [M, K/128]
    qw_store: torch.Tensor  # [E, N, K] e4m3
    sw_store: torch.Tensor  # float32 [E, 1, 1], [E, N, 1] or [E, N/128, K/128]
    offs: torch.Tensor  # int32 [E], cumulative segment ends
    sizes: list[int]  # rows of each expert, on the host
    a_block: tuple[int, int]  # the (rows, cols) one scale of a covers
    w_block: tuple[int, int]  # likewise over the [N, K] storage
    dense: bool  # fp8_mm (E 1) rather than fp8_grouped_mm
    rowwise: Fp8Inputs | None = None  # the same x and weights quantized per row / column (scaled_grouped)

    @property
    def b(self) -> torch.Tensor:
        """The logical [E, K, N] weight: the transposed view of the storage."""
        return self.qw_store.transpose(1, 2)

    @property
    def b_scale(self) -> torch.Tensor:
        return self.sw_store.transpose(1, 2)


def _gemm_inputs(sizes: list[int], n: int, k: int, mode: str, device: str, dense: bool, rowwise: bool = False):
    ga, gw = GRANULARITY[mode]

    def make():
        m, e = sum(sizes), len(sizes)
        x = torch.randn(m, k, device=device, dtype=DTYPE)
        w_store = torch.randn(e, n, k, device=device, dtype=DTYPE).mul_(k**-0.5)
        # The torch backend: the same bits as the kernel's (tests/test_fp8.py), and a broken
        # quantize kernel cannot take the GEMM rows down with it.
        qa, sa = moekernels.quantize_fp8(x, ga, backend="torch")
        qw, sw = moekernels.quantize_fp8(w_store, gw, backend="torch")
        offs = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int32, device=device)
        inp = Fp8Inputs(x, w_store, qa, sa, qw, sw, offs, sizes, fp8.block_shape(ga, m, k), fp8.block_shape(gw, n, k),
                        dense)
        if rowwise:
            qa_r, sa_r = moekernels.quantize_fp8(x, "row", backend="torch")
            qw_r, sw_r = moekernels.quantize_fp8(w_store, "row", backend="torch")
            inp.rowwise = dataclasses.replace(inp, qa=qa_r, sa=sa_r, qw_store=qw_r, sw_store=sw_r,
                                              a_block=(1, k), w_block=(1, k))
        return (inp,)
    return make


def _quant_inputs(rows: int, cols: int, device: str):
    return lambda: (torch.randn(rows, cols, device=device, dtype=DTYPE),)


# ----------------------------------------------------------------------------- implementations

def dequantize(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 q * scale, each scale repeated over its (rows, cols) block; a scale dim of 1
    broadcasts. Plain PyTorch, independent of the library's reference."""
    rows, cols = q.shape[-2:]
    s = scale
    if block[0] > 1 and s.shape[-2] > 1:
        s = s.repeat_interleave(block[0], -2)[..., :rows, :]
    if block[1] > 1 and s.shape[-1] > 1:
        s = s.repeat_interleave(block[1], -1)[..., :cols]
    return q.float() * s


def naive(inp: Fp8Inputs) -> torch.Tensor:
    """Dequantize both operands to bf16, then one torch.mm per expert into its rows of y."""
    a = dequantize(inp.qa, inp.sa, inp.a_block).to(DTYPE)
    w = dequantize(inp.qw_store, inp.sw_store, inp.w_block).to(DTYPE)  # [E, N, K]
    y = a.new_empty(a.shape[0], w.shape[1])
    for ae, we, ye, rows in zip(a.split(inp.sizes), w.unbind(0), y.split(inp.sizes), inp.sizes):
        if rows:
            torch.mm(ae, we.T, out=ye)
    return y


def native(inp: Fp8Inputs) -> torch.Tensor:
    """torch._scaled_mm: b column-major (the storage's transposed view), scales as quantized."""
    return torch._scaled_mm(inp.qa, inp.b[0], scale_a=inp.sa, scale_b=inp.b_scale[0], out_dtype=DTYPE)


def scaled_grouped(inp: Fp8Inputs):
    """torch._scaled_grouped_mm on the rowwise operands: scales [M] and [E, N], b the [E, K, N] view."""
    r = inp.rowwise
    y = torch._scaled_grouped_mm(r.qa, r.b, r.sa.reshape(-1), r.sw_store.reshape(r.sw_store.shape[0], -1), offs=r.offs,
                                 out_dtype=DTYPE)
    return y, r, "fp8"


def cutlass_usable(device: str) -> bool:
    """fp8_grouped_mm(backend="cutlass") can run here: built, and an sm_90 or sm_100 GPU."""
    from moekernels import _cutlass

    return device == "cuda" and _cutlass.unavailable(torch.device("cuda")) is None


def bf16(inp: Fp8Inputs) -> torch.Tensor:
    return moekernels.grouped_mm(inp.x, inp.w_store.transpose(1, 2), inp.offs, backend="triton")


def library(backend: str):
    def run(inp: Fp8Inputs) -> torch.Tensor:
        if inp.dense:
            return moekernels.fp8_mm(inp.qa, inp.sa, inp.b[0], inp.b_scale[0], out_dtype=DTYPE, backend=backend)
        return moekernels.fp8_grouped_mm(inp.qa, inp.sa, inp.b, inp.b_scale, inp.offs, out_dtype=DTYPE,
                                         backend=backend)
    return run


def timed(fn, ref: str = "fp8"):
    """The timed call: fn's product with the inputs and which reference checks it ("fp8": the
    dequantized operands' product; "bf16": the unquantized operands')."""
    return lambda inp: (fn(inp), inp, ref)


def naive_quantize(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8's function in plain PyTorch, for block dims that divide x's: scale =
    max(amax, 1e-12) / 448 per block, q = clamp(x / scale) cast to e4m3."""
    br, bc = block
    rows, cols = x.shape
    blocks = x.float().view(rows // br, br, cols // bc, bc)
    scale = blocks.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.view(rows, cols), scale.view(rows // br, cols // bc)


def quant_impl(granularity, backend: str | None):
    if backend is None:
        return lambda x: naive_quantize(x, granularity)
    return lambda x: moekernels.quantize_fp8(x, granularity, backend=backend)


# ----------------------------------------------------------------------------- counters and checks

def scale_bytes(mode: str, m: int, k: int, n: int, experts: int) -> int:
    """The float32 scales of a [M, K] and of the E [K, N] weights."""
    kb, nb = -(-k // 128), -(-n // 128)
    a, b = {"block": (m * kb, experts * kb * nb), "rowwise": (m, experts * n), "tensor": (1, experts)}[mode]
    return 4 * (a + b)


def fp8_mm_flops(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


def fp8_mm_bytes(m: int, k: int, n: int, experts: int, mode: str, grouped: bool) -> int:
    """a [M, K] and the experts' weights [E, K, N] in fp8 read once, their scales read once, y [M, N]
    bf16 written once, and for a grouped GEMM the int32 offs [E]. Every expert has rows here."""
    return m * k + experts * k * n + 2 * m * n + scale_bytes(mode, m, k, n, experts) + (4 * experts if grouped else 0)


def quant_bytes(rows: int, cols: int, block: tuple[int, int], itemsize: int = 2) -> int:
    """x read once, q (1 byte an element) and the float32 scales written once."""
    return rows * cols * (itemsize + 1) + -(-rows // block[0]) * -(-cols // block[1]) * 4


def check_rows(sizes: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(expert, rows) sampled: up to CHECK_EXPERTS experts with rows, spread from the first to the
    last, and up to CHECK_ROWS rows of each spread over its segment, its first and last included."""
    ends = list(itertools.accumulate(sizes))
    used = [e for e, rows in enumerate(sizes) if rows]
    picks = sorted({used[round(i * (len(used) - 1) / max(CHECK_EXPERTS - 1, 1))] for i in range(CHECK_EXPERTS)}
                   ) if used else []
    out = []
    for e in picks:
        start, end = ends[e] - sizes[e], ends[e]
        if end - start <= CHECK_ROWS:
            rows = torch.arange(start, end)
        else:
            rows = torch.linspace(start, end - 1, CHECK_ROWS).round().long()
        out.append((e, rows))
    return out


@torch.no_grad()
def reference_errors(y: torch.Tensor, inp: Fp8Inputs) -> dict[str, float]:
    """Relative error norms of y on the sample against the float32 products of the dequantized fp8
    operands ("fp8") and of the unquantized bf16 ones ("bf16")."""
    got, want = [], {"fp8": [], "bf16": []}
    m = inp.qa.shape[0]
    for e, rows in check_rows(inp.sizes):
        rows = rows.to(y.device)
        sa = inp.sa[rows] if inp.sa.shape[0] == m else inp.sa  # per tensor: [1, 1]
        a = dequantize(inp.qa[rows], sa, inp.a_block)
        w = dequantize(inp.qw_store[e], inp.sw_store[e], inp.w_block)  # [N, K]
        want["fp8"].append(a @ w.T)
        want["bf16"].append(inp.x[rows].float() @ inp.w_store[e].float().T)
        got.append(y[rows])
    if not got:
        return {"fp8": 0.0, "bf16": 0.0}
    got = torch.cat(got)
    return {ref: rel_err(got, torch.cat(w)) for ref, w in want.items()}


def compare(out, naive_out) -> dict:
    """Against the reference of the implementation's kind, with the naive path's error and the
    error against the unquantized product beside it."""
    y, inp, ref = out
    errs = reference_errors(y, inp)
    return {"ok": errs[ref] <= RTOL, "rel_err": errs[ref], "naive_rel_err": reference_errors(*naive_out[:2])["fp8"],
            "rel_err_unquantized": errs["bf16"]}


def compare_quant(out, naive_out) -> dict:
    """quantize_fp8 is bit-exact by design: q's bits and the scales must match the naive ones."""
    (q, scale), (nq, nscale) = out, naive_out
    q_diff = (q.view(torch.uint8) != nq.view(torch.uint8)).sum().item()
    scale_diff = (scale != nscale).sum().item()
    return {"ok": q_diff == 0 and scale_diff == 0, "q_mismatch": q_diff / max(q.numel(), 1),
            "scales_differ": scale_diff}


# ----------------------------------------------------------------------------- cases

def _gemm_case(kind: str, sizes: list[int], n: int, k: int, mode: str, device: str, quick: bool) -> Case:
    gpu = device == "cuda"
    experts, m = len(sizes), sum(sizes)
    dense = kind == "dense"
    flops = fp8_mm_flops(m, k, n)
    impls = {"naive": timed(naive)}
    if gpu and dense and mode != "block":
        impls["native"] = timed(native)
    if gpu and mode == "block":
        impls["bf16"] = timed(bf16, ref="bf16")
    if not gpu or (not quick and flops <= TORCH_MAX_FLOPS):
        impls["torch"] = timed(library("torch"))
    if gpu:
        impls["triton"] = timed(library("triton"))
    grouped_block = gpu and not dense and mode == "block"
    if grouped_block and cutlass_usable(device):
        impls["cutlass"] = timed(library("cutlass"))
    rowwise = grouped_block and hasattr(torch, "_scaled_grouped_mm")
    if rowwise:
        impls["scaled_grouped"] = scaled_grouped
    name = f"N{n} K{k} {mode}" if dense else f"{experts}x{sizes[0]} N{n} K{k} {mode}"
    ga, gw = GRANULARITY[mode]
    return Case(
        bench=BENCH, group=f"{kind} {name}", x=m, x_name="M",
        make_inputs=_gemm_inputs(sizes, n, k, mode, device, dense, rowwise), impls=impls, flops=flops,
        bytes=fp8_mm_bytes(m, k, n, experts, mode, grouped=not dense),
        bound="memory" if m <= MEMORY_ROWS * experts else "compute", compare=compare,
        eager=("torch",),  # the reference reads offs on the host
        params={"kind": kind, "mode": mode, "M": m, "N": n, "K": k, "E": experts, "rows_per_expert": m // experts,
                "a_granularity": str(ga), "weight_granularity": str(gw), "dtype": "e4m3", "out_dtype": "bf16",
                "weight_layout": "[E, N, K] storage, transposed view"},
    )


def _quant_case(what: str, rows: int, cols: int, device: str) -> Case:
    granularity = (1, 128) if what == "act" else (128, 128)
    impls = {"naive": quant_impl(granularity, None), "torch": quant_impl(granularity, "torch")}
    if device == "cuda":
        impls["triton"] = quant_impl(granularity, "triton")
        if what == "act" and moekernels.HAS_CUDA_EXT:
            impls["cuda"] = quant_impl(granularity, "cuda")
    return Case(
        bench=BENCH, group=f"quant {granularity[0]}x{granularity[1]} {what} K{cols}", x=rows, x_name="M",
        make_inputs=_quant_inputs(rows, cols, device), impls=impls, flops=0,
        bytes=quant_bytes(rows, cols, granularity, DTYPE.itemsize), bound="memory", compare=compare_quant,
        params={"kind": "quant", "operand": what, "rows": rows, "cols": cols, "granularity": list(granularity),
                "dtype": "bf16"},
    )


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    """``tokens`` (--tokens) replaces the dense M and the activations' rows; the contiguous cases
    and the weights keep their shapes."""
    gpu = device == "cuda"
    if gpu:
        dense_nk = QUICK_DENSE_NK if quick else DENSE_NK
        contiguous = QUICK_CONTIGUOUS if quick else CONTIGUOUS
        contiguous_modes = ("block",) if quick else MODES
        act_k = QUANT_ACT_K[:1] if quick else QUANT_ACT_K
        weights = QUICK_QUANT_WEIGHTS if quick else QUANT_WEIGHTS
    else:
        dense_nk, contiguous, contiguous_modes = CPU_DENSE_NK, CPU_CONTIGUOUS, MODES
        act_k, weights = CPU_QUANT_ACT_K, CPU_QUANT_WEIGHTS
    m_sweep = token_sweep(device, quick, tokens, M_FULL, M_QUICK, M_CPU)
    quant_sweep = token_sweep(device, quick, tokens, QUANT_M_FULL, QUANT_M_QUICK, M_CPU)

    out = []
    for n, k in dense_nk:
        for mode in MODES:
            out += [_gemm_case("dense", [m], n, k, mode, device, quick) for m in m_sweep]
    for experts, rows, n, k in contiguous:
        out += [_gemm_case("contiguous", [rows] * experts, n, k, mode, device, quick) for mode in contiguous_modes]
    for k in act_k:
        out += [_quant_case("act", m, k, device) for m in quant_sweep]
    for k, ns in weights:
        out += [_quant_case("weight", n, k, device) for n in ns]
    return out


# ----------------------------------------------------------------------------- notes

# One note line per target: harness.target_line with this benchmark's name and swept size.
_target = functools.partial(target_line, BENCH, x_name="M")


def notes(records: list[dict]) -> list[str]:
    """The issue's targets for each kernel that ran: block-wise vs bf16 (contiguous, then dense for
    information), the contiguous cases' TFLOP/s, and quantization's fraction of the copy rate."""
    ok = [r for r in records if r["bench"] == BENCH and r["error"] is None]
    bf16_us = {(r["group"], r["x"]): r["time_us"]["median"] for r in ok if r["impl"] == "bf16"}
    lines = []
    for impl in KERNELS:
        mine = [r for r in ok if r["impl"] == impl]
        block = [r for r in mine if r["params"].get("mode") == "block"]
        for kind in ("contiguous", "dense"):
            vs = [(r, bf16_us[r["group"], r["x"]] / r["time_us"]["median"]) for r in block
                  if r["params"]["kind"] == kind and (r["group"], r["x"]) in bf16_us]
            lines += _target(f"{kind} block-wise, {impl} vs bf16 grouped_mm", vs, TARGET_VS_BF16, ".2f")
        lines += _target(f"contiguous block-wise, {impl} TFLOP/s",
                         [(r, r["tflops"]) for r in block if r["params"]["kind"] == "contiguous"],
                         TARGET_CONTIGUOUS_TFLOPS, ",.0f")
        lines += _target(f"quantize_fp8, {impl} of the copy bandwidth",
                         [(r, r["roofline_fraction"]) for r in mine
                          if r["params"]["kind"] == "quant" and r["roofline_fraction"] is not None],
                         TARGET_QUANT_FRACTION, ".0%")
    return lines
