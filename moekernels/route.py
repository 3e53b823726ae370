"""Stage 1, route: router logits -> (topk_weights, topk_ids).

Launchers (torch / triton / cuda), the ``moekernels::topk_routing`` custom op with its fake
and autograd, and the public :func:`topk_routing`.
"""

from __future__ import annotations

import math

import torch
import triton

from . import _backend, _checks, _ext, _sm90_registry, configs, reference

SCORINGS = ("softmax", "sigmoid")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# One warp holds the group scores of a token, a lane per group (csrc/route.cu).
CUDA_MAX_GROUPS = 32
CUDA_MAX_EXPERTS = 1024


def check_arguments(num_experts, top_k, scoring, renormalize, has_bias, n_group, topk_group,
                    routed_scaling_factor) -> None:
    """Validate the routing arguments other than the tensors: shared by :func:`topk_routing`
    and ``MoE.__init__``, so that a layer with impossible groups fails when it is built."""
    _checks.integer("top_k", top_k, low=1, high=num_experts)
    _checks.choice("scoring", scoring, SCORINGS)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize must be a bool, got {type(renormalize).__name__}")
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"n_group and topk_group go together; got n_group={n_group}, topk_group={topk_group}")
    if n_group is not None:
        _checks.integer("n_group", n_group, low=1, high=num_experts)
        if num_experts % n_group:
            raise ValueError(f"n_group={n_group} must divide the number of experts E={num_experts}")
        _checks.integer("topk_group", topk_group, low=1, high=n_group)
        group_size = num_experts // n_group
        if topk_group * group_size < top_k:
            raise ValueError(
                f"top_k={top_k} exceeds the experts in the eligible groups: "
                f"topk_group * E / n_group = {topk_group} * {group_size} = {topk_group * group_size}"
            )
        if has_bias and group_size < 2 and n_group > 1:
            raise ValueError(
                f"with a bias a group scores its two best experts, so E / n_group must be >= 2; "
                f"got n_group={n_group} for E={num_experts}"
            )
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise TypeError(f"routed_scaling_factor must be a float, got {type(routed_scaling_factor).__name__}")
    if not -math.inf < routed_scaling_factor < math.inf:  # math.isfinite is opaque to dynamo
        raise ValueError(f"routed_scaling_factor must be finite, got {routed_scaling_factor}")


def _check(logits, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling_factor):
    _checks.tensor("logits", logits, ndim=2, dtypes=LOGIT_DTYPES)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise ValueError(f"logits must have at least one expert column, got shape {tuple(logits.shape)}")
    if bias is not None:
        _checks.tensor("bias", bias, ndim=1, dtypes=(torch.float32,), device=logits.device)
        if bias.shape[0] != num_experts:
            raise ValueError(f"bias must have shape [E] = [{num_experts}], got {tuple(bias.shape)}")
    check_arguments(num_experts, top_k, scoring, renormalize, bias is not None, n_group, topk_group,
                    routed_scaling_factor)


def _cuda_reason(num_experts: int, n_group: int) -> str | None:
    if num_experts > CUDA_MAX_EXPERTS:
        return f"E={num_experts} > {CUDA_MAX_EXPERTS} experts"
    if n_group > CUDA_MAX_GROUPS:
        return f"n_group={n_group} > {CUDA_MAX_GROUPS} groups"
    return None


def _triton_variant(num_experts, top_k, scoring, renormalize, has_bias, n_group, topk_group, itemsize, aligned):
    """The config, constexprs and compile options of one launch: shared by the launcher and
    the sm_90 compile test, so that the test compiles exactly what ships."""
    cfg = configs.route_config(num_experts, top_k, n_group, itemsize, aligned)
    constexprs = dict(
        SOFTMAX=scoring == "softmax", HAS_BIAS=has_bias, GROUPED=n_group > 1, RENORMALIZE=renormalize,
        BLOCK_T=cfg.BLOCK_T, BLOCK_R=cfg.BLOCK_R, BLOCK_C=cfg.BLOCK_C, BLOCK_K=cfg.BLOCK_K,
        K_IN_TILE=top_k <= cfg.BLOCK_K, ROW=cfg.ROW,
        FULL=cfg.row_len == cfg.BLOCK_C and num_experts == cfg.BLOCK_R * cfg.BLOCK_C,
        KEPT=topk_group, SLOTS=triton.next_power_of_2(topk_group) if n_group > 1 else cfg.BLOCK_R,
    )
    # enable_fp_fusion=False: exp_f32 must round every step (see kernels/_math.py)
    return cfg, constexprs, dict(num_warps=cfg.num_warps, enable_fp_fusion=False)


