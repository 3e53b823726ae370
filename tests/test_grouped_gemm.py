"""moekernels.grouped_mm and its fused variants, forward and backward, against float64 and torch."""

import dataclasses

import pytest
import torch
from conftest import cpu_backends, device_backends, gpu_backends, rel_err
from test_plan import make_ids

import moekernels
from moekernels import _backend, configs, reference
from moekernels import grouped_gemm as gg

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, K, N, E, tail): M rows over E experts (one empty, one with a single row, the rest random),
# K and N not multiples of any tile; K = 36 in bf16 is 72-byte rows, not 16-byte aligned, so it
# takes the pointer loads instead of TMA; rows per expert from 4 (the swap-AB decode tiles) to
# 100 (64-row tiles); ``tail`` rows past offs[-1] must come out zero.
CASES = [(20, 40, 24, 4, 0), (21, 36, 40, 5, 3), (9, 16, 16, 8, 1), (300, 48, 72, 3, 7), (1, 32, 8, 2, 0)]


def case_id(c):
    return "M{}_K{}_N{}_E{}_tail{}".format(*c)


def make_offs(rows, num_experts, tail=0, device="cpu"):
    """Fresh random cumulative segment ends over rows - tail rows, with an expert that gets no
    row and one that gets exactly one (when there are rows enough)."""
    used = rows - tail
    counts = torch.zeros(num_experts, dtype=torch.int64)
    perm = torch.randperm(num_experts)
    if num_experts >= 3 and used >= 1:
        counts[perm[1]] = 1  # perm[0] stays empty
        rest = perm[2:]
        counts[rest] += torch.bincount(rest[torch.randint(0, len(rest), (used - 1,))], minlength=num_experts)[rest]
    else:
        counts += torch.bincount(torch.randint(0, num_experts, (used,)), minlength=num_experts)
    return counts.cumsum(0).to(torch.int32).to(device)


def make_weight(num_experts, k, n, dtype, device, kmajor):
    """[E, K, N]: contiguous, or the transposed view of an [E, N, K] tensor (nn.Linear storage)."""
    if kmajor:
        return (torch.randn(num_experts, n, k, device=device) / k**0.5).to(dtype).transpose(1, 2)
    return (torch.randn(num_experts, k, n, device=device) / k**0.5).to(dtype)


def exact_mm(x, w, offs):
    return reference.grouped_mm(x.double().cpu(), w.double().cpu(), offs.cpu())


def torch_lowp_err(x, w, offs):
    """torch's own error in x's dtype: each segment's mm in that dtype, against float64."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype)
    for e, s, t in reference._segments(offs.cpu(), x.shape[0]):
        if t > s:
            out[s:t] = x[s:t].cpu() @ w[e].cpu()
    return rel_err(out, exact_mm(x, w, offs))


def tolerance(dtype, device, backend, torch_err):
    """DESIGN.md: 2 * err(torch in the dtype) + eps. eps: the kernel's float32 sums run in another
    order than torch's, so a result near a rounding boundary can round to the other bf16/fp16
    neighbour (1 ulp where torch's error is half of one), and the GPU runs float32 as tf32 (10-bit
    mantissa)."""
    eps = 1e-6
    if backend == "triton" and device == "cpu":
        eps = {torch.bfloat16: 2**-8, torch.float16: 2**-11}.get(dtype, 1e-6)
    if device == "cuda" and dtype == torch.float32:
        eps = 2**-10
    return 2 * torch_err + eps


@pytest.fixture
def small_tiles(monkeypatch):
    """16x16x16 tiles in swizzle groups of 2: many tiles, K steps and tails at test sizes."""
    orig = configs.grouped_mm_config

    def patched(*args, **kwargs):
        cfg = orig(*args, **kwargs)
        return dataclasses.replace(cfg, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)

    monkeypatch.setattr(configs, "grouped_mm_config", patched)


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("kmajor", [False, True], ids=["w_ekn", "w_enk_view"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_grouped_mm_matches_float64(case, dtype, kmajor, device, backend):
    rows, k, n, num_experts, tail = case
    x = torch.randn(rows, k, device=device).to(dtype)
    w = make_weight(num_experts, k, n, dtype, device, kmajor)
    offs = make_offs(rows, num_experts, tail, device)
    y = moekernels.grouped_mm(x, w, offs, backend=backend)
    assert y.dtype == dtype and y.shape == (rows, n)
    exact = exact_mm(x, w, offs)
    assert rel_err(y, exact) <= tolerance(dtype, device, backend, torch_lowp_err(x, w, offs))
    assert not y[rows - tail:].any()  # rows at or after offs[-1] are zero


@pytest.mark.parametrize("backend", cpu_backends())
def test_many_tiles_per_program(backend, small_tiles):
    """16x16x16 tiles: the persistent programs walk many (expert, tile) items, K tails and
    GROUP_M swizzle groups cut short at an expert's last rows."""
    rows, k, n, num_experts = 150, 72, 56, 6
    for kmajor in (False, True):
        x = torch.randn(rows, k).bfloat16()
        w = make_weight(num_experts, k, n, torch.bfloat16, "cpu", kmajor)
        offs = make_offs(rows, num_experts, 5)
        y = moekernels.grouped_mm(x, w, offs, backend=backend)
        assert rel_err(y, exact_mm(x, w, offs)) <= tolerance(torch.bfloat16, "cpu", backend,
                                                             torch_lowp_err(x, w, offs))
        assert not y[-5:].any()


