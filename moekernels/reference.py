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
* The softmax denominator is an exact sum, so the order of the summation (a tree of shuffles
  on the GPU, numpy's pairwise order when interpreting, torch's vectorised one) cannot show.
  A float64 sum of float32 values is not enough: once a row's logits span more than about 20,
  the exps span more than 53 bits, each order rounds the float64 sum its own way, and one
  order lands the float32 denominator on one side of a rounding tie and another on the other
  (logits 0, -0.25, -37.25, -37.25: 1 + exp(-0.25) lies exactly between two float32, and the
  two exps of 0.6 * 2**-53 lift a float64 sum above that tie only if added to each other first;
  tests/test_route.py's midpoint rows). With a bias one ulp of every score can be another
  expert. So
  :func:`softmax_scores` scales each exp ``e`` (in [0, 1]) by ``2**s``, ``s = 53 - ceil(log2
  E)`` (exact: a power of two), and sums the integer parts ``floor(e * 2**s)`` in float64:
  every term and every partial sum is an integer of at most E * 2**s <= 2**53, exact in
  float64, so every order and every tree gives the same bits. The sum is rounded once to
  float32 (F), and the scores are ``(e * 2**s) / F``, the correctly rounded quotient of
  ``e / (F * 2**-s)``. The dropped fractions cost under E * 2**-s < 2 * E**2 * 2**-53 of the
  denominator (which is at least 1: 2**-33 at E = 1024), and nothing at all in a row whose
  exps are all 0 or at least 2**(23 - s) (logits within 15 of the row's maximum at E = 256),
  where F is the correctly rounded sum, as the plain float64 sum gave.

Non-finite logits (the same on every backend, applied where a kernel loads a logit):

* NaN is read as -inf: it is never chosen over a larger logit, ties with -inf to the lower id,
  and scores 0. +inf is read as FLT_MAX, so the scores stay finite (softmax gives the +inf
  experts the whole weight, shared equally; sigmoid gives them 1). -inf stays -inf.
* A row with no logit above -inf (all NaN / -inf) has no softmax: its softmax weights are NaN
  (0 / 0: its row maximum is taken as 0, so every exp is 0), its sigmoid weights 0, and its ids
  the lowest eligible ids (every key ties). With a bias such a row's NaN scores are again read
  as -inf for the choice, so the ids stay the lowest ones (the lowest groups with groups).
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
FLT_MAX = 3.4028234663852886e38  # float32's largest finite value, what +inf logits become


def sanitize_logits(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, +inf -> FLT_MAX, on float32 logits (see "Non-finite logits" above)."""
    return x.nan_to_num(nan=float("-inf"), posinf=FLT_MAX, neginf=float("-inf"))


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
    x = sanitize_logits(logits.float())
    if scoring == "sigmoid":
        return 1.0 / (1.0 + exp_f32(-x))
    row_max = x.amax(dim=-1, keepdim=True)
    # A row of -inf would give -inf - -inf = NaN inside exp; 0 gives exp = 0 and a 0 / 0 row.
    e = exp_f32(x - row_max.masked_fill(row_max == float("-inf"), 0.0))
    return softmax_scores(e)


def denominator_scale(num_experts: int) -> float:
    """2**s, s = 53 - ceil(log2 E): E terms of at most 2**s sum to at most 2**53, every partial
    sum of their integer parts an integer float64 holds exactly (see the module doc)."""
    return 2.0 ** (53 - (num_experts - 1).bit_length())


def softmax_scores(e: torch.Tensor) -> torch.Tensor:
    """e / sum(e) over the last dim of float32 exps in [0, 1], the denominator an exact,
    order-free sum (the module doc): (e * 2**s) / float32(sum(floor(e * 2**s)) in float64)."""
    scaled = e * denominator_scale(e.shape[-1])  # exact: a power of two, at most 2**53
    return scaled / scaled.floor().double().sum(dim=-1, keepdim=True).float()


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
    x = sanitize_logits(logits.float())
    num_tokens, num_experts = x.shape
    scores = routing_scores(x, scoring)
    # Without a bias rank the logits: monotone in the score, so no rounding can reorder them.
    choice = x if bias is None else sanitize_logits(scores + bias.float())
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


# ----------------------------------------------------------------------------- plan


def padded_rows_bound(num_pairs: int, num_experts: int, block_size: int) -> int:
    """Static upper bound on the rows of the block-padded layout, known without reading ids.

    At most min(E, T*k) experts are non-empty and each pads fewer than B rows; the padded total
    is a multiple of B, so the bound rounds down to one. DeepSeek-V3 decode (T*k = 8, E = 256,
    B = 64): 8 + 8 * 63 = 512 rows, where N + E * (B - 1) would give 16136.
    ``torch.sym_min`` keeps it traceable with a symbolic T under torch.compile.
    """
    rows = num_pairs + torch.sym_min(num_experts, num_pairs) * (block_size - 1)
    return rows // block_size * block_size


def plan_routing_fields(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> tuple[torch.Tensor, ...]:
    """The fields of :class:`moekernels.RoutingPlan`, in its order; ``block_size=0`` gives
    empty padded fields. An id outside [0, E) is a dropped pair: it counts for no expert and
    sits after ``expert_offsets[-1]`` in the sorted order (the op raises on CPU instead)."""
    device, n = topk_ids.device, topk_ids.numel()
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # dropped pairs sort last, as one more expert
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = counts.cumsum(0)
    source = torch.sort(key, stable=True).indices
    dest = torch.empty_like(source)
    dest[source] = torch.arange(n, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    if not block_size:
        padded, block_expert, num_padded = (torch.empty(0, **i32) for _ in range(3))  # 3, not aliases
    else:
        rows = padded_rows_bound(n, num_experts, block_size)
        padded_counts = (counts + block_size - 1) // block_size * block_size
        padded_ends = padded_counts.cumsum(0)
        sorted_key = key[source]
        in_expert = sorted_key < num_experts
        e = sorted_key.clamp(max=num_experts - 1)
        within = torch.arange(n, device=device) - (offsets - counts)[e]
        pos = torch.where(in_expert, (padded_ends - padded_counts)[e] + within, rows)  # dropped: to a spare slot
        padded = torch.full((rows + 1,), n, **i32)
        padded[pos] = source.to(torch.int32)
        padded = padded[:rows]
        starts = torch.arange(0, rows, block_size, device=device)
        block_expert = torch.searchsorted(padded_ends, starts, right=True)
        block_expert = torch.where(starts < padded_ends[-1], block_expert, -1).to(torch.int32)
        num_padded = padded_ends[-1:].to(torch.int32)
    return (counts.int(), offsets.int(), source.int(), dest.int(), padded, block_expert, num_padded)


def plan_routing(topk_ids: torch.Tensor, num_experts: int, *, block_size: int | None = None):
    """Reference of :func:`moekernels.plan_routing`."""
    from .plan import RoutingPlan

    fields = plan_routing_fields(topk_ids, num_experts, block_size or 0)
    return RoutingPlan.from_fields(fields, num_experts, topk_ids.shape[1], block_size)


# ----------------------------------------------------------------------------- permute and combine


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation, float64 for float64 inputs (so gradcheck can run on the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def permute_rows(x: torch.Tensor, source_index: torch.Tensor, top_k: int) -> torch.Tensor:
    """x_sorted[r] = x[source_index[r] // k]."""
    return x.index_select(0, source_index.long() // top_k)


def combine_rows(y_sorted: torch.Tensor, dest_index: torch.Tensor, top_k: int,
                 weights: torch.Tensor | None = None, num_valid: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * y_sorted[dest[t*k + j]] over the pairs with dest < num_valid (all pairs
    when num_valid is None), accumulated in float32 and returned in y_sorted's dtype.
    Unweighted over all pairs, it is permute's backward."""
    acc = acc_dtype(y_sorted.dtype)
    rows = y_sorted.to(acc).index_select(0, dest_index.long()).view(-1, top_k, y_sorted.shape[1])
    if weights is not None:
        rows = rows * weights.to(acc).unsqueeze(-1)
    if num_valid is not None:  # where, not a multiply: a dropped row's inf or NaN must not leak
        rows = torch.where((dest_index < num_valid).view(-1, top_k, 1), rows, 0.0)
    return rows.sum(dim=1).to(y_sorted.dtype)


def unpermute_backward(grad_y: torch.Tensor, y_sorted: torch.Tensor, dest_index: torch.Tensor,
                       num_valid: torch.Tensor, topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d unpermute: grad_y_sorted[dest[t*k+j]] = w[t, j] * grad_y[t] and
    grad_w[t, j] = <grad_y[t], y_sorted[dest[t*k+j]]>, both zero for dropped pairs."""
    acc = acc_dtype(y_sorted.dtype)
    num_tokens, top_k = topk_weights.shape
    valid = (dest_index < num_valid).view(num_tokens, top_k)
    g = grad_y.to(acc)
    rows = y_sorted.to(acc).index_select(0, dest_index.long()).view(num_tokens, top_k, y_sorted.shape[1])
    grad_w = torch.where(valid, (rows * g.unsqueeze(1)).sum(-1), 0.0)
    grad_rows = torch.where(valid.unsqueeze(-1), topk_weights.to(acc).unsqueeze(-1) * g.unsqueeze(1), 0.0)
    grad_sorted = y_sorted.new_empty(y_sorted.shape)  # row-major, as the kernels' (not a transposed input's)
    grad_sorted[dest_index.long()] = grad_rows.reshape(-1, y_sorted.shape[1]).to(y_sorted.dtype)
    return grad_sorted, grad_w.to(topk_weights.dtype)


def permute(x: torch.Tensor, plan) -> torch.Tensor:
    """Reference of :func:`moekernels.permute`: row r of the result is x[source_index[r] // k]."""
    return permute_rows(x, plan.source_index, plan.top_k)


def unpermute(y_sorted: torch.Tensor, plan, topk_weights: torch.Tensor) -> torch.Tensor:
    """Reference of :func:`moekernels.unpermute`: y[t] = sum_j w[t, j] * y_sorted[dest_index[t*k + j]],
    over the pairs that were not dropped."""
    return combine_rows(y_sorted, plan.dest_index, plan.top_k, topk_weights, plan.expert_offsets[-1])


# ----------------------------------------------------------------------------- router losses


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e (c_e / T) * P_e: c_e the (token, slot) pairs routed to e, P_e the mean over tokens
    of softmax(logits)[:, e]. transformers' ``load_balancing_loss_func`` without an attention
    mask. Dropped ids count for no expert; no tokens give 0."""
    acc = acc_dtype(logits.dtype)
    num_tokens = max(logits.shape[0], 1)
    probs = torch.softmax(logits.to(acc), dim=-1)
    counts = pair_counts(topk_ids, num_experts, acc)
    return num_experts * (counts / num_tokens * (probs.sum(0) / num_tokens)).sum()


def pair_counts(topk_ids: torch.Tensor, num_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[E] (token, slot) pairs routed to each expert, in ``dtype``; ids outside [0, E) count for none."""
    flat = topk_ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    counts = torch.zeros(num_experts, dtype=dtype, device=topk_ids.device)
    return counts.scatter_add(0, torch.where(valid, flat, 0), valid.to(dtype))


def balance_scores(logits: torch.Tensor, scoring: str) -> torch.Tensor:
    """The affinity scores normalized over the experts of each token, in ``acc_dtype``: softmax,
    or sigmoid divided by its sum (+ 1e-20), DeepSeek-V3's s'_{i,t} (report eq. 19)."""
    x = logits.to(acc_dtype(logits.dtype))
    if scoring == "softmax":
        return torch.softmax(x, dim=-1)
    s = torch.sigmoid(x)
    return s / (s.sum(dim=-1, keepdim=True) + RENORM_EPS)


def sequence_balance_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, seq_len: int,
                          scoring: str = "softmax") -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (tech report eq. 17-20) without its
    alpha: the mean over the B = T / seq_len sequences (token t in sequence t // seq_len) of
    sum_e f_e P_e, where in one sequence of S tokens f_e = E / (k S) * (pairs routed to e) and
    P_e = mean over its tokens of :func:`balance_scores`. Megatron-LM's
    ``sequence_load_balancing_loss_func`` (moe_utils.py) computes the same, from the probs of its
    ``compute_routing_scores_for_aux_loss``. Dropped ids count for no expert; no tokens give 0."""
    num_tokens, top_k = topk_ids.shape
    num_seqs = num_tokens // seq_len
    p = balance_scores(logits, scoring).view(num_seqs, seq_len, num_experts).mean(1)
    counts = sequence_pair_counts(topk_ids, num_experts, seq_len, p.dtype)
    return num_experts / (seq_len * top_k) * (counts * p).sum() / max(num_seqs, 1)


def sequence_pair_counts(topk_ids: torch.Tensor, num_experts: int, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, E] (token, slot) pairs routed to each expert within each sequence of seq_len tokens."""
    num_tokens = topk_ids.shape[0]
    flat = topk_ids.long()
    seq = torch.arange(num_tokens, device=topk_ids.device).unsqueeze(1) // seq_len
    key = torch.where((flat >= 0) & (flat < num_experts), flat + seq * num_experts, -1)  # dropped: -1
    num_seqs = num_tokens // seq_len
    return pair_counts(key, num_seqs * num_experts, dtype).view(num_seqs, num_experts)


def update_correction_bias(bias: torch.Tensor, expert_counts: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's auxiliary-loss-free balancing step: b_e + rate * sign(mean load - load_e),
    returned as a new tensor. The sign is taken of E * mean - E * load_e in float64, exact for
    integer counts, so an expert at exactly the mean load keeps its bias."""
    c = expert_counts.double()
    return bias + rate * torch.sign(c.sum() - c.shape[0] * c).to(bias.dtype)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of logsumexp(logits)**2 (ST-MoE); no tokens give 0."""
    lse = torch.logsumexp(logits.to(acc_dtype(logits.dtype)), dim=-1)
    return lse.square().sum() / max(logits.shape[0], 1)


# ----------------------------------------------------------------------------- grouped GEMM


def _segments(offs: torch.Tensor, rows: int):
    """(expert, start, end) of each segment. Reads offs on the host: the reference may sync."""
    ends = [min(max(int(v), 0), rows) for v in offs.tolist()]
    starts = [0] + ends[:-1]
    return [(e, min(s, t), t) for e, (s, t) in enumerate(zip(starts, ends))]


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of :func:`moekernels.grouped_mm`: y[seg e] = x[seg e] @ w[e] in float32 (float64
    for float64), rows at or after offs[-1] zero; the other forms in :func:`grouped_mm_forms`."""
    if x.dim() == 3 or w.dim() == 2:
        return grouped_mm_forms(x, w, offs)
    acc = acc_dtype(x.dtype)
    out = torch.zeros(x.shape[0], w.shape[2], dtype=acc, device=x.device)
    for e, s, t in _segments(offs, x.shape[0]):
        if t > s:
            out[s:t] = x[s:t].to(acc) @ w[e].to(acc)
    return out.to(x.dtype)


def grouped_mm_forms(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    """torch._grouped_mm's other forms, accumulated in float32 (float64 for float64):
    2D x 2D, offs along K: out[g] = a[:, seg g] @ b[seg g, :], [G, M, N], zero for an empty group;
    3D x 3D: out[g] = a[g] @ b[g] (bmm); 3D x 2D, offs along N: out[:, seg g] = a[g] @ b[:, seg g],
    [M, N], columns at or after offs[-1] zero."""
    acc = acc_dtype(a.dtype)
    if a.dim() == 3 and b.dim() == 3:
        return (a.to(acc) @ b.to(acc)).to(a.dtype)
    if a.dim() == 2:
        out = torch.zeros(offs.shape[0], a.shape[0], b.shape[1], dtype=acc, device=a.device)
        for g, s, t in _segments(offs, a.shape[1]):
            out[g] = a[:, s:t].to(acc) @ b[s:t].to(acc)
    else:
        out = torch.zeros(a.shape[1], b.shape[1], dtype=acc, device=a.device)
        for g, s, t in _segments(offs, b.shape[1]):
            out[:, s:t] = a[g].to(acc) @ b[:, s:t].to(acc)
    return out.to(a.dtype)


def grouped_mm_dw(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor, a_index: torch.Tensor | None = None,
                  gather_div: int = 1) -> torch.Tensor:
    """dw[e] = A[seg e]^T @ grad[seg e] in float32 ([E, K, N], zeros for an empty expert), with
    A[r] = a[a_index[r] // gather_div], or a itself."""
    rows = permute_rows(a, a_index, gather_div) if a_index is not None else a
    acc = acc_dtype(grad.dtype)
    out = torch.zeros(offs.shape[0], a.shape[1], grad.shape[1], dtype=acc, device=a.device)
    for e, s, t in _segments(offs, grad.shape[0]):
        if t > s:
            out[e] = rows[s:t].to(acc).T @ grad[s:t].to(acc)
    return out.to(grad.dtype)


def gated_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """act(gate) * up of z = [gate | up] ([M, 2N] -> [M, N]), in float32, returned in z's dtype:
    silu (SwiGLU) or gelu (GeGLU, exact erf gelu)."""
    gate, up = z.float().chunk(2, dim=-1)
    act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.gelu
    return (act(gate) * up).to(z.dtype)


def gated_activation_backward(grad: torch.Tensor, z: torch.Tensor, activation: str) -> torch.Tensor:
    """d(act(gate) * up) / dz for z = [gate | up]: [grad * up * act'(gate) | grad * act(gate)]."""
    gate, up = z.float().chunk(2, dim=-1)
    g = grad.float()
    if activation == "silu":
        sig = torch.sigmoid(gate)
        act, d_act = gate * sig, sig * (1 + gate * (1 - sig))
    else:  # gelu(x) = x * Phi(x), gelu'(x) = Phi(x) + x * phi(x)
        cdf = 0.5 * (1 + torch.erf(gate * 0.7071067811865476))
        act, d_act = gate * cdf, cdf + gate * torch.exp(-0.5 * gate * gate) * 0.3989422804014327
    return torch.cat([g * up * d_act, g * act], dim=-1).to(z.dtype)


def grouped_mm_fused(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, source_index: torch.Tensor, top_k: int,
                     gather: bool, activation: str, scatter_weights: torch.Tensor | None,
                     lora: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The unfused composition of :func:`moekernels.grouped_gemm.grouped_mm_fused`: permute rows
    (gather), grouped_mm, plus ``lora_x @ lora_w[e]`` over the sorted rows (``lora``: a low-rank
    segment [M, r] x [E, r, N] added before the epilogue, in float32), act(gate) * up
    (activation), then scale by the pair's router weight and write to the pair's row
    (scatter_weights)."""
    a = permute_rows(x, source_index, top_k) if gather else x
    if lora is None:
        z = grouped_mm(a, w, offs)
    else:
        acc = acc_dtype(a.dtype)
        z = (grouped_mm(a.to(acc), w.to(acc), offs) + grouped_mm(lora[0].to(acc), lora[1].to(acc), offs)).to(a.dtype)
    h = gated_activation(z, activation) if activation else z
    if scatter_weights is None:
        return h
    src = source_index.long()
    out = torch.zeros_like(h)
    out[src] = (h.float() * scatter_weights.reshape(-1)[src].float().unsqueeze(-1)).to(h.dtype)
    return out


def fused_moe(hidden: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, *, activation: str = "silu", w_gate_up_scale: torch.Tensor | None = None,
              w_down_scale: torch.Tensor | None = None, lora=None) -> torch.Tensor:
    """Reference of :func:`moekernels.fused_moe`, expert by expert in float32 (float64 for
    float64): fp8 weights dequantized with their (128, 128) scales (the tokens are not
    quantized), and with ``lora`` (an ExpertsLoRA) each adapter's ``s (x A^T) B^T`` added to its
    product. Differentiable (autograd), so it is also the reference of the gradients.
    ``w_gate_up`` may be the pair (w_gate, w_up), each [E, I, H] (with the pair of their scales)."""
    acc = acc_dtype(hidden.dtype)
    if isinstance(w_gate_up, (tuple, list)):  # each half dequantized with its own scales, then stacked
        scales = w_gate_up_scale if w_gate_up_scale is not None else (None, None)
        w1 = torch.cat([dequantize_fp8(w, s) if s is not None else w for w, s in zip(w_gate_up, scales)], 1)
    else:
        w1 = dequantize_fp8(w_gate_up, w_gate_up_scale) if w_gate_up_scale is not None else w_gate_up
    w2 = dequantize_fp8(w_down, w_down_scale) if w_down_scale is not None else w_down
    a1 = b1 = a2 = b2 = None
    s1 = s2 = 1.0
    if lora is not None:
        a1, b1, a2, b2 = lora.tensors()
        s1, s2 = lora.scales
    x = hidden.to(acc)
    out = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
    for e in range(w1.shape[0]):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if not token.numel():
            continue
        xe = x[token]
        z = xe @ w1[e].to(acc).T
        if a1 is not None:
            z = z + s1 * (xe @ a1[e].to(acc).T) @ b1[e].to(acc).T
        gate, up = z.chunk(2, dim=-1)
        h = (torch.nn.functional.silu(gate) if activation == "silu" else torch.nn.functional.gelu(gate)) * up
        y = h @ w2[e].to(acc).T
        if a2 is not None:
            y = y + s2 * (h @ a2[e].to(acc).T) @ b2[e].to(acc).T
        out = out.index_add(0, token, topk_weights[token, slot].to(acc).unsqueeze(-1) * y)
    return out.to(hidden.dtype)


# ----------------------------------------------------------------------------- FP8

FP8_AMAX_FLOOR = 1e-12  # the amax of an all-zero block: a finite, positive scale, and q = 0


def fp8_block_scale(amax: torch.Tensor, pow2_scale: bool, fmax: float) -> torch.Tensor:
    """max(amax, 1e-12) / fmax in float32 (an IEEE division), rounded up to a power of two by its
    exponent bits with pow2_scale (a mantissa of 0 is already one). A non-finite amax (a NaN or
    an inf in the block: a data error) gives the canonical NaN (0x7FC00000), so that every value
    of the block quantizes to NaN; pow2's exponent bump would turn a NaN into -0.0, hence last."""
    scale = amax.float().clamp(min=FP8_AMAX_FLOOR) / fmax
    if pow2_scale:
        bits = scale.view(torch.int32)
        scale = torch.where(bits & 0x7FFFFF != 0, ((bits >> 23) + 1) << 23, bits).view(torch.float32)
    return torch.where(amax.isfinite(), scale, float("nan"))


def block_dims(scale_shape, rows: int, cols: int) -> tuple[int, int]:
    """The (block rows, block cols) that a [..., nbr, nbc] scale implies over [rows, cols]: the whole
    extent for one block, else ceil(extent / blocks) rounded up to a power of two (block dims
    are powers of two or whole extents: 300 rows in 3 blocks are blocks of 128, not 100)."""
    def dim(extent, blocks):
        return max(extent, 1) if blocks <= 1 else 1 << (-(-extent // blocks) - 1).bit_length()

    return dim(rows, scale_shape[-2]), dim(cols, scale_shape[-1])


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, blocks=None) -> torch.Tensor:
    """A [..., nbr, nbc] block scale broadcast to [..., rows, cols]."""
    br, bc = blocks or block_dims(scale.shape, rows, cols)
    return scale.repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :rows, :cols]


def quantize_fp8(x: torch.Tensor, blocks: tuple[int, int], *, pow2_scale: bool = False,
                 dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`moekernels.quantize_fp8` with the (block rows, block cols) resolved."""
    br, bc = blocks
    fmax = torch.finfo(dtype).max
    *lead, rows, cols = x.shape
    nbr, nbc = -(-rows // br), -(-cols // bc)
    padded = x.new_zeros(*lead, nbr * br, nbc * bc, dtype=torch.float32)
    padded[..., :rows, :cols] = x.float()
    amax = padded.view(*lead, nbr, br, nbc, bc).abs().amax(dim=(-3, -1)) if padded.numel() else \
        padded.new_zeros(*lead, nbr, nbc)
    scale = fp8_block_scale(amax, pow2_scale, fmax)
    q = (x.float() / _expand_blocks(scale, rows, cols, (br, bc))).clamp(-fmax, fmax).to(dtype)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 q * scale, each scale broadcast over its block."""
    return q.float() * _expand_blocks(scale, q.shape[-2], q.shape[-1])


# ----------------------------------------------------------------------------- FP8 training (wgrad)


def segment_tiles(offs: torch.Tensor, rows: int, tile: int = 128) -> tuple[torch.Tensor, int]:
    """Where each expert's first token tile lies among the tiles of the weight gradient, whose
    tiles of ``tile`` tokens never cross a segment (a segment's last tile is partial): int32 [E]
    starts (device ops only, no host sync), and the static bound ceil(rows / tile) + E on the
    number of tiles (each segment adds at most one partial tile)."""
    ends = offs.long().clamp(0, rows)
    starts = torch.minimum(torch.cat([ends.new_zeros(1), ends[:-1]]), ends)
    tiles = (ends - starts + tile - 1) // tile
    return (tiles.cumsum(0) - tiles).int(), -(-rows // tile) + offs.shape[0]


def transpose_segments(x: torch.Tensor, offs: torch.Tensor, rows: int, tile: int,
                       a_index: torch.Tensor | None = None, gather_div: int = 1) -> torch.Tensor:
    """Reference of :func:`moekernels.grouped_gemm.transpose_segments` without quantization: the
    ``rows`` sorted rows of x (row r is x[a_index[r] // gather_div] with a_index) transposed into
    tile-aligned columns [C, num_tiles * tile] of x's dtype, expert e's rows from column
    ``segment_tiles(offs)[0][e] * tile`` on; zeros past a partial tile's end and in unused tiles."""
    src = permute_rows(x, a_index, gather_div) if a_index is not None else x
    first, num_tiles = segment_tiles(offs, rows, tile)
    out = x.new_zeros(x.shape[1], num_tiles * tile)
    for e, s, t in _segments(offs, rows):
        c = int(first[e]) * tile
        out[:, c:c + t - s] = src[s:t].T
    return out


def quantize_fp8_segments(x: torch.Tensor, offs: torch.Tensor, *, tile: int = 128, pow2_scale: bool = False,
                          dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`moekernels.fp8.quantize_fp8_segments`: the rows of x [M, C] (sorted by
    expert, segments ending at offs) quantized in tiles of ``tile`` tokens x 1 channel that never
    cross a segment, and transposed into tile-aligned columns.

    Returns q [C, num_tiles * tile] float8_e4m3fn, token tile g in columns [g * tile, (g + 1) * tile)
    (``q[c, g * tile + j] = x[r, c] / scale[g, c]`` for the tile's j-th token r; zeros past a
    partial tile's end and in unused tiles), and scale [num_tiles, C] float32 (0 for unused tiles).
    Tile g of expert e is tile ``segment_tiles(offs)[0][e] + i``. Rows at or after offs[-1] belong
    to no tile.
    """
    rows, cols = x.shape
    fmax = torch.finfo(dtype).max
    first, num_tiles = segment_tiles(offs, rows, tile)
    scale = torch.zeros(num_tiles, cols, dtype=torch.float32, device=x.device)
    q = torch.zeros(cols, num_tiles * tile, dtype=torch.float32, device=x.device)
    for e, s, t in _segments(offs, rows):
        for i, r in enumerate(range(s, t, tile)):
            block = x[r:min(r + tile, t)].float()
            g = int(first[e]) + i
            scale[g] = fp8_block_scale(block.abs().amax(dim=0), pow2_scale, fmax)
            q[:, g * tile:g * tile + block.shape[0]] = (block / scale[g]).clamp(-fmax, fmax).T
    return q.to(dtype), scale


def grouped_mm_dw_fp8(a_t: torch.Tensor, a_scale: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor,
                      offs: torch.Tensor, rows: int, *, tile: int = 128,
                      out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """dw[e] = sum over expert e's token tiles g of (a_t[:, tile g] @ b_t[:, tile g]^T) * a_scale[g][:, None]
    * b_scale[g][None, :]: the fp8 weight gradient from two :func:`quantize_fp8_segments` outputs
    (a_t [K, tiles * tile], b_t [N, tiles * tile]) of ``rows`` tokens, each tile's product promoted
    to the float32 sum with its scales. [E, K, N] in out_dtype, zeros for an empty expert."""
    first, _ = segment_tiles(offs, rows, tile)
    out = torch.zeros(offs.shape[0], a_t.shape[0], b_t.shape[0], dtype=torch.float32, device=a_t.device)
    for e, s, t in _segments(offs, rows):
        for i in range(-(-(t - s) // tile)):
            g = int(first[e]) + i
            cols = slice(g * tile, (g + 1) * tile)
            part = a_t[:, cols].float() @ b_t[:, cols].float().T
            out[e] += part * a_scale[g][:, None] * b_scale[g][None, :]
    return out.to(out_dtype)
