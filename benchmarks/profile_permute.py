"""Launches the issue-3 kernels at their target sizes, twice, for a profiler: the DeepSeek-V3 plan
(T = 4096, E = 256, k = 8, B = 64) and permute / unpermute (T = 16384, k = 8, H = 7168, bf16).

    ncu --clock-control none --kernel-name regex:"plan_|scatter_rows|combine_rows" \\
        --launch-skip 6 --launch-count 6 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        python3 -m benchmarks.profile_permute

One round is 6 launches (count, scan, scatter, pad; permute; unpermute; the plan of the 16384
tokens is made once, before): skip the first round, which compiles, and read the second.
"""

import torch

import moekernels
from .shapes import DEEPSEEK_V3 as S
from .shapes import balanced_ids


def main() -> None:
    ids_plan = balanced_ids(S, 4096, "cuda")
    ids = balanced_ids(S, 16384, "cuda")
    plan = moekernels.plan_routing(ids, S.experts, backend="torch")
    x = torch.randn(16384, S.hidden, device="cuda", dtype=torch.bfloat16)
    y_sorted = torch.randn(16384 * S.top_k, S.hidden, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(16384, S.top_k, device="cuda")
    for _ in range(2):
        moekernels.plan_routing(ids_plan, S.experts, block_size=64, backend="triton")
        moekernels.permute(x, plan, backend="triton")
        moekernels.unpermute(y_sorted, plan, weights, backend="triton")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
