"""Integrations with other libraries, each imported on its own so that ``import moekernels`` pulls in none of them.

- ``moekernels.integrations.transformers``: importing it registers ``"moekernels"`` as a transformers v5 experts
  implementation; it also builds :class:`moekernels.MoE` from a transformers MoE block (``moe_from_block``) and
  patches user modules that hold their own vLLM-style ``w13`` / ``w2`` experts (``patch_experts``).
- ``moekernels.integrations.torchtitan``: torchtitan 0.3.0's overrides (``--override.imports
  moekernels.integrations.torchtitan.routed_experts``): its routed experts on ``fused_moe``, its experts' GEMMs on
  ``grouped_mm`` / ``grouped_mm_fp8``, its expert-parallel dispatcher on ``moekernels.distributed``.
"""
