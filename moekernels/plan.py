"""Stage 2, plan: topk_ids [T, k] -> RoutingPlan (counts, offsets, the expert-sorted order).

The ``moekernels::plan_routing`` custom op, its launchers (torch / triton / cuda), and the public
:func:`plan_routing`. The Triton path is a three-pass stable counting sort (kernels/_plan.py):
work linear in T*k (a pair costs one row of a [pairs, E] one-hot tile: E lane operations, ~2
per thread at E = 256 and 4 warps), no atomics, no host sync, the same bits on every run. The
CUDA path (csrc/plan.cu, E <= 1024) is the same sort ranked with warp match instructions: one
launch up to 2048 pairs, three beyond; the same bits as the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from . import _backend, _checks, _sm90_registry, configs, reference

ID_DTYPES = (torch.int32, torch.int64)
INT32_MAX = 2**31 - 1
# csrc/plan.cu keeps a row of E + 1 cursors per warp in shared memory (36.9 KB at E = 1024).
CUDA_MAX_EXPERTS = 1024


@dataclass(frozen=True)
class RoutingPlan:
    """Where each (token, slot) pair goes. N = T*k pairs, pair ``t*k + j`` is ``topk_ids[t, j]``.

    All tensors are int32 on the ids' device.

    Attributes:
        expert_counts: [E] pairs routed to each expert.
        expert_offsets: [E] cumulative ends of the expert segments (``torch._grouped_mm``'s
            ``offs``); ``expert_offsets[-1]`` is the number of pairs not dropped.
        source_index: [N] row r of the expert-sorted order holds pair ``source_index[r]``;
            sorted by expert, stable (ascending pair index) within an expert, dropped pairs last.
        dest_index: [N] the inverse: ``dest_index[t*k + j]`` is the sorted row of pair (t, j).
        padded_source_index: [P] with ``block_size`` B: each expert's segment padded up to a
            multiple of B with the sentinel N. P = ``reference.padded_rows_bound(N, E, B)`` is
            a static bound; rows from ``num_padded_rows`` on hold the sentinel. None without B.
        block_expert: [P / B] the expert of each block of B padded rows; -1 for unused blocks.
        num_padded_rows: [1] rows of the padded layout in use (a multiple of B).
        num_experts, top_k, block_size: the call's E, k and B (None without padding).

    Dropped pairs (ids outside [0, E), on CUDA without MOEKERNELS_DEBUG=1) count for no expert,
    sit after ``expert_offsets[-1]`` in ``source_index``, are absent from the padded layout,
    and contribute nothing to :func:`moekernels.unpermute`.
    """

    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    source_index: torch.Tensor
    dest_index: torch.Tensor
    padded_source_index: torch.Tensor | None
    block_expert: torch.Tensor | None
    num_padded_rows: torch.Tensor | None
    num_experts: int
    top_k: int
    block_size: int | None

    @classmethod
    def from_fields(cls, fields, num_experts: int, top_k: int, block_size: int | None) -> RoutingPlan:
        counts, offsets, source, dest, padded, block_expert, num_padded = fields
        if not block_size:
            padded = block_expert = num_padded = None
        return cls(counts, offsets, source, dest, padded, block_expert, num_padded, num_experts, top_k,
                   block_size or None)


def _check(topk_ids, num_experts, block_size):
    _checks.tensor("topk_ids", topk_ids, ndim=2, dtypes=ID_DTYPES)
    _checks.integer("num_experts", num_experts, low=1, high=INT32_MAX)
    if block_size is not None:
        _checks.integer("block_size", block_size, low=1, high=4096)
    num_pairs = topk_ids.numel()
    # int32 indices, and the sentinel N itself, must fit: T*k < 2**31.
    if num_pairs >= INT32_MAX:
        raise ValueError(f"topk_ids has {num_pairs} pairs; the plan's int32 indices take fewer than 2**31 - 1")
    if block_size and reference.padded_rows_bound(num_pairs, num_experts, block_size) >= INT32_MAX:
        raise ValueError(f"block_size={block_size}: the padded layout would pass 2**31 rows")


def _constexprs(num_experts: int, single: bool, block_size: int) -> tuple[dict, dict]:
    """Each plan kernel's constexprs, and the launch options, for one call: shared by the
    launcher and the sm_90 compile test, so that the test compiles what ships."""
    cfg = configs.plan_config(num_experts)
    block_b = triton.next_power_of_2(block_size) if block_size else 1
    return {
        "count": dict(BLOCK_N=cfg.BLOCK_N, SUB=cfg.SUB, BLOCK_E=cfg.BLOCK_E),
        "scan": dict(BLOCK_CH=cfg.BLOCK_CH, BLOCK_EB=cfg.BLOCK_EB),
        "scatter": dict(BLOCK_N=cfg.BLOCK_N, SUB=cfg.SUB, BLOCK_E=cfg.BLOCK_E, SINGLE=single),
        "pad": dict(NB=configs.pad_blocks_per_program(block_b, cfg.BLOCK_E), BLOCK_B=block_b, BLOCK_E=cfg.BLOCK_E),
    }, dict(num_warps=cfg.num_warps)


def _launch_triton(ids, num_experts, block_size, out):
    from .kernels import _plan as k

    counts, offsets, source, dest, padded, block_expert, num_padded = out
    num_pairs = ids.numel()
    block_n = configs.plan_config(num_experts).BLOCK_N
    chunks = triton.cdiv(num_pairs, block_n)
    cx, opts = _constexprs(num_experts, chunks == 1, block_size)
    partial = counts  # unused when one chunk holds every pair
    if chunks > 1:
        partial = torch.empty(chunks, num_experts + 1, dtype=torch.int32, device=ids.device)
        k.plan_count_kernel[(chunks,)](ids, partial, num_pairs, num_experts, **cx["count"], **opts)
        k.plan_scan_kernel[(triton.cdiv(num_experts + 1, cx["scan"]["BLOCK_EB"]),)](
            partial, counts, chunks, num_experts, **cx["scan"], **opts)
    k.plan_scatter_kernel[(chunks,)](ids, partial, counts, offsets, source, dest, num_pairs, num_experts,
                                     **cx["scatter"], **opts)
    if block_size:
        num_blocks = block_expert.numel()
        k.plan_pad_kernel[(triton.cdiv(num_blocks, cx["pad"]["NB"]),)](
            counts, source, padded, block_expert, num_padded, num_pairs, num_experts, block_size, num_blocks,
            **cx["pad"], **opts)


def _cuda_reason(num_experts):
    return f"num_experts={num_experts} > {CUDA_MAX_EXPERTS}" if num_experts > CUDA_MAX_EXPERTS else None


def _launch_cuda(ids, num_experts, block_size, out):
    from . import _ext

    counts, offsets, source, dest, padded, block_expert, num_padded = out
    num_pairs = ids.numel()
    chunks = triton.cdiv(num_pairs, _ext.C.PLAN_CHUNK)
    # The per-chunk histograms of the multi-block path and, in the last row, each key's total; one
    # chunk (decode) needs none.
    partial = torch.empty(chunks + 1, num_experts + 1, dtype=torch.int32, device=ids.device) if chunks > 1 else counts
    _ext.C.plan_routing(ids.data_ptr(), ids.element_size(), num_pairs, num_experts, block_size, partial.data_ptr(),
                        counts.data_ptr(), offsets.data_ptr(), source.data_ptr(), dest.data_ptr(),
                        padded.data_ptr(), block_expert.data_ptr(), num_padded.data_ptr(), block_expert.numel(),
                        _ext.stream(ids))


def _empty_fields(topk_ids, num_experts, block_size):
    num_pairs = topk_ids.numel()
    new = dict(dtype=torch.int32, device=topk_ids.device)
    padded = reference.padded_rows_bound(num_pairs, num_experts, block_size) if block_size else 0
    return (
        torch.empty(num_experts, **new), torch.empty(num_experts, **new),
        torch.empty(num_pairs, **new), torch.empty(num_pairs, **new),
        torch.empty(padded, **new), torch.empty(padded // block_size if block_size else 0, **new),
        torch.empty(1 if block_size else 0, **new),
    )


@torch.library.custom_op("moekernels::plan_routing", mutates_args=())
def plan_routing_op(
    topk_ids: torch.Tensor, num_experts: int, block_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _checks.ids_in_range("topk_ids", topk_ids, num_experts)  # inside the op: opaque to torch.compile
    name = _backend.choose("plan_routing", topk_ids.device, backend or None, cuda_reason=_cuda_reason(num_experts))
    if name == "torch" or topk_ids.numel() == 0:
        return reference.plan_routing_fields(topk_ids, num_experts, block_size)
    out = _empty_fields(topk_ids, num_experts, block_size)
    with _backend.device_guard(topk_ids):
        launch = _launch_cuda if name == "cuda" else _launch_triton
        launch(topk_ids.contiguous(), num_experts, block_size, out)
    return out


@plan_routing_op.register_fake
def _(topk_ids, num_experts, block_size, backend):
    return _empty_fields(topk_ids, num_experts, block_size)


def plan_routing(
    topk_ids: torch.Tensor, num_experts: int, *, block_size: int | None = None, backend: str | None = None
) -> RoutingPlan:
    """Sort the (token, slot) pairs by expert: the plan that permute, the grouped GEMMs and
    unpermute share.

    Args:
        topk_ids: [T, k] int32 or int64 expert ids, as :func:`moekernels.topk_routing` gives.
        num_experts: E. On CPU tensors (and on CUDA ones under ``MOEKERNELS_DEBUG=1``) an id
            outside [0, E) raises ValueError; on CUDA otherwise its pair is dropped (see
            :class:`RoutingPlan`): what expert parallelism needs for other ranks' experts.
        block_size: B, to also build the block-padded layout of vLLM-style kernels.
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` (E <= 1024) or None (automatic); see
            ``moekernels._backend``.

    Returns:
        A :class:`RoutingPlan`. Computed on the device in work linear in T*k with no host sync;
        deterministic, and identical on every backend.
    """
    _check(topk_ids, num_experts, block_size)
    fields = plan_routing_op(topk_ids, num_experts, block_size or 0, backend or "")
    return RoutingPlan.from_fields(fields, num_experts, topk_ids.shape[1], block_size)


# (E, block size) of the models the library targets, and the extremes: each Triton plan kernel
# they launch is compiled for sm_90 by the test suite (moekernels/_sm90.py).
SM90_PLANS = {"mixtral_e8_b16": (8, 16), "qwen15_e60_b64": (60, 64), "qwen3_e128_b64": (128, 64),
              "deepseek_v3_e256_b128": (256, 128), "e1024_b256": (1024, 256)}


@_sm90_registry.register
def sm90_variants(capability: int = 90):  # plan tiles are the same on every architecture
    from . import _sm90
    from .kernels import _plan as k

    out = []
    for name, (num_experts, block_size) in SM90_PLANS.items():
        for single in (False, True):
            cx, opts = _constexprs(num_experts, single, block_size)
            kernels = {"scatter": k.plan_scatter_kernel}
            if not single:  # the multi-chunk path's other kernels, and the padded layout once
                kernels.update(count=k.plan_count_kernel, scan=k.plan_scan_kernel, pad=k.plan_pad_kernel)
            for part, fn in kernels.items():
                sig = _sm90.signature(fn, cx[part], ids_ptr="*i64" if single else "*i32",
                                      **{a: "*i32" for a in fn.arg_names if a.endswith("_ptr") and a != "ids_ptr"})
                label = f"plan_{part}{'_single' if single else ''}/{name}"
                out.append(_sm90.Variant(label, fn, sig, cx[part], opts))
    return out
