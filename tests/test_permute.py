"""moekernels.permute / unpermute and their backward, against the reference and float64 sums."""

import pytest
import torch
from conftest import cpu_backends, device_backends, gpu_backends, rel_err
from test_plan import make_ids

import moekernels
from moekernels import reference

# (T, k, E, H): one token, k = 1, H not a multiple of any block (33, 1030), several programs
# of tokens (4 a program), an expert with no pair and one with a single pair (make_ids).
CASES = [(1, 1, 4, 16), (1, 8, 16, 33), (7, 2, 8, 40), (13, 3, 10, 1030), (9, 8, 16, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Two roundings of a bf16 result: the kernel's float32 sum, in another order than torch's, can
# round to the other neighbour (1 ulp) where torch's is within 1/2 ulp; 2**-7 covers both
# (DESIGN.md: twice torch's own error).
TOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def case_id(c):
    return "T{}_k{}_E{}_H{}".format(*c)


def setup(case, dtype, device, backend):
    num_tokens, top_k, num_experts, hidden = case
    ids = make_ids(num_tokens, top_k, num_experts, device=device)
    plan = moekernels.plan_routing(ids, num_experts, backend=backend)
    return plan, num_tokens, top_k, hidden


def exact_unpermute(y_sorted, plan, weights):
    """The combine in float64 Python-order sums: the value a float32 accumulator approximates."""
    num_tokens, top_k = weights.shape
    rows = y_sorted.double().cpu()[plan.dest_index.long().cpu()].view(num_tokens, top_k, -1)
    return (rows * weights.double().cpu().unsqueeze(-1)).sum(1)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES + [torch.float8_e4m3fn], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_permute_is_exact(case, dtype, device, backend):
    plan, num_tokens, top_k, hidden = setup(case, dtype, device, backend)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype)
    out = moekernels.permute(x, plan, backend=backend)
    assert out.dtype == dtype and out.shape == (num_tokens * top_k, hidden)
    want = x.float()[plan.source_index.long() // top_k]
    assert torch.equal(out.float(), want)  # a copy: bit for bit (fp8 compared as its float values)
    assert torch.equal(reference.permute(x, plan).float(), want)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_unpermute_matches_float64(case, dtype, device, backend):
    plan, num_tokens, top_k, hidden = setup(case, dtype, device, backend)
    y_sorted = torch.randn(num_tokens * top_k, hidden, device=device).to(dtype)
    weights = torch.rand(num_tokens, top_k, device=device)
    out = moekernels.unpermute(y_sorted, plan, weights, backend=backend)
    assert out.dtype == dtype and out.shape == (num_tokens, hidden)
    exact = exact_unpermute(y_sorted, plan, weights)
    assert rel_err(out, exact) <= TOL[dtype]
    assert rel_err(reference.unpermute(y_sorted, plan, weights), exact) <= TOL[dtype]


@pytest.mark.parametrize("backend", cpu_backends())
def test_permute_then_unpermute_round_trips(backend):
    """With weights summing to 1 per token, unpermute(permute(x)) gives x back."""
    plan, num_tokens, top_k, hidden = setup((11, 4, 12, 48), torch.float32, "cpu", backend)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    weights = torch.softmax(torch.randn(num_tokens, top_k, dtype=torch.float64), -1)
    back = moekernels.unpermute(moekernels.permute(x, plan, backend=backend), plan, weights, backend=backend)
    assert rel_err(back, x) <= 1e-12


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_rows_are_read_in_place(backend):
    plan, num_tokens, top_k, hidden = setup((9, 2, 6, 40), torch.float32, "cpu", backend)
    wide = torch.randn(num_tokens, hidden + 24)
    x = wide[:, 8:8 + hidden]  # row stride 64, offset 8
    assert torch.equal(moekernels.permute(x, plan, backend=backend), reference.permute(x.contiguous(), plan))
    wide_sorted = torch.randn(num_tokens * top_k, hidden * 2)
    y_sorted, weights = wide_sorted[:, ::2], torch.rand(num_tokens, top_k)  # column stride 2: copied
    got = moekernels.unpermute(y_sorted, plan, weights, backend=backend)
    assert rel_err(got, reference.unpermute(y_sorted.contiguous(), plan, weights)) <= 1e-6


@pytest.mark.parametrize("backend", cpu_backends())
def test_dropped_pairs_contribute_nothing(backend):
    """A plan with dropped pairs (ids outside [0, E), as CUDA and expert parallelism make them):
    unpermute skips them, even when their rows hold inf; their gradients are zero."""
    num_experts = 6
    ids = make_ids(10, 3, num_experts)
    ids[2, 1], ids[9, 0] = num_experts, -1
    plan = reference.plan_routing(ids, num_experts)  # the reference drops; the op would raise on CPU
    valid = ((ids >= 0) & (ids < num_experts)).double()
    y_sorted = torch.randn(30, 20, dtype=torch.float64)
    y_sorted[plan.expert_offsets[-1]:] = float("inf")
    weights = torch.rand(10, 3, dtype=torch.float64, requires_grad=True)
    y_sorted.requires_grad_(True)
    out = moekernels.unpermute(y_sorted, plan, weights, backend=backend)
    finite = torch.where(torch.isinf(y_sorted.detach()), 0.0, y_sorted.detach())
    assert rel_err(out, exact_unpermute(finite, plan, weights.detach() * valid)) <= 1e-12
    out.sum().backward()
    assert (y_sorted.grad[plan.expert_offsets[-1]:] == 0).all()
    assert weights.grad[2, 1] == 0 and weights.grad[9, 0] == 0 and (weights.grad[0] != 0).all()


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("hidden", [600, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_match_the_reference(dtype, hidden, device, backend):
    # H = 600: two column tiles in float32 (512 each), so the Triton backward loops over tiles;
    # H = 37: rows that are not 16-byte multiples (csrc/permute.cu's one-element path)
    plan, num_tokens, top_k, hidden = setup((13, 3, 10, hidden), dtype, device, backend)
    x = torch.randn(num_tokens, hidden, device=device).to(dtype).requires_grad_(True)
    y_sorted = torch.randn(num_tokens * top_k, hidden, device=device).to(dtype).requires_grad_(True)
    weights = torch.rand(num_tokens, top_k, device=device, requires_grad=True)
    grad_out = torch.randn(num_tokens, hidden, device=device).to(dtype)
    grad_rows = torch.randn(num_tokens * top_k, hidden, device=device).to(dtype)

    got = torch.autograd.grad((moekernels.permute(x, plan, backend=backend) * grad_rows).sum(), x)
    want = torch.autograd.grad((reference.permute(x, plan) * grad_rows).sum(), x)
    assert got[0].dtype == dtype and rel_err(got[0], want[0]) <= TOL[dtype]

    out = moekernels.unpermute(y_sorted, plan, weights, backend=backend)
    got = torch.autograd.grad((out * grad_out).sum(), (y_sorted, weights))
    ref = reference.unpermute(y_sorted, plan, weights)
    want = torch.autograd.grad((ref * grad_out).sum(), (y_sorted, weights))
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert rel_err(got[0], want[0]) <= TOL[dtype]
    assert rel_err(got[1], want[1]) <= max(TOL[dtype], 1e-5)


def test_gradcheck_on_the_reference_path():
    plan, num_tokens, top_k, hidden = setup((6, 3, 5, 7), torch.float64, "cpu", "torch")
    x = torch.randn(num_tokens, hidden, dtype=torch.float64, requires_grad=True)
    y_sorted = torch.randn(num_tokens * top_k, hidden, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(num_tokens, top_k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: moekernels.permute(a, plan, backend="torch"), (x,))
    assert torch.autograd.gradcheck(lambda a, w: moekernels.unpermute(a, plan, w, backend="torch"),
                                    (y_sorted, weights))


# ----------------------------------------------------------------------------- the custom ops


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    plan, num_tokens, top_k, hidden = setup((7, 2, 8, 24), torch.float32, "cpu", backend)
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    y_sorted = torch.randn(num_tokens * top_k, hidden, requires_grad=True)
    weights = torch.rand(num_tokens, top_k, requires_grad=True)
    ops = torch.ops.moekernels
    torch.library.opcheck(ops.permute.default, (x, plan.source_index, plan.dest_index, top_k, backend))
    torch.library.opcheck(ops.unpermute.default, (y_sorted, plan.dest_index, plan.expert_offsets, weights, backend))
    torch.library.opcheck(ops.permute_backward.default, (y_sorted.detach(), plan.dest_index, top_k, backend))
    torch.library.opcheck(ops.unpermute_backward.default,
                          (x.detach(), y_sorted.detach(), plan.dest_index, plan.expert_offsets, weights.detach(),
                           backend))


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    plan = moekernels.plan_routing(make_ids(4, 2, 8), 8)
    other = moekernels.plan_routing(make_ids(5, 2, 8), 8)
    x, y, w = torch.randn(4, 16), torch.randn(8, 16), torch.rand(4, 2)
    return [
        ("permute", "x", dict(x=x.int()), TypeError),
        ("permute", "x", dict(x=x[0]), ValueError),
        ("permute", "plan", dict(plan=other), ValueError),
        ("permute", "plan", dict(plan=(1, 2)), TypeError),
        ("unpermute", "y_sorted", dict(y_sorted=y.to(torch.float8_e4m3fn)), TypeError),
        ("unpermute", "y_sorted", dict(y_sorted=y[:7]), ValueError),
        ("unpermute", "topk_weights", dict(topk_weights=w.view(2, 4)), ValueError),
        ("unpermute", "topk_weights", dict(topk_weights=w.int()), TypeError),
        ("unpermute", "topk_weights", dict(topk_weights=w.to("meta")), ValueError),
        ("unpermute", "plan", dict(plan=other), ValueError),
    ], dict(x=x, y_sorted=y, topk_weights=w, plan=plan)


CASES_BAD, BASE = _bad_cases()


@pytest.mark.parametrize("op,name,change,error", CASES_BAD, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES_BAD)])
def test_bad_input_names_the_argument(op, name, change, error):
    args = {**BASE, **change}
    with pytest.raises(error, match=name):
        if op == "permute":
            moekernels.permute(args["x"], args["plan"])
        else:
            moekernels.unpermute(args["y_sorted"], args["plan"], args["topk_weights"])


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_past_2_to_31_elements(backend):
    """T*k*H > 2**31: the row offsets need int64 (65536 tokens x 8 x 4096 = 2.1e9 elements)."""
    num_tokens, top_k, hidden = 65536, 8, 4096
    ids = make_ids(num_tokens, top_k, 128, device="cuda")
    plan = moekernels.plan_routing(ids, 128, backend="triton")
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    out = moekernels.permute(x, plan, backend=backend)
    last = plan.source_index[-64:].long() // top_k  # rows past 2**31 elements from the start
    assert torch.equal(out[-64:], x[last])
    weights = torch.rand(num_tokens, top_k, device="cuda")
    y = moekernels.unpermute(out, plan, weights, backend=backend)
    assert rel_err(y[-16:], x[-16:].float() * weights[-16:].sum(-1, keepdim=True)) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_cuda_graph_and_gradients(backend):
    num_tokens, top_k, num_experts, hidden = 3000, 8, 64, 7168
    ids = make_ids(num_tokens, top_k, num_experts, device="cuda")
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(num_tokens, top_k, device="cuda")

    def layer():
        plan = moekernels.plan_routing(ids, num_experts, backend="triton")
        return moekernels.unpermute(moekernels.permute(x, plan, backend=backend), plan, weights, backend=backend)

    want = layer()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        got = layer()
    got.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)

    plan = moekernels.plan_routing(ids, num_experts, backend="triton")
    y_sorted = torch.randn(num_tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = weights.clone().requires_grad_(True)
    grad_out = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    got = torch.autograd.grad((moekernels.unpermute(y_sorted, plan, w, backend=backend) * grad_out).sum(),
                              (y_sorted, w))
    want = torch.autograd.grad((reference.unpermute(y_sorted, plan, w) * grad_out).sum(), (y_sorted, w))
    assert rel_err(got[0], want[0]) <= TOL[torch.bfloat16] and rel_err(got[1], want[1]) <= 1e-3
