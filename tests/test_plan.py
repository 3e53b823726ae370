"""moekernels.plan_routing against its reference and a per-pair Python oracle."""

import importlib

import pytest
import torch
import triton
from conftest import cpu_backends, device_backends, gpu_backends

import moekernels
from moekernels import configs, reference

plan_module = importlib.import_module("moekernels.plan")
FIELDS = ("expert_counts", "expert_offsets", "source_index", "dest_index", "padded_source_index",
          "block_expert", "num_padded_rows")

# (T, k, E, block_size): one token, k = 1, a single expert, odd E, block sizes that are not
# powers of two, several chunks of the counting sort (256 pairs each), and decode sizes.
CASES = [
    (1, 1, 1, None),
    (1, 1, 1, 1),
    (1, 8, 256, 64),
    (5, 2, 8, 4),
    (37, 2, 8, 16),
    (37, 8, 256, None),
    (40, 4, 60, 7),
    (130, 8, 128, 64),
    (700, 1, 3, 5),
]


def make_ids(num_tokens, top_k, num_experts, dtype=torch.int32, device="cpu", *, distinct=True):
    """Fresh random ids with an expert that gets no pair and one that gets exactly one."""
    if num_experts < 3 or num_experts - 2 < top_k:
        return torch.randint(0, num_experts, (num_tokens, top_k), dtype=dtype).to(device)
    perm = torch.randperm(num_experts)
    empty, single, pool = perm[0], perm[1], perm[2:]
    if distinct:  # as a router gives them: k different experts per token
        ids = pool[torch.rand(num_tokens, len(pool)).topk(top_k, dim=1).indices]
    else:
        ids = pool[torch.randint(0, len(pool), (num_tokens, top_k))]
    ids[num_tokens // 2, 0] = single
    assert not (ids == empty).any()
    return ids.to(dtype).to(device)


def oracle(ids, num_experts, block_size):
    """The plan by its definition, pair by pair in Python."""
    flat = ids.reshape(-1).tolist()
    n = len(flat)
    rows = {e: [i for i, x in enumerate(flat) if x == e] for e in range(num_experts)}
    dropped = [i for i, x in enumerate(flat) if not 0 <= x < num_experts]
    source = [i for e in range(num_experts) for i in rows[e]] + dropped
    dest = [0] * n
    for r, i in enumerate(source):
        dest[i] = r
    counts = [len(rows[e]) for e in range(num_experts)]
    offsets = [sum(counts[: e + 1]) for e in range(num_experts)]
    out = dict(expert_counts=counts, expert_offsets=offsets, source_index=source, dest_index=dest)
    if block_size:
        padded, block_expert = [], []
        for e in range(num_experts):
            seg = rows[e] + [n] * (-len(rows[e]) % block_size)
            padded += seg
            block_expert += [e] * (len(seg) // block_size)
        bound = reference.padded_rows_bound(n, num_experts, block_size)
        assert len(padded) <= bound
        out.update(num_padded_rows=[len(padded)], padded_source_index=padded + [n] * (bound - len(padded)),
                   block_expert=block_expert + [-1] * (bound // block_size - len(block_expert)))
    return out


def assert_plan_equal(plan, want: dict):
    for name, value in want.items():
        got = getattr(plan, name)
        assert got.dtype == torch.int32, name
        assert got.cpu().tolist() == list(value), f"{name} differs"


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}_k{}_E{}_B{}".format(*c))
def test_matches_oracle(case, id_dtype, device, backend):
    num_tokens, top_k, num_experts, block_size = case
    ids = make_ids(num_tokens, top_k, num_experts, id_dtype, device)
    plan = moekernels.plan_routing(ids, num_experts, block_size=block_size, backend=backend)
    assert isinstance(plan, moekernels.RoutingPlan)
    assert (plan.num_experts, plan.top_k, plan.block_size) == (num_experts, top_k, block_size)
    assert plan.source_index.device == ids.device
    want = oracle(ids.cpu(), num_experts, block_size)
    assert_plan_equal(plan, want)
    if block_size is None:
        assert plan.padded_source_index is None and plan.block_expert is None and plan.num_padded_rows is None
    assert_plan_equal(reference.plan_routing(ids, num_experts, block_size=block_size), want)


@pytest.mark.parametrize("backend", cpu_backends())
def test_repeated_ids_in_a_row(backend):
    """A hand-made ids tensor may name an expert twice for one token: stable order still holds."""
    ids = make_ids(50, 6, 10, distinct=False)
    ids[3] = 4
    plan = moekernels.plan_routing(ids, 10, block_size=8, backend=backend)
    assert_plan_equal(plan, oracle(ids, 10, 8))


def _small_chunks(num_experts):
    """Chunks of 16 pairs, scanned 2 at a time, 4 experts a program: every loop of the
    multi-chunk path runs many times at a size the interpreter can take."""
    block_e = triton.next_power_of_2(num_experts)
    return configs.PlanConfig(BLOCK_N=16, SUB=4, BLOCK_E=block_e, BLOCK_CH=2, BLOCK_EB=4, num_warps=4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_many_chunks(backend, monkeypatch):
    monkeypatch.setattr(configs, "plan_config", _small_chunks)
    for num_tokens, top_k, num_experts, block_size in [(61, 3, 13, 4), (16, 1, 2, None), (33, 2, 40, 3)]:
        ids = make_ids(num_tokens, top_k, num_experts)
        plan = moekernels.plan_routing(ids, num_experts, block_size=block_size, backend=backend)
        assert_plan_equal(plan, oracle(ids, num_experts, block_size))


@pytest.mark.parametrize("single_chunk", [True, False])
@pytest.mark.parametrize("backend", cpu_backends())
def test_dropped_ids_sort_last(backend, single_chunk, monkeypatch):
    """Ids outside [0, E) (what CUDA drops, for other ranks' experts) count for no expert and
    sort after expert_offsets[-1]. The op raises on CPU, so this calls the launchers directly."""
    if not single_chunk:
        monkeypatch.setattr(configs, "plan_config", _small_chunks)
    num_experts = 12
    ids = make_ids(29, 4, num_experts, torch.int64)
    ids[0, 0], ids[5, 3], ids[6, 1], ids[28, 3] = -1, num_experts, 2**40, -(2**35)
    want = oracle(ids, num_experts, 4)
    assert want["expert_offsets"][-1] == ids.numel() - 4
    got = reference.plan_routing_fields(ids, num_experts, 4)
    assert [t.tolist() for t in got] == [want[f] for f in FIELDS]
    if backend == "triton":
        got = plan_module._empty_fields(ids, num_experts, 4)
        plan_module._launch_triton(ids, num_experts, 4, got)
        assert [t.tolist() for t in got] == [want[f] for f in FIELDS]


@pytest.mark.parametrize("backend", cpu_backends())
def test_out_of_range_ids_raise_on_cpu(backend):
    for bad in (-1, 8):
        ids = make_ids(9, 2, 8)
        ids[4, 1] = bad
        with pytest.raises(ValueError, match=r"topk_ids\[4, 1\] = " + str(bad)):
            moekernels.plan_routing(ids, 8, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic_and_empty(backend):
    ids = make_ids(300, 8, 64)
    a = moekernels.plan_routing(ids, 64, block_size=16, backend=backend)
    b = moekernels.plan_routing(ids, 64, block_size=16, backend=backend)
    for name in FIELDS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    empty = moekernels.plan_routing(ids[:0], 64, block_size=16, backend=backend)
    assert empty.expert_counts.tolist() == [0] * 64 and empty.expert_offsets.tolist() == [0] * 64
    assert empty.source_index.shape == (0,) and empty.padded_source_index.shape == (0,)
    assert empty.block_expert.shape == (0,) and empty.num_padded_rows.tolist() == [0]


def test_padded_bound_is_tight_for_decode():
    # DeepSeek-V3 decode: 8 pairs, 256 experts, B = 64: 8 blocks at most, not 254.
    assert reference.padded_rows_bound(8, 256, 64) == 512
    assert reference.padded_rows_bound(32768, 256, 64) == (32768 + 256 * 63) // 64 * 64
    assert reference.padded_rows_bound(0, 8, 16) == 0


# ----------------------------------------------------------------------------- the custom op


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    ids = make_ids(20, 4, 16)
    for block_size in (0, 8):
        torch.library.opcheck(torch.ops.moekernels.plan_routing.default, (ids, 16, block_size, backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend):
    def layer(x, ids, w):
        plan = moekernels.plan_routing(ids, 16, block_size=4, backend=backend)
        rows = moekernels.permute(x, plan, backend=backend)
        y = moekernels.unpermute(rows * 2.0, plan, w, backend=backend)
        return y, plan.expert_offsets, plan.block_expert

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    for num_tokens in (5, 9):
        ids = make_ids(num_tokens, 3, 16)
        x, w = torch.randn(num_tokens, 24), torch.rand(num_tokens, 3)
        for got, want in zip(compiled(x, ids, w), layer(x, ids, w)):
            assert torch.equal(got, want)


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("topk_ids", dict(topk_ids=[[1, 2]]), TypeError),
    ("topk_ids", dict(topk_ids=torch.zeros(4, 2)), TypeError),
    ("topk_ids", dict(topk_ids=torch.zeros(8, dtype=torch.int32)), ValueError),
    ("num_experts", dict(num_experts=0), ValueError),
    ("num_experts", dict(num_experts=8.0), TypeError),
    ("block_size", dict(block_size=0), ValueError),
    ("block_size", dict(block_size=True), TypeError),
    ("backend", dict(backend="tpu"), ValueError),
]


@pytest.mark.parametrize("name,change,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, change, error):
    args = dict(topk_ids=torch.zeros(4, 2, dtype=torch.int32), num_experts=8)
    args.update(change)
    with pytest.raises(error, match=name):
        moekernels.plan_routing(args.pop("topk_ids"), args.pop("num_experts"), **args)


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_large_and_graph_safe(backend):
    """DeepSeek-V3 at T = 4096 and 65536 tokens (many chunks), Mixtral (8 experts) and 1024
    experts (the cuda kernel's most), captured in a CUDA graph."""
    for num_tokens, top_k, num_experts in ((4096, 8, 256), (65536, 8, 256), (5000, 2, 8), (3000, 8, 1024)):
        ids = make_ids(num_tokens, top_k, num_experts, device="cuda")
        want = reference.plan_routing(ids, num_experts, block_size=64)
        got = moekernels.plan_routing(ids, num_experts, block_size=64, backend=backend)
        for name in FIELDS:
            assert torch.equal(getattr(got, name), getattr(want, name)), (num_tokens, name)
    ids = make_ids(4096, 8, 256, device="cuda")
    want = reference.plan_routing(ids, 256, block_size=64)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        captured = moekernels.plan_routing(ids, 256, block_size=64, backend=backend)
    captured.source_index.fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured.source_index, want.source_index)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_drops_out_of_range_ids_and_debug_raises(monkeypatch, backend):
    ids = make_ids(3000, 8, 64, torch.int64, "cuda")
    ids[10, 2], ids[2999, 7] = 64, -3
    plan = moekernels.plan_routing(ids, 64, block_size=16, backend=backend)
    want = reference.plan_routing(ids, 64, block_size=16)
    for name in FIELDS:
        assert torch.equal(getattr(plan, name), getattr(want, name)), name
    assert plan.expert_offsets[-1].item() == ids.numel() - 2
    monkeypatch.setenv("MOEKERNELS_DEBUG", "1")
    with pytest.raises(ValueError, match="topk_ids"):
        moekernels.plan_routing(ids, 64, backend=backend)