def _launch_triton(logits, top_k, scoring, renormalize, bias, n_group, topk_group, scale, weights, ids):
    from .kernels._route import topk_routing_kernel

    num_tokens, num_experts = logits.shape
    # What Triton specialises the launch on (16-byte pointer, multiples of 16): configs.route_config
    aligned = logits.data_ptr() % 16 == 0 and logits.stride(0) % 16 == 0 and num_experts % 16 == 0
    cfg, constexprs, options = _triton_variant(num_experts, top_k, scoring, renormalize, bias is not None, n_group,
                                               topk_group, logits.element_size(), aligned)
    topk_routing_kernel[(triton.cdiv(num_tokens, cfg.BLOCK_T),)](
        logits, bias if bias is not None else logits, weights, ids,
        num_tokens, num_experts, logits.stride(0), top_k, n_group, cfg.row_len, topk_group, scale,
        reference.denominator_scale(num_experts), **constexprs, **options,
    )


def _launch_cuda(logits, top_k, scoring, renormalize, bias, n_group, topk_group, scale, weights, ids):
    num_tokens, num_experts = logits.shape
    _ext.C.topk_routing(
        logits.data_ptr(), _ext.dtype_code(logits.dtype),
        bias.data_ptr() if bias is not None else 0, weights.data_ptr(), ids.data_ptr(),
        num_tokens, num_experts, logits.stride(0), top_k, scoring == "softmax", renormalize,
        n_group, topk_group, scale, _ext.stream(logits),
    )


@torch.library.custom_op("moekernels::topk_routing", mutates_args=())
def _topk_routing_op(
    logits: torch.Tensor,
    top_k: int,
    scoring: str,
    renormalize: bool,
    bias: torch.Tensor | None,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, num_experts = logits.shape
    name = _backend.choose(
        "topk_routing", logits.device, backend or None, cuda_reason=_cuda_reason(num_experts, n_group)
    )
    if name == "torch":
        return reference.topk_routing(
            logits, top_k, scoring=scoring, renormalize=renormalize, bias=bias,
            n_group=n_group, topk_group=topk_group, routed_scaling_factor=routed_scaling_factor,
        )
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens == 0:
        return weights, ids
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    bias = bias.contiguous() if bias is not None else None
    launch = _launch_triton if name == "triton" else _launch_cuda
    with _backend.device_guard(logits):  # both launchers use the current device
        launch(logits, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling_factor, weights, ids)
    return weights, ids


@_topk_routing_op.register_fake
def _(logits, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling_factor, backend):
    num_tokens = logits.shape[0]
    return (
        logits.new_empty(num_tokens, top_k, dtype=torch.float32),
        logits.new_empty(num_tokens, top_k, dtype=torch.int32),
    )


def _setup_context(ctx, inputs, output):
    logits, _, scoring, renormalize, _, _, _, routed_scaling_factor, _ = inputs
    ctx.save_for_backward(logits, output[1])
    ctx.scoring, ctx.renormalize, ctx.scale = scoring, renormalize, routed_scaling_factor
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_weights, _grad_ids):
    """d topk_weights / d logits. The choice (bias, groups, top-k) is piecewise constant and
    carries no gradient; the weights are scores gathered at the ids, renormalised, scaled."""
    logits, ids = ctx.saved_tensors
    x = reference.sanitize_logits(logits.float())  # the logits the forward scored
    scores = torch.softmax(x, dim=-1) if ctx.scoring == "softmax" else torch.sigmoid(x)
    ids = ids.long()
    g = grad_weights.float() * ctx.scale
    if ctx.renormalize:
        picked = scores.gather(1, ids)
        total = picked.sum(dim=-1, keepdim=True) + reference.RENORM_EPS
        g = g / total - (g * picked).sum(dim=-1, keepdim=True) / (total * total)
    grad_scores = torch.zeros_like(scores).scatter_add_(1, ids, g)
    if ctx.scoring == "softmax":
        grad_x = scores * (grad_scores - (grad_scores * scores).sum(dim=-1, keepdim=True))
    else:
        grad_x = grad_scores * scores * (1.0 - scores)
    # A NaN or -inf logit scores 0 whatever its value: no gradient (not the 0 * NaN of a row
    # with no softmax). +inf, read as FLT_MAX, gets the exact derivative there (0 in sigmoid).
    grad_x = grad_x.masked_fill(x == float("-inf"), 0.0)
    return grad_x.to(logits.dtype), None, None, None, None, None, None, None, None