@pytest.mark.parametrize("backend", cpu_backends())
def test_same_as_torch_grouped_mm(backend):
    """The 2D x 3D case of torch._grouped_mm, which torch runs on CPU tensors too."""
    rows, k, n, num_experts = 40, 32, 24, 5
    x = torch.randn(rows, k).bfloat16()
    w = make_weight(num_experts, k, n, torch.bfloat16, "cpu", True)
    offs = make_offs(rows, num_experts, 4)
    ours = moekernels.grouped_mm(x, w, offs, backend=backend)
    theirs = torch._grouped_mm(x, w, offs)
    used = int(offs[-1])  # torch leaves the rows past offs[-1] unwritten; ours are zero
    assert rel_err(ours[:used], theirs[:used]) <= 2 * torch_lowp_err(x, w, offs) + 2**-8
    assert not ours[used:].any()


@pytest.mark.parametrize("backend", cpu_backends())
def test_empty_and_degenerate_shapes(backend):
    w = torch.randn(3, 8, 16)
    offs = torch.zeros(3, dtype=torch.int32)
    assert moekernels.grouped_mm(torch.randn(0, 8), w, offs, backend=backend).shape == (0, 16)
    y = moekernels.grouped_mm(torch.randn(5, 8), w, offs, backend=backend)  # every expert empty
    assert y.shape == (5, 16) and not y.any()
    y = moekernels.grouped_mm(torch.randn(4, 0), torch.randn(3, 0, 16), torch.tensor([1, 2, 4], dtype=torch.int32),
                              backend=backend)  # K = 0: a sum of nothing
    assert y.shape == (4, 16) and not y.any()


# ----------------------------------------------------------------------------- backward


