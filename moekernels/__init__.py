"""moekernels: fused Triton and CUDA kernels for Mixture-of-Experts layers on Hopper GPUs.

Importing it needs neither a GPU nor the compiled extension; ``HAS_CUDA_EXT`` says whether
the extension ``moekernels._C`` is there. The data flow, one module per stage, is in
DESIGN.md; every public op has a pure-PyTorch twin in ``moekernels.reference``.
"""

from . import reference
from ._ext import HAS_CUDA_EXT
from .route import topk_routing

__version__ = "0.1.0"
__all__ = ["HAS_CUDA_EXT", "reference", "topk_routing", "__version__"]