_topk_routing_op.register_autograd(_backward, setup_context=_setup_context)


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
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``top_k`` experts per token and their weights, in one fused kernel.

    Args:
        logits: [T, E] float32, bfloat16 or float16 router logits.
        top_k: experts per token, 1 <= top_k <= E.
        scoring: ``"softmax"`` or ``"sigmoid"``; ``scores = scoring(logits.float())``.
        renormalize: divide the chosen scores by (their sum + 1e-20).
        bias: [E] float32 correction bias (DeepSeek-V3), added to the scores to choose experts
            only; the weights stay unbiased.
        n_group, topk_group: group-limited routing. The E experts form ``n_group`` equal groups;
            a group scores its best choice (no bias: DeepSeek-V2) or the sum of its two best
            (with bias: DeepSeek-V3); only the ``topk_group`` best groups stay eligible.
        routed_scaling_factor: multiplies the final weights.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic; see
            ``moekernels._backend``).

    Returns:
        ``topk_weights`` float32 [T, top_k], differentiable with respect to ``logits``, and
        ``topk_ids`` int32 [T, top_k], in descending order of choice, ties to the lower id.
        Ids are bit-identical across backends (see ``moekernels.reference``).

    Non-finite logits, the same on every backend: NaN counts as -inf (never chosen over a
    larger logit, ties with -inf to the lower id, weight 0, gradient 0) and +inf as the largest
    float32 (softmax gives the +inf experts the whole weight, equally; sigmoid gives them 1).
    Weights are NaN only in a softmax row with no logit above -inf (all NaN / -inf: 0 / 0);
    such a row takes the lowest eligible ids, and in sigmoid weighs 0 (the bias, if any,
    chooses). A row with a logit above -inf gets finite weights and a finite gradient.
    """
    _check(logits, top_k, scoring, renormalize, bias, n_group, topk_group, routed_scaling_factor)
    return _topk_routing_op(
        logits, top_k, scoring, renormalize, bias,
        n_group or 1, topk_group or 1, float(routed_scaling_factor), backend or "",
    )


# ----------------------------------------------------------------------------- router losses

LOSS_DTYPES = LOGIT_DTYPES + (torch.float64,)


def _loss_constexprs(num_experts, acc, balance):
    """One loss launch's constexprs and options: shared by the launcher and the sm_90 test."""
    import triton.language as tl

    cfg = configs.loss_config(num_experts)
    cx = dict(ACC=tl.float64 if acc == torch.float64 else tl.float32, BALANCE=balance,
              BLOCK_T=cfg.BLOCK_T, BLOCK_E=cfg.BLOCK_E)
    return cx, dict(num_warps=cfg.num_warps)


