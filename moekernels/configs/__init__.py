"""Tile choices: pure functions of the problem, so the first call never autotunes.

Each launcher asks here and nowhere else; tests may monkeypatch these functions. The token
count never picks tiles (a new T must not mean a new compile: decode steps vary T every step);
it only chooses whether a small gated decode step splits, between two compiled launches.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
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
    ROW: int = 0  # row_len as a constexpr (16-byte loads, tokens sharing a warp), or 0: run-time


# ~2048 logits per program: 8 per thread at 8 warps keeps the working set (logit, score,
# choice, key) small, and one program's 8 KB of fp32 logits in flight (ROW rows: 32 a thread,
# 117 registers for DeepSeek-V3).
_ROUTE_TILE = 2048
# Without groups a row is one expert per lane of a warp (see kernels/_route.py).
_ROUTE_ROW = 32


def route_config(num_experts: int, top_k: int, n_group: int, itemsize: int = 4, aligned: bool = False) -> RouteConfig:
    """``aligned``: the logits rows start on 16 bytes (pointer and stride, and E a multiple of
    16, all as Triton specialises them), so that rows of exactly 32 experts load 16 bytes a
    thread."""
    if n_group > 1:
        row = num_experts // n_group
        block_r, block_c = triton.next_power_of_2(n_group), triton.next_power_of_2(row)
    else:
        block_c = min(triton.next_power_of_2(num_experts), _ROUTE_ROW)
        row, block_r = block_c, triton.cdiv(triton.next_power_of_2(num_experts), block_c)
    block_t = max(1, _ROUTE_TILE // (block_r * block_c))
    num_warps = max(1, min(8, block_t))  # a warp per token at most: warps never split a token
    block_k = min(triton.next_power_of_2(top_k), 32)
    vec = 16 // itemsize
    if aligned and vec == 4 and row == block_c == _ROUTE_ROW and block_r * vec <= 32:
        # 16-byte loads: a thread holds vec adjacent experts of every row, 32 / vec lanes span a
        # row and a warp takes vec tokens, so the row reductions shuffle over 8 lanes (fp32)
        # instead of 32 and the rest of a token's work is shared 4 ways (DeepSeek-V3: 3,200 ->
        # 1,605 warp instructions per token, with no other change). Rows of 32 only: a narrower
        # row would leave lanes over for the rows, a warp per row. A thread holds BLOCK_R * vec
        # <= 32 experts (registers: E = 1024 keeps a warp per token). fp32 logits only: 16-bit
        # ones load 8 a thread, and Qwen3's bf16 E = 128 compiled so to 142 registers, one
        # program of 8 warps per SM.
        return RouteConfig(row, num_warps * vec, block_r, block_c, block_k, num_warps, ROW=row)
    return RouteConfig(row, block_t, block_r, block_c, block_k, num_warps)


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


HOPPER_SMEM_PER_SM = 228 * 1024  # bytes of shared memory per SM on sm_90 (227 KB usable per block)


# ----------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ArchLimits:
    """What a config choice knows of a GPU architecture: a pure function of its compute capability
    (:func:`arch_limits`), so that configs are chosen, and compiled, without a device. The occupancy
    rules are CUDA 13.0's cuda_occupancy.h (the calculator behind the driver's
    cudaOccupancyMaxActiveBlocksPerMultiprocessor) and the CUDA guide's per-capability table."""

    capability: int  # major * 10 + minor: 80, 86, 89, 90, 100, 120
    smem_per_sm: int  # bytes of shared memory an SM holds (the largest carveout)
    smem_per_block: int  # bytes one block can opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)
    max_warps: int  # resident warps per SM (maxThreadsPerMultiProcessor / 32)
    max_blocks: int  # resident blocks per SM
    barriers: int  # named barriers per SM: the block limit x 2 (sm_80, sm_90, sm_100) or x 1
    mma: str  # what Triton 3.6 lowers tl.dot to: "mma.sync", "wgmma" (sm_90a), "tcgen05" (sm_100a)
    tma: bool  # bulk tensor copies (cp.async.bulk.tensor): descriptor loads pipelined by TMA
    fp8: bool  # e4m3 tensor-core operands (Triton's fp8e4nv: sm_89 and later)
    registers: int = 65536  # the register file of an SM, in sub_partitions of equal size
    sub_partitions: int = 4  # a warp's registers come from one
    reg_granule: int = 256  # registers are allocated per warp, rounded up to 256 (8 a thread)
    max_registers: int = 255  # per thread (ptxas)
    smem_reserved: int = 1024  # the driver reserves 1 KB per block (reservedSharedMemPerBlock)
    smem_granule: int = 128

    @property
    def target(self) -> str:
        """ptxas's --gpu-name, as Triton 3.6 names it: the arch-specific ("a") target from sm_90 on."""
        return f"sm_{self.capability}" + ("a" if self.capability >= 90 else "")

    def fits(self, cfg: "GemmConfig", itemsize: int, variant: str = "plain") -> bool:
        """Whether a config's pipeline buffers (:func:`gemm_smem`) fit one block."""
        return gemm_smem(cfg, itemsize, variant, self) + self.smem_reserved <= self.smem_per_block


