"""Pure-PyTorch twins of every public op.

These are the specification: the tests compare every backend against them, the benchmarks
time them as the "torch" backend, and they are what CPU tensors run by default.

Bit-exact routing across backends
---------------------------------
Routing returns expert ids, and ids must be identical on every backend (torch on CPU or GPU,
Triton compiled or interpreted, the CUDA extension). An id is decided by comparing float32
scores, and two experts' scores can be one ulp apart; so every backend must compute the
*same bits*, not merely close values. Library ``exp`` functions differ by an ulp between
numpy, Sleef (torch CPU), libdevice and ``ex2.approx`` (Triton's fast ``tl.exp``). Hence:

* Without a correction bias the choice is made on the logits themselves: softmax and sigmoid
  are monotone, so ranking logits ranks scores, with no rounding involved at all.
* With a bias the choice is ``score + bias``, and ``score`` comes from :func:`exp_f32` below,
  an exp built only from IEEE-754 float32 ``+ - * /`` (each rounded to nearest, never fused
  into an FMA), ``floor`` and exponent-bit arithmetic. Every backend runs the same sequence,
  so every backend gets the same bits. Its error is below 2 ulp of the true exp.
* The softmax denominator is accumulated in float64 and rounded once to float32, so the order
  of the summation (a tree on the GPU, pairwise in numpy, vectorised in torch) does not show.
"""

from __future__ import annotations

import torch

# float32 constants, written as the exact decimal of their float32 value so that Python,
# numpy, Triton and CUDA C all hold the same bits.
LOG2E = 1.4426950216293335  # float32(1 / ln 2)
LN2_HI = 0.693359375  # 355/512: 9 significant bits, so n * LN2_HI is exact for |n| <= 2**15
LN2_LO = -0.00021219444170128554  # float32(ln 2 - LN2_HI)
# float32(1/k!) for k = 2..7: a degree-7 Taylor polynomial on |r| <= ln2/2 leaves a
# truncation error of 0.347**8/8! = 5e-9 relative, under half an ulp (6e-8).
EXP_COEFFS = (
    0.00019841270113829523,
    0.0013888889225199819,
    0.008333333767950535,
    0.0416666679084301,
    0.1666666716337204,
    0.5,
    1.0,
    1.0,
)
# exp(x) is computed for x in [EXP_MIN, EXP_MAX]: e**-87 = 1.6e-38 is still a normal float32
# (no denormals, which the GPU flushes and the CPU does not) and 2**127 * 1.41 < FLT_MAX.
# Below, the result is 0; above, inf.
EXP_MIN = -87.0
EXP_MAX = 88.0
RENORM_EPS = 1e-20


def exp_f32(x: torch.Tensor) -> torch.Tensor:
    """exp of a float32 tensor, bit-identical to every kernel's ``exp_f32`` (see module doc)."""
    xc = x.clamp(EXP_MIN, EXP_MAX)
    n = torch.floor(xc * LOG2E + 0.5)
    r = (xc - n * LN2_HI) - n * LN2_LO
    p = torch.full_like(r, EXP_COEFFS[0])
    for c in EXP_COEFFS[1:]:
        p = p * r + c
    two_n = ((n.to(torch.int32) + 127) << 23).view(torch.float32)  # 2**n, exact
    y = p * two_n
    y = torch.where(x < EXP_MIN, torch.zeros_like(y), y)
    return torch.where(x > EXP_MAX, torch.full_like(y, float("inf")), y)


def _top_ids(choice: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k largest eligible values per row, in descending order, ties to the lower
    index. An ineligible entry ranks below every eligible one, -inf included.

    The kernels' selection key: the float32 mapped to an order-preserving int32 in the high
    half (-0.0 folded onto +0.0 first), ``n - 1 - index`` in the low half. The keys are unique,
    so a plain top-k is exact; it is 2.6x faster than a stable sort at [1024, 128] on a CPU.
    """
    n = choice.shape[-1]
    bits = (choice + 0.0).view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) << 32
    key = key | (n - 1 - torch.arange(n, device=choice.device))
    if eligible is not None:
        key = key.masked_fill(~eligible, torch.iinfo(torch.int64).min)
    return n - 1 - (key.topk(k, dim=-1).values & 0xFFFFFFFF)


def routing_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """softmax or sigmoid of ``logits.float()`` over the last dim, bit-identical on every backend."""
    x = logits.float()
    if scoring == "sigmoid":
        return 1.0 / (1.0 + exp_f32(-x))
    e = exp_f32(x - x.amax(dim=-1, keepdim=True))
    return e / e.double().sum(dim=-1, keepdim=True).float()


def topk_routing(
    logits: torch.Tensor,
    top_k: int,
    *,
    scoring: str = "softmax",
    renormalize: bool = False,
    bias: torch.Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference router; see :func:`moekernels.topk_routing` for the arguments.

    Returns ``topk_weights`` float32 [T, top_k] and ``topk_ids`` int32 [T, top_k]; ids in
    descending order of choice, ties to the lower expert id.
    """
    x = logits.float()
    num_tokens, num_experts = x.shape
    scores = routing_scores(x, scoring)
    # Without a bias rank the logits: monotone in the score, so no rounding can reorder them.
    choice = x if bias is None else scores + bias.float()
    if n_group is not None and n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        if bias is not None:  # DeepSeek-V3: a group scores the sum of its two best experts
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:  # DeepSeek-V2: a group scores its best expert
            group_scores = grouped.amax(dim=-1)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, _top_ids(group_scores, topk_group), True)
        eligible = keep.repeat_interleave(num_experts // n_group, dim=1)
    else:
        eligible = None
    ids = _top_ids(choice, top_k, eligible)
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + RENORM_EPS)
    return weights * routed_scaling_factor, ids.to(torch.int32)
