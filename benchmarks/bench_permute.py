"""Permute and unpermute: token rows [T, H] <-> expert-sorted rows [T*k, H], bf16.

Two groups per shape:
- permute:   x [T, H] -> x_sorted [T*k, H], row r = x[source_index[r] // k];
- unpermute: y_sorted [T*k, H] and float32 topk_weights [T, k] -> y [T, H], the weighted combine.

Implementations timed:
- naive:      permute by index_select on the sorted order; unpermute by one index_add_ of the
              weighted rows into a float32 [T, H];
- naive_loop: (unpermute only) the Hugging Face transformers loop over the experts: each
              expert's tokens by torch.where on a one-hot mask, gathered, weighted, index_add_;
              its host syncs keep it out of a CUDA graph, so it is timed eagerly;
- torch:      moekernels.permute / unpermute(backend="torch"), the library's reference path;
- triton:     moekernels.permute / unpermute(backend="triton"), on a GPU;
- cuda:       moekernels.permute / unpermute(backend="cuda"), where the extension is built.
torch has no native op for them.

The plan is built in make_inputs, outside the timing, by the torch backend: the same indices
whichever backend runs, and a broken plan kernel cannot take this benchmark down with it.
Rows are only moved (and, for unpermute, k of them summed per token): judged in GB/s
against the device copy bandwidth.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import moekernels
from . import harness
from .harness import Case, library_backends
from .shapes import DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, MoEShape, balanced_ids, token_sweep

TOKENS_FULL = [1, 16, 128, 1024, 4096, 16384, 65536]
# The target sits at 16384 tokens; 16 stands for decode.
TOKENS_QUICK = [16, 1024, 16384]
# Real H, few tokens: the CPU run is a dry run of the code paths, not a result.
TOKENS_CPU = [1, 16, 128]
KERNELS = ("triton", "cuda")
# The legend under the table (harness.IMPLS has the common names): see the docstring.
IMPLS = {"naive_loop": "transformers' loop over the experts (one-hot mask, torch.where, index_add_), eager"}
# A case whose sorted rows pass this is skipped: DeepSeek-V3 at 65536 tokens holds 7.5 GB of
# bf16 rows, the naive unpermute a float32 product twice that, and each call then takes
# milliseconds for a size past the target (16384).
MAX_SORTED_BYTES = 4 << 30
DTYPE = torch.bfloat16
# The issue's target, printed as information and never asserted: DeepSeek-V3's shape
# (k 8, H 7168) at 16384 tokens, at >= 80% of the copy bandwidth measured in the same run.
TARGET_SHAPE = DEEPSEEK_V3
TARGET_TOKENS = 16384
TARGET_COPY_FRACTION = 0.8
# bf16 keeps 8 bits of mantissa: one rounding of the output is ~2e-3 relative, and the
# transformers loop rounds after each of the k adds.
UNPERMUTE_RTOL = 1e-2


# ----------------------------------------------------------------------------- the baselines

def naive_permute(x: torch.Tensor, plan) -> torch.Tensor:
    """Row r of the sorted order is pair source_index[r], of token source_index[r] // k."""
    return x.index_select(0, plan.source_index // plan.top_k)


def naive_unpermute(y_sorted: torch.Tensor, plan, topk_weights: torch.Tensor) -> torch.Tensor:
    """Weight each sorted row by its pair's weight and add it into its token's row, in float32."""
    num_tokens, hidden = topk_weights.shape[0], y_sorted.shape[1]
    token_of_row = plan.source_index // plan.top_k
    weight_of_row = topk_weights.reshape(-1).index_select(0, plan.source_index)
    out = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=y_sorted.device)
    out.index_add_(0, token_of_row, y_sorted * weight_of_row[:, None])
    return out.to(y_sorted.dtype)


def naive_loop_unpermute(y_sorted: torch.Tensor, plan, topk_weights: torch.Tensor,
                         topk_ids: torch.Tensor) -> torch.Tensor:
    """transformers' MixtralSparseMoeBlock combine, the expert MLP's output replaced by the
    expert's rows of y_sorted (found through dest_index); it accumulates in the model's dtype."""
    num_tokens, top_k = topk_weights.shape
    routing_weights = topk_weights.to(y_sorted.dtype)  # transformers casts them to the model's dtype first
    final = torch.zeros(num_tokens, y_sorted.shape[1], dtype=y_sorted.dtype, device=y_sorted.device)
    expert_mask = F.one_hot(topk_ids.long(), num_classes=plan.num_experts).permute(2, 1, 0)  # [E, k, T]
    expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for expert_idx in expert_hit:
        idx, top_x = torch.where(expert_mask[expert_idx].squeeze(0))
        rows = y_sorted.index_select(0, plan.dest_index[top_x * top_k + idx])
        current = rows * routing_weights[top_x, idx, None]
        final.index_add_(0, top_x, current.to(y_sorted.dtype))
    return final


