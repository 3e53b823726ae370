"""moekernels: fused Triton and CUDA kernels for Mixture-of-Experts layers on Hopper GPUs.

Importing it needs neither a GPU nor the compiled extension; ``HAS_CUDA_EXT`` says whether
the extension ``moekernels._C`` is there. The data flow, one module per stage, is in
DESIGN.md; every public op has a pure-PyTorch twin in ``moekernels.reference``.
"""

from . import distributed, reference
from ._ext import HAS_CUDA_EXT
from .fp8 import fp8_grouped_mm, fp8_mm, quantize_fp8
from .grouped_gemm import grouped_mm
from .moe import MoE, fused_moe
from .permute import permute, unpermute
from .plan import RoutingPlan, plan_routing
from .route import load_balancing_loss, router_z_loss, sequence_balance_loss, topk_routing, update_correction_bias

__version__ = "0.1.0"
__all__ = [
    "HAS_CUDA_EXT", "MoE", "RoutingPlan", "distributed", "fp8_grouped_mm", "fp8_mm", "fused_moe", "grouped_mm",
    "load_balancing_loss", "permute", "plan_routing", "quantize_fp8", "reference", "router_z_loss",
    "sequence_balance_loss", "topk_routing", "unpermute", "update_correction_bias", "__version__",
]
