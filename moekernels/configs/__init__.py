"""Tile choices: pure functions of the problem, so the first call never autotunes.

Each launcher asks here and nowhere else; tests may monkeypatch these functions. The token
count is never an input (a new T must not mean a new compile: decode steps vary T every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class RouteConfig:
    row_len: int  # experts per tile row: the group size, or BLOCK_C without groups
    BLOCK_T: int  # tokens per program
    BLOCK_R: int  # rows (groups), padded to a power of two
    BLOCK_C: int  # columns, padded to a power of two
    BLOCK_K: int  # top_k padded to a power of two, at most 32: the register tile of picks
    num_warps: int


# ~2048 logits per program: 8 per thread at 8 warps keeps the working set (logit, score,
# choice, 64-bit key) under 100 registers, and one program's 8 KB of fp32 logits in flight.
_ROUTE_TILE = 2048
# Without groups a row is one expert per lane of a warp (see kernels/_route.py).
_ROUTE_ROW = 32


def route_config(num_experts: int, top_k: int, n_group: int) -> RouteConfig:
    if n_group > 1:
        row = num_experts // n_group
        block_r, block_c = triton.next_power_of_2(n_group), triton.next_power_of_2(row)
    else:
        block_c = min(triton.next_power_of_2(num_experts), _ROUTE_ROW)
        row, block_r = block_c, triton.cdiv(triton.next_power_of_2(num_experts), block_c)
    block_t = max(1, _ROUTE_TILE // (block_r * block_c))
    num_warps = max(1, min(8, block_t))  # a warp per token at most: warps never split a token
    return RouteConfig(row, block_t, block_r, block_c, min(triton.next_power_of_2(top_k), 32), num_warps)
