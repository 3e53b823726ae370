"""Tile choices: pure functions of the problem, so the first call never autotunes.

Each launcher asks here and nowhere else; tests may monkeypatch these functions. The token
count is never an input (a new T must not mean a new compile: decode steps vary T every step).
"""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class RouteConfig:
    BLOCK_T: int  # tokens per program
    BLOCK_G: int  # expert groups, padded to a power of two
    BLOCK_S: int  # experts per group, padded to a power of two
    BLOCK_K: int  # weights rescaled per step of the renormalisation pass
    num_warps: int


# ~2048 logits per program: 8 per thread at 8 warps keeps the working set (logit, score,
# choice, 64-bit key) near 80 registers, and one program's 8 KB of fp32 logits in flight.
_ROUTE_TILE = 2048


def route_config(num_experts: int, top_k: int, n_group: int) -> RouteConfig:
    block_g = triton.next_power_of_2(n_group)
    block_s = triton.next_power_of_2(num_experts // n_group)
    block_t = max(1, _ROUTE_TILE // (block_g * block_s))
    num_warps = 4 if block_t * block_g * block_s <= 1024 else 8
    return RouteConfig(block_t, block_g, block_s, min(triton.next_power_of_2(top_k), 32), num_warps)
