"""LoRA adapters on the routed experts: what :func:`moekernels.fused_moe` takes as ``lora=``.

Per expert e, with the frozen base weights W1 [E, 2I, H] and W2 [E, H, I]:

    gate_up = x W1_e^T + s1 (x A1_e^T) B1_e^T
    y       = h W2_e^T + s2 (h A2_e^T) B2_e^T

``W + s B A`` is never formed (PEFT's ``target_parameters`` does, a copy of the whole expert
stack every forward). The low-rank rows ``t = s (x A^T)`` [T*k, r] are one small grouped GEMM
on the rows GEMM 1 gathers (GEMM 2's: on h), kept in the compute dtype; ``t B^T`` joins the base
GEMM's accumulator as a second, r-long K segment (``grouped_gemm.fused_op``'s ``lora_x`` and
``lora_w``), before the activation of GEMM 1 and before the router weight and the scatter of
GEMM 2. Backward gives the adapters and the tokens (and the router weights) their gradients and
the base weights none (frozen, even where they require grad); dx goes through the base weights
with the same fused low-rank segment: ``dz W1 + s1 (dz B1) A1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks


@dataclass(frozen=True)
class ExpertsLoRA:
    """The adapters of the two expert projections (either pair may be None: no adapter there).

    Attributes:
        a1: [E, r1, H] LoRA A of gate_up (PEFT's ``lora_A``), in the tokens' dtype.
        b1: [E, 2I, r1] LoRA B of gate_up: gate rows, then up rows, as ``w_gate_up``.
        a2: [E, r2, I] LoRA A of down.
        b2: [E, H, r2] LoRA B of down.
        scale: s1, the scaling of gate_up's adapter (PEFT's ``lora_alpha / r``).
        scale2: s2, the down adapter's; None: ``scale``.

    Any strides (views of other layouts are read in place); ranks from 1 up, not necessarily
    powers of two, and r1 and r2 may differ.
    """

    a1: torch.Tensor | None = None
    b1: torch.Tensor | None = None
    a2: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    scale: float = 1.0
    scale2: float | None = None

    @property
    def scales(self) -> tuple[float, float]:
        return float(self.scale), float(self.scale if self.scale2 is None else self.scale2)

    def tensors(self) -> tuple:
        return self.a1, self.b1, self.a2, self.b2


def check(lora: ExpertsLoRA, hidden: torch.Tensor, num_experts: int, two_i: int) -> None:
    """Shapes, dtypes and devices of ``lora``'s adapters against the layer's, each error naming
    the field."""
    hid, inter = hidden.shape[1], two_i // 2
    for a_name, b_name, (n_out, n_in) in (("a1", "b1", (two_i, hid)), ("a2", "b2", (hid, inter))):
        a, b = getattr(lora, a_name), getattr(lora, b_name)
        if (a is None) != (b is None):
            raise ValueError(f"lora.{a_name} and lora.{b_name} go together: give both or neither")
        if a is None:
            continue
        for name, t in ((a_name, a), (b_name, b)):
            _checks.tensor(f"lora.{name}", t, ndim=3, dtypes=(hidden.dtype,), device=hidden.device)
        rank = a.shape[1]
        if tuple(a.shape) != (num_experts, rank, n_in) or rank < 1:
            raise ValueError(f"lora.{a_name} must be [E, r, {n_in}] with E={num_experts} and r >= 1, got "
                             f"{tuple(a.shape)}")
        if tuple(b.shape) != (num_experts, n_out, rank):
            raise ValueError(f"lora.{b_name} must be [E, {n_out}, r] = {(num_experts, n_out, rank)} to match "
                             f"lora.{a_name} {tuple(a.shape)}, got {tuple(b.shape)}")
    for name, s in (("scale", lora.scale), ("scale2", lora.scale2)):
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float))):
            raise TypeError(f"lora.{name} must be a float, got {type(s).__name__}")
