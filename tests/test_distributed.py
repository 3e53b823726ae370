"""Expert parallelism on gloo: processes on loopback at world sizes 2 and 4, against one process.

Each test launches ``world`` spawned processes (a file store in tmp_path, no ports) that run a
scenario and send back "ok" or their traceback; every process and every collective has a
timeout, so a rank that dies or raises fails the test instead of hanging it.
"""

import os
import queue
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import rel_err

import moekernels
from moekernels import distributed as ep

E, H, INTER, K = 8, 16, 12, 2
COLLECTIVE_TIMEOUT_S = 30
RUN_TIMEOUT_S = 240
DEV = "cpu"  # the ranks' device: cpu on gloo, cuda:<rank> on nccl (set in each process)


# ----------------------------------------------------------------------------- the harness


def _worker(rank, world, init_file, scenario, results, collective_timeout, backend):
    global DEV
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # world processes share 2 CPU cores in CI
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
            DEV = f"cuda:{rank}"
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=collective_timeout))
        (SCENARIOS[scenario] if isinstance(scenario, str) else scenario)(rank, world)
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 (every failure goes back to the test)
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailed(AssertionError):
    pass


def run_ranks(world, scenario, tmp_path, *, timeout=RUN_TIMEOUT_S, collective_timeout=COLLECTIVE_TIMEOUT_S,
              backend="gloo"):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    name = getattr(scenario, "__name__", scenario)  # a scenario's name here, or a function of another test module
    procs = [ctx.Process(target=_worker, args=(r, world, str(tmp_path / f"store_{name}_{world}"), scenario,
                                               results, collective_timeout, backend), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    errors, seen = [], 0
    try:
        while seen < world:
            try:
                rank, err = results.get(timeout=timeout)
            except queue.Empty:
                raise RankFailed(f"{name}: no result from {world - seen} rank(s) in {timeout} s") from None
            seen += 1
            if err is not None:
                errors.append(f"rank {rank}:\n{err}")
    finally:
        for p in procs:
            p.join(timeout=30)  # teardown (gloo, interpreter exit) of 4 ranks on 2 loaded cores took > 10 s
            if p.is_alive():
                p.kill()
    if errors:
        raise RankFailed(f"{name}:\n" + "\n".join(errors))
    bad = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad:
        raise RankFailed(f"{name}: exit codes {bad}")


# ----------------------------------------------------------------------------- scenarios (run in each rank)


def _shared_inputs(world, tokens_per_rank, *, avoid_rank=None, hidden=H):
    """Every rank draws the same tensors (same seed): all ranks' tokens, ids, weights, experts."""
    g = torch.Generator().manual_seed(1234)
    total = sum(tokens_per_rank)
    x = torch.randn(total, hidden, generator=g)
    experts = torch.arange(E)
    if avoid_rank is not None:  # that rank's experts get no pair: the rank receives no tokens
        loc = E // world
        experts = experts[(experts < avoid_rank * loc) | (experts >= (avoid_rank + 1) * loc)]
    pick = torch.rand(total, len(experts), generator=g).topk(K, dim=1).indices
    ids = experts[pick].int()
    ids[ids == 0] = 1  # expert 0 gets no pair anywhere: an expert with no tokens
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] % (E - 1)) + 1, ids[:, 1])
    w = torch.softmax(torch.randn(total, K, generator=g), -1)
    w1 = torch.randn(E, hidden, INTER, generator=g) / hidden**0.5  # logical [E, K=H, N=I]
    starts = [sum(tokens_per_rank[:r]) for r in range(world)]
    return x.to(DEV), ids.to(DEV), w.to(DEV), w1.to(DEV), starts


def _reference(x, ids, w, w1, keep=None):
    """One process: plan, permute, grouped_mm with every expert, (drop), unpermute."""
    plan = moekernels.plan_routing(ids, E)
    ys = moekernels.grouped_mm(moekernels.permute(x, plan), w1, plan.expert_offsets)
    if keep is not None:
        ys = ys * keep.unsqueeze(-1)
    return moekernels.unpermute(ys, plan, w)


