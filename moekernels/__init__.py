"""moekernels: fused Triton and CUDA kernels for Mixture-of-Experts layers on Hopper GPUs.

Importing it needs neither a GPU nor the compiled extension; ``HAS_CUDA_EXT`` says whether
the extension ``moekernels._C`` is there. The data flow, one module per stage, is in
docs/ARCHITECTURE.md; every public op has a pure-PyTorch twin in ``moekernels.reference``.

Importing it never imports transformers. Where transformers is already imported, it registers
``"moekernels"`` as a transformers experts implementation; otherwise
``moekernels.register_transformers()`` does (it returns the name to pass as
``experts_implementation=``).
"""

import sys

from . import distributed, reference
from ._ext import HAS_CUDA_EXT
from .fp8 import fp8_grouped_mm, fp8_mm, quantize_fp8
from .grouped_gemm import grouped_mm
from .lora import ExpertsLoRA
from .moe import MoE, fused_moe
from .permute import permute, unpermute
from .plan import RoutingPlan, plan_routing
from .route import load_balancing_loss, router_z_loss, sequence_balance_loss, topk_routing, update_correction_bias

__version__ = "0.1.0"
__all__ = [
    "ExpertsLoRA", "HAS_CUDA_EXT", "MoE", "RoutingPlan", "distributed", "fp8_grouped_mm", "fp8_mm", "fused_moe", "grouped_mm",
    "load_balancing_loss", "permute", "plan_routing", "quantize_fp8", "reference", "register_transformers",
    "router_z_loss", "sequence_balance_loss", "topk_routing", "unpermute", "update_correction_bias", "__version__",
]


def register_transformers() -> str:
    """Register ``"moekernels"`` in transformers' experts interface (transformers >= 5) and return that name, for
    ``from_pretrained(..., experts_implementation=moekernels.register_transformers())``. Imports transformers;
    calling it again is harmless. Without it transformers raises ``ValueError: Specified
    `experts_implementation="moekernels"` is not supported...``."""
    from .integrations import transformers as integration

    integration.register()
    return integration.IMPLEMENTATION


# transformers (5.24) looks experts_implementation up in ExpertsInterface's class-level mapping only:
# no entry points, no hook that would let a package imported after it register. So register here
# when transformers came first, and register_transformers() covers the other order. Never import
# transformers otherwise (seconds, and a dependency moekernels does not have; tests check it).
if sys.modules.get("transformers") is not None:
    try:
        register_transformers()
    except ImportError:  # transformers 4.x: no experts interface, nothing to register in
        pass
