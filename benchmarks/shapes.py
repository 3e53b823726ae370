"""MoE layer shapes of real models, as their Hugging Face configs give them.

Every benchmark names its cases after these, so a number reads as
"DeepSeek-V3's routing at 40k tokens", not "E=256, k=8".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEShape:
    name: str
    hidden: int                 # H, the model width
    intermediate: int           # I, one expert's FFN width (moe_intermediate_size)
    experts: int                # E, routed experts
    top_k: int                  # k, experts per token
    scoring: str = "softmax"    # "softmax" or "sigmoid" over the router logits
    renormalize: bool = True    # divide the top-k weights by their sum
    n_group: int | None = None  # grouped top-k: experts split into n_group groups ...
    topk_group: int | None = None  # ... of which the topk_group best are searched
    correction_bias: bool = False  # e_score_correction_bias: biases the choice, not the weights
    routed_scaling_factor: float = 1.0


DEEPSEEK_V3 = MoEShape("deepseek-v3", hidden=7168, intermediate=2048, experts=256, top_k=8,
                       scoring="sigmoid", n_group=8, topk_group=4, correction_bias=True,
                       routed_scaling_factor=2.5)
MIXTRAL_8X7B = MoEShape("mixtral-8x7b", hidden=4096, intermediate=14336, experts=8, top_k=2)
QWEN3_30B_A3B = MoEShape("qwen3-30b-a3b", hidden=2048, intermediate=768, experts=128, top_k=8)
QWEN3_235B_A22B = MoEShape("qwen3-235b-a22b", hidden=4096, intermediate=1536, experts=128, top_k=8)
# gpt-oss takes the softmax over the top-k logits only, which is the softmax
# over all E followed by renormalizing the top k.
GPT_OSS_120B = MoEShape("gpt-oss-120b", hidden=2880, intermediate=2880, experts=128, top_k=4)

SHAPES = {s.name: s for s in (DEEPSEEK_V3, MIXTRAL_8X7B, QWEN3_30B_A3B, QWEN3_235B_A22B, GPT_OSS_120B)}


@dataclass(frozen=True)
class GemmShape:
    """One grouped GEMM of an MoE layer: E experts' [K, N] weights (y = x @ w[e])."""
    name: str
    experts: int  # E
    k: int
    n: int


def _gemm(shape: MoEShape, proj: str, k: int, n: int, experts: int | None) -> GemmShape:
    # Fewer experts than the model has: the slice one GPU holds under expert parallelism.
    suffix = f" E{experts}" if experts is not None and experts != shape.experts else ""
    return GemmShape(f"{shape.name} {proj}{suffix}", experts or shape.experts, k, n)


def gate_up(shape: MoEShape, experts: int | None = None) -> GemmShape:
    """The first expert GEMM: K = H, N = 2I (gate and up projections in one weight)."""
    return _gemm(shape, "gate_up", shape.hidden, 2 * shape.intermediate, experts)


def down(shape: MoEShape, experts: int | None = None) -> GemmShape:
    """The second expert GEMM: K = I, N = H."""
    return _gemm(shape, "down", shape.intermediate, shape.hidden, experts)


def balanced_ids(shape: MoEShape, tokens: int, device: str) -> torch.Tensor:
    """int32 [T, k] expert ids, k distinct per token and uniform over E: a balanced router's."""
    return torch.rand(tokens, shape.experts, device=device).topk(shape.top_k, dim=1).indices.int()


def token_sweep(device: str, quick: bool, tokens: list[int] | None, full: list[int], quick_set: list[int],
                cpu: list[int]) -> list[int]:
    """The token counts a benchmark runs: ``--tokens`` if given, else its GPU (full or quick) or CPU list."""
    if tokens is not None:
        return tokens
    if device == "cuda":
        return quick_set if quick else full
    return cpu
