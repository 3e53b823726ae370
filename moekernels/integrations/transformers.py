"""transformers v5: moekernels as an experts implementation, MoE blocks as ``moekernels.MoE``, and a patch for
user modules that hold their own experts.

Importing this module registers ``"moekernels"`` in transformers' ``ExpertsInterface``, and so does
``moekernels.register_transformers()`` (which returns the name) or ``import moekernels`` after transformers; then

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moekernels")
    model.set_experts_implementation("moekernels")

run every ``@use_experts_implementation`` experts module of the model (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3,
gpt-oss, ...) through moekernels. The router stays the model's own; only the experts change. Forward and backward
match transformers' ``"eager"`` to rounding.

- Experts with SwiGLU or GeGLU (exact erf gelu), gate rows before up rows, no biases and no post-expert norm (Mixtral,
  Qwen2/3-MoE, DeepSeek-V3) take :func:`moekernels.fused_moe`: the weights are passed as they are stored, through
  transposed views where the module stores them transposed, never copied.
- Other experts (gpt-oss: biases, a clamped SwiGLU on interleaved gate/up columns, ``(up + 1)``; any other
  activation) run the moekernels stages one by one: ``plan_routing``, ``permute``, ``grouped_mm``, the module's own
  gate and biases in torch, ``grouped_mm``, ``unpermute``.

The backend is this module's ``BACKEND`` if set (``moekernels.integrations.transformers.BACKEND = "triton"``), else
``MOEKERNELS_BACKEND``, else automatic: the torch reference on CPU tensors (so the same model code runs without a
GPU) and the Triton kernels on CUDA ones.

PEFT: LoRA on the experts' parameters (``LoraConfig(target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"])``, PEFT 0.21) runs ``fused_moe(..., lora=ExpertsLoRA(...))`` on the base weights, never
``W + scale * B A``. PEFT's ``ParamWrapper`` replaces the experts module in its parent (one wrapper per targeted
parameter, nested) and runs the experts' forward inside ``_activate_lora``, which parametrizes the parameter as W +
delta; for experts running ``"moekernels"`` it is patched (:func:`patch_peft`) to register the factors unevaluated,
and the forward takes A, B and the scale from them as views of PEFT's ``lora_A`` / ``lora_B`` weights (gradients go
to them; the base weights get none). Several active adapters are concatenated along the rank; disabled or merged
adapters leave the plain weight. Base weights that themselves require grad take PEFT's W + delta instead. PEFT
refuses dropout, DoRA and LoRA biases on parameters itself.
The patch replaces a method of PEFT's class, process-wide: only on PEFT 0.21.x (:data:`PEFT_TESTED`; another release
keeps its own path, with one warning), not at all under ``MOEKERNELS_PEFT_PATCH=0``, and ``unpatch_peft()`` undoes it.

``moe_from_block(block)`` builds a :class:`moekernels.MoE` holding a copy of a Mixtral, Qwen3-MoE or DeepSeek-V3
block's router, experts and shared experts. ``patch_experts(module, w13=..., w2=...)`` makes a module that holds
vLLM-style ``w13`` [E, 2I, H] and ``w2`` [E, H, I] weights run ``fused_moe``; ``experts_forward`` is the function
behind it.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import types
import warnings

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import ExpertsLoRA, fused_moe, grouped_mm, permute, plan_routing, unpermute
from ..moe import MoE

try:
    from transformers.activations import GELUActivation, SiLUActivation
    from transformers.integrations import moe as _hf_moe
    from transformers.integrations.moe import ExpertsInterface
except ImportError as exc:  # transformers 4.x has no experts interface
    raise ImportError(
        "moekernels.integrations.transformers needs transformers >= 5 (its ExpertsInterface and "
        f"experts_implementation): {exc}"
    ) from exc

__all__ = ["BACKEND", "IMPLEMENTATION", "IMPLEMENTATION_FP8", "experts_forward", "moe_from_block", "moekernels_experts_forward",
           "patch_experts", "patch_peft", "register", "unpatch_experts", "unpatch_peft"]

# act(gate) * up on concatenated [gate | up] columns: what @use_experts_implementation gives a class without its own
# _apply_gate. Private in transformers; if it goes, every class with an _apply_gate runs the unfused stages (correct,
# slower) rather than fused_moe.
_DEFAULT_GATE = getattr(_hf_moe, "_default_apply_gate", None)

IMPLEMENTATION = "moekernels"
# DeepSeek-V3's FP8 training recipe on the model's own (master) weights: fused_moe(precision="fp8"), or, for
# experts it cannot fuse, grouped_mm_fp8 for both GEMMs. H and I must be multiples of 128.
IMPLEMENTATION_FP8 = "moekernels_fp8"
# The backend of every moekernels op called from here: "torch", "triton", "cuda" or None (MOEKERNELS_BACKEND, else
# automatic). Read at call time.
BACKEND: str | None = None
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _activation(act) -> str | None:
    """The ``fused_moe`` activation that computes exactly what ``act`` does, or None.

    ``SiLUActivation`` and ``nn.SiLU`` are silu; ``GELUActivation`` is the exact erf gelu in both of its forms (the
    tanh, "fast", "new" and "quick" gelus are approximations: the kernel's epilogue has none of them).
    """
    if isinstance(act, (SiLUActivation, nn.SiLU)) or act is nn.functional.silu:
        return "silu"
    if isinstance(act, GELUActivation) or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    if act is nn.functional.gelu:
        return "gelu"
    return None


def _fused_activation(experts: nn.Module) -> str | None:
    """The activation when ``fused_moe`` can run these experts as they are, else None."""
    if not getattr(experts, "has_gate", True) or not getattr(experts, "is_concatenated", True):
        return None
    if getattr(experts, "has_bias", False) or getattr(experts, "has_post_expert_norm", False):
        return None
    # A model that overrides the gate (gpt-oss's clamp and alpha) computes something else than act(gate) * up.
    gate = getattr(type(experts), "_apply_gate", None)
    if gate is not None and gate is not _DEFAULT_GATE:
        return None
    return _activation(getattr(experts, "act_fn", None))


def _row_experts(topk_ids: torch.Tensor, plan, num_experts: int) -> torch.Tensor:
    """The expert of each expert-sorted row: that of the pair it holds. Pairs that a CUDA plan drops (ids >= E, other
    ranks' experts) sit past ``expert_offsets[-1]`` and add nothing to unpermute; the clamp keeps their bias rows in
    bounds."""
    return topk_ids.reshape(-1).index_select(0, plan.source_index.long()).clamp(0, num_experts - 1)


# The expert weights moekernels_experts_forward reads, so the only ones whose PEFT LoRA it takes as factors.
_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def _peft_lora_layer():
    """peft.tuners.lora.layer if PEFT is imported (else no model holds a PEFT adapter), or None."""
    return sys.modules.get("peft.tuners.lora.layer")


# The PEFT releases whose ParamWrapper._activate_lora patch_peft replaces, as (major, minor): what tests/test_peft.py
# runs (0.21.2). Another release may change the method under the same names; it keeps its own (W + delta, correct).
PEFT_TESTED = ((0, 21),)
# Whether _patch_peft has made its one automatic decision (patched, warned or opted out), or unpatch_peft() /
# patch_peft() made it: after that only patch_peft() patches.
_peft_decided = False


def _patch_peft() -> None:
    """The automatic :func:`patch_peft`: done once, by :func:`register` when PEFT is imported, else on the first
    forward that meets an adapter; not at all under ``MOEKERNELS_PEFT_PATCH=0`` or after :func:`unpatch_peft`."""
    global _peft_decided
    if _peft_decided or _peft_lora_layer() is None:
        return
    _peft_decided = True
    if os.environ.get("MOEKERNELS_PEFT_PATCH", "1") != "0":
        patch_peft()


def patch_peft() -> bool:
    """Make PEFT's ``ParamWrapper`` (``LoraConfig(target_parameters=[...])``) hand moekernels experts their adapters
    as low-rank factors, never as W + delta; returns whether it is patched. Idempotent, and done on its own (see
    :func:`_patch_peft`) unless ``MOEKERNELS_PEFT_PATCH=0``; :func:`unpatch_peft` undoes it. A PEFT release outside
    :data:`PEFT_TESTED` is left as it is, with a warning.

    A ``ParamWrapper`` runs the experts' forward inside ``_activate_lora``, which registers a parametrization on the
    wrapped parameter: reading ``experts.gate_up_proj`` then evaluates ``W + scale * lhs @ rhs`` (one adapter:
    ``_LoraFactorsProxy``, a baddbmm) or ``W + delta`` with delta summed over the active adapters beforehand
    (``_LoraParameterProxy``). Either way a tensor the size of the expert stack, and PEFT 0.21 builds one even when
    nothing reads it: ``register_parametrization`` evaluates a new parametrization once to check its shape and dtype.
    For experts that run ``"moekernels"`` this registers a ``_LoraFactorsProxy`` with ``unsafe=True`` (no check), the
    factors of several active adapters concatenated along the rank (scales folded into lhs): it still evaluates to
    W + delta for any other reader, and :func:`_weight_and_lora` takes its factors without evaluating it. Every
    other ``ParamWrapper`` (other experts implementations, other parameters) runs PEFT's own code.
    """
    global _peft_decided
    _peft_decided = True
    import peft
    from peft.tuners.lora import layer

    wrapper = layer.ParamWrapper
    if hasattr(wrapper._activate_lora, "_moekernels_wraps"):
        return True
    version = getattr(peft, "__version__", "unknown")
    if (tuple(int(v) for v in re.findall(r"\d+", version)[:2]) not in PEFT_TESTED
            or not hasattr(wrapper, "get_delta_factors") or not hasattr(layer, "_LoraFactorsProxy")):
        tested = ", ".join(f"{major}.{minor}.x" for major, minor in PEFT_TESTED)
        warnings.warn(f"moekernels: PEFT {version} is not a release its LoRA patch was tested with ({tested}); "
                      f"LoRA on the experts of {IMPLEMENTATION!r} models takes PEFT's own W + delta (correct, "
                      f"slower). Set MOEKERNELS_PEFT_PATCH=0 to silence this.", stacklevel=2)
        return False
    peft_activate = wrapper._activate_lora

    @contextlib.contextmanager
    def _activate_lora(self, active_adapters):
        experts = self.get_base_layer()
        adapters = [a for a in active_adapters or () if a in self.lora_A]
        implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
        if (not adapters or implementation not in (IMPLEMENTATION, IMPLEMENTATION_FP8)
                or self.parameter_name not in _WEIGHTS or self.get_param().dtype not in _DTYPES):
            with peft_activate(self, active_adapters):
                yield
            return
        factors = [self.get_delta_factors(a) for a in adapters]  # (lhs, rhs, scale): delta = scale * lhs @ rhs
        if len(factors) == 1:
            proxy = layer._LoraFactorsProxy(*factors[0])
        else:  # sum_i s_i lhs_i rhs_i = [s_0 lhs_0 | s_1 lhs_1 | ...] @ [rhs_0; rhs_1; ...]: adapter-sized copies
            proxy = layer._LoraFactorsProxy(torch.cat([lhs * s for lhs, _, s in factors], -1),
                                            torch.cat([rhs for _, rhs, _ in factors], -2), 1.0)
        name, requires_grad = self.parameter_name, self.get_param().requires_grad
        parametrize.register_parametrization(experts, name, proxy, unsafe=True)
        experts.parametrizations[name].original.requires_grad_(requires_grad)
        try:
            with parametrize.cached():
                yield
        finally:
            # Not PEFT's _remove_parametrizations: on a parameter with other parametrizations it removes only a
            # _LoraParameterProxy, so ours would stay and add the delta once more at every forward.
            chain = experts.parametrizations[name]
            if len(chain) == 1:
                parametrize.remove_parametrizations(experts, name, leave_parametrized=False)
            else:
                del chain[next(i for i, p in enumerate(chain) if p is proxy)]

    _activate_lora._moekernels_wraps = peft_activate
    wrapper._activate_lora = _activate_lora
    return True


def unpatch_peft() -> None:
    """Give PEFT's ``ParamWrapper`` its own ``_activate_lora`` back (undo :func:`patch_peft`), for good: LoRA on the
    experts then takes PEFT's W + delta. :func:`patch_peft` patches again."""
    global _peft_decided
    _peft_decided = True
    wrapper = getattr(_peft_lora_layer(), "ParamWrapper", None)
    ours = getattr(wrapper, "_activate_lora", None)
    if hasattr(ours, "_moekernels_wraps"):
        wrapper._activate_lora = ours._moekernels_wraps


def _weight_and_lora(experts: nn.Module, name: str):
    """The weight ``name`` of ``experts`` as stored, and its LoRA as ``(a [E, r, K], b [E, N, r], scale)`` in the
    [E, N, K] orientation (delta = scale * b @ a), or None.

    Under a PEFT adapter (see :func:`patch_peft`) the weight is parametrized by a ``_LoraFactorsProxy``: the base
    weight and the factors are taken from it, without evaluating W + delta. Anything else is read as it is: no
    parametrization (no adapter, adapters disabled or merged into the weight) or another parametrization.
    """
    parametrizations = getattr(experts, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        return getattr(experts, name), None
    _patch_peft()  # PEFT imported after register(): this forward's wrappers have run, the next ones are patched
    chain, layer = parametrizations[name], _peft_lora_layer()
    proxy, base = chain[0], chain.original
    if len(chain) != 1 or not isinstance(proxy, getattr(layer, "_LoraFactorsProxy", ())):
        return getattr(experts, name), None
    lhs, rhs, scale = proxy.lhs, proxy.rhs, float(proxy.scaling)  # delta as stored = scale * lhs @ rhs
    if getattr(experts, "is_transposed", False):  # stored [E, K, N]: delta^T = scale * rhs^T @ lhs^T
        return base, (lhs.transpose(1, 2), rhs.transpose(1, 2), scale)
    return base, (rhs, lhs, scale)


def _lora_gemm(x: torch.Tensor, lora, offs: torch.Tensor) -> torch.Tensor:
    """scale * (x A_e^T) B_e^T for expert-sorted rows: two grouped GEMMs through rank r, never B A."""
    a, b, scale = lora
    return grouped_mm(grouped_mm(x, a.transpose(1, 2), offs, backend=BACKEND), b.transpose(1, 2), offs,
                      backend=BACKEND) * scale


def _experts_unfused(experts: nn.Module, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor,
                     weights: torch.Tensor, precision: str | None = None, lora1=None, lora2=None) -> torch.Tensor:
    """The stages one by one, for experts ``fused_moe`` cannot take: the module's own gate (or activation), biases
    and post-expert norm run in torch between two grouped GEMMs. ``lora1`` / ``lora2``: :func:`_weight_and_lora`'s
    adapters of w1 / w2, added by :func:`_lora_gemm`."""
    num_experts = experts.num_experts
    if x.shape[0] == 0:  # no tokens (an idle rank): an empty [0, H], still in the graph as fused_moe's is
        return x * 0
    transposed = getattr(experts, "is_transposed", False)
    plan = plan_routing(ids, num_experts, backend=BACKEND)
    offs = plan.expert_offsets
    gemm = grouped_mm
    if precision == "fp8":
        from ..fp8 import grouped_mm_fp8 as gemm
    # grouped_mm takes [E, K, N]: transformers' default layout [E, N, K] is passed as its transposed view.
    xp = permute(x, plan, backend=BACKEND)
    z = gemm(xp, w1 if transposed else w1.transpose(1, 2), offs, backend=BACKEND)
    if lora1 is not None:
        z = z + _lora_gemm(xp, lora1, offs)
    has_bias = getattr(experts, "has_bias", False)
    if has_bias:
        rows = _row_experts(ids, plan, num_experts)
        bias = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
        z = z + bias.index_select(0, rows)
    h = experts._apply_gate(z) if getattr(experts, "has_gate", True) else experts.act_fn(z)
    h = h.to(w2.dtype)
    y = gemm(h, w2 if transposed else w2.transpose(1, 2), offs, backend=BACKEND)
    if lora2 is not None:
        y = y + _lora_gemm(h, lora2, offs)
    if has_bias:
        y = y + experts.down_proj_bias.index_select(0, rows)
    if getattr(experts, "has_post_expert_norm", False):
        y = experts.post_expert_norm(y)
    return unpermute(y, plan, weights, backend=BACKEND)


def moekernels_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                               top_k_weights: torch.Tensor, precision: str | None = None) -> torch.Tensor:
    """The ``"moekernels"`` experts implementation: ``self`` is a transformers experts module (``gate_up_proj``,
    ``down_proj``, ...), hidden_states [T, H], top_k_index [T, k] and top_k_weights [T, k] its router's output.
    Returns [T, H] in hidden_states' dtype. ``precision="fp8"`` is ``"moekernels_fp8"``: the expert GEMMs, forward
    and backward, on e4m3 (DeepSeek-V3's recipe) with the model's weights as the master copy."""
    # Under PEFT, the base weights and their adapters' factors (see _weight_and_lora): W + scale * B A is never built.
    name1 = "gate_up_proj" if getattr(self, "has_gate", True) else "up_proj"
    w1, lora1 = _weight_and_lora(self, name1)
    w2, lora2 = _weight_and_lora(self, "down_proj")
    if precision is not None and (lora1 or lora2):
        raise ValueError(f"{type(self).__name__}: {IMPLEMENTATION_FP8!r} trains the base weights on e4m3 and takes "
                         f"no LoRA adapters (PEFT's); use experts_implementation={IMPLEMENTATION!r} for LoRA")
    if w1.dtype not in _DTYPES:
        raise TypeError(f"{type(self).__name__}: the {IMPLEMENTATION!r} experts take bfloat16, float16 or float32 "
                        f"weights, got {str(w1.dtype).removeprefix('torch.')}; use experts_implementation='eager'")
    # Under autocast the input may come in float32 with bf16 weights: the GEMMs run in the weights' dtype, as
    # transformers' grouped_mm does.
    x = hidden_states.to(w1.dtype)
    ids, weights = top_k_index, top_k_weights
    if getattr(self, "_is_expert_parallel", False) and ids.device.type != "cuda":
        # Expert parallelism marks other ranks' pairs with ids >= E. A CUDA plan drops them for free; a CPU one
        # raises on them, so they go to expert E-1 with weight 0 (and no router gradient), as batched_mm does.
        sentinel = ids >= self.num_experts
        ids, weights = ids.clamp(max=self.num_experts - 1), weights.masked_fill(sentinel, 0.0)
    activation = _fused_activation(self)
    if activation is None:
        y = _experts_unfused(self, x, w1, w2, ids, weights, precision, lora1, lora2)
    else:
        if (lora1 or lora2) and torch.is_grad_enabled() and (w1.requires_grad or w2.requires_grad):
            # fused_moe(lora=...) gives the base weights no gradient; base weights trained along with their adapter
            # take PEFT's W + delta, which gives both theirs.
            w1, w2, lora1, lora2 = getattr(self, name1), self.down_proj, None, None
        transposed = getattr(self, "is_transposed", False)
        w_gate_up = w1.transpose(1, 2) if transposed else w1  # [E, 2I, H], a view where stored [E, H, 2I]
        w_down = w2.transpose(1, 2) if transposed else w2  # [E, H, I]
        lora = {}
        if lora1 is not None or lora2 is not None:
            (a1, b1, s1), (a2, b2, s2) = lora1 or (None, None, 1.0), lora2 or (None, None, None)
            lora = dict(lora=ExpertsLoRA(a1, b1, a2, b2, scale=s1, scale2=s2))
        y = fused_moe(x, w_gate_up, w_down, weights, ids, activation=activation, precision=precision,
                      backend=BACKEND, **lora)
    return y.to(hidden_states.dtype)


def moekernels_fp8_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"moekernels_fp8"`` experts implementation: :func:`moekernels_experts_forward` with ``precision="fp8"``."""
    return moekernels_experts_forward(self, hidden_states, top_k_index, top_k_weights, precision="fp8")


def register() -> None:
    """Register ``"moekernels"`` and ``"moekernels_fp8"`` in transformers' ``ExpertsInterface``, and, if PEFT is
    imported, let its LoRA reach these experts as factors (:func:`patch_peft`, unless ``MOEKERNELS_PEFT_PATCH=0``).
    Done on import; calling it again (after importing PEFT) is harmless."""
    ExpertsInterface.register(IMPLEMENTATION, moekernels_experts_forward)
    ExpertsInterface.register(IMPLEMENTATION_FP8, moekernels_fp8_experts_forward)
    _patch_peft()


register()


# ----------------------------------------------------------------------------- transformers block -> moekernels.MoE


def _router(block: nn.Module) -> nn.Module:
    router = getattr(block, "gate", None)
    if router is None:
        router = getattr(block, "router", None)
    if router is None or not isinstance(getattr(router, "weight", None), torch.Tensor):
        raise ValueError(f"block: {type(block).__name__} has no router with a weight [E, H] (block.gate)")
    if isinstance(getattr(router, "bias", None), torch.Tensor):
        raise ValueError(f"block: the router of {type(block).__name__} has a bias; moekernels.MoE's gate has none "
                         f"(gpt-oss): use experts_implementation={IMPLEMENTATION!r} instead")
    return router


def _routing(router: nn.Module) -> dict:
    """MoE's routing arguments that reproduce the router's choice and weights."""
    if hasattr(router, "e_score_correction_bias"):
        # DeepSeek-V3: sigmoid scores, groups ranked by the sum of their two best biased scores, the bias chooses
        # experts without weighting them, renormalized, then scaled.
        return dict(scoring="sigmoid", renormalize=bool(router.norm_topk_prob), n_group=router.num_group,
                    topk_group=router.topk_group, routed_scaling_factor=float(router.routed_scaling_factor),
                    correction_bias=True)
    if hasattr(router, "norm_topk_prob"):  # Qwen2/3-MoE: softmax, then top-k, renormalized or not
        return dict(scoring="softmax", renormalize=bool(router.norm_topk_prob))
    if type(router).__name__ == "MixtralTopKRouter":  # always renormalized
        return dict(scoring="softmax", renormalize=True)
    raise ValueError(f"block: unknown router {type(router).__name__}; moe_from_block knows Mixtral's, Qwen3-MoE's "
                     "and DeepSeek-V3's")


def moe_from_block(block: nn.Module, *, backend: str | None = None) -> MoE:
    """A :class:`moekernels.MoE` holding a copy of a transformers MoE block's weights: router gate, DeepSeek-V3's
    ``e_score_correction_bias``, routed experts and shared experts, in the block's dtype and on its device.

    Args:
        block: a ``MixtralSparseMoeBlock``, ``Qwen3MoeSparseMoeBlock`` or ``DeepseekV3MoE`` (or a block built the
            same way). Qwen2-MoE's sigmoid-gated shared expert and gpt-oss's biases have no counterpart in ``MoE``:
            they raise ValueError (their experts run under ``experts_implementation="moekernels"``).
        backend: the MoE's backend (None: automatic).

    Returns:
        The MoE, in the block's training mode; ``moe(x)`` equals ``block(x)`` to rounding. Mixtral's router jitter
        (training only, off by default) is not reproduced. DeepSeek-V3 computes its router logits in float32 whatever
        the model's dtype; the MoE's gate runs in the block's expert dtype, so in bf16 the two may differ in rounding.
    """
    if hasattr(block, "shared_expert_gate"):
        raise ValueError(f"block: {type(block).__name__} gates its shared expert with a sigmoid, which "
                         f"moekernels.MoE lacks (Qwen2-MoE): use experts_implementation={IMPLEMENTATION!r} instead")
    router, experts = _router(block), getattr(block, "experts", None)
    if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor):
        raise ValueError(f"block: {type(block).__name__} has no experts module with gate_up_proj (block.experts)")
    activation = _fused_activation(experts)
    if activation is None:
        raise ValueError(f"block: {type(experts).__name__} is not gate-then-up SwiGLU / GeGLU experts without biases, "
                         f"the only experts moekernels.MoE holds: use experts_implementation={IMPLEMENTATION!r}")
    transposed = getattr(experts, "is_transposed", False)
    w_gate_up = experts.gate_up_proj.transpose(1, 2) if transposed else experts.gate_up_proj
    w_down = experts.down_proj.transpose(1, 2) if transposed else experts.down_proj
    num_experts, two_i, hidden = w_gate_up.shape
    shared = getattr(block, "shared_experts", None)
    num_shared = 0
    if shared is not None:
        shared_i = shared.gate_proj.out_features
        if shared_i % (two_i // 2) or _activation(getattr(shared, "act_fn", None)) != "silu":
            raise ValueError(f"block: moekernels.MoE's shared experts are SwiGLU of intermediate size I * n (I = "
                             f"{two_i // 2}); {type(shared).__name__} has {shared_i} and {shared.act_fn}")
        num_shared = shared_i // (two_i // 2)
    moe = MoE(hidden, two_i // 2, num_experts, router.top_k, **_routing(router), num_shared_experts=num_shared,
              activation=activation, dtype=w_gate_up.dtype, device=w_gate_up.device,
              router_dtype=router.weight.dtype, backend=backend)
    with torch.no_grad():
        moe.gate.weight.copy_(router.weight)
        moe.w_gate_up.copy_(w_gate_up)
        moe.w_down.copy_(w_down)
        if moe.e_score_correction_bias is not None:
            moe.e_score_correction_bias.copy_(router.e_score_correction_bias)
        if shared is not None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(moe.shared_experts, name).weight.copy_(getattr(shared, name).weight)
    return moe.train(block.training)


# ----------------------------------------------------------------------------- user modules with w13 / w2


def experts_forward(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor, *, activation: str = "silu", transposed: bool = False,
                    backend: str | None = None) -> torch.Tensor:
    """vLLM's ``fused_experts`` contract on :func:`moekernels.fused_moe`, for code that holds its own experts.

    Args:
        hidden_states: [..., H] tokens (bfloat16, float16 or float32); cast to the weights' dtype for the GEMMs.
        w13: [E, 2I, H], gate (w1) rows then up (w3) rows; with ``transposed=True``, [E, H, 2I].
        w2: [E, H, I] down projection; with ``transposed=True``, [E, I, H]. Transposed weights are read through
            views, never copied.
        topk_weights: [..., k] router weights; topk_ids: [..., k] int32 / int64 expert ids.
        activation: ``"silu"`` (SwiGLU) or ``"gelu"`` (GeGLU, exact erf gelu).
        backend: ``"torch"``, ``"triton"``, ``"cuda"`` or None (``BACKEND``, then automatic).

    Returns:
        [..., H] in hidden_states' dtype, differentiable with respect to hidden_states, w13, w2 and topk_weights.
    """
    if transposed:
        w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1]).to(w13.dtype)
    k = topk_ids.shape[-1]
    y = fused_moe(x, w13, w2, topk_weights.reshape(-1, k), topk_ids.reshape(-1, k), activation=activation,
                  backend=backend or BACKEND)
    return y.to(hidden_states.dtype).view(shape)


def patch_experts(module: nn.Module, *, w13: str = "w13", w2: str = "w2", activation: str = "silu",
                  transposed: bool = False, backend: str | None = None) -> nn.Module:
    """Make ``module.forward(hidden_states, topk_weights, topk_ids)`` run :func:`experts_forward` on the module's own
    parameters ``getattr(module, w13)`` and ``getattr(module, w2)`` (vLLM's ``w13_weight`` / ``w2_weight`` layout:
    [E, 2I, H] gate then up, and [E, H, I]). The parameters stay where they are (training, state dicts and
    ``.to()`` are unchanged); only this instance's forward is replaced, and ``unpatch_experts`` restores it.
    Returns the module.
    """
    for arg, name in (("w13", w13), ("w2", w2)):
        if not isinstance(getattr(module, name, None), torch.Tensor):
            raise ValueError(f"{arg}: {type(module).__name__} has no tensor attribute {name!r}")
    if activation not in ("silu", "gelu"):
        raise ValueError(f"activation must be one of ('silu', 'gelu'), got {activation!r}")

    def forward(self, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        return experts_forward(hidden_states, getattr(self, w13), getattr(self, w2), topk_weights, topk_ids,
                               activation=activation, transposed=transposed, backend=backend)

    module.forward = types.MethodType(forward, module)
    return module


def unpatch_experts(module: nn.Module) -> nn.Module:
    """Undo :func:`patch_experts`: the class's forward again."""
    module.__dict__.pop("forward", None)
    return module