# ----------------------------------------------------------------------------- the library

def library_permute(backend: str):
    return lambda x, plan: moekernels.permute(x, plan, backend=backend)


def library_unpermute(backend: str):
    return lambda y_sorted, plan, topk_weights, topk_ids: moekernels.unpermute(
        y_sorted, plan, topk_weights, backend=backend)


# ----------------------------------------------------------------------------- counters and checks

def permute_bytes(tokens: int, hidden: int, top_k: int, itemsize: int) -> int:
    """x [T, H] read once, x_sorted [T*k, H] written once, one int32 index per sorted row."""
    return tokens * hidden * itemsize + tokens * top_k * hidden * itemsize + tokens * top_k * 4


def unpermute_bytes(tokens: int, hidden: int, top_k: int, itemsize: int) -> int:
    """y_sorted [T*k, H] read once, float32 weights [T, k] and int32 dest_index [T*k] read once,
    y [T, H] written once."""
    return tokens * top_k * hidden * itemsize + tokens * top_k * (4 + 4) + tokens * hidden * itemsize


def compare_permute(out, ref) -> dict:
    """A permute only moves rows: it must match bit for bit."""
    return {"ok": torch.equal(out, ref)}


def compare_unpermute(out, ref) -> dict:
    """Sums in another order and precision differ by bf16 roundings: relative error norm."""
    a, b = out.double(), ref.double()
    den = b.norm().item()
    rel = (a - b).norm().item() / den if den else (a - b).norm().item()
    return {"ok": rel <= UNPERMUTE_RTOL, "rel_err": rel}


# ----------------------------------------------------------------------------- cases

def _routing(shape: MoEShape, tokens: int, device: str):
    ids = balanced_ids(shape, tokens, device)
    return ids, moekernels.plan_routing(ids, shape.experts, backend="torch")


def _permute_inputs(shape: MoEShape, tokens: int, device: str):
    def make():
        _, plan = _routing(shape, tokens, device)
        return torch.randn(tokens, shape.hidden, device=device, dtype=DTYPE), plan
    return make


def _unpermute_inputs(shape: MoEShape, tokens: int, device: str):
    def make():
        ids, plan = _routing(shape, tokens, device)
        y_sorted = torch.randn(tokens * shape.top_k, shape.hidden, device=device, dtype=DTYPE)
        weights = torch.rand(tokens, shape.top_k, device=device)
        weights /= weights.sum(dim=1, keepdim=True)  # renormalized, as the routers give them
        return y_sorted, plan, weights, ids
    return make


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    tokens = token_sweep(device, quick, tokens, TOKENS_FULL, TOKENS_QUICK, TOKENS_CPU)
    backends = library_backends(device)
    shapes = [MIXTRAL_8X7B, QWEN3_30B_A3B, DEEPSEEK_V3]
    itemsize = DTYPE.itemsize

    out = []
    for op in ("permute", "unpermute"):
        for shape in shapes:
            if op == "permute":
                impls = {"naive": naive_permute}
                impls.update({b: library_permute(b) for b in backends})
                make, nbytes, compare = _permute_inputs, permute_bytes, compare_permute
            else:
                impls = {"naive": lambda y, plan, w, ids: naive_unpermute(y, plan, w),
                         "naive_loop": naive_loop_unpermute}
                impls.update({b: library_unpermute(b) for b in backends})
                make, nbytes, compare = _unpermute_inputs, unpermute_bytes, compare_unpermute
            for t in tokens:
                if t * shape.top_k * shape.hidden * itemsize > MAX_SORTED_BYTES:
                    continue
                out.append(Case(
                    bench="permute", group=f"{shape.name} {op}", x=t, make_inputs=make(shape, t, device),
                    impls=impls, flops=0, bytes=nbytes(t, shape.hidden, shape.top_k, itemsize),
                    bound="memory", compare=compare, eager=("naive_loop",),  # nonzero syncs
                    params={"op": op, "T": t, "E": shape.experts, "k": shape.top_k, "H": shape.hidden,
                            "dtype": "bf16", "weights_dtype": "fp32" if op == "unpermute" else None},
                ))
    return out


def notes(records: list[dict]) -> list[str]:
    """The issue's target, for each kernel that ran, permute and unpermute."""
    lines = []
    for r in records:
        if (r["bench"] == "permute" and r["impl"] in KERNELS and r["error"] is None
                and r["group"].startswith(TARGET_SHAPE.name + " ") and r["x"] == TARGET_TOKENS
                and r.get("roofline_fraction") is not None):
            frac = r["roofline_fraction"]
            verdict = harness.verdict(r, frac >= TARGET_COPY_FRACTION)
            lines.append(f"permute {r['group']} T={TARGET_TOKENS} {r['impl']}: {frac:.0%} of the copy "
                         f"bandwidth, target >= {TARGET_COPY_FRACTION:.0%}: {verdict}")
    return lines