def float64_grads(x, w, offs, grad):
    xd = x.detach().double().cpu().requires_grad_()
    wd = w.detach().double().cpu().requires_grad_()
    reference.grouped_mm(xd, wd, offs.cpu()).backward(grad.double().cpu())
    return xd.grad, wd.grad


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("kmajor", [False, True], ids=["w_ekn", "w_enk_view"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=case_id)
def test_gradients_match_float64(case, dtype, kmajor, device, backend):
    rows, k, n, num_experts, tail = case
    x = torch.randn(rows, k, device=device).to(dtype).requires_grad_()
    w = make_weight(num_experts, k, n, dtype, device, kmajor).requires_grad_()
    offs = make_offs(rows, num_experts, tail, device)
    grad = torch.randn(rows, n, device=device).to(dtype)
    moekernels.grouped_mm(x, w, offs, backend=backend).backward(grad)
    dx, dw = float64_grads(x, w, offs, grad)
    tol = 3 * tolerance(dtype, device, backend, torch_lowp_err(x.detach(), w.detach(), offs))
    assert rel_err(x.grad, dx) <= tol and rel_err(w.grad, dw) <= tol
    assert not x.grad[rows - tail:].any()  # rows past offs[-1] took no part
    counts = torch.diff(offs.cpu(), prepend=offs.new_zeros(1).cpu())
    assert not w.grad[(counts == 0).to(device)].any()  # experts with no rows get zero
    assert w.grad.stride() == w.stride()  # nn.Linear storage gets its gradient in its own layout


@pytest.mark.parametrize("backend", cpu_backends())
def test_weight_gradient_many_tiles(backend, small_tiles):
    rows, k, n, num_experts = 90, 40, 56, 5
    x = torch.randn(rows, k, dtype=torch.float32)
    offs = make_offs(rows, num_experts, 2)
    grad = torch.randn(rows, n)
    dw = torch.ops.moekernels.grouped_mm_dw(x, grad, offs, None, 1, False, backend)
    want = reference.grouped_mm_dw(x.double(), grad.double(), offs)
    assert rel_err(dw, want) <= 1e-6


def gather_problem(num_tokens, top_k, k, n, num_experts, tail, dtype=torch.float32):
    """x [T, K] and the fused layers' sorted rows: a_index a permutation of the T * k pairs (row r is
    x[a_index[r] // k]), grad [T * k, N], and offs with ``tail`` rows past offs[-1]."""
    rows = num_tokens * top_k
    x = torch.randn(num_tokens, k).to(dtype)
    a_index = torch.randperm(rows).to(torch.int32)
    return x, a_index, torch.randn(rows, n).to(dtype), make_offs(rows, num_experts, tail)


@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("backend", cpu_backends())
def test_fp32_weight_gradient_reads_transposed_copies(backend, gather, small_tiles, monkeypatch):
    """fp32 (tf32 on a GPU: both operands token-contiguous) runs through the tile-aligned transposed
    copies of x (gathered while copied) and dy: an empty expert, a single-row one, segments not
    multiples of the 16-token tile, rows past offs[-1]."""
    copies, copy = [], gg.transpose_segments

    def spy(x, offs, rows, q, *args, **kwargs):
        copies.append(tuple(q.shape))
        return copy(x, offs, rows, q, *args, **kwargs)

    monkeypatch.setattr(gg, "transpose_segments", spy)
    num_tokens, top_k, k, n, num_experts = (45, 2, 40, 56, 6)
    x, a_index, grad, offs = gather_problem(num_tokens, top_k, k, n, num_experts, 3)
    if not gather:
        x, a_index, top_k = reference.permute_rows(x, a_index, top_k), None, 1
    dw = torch.ops.moekernels.grouped_mm_dw(x, grad, offs, a_index, top_k, False, backend)
    want = reference.grouped_mm_dw(x.double(), grad.double(), offs, a_index, top_k)
    assert rel_err(dw, want) <= 1e-6
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    assert not dw[counts == 0].any()
    cols = gg.segment_columns(grad.shape[0], num_experts, 16)
    assert copies == ([(k, cols), (n, cols)] if backend == "triton" else [])


@pytest.mark.parametrize("gather", [False, True], ids=["rows", "gather"])
@pytest.mark.parametrize("tile", [16, 32])
def test_dw_segment_transpose_is_an_exact_copy(gather, tile):
    """The fp32 weight gradient's operand copy (transpose_segments_kernel without quantization)
    against the reference, bit for bit, every column written (spare tiles and padding zeros)."""
    if not _backend.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    x, a_index, grad, offs = gather_problem(37, 2, 72, 8, 5, 4)
    if not gather:
        x, a_index = grad, None
    rows = grad.shape[0]
    q = torch.full((x.shape[1], gg.segment_columns(rows, 5, tile)), float("nan"))
    gg.transpose_segments(x, offs, rows, q, tile=tile, a_index=a_index, gather_div=2)
    assert torch.equal(q, reference.transpose_segments(x, offs, rows, tile, a_index, 2))


def test_gradcheck_on_the_reference_path():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([2, 2, 8], dtype=torch.int32)
    f = lambda a, b: reference.grouped_mm(a, b, offs)  # noqa: E731 (the reference in float64)
    assert torch.autograd.gradcheck(f, (x, w))


# ----------------------------------------------------------------------------- fused variants


def fused_setup(num_tokens, top_k, num_experts, k, n, dtype, device, kmajor=True):
    ids = make_ids(num_tokens, top_k, num_experts, device=device)
    plan = moekernels.plan_routing(ids, num_experts, backend="torch")
    x = torch.randn(num_tokens, k, device=device).to(dtype)
    return plan, x, make_weight(num_experts, k, n, dtype, device, kmajor)


def unfused(x, w, plan, *, gather, activation, weights):
    """The composition of the unfused ops in float64: permute, grouped_mm, act(gate) * up, then
    the router weight and the write to the pair's row."""
    a = reference.permute(x.double(), plan) if gather else x.double()
    z = reference.grouped_mm(a, w.double(), plan.expert_offsets)
    if activation:
        gate, up = z.chunk(2, dim=-1)
        act = torch.nn.functional.silu if activation == "silu" else torch.nn.functional.gelu
        z = act(gate) * up
    if weights is None:
        return z
    out = torch.zeros_like(z)
    src = plan.source_index.long()
    out[src] = z * weights.double().reshape(-1)[src].unsqueeze(-1)
    return out


FUSED = [  # (gather, activation, scatter): GEMM 1 and GEMM 2 of the MoE layer, and each part alone
    (True, "silu", False), (True, "gelu", False), (False, "silu", False), (True, None, False),
    (False, None, True), (True, "silu", True),
]


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("fused", FUSED, ids=lambda f: f"gather{int(f[0])}_{f[1]}_scatter{int(f[2])}")
@pytest.mark.parametrize("shape,kmajor", [((7, 2, 6, 40, 24), True), ((30, 3, 4, 32, 48), True),
                                          ((11, 2, 5, 24, 40), False)],
                         ids=lambda s: "T{}_k{}_E{}_K{}_N{}".format(*s) if isinstance(s, tuple) else f"kmajor{int(s)}")
def test_fused_variants_match_the_unfused_ops(shape, kmajor, fused, device, backend):
    num_tokens, top_k, num_experts, k, n = shape
    gather, activation, scatter = fused
    width = 2 * n if activation else n
    plan, x, w = fused_setup(num_tokens, top_k, num_experts, k, width, torch.bfloat16, device, kmajor)
    if not gather:
        x = reference.permute(x, plan)
    weights = torch.rand(num_tokens, top_k, device=device) if scatter else None
    x.requires_grad_()
    w.requires_grad_()
    if weights is not None:
        weights.requires_grad_()
    out = gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                              gather=gather, activation=activation, scatter_weights=weights, backend=backend)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    wtd = weights.detach().double().requires_grad_() if scatter else None
    want = unfused(xd, wd, plan, gather=gather, activation=activation, weights=wtd)
    tol = 4 * tolerance(torch.bfloat16, device, backend, 2**-9)
    assert out.shape == want.shape and rel_err(out, want) <= tol
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad.double())
    assert rel_err(x.grad, xd.grad) <= 2 * tol and rel_err(w.grad, wd.grad) <= 2 * tol
    if scatter:
        assert rel_err(weights.grad, wtd.grad) <= 2 * tol