def scenario_ops(rank, world):
    """dispatch / combine with the local experts' grouped_mm equal one process, forward and
    backward: uneven T (rank 1 has none of its own), one rank receives no tokens, expert 0 none."""
    tokens = [5, 0, 9, 3][:world]
    x_all, ids_all, w_all, w1, starts = _shared_inputs(world, tokens, avoid_rank=world - 1)
    s, t = starts[rank], starts[rank] + tokens[rank]
    x, w = x_all[s:t].clone().requires_grad_(), w_all[s:t].clone().requires_grad_()
    loc = E // world
    w1_local = w1[rank * loc:(rank + 1) * loc].clone().requires_grad_()
    handle, x_local = ep.dispatch(x, ids_all[s:t], w, E, group=None)
    if rank == world - 1:
        assert x_local.shape[0] == 0, "this rank's experts got no pair"
    y = ep.combine(moekernels.grouped_mm(x_local, w1_local, handle.expert_offsets), handle)
    xr, wr, w1r = (v.clone().requires_grad_() for v in (x_all, w_all, w1))
    want = _reference(xr, ids_all, wr, w1r)
    assert rel_err(y, want[s:t]) <= 1e-6
    g = torch.randn(x_all.shape[0], INTER, generator=torch.Generator().manual_seed(7)).to(DEV)
    (y * g[s:t]).sum().backward()
    (want * g).sum().backward()
    assert rel_err(x.grad, xr.grad[s:t]) <= 1e-6
    assert rel_err(w.grad, wr.grad[s:t]) <= 1e-6
    assert rel_err(w1_local.grad, w1r.grad[rank * loc:(rank + 1) * loc]) <= 1e-6  # every rank's tokens
    assert int(handle.dropped) == 0


def scenario_capacity(rank, world):
    """capacity=C: C rows per pair of ranks, no host sync; the first C of a destination's sorted
    pairs go, the rest are dropped, counted, and add nothing."""
    tokens, capacity = [7, 6, 8, 5][:world], 3
    x_all, ids_all, w_all, w1, starts = _shared_inputs(world, tokens)
    s, t = starts[rank], starts[rank] + tokens[rank]
    x, ids, w = x_all[s:t].clone().requires_grad_(), ids_all[s:t], w_all[s:t]
    loc = E // world
    handle, x_local = ep.dispatch(x, ids, w, E, capacity=capacity)
    assert x_local.shape[0] == world * capacity
    y = ep.combine(moekernels.grouped_mm(x_local, w1[rank * loc:(rank + 1) * loc], handle.expert_offsets), handle)
    plan = moekernels.plan_routing(ids, E)
    pairs = torch.arange(ids.numel(), device=DEV)
    dest = torch.searchsorted(plan.expert_offsets.long(), pairs, right=True) // loc
    first = torch.cat([torch.zeros(1, dtype=torch.long, device=DEV),
                       plan.expert_counts.view(world, loc).sum(1).cumsum(0)])
    keep = (pairs - first[dest]) < capacity
    assert int(handle.dropped) == int((~keep).sum()) and int((~keep).sum()) > 0, "no overflow to test"
    xr = x.detach().clone().requires_grad_()
    want = _reference(xr, ids, w, w1, keep.float())
    assert rel_err(y, want) <= 1e-6
    y.square().sum().backward()
    want.square().sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-6


