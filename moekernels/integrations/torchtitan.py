"""torchtitan 0.3.0: moekernels as the routed experts, the expert-parallel dispatcher and the FP8 path of its MoE
models (DeepSeek-V3, Qwen3-MoE, Llama 4), switched on with torchtitan's own overrides, on the command line:

    --override.imports moekernels.integrations.torchtitan.routed_experts
    --override.imports moekernels.integrations.torchtitan.routed_experts_fp8
    --override.imports 'moekernels.integrations.torchtitan.routed_experts={"capacity_factor": 1.25}'

or in Python, ``config.override.imports.append("moekernels.integrations.torchtitan.routed_experts")``.

The overrides (``@override`` factories; each replaces a ``Configurable.Config`` of the model before it is built):

- ``routed_experts`` (``RoutedExperts.Config``): the whole routed-experts region, :class:`MoekernelsRoutedExperts` here, with
  its inner experts and its dispatcher swapped for the two below. Without an expert-parallel mesh it runs
  :func:`moekernels.fused_moe` on torchtitan's ``w1`` / ``w3`` / ``w2`` in place (the (w1, w3) pair: no
  concatenation, no copy): the gather into expert order, the SwiGLU and the weighted scatter are fused into the two
  grouped GEMMs. With one, it dispatches with moekernels, runs the experts' three GEMMs on moekernels and combines.
  Keyword arguments: ``precision`` (None or ``"fp8"``), ``dtype`` (``"bfloat16"``, torchtitan's own cast, or
  ``"float32"``), ``backend`` (None: automatic; ``"torch"``, ``"triton"``), ``fused`` (True), ``dispatch_fp8``
  (False) and ``capacity_factor`` (None).
- ``routed_experts_fp8``: the same with ``precision="fp8"`` and ``dispatch_fp8=True``: DeepSeek-V3's FP8 training
  recipe end to end (e4m3 rows on the wire; every expert GEMM, its dgrad and its wgrad on e4m3 with (1, 128) and
  (128, 128) scales). Needs ``dim`` and ``hidden_dim`` multiples of 128; no padding of the experts' rows, so
  torchtitan's ``TorchAOTokenDispatcher`` is not needed.
- ``experts`` (``GroupedExperts.Config``): only the experts, :class:`MoekernelsGroupedExperts` here (``precision``, ``dtype``,
  ``backend``), whose three GEMMs are :func:`moekernels.grouped_mm` (or ``moekernels.fp8.grouped_mm_fp8``).
- ``dispatcher`` (``AllToAllTokenDispatcher.Config``): only the dispatcher, :class:`MoekernelsTokenDispatcher` here
  (``fp8``, ``capacity_factor``): :func:`moekernels.distributed.dispatch` / ``combine`` on torchtitan's EP mesh.

torchtitan refuses two overrides of which one claims an ancestor of the other's node, so ``routed_experts`` is not
listed with ``experts`` or ``dispatcher``; those two combine with each other.

What stays torchtitan's: the router, its load-balancing counts and bias update, the shared experts, the parameters
(``w1_EFD`` / ``w3_EFD`` [E, F, D], ``w2_EDF`` [E, D, F], nn.Linear's out x in), their initialization, their
sharding (``Shard(0)`` on the EP mesh, FSDP, TP) and so the checkpoints, which load both ways. What the model
computes stays the same: torchtitan 0.3.0 applies the router scores after the experts (in ``combine``, in float32),
as :func:`moekernels.fused_moe` does; a dispatcher that scores before the experts (``score_before_experts`` of other
torchtitan releases) is left on torchtitan's own path.

Expert parallelism: ``capacity_factor=None`` exchanges the per-expert counts with one host sync a layer, as
torchtitan's ``AllToAllTokenDispatcher`` does. ``capacity_factor=c`` sends C = ceil(c * T * top_k / EP) rows to
every rank, with no host sync (pairs past C are dropped and counted, see :mod:`moekernels.distributed`); torchtitan
0.3.0's trainer still wants ``--training.disable_cuda_graphs`` with EP > 1 (its check knows only its own
dispatchers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import spmd_types as spmd
import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.config import derive, override
from torchtitan.distributed.spmd_types import maybe_set_sparse_mesh, spmd_mesh_size
from torchtitan.distributed.utils import get_spmd_backend
from torchtitan.models.common import moe as titan_moe
from torchtitan.models.common import token_dispatcher as titan_dispatch

from .. import _checks, distributed, fused_moe, grouped_mm
from ..fp8 import grouped_mm_fp8

PRECISIONS = (None, "fp8")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# DeepSeek-V3's FP8 recipe: (1, 128) activation tiles and (128, 128) weight blocks along both dims of each GEMM.
_FP8_BLOCK = 128


def _settings(precision, dtype, backend, dim, hidden_dim):
    _checks.choice("precision", precision, PRECISIONS)
    _checks.choice("dtype", dtype, tuple(DTYPES))
    _checks.choice("backend", backend, (None, "torch", "triton"))
    if precision == "fp8" and (dim % _FP8_BLOCK or hidden_dim % _FP8_BLOCK):
        raise ValueError(f"precision='fp8' needs dim and hidden_dim multiples of {_FP8_BLOCK} (its (1, 128) tiles "
                         f"and (128, 128) blocks), got dim={dim}, hidden_dim={hidden_dim}")
    return precision, DTYPES[dtype], backend


def _local(w: torch.Tensor) -> torch.Tensor:
    """The rank's shard of an expert weight: torchtitan's experts run on local tensors (EP's token counts are
    dynamic), as its own GroupedExperts does."""
    return w.to_local() if isinstance(w, DTensor) else w


class MoekernelsGroupedExperts(titan_moe.GroupedExperts):
    """torchtitan's ``GroupedExperts`` (same parameters, initialization and sharding) whose three grouped GEMMs are
    moekernels': ``grouped_mm`` in ``dtype``, or with ``precision="fp8"`` the differentiable e4m3 ``grouped_mm_fp8``
    (DeepSeek-V3's block recipe: fprop, dgrad and wgrad on e4m3)."""

    @dataclass(kw_only=True, slots=True)
    class Config(titan_moe.GroupedExperts.Config):
        precision: str | None = None
        dtype: str = "bfloat16"
        backend: str | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        self.precision, self.compute_dtype, self.backend = _settings(
            config.precision, config.dtype, config.backend, config.dim, config.hidden_dim)

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1 [E, F, D], w2 [E, D, F], w3 [E, F, D]) of this rank, cast to the compute dtype (torchtitan casts
        them to bfloat16 each forward too; nothing is copied where they already are)."""
        return tuple(_local(w).to(self.compute_dtype) for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD))

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert in, rows out: torchtitan's computation with its casts."""
        w1, w2, w3 = self.local_weights()
        offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        if get_spmd_backend() == "spmd_types" and spmd.is_type_checking() and spmd_mesh_size("ep") == 1:
            for axis in ("dp", "cp"):  # as torchtitan's GroupedExperts: offsets typed V like the weights
                spmd.mutate_type(offsets_E, axis, src=spmd.P, dst=spmd.V)
        x = x_RD.to(self.compute_dtype)
        h = F.silu(self._grouped_mm(A=x, B_t=w1.transpose(-2, -1), offs=offsets_E))
        h = h * self._grouped_mm(A=x, B_t=w3.transpose(-2, -1), offs=offsets_E)
        return self._grouped_mm(A=h, B_t=w2.transpose(-2, -1), offs=offsets_E).type_as(x_RD)

    def _grouped_mm(self, *, A: torch.Tensor, B_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """torchtitan's seam: ``A @ B_t`` per expert segment of A's rows."""
        if self.precision == "fp8":
            return grouped_mm_fp8(A, B_t, offs, backend=self.backend)
        return grouped_mm(A, B_t, offs, backend=self.backend)


class MoekernelsTokenDispatcher(titan_dispatch.AllToAllTokenDispatcher):
    """torchtitan's all-to-all dispatcher on :mod:`moekernels.distributed`: with an EP mesh, the (token, slot) pairs
    travel to their experts' ranks sorted by moekernels' routing plan, optionally as e4m3 rows (``fp8``) or with a
    fixed capacity and no host sync (``capacity_factor``); ``combine`` applies the router scores in float32 in the
    weighted sum. Without an EP mesh it is torchtitan's local dispatcher."""

    @dataclass(kw_only=True, slots=True)
    class Config(titan_dispatch.AllToAllTokenDispatcher.Config):
        fp8: bool = False
        capacity_factor: float | None = None

    def __init__(self, config: Config):
        super().__init__(config)
        if config.capacity_factor is not None and not config.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {config.capacity_factor}")
        self.fp8, self.capacity_factor = bool(config.fp8), config.capacity_factor

    def capacity(self, num_tokens: int) -> int | None:
        """Rows sent to each rank: ceil(capacity_factor * T * top_k / EP), None without a capacity factor. Every rank
        must get the same C: torchtitan pads the sequence before routing, so T is the same on every rank."""
        if self.capacity_factor is None:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.ep_mesh.size()))

    def dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E):
        if self.ep_mesh is None:
            return titan_dispatch.LocalTokenDispatcher.dispatch(self, x_TD, topk_scores_TK, topk_expert_ids_TK,
                                                                num_local_tokens_per_expert_E)
        handle, x_local = distributed.dispatch(x_TD, topk_expert_ids_TK, topk_scores_TK, self.num_experts,
                                               group=self.ep_mesh.get_group(), capacity=self.capacity(x_TD.shape[0]),
                                               fp8=self.fp8)
        if self.fp8:  # the experts take rows: e4m3 * scale, with the gradient of the bf16 path (straight through)
            x_local = distributed.dequantize(x_local, handle)
        ends = handle.expert_offsets
        return x_local, torch.diff(ends, prepend=ends.new_zeros(1)), handle

    def combine(self, routed_output_RD, metadata, x_TD):
        if self.ep_mesh is None:
            return titan_dispatch.LocalTokenDispatcher.combine(self, routed_output_RD, metadata, x_TD)
        return distributed.combine(routed_output_RD, metadata).to(x_TD.dtype)