def configs_for(monkeypatch, gpu):
    """The configs ``gpu`` gets (the interpreter has no GPU name, so it never splits a decode step),
    each call recorded as (variant, N, SPLIT_GATED) so that a test sees which launches ran."""
    orig, calls = configs.grouped_mm_config, []

    def patched(variant, rows, experts, n, k, dtype, gpu_=None, **kw):
        cfg = orig(variant, rows, experts, n, k, dtype, gpu, **kw)
        calls.append((variant, n, cfg.SPLIT_GATED))
        return cfg

    monkeypatch.setattr(configs, "grouped_mm_config", patched)
    return calls


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("gather,activation,kmajor", [(True, "silu", True), (True, "gelu", False),
                                                      (False, "silu", True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_split_gated_decode_matches_the_unfused_ops(gather, activation, kmajor, dtype, device, backend, monkeypatch):
    """A decode step with fewer gated work items than an H200's 132 SMs (configs.split_gated_decode):
    the plain kernel over [K, 2N] into float32, then act(gate) * up. 3 tokens of top-2 over 6
    experts (one empty, one with a single pair), K = 40 and N = 24: no multiple of a 64-column tile."""
    calls = configs_for(monkeypatch, "h200")
    num_tokens, top_k, num_experts, k, n = 3, 2, 6, 40, 24
    plan, x, w = fused_setup(num_tokens, top_k, num_experts, k, 2 * n, dtype, device, kmajor)
    if not gather:
        x = reference.permute(x, plan)
    out = gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                              gather=gather, activation=activation, backend=backend)
    want = unfused(x, w, plan, gather=gather, activation=activation, weights=None)
    assert out.dtype == dtype and out.shape == want.shape
    # One rounding of the float32 epilogue to the dtype, as the fused tiles: within the fused test's bound.
    assert rel_err(out, want) <= 4 * tolerance(dtype, device, backend, 2**-9)
    if backend == "triton":
        assert calls == [("gated", n, True), ("plain", 2 * n, False)]  # split: gate and up tiles apart
        monkeypatch.undo()
        fused = gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                                    gather=gather, activation=activation, backend=backend)
        assert rel_err(out, fused) <= 2 * tolerance(dtype, device, backend, 2**-9)


# ----------------------------------------------------------------------------- the custom ops


def float32_problem(rows, k, n, num_experts, tail):
    """x, w (nn.Linear storage) requiring grad, and offs with ``tail`` rows past offs[-1]."""
    x = torch.randn(rows, k, requires_grad=True)
    w = make_weight(num_experts, k, n, torch.float32, "cpu", True).requires_grad_()
    return x, w, make_offs(rows, num_experts, tail)


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    rows, k, n, num_experts = 12, 16, 8, 3
    x, w, offs = float32_problem(rows, k, n, num_experts, 1)
    ops = torch.ops.moekernels
    torch.library.opcheck(ops.grouped_mm.default, (x, w, offs, backend))
    torch.library.opcheck(ops.grouped_mm_dw.default, (x.detach(), torch.randn(rows, n), offs, None, 1, True, backend))
    plan, xt, w2 = fused_setup(6, 2, num_experts, k, 2 * n, torch.float32, "cpu")
    weights = torch.rand(6, 2, requires_grad=True)
    torch.library.opcheck(ops.grouped_mm_fused.default,
                          (xt.requires_grad_(), w2.requires_grad_(), plan.expert_offsets, plan.source_index, 2,
                           True, "silu", None, None, None, None, backend))
    sorted_rows = reference.permute(xt.detach(), plan).requires_grad_()
    torch.library.opcheck(ops.grouped_mm_fused.default,
                          (sorted_rows, w2[:, :, :n].detach().requires_grad_(), plan.expert_offsets, plan.source_index,
                           2, False, "", weights, None, None, None, backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend):
    x, w, offs = float32_problem(20, 16, 24, 4, 2)

    def layer(x, w, offs):
        return moekernels.grouped_mm(x, w, offs, backend=backend).square().sum()

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    loss = compiled(x, w, offs)
    gx, gw = torch.autograd.grad(loss, (x, w))
    want = layer(x, w, offs)
    wx, ww = torch.autograd.grad(want, (x, w))
    assert rel_err(loss, want) <= 1e-6 and rel_err(gx, wx) <= 1e-6 and rel_err(gw, ww) <= 1e-6


# ----------------------------------------------------------------------------- the four forms of torch._grouped_mm


def operand(*shape, row_major, strided, dtype=torch.float32):
    """[..., r, c] row-major (c contiguous) or column-major (r contiguous), with a leading
    dimension 8 elements past the extent when strided (torch's test_grouped_gemm layouts)."""
    *lead, r, c = shape
    pad = 8 if strided else 0
    if row_major:
        return torch.randn(*lead, r, c + pad).to(dtype)[..., :c]
    return torch.randn(*lead, c, r + pad).to(dtype).transpose(-1, -2)[..., :r, :]


def form_problem(form, m, n, k, groups, *, a_row_major=True, b_row_major=True, strided=False,
                 dtype=torch.float32):
    """(a, b, offs) of one form, offs with an empty group and a tail the last group leaves out:
    2d3d along M, 2d2d along K, 3d2d along N, none for 3d3d."""
    def offs_over(total, step):  # group 1 empty, the last ends short of total
        ends = [step, step, 2 * step + step // 2, total - step // 4][:groups]
        return torch.tensor(ends, dtype=torch.int32)

    kw = dict(strided=strided, dtype=dtype)
    if form == "2d3d":
        return (operand(m * groups, k, row_major=a_row_major, **kw),
                operand(groups, k, n, row_major=b_row_major, **kw), offs_over(m * groups, m))
    if form == "2d2d":
        return (operand(m, k * groups, row_major=a_row_major, **kw),
                operand(k * groups, n, row_major=b_row_major, **kw), offs_over(k * groups, k))
    if form == "3d3d":
        return (operand(groups, m, k, row_major=a_row_major, **kw),
                operand(groups, k, n, row_major=b_row_major, **kw), None)
    return (operand(groups, m, k, row_major=a_row_major, **kw),
            operand(k, n * groups, row_major=b_row_major, **kw), offs_over(n * groups, n))


FORMS = ["2d3d", "2d2d", "3d3d", "3d2d"]


def _used(form, out, offs):
    """The part of the output torch writes (it leaves rows / columns past offs[-1] unwritten)."""
    if form == "2d3d":
        return out[:int(offs[-1])]
    return out[:, :int(offs[-1])] if form == "3d2d" else out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
@pytest.mark.parametrize("a_row_major", [True, False], ids=["a_rows", "a_cols"])
@pytest.mark.parametrize("b_row_major", [True, False], ids=["b_rows", "b_cols"])
@pytest.mark.parametrize("form", FORMS)
def test_every_form_of_torch_grouped_mm(form, b_row_major, a_row_major, strided, backend):
    """torch._grouped_mm's own cases (test_matmul_cuda.py): each form, strided and transposed
    layouts, an empty group. bf16 forward against torch._grouped_mm on the CPU; fp32 gradients
    against the float64 reference's autograd."""
    a, b, offs = form_problem(form, 16, 16, 32, 4, a_row_major=a_row_major, b_row_major=b_row_major,
                              strided=strided, dtype=torch.bfloat16)
    ours, theirs = moekernels.grouped_mm(a, b, offs, backend=backend), torch._grouped_mm(a, b, offs)
    exact = reference.grouped_mm(a.double(), b.double(), offs)
    assert ours.shape == theirs.shape and ours.dtype == torch.bfloat16
    torch_err = rel_err(_used(form, theirs, offs), _used(form, exact, offs))
    assert rel_err(ours, exact) <= 2 * torch_err + 2**-8
    if form in ("2d3d", "3d2d"):  # past offs[-1]: zero here, unwritten by torch
        assert not (ours[int(offs[-1]):] if form == "2d3d" else ours[:, int(offs[-1]):]).any()
    if form == "2d2d":
        assert not ours[1].any()  # the empty group
    a, b = (t.float().detach().requires_grad_(True) for t in (a, b))
    out = moekernels.grouped_mm(a, b, offs, backend=backend)
    g = torch.randn_like(out)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    wa, wb = torch.autograd.grad(reference.grouped_mm(a64, b64, offs), (a64, b64), g.double())
    assert ga.shape == a.shape and gb.shape == b.shape
    assert rel_err(ga, wa) <= 1e-5 and rel_err(gb, wb) <= 1e-5


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("form", FORMS)
def test_forms_unaligned_sizes(form, backend):
    """N = 7 and K = 259 (rows not 16-byte aligned: torch's kernel refuses them, ours takes the
    pointer loads), fp16, forward and gradients against float64."""
    a, b, offs = form_problem(form, 5, 7, 259, 3, dtype=torch.float16) if form != "2d2d" else \
        form_problem(form, 5, 7, 37, 3, dtype=torch.float16)  # 2d2d: K = 3 groups of 37, 111 in all
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    out = moekernels.grouped_mm(a, b, offs, backend=backend)
    a64, b64 = (t.detach().double().requires_grad_(True) for t in (a, b))
    want = reference.grouped_mm(a64, b64, offs)
    torch_err = rel_err(reference.grouped_mm(a.detach(), b.detach(), offs), want)  # float32 sums, one fp16 rounding
    assert out.dtype == torch.float16 and rel_err(out, want) <= 2 * torch_err + 2**-10
    g = torch.randn_like(want)
    ga, gb = torch.autograd.grad(out, (a, b), g.half())
    wa, wb = torch.autograd.grad(want, (a64, b64), g)
    assert rel_err(ga, wa) <= 2**-8 and rel_err(gb, wb) <= 2**-8


@pytest.mark.parametrize("backend", cpu_backends())
def test_forms_compile_and_errors(backend):
    """Each form under torch.compile(fullgraph=True), forward and backward; bad forms raise."""
    for form in FORMS:
        a, b, offs = form_problem(form, 8, 8, 16, 3)
        a, b = a.requires_grad_(True), b.requires_grad_(True)

        def f(a, b, offs):
            return moekernels.grouped_mm(a, b, offs, backend=backend).square().sum()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = torch.autograd.grad(compiled(a, b, offs), (a, b))
        want = torch.autograd.grad(f(a, b, offs), (a, b))
        assert all(rel_err(x, y) <= 1e-6 for x, y in zip(got, want)), form
    a3, b3 = torch.randn(3, 4, 8), torch.randn(3, 8, 5)
    offs = torch.tensor([1, 2, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="offs must be None"):
        moekernels.grouped_mm(a3, b3, offs)
    with pytest.raises(ValueError, match="offs is required"):
        moekernels.grouped_mm(a3, torch.randn(8, 5))
    with pytest.raises(ValueError, match="batch"):
        moekernels.grouped_mm(a3, b3[:2])
    with pytest.raises(ValueError, match="K mismatch"):
        moekernels.grouped_mm(torch.randn(4, 8), torch.randn(9, 5), offs)
    with pytest.raises(ValueError, match="one entry per group"):
        moekernels.grouped_mm(a3, torch.randn(8, 5), offs[:2])
    with pytest.raises(ValueError, match="offs"):  # past K
        moekernels.grouped_mm(torch.randn(4, 8), torch.randn(8, 5), torch.tensor([2, 4, 9], dtype=torch.int32))
    with pytest.raises(TypeError, match="w"):
        moekernels.grouped_mm(a3, b3.double())
    torch.library.opcheck(torch.ops.moekernels.grouped_mm_dw.default,
                          (torch.randn(9, 4), torch.randn(9, 5), offs * 3, None, 1, False, backend))


# ----------------------------------------------------------------------------- autocast


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_its_dtype(dtype, backend):
    """Under CPU autocast, float32 x and w give what x and w cast by hand give, bit for bit, and
    float32 gradients: those of the cast copies, in float32. The op itself autocasts too."""
    rows, k, n, num_experts = 21, 36, 40, 5
    x, w = torch.randn(rows, k), make_weight(num_experts, k, n, torch.float32, "cpu", True)
    offs = make_offs(rows, num_experts, 3)  # an empty expert, a single row, a tail
    g = torch.randn(rows, n)
    xa, wa, xh, wh = _leaf(x), _leaf(w), _leaf(x, dtype), _leaf(w, dtype)
    with torch.autocast("cpu", dtype=dtype):
        y = moekernels.grouped_mm(xa, wa, offs, backend=backend)
        y_op = torch.ops.moekernels.grouped_mm(x, w, offs, backend)
    want = moekernels.grouped_mm(xh, wh, offs, backend=backend)
    assert y.dtype == dtype and torch.equal(y, want) and torch.equal(y_op, want)
    (y.float() * g).sum().backward()
    (want.float() * g).sum().backward()
    assert xa.grad.dtype == torch.float32 and wa.grad.dtype == torch.float32
    assert torch.equal(xa.grad, xh.grad.float()) and torch.equal(wa.grad, wh.grad.float())
    # against float32 without autocast: the error of the low-precision dtype, not zero
    assert 0 < rel_err(y, moekernels.grouped_mm(x, w, offs, backend=backend)) <= 2**-6


@pytest.mark.parametrize("backend", cpu_backends())
def test_autocast_fused_keeps_router_weights_and_compiles(backend):
    """grouped_mm_fused under autocast: x and w cast, the scatter weights kept in float32 (a bf16
    copy would round them), and the same under torch.compile(fullgraph=True)."""
    tokens, top_k, num_experts, k, n = 7, 2, 6, 40, 24
    x, w = torch.randn(tokens, k), make_weight(num_experts, k, 2 * n, torch.float32, "cpu", True)
    ids = make_ids(tokens, top_k, num_experts)
    plan = moekernels.plan_routing(ids, num_experts)
    tw = torch.rand(tokens, top_k)

    def fused(x, w, tw):
        return gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                                   gather=True, activation="silu", scatter_weights=tw, backend=backend)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(x, w, tw)
        compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")(x, w, tw)
    want = fused(x.bfloat16(), w.bfloat16(), tw)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want) and torch.equal(compiled, want)
    assert not torch.equal(want, fused(x.bfloat16(), w.bfloat16(), tw.bfloat16()))


# ----------------------------------------------------------------------------- bad input


def _bad_cases():
    x, w, offs = torch.randn(10, 8), torch.randn(3, 8, 4), torch.tensor([2, 5, 9], dtype=torch.int32)
    return [
        ("x", dict(x=x[0]), ValueError),
        ("x", dict(x=x.int()), TypeError),
        ("w", dict(w=w[0]), ValueError),
        ("w", dict(w=w.double()), TypeError),
        ("w", dict(w=w.to("meta")), ValueError),
        ("offs", dict(offs=offs.long()), TypeError),
        ("offs", dict(offs=offs[:2]), ValueError),
        ("offs", dict(offs=offs.view(3, 1)), ValueError),
        ("offs", dict(offs=torch.tensor([2, 1, 9], dtype=torch.int32)), ValueError),
        ("offs", dict(offs=torch.tensor([2, 5, 11], dtype=torch.int32)), ValueError),
        ("K mismatch", dict(w=torch.randn(3, 7, 4)), ValueError),
    ], dict(x=x, w=w, offs=offs)


CASES_BAD, BASE = _bad_cases()


@pytest.mark.parametrize("name,change,error", CASES_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES_BAD)])
def test_bad_input_names_the_argument(name, change, error):
    args = {**BASE, **change}
    with pytest.raises(error, match=name):
        moekernels.grouped_mm(args["x"], args["w"], args["offs"])