_KB = 1024
# Per compute capability. Shared memory: 164 KB an SM on sm_80, 100 KB on sm_86, sm_89 and sm_120,
# 228 KB on sm_90 and sm_100, 1 KB less a block; warps: 64 (sm_80, sm_90, sm_100) or 48.
ARCH_LIMITS = {
    80: ArchLimits(80, 164 * _KB, 163 * _KB, 64, 32, 64, "mma.sync", tma=False, fp8=False),  # A100
    86: ArchLimits(86, 100 * _KB, 99 * _KB, 48, 16, 16, "mma.sync", tma=False, fp8=False),  # RTX 30, A10, A40
    89: ArchLimits(89, 100 * _KB, 99 * _KB, 48, 24, 24, "mma.sync", tma=False, fp8=True),  # L4, L40S, RTX 40
    90: ArchLimits(90, HOPPER_SMEM_PER_SM, 227 * _KB, 64, 32, 64, "wgmma", tma=True, fp8=True),  # H100, H200
    100: ArchLimits(100, 228 * _KB, 227 * _KB, 64, 32, 64, "tcgen05", tma=True, fp8=True),  # B200, GB200
    120: ArchLimits(120, 100 * _KB, 99 * _KB, 48, 24, 24, "mma.sync", tma=True, fp8=True),  # RTX 50, RTX PRO
}
HOPPER = ARCH_LIMITS[90]