# The dispatchers whose local path (no EP mesh) is torchtitan's LocalTokenDispatcher with the scores applied after
# the experts: where fused_moe computes the same thing.
_LOCAL_DISPATCHERS = (titan_dispatch.LocalTokenDispatcher, titan_dispatch.AllToAllTokenDispatcher, MoekernelsTokenDispatcher)


class MoekernelsRoutedExperts(titan_moe.RoutedExperts):
    """torchtitan's routed-experts region. Without an EP mesh (and with ``fused``) it is one
    :func:`moekernels.fused_moe` over the tokens, the router's scores and ids, and the inner experts' weights in
    place; otherwise torchtitan's dispatch -> experts -> combine."""

    @dataclass(kw_only=True, slots=True)
    class Config(titan_moe.RoutedExperts.Config):
        fused: bool = True

    def __init__(self, config: Config):
        super().__init__(config)
        self.fused = bool(config.fused)

    def fusable(self) -> bool:
        """Whether fused_moe computes what torchtitan's path does here: no EP mesh, a local dispatcher that scores
        after the experts, and moekernels' SwiGLU experts (which routed_experts makes of torchtitan's own; not
        gpt-oss's or fused-w13 ones, which it leaves as they are)."""
        dispatcher = self.token_dispatcher
        return (self.fused and type(dispatcher) in _LOCAL_DISPATCHERS
                and getattr(dispatcher, "ep_mesh", None) is None
                and not getattr(dispatcher, "score_before_experts", False)
                and type(self.inner_experts) is MoekernelsGroupedExperts)

    def forward(self, x_BLD, topk_scores_BLK, topk_expert_ids_BLK, num_local_tokens_per_expert_E):
        if not self.fusable():
            return super().forward(x_BLD, topk_scores_BLK, topk_expert_ids_BLK, num_local_tokens_per_expert_E)
        experts = self.inner_experts
        w1, w2, w3 = experts.local_weights()
        batch, _, dim = x_BLD.shape
        top_k = topk_scores_BLK.shape[-1]
        x_TD = x_BLD.reshape(-1, dim)
        with maybe_set_sparse_mesh():
            y_TD = fused_moe(x_TD.to(experts.compute_dtype), (w1, w3), w2, topk_scores_BLK.reshape(-1, top_k),
                             topk_expert_ids_BLK.reshape(-1, top_k), precision=experts.precision,
                             backend=experts.backend)
        return y_TD.type_as(x_TD).view(batch, -1, dim)