def scenario_module(rank, world):
    """moekernels.MoE with expert_parallel_group equals the single-process MoE holding every
    expert (same weights), outputs and gradients; the router's gradient summed over ranks."""
    torch.manual_seed(0)
    full = moekernels.MoE(H, INTER, E, K, num_shared_experts=1, device=DEV)
    layer = moekernels.MoE(H, INTER, E, K, num_shared_experts=1, expert_parallel_group=dist.group.WORLD, device=DEV)
    loc = E // world
    assert layer.w_gate_up.shape[0] == loc and layer.expert_offset == rank * loc
    with torch.no_grad():
        layer.gate.weight.copy_(full.gate.weight)
        layer.w_gate_up.copy_(full.w_gate_up[rank * loc:(rank + 1) * loc])
        layer.w_down.copy_(full.w_down[rank * loc:(rank + 1) * loc])
        layer.shared_experts.load_state_dict(full.shared_experts.state_dict())
    tokens = [6, 11, 0, 4][:world]
    g = torch.Generator().manual_seed(99)
    x_all, grad_all = (torch.randn(sum(tokens), H, generator=g).to(DEV) for _ in range(2))
    s = sum(tokens[:rank])
    x = x_all[s:s + tokens[rank]].clone().requires_grad_()
    y = layer(x)
    xr = x_all.clone().requires_grad_()
    want = full(xr)
    assert rel_err(y, want[s:s + tokens[rank]]) <= 1e-6
    (y * grad_all[s:s + tokens[rank]]).sum().backward()
    (want * grad_all).sum().backward()
    assert rel_err(x.grad, xr.grad[s:s + tokens[rank]]) <= 1e-5
    assert rel_err(layer.w_gate_up.grad, full.w_gate_up.grad[rank * loc:(rank + 1) * loc]) <= 1e-5
    assert rel_err(layer.w_down.grad, full.w_down.grad[rank * loc:(rank + 1) * loc]) <= 1e-5
    router = layer.gate.weight.grad.clone()
    dist.all_reduce(router)  # the router is replicated: its gradient is the sum over ranks, as DDP makes it
    assert rel_err(router, full.gate.weight.grad) <= 1e-5


def _fp8_matches_bf16(x_all, ids, w, s, t, capacity):
    """fp8 dispatch of this rank's tokens against the default path on the same inputs: q and scale
    bit for bit quantize_fp8 of its rows (padding 0), combine of the dequantized identity experts
    within e4m3's 2^-4, and the straight-through gradient equal to the default path's."""
    x, xr = (x_all[s:t].clone().requires_grad_() for _ in range(2))
    handle, (q, scale) = ep.dispatch(x, ids, w, E, capacity=capacity, fp8=True)
    ref_handle, rows = ep.dispatch(xr, ids, w, E, capacity=capacity)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and not q.requires_grad
    assert torch.equal(handle.expert_offsets, ref_handle.expert_offsets)
    assert int(handle.dropped) == int(ref_handle.dropped)
    n = int(handle.expert_offsets[-1]) if handle.expert_offsets.numel() else 0
    want_q, want_scale = moekernels.quantize_fp8(rows.detach(), (1, 128))
    assert torch.equal(q[:n].view(torch.uint8), want_q[:n].view(torch.uint8))
    assert torch.equal(scale[:n], want_scale[:n])
    assert not q[n:].view(torch.uint8).any() and not scale[n:].any(), "padding rows are 0"
    y = ep.combine(ep.dequantize((q, scale), handle), handle)
    want = ep.combine(rows, ref_handle)
    exact = ep.combine(moekernels.fp8.dequantize_fp8(want_q, want_scale), ref_handle)  # the same rows, quantized
    assert rel_err(y, exact) <= 1e-6
    assert 0 < rel_err(y, want) <= 2**-4 or (t == s and y.numel() == 0)
    g = torch.randn(x_all.shape[0], x_all.shape[1], generator=torch.Generator().manual_seed(5)).to(DEV)[s:t]
    (y * g).sum().backward()
    (want * g).sum().backward()
    assert rel_err(x.grad, xr.grad) <= 1e-6
    return handle