def _launch_loss(logits, topk_ids, balance):
    """Partial sums from kernels/_route.py's router_loss_kernel, summed by torch in a fixed order."""
    from .kernels._route import router_loss_kernel

    num_tokens, num_experts = logits.shape
    acc = reference.acc_dtype(logits.dtype)
    cx, opts = _loss_constexprs(num_experts, acc, balance)
    programs = triton.cdiv(num_tokens, cx["BLOCK_T"])
    prob_sum = logits.new_empty(programs, cx["BLOCK_E"], dtype=acc)
    counts = logits.new_empty(programs, cx["BLOCK_E"], dtype=torch.int32)
    z = logits.new_empty(programs, dtype=acc)
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    with _backend.device_guard(logits):
        router_loss_kernel[(programs,)](
            logits, topk_ids.contiguous() if balance else logits, prob_sum, counts, z,
            num_tokens, num_experts, topk_ids.shape[1] if balance else 0, logits.stride(0), **cx, **opts,
        )
    if balance:
        return prob_sum.sum(0)[:num_experts], counts.sum(0)[:num_experts].to(acc)
    return z.sum()


@torch.library.custom_op("moekernels::load_balancing_loss", mutates_args=())
def _load_balancing_loss_op(
    logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, backend: str
) -> torch.Tensor:
    _checks.ids_in_range("topk_ids", topk_ids, num_experts)
    name = _backend.choose("load_balancing_loss", logits.device, backend or None,
                           cuda_reason=_backend.NO_CUDA_KERNEL)
    if name == "torch" or logits.shape[0] == 0:
        return reference.load_balancing_loss(logits, topk_ids, num_experts)
    prob_sum, counts = _launch_loss(logits, topk_ids, True)
    num_tokens = logits.shape[0]
    return num_experts * (counts / num_tokens * (prob_sum / num_tokens)).sum()


@_load_balancing_loss_op.register_fake
def _(logits, topk_ids, num_experts, backend):
    return logits.new_empty((), dtype=reference.acc_dtype(logits.dtype))


def _balance_setup(ctx, inputs, output):
    logits, topk_ids, num_experts, _ = inputs
    ctx.save_for_backward(logits, topk_ids)
    ctx.num_experts = num_experts


def _balance_backward(ctx, grad):
    """L = E / T**2 * sum_e c_e * sum_t p_te, so dL/dp_te = E c_e / T**2, through the softmax."""
    logits, topk_ids = ctx.saved_tensors
    acc = reference.acc_dtype(logits.dtype)
    p = torch.softmax(logits.to(acc), dim=-1)
    num_tokens = max(logits.shape[0], 1)
    counts = reference.pair_counts(topk_ids, ctx.num_experts, acc)
    grad_p = grad * ctx.num_experts / (num_tokens * num_tokens) * counts
    grad_x = p * (grad_p - (p * grad_p).sum(dim=-1, keepdim=True))
    return grad_x.to(logits.dtype), None, None, None


_load_balancing_loss_op.register_autograd(_balance_backward, setup_context=_balance_setup)


@torch.library.custom_op("moekernels::router_z_loss", mutates_args=())
def _router_z_loss_op(logits: torch.Tensor, backend: str) -> torch.Tensor:
    name = _backend.choose("router_z_loss", logits.device, backend or None, cuda_reason=_backend.NO_CUDA_KERNEL)
    if name == "torch" or logits.shape[0] == 0:
        return reference.router_z_loss(logits)
    return _launch_loss(logits, None, False) / logits.shape[0]


@_router_z_loss_op.register_fake
def _(logits, backend):
    return logits.new_empty((), dtype=reference.acc_dtype(logits.dtype))


def _z_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _z_backward(ctx, grad):
    """L = mean_t lse_t**2, so dL/dx_t = 2 lse_t softmax(x_t) / T."""
    (logits,) = ctx.saved_tensors
    x = logits.to(reference.acc_dtype(logits.dtype))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    grad_x = grad * 2.0 / max(logits.shape[0], 1) * lse * torch.softmax(x, dim=-1)
    return grad_x.to(logits.dtype), None


_router_z_loss_op.register_autograd(_z_backward, setup_context=_z_setup)


