"""Expert parallelism on one GPU: moekernels.distributed's dispatch + combine against the local path.

Only one GPU is lent to a device run, so this measures what one GPU can: the overhead of
dispatch + combine on a single-rank process group, where every pair stays on its rank, against
the single-process path that does the same job. The experts are the identity (y_local = x_local):
what is timed is the routing and the data movement, bf16 rows, DeepSeek-V3's shape (H 7168,
E 256, k 8). One group, "deepseek-v3 ws1"; the swept size is the token count T.

Implementations timed:
- naive:       plain PyTorch on one process: a stable argsort of the flat ids, index_select of the
               token rows, their router-weighted index_add_ into a float32 [T, H]. No host sync;
- local:       moekernels.plan_routing + permute + unpermute (the default backend): the path a
               layer takes without expert parallelism, in a CUDA graph;
- local_eager: the same, timed eagerly: the like-for-like baseline of the two rows below;
- ep:          dispatch + combine, default mode: one count exchange (a host sync) per call;
- ep_capacity: dispatch(capacity=C) + combine, with C = T*k: the one pair of ranks takes every
               pair, none is dropped. No host sync.
Both ep rows are timed eagerly. The default mode syncs and cannot be captured. The capacity mode
could be, but a failed capture of an NCCL collective can leave the communicator hung, and a hang
loses the whole suite's report (written at its end); the GPU tests are the place to try a capture.
With everything eager, ep - local_eager is what dispatch + combine add (the count exchange, the
second plan and permute over the received rows, the two all-to-alls as device copies), and
ep - ep_capacity what the default mode's host sync costs on top.

The process group: where none is initialized, the first ep call creates a single-rank one (nccl on a
GPU, gloo on the CPU; a FileStore in a temporary folder, no port) and notes() destroys it, so no
later benchmark sees it (run.py calls every module's notes after all the cases). An existing group
of world size 1 is used and left alone; a larger one is refused (run.py is one process).

Counted (bound "memory", judged against the device copy bandwidth): the rows moved, as the permute
benchmark counts them: x read and its T*k rows written (dispatch), those rows read and y written
(combine), with the int32 index and float32 weight of each pair: bench_permute.permute_bytes +
unpermute_bytes. params["a2a_bytes"] is what the two all-to-alls carry, 2 * T*k rows of H bf16: on
one rank none of it leaves the GPU; scaling_table() prices it on NVLink and InfiniBand.
Every output is checked against naive (relative error norm, bench_permute.UNPERMUTE_RTOL).

The CPU run is a gloo dry run of the same code paths at T = 1, 16, 128 (the real H): not a result.
The quick GPU suite: T = 16, 512, 4096 (3 cases, 15 timings): ~5-15 s on an H200 with the NCCL
init, estimated (no GPU has run it yet). The full suite adds T = 1, 128 and 16384.

``python -m benchmarks.bench_distributed`` prints the scaling table of docs/API.md's "Expert
parallelism: scaling" (scaling_table, scaling_markdown): the bytes dispatch and combine move per
token per layer at 8 and 64 GPUs, their time at link rate and the expert GEMMs' time beside it.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

import moekernels
from .bench_moe import moe_flops
from .bench_permute import compare_unpermute, permute_bytes, unpermute_bytes
from .harness import Case
from .shapes import DEEPSEEK_V3, MoEShape, balanced_ids, token_sweep

BENCH = "distributed"
# The legend under the table (harness.IMPLS has the common names): see the docstring.
IMPLS = {"local": "plan_routing + permute + unpermute on one process (in a CUDA graph on a GPU)",
         "local_eager": "the same, timed eagerly: the baseline of the ep rows",
         "ep": "dispatch + combine on a single-rank group, default mode (a host sync a call)",
         "ep_capacity": "dispatch(capacity=T*k) + combine: no host sync"}
DTYPE = torch.bfloat16
SHAPE = DEEPSEEK_V3
TOKENS_FULL = [1, 16, 128, 512, 4096, 16384]
TOKENS_QUICK = [16, 512, 4096]
TOKENS_CPU = [1, 16, 128]
EAGER = ("local_eager", "ep", "ep_capacity")
# A collective that waits longer than this fails (gloo raises; nccl's watchdog aborts the process)
# instead of hanging the device run. One rank never waits for another: 60 s is only a backstop.
COLLECTIVE_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- the process group

@dataclass
class _Group:
    backend: str
    created: bool       # by this module: destroyed by destroy_group()
    store_dir: str | None


_group: _Group | None = None


def ensure_group(device: str) -> _Group:
    """The default process group, of world size 1: created where none is initialized (nccl on
    "cuda", gloo on "cpu", a FileStore in a temporary folder), else the existing one."""
    global _group
    if _group is not None and dist.is_initialized():
        return _group
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build")
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError(f"a process group of world size {dist.get_world_size()} is initialized: this "
                               "benchmark runs on one rank (run benchmarks.run as one process)")
        _group = _Group(dist.get_backend(), created=False, store_dir=None)
        return _group
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(torch.cuda.current_device())  # the rank's device, as NCCL wants it set
    store_dir = tempfile.mkdtemp(prefix="moekernels-bench-dist-")
    try:
        store = dist.FileStore(os.path.join(store_dir, "store"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except BaseException:
        shutil.rmtree(store_dir, ignore_errors=True)
        raise
    _group = _Group(backend, created=True, store_dir=store_dir)
    return _group


def destroy_group() -> None:
    """Destroys the process group ensure_group created, if any; leaves one it found alone."""
    global _group
    group, _group = _group, None
    if group is None or not group.created:
        return
    if dist.is_initialized():
        dist.destroy_process_group()
    shutil.rmtree(group.store_dir, ignore_errors=True)


atexit.register(destroy_group)  # a run that stops before notes() still tears the group down


# ----------------------------------------------------------------------------- implementations

def naive(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sort the pairs by expert (stable argsort), gather their token rows, identity experts, and add
    each row times its router weight into its token's float32 row."""
    top_k = ids.shape[1]
    order = ids.reshape(-1).argsort(stable=True)
    token = order // top_k
    rows = x.index_select(0, token)  # x_sorted [T*k, H]; the experts: y_sorted = x_sorted
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, token, rows * weights.reshape(-1).index_select(0, order)[:, None])
    return out.to(x.dtype)