def test_fused_bad_input():
    plan, x, w = fused_setup(5, 2, 4, 16, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="source_index"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, gather=True, top_k=2)
    with pytest.raises(ValueError, match="activation"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, activation="relu")
    with pytest.raises(ValueError, match="2N"):
        gg.grouped_mm_fused(x, w[:, :, :15], plan.expert_offsets, activation="silu")
    with pytest.raises(ValueError, match="top_k"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, gather=True, top_k=3)


def test_config_is_a_pure_function_of_the_problem():
    """The rows class, not the token count, picks the config; decode gets its own tiles."""
    a = configs.grouped_mm_config("plain", 8 * 130, 8, 4096, 7168, torch.bfloat16)
    b = configs.grouped_mm_config("plain", 8 * 200, 8, 4096, 7168, torch.bfloat16)
    assert a == b  # 130 and 200 rows per expert: one class, one compile
    decode = configs.grouped_mm_config("plain", 16, 8, 4096, 7168, torch.bfloat16)
    assert decode.SWAP_AB and decode.BLOCK_M == 16 and not a.SWAP_AB and a.BLOCK_M >= 64


def test_n_major_fp32_weight_swaps_operands():
    """tf32 wgmma reads shared memory K-major only: an N-major fp32 weight (dx of an nn.Linear
    weight) becomes the register operand of the transposed tile (SWAP_AB) at every size, so it is
    never transposed through shared memory (the sm_90 contract's no_smem_round_trip holds it);
    K-major fp32, and bf16 of either storage, keep the plain tile. test_grouped_mm_matches_float64's
    300-row fp32 w_ekn case runs this config (100 rows an expert) under the interpreter."""
    for rows in (64 * 8, 512 * 8):
        assert configs.grouped_mm_config("plain", rows, 8, 3072, 4096, torch.float32, kmajor=False).SWAP_AB
        assert not configs.grouped_mm_config("plain", rows, 8, 3072, 4096, torch.float32).SWAP_AB
        assert not configs.grouped_mm_config("plain", rows, 8, 3072, 4096, torch.bfloat16, kmajor=False).SWAP_AB