def load_balancing_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, *,
                        backend: str | None = None) -> torch.Tensor:
    """The auxiliary load-balancing loss of Switch / Mixtral: ``E * sum_e (c_e / T) * P_e``.

    Args:
        logits: [T, E] router logits, float32, bfloat16, float16 or float64.
        topk_ids: [T, k] int32 or int64 chosen experts. c_e counts the (token, slot) pairs
            routed to e; an id outside [0, E) raises on CPU and counts for none on CUDA.
        num_experts: E, which must equal ``logits.shape[1]``.
        backend: ``"torch"``, ``"triton"`` or None (automatic).

    Returns:
        A float32 scalar (float64 for float64 logits), differentiable with respect to logits;
        P_e is the mean over tokens of ``softmax(logits)[:, e]``. It equals transformers'
        ``load_balancing_loss_func`` without an attention mask. No tokens give 0.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=LOSS_DTYPES)
    _checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=logits.device)
    _checks.integer("num_experts", num_experts, low=1)
    if logits.shape[1] != num_experts:
        raise ValueError(f"num_experts={num_experts} but logits has {logits.shape[1]} expert columns")
    if topk_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens but logits has {logits.shape[0]}")
    return _load_balancing_loss_op(logits, topk_ids, num_experts, backend or "")


def router_z_loss(logits: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """The router z-loss of ST-MoE: the mean over tokens of ``logsumexp(logits)**2``.

    Args:
        logits: [T, E] router logits, float32, bfloat16, float16 or float64.
        backend: ``"torch"``, ``"triton"`` or None (automatic).

    Returns:
        A float32 scalar (float64 for float64 logits), differentiable; no tokens give 0.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=LOSS_DTYPES)
    return _router_z_loss_op(logits, backend or "")


# ----------------------------------------------------------------------------- DeepSeek-V3 balancing


@torch.library.custom_op("moekernels::sequence_balance_loss", mutates_args=())
def _sequence_balance_loss_op(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, seq_len: int,
                              scoring: str) -> torch.Tensor:
    # [T, E] elementwise work and a scatter of T*k counts: torch on every device, no kernel.
    _checks.ids_in_range("topk_ids", topk_ids, num_experts)
    return reference.sequence_balance_loss(logits, topk_ids, num_experts, seq_len, scoring)


@_sequence_balance_loss_op.register_fake
def _(logits, topk_ids, num_experts, seq_len, scoring):
    return logits.new_empty((), dtype=reference.acc_dtype(logits.dtype))


def _seq_balance_setup(ctx, inputs, output):
    logits, topk_ids, num_experts, seq_len, scoring = inputs
    ctx.save_for_backward(logits, topk_ids)
    ctx.num_experts, ctx.seq_len, ctx.scoring = num_experts, seq_len, scoring


def _seq_balance_backward(ctx, grad):
    """L = E / (k S^2 B) * sum_b sum_e c_be * sum_(t in b) s'_te, so dL/ds'_te = E c_be / (k S^2 B)
    for t in sequence b, then through the normalization s' = s / sum s (sigmoid) and the score."""
    logits, topk_ids = ctx.saved_tensors
    num_experts, seq_len = ctx.num_experts, ctx.seq_len
    num_tokens, top_k = topk_ids.shape
    num_seqs = num_tokens // seq_len
    x = logits.to(reference.acc_dtype(logits.dtype))
    counts = reference.sequence_pair_counts(topk_ids, num_experts, seq_len, x.dtype).unsqueeze(1)
    g = grad * num_experts / (top_k * seq_len * seq_len * max(num_seqs, 1)) * counts
    g = g.expand(num_seqs, seq_len, num_experts).reshape(num_tokens, num_experts)
    if ctx.scoring == "softmax":
        p = torch.softmax(x, dim=-1)
        grad_x = p * (g - (p * g).sum(dim=-1, keepdim=True))
    else:
        s = torch.sigmoid(x)
        total = s.sum(dim=-1, keepdim=True) + reference.RENORM_EPS
        grad_s = g / total - (g * s).sum(dim=-1, keepdim=True) / (total * total)
        grad_x = grad_s * s * (1.0 - s)
    return grad_x.to(logits.dtype), None, None, None, None


_sequence_balance_loss_op.register_autograd(_seq_balance_backward, setup_context=_seq_balance_setup)