def arch_limits(capability) -> ArchLimits:
    """The limits of compute capability ``capability``: 90, "9.0" or (9, 0). A capability the table
    lacks takes its major's nearest lower entry (8.7 -> 8.6, 10.3 -> 10.0, 12.1 -> 12.0); at run time
    :func:`device_limits` checks it against the device."""
    if isinstance(capability, tuple):
        capability = capability[0] * 10 + capability[1]
    elif isinstance(capability, str):
        capability = int(capability.replace(".", "")) if "." in capability else int(capability)
    if not isinstance(capability, int) or isinstance(capability, bool):
        raise TypeError(f"capability must be an int such as 90, (9, 0) or '9.0', got {capability!r}")
    known = [c for c in ARCH_LIMITS if c // 10 == capability // 10 and c <= capability]
    if not known:
        raise ValueError(f"capability {capability} has no limits: known {sorted(ARCH_LIMITS)} (sm_80 and later)")
    return ARCH_LIMITS[max(known)]


def device_limits(props) -> ArchLimits:
    """The limits of a device from its properties (torch.cuda.get_device_properties): the table's
    entry for its capability, confirmed by what the device reports. A mismatch is reported (a
    warning naming the field) and the smaller value used, so that a config fits both."""
    import warnings

    table = arch_limits((props.major, props.minor))
    seen = {"smem_per_block": getattr(props, "shared_memory_per_block_optin", None),
            "smem_per_sm": getattr(props, "shared_memory_per_multiprocessor", None),
            "registers": getattr(props, "regs_per_multiprocessor", None)}
    threads = getattr(props, "max_threads_per_multi_processor", None)
    seen["max_warps"] = threads // 32 if threads else None
    fixed = {}
    for field_name, value in seen.items():
        want = getattr(table, field_name)
        if value is not None and value != want:
            warnings.warn(f"moekernels: {props.name} (sm_{table.capability}) reports {field_name} = {value}, "
                          f"the sm_{table.capability} table says {want}: configs use {min(value, want)}",
                          RuntimeWarning, stacklevel=2)
            fixed[field_name] = min(value, want)
    return dataclasses.replace(table, **fixed) if fixed else table


def gemm_smem(cfg: "GemmConfig", itemsize: int, variant: str = "plain", arch: ArchLimits = HOPPER) -> int:
    """Shared memory of a GEMM config's pipeline on ``arch``: Triton 3.6 keeps num_stages buffers of
    a K step's tiles where the MMA reads shared memory asynchronously (wgmma, tcgen05), and one
    fewer for mma.sync (compiled: the 128x128x64 bf16 tiles at 3 stages take 98,328 B on sm_90a and
    sm_100a, 65,552 B on sm_120; on sm_80 and sm_89, without TMA, the descriptor loads are not
    pipelined at all: 32,768 B)."""
    buffers = cfg.num_stages if arch.mma in ("wgmma", "tcgen05") else cfg.num_stages - 1
    return buffers * stage_bytes(cfg, itemsize, variant)


def fit_gemm_config(cfg: "GemmConfig", itemsize: int, variant: str, arch: ArchLimits) -> "GemmConfig":
    """Hopper's choice, shrunk until it fits ``arch``'s shared memory per block: fewer stages (down
    to two buffers: a load in flight while the MMA reads the other), then half BLOCK_N, then half
    BLOCK_M (16 at least; BLOCK_K stays: block-scaled fp8 needs its 128-wide K steps). Unchanged where it fits
    (every shipped config on sm_90 and sm_100). sm_120 and sm_89 (99 KB a block) take the gated
    decode tiles (36 KB a K step) at 3 stages, not 4."""
    least = 2 if arch.mma in ("wgmma", "tcgen05") else 3
    while not arch.fits(cfg, itemsize, variant):
        if cfg.num_stages > least:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.BLOCK_N > 16:
            cfg = dataclasses.replace(cfg, BLOCK_N=cfg.BLOCK_N // 2)
        elif cfg.BLOCK_M > 16:
            cfg = dataclasses.replace(cfg, BLOCK_M=cfg.BLOCK_M // 2)
        else:
            raise ValueError(f"no tile of {cfg} fits sm_{arch.capability}'s {arch.smem_per_block} B a block")
    return cfg


def fp8_path(arch: ArchLimits) -> str:
    """How the Triton kernels take e4m3 operands on ``arch``: "e4m3" (its own fp8 MMA and
    conversions, sm_89 and later), or "bytes": e4m3 tensors reach the kernels as uint8, decoded
    to bf16 in the GEMMs' load path and encoded with integer operations (grouped_gemm.fp8_bytes)."""
    return "e4m3" if arch.fp8 else "bytes"


def variant_fallback(name: str, arch: ArchLimits) -> str | None:
    """What runs instead of the shipped variant ``name`` on ``arch``, or None where it runs itself
    (the compile matrix compiles it). Every shipped variant runs on every architecture of the
    table: the fp8 ones take the byte route (fp8_path) where the GPU has no e4m3."""
    return None


# ----------------------------------------------------------------------------- grouped GEMM


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int  # token rows per tile (the reduction rows of the weight-gradient kernel)
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int  # tile rows per swizzle group (L2 reuse)
    SWAP_AB: bool  # decode: compute the transposed tile, weight columns in wgmma's M
    num_warps: int
    num_stages: int
    # decode, gated: the gate and up tiles as work items of their own (see split_gated_decode)
    SPLIT_GATED: bool = False


# The rows-per-expert classes a config is chosen for: the average M/E rounded up to a power of
# two in [16, 1024]. A decode step's token count changes every step; its class does not, so a
# new T is at most a new class (nine in all), never a new compile per T.
ROWS_CLASSES = (16, 32, 64, 128, 256, 512, 1024)
GEMM_VARIANTS = ("plain", "gated", "scatter", "dw", "unaligned")
_TABLE_DIR = os.path.dirname(os.path.abspath(__file__))


def rows_class(rows: int, experts: int) -> int:
    per_expert = -(-max(rows, 1) // max(experts, 1))
    return min(max(triton.next_power_of_2(per_expert), ROWS_CLASSES[0]), ROWS_CLASSES[-1])


def gemm_key(variant: str, rows_cls: int, n: int, k: int, dtype) -> str:
    """The key of a tuned table entry: variant, dtype, rows class, N, K."""
    return f"{variant}/{str(dtype).removeprefix('torch.')}/m{rows_cls}/n{n}/k{k}"


def table_path(gpu: str) -> str:
    return os.path.join(_TABLE_DIR, f"grouped_mm_{gpu}.json")


@functools.cache
def tuned_table(gpu: str | None) -> dict:
    """The offline tuner's table for a GPU (benchmarks/tune_grouped_mm.py writes it), or {}."""
    if gpu is None or not os.path.exists(table_path(gpu)):
        return {}
    with open(table_path(gpu)) as f:
        return json.load(f)["configs"]


def default_gemm_config(variant: str, rows_cls: int, itemsize: int, block_scaled: bool = False,
                        kmajor: bool = True) -> GemmConfig:
    """The untuned choice. On sm_90 (ptxas, sm_90a): 128x128x64 at 8 warps and 3 stages is 98 KB
    of shared memory and ~123 registers; the gated epilogue holds two accumulators, so it halves
    BLOCK_N to keep them at 64 registers a thread. fp32 operands (tf32) halve BLOCK_K."""
    # fp8 takes 128-wide K steps: the block-scaled mode promotes each (1, 128) x (128, 128) step,
    # and one stage of 128x128x128 fp8 tiles is the 32 KB of a 128x128x64 bf16 one.
    bk = {1: 128, 2: 64}.get(itemsize, 32)
    if variant == "dw":  # [BLOCK_K, BLOCK_N] of the weight gradient, BLOCK_M rows reduced a step
        if itemsize == 4:
            # tf32 reads the transposed segment copies by TMA (grouped_gemm._launch_dw): at 32 tokens
            # x 128 x 128 ptxas (sm_90a) gives 119 registers and 96 KB, two programs an SM, and
            # 32 KB of tiles a step for 1 MFLOP (64 x 128 x 64 took 48 KB, 144 KB in all: one).
            return GemmConfig(32, 128, 128, 8, False, 8, 3)
        return GemmConfig(64, 128, 128, 8, False, 8, 3)
    if variant == "unaligned":
        # Weight rows that are not 16-byte aligned (no model has them: a correctness fallback) go
        # through plain loads, without cp.async pipelining, a 64-bit address per element: at
        # 128x128x64 that spilled 44 bytes (ptxas, sm_90a); 64x64x32 at 4 warps does not.
        return GemmConfig(64, 64, 128 if itemsize == 1 else 32, 8, False, 4, 2)
    if rows_cls <= 16:
        # 1-16 rows per expert: the weights are the traffic (DeepSeek-V3 decode reads 14.7 MB per
        # touched expert pair of GEMMs). Swap A/B: a 16-row token tile in wgmma's N, 64 weight
        # columns in its M, deep K steps in flight (4 stages of 64x128 bf16: 64 KB).
        return GemmConfig(16, 64, min(2 * bk, 128), 1, True, 4, 4)
    if itemsize == 4 and not kmajor and variant == "plain":
        # An N-major fp32 weight (the backward dx of an nn.Linear-stored [E, N, K] weight): tf32
        # wgmma reads both shared-memory operands K-major only, so the weight tile went through
        # registers and back to shared memory transposed every K step (the round trip, 147
        # registers, one 8-warp program an SM). Swapping A and B makes the weight tile wgmma's A
        # operand, which it can take from registers in any order (kernels/_grouped_gemm._mma makes
        # it one): 128 token rows in wgmma's N, 64 weight columns in its M, 4 warps and 3 stages:
        # 162 registers, 65 KB, three programs an SM, no round trip, three of a K step's four
        # wgmmas in flight (ptxas, sm_90a, triton 3.6). 64 token rows for at most 64 an expert.
        return GemmConfig(64 if rows_cls <= 64 else 128, 64, bk, 8, True, 4, 3)
    if rows_cls <= 64 or block_scaled:
        # Block-scaled fp8 at every size past decode too: its loop waits for each wgmma before
        # promoting the step's product (wgmma depth 0: triton 3.6, see kernels/_grouped_gemm.py),
        # so the tensor cores idle through every promotion unless another program's wgmma fills
        # it. One warpgroup a program at 254 registers (ptxas, sm_90a; 98 KB of shared memory)
        # fits two programs an SM, which run their K loops independently (no barrier couples
        # them), where the 128-row tile's two warpgroups (255 registers, one program an SM) sync
        # every K step and promote together. The price: a weight tile serves 64 rows, not 128
        # (1.5x the shared-memory fill bytes per FLOP). vLLM's tuner chose the same tile (64 x 128
        # x 128, 4 warps) on an H200 for its block-fp8 Triton GEMM of the same loop shape at every
        # M from 24 to 4096 (its configs/N=12288,K=7168,device_name=NVIDIA_H200,...json).
        return GemmConfig(64, 64 if variant == "gated" else 128, bk, 8, False, 4, 4)
    return GemmConfig(128, 64 if variant == "gated" else 128, bk, 8, False, 8, 3)


def grouped_mm_config(variant: str, rows: int, experts: int, n: int, k: int, dtype, gpu: str | None = None,
                      *, block_scaled: bool = False, kmajor: bool = True, arch: ArchLimits = HOPPER) -> GemmConfig:
    """The tile config of one grouped GEMM: the tuned table entry of (variant, rows class, N, K,
    dtype) on ``gpu`` ("h100", "h200") when there is one, else the default (``block_scaled``: the
    (1, 128) x (128, 128) fp8 loop; ``kmajor``: the weight's storage, see default_gemm_config),
    fitted to ``arch``'s shared memory (:func:`fit_gemm_config`; Hopper's own choice on sm_90).
    Pure: no timing."""
    if variant not in GEMM_VARIANTS:
        raise ValueError(f"variant must be one of {GEMM_VARIANTS}, got {variant!r}")
    cls = rows_class(rows, experts)
    entry = tuned_table(gpu).get(gemm_key(variant, cls, n, k, dtype))
    if entry is not None:  # measured: a tuned entry says itself whether it splits
        return fit_gemm_config(GemmConfig(**entry), dtype.itemsize, variant, arch)
    cfg = default_gemm_config(variant, cls, dtype.itemsize, block_scaled, kmajor)
    if block_scaled and arch.mma != "wgmma" and cfg.BLOCK_N == 128 and cfg.num_warps == 4:
        # One warpgroup a program is Hopper's answer to its wgmma wait (above). Without wgmma the
        # 64 x 128 tile's accumulator and step partial, 64 + 64 float32 a thread at 4 warps,
        # spilled at 255 registers (_matrix: 880 B on sm_120, 116 B on sm_100); 8 warps: 250 and
        # 200 registers, no spills.
        cfg = dataclasses.replace(cfg, num_warps=8)
    cfg = fit_gemm_config(cfg, dtype.itemsize, variant, arch)
    if split_gated_decode(variant, cfg, rows, experts, n, dtype, gpu):
        cfg = dataclasses.replace(cfg, SPLIT_GATED=True)
    return cfg


# Streaming multiprocessors of the GPUs the configs know: the persistent grid's width.
GPU_SMS = {"h100": 132, "h200": 132}


def decode_work_items(rows: int, experts: int, n: int, block_n: int) -> int:
    """Work items of a swap-AB decode launch, at most: each of at most min(E, rows) active
    experts (rows <= 16 a tile, so one M tile each) times its cdiv(N, BLOCK_N) column tiles."""
    return min(experts, max(rows, 1)) * triton.cdiv(n, block_n)


def split_gated_decode(variant: str, cfg: GemmConfig, rows: int, experts: int, n: int, dtype, gpu: str | None
                       ) -> bool:
    """Whether a gated decode launch runs split: the plain kernel over the [K, 2N] gate|up weight,
    so that a 64-column gate tile and its up tile are two work items, into a float32 [M, 2N]
    product, then act(gate) * up. It splits when the fused launch has fewer work items than the GPU
    has SMs, counting every active expert (an upper bound: the split happens only when even that
    falls short). BLOCK_N cannot shrink instead: the swap-AB tile's weight columns are wgmma's M,
    64 at least, and the decode tiles already take 64.

    Qwen3-30B-A3B (E 128, k 8, H 2048, I 768) at T = 1: 8 rows on at most 8 experts. GEMM 1 (gated,
    N = I = 768, K = 2048): 768 / 64 = 12 gate|up tiles an expert, 96 work items; the fused tiles
    take 145 KB of shared memory, one program an SM, so 96 of the 132 SMs work and 36 idle. Split:
    1536 / 64 = 24 tiles an expert, 192 items of half the weight bytes (64 x 2048 bf16 = 256 KB,
    against 512 KB fused); the plain decode tiles (81 KB) fit two an SM, so the 264-program grid
    runs all 192 at once on all 132 SMs. GEMM 2 (down, N = 2048) has 8 x 32 = 256 items: unchanged.
    At T = 2 (16 rows) GEMM 1 has up to 16 x 12 = 192 >= 132 items: fused, as before. Its price:
    the float32 [M, 2N] written and read (48 KB at T = 1) and the activation as torch ops.

    Pure: of the problem's shapes and the GPU's name, never of data; ``rows`` moves the choice
    between two compiled launches at most. Not on an unknown GPU (``gpu`` None: the interpreter,
    or a GPU without a table), and only for bf16 / fp16, whose split launches are compiled and
    held to the sm_90 contract (grouped_gemm.SM90_GEMMS)."""
    return (variant == "gated" and cfg.SWAP_AB and dtype.itemsize == 2
            and decode_work_items(rows, experts, n, cfg.BLOCK_N) < GPU_SMS.get(gpu, 0))


def lora_block(rank: int, gated: bool) -> int:
    """BLOCK_R, the K step of the low-rank segment of a fused grouped GEMM (grouped_mm_kernel's
    LORA; 16, the K of a bf16 wgmma, at least). The segment's loop is not pipelined (one load
    latency a step), so fewer, wider steps are faster, but its tiles cost registers after the main
    loop (ptxas, sm_90a, bf16 prefill tiles): the one-accumulator launches sit at 120-126 registers,
    two programs an SM up to 128, and BLOCK_R 16 / 32 / 64 takes scatter to 127 / 130 / 211 (plain
    127 / 132 / 219): 16 only. The gated tiles (two accumulators) run one program an SM (170 the
    gathered one) with registers to spare: r rounded up to a power of two, at most 64 (177 / 171 /
    186 registers), so r <= 64 is one step and r = 128 two."""
    if not gated:
        return 16
    return min(max(triton.next_power_of_2(max(rank, 1)), 16), 64)


def stage_bytes(cfg: GemmConfig, itemsize: int, variant: str = "plain") -> int:
    """Shared memory of one pipeline stage: the operand tiles a K step loads. The forward kernel
    loads an [BM, BK] row tile and a [BK, BN] weight tile (two, gate and up, when "gated"); the
    weight-gradient kernel ("dw") a [BM, BK] tile of x and a [BM, BN] tile of dy."""
    if variant == "dw":
        return cfg.BLOCK_M * (cfg.BLOCK_K + cfg.BLOCK_N) * itemsize
    b_tiles = 2 if variant == "gated" else 1
    return (cfg.BLOCK_M * cfg.BLOCK_K + b_tiles * cfg.BLOCK_K * cfg.BLOCK_N) * itemsize


def programs_per_sm(cfg: GemmConfig, itemsize: int, variant: str = "plain", accumulators: int = 1,
                    arch: ArchLimits = HOPPER) -> int:
    """An estimate of the persistent programs per SM, for a config the compiled table
    (:func:`sm90_programs_per_sm`) does not hold: two when two fit, so that one program's epilogue
    and tile lookup overlap the other's loads; else one. Two must fit in shared memory, and in the
    64K registers at <= 128 a thread (8 warps): estimated as the float32 accumulators (BLOCK_M *
    BLOCK_N / threads each; two with the gated epilogue, two more with block-scaled fp8's per-step
    partial) plus ~60 for addresses and operands. It misses what gathers and scales cost: ptxas on
    sm_90a gives 145 registers for the bf16 gather, 170 gather + gated and 188 fp8 row x column, at
    256 threads, where the estimate says 124-128, so only the table's count is trusted."""
    registers = accumulators * cfg.BLOCK_M * cfg.BLOCK_N // (32 * cfg.num_warps) + 60
    smem = gemm_smem(cfg, itemsize, variant, arch) + arch.smem_reserved
    fits = 2 * smem <= arch.smem_per_sm and 2 * cfg.num_warps <= arch.max_warps and registers <= 128
    return 2 if fits else 1


# ----------------------------------------------------------------------------- FP8 quantization


@dataclass(frozen=True)
class QuantConfig:
    TR: int  # tile rows and columns of a program
    TC: int
    BRF: int  # a block's extent within the tile: min(block, tile), powers of two
    BCF: int
    two_pass: bool  # blocks larger than a tile: an amax launch (atomic max), then the quantize
    num_warps: int


# Elements per program: 64 float32 per thread at 8 warps. A (128, 128) block is one tile; a
# (1, 128) tile holds 16 rows of 8 blocks (1024 columns: 2 KB of bf16 per row, coalesced).
_QUANT_TILE = 16384
_QUANT_ROW = 1024


def quant_config(block_rows: int, block_cols: int, rows: int, cols: int) -> QuantConfig:
    """Tiles for (block_rows, block_cols) blocks of a [rows, cols] matrix; a block dim is a power of
    two, or the whole extent (per row, column or tensor)."""
    p2 = triton.next_power_of_2
    fr, fc = p2(max(1, min(block_rows, rows))), p2(max(1, min(block_cols, cols)))
    # One pass when a block fits a tile and is at least 16 columns wide (or all of them):
    # per-column blocks ((R, 1), fc = 1) would read 1-2 columns a row, uncoalesced.
    if fr * fc <= _QUANT_TILE and (fc >= 16 or fc >= p2(cols)):
        tc = fc
        while block_cols < cols and tc * 2 <= min(_QUANT_ROW, p2(cols)) and fr * tc * 2 <= _QUANT_TILE:
            tc *= 2
        tr = fr
        while block_rows < rows and tr * 2 <= p2(rows) and tr * 2 * tc <= _QUANT_TILE:
            tr *= 2
        return QuantConfig(tr, tc, fr, fc, False, 8 if tr * tc >= 8192 else 4)
    tc = min(p2(max(cols, 1)), _QUANT_ROW)
    tr = min(p2(max(rows, 1)), _QUANT_TILE // tc)
    return QuantConfig(tr, tc, min(fr, tr), min(fc, tc), True, 8 if tr * tc >= 8192 else 4)


# ----------------------------------------------------------------------------- compiled resources

# Registers and shared memory of every shipped persistent-grid config, read from the sm_90a compile
# on the CPU (``python -m moekernels._sm90 --write-resources``; tests/test_sm90_compile.py fails
# when it is stale), and the programs per SM they allow. The compile depends on the Triton: the
# table is triton 3.6's (the GPU image's); another version's, where it is written, sits beside it
# (sm90_resources_triton3.9.json: 27 of its 29 rows differ from 3.6's).
SM90_RESOURCES = os.path.join(_TABLE_DIR, "sm90_resources.json")
SM90_RESOURCES_TRITON = "3.6"


def sm90_resources_path(write: bool = False) -> str:
    """The running Triton's table (major.minor); 3.6's for a version without one, unless ``write``."""
    version = ".".join(triton.__version__.split(".")[:2])
    if version == SM90_RESOURCES_TRITON:
        return SM90_RESOURCES
    path = os.path.join(_TABLE_DIR, f"sm90_resources_triton{version}.json")
    return path if write or os.path.exists(path) else SM90_RESOURCES
# Constexprs that are not part of a config's identity: BLOCK_E is the expert count rounded up to a
# power of two (the table is compiled at 128; it sizes the tile lookup before the K loop, not the
# K loop's registers), and stride_* are unit strides Triton specialises on.
_KEY_IGNORED = ("BLOCK_E",)
# Flags named in a key only when set: added after the table's keys (SPLIT_UP, issue 20), they leave
# the keys of the launches without them as they were.
_KEY_IF_SET = ("SPLIT_UP",)


def launch_key(kernel: str, dtype, out_dtype, constexprs: dict, num_warps: int, num_stages: int) -> str:
    """The identity of one compiled launch: kernel, operand and output dtypes, constexprs, warps and
    stages. The launcher and the sm_90 variant list build it the same way."""
    cx = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items())
                  if k not in _KEY_IGNORED and not k.startswith("stride_") and (v or k not in _KEY_IF_SET))
    dt = "/".join(str(d).removeprefix("torch.") for d in (dtype, out_dtype))
    return f"{kernel}/{dt}/{cx}/w{num_warps}s{num_stages}"


@functools.cache
def _sm90_resources() -> dict:
    if not os.path.exists(sm90_resources_path()):
        return {}
    with open(sm90_resources_path()) as f:
        return json.load(f)["configs"]


def sm90_programs_per_sm(key: str) -> int | None:
    """Programs of the config ``key`` (:func:`launch_key`) resident on one sm_90 SM at once, from
    its compiled registers and shared memory (the occupancy rules in moekernels/_sm90.py), or None
    for a config the table does not hold."""
    row = _sm90_resources().get(key)
    return None if row is None else row["programs_per_sm"]