def test_decode_splits_the_gated_gemm_only_when_it_does_not_fill_the_gpu():
    """Qwen3-30B-A3B (E 128, k 8, H 2048, I 768) on an H100/H200 (132 SMs). At T = 1 GEMM 1 (gated,
    N = I) has 8 experts x 768/64 tiles = 96 work items: split, into 8 x 1536/64 = 192 plain ones
    (the plain config over [K, 2I], never split itself). Not at T = 2 (up to 16 x 12 = 192 items),
    in prefill, for GEMM 2 (N = H: 8 x 2048/64 = 256), in fp32 or fp8, nor on an unknown GPU."""
    bf16 = torch.bfloat16
    e, top_k, h, i = 128, 8, 2048, 768
    for gpu in ("h100", "h200"):
        t1 = configs.grouped_mm_config("gated", 1 * top_k, e, i, h, bf16, gpu)
        assert t1.SPLIT_GATED and t1.SWAP_AB and t1.BLOCK_N >= 64  # wgmma's M: 64 weight columns at least
        assert configs.decode_work_items(top_k, e, i, t1.BLOCK_N) == 96 < configs.GPU_SMS[gpu]
        plain = configs.grouped_mm_config("plain", top_k, e, 2 * i, h, bf16, gpu)
        assert not plain.SPLIT_GATED and plain.SWAP_AB
        assert configs.decode_work_items(top_k, e, 2 * i, plain.BLOCK_N) == 192 >= configs.GPU_SMS[gpu]
    assert configs.grouped_mm_config("gated", top_k, e, i, h, torch.float16, "h200").SPLIT_GATED
    unsplit = [("gated", 2 * top_k, i, bf16, "h200"), ("gated", 4096 * top_k, i, bf16, "h200"),
               ("scatter", top_k, h, bf16, "h200"), ("gated", top_k, i, torch.float32, "h200"),
               ("gated", top_k, i, torch.float8_e4m3fn, "h200"), ("gated", top_k, i, bf16, None)]
    for variant, rows, n, dtype, gpu in unsplit:
        cfg = configs.grouped_mm_config(variant, rows, e, n, h, dtype, gpu)
        assert not cfg.SPLIT_GATED, (variant, rows, dtype, gpu)
    # The split is the only change: the fused decode tiles otherwise.
    fused = configs.grouped_mm_config("gated", top_k, e, i, h, bf16, None)
    assert dataclasses.replace(t1, SPLIT_GATED=False) == fused


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends()[:1])
@pytest.mark.parametrize("rows_per_expert", [1, 8, 100, 700])
def test_gpu_model_shapes(backend, rows_per_expert):
    """Qwen3-30B-A3B's gate/up (E 128, K 2048, N 1536) at decode and prefill loads, skewed."""
    num_experts, k, n = 128, 2048, 1536
    rows = rows_per_expert * num_experts
    x = torch.randn(rows, k, device="cuda").bfloat16()
    w = make_weight(num_experts, k, n, torch.bfloat16, "cuda", True)
    offs = make_offs(rows, num_experts, 3, "cuda")
    x.requires_grad_()
    w.requires_grad_()
    y = moekernels.grouped_mm(x, w, offs, backend=backend)
    want = torch._grouped_mm(x, w, offs)
    used = int(offs[-1])
    assert rel_err(y[:used], want[:used]) <= 2**-7 and not y[used:].any()
    grad = torch.randn_like(y)
    grad[used:] = 0  # torch leaves the rows past offs[-1] unwritten, and their gradient undefined
    ours = torch.autograd.grad(y, (x, w), grad)
    theirs = torch.autograd.grad(want, (x, w), grad)
    assert all(rel_err(a, b) <= 2**-7 for a, b in zip(ours, theirs))


