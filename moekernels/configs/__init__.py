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


@dataclass(frozen=True)
class PlanConfig:
    BLOCK_N: int  # pairs per program (a chunk of the counting sort)
    SUB: int  # pairs per step of the rank pass: a [SUB, BLOCK_E] one-hot tile
    BLOCK_E: int  # experts, padded to a power of two
    BLOCK_CH: int  # chunks per step of the scan
    BLOCK_EB: int  # experts per program of the scan
    num_warps: int


# 256 pairs a program: DeepSeek-V3 at T = 4096 (32768 pairs) spreads over 128 programs, about
# one per SM of an H100/H200. A one-hot step of 4096 elements is 32 per thread at 4 warps; a
# step of more than 32 pairs costs registers for the cumsum over pairs (193 at [64, 64], 72 at
# [16, 256], from ptxas on sm_90a).
_PLAN_CHUNK = 256
_PLAN_TILE = 4096
_PLAN_SUB = 32


def plan_config(num_experts: int) -> PlanConfig:
    block_e = triton.next_power_of_2(num_experts)
    sub = max(1, min(_PLAN_SUB, _PLAN_TILE // block_e))
    return PlanConfig(BLOCK_N=_PLAN_CHUNK, SUB=sub, BLOCK_E=block_e, BLOCK_CH=64, BLOCK_EB=32, num_warps=4)


def pad_blocks_per_program(block_b: int, block_e: int) -> int:
    """Blocks of the padded layout per program: [NB, BLOCK_B] rows and [NB, BLOCK_E] experts
    tiles of at most 2048 elements (8 blocks at B = 128, E = 256)."""
    return max(1, 2048 // max(block_b, block_e))


@dataclass(frozen=True)
class RowsConfig:
    BLOCK_T: int  # tokens per program
    BLOCK_H: int  # columns per step
    num_warps: int


def rows_config(hidden: int, itemsize: int) -> RowsConfig:
    """permute / unpermute tiles: a step moves 16 bytes per thread per token row (8 bf16, 4 fp32),
    and a program holds 4 token rows, so 4 warps keep four 16-byte accesses in flight each."""
    num_warps = 4
    block_h = min(triton.next_power_of_2(hidden), 16 // itemsize * 32 * num_warps)
    return RowsConfig(BLOCK_T=4, BLOCK_H=block_h, num_warps=num_warps)


@dataclass(frozen=True)
class LossConfig:
    BLOCK_T: int
    BLOCK_E: int
    num_warps: int


def loss_config(num_experts: int) -> LossConfig:
    """Router losses: whole rows of logits, about 4096 of them a program."""
    block_e = triton.next_power_of_2(num_experts)
    return LossConfig(BLOCK_T=max(1, 4096 // block_e), BLOCK_E=block_e, num_warps=8 if block_e >= 4096 else 4)
