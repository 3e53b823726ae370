"""Launches the DeepSeek-V3 router (T = 40,000) on each kernel backend, for a profiler.

    ncu --clock-control none --kernel-name regex:topk_routing --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 -m benchmarks.profile_route

The first two launches (one per backend) warm up and compile; the next two are the ones to read.
"""

import torch

import moekernels
from .shapes import DEEPSEEK_V3 as S


def main() -> None:
    logits = torch.randn(40000, S.experts, device="cuda")
    bias = torch.randn(S.experts, device="cuda") * 0.1
    backends = ["triton"] + (["cuda"] if moekernels.HAS_CUDA_EXT else [])
    for _ in range(2):
        for backend in backends:
            moekernels.topk_routing(
                logits, S.top_k, scoring=S.scoring, renormalize=S.renormalize, bias=bias,
                n_group=S.n_group, topk_group=S.topk_group,
                routed_scaling_factor=S.routed_scaling_factor, backend=backend,
            )
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