def sequence_balance_loss(logits: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, seq_len: int, *,
                          scoring: str = "softmax") -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (tech report, eq. 17-20), alpha left out.

    For each sequence of S = ``seq_len`` tokens: ``sum_e f_e * P_e`` with
    ``f_e = E / (k S) * (pairs of the sequence routed to e)`` and ``P_e`` the sequence's mean of
    the scores normalized per token (``softmax(logits)``, or ``sigmoid(logits)`` divided by its
    sum over the experts); the loss is the mean over the sequences. It is Megatron-LM's
    ``sequence_load_balancing_loss_func`` (megatron/core/transformer/moe/moe_utils.py), whose
    ``compute_routing_scores_for_aux_loss`` normalizes sigmoid scores the same way, and the
    ``seq_aux`` loss of DeepSeek-V2's modeling code. 1.0 for perfectly balanced routing; the
    report's alpha (1e-4 for DeepSeek-V3) is the caller's coefficient.

    Args:
        logits: [B * S, E] router logits, sequence-major (token b * S + s), float32, bfloat16,
            float16 or float64.
        topk_ids: [B * S, k] int32 or int64 experts. The report counts the top-k of the scores
            without the correction bias or the group limit (Megatron too): pass those ids
            (``logits.topk(k).indices``) for a biased or grouped router. An id outside [0, E)
            raises on CPU and counts for none on CUDA.
        num_experts: E, which must equal ``logits.shape[1]``.
        seq_len: S, which must divide the token count.
        scoring: ``"softmax"`` or ``"sigmoid"``, the router's score function.

    Returns:
        A float32 scalar (float64 for float64 logits), differentiable with respect to logits;
        no tokens give 0. Torch ops on every backend.
    """
    _checks.tensor("logits", logits, ndim=2, dtypes=LOSS_DTYPES)
    _checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=(torch.int32, torch.int64), device=logits.device)
    _checks.integer("num_experts", num_experts, low=1)
    _checks.integer("seq_len", seq_len, low=1)
    _checks.choice("scoring", scoring, SCORINGS)
    if logits.shape[1] != num_experts:
        raise ValueError(f"num_experts={num_experts} but logits has {logits.shape[1]} expert columns")
    if topk_ids.shape[0] != logits.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} tokens but logits has {logits.shape[0]}")
    if logits.shape[0] % seq_len:
        raise ValueError(f"seq_len={seq_len} must divide the {logits.shape[0]} tokens (B sequences of seq_len)")
    return _sequence_balance_loss_op(logits, topk_ids, num_experts, seq_len, scoring)


@torch.library.custom_op("moekernels::update_correction_bias", mutates_args=("bias",))
def _update_correction_bias_op(bias: torch.Tensor, expert_counts: torch.Tensor, rate: float) -> None:
    bias.copy_(reference.update_correction_bias(bias, expert_counts, rate))


@_update_correction_bias_op.register_fake
def _(bias, expert_counts, rate):
    return None


def update_correction_bias(bias: torch.Tensor, expert_counts: torch.Tensor, rate: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free load balancing: ``b_e += rate * sign(mean load - load_e)``
    in place, so an overloaded expert's bias falls by ``rate`` and an underloaded one's rises (an
    expert at exactly the mean keeps its bias). DeepSeek-V3 applies it at the end of every step
    with rate 1e-3 (0 for its last 500B tokens).

    Args:
        bias: [E] float32 correction bias (``MoE.e_score_correction_bias``), updated in place.
        expert_counts: [E] the tokens (or token-slot pairs) each expert received over the step,
            any integer or floating dtype, on bias's device.
        rate: the update speed gamma, a finite float >= 0.

    Device ops only, no host sync: it captures in CUDA graphs and traces under
    ``torch.compile(fullgraph=True)``; no gradient flows through it.
    """
    _checks.tensor("bias", bias, ndim=1, dtypes=(torch.float32,))
    _checks.tensor("expert_counts", expert_counts, ndim=1, device=bias.device)
    if expert_counts.shape != bias.shape:
        raise ValueError(f"expert_counts must have bias's shape {tuple(bias.shape)}, got {tuple(expert_counts.shape)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(f"rate must be a float, got {type(rate).__name__}")
    if not 0 <= rate < math.inf:
        raise ValueError(f"rate must be finite and >= 0, got {rate}")
    with torch.no_grad():
        _update_correction_bias_op(bias, expert_counts, float(rate))


# The routers of the models the library targets, plus the extremes of the supported range:
# every Triton variant they need is compiled for sm_90 by the test suite (moekernels/_sm90.py).
SM90_ROUTERS = {
    "mixtral_e8_k2": dict(dtype=torch.bfloat16, num_experts=8, top_k=2, scoring="softmax", renormalize=True),
    "qwen3_e128_k8": dict(dtype=torch.bfloat16, num_experts=128, top_k=8, scoring="softmax", renormalize=True),
    "gptoss_e128_k4": dict(dtype=torch.float32, num_experts=128, top_k=4, scoring="softmax", renormalize=True),
    "deepseek_v2_e160_k6_g8_3": dict(
        dtype=torch.float32, num_experts=160, top_k=6, scoring="softmax", n_group=8, topk_group=3
    ),
    "deepseek_v3_e256_k8_g8_4_bias": dict(
        dtype=torch.float32, num_experts=256, top_k=8, scoring="sigmoid", renormalize=True, bias=True,
        n_group=8, topk_group=4,
    ),
    "qwen15_e60_k4_odd": dict(dtype=torch.bfloat16, num_experts=60, top_k=4, scoring="softmax"),
    "sigmoid_e96_k32_g3_1_bias": dict(
        dtype=torch.float16, num_experts=96, top_k=32, scoring="sigmoid", bias=True, n_group=3, topk_group=1
    ),
    "sigmoid_e1024_k16_fp16": dict(dtype=torch.float16, num_experts=1024, top_k=16, scoring="sigmoid"),
    "softmax_e1024_k1024_bias": dict(
        dtype=torch.float32, num_experts=1024, top_k=1024, scoring="softmax", bias=True, renormalize=True
    ),
}

# (E, logits dtype) of the router losses compiled for sm_90: both losses each.
SM90_LOSSES = {"mixtral_e8": (8, torch.bfloat16), "qwen3_e128": (128, torch.float32),
               "deepseek_v3_e256": (256, torch.float32), "e1024": (1024, torch.bfloat16)}


@_sm90_registry.register
def sm90_variants(capability: int = 90):  # routing tiles are the same on every architecture
    from ._sm90 import ROUTE_TRITON_DSV3, Variant, ptr, signature
    from .kernels._route import router_loss_kernel, topk_routing_kernel

    out = []
    for name, r in SM90_ROUTERS.items():
        _, constexprs, options = _triton_variant(
            r["num_experts"], r["top_k"], r["scoring"], r.get("renormalize", False), r.get("bias", False),
            r.get("n_group", 1), r.get("topk_group", 1), r["dtype"].itemsize, r["num_experts"] % 16 == 0,
        )
        sig = signature(topk_routing_kernel, constexprs, logits_ptr=ptr(r["dtype"]), bias_ptr="*fp32",
                        weights_ptr="*fp32", ids_ptr="*i32", routed_scaling_factor="fp32", denom_scale="fp32")
        # As a launch on contiguous logits specialises them: 16-byte aligned tensors, and the
        # row stride (E) when a multiple of 16; what the 16-byte loads of ROW rows depend on.
        aligned = ("logits_ptr", "bias_ptr", "weights_ptr", "ids_ptr")
        if r["num_experts"] % 16 == 0:
            aligned += ("num_experts", "stride_t")
        out.append(Variant(f"topk_routing/{name}", topk_routing_kernel, sig, constexprs, options, aligned=aligned,
                           per_token=ROUTE_TRITON_DSV3 if name == ROUTE_TRITON_DSV3["router"] else None))
    for name, (num_experts, dtype) in SM90_LOSSES.items():
        for balance in (True, False):
            cx, opts = _loss_constexprs(num_experts, torch.float32, balance)
            sig = signature(router_loss_kernel, cx, logits_ptr=ptr(dtype), ids_ptr="*i32",
                            prob_sum_ptr="*fp32", count_ptr="*i32", z_ptr="*fp32")
            label = "load_balancing_loss" if balance else "router_z_loss"
            out.append(Variant(f"{label}/{name}", router_loss_kernel, sig, cx, opts))
    return out