def scenario_fp8(rank, world):
    """dispatch(fp8=True) in both modes (a rank with no tokens, one that receives none, overflow),
    and the bytes it sends: H + 4H/128 a row against 2H for bf16 rows."""
    hidden = 256
    tokens = [5, 0, 9, 3][:world]
    x_all, ids_all, w_all, _, starts = _shared_inputs(world, tokens, avoid_rank=world - 1, hidden=hidden)
    s, t = starts[rank], starts[rank] + tokens[rank]
    _fp8_matches_bf16(x_all, ids_all[s:t], w_all[s:t], s, t, None)
    tokens = [7, 6, 8, 5][:world]
    x_all, ids_all, w_all, _, starts = _shared_inputs(world, tokens, hidden=hidden)
    s, t = starts[rank], starts[rank] + tokens[rank]
    handle = _fp8_matches_bf16(x_all, ids_all[s:t], w_all[s:t], s, t, 3)
    overflow = handle.dropped.clone()
    dist.all_reduce(overflow)
    assert int(overflow) > 0, "no overflow to test"
    sent = []
    all_to_all = dist.all_to_all_single

    def record(out, inp, *args, **kwargs):
        sent.append(inp.nbytes)
        return all_to_all(out, inp, *args, **kwargs)

    ep.dist.all_to_all_single = record  # this process only (spawned)
    try:
        for fp8 in (False, True):  # each: the count exchange, then the rows
            ep.dispatch(x_all[s:t].bfloat16(), ids_all[s:t], w_all[s:t], E, fp8=fp8)
    finally:
        ep.dist.all_to_all_single = all_to_all
    assert sent[0] == sent[2] and sent[1] > 0
    assert sent[3] / sent[1] == (hidden + 4 * hidden // 128) / (2 * hidden)  # 0.516


def scenario_bad_input(rank, world):
    x = torch.randn(4, H, dtype=torch.float32 if rank == 0 else torch.float64)
    ids = torch.randint(0, E, (4, K), dtype=torch.int32)
    w = torch.rand(4, K)
    try:
        ep.dispatch(x, ids, w, E)
    except ValueError as exc:
        assert "differs across ranks" in str(exc), exc
    else:
        raise AssertionError("mismatched dtypes across ranks were not caught")
    try:
        ep.dispatch(torch.randn(4, 128), ids, w, E, fp8=rank == 0)
    except ValueError as exc:
        assert "fp8=True" in str(exc) and "fp8=False" in str(exc), exc
    else:
        raise AssertionError("fp8 on one rank only was not caught")
    try:
        ep.dispatch(x.float(), ids, w, E + 1)
    except ValueError as exc:
        assert "divisible by the world size" in str(exc), exc
    else:
        raise AssertionError("E % world_size != 0 was not caught")


def scenario_rank_raises(rank, world):
    if rank == 1:
        raise RuntimeError("rank 1 fails before the collective")
    ep.dispatch(torch.randn(3, H), torch.zeros(3, K, dtype=torch.int32), torch.rand(3, K), E)


SCENARIOS = {f.__name__.removeprefix("scenario_"): f for f in
             (scenario_ops, scenario_capacity, scenario_module, scenario_fp8, scenario_bad_input,
              scenario_rank_raises)}


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("scenario", ["ops", "capacity", "module"])
def test_matches_one_process(scenario, world, tmp_path):
    run_ranks(world, scenario, tmp_path)


@pytest.mark.parametrize("world", [2, 4])
def test_fp8_dispatch(world, tmp_path):
    run_ranks(world, "fp8", tmp_path)


def test_fp8_dispatch_bad_input():  # checked before any collective: no process group needed
    ids, w = torch.zeros(2, K, dtype=torch.int32), torch.rand(2, K)
    with pytest.raises(ValueError, match=r"multiple of 128, got x of shape \(2, 192\)"):
        ep.dispatch(torch.randn(2, 192), ids, w, E, fp8=True)
    with pytest.raises(TypeError, match="x must have dtype float32, bfloat16, float16"):
        ep.dispatch(torch.randn(2, 128, dtype=torch.float64), ids, w, E, fp8=True)
    with pytest.raises(TypeError, match="dispatch\\(..., fp8=True\\)"):
        ep.dequantize(torch.randn(2, 128), None)


def test_bad_input_across_ranks(tmp_path):
    run_ranks(2, "bad_input", tmp_path)


def test_a_rank_that_raises_fails_the_test_instead_of_hanging(tmp_path):
    with pytest.raises(RankFailed, match="rank 1 fails before the collective"):
        run_ranks(2, "rank_raises", tmp_path, collective_timeout=5)


def test_group_not_initialized():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ep.dispatch(torch.randn(2, H), torch.zeros(2, K, dtype=torch.int32), torch.rand(2, K), E)
    with pytest.raises(RuntimeError, match="init_process_group"):
        moekernels.MoE(H, INTER, E, K, expert_parallel_group=object())


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL expert parallelism needs 2 or more GPUs")
@pytest.mark.parametrize("scenario", ["ops", "capacity", "module", "fp8"])
def test_gpu_nccl(scenario, tmp_path):
    run_ranks(2, scenario, tmp_path, backend="nccl")