def _experts_config(cfg, precision, dtype, backend):
    if type(cfg) is not titan_moe.GroupedExperts.Config:  # gpt-oss's, fused w13, or already ours: left as it is
        return cfg
    return derive(cfg, MoekernelsGroupedExperts.Config, precision=precision, dtype=dtype, backend=backend)


def _dispatcher_config(cfg, fp8, capacity_factor):
    if type(cfg) not in (titan_dispatch.AllToAllTokenDispatcher.Config, titan_dispatch.LocalTokenDispatcher.Config):
        return cfg  # DeepEP, HybridEP, TorchAO padding, ...: left as it is
    return derive(cfg, MoekernelsTokenDispatcher.Config, fp8=fp8, capacity_factor=capacity_factor)


@override(target=titan_moe.RoutedExperts.Config, exact=True,
          description="moekernels routed experts: fused_moe without EP; moekernels dispatch, GEMMs, combine with EP")
def routed_experts(cfg, *, precision: str | None = None, dtype: str = "bfloat16", backend: str | None = None,
                   fused: bool = True, dispatch_fp8: bool = False, capacity_factor: float | None = None):
    return derive(cfg, MoekernelsRoutedExperts.Config, fused=fused,
                  inner_experts=_experts_config(cfg.inner_experts, precision, dtype, backend),
                  token_dispatcher=_dispatcher_config(cfg.token_dispatcher, dispatch_fp8, capacity_factor))


@override(target=titan_moe.RoutedExperts.Config, exact=True,
          description="moekernels routed experts on DeepSeek-V3's FP8 recipe (e4m3 GEMMs and dispatch)")
def routed_experts_fp8(cfg, *, dtype: str = "bfloat16", backend: str | None = None, fused: bool = True,
                       dispatch_fp8: bool = True, capacity_factor: float | None = None):
    return routed_experts(cfg, precision="fp8", dtype=dtype, backend=backend, fused=fused, dispatch_fp8=dispatch_fp8,
                          capacity_factor=capacity_factor)


@override(target=titan_moe.GroupedExperts.Config, exact=True, description="moekernels grouped GEMMs in the experts")
def experts(cfg, *, precision: str | None = None, dtype: str = "bfloat16", backend: str | None = None):
    return _experts_config(cfg, precision, dtype, backend)


@override(target=titan_dispatch.AllToAllTokenDispatcher.Config, exact=True,
          description="moekernels expert-parallel dispatch and combine")
def dispatcher(cfg, *, fp8: bool = False, capacity_factor: float | None = None):
    return _dispatcher_config(cfg, fp8, capacity_factor)