@pytest.mark.gpu
def test_gpu_past_2_to_31_elements():
    """M*K > 2**31: int64 row offsets (the rows of the last expert start past element 2**31)."""
    rows, k, n, num_experts = 2**31 // 4096 + 512, 4096, 128, 4
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = make_weight(num_experts, k, n, torch.bfloat16, "cuda", False)
    offs = torch.tensor([1000, 2000, 3000, rows], dtype=torch.int32, device="cuda")
    y = moekernels.grouped_mm(x, w, offs, backend="triton")
    tail = x[-64:].float() @ w[3].float()
    assert rel_err(y[-64:], tail) <= 2**-7


@pytest.mark.gpu
def test_gpu_cuda_graph_and_fused_gradients():
    num_tokens, top_k, num_experts, k, n = 512, 8, 64, 1024, 512
    plan, x, w1 = fused_setup(num_tokens, top_k, num_experts, k, 2 * n, torch.bfloat16, "cuda")
    w2 = make_weight(num_experts, n, k, torch.bfloat16, "cuda", True)
    weights = torch.rand(num_tokens, top_k, device="cuda")

    def layer(x, w1, w2, weights):
        h = gg.grouped_mm_fused(x, w1, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                                gather=True, activation="silu", backend="triton")
        out = gg.grouped_mm_fused(h, w2, plan.expert_offsets, source_index=plan.source_index,
                                  scatter_weights=weights, backend="triton")
        return out.view(num_tokens, top_k, -1).sum(1)

    want = layer(x, w1, w2, weights)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        got = layer(x, w1, w2, weights)
    got.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)
    ref = unfused(x, w1, plan, gather=True, activation="silu", weights=None)
    ref = unfused(ref, w2, plan, gather=False, activation=None, weights=weights).view(num_tokens, top_k, -1).sum(1)
    assert rel_err(want, ref) <= 2**-6
    params = [t.detach().requires_grad_() for t in (x, w1, w2, weights)]
    layer(*params).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in params)
