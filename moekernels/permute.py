"""Stage 3, permute and combine: token order [T, H] <-> expert-sorted order [T*k, H].

``permute`` copies each token's row to the k sorted rows of its pairs; ``unpermute`` brings
them back, weighted by the router and summed over k (the combine). Custom ops with fakes and
autograd, on three backends (torch, triton: kernels/_permute.py, cuda: csrc/permute.cu); the
backward of each is the other's kernel:
    permute:   grad_x[t] = sum_j grad[dest[t*k + j]]                 (an unweighted combine)
    unpermute: grad_y_sorted[dest[t*k + j]] = w[t, j] * grad_y[t],
               grad_w[t, j] = <grad_y[t], y_sorted[dest[t*k + j]]>    (a weighted scatter + dot)
Every output element has one writer and every sum runs in a fixed order: deterministic, with
no atomics. Sums are in float32 (float64 for float64 inputs).
"""

from __future__ import annotations


import torch
import triton

from . import _backend, _checks, _ext, _sm90_registry, configs, reference
from .grouped_gemm import fp8_bytes
from .plan import RoutingPlan

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# fp8 rows are moved, never summed: permute takes them (quantize, then gather), unpermute does not.
PAYLOAD_DTYPES = FLOAT_DTYPES + (torch.float8_e4m3fn,)
# csrc/permute.cu stages a token's k sorted rows in shared memory, and sums 16-bit and
# float32 payloads with float32 router weights.
CUDA_MAX_TOP_K = 64
CUDA_SUM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _constexprs(kernel: str, hidden: int, dtype: torch.dtype, top_k: int, flag: bool) -> tuple[dict, dict]:
    """One launch's constexprs and options, for ``"scatter"`` (flag: BACKWARD) or ``"combine"``
    (flag: WEIGHTED): shared by the launchers and the sm_90 compile test."""
    import triton.language as tl

    cfg = configs.rows_config(hidden, dtype.itemsize)
    acc = tl.float64 if dtype == torch.float64 else tl.float32  # dtype: the summed rows' (y_sorted)
    cx = dict(ACC=acc, BLOCK_T=cfg.BLOCK_T, BLOCK_H=cfg.BLOCK_H)
    if kernel == "scatter":
        cx.update(BACKWARD=flag, BLOCK_K=triton.next_power_of_2(top_k))
        if flag:  # two rows in and one out per step: 4 tokens took 168 registers and spilled (bf16)
            cx["BLOCK_T"] = max(1, cfg.BLOCK_T // 2)
    else:
        cx.update(WEIGHTED=flag)
    return cx, dict(num_warps=cfg.num_warps)


def _h_span(hidden: int, block_h: int, *, whole: bool) -> int:
    """Columns per program: one BLOCK_H tile, or every tile (a multiple of BLOCK_H, so that the
    tiles of a program stay 16-byte aligned)."""
    return triton.cdiv(hidden, block_h) * block_h if whole else block_h


def _cuda_reason(top_k, summed=None, weights=None):
    """Why csrc/permute.cu cannot take a call, or None. ``summed``: the dtype of the rows it sums."""
    if top_k > CUDA_MAX_TOP_K:
        return f"top_k={top_k} > {CUDA_MAX_TOP_K}"
    if summed is not None and summed not in CUDA_SUM_DTYPES:
        return f"{summed} rows are summed by the triton backend only"
    if weights is not None and weights != torch.float32:
        return f"{weights} topk_weights need the triton backend (cuda takes float32)"
    return None


def _choose(op, tensor, backend, reason):
    return _backend.choose(op, tensor.device, backend or None, cuda_reason=reason)


def _rows(x):
    """A [rows, H] tensor the kernels can address: unit column stride."""
    return x if x.stride(1) == 1 else x.contiguous()


def _moved(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scatter kernel moves rows as: e4m3 rows as their bytes (permute only moves
    them), which every architecture loads and stores (Triton 3.6 has no fp8e4nv on sm_80 and sm_86)."""
    return torch.uint8 if dtype == torch.float8_e4m3fn else dtype


def _launch_scatter(x, dest_index, top_k, out, *, backward=None):
    from .kernels._permute import scatter_rows_kernel

    num_tokens, hidden = x.shape
    if backward is None:
        x, out = x.view(_moved(x.dtype)), out.view(_moved(out.dtype))
        y, weights, offsets, grad_w, num_experts = out, out, dest_index, out, 1
    else:
        y, weights, offsets, grad_w = backward
        num_experts = offsets.numel()
    cx, opts = _constexprs("scatter", hidden, y.dtype, top_k, backward is not None)
    h_span = _h_span(hidden, cx["BLOCK_H"], whole=backward is not None)  # the backward sums a dot over H
    with _backend.device_guard(x):
        scatter_rows_kernel[(triton.cdiv(num_tokens, cx["BLOCK_T"]), triton.cdiv(hidden, h_span))](
            x, dest_index, weights, y, out, grad_w, offsets,
            num_tokens, hidden, h_span, top_k, num_experts, x.stride(0), y.stride(0), out.stride(0), **cx, **opts,
        )


def _launch_combine(y_sorted, dest_index, top_k, out, weights=None, offsets=None):
    from .kernels._permute import combine_rows_kernel

    num_tokens, hidden = out.shape
    weighted = weights is not None
    cx, opts = _constexprs("combine", hidden, y_sorted.dtype, top_k, weighted)
    h_span = _h_span(hidden, cx["BLOCK_H"], whole=False)
    with _backend.device_guard(y_sorted):
        combine_rows_kernel[(triton.cdiv(num_tokens, cx["BLOCK_T"]), triton.cdiv(hidden, h_span))](
            y_sorted, dest_index, weights if weighted else y_sorted, offsets if weighted else dest_index, out,
            num_tokens, hidden, h_span, top_k, offsets.numel() if weighted else 1, y_sorted.stride(0),
            out.stride(0), **cx, **opts,
        )


# ----------------------------------------------------------------------------- permute


@torch.library.custom_op("moekernels::permute", mutates_args=())
def _permute_op(
    x: torch.Tensor, source_index: torch.Tensor, dest_index: torch.Tensor, top_k: int, backend: str
) -> torch.Tensor:
    name = _choose("permute", x, backend, _cuda_reason(top_k))
    if name == "torch":
        return reference.permute_rows(x, source_index, top_k)
    out = x.new_empty(source_index.numel(), x.shape[1])
    if not out.numel():
        return out
    x = _rows(x)
    if name == "cuda":
        with _backend.device_guard(x):
            _ext.C.permute(x.data_ptr(), x.element_size(), dest_index.data_ptr(), out.data_ptr(), x.shape[0], top_k,
                           x.shape[1], x.stride(0), _ext.stream(x))
    else:  # e4m3 rows move as their bytes where Triton cannot name the type (sm_80, sm_86)
        _launch_scatter(fp8_bytes(x), dest_index, top_k, fp8_bytes(out))
    return out


@_permute_op.register_fake
def _(x, source_index, dest_index, top_k, backend):
    return x.new_empty(source_index.shape[0], x.shape[1])


@torch.library.custom_op("moekernels::permute_backward", mutates_args=())
def permute_backward_op(grad: torch.Tensor, dest_index: torch.Tensor, top_k: int, backend: str) -> torch.Tensor:
    """grad_x[t] = sum_j grad[dest[t*k + j]], over every pair (dropped ones too: permute copied them)."""
    name = _choose("permute", grad, backend, _cuda_reason(top_k, grad.dtype))
    if name == "torch":
        return reference.combine_rows(grad, dest_index, top_k)
    out = grad.new_empty(dest_index.numel() // top_k, grad.shape[1])
    if not out.numel():
        return out
    grad = _rows(grad)
    if name == "cuda":
        with _backend.device_guard(grad):
            _ext.C.permute_backward(grad.data_ptr(), _ext.dtype_code(grad.dtype), dest_index.data_ptr(), out.data_ptr(),
                                    out.shape[0], top_k, out.shape[1], grad.stride(0), out.stride(0), _ext.stream(grad))
    else:
        _launch_combine(grad, dest_index, top_k, out)
    return out


@permute_backward_op.register_fake
def _(grad, dest_index, top_k, backend):
    return grad.new_empty(dest_index.shape[0] // top_k, grad.shape[1])


def _permute_setup(ctx, inputs, output):
    _, _, dest_index, top_k, backend = inputs
    ctx.save_for_backward(dest_index)
    ctx.top_k, ctx.backend = top_k, backend


def _permute_backward(ctx, grad):
    (dest_index,) = ctx.saved_tensors
    return permute_backward_op(grad, dest_index, ctx.top_k, ctx.backend), None, None, None, None


_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


# ----------------------------------------------------------------------------- unpermute


@torch.library.custom_op("moekernels::unpermute", mutates_args=())
def _unpermute_op(
    y_sorted: torch.Tensor, dest_index: torch.Tensor, expert_offsets: torch.Tensor, topk_weights: torch.Tensor,
    backend: str,
) -> torch.Tensor:
    num_tokens, top_k = topk_weights.shape
    name = _choose("unpermute", y_sorted, backend, _cuda_reason(top_k, y_sorted.dtype, topk_weights.dtype))
    if name == "torch":
        return reference.combine_rows(y_sorted, dest_index, top_k, topk_weights, expert_offsets[-1])
    out = y_sorted.new_empty(num_tokens, y_sorted.shape[1])
    if not out.numel():
        return out
    y_sorted, topk_weights = _rows(y_sorted), topk_weights.contiguous()
    if name == "cuda":
        with _backend.device_guard(y_sorted):
            _ext.C.unpermute(y_sorted.data_ptr(), _ext.dtype_code(y_sorted.dtype), dest_index.data_ptr(),
                             topk_weights.data_ptr(), expert_offsets.data_ptr(), expert_offsets.numel(),
                             out.data_ptr(), num_tokens, top_k, out.shape[1], y_sorted.stride(0), out.stride(0),
                             _ext.stream(y_sorted))
    else:
        _launch_combine(y_sorted, dest_index, top_k, out, topk_weights, expert_offsets)
    return out


@_unpermute_op.register_fake
def _(y_sorted, dest_index, expert_offsets, topk_weights, backend):
    return y_sorted.new_empty(topk_weights.shape[0], y_sorted.shape[1])


@torch.library.custom_op("moekernels::unpermute_backward", mutates_args=())
def _unpermute_backward_op(
    grad_y: torch.Tensor, y_sorted: torch.Tensor, dest_index: torch.Tensor, expert_offsets: torch.Tensor,
    topk_weights: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    num_tokens, top_k = topk_weights.shape
    name = _choose("unpermute", y_sorted, backend, _cuda_reason(top_k, y_sorted.dtype, topk_weights.dtype))
    if name == "torch":
        return reference.unpermute_backward(grad_y, y_sorted, dest_index, expert_offsets[-1], topk_weights)
    # Row-major, whatever the inputs' strides: the kernels write with unit column stride (and
    # empty_like would keep a transposed y_sorted's or topk_weights' layout).
    grad_sorted, grad_w = _new_grads(y_sorted, topk_weights)
    if not grad_w.numel():
        return grad_sorted, grad_w
    grad_y, y_sorted, topk_weights = _rows(grad_y), _rows(y_sorted), topk_weights.contiguous()
    if name == "cuda":
        with _backend.device_guard(y_sorted):
            _ext.C.unpermute_backward(
                grad_y.data_ptr(), y_sorted.data_ptr(), _ext.dtype_code(y_sorted.dtype), dest_index.data_ptr(),
                topk_weights.data_ptr(), expert_offsets.data_ptr(), expert_offsets.numel(), grad_sorted.data_ptr(),
                grad_w.data_ptr(), num_tokens, top_k, y_sorted.shape[1], grad_y.stride(0), y_sorted.stride(0),
                grad_sorted.stride(0), _ext.stream(y_sorted))
    else:
        _launch_scatter(grad_y, dest_index, top_k, grad_sorted,
                        backward=(y_sorted, topk_weights, expert_offsets, grad_w))
    return grad_sorted, grad_w


@_unpermute_backward_op.register_fake
def _(grad_y, y_sorted, dest_index, expert_offsets, topk_weights, backend):
    return _new_grads(y_sorted, topk_weights)


def _new_grads(y_sorted, topk_weights):
    return y_sorted.new_empty(y_sorted.shape), topk_weights.new_empty(topk_weights.shape)


def _unpermute_setup(ctx, inputs, output):
    y_sorted, dest_index, expert_offsets, topk_weights, backend = inputs
    ctx.save_for_backward(y_sorted, dest_index, expert_offsets, topk_weights)
    ctx.backend = backend


def _unpermute_backward(ctx, grad_y):
    y_sorted, dest_index, expert_offsets, topk_weights = ctx.saved_tensors
    grad_sorted, grad_w = _unpermute_backward_op(grad_y, y_sorted, dest_index, expert_offsets, topk_weights,
                                                 ctx.backend)
    return grad_sorted, None, None, grad_w, None


_unpermute_op.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ----------------------------------------------------------------------------- public


def _check_plan(plan, device, name, rows, per_token):
    """plan must be a RoutingPlan on ``device`` whose T*k pairs match the ``rows`` of ``name``
    (its tokens when ``per_token``: x of permute has T rows, y_sorted of unpermute T*k)."""
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a moekernels.RoutingPlan, got {type(plan).__name__}")
    if plan.dest_index.device != device:
        raise ValueError(f"plan is on {plan.dest_index.device} but {name} is on {device}")
    pairs = rows * plan.top_k if per_token else rows
    if plan.dest_index.shape[0] != pairs:
        raise ValueError(
            f"plan has {plan.dest_index.shape[0]} pairs (T*k) but {name} has {rows} rows, which make {pairs}"
        )


def permute(x: torch.Tensor, plan: RoutingPlan, *, backend: str | None = None) -> torch.Tensor:
    """Copy token rows into expert-sorted order: row r of the result is ``x[source_index[r] // k]``.

    Args:
        x: [T, H] float32, bfloat16, float16, float64 or float8_e4m3fn (not differentiable).
        plan: from :func:`moekernels.plan_routing` on the [T, k] ids of these T tokens.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (automatic).

    Returns:
        [T*k, H] in x's dtype, sorted by expert: expert e's rows are
        ``expert_offsets[e-1]:expert_offsets[e]``. Differentiable with respect to x.
    """
    _checks.tensor("x", x, ndim=2, dtypes=PAYLOAD_DTYPES)
    _check_plan(plan, x.device, "x", x.shape[0], per_token=True)
    return _permute_op(x, plan.source_index, plan.dest_index, plan.top_k, backend or "")


def unpermute(y_sorted: torch.Tensor, plan: RoutingPlan, topk_weights: torch.Tensor, *,
              backend: str | None = None) -> torch.Tensor:
    """The weighted combine: ``y[t] = sum_j topk_weights[t, j] * y_sorted[dest_index[t*k + j]]``.

    Args:
        y_sorted: [T*k, H] float32, bfloat16, float16 or float64 rows in expert-sorted order.
        plan: the plan that sorted them.
        topk_weights: [T, k] float32, bfloat16, float16 or float64 router weights.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` (float32 weights, float32 / bfloat16 /
            float16 rows, k <= 64) or None (automatic).

    Returns:
        [T, H] in y_sorted's dtype, summed over j = 0..k-1 in float32 (float64 for float64), in
        a fixed order: deterministic. Dropped pairs contribute nothing. Differentiable with
        respect to y_sorted and topk_weights.
    """
    _checks.tensor("y_sorted", y_sorted, ndim=2, dtypes=FLOAT_DTYPES)
    _checks.tensor("topk_weights", topk_weights, ndim=2, dtypes=FLOAT_DTYPES, device=y_sorted.device)
    _check_plan(plan, y_sorted.device, "y_sorted", y_sorted.shape[0], per_token=False)
    if topk_weights.shape[1] != plan.top_k or topk_weights.numel() != y_sorted.shape[0]:
        raise ValueError(
            f"topk_weights must have shape [T, k] = [{y_sorted.shape[0] // plan.top_k}, {plan.top_k}], "
            f"got {tuple(topk_weights.shape)}"
        )
    return _unpermute_op(y_sorted, plan.dest_index, plan.expert_offsets, topk_weights, backend or "")


# (kernel, flag, payload dtype, H, k): the permutes of the models the library targets, each
# Triton variant compiled for sm_90 by the test suite, with the 16-byte vector accesses checked.
SM90_PERMUTES = {
    "permute_bf16_h7168_k8": ("scatter", False, torch.bfloat16, 7168, 8),
    "permute_fp8_h7168_k8": ("scatter", False, torch.float8_e4m3fn, 7168, 8),
    "permute_fp32_h2880_k4": ("scatter", False, torch.float32, 2880, 4),
    "unpermute_bf16_h7168_k8": ("combine", True, torch.bfloat16, 7168, 8),
    "unpermute_fp16_h2048_k8": ("combine", True, torch.float16, 2048, 8),
    "unpermute_fp32_h4096_k2": ("combine", True, torch.float32, 4096, 2),
    "permute_backward_bf16_h7168_k8": ("combine", False, torch.bfloat16, 7168, 8),
    "unpermute_backward_bf16_h7168_k8": ("scatter", True, torch.bfloat16, 7168, 8),
    "unpermute_backward_fp32_h4096_k2": ("scatter", True, torch.float32, 4096, 2),
}


@_sm90_registry.register
def sm90_variants(capability: int = 90):  # row tiles are the same on every architecture
    from . import _sm90
    from .kernels._permute import combine_rows_kernel, scatter_rows_kernel

    out = []
    for name, (kernel, flag, dtype, hidden, top_k) in SM90_PERMUTES.items():
        cx, opts = _constexprs(kernel, hidden, dtype, top_k, flag)
        fn = scatter_rows_kernel if kernel == "scatter" else combine_rows_kernel
        rows = _sm90.ptr(_moved(dtype) if kernel == "scatter" and not flag else dtype)
        types = dict(x_ptr=rows, y_ptr=rows, out_ptr=rows, dest_ptr="*i32", offsets_ptr="*i32",
                     w_ptr="*fp32", grad_w_ptr="*fp32")
        # H = 7168 and its strides are multiples of 16, and tensors are 16-byte aligned: the
        # launch specialises them so, which is what lets the 16-byte accesses through.
        aligned = tuple(a for a in fn.arg_names
                        if a.endswith("_ptr") or a in ("hidden", "h_span") or a.startswith("stride"))
        out.append(_sm90.Variant(f"{name}", fn, _sm90.signature(fn, cx, **types), cx, opts, aligned=aligned,
                                 rows=True))
    return out
