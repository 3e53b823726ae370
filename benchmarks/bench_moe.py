"""The MoE layer end to end: moekernels.fused_moe against transformers and a PyTorch loop, bf16 and fp8.

y = fused_moe(hidden, w_gate_up, w_down, topk_weights, topk_ids): the routed experts of one layer,
from the router's output (topk_weights float32 [T, k], topk_ids [T, k]) to the combined tokens
[T, H], SwiGLU, weights in transformers v5's layout (w_gate_up [E, 2I, H], gate rows then up rows;
w_down [E, H, I]). Groups are "<model> <pass> <dtype>", for example "qwen3-30b-a3b fwd+bwd bf16";
the swept size is the token count T. Passes: fwd, and fwd+bwd (the gradients of hidden,
topk_weights and both weights for an upstream gradient dy; bf16 only: the fp8 path is
inference-only). dtypes: bf16, and fp8 (e4m3 weights with (128, 128) float32 scales from
quantize_fp8, activations quantized (1, 128) on the fly: DeepSeek-V3's recipe).

Implementations timed:
- naive:         a loop over the experts: each one's pairs by torch.where on the ids, its SwiGLU
                 MLP on them (torch.mm in bf16, the gate in float32), the router-weighted products
                 index_add_-ed into a float32 [T, H]; fp8: each expert's weights dequantized to
                 bf16 in the loop, its activations quantized (1, 128) and dequantized before each
                 GEMM (the fp8 math in plain PyTorch). Its torch.where syncs: timed eagerly;
- hf_eager:      transformers' "eager" experts: Qwen3MoeExperts.forward (the loop the Mixtral and
                 DeepSeek-V3 experts share: one_hot mask, nonzero, per-expert torch.where,
                 F.linear, index_add_ into bf16), timed eagerly (it syncs). Its backward costs
                 E^2 x one expert's weight bytes (see HF_EAGER_BWD_MAX_BYTES): its fwd+bwd runs
                 in the full suite only, and only for Mixtral (8 experts);
- hf_grouped_mm: transformers' "grouped_mm" experts (ExpertsInterface): sort the pairs, histc,
                 two torch grouped_mm calls, the weighted sum over k; no host sync, so it runs
                 in a CUDA graph like the kernels;
- torch:         fused_moe(backend="torch"), the library's reference composition (float32 products,
                 host-read offsets: eager); on a GPU only in the full suite up to TORCH_MAX_FLOPS;
- triton:        fused_moe(backend="triton"), on a GPU.
In the LoRA groups (below) also:
- no_lora:       the same layer without the adapters, its experts frozen (the gradients of hidden
                 and the router weights only): what the adapters add to; triton on a GPU, torch on
                 the CPU; bf16 only (the layer on e4m3 experts has no backward without adapters);
- peft_grouped_mm: PEFT's LoRA on the experts' 3-D parameters (LoraConfig(target_parameters=[...]),
                 peft 0.21's ParamWrapper): every forward forms W + sBA, torch.baddbmm(W, B, A,
                 alpha=s) per stack as its _LoraFactorsProxy does, then runs transformers' "grouped_mm"
                 experts on it; its backward writes the weight gradient of the whole stacks and
                 reduces it into A and B. The same ops as PEFT's, without its module plumbing (a
                 parametrization registered and removed per forward: host work only), on the bf16
                 weights in the fp8 groups too; tests/test_benchmarks.py checks it against PEFT.
The transformers rows run on a GPU only, where transformers >= 5 imports and both functions run
a small layer (transformers_impls); otherwise they are left out and the notes say why. Both are
called on a real Qwen3MoeExperts module built on the meta device, its two weights swapped for
the case's tensors (no copy), with int64 ids as transformers' routers give them. In the fp8
groups they run on the bf16 weights the fp8 ones were quantized from: transformers' FP8 experts
need the `kernels` package and a Hub download (kernels-community/finegrained-fp8), which an
offline machine does not have; the bf16 layer is what it runs without them.

Shapes: Mixtral-8x7B, Qwen3-30B-A3B, Qwen3-235B-A22B and DeepSeek-V3's slice on one GPU under
expert parallelism 8 ("deepseek-v3 E32": 32 experts, H 7168, I 2048, k 8, ids within the 32),
at T = 1, 8, 64, 512, 4096 and 16384. Routing is made once per case on the host from a fixed
seed: ids the top-k of random logits (every expert equally likely: a balanced router's), weights
the softmax over the k chosen logits; make_inputs copies them to the device. The CPU dry run:
naive and torch only (and no_lora), at "qwen3-30b-a3b /8" (H 256, E 16, k 8; I 128, not 96: the
fp8 path's 128-wide blocks), T = 1, 8, 64: ~15 s with the imports and the plot (LoRA's 2 cases add
a few seconds). The quick GPU suite: Qwen3-30B-A3B bf16 at T 8 (decode) and 4096 forward, 4096
fwd+bwd; DeepSeek-V3 E32 at T 512 forward, bf16 and fp8 (the shapes of tests/test_moe.py's GPU
tests, which run first: their Triton compiles are in the cache); and LoRA's case (below).
5 cases, 19 timings: ~20 s of timed calls on an H200, ~35-60 s with the transformers import,
the inputs, the checks and any Triton compile the tests left (estimated: no GPU has run it yet;
most of it is the two eager loops over 128 experts, >= 156 calls each), and LoRA's ~20-40 s. The full suite: 70 cases
(Mixtral's and DeepSeek-V3 E32's fwd+bwd at 16384 tokens pass MAX_FLOPS) and 20 LoRA cases,
~30-35 minutes estimated, two thirds of it the naive and eager loops (>= 506 calls each): past one
device call, so run it in parts (--tokens 1,8,64 then 512,4096 then 16384).

Counted: 2*T*k*H*2I + 2*T*k*I*H FLOPs forward (the two GEMMs over the T*k pairs), 3x that for
fwd+bwd (dx and dw, one GEMM each per forward GEMM). Bytes, the least the layer moves: hidden and
y (bf16), topk_weights and ids, and the touched experts' weights (bf16, or e4m3 and their float32
scales) once; fwd+bwd adds dy read, dx and the router weights' gradient written, and every
expert's dw written (an untouched one's is zeros). Up to DECODE_ROWS pairs per expert the weights
are the traffic: those cases are judged in GB/s against the device copy bandwidth, larger ones in
TFLOP/s against the bf16 torch.mm roofline (fp8 can pass 100% of it).
Every output is checked on a sample against float32: y (and dx, the router weights' gradient) at
CHECK_TOKENS tokens spread over T, each through all k of its experts; dw of CHECK_EXPERTS experts
(the busiest and the least busy) over all their pairs, and dw = 0 for an expert with no pair. The
fp8 rows against the dequantized weights with the activations quantized as the kernel does (h
rounded to bf16 first); their error against the unquantized bf16 weights is recorded beside it
(rel_err_unquantized: what fp8 costs). A check costs milliseconds at any size.

The LoRA groups, "<model> fwd+bwd <dtype> lora r<r>": fine-tuning adapters on frozen experts,
fused_moe(lora=ExpertsLoRA(a1, b1, a2, b2, scale=LORA_SCALE)), forward and the gradients of hidden,
the router weights and the four adapters (never W + sBA); bf16 or e4m3 (128, 128) experts, r 16 and
64, Qwen3-30B-A3B and DeepSeek-V3 E32 at T 512, 4096, 16384 (20 cases); the CPU dry run adds its
shape at r 16 and its largest T, bf16 and fp8 (2 cases, 5 timings). The quick suite adds one:
Qwen3-30B-A3B bf16 r 16 at T 4096 (naive, peft_grouped_mm, triton, no_lora; ~20-40 s, estimated:
4 timings, the naive loop over 128 experts ~30-40 ms a call, and the LoRA kernels' Triton
compiles at this shape). Counted (lora_flops): the base GEMMs forward
and their dgrads (2x the forward: no weight gradient) plus the adapters, 2*T*k*r*(H + 2I) +
2*T*k*r*(I + H) forward and 2x that backward (the low-rank dgrad and the wgrads of A and B); the
no_lora row is rated on the same count (it does 1-13% fewer FLOPs). Bytes (lora_bytes): the
forward's, dy, dx and the router weights' gradient, the adapters read and their gradients written.
Checked as above, the adapters' gradients in dw's place (and none for an expert with no pair);
the adapters' B is not zero, so each adds about half the base product. The fp8 rows against the
dequantized weights' layer with unquantized activations (the gradients' e4m3 tiles are not
emulated), at RTOL["fp8+lora"].
Targets on an H200 (printed, never asserted): at T >= 4096, LoRA at r 16 adds at most 15% to the
layer's fwd+bwd (triton over no_lora <= 1.15), and PEFT's path is slower than ours by at least the
time of writing W + sBA and reading it back once (2x the stacks' bf16 bytes at the run's copy rate).
No number has been measured yet: no GPU has run these rows.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import moekernels
from .bench_fp8 import FP8, FP8_MAX, dequantize
from .harness import Case, rel_err, target_line
from .shapes import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, QWEN3_235B_A22B, MoEShape, token_sweep

BENCH = "moe"
DTYPE = torch.bfloat16
# DeepSeek-V3 under expert parallelism 8: one GPU holds 32 of the 256 experts. Its router's groups
# do not apply to the slice (ids are drawn within the 32).
DEEPSEEK_V3_E32 = dataclasses.replace(DEEPSEEK_V3, name="deepseek-v3 E32", experts=32, n_group=None,
                                      topk_group=None, correction_bias=False)
SHAPES = [QWEN3_30B_A3B, QWEN3_235B_A22B, DEEPSEEK_V3_E32, MIXTRAL_8X7B]
TOKENS_FULL = [1, 8, 64, 512, 4096, 16384]
TOKENS_CPU = [1, 8, 64]
CPU_SHAPE = MoEShape("qwen3-30b-a3b /8", hidden=256, intermediate=128, experts=16, top_k=8)
PASSES = ("fwd", "fwd+bwd")
DTYPES = ("bf16", "fp8")
# (shape, pass, dtype, T) of the quick GPU suite. Qwen3-30B-A3B at 8 and 4096 tokens and its fwd+bwd
# at 4096 are test_moe.py's test_gpu_decode_step_in_a_cuda_graph / test_gpu_qwen3_layer shapes;
# DeepSeek-V3 E32 at 512 tokens, bf16 and fp8, is test_gpu_fp8_layer's: the device check runs those
# tests first, so the Triton kernels come from the cache.
QUICK = [(QWEN3_30B_A3B, "fwd", "bf16", 8), (QWEN3_30B_A3B, "fwd", "bf16", 4096),
         (QWEN3_30B_A3B, "fwd+bwd", "bf16", 4096), (DEEPSEEK_V3_E32, "fwd", "bf16", 512),
         (DEEPSEEK_V3_E32, "fwd", "fp8", 512)]
# LoRA fine-tuning (issue 16): fwd+bwd with frozen experts and adapters on both GEMMs, at ranks 16
# and 64, from prefill-sized batches up (fine-tuning steps are large); DeepSeek-V3 E32's 16384 passes
# MAX_FLOPS. The quick suite: the r = 16 target's case, ours against ours without the adapters and
# PEFT's (its Triton compiles are the LoRA tests' kernels, at other sizes: ~5-8 new ones, estimated).
LORA_SHAPES = [QWEN3_30B_A3B, DEEPSEEK_V3_E32]
LORA_RANKS = (16, 64)
LORA_TOKENS = [512, 4096, 16384]
QUICK_LORA = [(QWEN3_30B_A3B, "bf16", 16, 4096)]
CPU_LORA_RANK = 16
# PEFT's scaling lora_alpha / r; not 1, so that a missing scale fails the check.
LORA_SCALE = 0.5
LORA_GRADS = ("d_a1", "d_b1", "d_a2", "d_b2")
# A timing takes >= 156 calls (quick) or 506 (full): 2^44 FLOPs (17.6 TFLOP, ~30-40 ms a call for the
# loops) drops Mixtral's and DeepSeek-V3 E32's fwd+bwd at 16384 tokens (34.6 TFLOP each).
MAX_FLOPS = 2**44
# The torch reference multiplies in float32 on CUDA cores (~60 TFLOP/s on an H200): 2^37 FLOPs is
# ~2.5 ms a call; past it the reference would take minutes of the full suite.
TORCH_MAX_FLOPS = 2**37
KERNELS = ("triton",)
HF_IMPLS = ("hf_eager", "hf_grouped_mm")
# The legend under the table (harness.IMPLS has the common names): see the docstring.
IMPLS = {"hf_eager": "transformers' \"eager\" experts (its loop over the experts)",
         "hf_grouped_mm": "transformers' \"grouped_mm\" experts (torch grouped_mm)",
         "peft_grouped_mm": "PEFT's LoRA on the experts (target_parameters): W + sBA formed every forward, then "
                            "transformers' \"grouped_mm\" experts on it",
         "no_lora": "this library's layer without the adapters, experts frozen (the same backend as the LoRA "
                    "rows: triton on a GPU, torch on the CPU)"}

# The targets, printed as information and never asserted.
PREFILL_T = 4096  # prefill: T >= 4096, forward and fwd+bwd
TARGET_VS_GROUPED_MM = 1.3  # forward and fwd+bwd, against transformers' "grouped_mm"
TARGET_VS_EAGER = 10.0  # forward, against transformers' eager loop
DECODE_T = 64  # decode: T <= 64, forward
TARGET_DECODE_FLOOR = 1.5  # at most 1.5x the time of reading the touched experts' weights at the copy rate
# LoRA (issue 16), fwd+bwd at T >= PREFILL_T: rank 16 adds at most 15% to the frozen layer's time
# (its FLOPs add 3.3% at Qwen3-30B-A3B's shape, 1.1% at DeepSeek-V3's: the rest is the adapters'
# small GEMMs and the low-rank segments' share of the big ones) ...
TARGET_LORA_RANK = 16
TARGET_LORA_OVERHEAD = 1.15
# ... and PEFT's path is slower than ours by at least the time of writing W + sBA and reading it
# back once (2 x the stacks' bf16 bytes at the copy rate; its backward moves 3x more: the weight
# gradient of the whole stacks written, then read twice for dA and dB).
TARGET_PEFT_STACK_TRIPS = 1.0
# transformers' eager loop takes each expert's weights by indexing (gate_up_proj[e]): in backward each
# index writes a zero gradient the size of all E experts' weights, and the E of them are summed: ~4 x
# E^2 x one expert's bytes of traffic a call, whatever T (Qwen3-30B-A3B: 4 x 155 GB, ~0.15 s on an
# H200; DeepSeek-V3 E32 4 x 90 GB; Qwen3-235B-A22B 4 x 615 GB). Its fwd+bwd is timed in the full
# suite only, where E^2 x one expert's bytes is at most this: Mixtral's 23 GB (~25 ms a call). No
# target needs it.
HF_EAGER_BWD_MAX_BYTES = 2**35
# Up to 64 pairs per expert a case is judged against the copy bandwidth (as bench_grouped_gemm's
# rows per expert): every decode case (T <= 64) is, for all four shapes.
DECODE_ROWS = 64

CHECK_TOKENS = 64
CHECK_EXPERTS = 2
# bf16: the GEMMs' outputs, h and y are rounded to bf16 (2^-9 relative each) in every
# implementation, and transformers' eager loop also sums the k products in bf16: relative error
# norms of 3-6e-3 in the CPU dry run (naive, torch, and both transformers functions on CPU
# tensors), so 2^-6 (1.6e-2) leaves ~3x; a wrong expert or a lost pair costs 0.3-1.4. The Triton
# kernels under the interpreter read up to 1.3e-2 on the gradients: Triton 3.6's interpreter
# truncates float32 to bf16 (twice round-to-nearest's error; a compiled kernel rounds to nearest).
# fp8 against the emulated reference (z in float32, h rounded to bf16, then quantized): the torch
# backend read 2.4e-3. Rounding z to bf16 before the gate, as the naive loop's bf16 GEMM does, moves
# ~1/32 of h across an e4m3 rounding boundary (a 2^-4 relative step each): 1.5-1.8e-2, a valid fp8
# layer all the same. 2^-5 passes that with ~2x to spare; skipping the activations' quantization
# (~3-4e-2) or a wrong scale block (O(1)) does not pass.
# With adapters, bf16: the same roundings (and t = s x A^T rounded to bf16): 4-6e-3 in the CPU dry
# run, the adapters' gradients included. fp8 with adapters, against unquantized activations (x, h,
# and the backward's e4m3 gradient tiles, not emulated): 2.6-5.5e-2 for the torch backend and the
# naive loop in the CPU dry run, as bench_fp8_train's fp8 training rows; 2^-3 leaves ~2x (its
# RTOL_FP8, for the same reason), while a dropped adapter or scale (~0.5) does not pass.
RTOL = {"bf16": 2**-6, "fp8": 2**-5, "bf16+lora": 2**-6, "fp8+lora": 2**-3}


# ----------------------------------------------------------------------------- transformers

@dataclass(frozen=True)
class HfExperts:
    """transformers' two experts functions and the module class they are called on."""
    version: str
    config_cls: type
    experts_cls: type
    eager: Callable  # (module, hidden_states, top_k_index, top_k_weights) -> [T, H]
    grouped_mm: Callable

    def module(self, shape: MoEShape, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.nn.Module:
        """A Qwen3MoeExperts of the shape, built on the meta device, holding these weights (not copies)."""
        config = self.config_cls(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                                 num_experts=shape.experts, num_experts_per_tok=shape.top_k, hidden_act="silu")
        with torch.device("meta"):
            module = self.experts_cls(config)
        del module.gate_up_proj, module.down_proj  # the meta parameters; plain tensor attributes instead
        module.gate_up_proj, module.down_proj = w_gate_up, w_down
        return module


def _load_transformers() -> tuple[HfExperts | None, str]:
    try:
        import transformers
    except Exception as exc:  # not installed, or it fails to import with this torch
        return None, f"transformers does not import: {type(exc).__name__}: {exc}"
    version = transformers.__version__
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
        grouped_mm = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    except (ImportError, KeyError) as exc:
        return None, (f"transformers {version} has no experts interface with a 'grouped_mm' implementation "
                      f"(transformers >= 5 has): {type(exc).__name__}: {exc}")
    # use_experts_implementation wraps forward with functools.wraps: the model's own loop is __wrapped__.
    eager = getattr(Qwen3MoeExperts.forward, "__wrapped__", Qwen3MoeExperts.forward)
    return HfExperts(version, Qwen3MoeConfig, Qwen3MoeExperts, eager, grouped_mm), f"transformers {version}"


@functools.lru_cache(maxsize=None)
def transformers_impls(device: str) -> tuple[HfExperts | None, str]:
    """(the functions, "transformers <version>") where both run a small bf16 layer on ``device``,
    else (None, why not)."""
    hf, why = _load_transformers()
    if hf is None:
        return None, why
    shape = MoEShape("smoke", hidden=128, intermediate=128, experts=4, top_k=2)
    try:
        (inp,) = make_inputs(shape, 8, "fwd", "bf16", device, hf)()
        for name in HF_IMPLS:
            y = hf_impl(hf, name)(inp)
            if y.shape != inp.hidden.shape:
                raise RuntimeError(f"{name} returned shape {tuple(y.shape)}, not {tuple(inp.hidden.shape)}")
    except Exception as exc:
        return None, f"{why}: its experts functions fail on a small {device} layer: {type(exc).__name__}: {exc}"
    return hf, why


# ----------------------------------------------------------------------------- inputs

def routing(shape: MoEShape, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 weights and int32 ids [T, k] on the host, the same for every call with these sizes:
    the top-k of standard normal logits (k distinct experts, each equally likely) and the softmax
    over the k chosen logits (the renormalized softmax of Mixtral and Qwen3). Shared between calls:
    copy before changing them."""
    return _routing(shape.experts, shape.top_k, tokens)


@functools.lru_cache(maxsize=64)
def _routing(experts: int, top_k: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(tokens * 1009 + experts * 31 + top_k)
    top = torch.randn(tokens, experts, generator=gen).topk(top_k, dim=1)
    return top.values.softmax(dim=1), top.indices.int()


@dataclass(eq=False)
class MoEInputs:
    hidden: torch.Tensor  # [T, H] bf16
    w_gate_up: torch.Tensor  # [E, 2I, H] bf16: the layer's weights, or what the fp8 ones were quantized from
    w_down: torch.Tensor  # [E, H, I] bf16
    topk_weights: torch.Tensor  # float32 [T, k]
    topk_ids: torch.Tensor  # int32 [T, k]
    topk_ids_long: torch.Tensor  # int64 [T, k]: transformers' routers give int64 (its one_hot needs them)
    q_gate_up: torch.Tensor | None = None  # e4m3, and the float32 (128, 128) scales
    s_gate_up: torch.Tensor | None = None
    q_down: torch.Tensor | None = None
    s_down: torch.Tensor | None = None
    dy: torch.Tensor | None = None  # [T, H], the upstream gradient of fwd+bwd
    hf: torch.nn.Module | None = None  # transformers' experts module holding the bf16 weights
    naive_errors: dict | None = None  # compare's cache of the naive row's errors (one set of inputs a case)
    lora: tuple[torch.Tensor, ...] | None = None  # the LoRA groups' adapters a1 [E, r, H], b1, a2, b2 (bf16)

    @property
    def fp8(self) -> bool:
        return self.q_gate_up is not None

    def leaves(self) -> tuple[torch.Tensor, ...]:
        """What fwd+bwd differentiates: hidden, the router weights, and the bf16 weights, or in the LoRA
        groups the four adapters (the experts frozen)."""
        if self.lora is not None:
            return self.hidden, self.topk_weights, *self.lora
        return self.hidden, self.topk_weights, self.w_gate_up, self.w_down

    def experts_lora(self) -> moekernels.ExpertsLoRA:
        return moekernels.ExpertsLoRA(*self.lora, scale=LORA_SCALE)


def make_inputs(shape: MoEShape, tokens: int, pass_name: str, dtype: str, device: str,
                hf: HfExperts | None = None, route: tuple[torch.Tensor, torch.Tensor] | None = None,
                lora_rank: int = 0):
    """make_inputs of one case: weights scaled so that every product is O(1), the routing (made by
    ``routing`` unless given) copied to the device, fp8 weights quantized by the torch backend
    (the same bits as the kernel's; a broken quantize kernel cannot take these rows down). With
    ``lora_rank`` the adapters too, B not zero (PEFT's init, which would hide a B-side error): each
    adapter's LORA_SCALE * (x A^T) B^T is about half the base product, and the experts are frozen."""
    backward = pass_name == "fwd+bwd"
    e, h, i = shape.experts, shape.hidden, shape.intermediate

    def make():
        weights, ids = route if route is not None else routing(shape, tokens)
        inp = MoEInputs(
            hidden=torch.randn(tokens, h, device=device, dtype=DTYPE),
            # Generated in bf16: a float32 copy of Mixtral's or DeepSeek-V3's experts would be 5.6 GB more.
            w_gate_up=torch.randn(e, 2 * i, h, device=device, dtype=DTYPE).mul_(h**-0.5),
            w_down=torch.randn(e, h, i, device=device, dtype=DTYPE).mul_(i**-0.5),
            # Copies: the routing is shared between cases, and fwd+bwd makes the weights a leaf.
            topk_weights=weights.to(device, copy=True), topk_ids=ids.to(device, copy=True),
            topk_ids_long=ids.to(device, torch.int64, copy=True))
        if dtype == "fp8":
            inp.q_gate_up, inp.s_gate_up = moekernels.quantize_fp8(inp.w_gate_up, (128, 128), backend="torch")
            inp.q_down, inp.s_down = moekernels.quantize_fp8(inp.w_down, (128, 128), backend="torch")
        if lora_rank:
            shapes = [(e, lora_rank, h), (e, 2 * i, lora_rank), (e, lora_rank, i), (e, h, lora_rank)]
            inp.lora = tuple(torch.randn(s, device=device, dtype=DTYPE).mul_(s[2] ** -0.5) for s in shapes)
        if backward:
            inp.dy = torch.randn(tokens, h, device=device, dtype=DTYPE)
            for t in inp.leaves():
                t.requires_grad_()
        if hf is not None:
            inp.hf = hf.module(shape, inp.w_gate_up, inp.w_down)
        return (inp,)
    return make


# ----------------------------------------------------------------------------- implementations

def quantize_dequantize(x: torch.Tensor) -> torch.Tensor:
    """float32 values of x quantized to e4m3 per (1, 128) as quantize_fp8 does (scale = max(amax,
    1e-12) / 448 per 128 columns of a row, a partial last block padded with zeros)."""
    rows, cols = x.shape
    padded = F.pad(x.float(), (0, -cols % 128))
    blocks = padded.view(rows, -1, 128)
    scale = blocks.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return (q.float() * scale).view(rows, -1)[:, :cols]


def _quantized(x: torch.Tensor) -> torch.Tensor:
    """x quantized (1, 128) and dequantized, in bf16, with a straight-through gradient: the e4m3
    cast's own backward would round the incoming gradient to e4m3 without a scale (most of it
    underflows), and the fp8 layers' backward takes the gradient as if unquantized too."""
    q = quantize_dequantize(x.detach()).to(DTYPE)
    return q + (x - x.detach()) if x.requires_grad else q


def naive(inp: MoEInputs) -> torch.Tensor:
    """Per expert: its pairs by torch.where (a host sync), the SwiGLU MLP (bf16 GEMMs, the gate in
    float32, h rounded to bf16 as the kernel's epilogue does), the weighted products index_add_-ed
    into float32. The experts' weights by unbind, not indexing: each w[e]'s backward would write a
    zero gradient the size of all E experts' weights (transformers' eager loop does that). In the
    LoRA groups each GEMM adds its adapter's LORA_SCALE * (x A^T) B^T, from the unquantized x and h."""
    x, ids, tw = inp.hidden, inp.topk_ids, inp.topk_weights
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    gate_ups, downs = (inp.w_gate_up.unbind(0), inp.w_down.unbind(0)) if not inp.fp8 else (None, None)
    adapters = list(zip(*(t.unbind(0) for t in inp.lora))) if inp.lora is not None else None
    for e in range(inp.w_gate_up.shape[0]):
        tok, slot = torch.where(ids == e)
        if tok.numel() == 0:
            continue
        if inp.fp8:  # this expert's weights dequantized to bf16
            w_gate_up = dequantize(inp.q_gate_up[e], inp.s_gate_up[e], (128, 128)).to(DTYPE)
            w_down = dequantize(inp.q_down[e], inp.s_down[e], (128, 128)).to(DTYPE)
        else:
            w_gate_up, w_down = gate_ups[e], downs[e]
        xe = x[tok]
        z = (_quantized(xe) if inp.fp8 else xe) @ w_gate_up.T
        if adapters is not None:
            a1, b1, a2, b2 = adapters[e]
            z = z + ((xe @ a1.T) * LORA_SCALE) @ b1.T
        gate, up = z.float().chunk(2, dim=-1)
        h = (F.silu(gate) * up).to(DTYPE)
        ye = (_quantized(h) if inp.fp8 else h) @ w_down.T
        if adapters is not None:
            ye = ye + ((h @ a2.T) * LORA_SCALE) @ b2.T
        out.index_add_(0, tok, ye.float() * tw[tok, slot, None])
    return out.to(x.dtype)


def hf_impl(hf: HfExperts, name: str):
    """transformers' "eager" or "grouped_mm" experts function on the case's module."""
    fn = hf.eager if name == "hf_eager" else hf.grouped_mm
    return lambda inp: fn(inp.hf, inp.hidden, inp.topk_ids_long, inp.topk_weights)


def library(backend: str, lora: bool = True):
    """fused_moe on the case's weights, with its adapters (if any) unless ``lora`` is False."""
    def run(inp: MoEInputs) -> torch.Tensor:
        adapters = inp.experts_lora() if lora and inp.lora is not None else None
        if inp.fp8:
            return moekernels.fused_moe(inp.hidden, inp.q_gate_up, inp.q_down, inp.topk_weights, inp.topk_ids,
                                        w_gate_up_scale=inp.s_gate_up, w_down_scale=inp.s_down, lora=adapters,
                                        backend=backend)
        return moekernels.fused_moe(inp.hidden, inp.w_gate_up, inp.w_down, inp.topk_weights, inp.topk_ids,
                                    lora=adapters, backend=backend)
    return run


def peft_grouped_mm(hf: HfExperts):
    """PEFT's LoRA on the experts' parameters (LoraConfig(target_parameters=[...]), peft 0.21's
    ParamWrapper with one adapter): each stack parametrized as torch.baddbmm(W, B, A, alpha=s), a new
    [E, 2I, H] and [E, H, I] tensor every forward (its _LoraFactorsProxy), then the model's experts
    function, transformers' "grouped_mm", on them. Backward: the grouped GEMMs' weight gradient of
    the whole stacks, then baddbmm's into A and B. The bf16 weights, in the fp8 groups too."""
    def run(inp: MoEInputs) -> torch.Tensor:
        module, (a1, b1, a2, b2) = inp.hf, inp.lora
        base = module.gate_up_proj, module.down_proj
        module.gate_up_proj = torch.baddbmm(base[0], b1, a1, alpha=LORA_SCALE)
        module.down_proj = torch.baddbmm(base[1], b2, a2, alpha=LORA_SCALE)
        try:
            return hf.grouped_mm(module, inp.hidden, inp.topk_ids_long, inp.topk_weights)
        finally:  # as PEFT removes its parametrization after the forward
            module.gate_up_proj, module.down_proj = base
    return run


def timed(fn, ref: str, frozen: bool = False):
    """The timed call: fn's y, and in fwd+bwd the gradients of inp.leaves() for dy (with ``frozen``,
    of hidden and the router weights only: a layer whose experts are frozen, without adapters).
    Returns (outs, the inputs, which reference checks it: "fp8", the dequantized weights' layer with
    quantized activations; "bf16", the bf16 weights' layer; "bf16+lora" and "fp8+lora", the bf16 or
    the dequantized weights' layer with the adapters, activations unquantized)."""
    def run(inp: MoEInputs):
        y = fn(inp)
        outs = (y,)
        if inp.dy is not None:
            outs += torch.autograd.grad(y, inp.leaves()[:2] if frozen else inp.leaves(), inp.dy)
        return outs, inp, ref
    return run


# ----------------------------------------------------------------------------- counters

def moe_flops(tokens: int, hidden: int, inter: int, top_k: int, backward: bool) -> int:
    """2*T*k*H*2I (gate/up) + 2*T*k*I*H (down); fwd+bwd 3x: dx and dw, one GEMM each per GEMM."""
    fwd = 2 * tokens * top_k * hidden * 2 * inter + 2 * tokens * top_k * inter * hidden
    return (3 if backward else 1) * fwd


def weight_bytes(experts: int, hidden: int, inter: int, fp8: bool) -> int:
    """w_gate_up [2I, H] and w_down [H, I] of ``experts`` experts: bf16, or e4m3 and the float32
    scales of their (128, 128) blocks."""
    elems = 3 * inter * hidden
    if not fp8:
        return experts * elems * DTYPE.itemsize
    blocks = -(-2 * inter // 128) * -(-hidden // 128) + -(-hidden // 128) * -(-inter // 128)
    return experts * (elems + 4 * blocks)


def lora_flops(tokens: int, hidden: int, inter: int, top_k: int, rank: int) -> int:
    """fwd+bwd of the layer with frozen experts and rank-r adapters on both GEMMs: the base GEMMs
    forward and their dgrads (2x moe_flops' forward: no weight gradient), plus the adapters: forward
    2*T*k*r*(H + 2I) (x A1^T, then t B1^T) + 2*T*k*r*(I + H) (h A2^T, t B2^T), and backward 2x that
    (the low-rank dgrad dy B then (.) A, and the wgrads dA and dB)."""
    adapters = 2 * tokens * top_k * rank * (hidden + 2 * inter) + 2 * tokens * top_k * rank * (inter + hidden)
    return 2 * moe_flops(tokens, hidden, inter, top_k, False) + 3 * adapters


def lora_bytes(tokens: int, hidden: int, inter: int, experts: int, top_k: int, touched: int, fp8: bool,
               rank: int) -> int:
    """The forward's bytes (moe_bytes), then dy read, dx and the float32 router weights' gradient
    written; the four adapters (E x r x (2H + 3I) bf16 elements) read and their gradients written.
    The frozen experts have no gradient."""
    adapters = experts * rank * (2 * hidden + 3 * inter) * DTYPE.itemsize
    return (moe_bytes(tokens, hidden, inter, experts, top_k, touched, fp8, False)
            + 2 * tokens * hidden * DTYPE.itemsize + tokens * top_k * 4 + 2 * adapters)


def moe_bytes(tokens: int, hidden: int, inter: int, experts: int, top_k: int, touched: int, fp8: bool,
              backward: bool) -> int:
    """hidden [T, H] read and y [T, H] written (bf16), float32 topk_weights and int32 ids [T, k] read,
    the touched experts' weights read once; fwd+bwd adds dy read, dx written, the float32 router
    weights' gradient written and dw of every expert written (bf16)."""
    total = 2 * tokens * hidden * DTYPE.itemsize + tokens * top_k * 8 + weight_bytes(touched, hidden, inter, fp8)
    if backward:
        total += 2 * tokens * hidden * DTYPE.itemsize + tokens * top_k * 4 + weight_bytes(experts, hidden, inter, False)
    return total


# ----------------------------------------------------------------------------- checks

def sample_tokens(tokens: int) -> torch.Tensor:
    """Up to CHECK_TOKENS token indices spread over [0, T), the first and last included."""
    if tokens <= CHECK_TOKENS:
        return torch.arange(tokens)
    return torch.linspace(0, tokens - 1, CHECK_TOKENS).round().long()


def check_experts(ids: torch.Tensor, experts: int) -> tuple[list[int], int | None]:
    """The experts whose dw is checked (the busiest and the least busy with pairs) and one without
    a pair, if any."""
    counts = torch.bincount(ids.reshape(-1).long().cpu(), minlength=experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    picks = list(dict.fromkeys([max(used, key=counts.__getitem__), min(used, key=counts.__getitem__)]))
    empty = next((e for e, c in enumerate(counts) if not c), None)
    return picks[:CHECK_EXPERTS], empty


def _ref_weights(inp: MoEInputs, e: int, ref: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's weights in float32: the bf16 ones, or the dequantized fp8 ones."""
    if ref == "fp8":
        return (dequantize(inp.q_gate_up[e], inp.s_gate_up[e], (128, 128)),
                dequantize(inp.q_down[e], inp.s_down[e], (128, 128)))
    return inp.w_gate_up[e].detach().float(), inp.w_down[e].detach().float()


def _ref_mlp(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, ref: str,
             adapters: tuple | None = None) -> torch.Tensor:
    """One expert's SwiGLU MLP in float32; "fp8" quantizes both GEMMs' inputs (1, 128) as the kernel
    does: x as given (bf16), h after its rounding to bf16. ``adapters``: the expert's (a1, b1, a2, b2)
    in float32, each GEMM adding LORA_SCALE * (x A^T) B^T."""
    z = (quantize_dequantize(x) if ref == "fp8" else x.float()) @ w_gate_up.T
    if adapters is not None:
        a1, b1, a2, b2 = adapters
        z = z + LORA_SCALE * (x.float() @ a1.T) @ b1.T
    gate, up = z.chunk(2, dim=-1)
    h = F.silu(gate) * up
    y = (quantize_dequantize(h.to(DTYPE)) if ref == "fp8" else h) @ w_down.T
    if adapters is not None:
        y = y + LORA_SCALE * (h @ a2.T) @ b2.T
    return y


def reference_errors(outs: tuple, inp: MoEInputs, ref: str) -> dict[str, float]:
    """Relative error norms of each output on the sample against float32 (the reference ``ref``):
    y, and with backward dx, the router weights' gradient and those of the trained parameters: both
    weights, the four adapters ("+lora"), or none (a frozen layer's 3 outputs)."""
    errs = {}
    x, tw, ids = inp.hidden.detach(), inp.topk_weights.detach(), inp.topk_ids
    backward = len(outs) > 1
    ref, _, lora = ref.partition("+")
    experts = inp.w_gate_up.shape[0]
    adapters = [t.detach().float() for t in inp.lora] if lora else None
    # With adapters the activations stay unquantized (the gradients' e4m3 tiles are not emulated either).
    mlp_ref = "bf16" if lora else ref

    def expert_adapters(e, grad=False):
        return None if adapters is None else tuple(t[e].clone().requires_grad_(grad) for t in adapters)
    # The token sample: y, and with backward the gradients of hidden and the router weights there.
    rows = sample_tokens(x.shape[0]).to(x.device)
    with torch.enable_grad():
        xs = x[rows].float().requires_grad_(backward)
        tws = tw[rows].float().requires_grad_(backward)
        y = torch.zeros_like(xs)
        ids_s = ids[rows]
        for e in torch.unique(ids_s).tolist():
            r, j = torch.where(ids_s == e)
            y = y.index_add(0, r, tws[r, j, None] * _ref_mlp(xs[r], *_ref_weights(inp, e, ref), mlp_ref,
                                                             expert_adapters(e)))
        errs["y"] = rel_err(outs[0][rows], y)
        if backward:
            dx, dtw = torch.autograd.grad(y, (xs, tws), inp.dy[rows].float())
            errs["dx"] = rel_err(outs[1][rows], dx)
            errs["d_topk_weights"] = rel_err(outs[2][rows], dtw)
            # dw (or the adapters' gradients) of the sampled experts, over all their pairs.
            names = LORA_GRADS if lora else ("dw_gate_up", "dw_down")
            picks, empty = check_experts(ids, experts)
            for e in picks if len(outs) > 3 else ():
                tok, slot = torch.where(ids == e)
                w1, w2 = (w.requires_grad_(not lora) for w in _ref_weights(inp, e, ref))
                a = expert_adapters(e, grad=True)
                ye = tw[tok, slot, None].float() * _ref_mlp(x[tok].float(), w1, w2, mlp_ref, a)
                want = torch.autograd.grad(ye, a if lora else (w1, w2), inp.dy[tok].float())
                for name, got, d in zip(names, outs[3:], want):
                    errs[name] = max(errs.get(name, 0.0), rel_err(got[e], d))
            if empty is not None and any(g[empty].any() for g in outs[3:]):
                errs["d_lora_untouched" if lora else "dw_untouched"] = 1.0  # a gradient for an expert with no pair
    return errs


def compare(out, naive_out) -> dict:
    """Against the float32 reference of the row's kind, with the naive loop's error beside it; the
    fp8 rows also against the unquantized bf16 weights."""
    outs, inp, ref = out
    errs = reference_errors(outs, inp, ref)
    worst = max(errs, key=errs.get)
    naive_outs, naive_inp, naive_ref = naive_out
    if naive_inp.naive_errors is None:
        naive_inp.naive_errors = reference_errors(naive_outs, naive_inp, naive_ref)
    check = {"ok": errs[worst] <= RTOL[ref], "rel_err": errs[worst], "worst": worst,
             "naive_rel_err": max(naive_inp.naive_errors.values())}
    if inp.fp8:
        unquantized = ref.replace("fp8", "bf16")
        check["rel_err_unquantized"] = errs["y"] if ref == unquantized else reference_errors(outs, inp,
                                                                                             unquantized)["y"]
    return check


# ----------------------------------------------------------------------------- cases

def _case(shape: MoEShape, pass_name: str, dtype: str, tokens: int, device: str, quick: bool,
          hf: HfExperts | None, hf_why: str | None) -> Case:
    gpu = device == "cuda"
    backward, fp8 = pass_name == "fwd+bwd", dtype == "fp8"
    route = routing(shape, tokens)
    counts = torch.bincount(route[1].reshape(-1).long(), minlength=shape.experts)
    touched = int((counts > 0).sum())
    flops = moe_flops(tokens, shape.hidden, shape.intermediate, shape.top_k, backward)
    impls = {"naive": timed(naive, dtype)}
    eager = ["naive"]
    if hf is not None:
        zero_fill = shape.experts * weight_bytes(shape.experts, shape.hidden, shape.intermediate, False)
        hf_names = HF_IMPLS if not backward or (not quick and zero_fill <= HF_EAGER_BWD_MAX_BYTES) else HF_IMPLS[1:]
        impls |= {name: timed(hf_impl(hf, name), "bf16") for name in hf_names}
        eager += [name for name in hf_names if name == "hf_eager"]
    if not gpu or (not quick and flops <= TORCH_MAX_FLOPS):
        impls["torch"] = timed(library("torch"), dtype)
        eager.append("torch")  # the reference reads the offsets on the host
    if gpu:
        impls["triton"] = timed(library("triton"), dtype)
    rows_per_expert = tokens * shape.top_k / shape.experts
    return Case(
        bench=BENCH, group=f"{shape.name} {pass_name} {dtype}", x=tokens, x_name="T",
        make_inputs=make_inputs(shape, tokens, pass_name, dtype, device, hf, route), impls=impls, flops=flops,
        bytes=moe_bytes(tokens, shape.hidden, shape.intermediate, shape.experts, shape.top_k, touched, fp8, backward),
        bound="memory" if rows_per_expert <= DECODE_ROWS else "compute", compare=compare, eager=tuple(eager),
        params={"pass": pass_name, "dtype": dtype, "E": shape.experts, "H": shape.hidden, "I": shape.intermediate,
                "k": shape.top_k, "touched_experts": touched, "max_expert_pairs": int(counts.max()),
                "weight_bytes": weight_bytes(touched, shape.hidden, shape.intermediate, fp8),
                "weight_layout": "w_gate_up [E, 2I, H], w_down [E, H, I]",
                "transformers": hf_why, "transformers_timed": hf is not None},
    )


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    """``tokens`` (--tokens) replaces T; in the quick suite each of its (shape, pass, dtype) runs at
    those T."""
    gpu = device == "cuda"
    hf, hf_why = transformers_impls(device) if gpu else (None, None)
    if not gpu:
        combos = [(CPU_SHAPE, p, d, t) for p in PASSES for d in DTYPES if not (p == "fwd+bwd" and d == "fp8")
                  for t in token_sweep(device, quick, tokens, TOKENS_FULL, TOKENS_FULL, TOKENS_CPU)]
    elif quick:
        combos = QUICK if tokens is None else list(dict.fromkeys(
            (s, p, d, t) for s, p, d, _ in QUICK for t in tokens))
    else:
        combos = [(s, p, d, t) for s in SHAPES for d in DTYPES for p in PASSES if not (p == "fwd+bwd" and d == "fp8")
                  for t in (tokens or TOKENS_FULL)]
    out = []
    for shape, pass_name, dtype, t in combos:
        if gpu and moe_flops(t, shape.hidden, shape.intermediate, shape.top_k, pass_name == "fwd+bwd") > MAX_FLOPS:
            continue
        out.append(_case(shape, pass_name, dtype, t, device, quick, hf, hf_why))
    return out + lora_cases(device, quick, tokens, hf, hf_why)


def _lora_case(shape: MoEShape, dtype: str, rank: int, tokens: int, device: str, quick: bool,
               hf: HfExperts | None, hf_why: str | None) -> Case:
    gpu, fp8 = device == "cuda", dtype == "fp8"
    route = routing(shape, tokens)
    counts = torch.bincount(route[1].reshape(-1).long(), minlength=shape.experts)
    touched = int((counts > 0).sum())
    flops = lora_flops(tokens, shape.hidden, shape.intermediate, shape.top_k, rank)
    ref = f"{dtype}+lora"
    impls = {"naive": timed(naive, ref)}
    eager = ["naive"]
    if hf is not None:
        impls["peft_grouped_mm"] = timed(peft_grouped_mm(hf), "bf16+lora")
    if not gpu or (not quick and flops <= TORCH_MAX_FLOPS):
        impls["torch"] = timed(library("torch"), ref)
        eager.append("torch")
    if gpu:
        impls["triton"] = timed(library("triton"), ref)
    if not fp8:  # the layer on e4m3 experts has no backward without adapters
        impls["no_lora"] = timed(library("triton" if gpu else "torch", lora=False), "bf16", frozen=True)
        if not gpu:
            eager.append("no_lora")
    return Case(
        bench=BENCH, group=f"{shape.name} fwd+bwd {dtype} lora r{rank}", x=tokens, x_name="T",
        make_inputs=make_inputs(shape, tokens, "fwd+bwd", dtype, device, hf, route, lora_rank=rank), impls=impls,
        flops=flops, bytes=lora_bytes(tokens, shape.hidden, shape.intermediate, shape.experts, shape.top_k, touched,
                                      fp8, rank),
        bound="memory" if tokens * shape.top_k / shape.experts <= DECODE_ROWS else "compute", compare=compare,
        eager=tuple(eager),
        params={"pass": "fwd+bwd", "dtype": dtype, "lora_rank": rank, "E": shape.experts, "H": shape.hidden,
                "I": shape.intermediate, "k": shape.top_k, "touched_experts": touched,
                "max_expert_pairs": int(counts.max()),
                "weight_bytes": weight_bytes(touched, shape.hidden, shape.intermediate, fp8),
                "weight_layout": "w_gate_up [E, 2I, H], w_down [E, H, I]; a1 [E, r, H], b1 [E, 2I, r], "
                                 "a2 [E, r, I], b2 [E, H, r]",
                "transformers": hf_why, "transformers_timed": hf is not None},
    )


def lora_cases(device: str, quick: bool, tokens: list[int] | None, hf: HfExperts | None,
               hf_why: str | None) -> list[Case]:
    if device != "cuda":  # one case a dtype, at the largest T: the code paths, not a sweep
        t = max(token_sweep(device, quick, tokens, LORA_TOKENS, LORA_TOKENS, TOKENS_CPU))
        combos = [(CPU_SHAPE, d, CPU_LORA_RANK, t) for d in DTYPES]
    elif quick:
        combos = QUICK_LORA if tokens is None else list(dict.fromkeys(
            (s, d, r, t) for s, d, r, _ in QUICK_LORA for t in tokens))
    else:
        combos = [(s, d, r, t) for s in LORA_SHAPES for d in DTYPES for r in LORA_RANKS
                  for t in (tokens or LORA_TOKENS)]
    return [_lora_case(s, d, r, t, device, quick, hf, hf_why) for s, d, r, t in combos
            if device != "cuda" or lora_flops(t, s.hidden, s.intermediate, s.top_k, r) <= MAX_FLOPS]


# ----------------------------------------------------------------------------- notes

# One note line per target: harness.target_line with this benchmark's name and swept size.
_target = functools.partial(target_line, BENCH, x_name="T")


def decode_floor(r: dict) -> tuple[float, float | None]:
    """GB/s of reading the touched experts' weights, and the time over the floor of reading them at
    the copy bandwidth (roofline_fraction is all bytes' GB/s over the copy rate at decode)."""
    wb = r["params"]["weight_bytes"]
    gbps = wb / (r["time_us"]["median"] * 1e-6) / 1e9
    frac = r["roofline_fraction"]
    return gbps, (r["bytes"] / (frac * wb) if frac else None)


def notes(records: list[dict]) -> list[str]:
    """Which transformers ran; the issue's targets for each kernel and dtype, one line each; and the
    decode bandwidth per group."""
    ok = [r for r in records if r["bench"] == BENCH and r["error"] is None]
    # The reason is None on the CPU, where transformers is not timed by design.
    lines = [f"{BENCH}: transformers' experts not timed: {why}" for why in dict.fromkeys(
        r["params"]["transformers"] for r in ok if not r["params"]["transformers_timed"]) if why]
    if any(r["impl"] in HF_IMPLS for r in ok):
        version = next(r["params"]["transformers"] for r in ok if r["impl"] in HF_IMPLS)
        lines.append(f"{BENCH}: hf_eager and hf_grouped_mm are {version}'s Qwen3MoeExperts.forward and "
                     "ExpertsInterface['grouped_mm']; in the fp8 groups they run the unquantized bf16 weights "
                     "(transformers' FP8 experts need the kernels package and a Hub download)")
    median = {(r["group"], r["x"], r["impl"]): r["time_us"]["median"] for r in ok}

    def vs(r: dict, base: str) -> float | None:
        b = median.get((r["group"], r["x"], base))
        return b / r["time_us"]["median"] if b else None

    for impl in KERNELS:
        for dtype in DTYPES:
            mine = [r for r in ok if r["impl"] == impl and r["params"]["dtype"] == dtype
                    and not r["params"].get("lora_rank")]
            fwd = [r for r in mine if r["params"]["pass"] == "fwd"]
            prefill = [r for r in fwd if r["x"] >= PREFILL_T]
            bwd = [r for r in mine if r["params"]["pass"] == "fwd+bwd" and r["x"] >= PREFILL_T]
            for label, rows, base, target in (
                    ("forward", prefill, "hf_grouped_mm", TARGET_VS_GROUPED_MM),
                    ("forward", prefill, "hf_eager", TARGET_VS_EAGER),
                    ("fwd+bwd", bwd, "hf_grouped_mm", TARGET_VS_GROUPED_MM)):
                lines += _target(f"{label} {dtype} at T >= {PREFILL_T}, {impl} vs transformers' {base[3:]}",
                                 [(r, v) for r in rows if (v := vs(r, base)) is not None], target, ".2f")
            decode = [r for r in fwd if r["x"] <= DECODE_T and r["roofline_fraction"]]
            lines += _target(f"forward {dtype} at T <= {DECODE_T}, {impl} time over the touched weights' read floor",
                             [(r, decode_floor(r)[1]) for r in decode], TARGET_DECODE_FLOOR, ".2f", at_most=True)
            for group in dict.fromkeys(r["group"] for r in decode):
                cells = [f"{r['x']}: {gbps:,.0f} ({over:.2f}x)" for r in decode if r["group"] == group
                         for gbps, over in [decode_floor(r)]]
                lines.append(f"{BENCH} {group} {impl}, GB/s of the touched experts' weights "
                             f"(time over the floor) by T: " + ", ".join(cells))
    return lines + lora_notes(ok, median)


def copy_gbps(records: list[dict]) -> float | None:
    """The copy rate this run measured, from any memory-bound record (its GB/s over its fraction of it)."""
    return next((r["gbps"] / r["roofline_fraction"] for r in records
                 if r.get("bound") == "memory" and r.get("roofline_fraction") and r.get("gbps")), None)


def lora_notes(ok: list[dict], median: dict) -> list[str]:
    """The LoRA targets at T >= PREFILL_T: ours over ours without the adapters (rank 16), and PEFT's
    time minus ours over the time of writing and reading the weight stacks once."""
    lines = []
    lora = [r for r in ok if r["params"].get("lora_rank") and r["x"] >= PREFILL_T]
    copy = copy_gbps(ok)
    for impl in KERNELS:
        for dtype in DTYPES:
            mine = [r for r in lora if r["impl"] == impl and r["params"]["dtype"] == dtype]
            over = [(r, r["time_us"]["median"] / base) for r in mine if r["params"]["lora_rank"] == TARGET_LORA_RANK
                    and (base := median.get((r["group"], r["x"], "no_lora")))]
            lines += _target(f"fwd+bwd {dtype} LoRA r{TARGET_LORA_RANK} at T >= {PREFILL_T}, {impl} time over no_lora",
                             over, TARGET_LORA_OVERHEAD, ".2f", at_most=True)
            if copy is None:
                continue
            trips = []
            for r in mine:
                peft = median.get((r["group"], r["x"], "peft_grouped_mm"))
                if peft:
                    p = r["params"]
                    stack_us = 2 * weight_bytes(p["E"], p["H"], p["I"], False) / copy / 1e3
                    trips.append((r, (peft - r["time_us"]["median"]) / stack_us))
            lines += _target(f"fwd+bwd {dtype} LoRA at T >= {PREFILL_T}, peft_grouped_mm - {impl} in writes and reads "
                             f"of the weight stacks at {copy:,.0f} GB/s", trips, TARGET_PEFT_STACK_TRIPS, ".2f")
    return lines