def local(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    plan = moekernels.plan_routing(ids, SHAPE.experts)
    x_sorted = moekernels.permute(x, plan)
    return moekernels.unpermute(x_sorted, plan, weights)  # identity experts: y_sorted = x_sorted


def expert_parallel(device: str, capacity: bool):
    """dispatch + combine on the single-rank group (created on the first call), identity experts.
    With ``capacity``, C = T*k: one rank receives every pair, so none can be dropped."""
    from moekernels import distributed as ep

    def run(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        ensure_group(device)
        cap = ids.numel() if capacity else None
        handle, x_local = ep.dispatch(x, ids, weights, SHAPE.experts, capacity=cap)
        return ep.combine(x_local, handle)
    return run


# ----------------------------------------------------------------------------- counters

def dispatch_combine_bytes(tokens: int, hidden: int, top_k: int, itemsize: int) -> int:
    """The rows moved, counted once each way as the permute benchmark counts them: dispatch reads
    x [T, H] and writes its T*k rows (an int32 index each), combine reads them and writes y [T, H]
    (an int32 index and a float32 weight each)."""
    return permute_bytes(tokens, hidden, top_k, itemsize) + unpermute_bytes(tokens, hidden, top_k, itemsize)


def a2a_bytes(tokens: int, hidden: int, top_k: int, itemsize: int) -> int:
    """What dispatch's and combine's all-to-alls carry: T*k rows of H each way."""
    return 2 * tokens * top_k * hidden * itemsize


# ----------------------------------------------------------------------------- cases

def _inputs(shape: MoEShape, tokens: int, device: str):
    def make():
        ids = balanced_ids(shape, tokens, device)
        weights = torch.rand(tokens, shape.top_k, device=device)
        weights /= weights.sum(dim=1, keepdim=True)  # renormalized, as the routers give them
        return torch.randn(tokens, shape.hidden, device=device, dtype=DTYPE), ids, weights
    return make


def cases(device: str, quick: bool, tokens: list[int] | None = None) -> list[Case]:
    """Builds the cases only: the process group is created by the first ep call, not here, so no
    other benchmark runs with it."""
    tokens = token_sweep(device, quick, tokens, TOKENS_FULL, TOKENS_QUICK, TOKENS_CPU)
    impls = {"naive": naive, "local": local, "local_eager": local,
             "ep": expert_parallel(device, capacity=False), "ep_capacity": expert_parallel(device, capacity=True)}
    shape, itemsize = SHAPE, DTYPE.itemsize
    return [Case(
        bench=BENCH, group=f"{shape.name} ws1", x=t, make_inputs=_inputs(shape, t, device), impls=impls, flops=0,
        bytes=dispatch_combine_bytes(t, shape.hidden, shape.top_k, itemsize), bound="memory",
        compare=compare_unpermute, eager=EAGER,
        params={"T": t, "E": shape.experts, "k": shape.top_k, "H": shape.hidden, "dtype": "bf16", "world_size": 1,
                "process_group": "nccl" if device == "cuda" else "gloo", "capacity": t * shape.top_k,
                "experts": "identity", "a2a_bytes": a2a_bytes(t, shape.hidden, shape.top_k, itemsize)},
    ) for t in tokens]


def notes(records: list[dict]) -> list[str]:
    """Destroys the process group this module created (run.py calls notes after every case has
    run); then one line per T: what dispatch + combine add over the local path."""
    destroy_group()
    mine = [r for r in records if r["bench"] == BENCH and r["error"] is None]
    ok = {(r["x"], r["impl"]): r["time_us"]["median"] for r in mine}
    captured = {r["x"] for r in mine if r["impl"] == "local" and r.get("method") == "graph"}
    lines = []
    for t in sorted({x for x, _ in ok}):
        base, graph = ok.get((t, "local_eager")), ok.get((t, "local")) if t in captured else None
        cells = [f"{label} {ok[(t, impl)] - base:+,.1f} us ({ok[(t, impl)] / base:.2f}x)"
                 for impl, label in (("ep", "default"), ("ep_capacity", "capacity")) if base and (t, impl) in ok]
        if not cells:
            continue
        line = f"{BENCH} {SHAPE.name} T={t}: dispatch + combine over the local path, both eager: " + ", ".join(cells)
        if graph and (t, "ep_capacity") in ok:
            line += f"; capacity mode over the local path in a CUDA graph {ok[(t, 'ep_capacity')] / graph:.2f}x"
        lines.append(line)
    return lines


# ----------------------------------------------------------------------------- scaling beyond one GPU

# NVLink 4 (H100, H200): 900 GB/s per GPU counting both directions, 450 GB/s each way. In an
# all-to-all every GPU sends and receives at once, so a phase that sends B bytes takes B / 450 GB/s.
NVLINK_GBPS = 900
# InfiniBand: one 400 Gb/s NDR NIC per GPU, 50 GB/s each way.
IB_GBPS = 50
GPUS_PER_NODE = 8
# The dense bf16 rate: torch.mm 8192^3 measured on an H200 at 680.4 TFLOP/s
# (benchmarks/results/h200/bench.json, "roofline").
MM_BF16_TFLOPS = 680
SCALING_TOKENS = 4096  # tokens per GPU per layer
SCALING_WORLDS = (8, 64)


def row_bytes(hidden: int, fp8: bool) -> int:
    """One token row on the wire: bf16, or e4m3 with a float32 scale per 128 columns (quantize_fp8's
    (1, 128), as DeepSeek-V3 dispatches)."""
    return hidden + 4 * math.ceil(hidden / 128) if fp8 else 2 * hidden


def scaling_row(world: int, shape: MoEShape = SHAPE, tokens: int = SCALING_TOKENS, fp8_dispatch: bool = False,
                gpus_per_node: int = GPUS_PER_NODE) -> dict:
    """One GPU of ``world`` under uniform routing, one layer's forward, ``tokens`` tokens per GPU.

    Each (token, slot) pair sends one row to its expert's rank (dispatch: bf16, or fp8 with
    ``fp8_dispatch``) and gets one bf16 row back (combine); (world - 1) / world of the pairs leave
    the GPU, no deduplication of a token's pairs that land on the same rank or node. Of those,
    (min(world, gpus_per_node) - 1) / world stay in the node on NVLink and the rest cross
    InfiniBand, both at once: a phase takes the longer of the two. The expert GEMMs: each GPU's
    experts receive T*k pairs on average, bench_moe.moe_flops of them at MM_BF16_TFLOPS."""
    k = shape.top_k
    per_pair = row_bytes(shape.hidden, fp8_dispatch) + row_bytes(shape.hidden, False)  # dispatch + combine
    in_node = (min(world, gpus_per_node) - 1) / world
    off_node = (world - min(world, gpus_per_node)) / world
    pairs = tokens * k
    phase_s = []
    for row in (row_bytes(shape.hidden, fp8_dispatch), row_bytes(shape.hidden, False)):
        nvlink_s = pairs * in_node * row / (NVLINK_GBPS / 2 * 1e9)
        ib_s = pairs * off_node * row / (IB_GBPS * 1e9)
        phase_s.append(max(nvlink_s, ib_s))
    a2a_ms = sum(phase_s) * 1e3
    gemm_ms = moe_flops(tokens, shape.hidden, shape.intermediate, k, backward=False) / (MM_BF16_TFLOPS * 1e12) * 1e3
    return {
        "world": world, "tokens": tokens, "fp8_dispatch": fp8_dispatch,
        "bytes_per_token": round(k * per_pair * (world - 1) / world),  # leaving the GPU, dispatch + combine
        "ib_bytes_per_token": round(k * per_pair * off_node),
        "a2a_ms": a2a_ms, "dispatch_ms": phase_s[0] * 1e3, "combine_ms": phase_s[1] * 1e3,
        "gemm_ms": gemm_ms, "a2a_over_gemm": a2a_ms / gemm_ms,
        "exposed_ms": max(a2a_ms - gemm_ms, 0.0),  # left after overlapping it with the GEMMs
    }


def scaling_table(shape: MoEShape = SHAPE, tokens: int = SCALING_TOKENS,
                  worlds: tuple[int, ...] = SCALING_WORLDS) -> list[tuple[dict, dict]]:
    """(bf16 dispatch, fp8 dispatch) rows for each world size."""
    return [(scaling_row(w, shape, tokens), scaling_row(w, shape, tokens, fp8_dispatch=True)) for w in worlds]


def _exposed(row: dict) -> str:
    return f"{row['exposed_ms']:.2f} ms" if row["exposed_ms"] else "none"


def scaling_markdown(shape: MoEShape = SHAPE, tokens: int = SCALING_TOKENS,
                     worlds: tuple[int, ...] = SCALING_WORLDS) -> str:
    """docs/API.md's table: bf16 dispatch, fp8 dispatch in brackets."""
    out = [f"| GPUs | links | bytes leaving a GPU per token per layer | all-to-all per layer, T {tokens:,} a GPU "
           f"| expert GEMMs at {MM_BF16_TFLOPS} TFLOP/s | all-to-all / GEMMs | exposed after overlap |",
           "|---:|:---|---:|---:|---:|---:|---:|"]
    for bf16, fp8 in scaling_table(shape, tokens, worlds):
        w = bf16["world"]
        links = "NVLink" if w <= GPUS_PER_NODE else "IB across nodes, NVLink within"
        nbytes = f"{bf16['bytes_per_token']:,} ({fp8['bytes_per_token']:,})"
        if bf16["ib_bytes_per_token"]:
            nbytes += f"; over IB {bf16['ib_bytes_per_token']:,} ({fp8['ib_bytes_per_token']:,})"
        out.append(f"| {w} | {links} | {nbytes} | {bf16['a2a_ms']:.2f} ms ({fp8['a2a_ms']:.2f}) "
                   f"| {bf16['gemm_ms']:.2f} ms | {bf16['a2a_over_gemm']:.2f} ({fp8['a2a_over_gemm']:.2f}) "
                   f"| {_exposed(bf16)} ({_exposed(fp8)}) |")
    return "\n".join(out)


if __name__ == "__main__":
    print(scaling_markdown())
