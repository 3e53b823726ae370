"""The low-rank segment of the fused grouped GEMM (LoRA on the experts, issue 16):
``epilogue(A @ w[e] + lora_x @ lora_w[e])`` in one launch of grouped_mm_kernel (its LORA K loop
after the main one), against the float64 composition of the reference, the torch backend, and
torch autograd."""

import pytest
import torch
from conftest import cpu_backends, rel_err
from test_fp8 import quantized_problem
from test_grouped_gemm import configs_for, fused_setup, make_weight, tolerance
from test_plan import make_ids

from moekernels import configs, reference
from moekernels import grouped_gemm as gg
from moekernels.plan import RoutingPlan


def setup(num_tokens, top_k, num_experts, k, n, dtype, dropped):
    """fused_setup's plan, x and w, with the last ``dropped`` pairs routed to no expert: their rows
    come after offs[-1] (the launch's tail tiles, which must stay zero)."""
    ids = make_ids(num_tokens, top_k, num_experts)
    ids.view(-1)[ids.numel() - dropped:] = num_experts  # what CUDA drops; plan_routing raises on CPU
    plan = RoutingPlan.from_fields(reference.plan_routing_fields(ids, num_experts, None), num_experts, top_k, None)
    return plan, torch.randn(num_tokens, k).to(dtype), make_weight(num_experts, k, n, dtype, "cpu", True)


def lora_operands(rows, num_experts, rank, width, dtype, *, peft=True):
    """lora_x [rows, r] and lora_w [E, r, width], scaled so that the segment is as large as the
    base product (a missing or misplaced segment is a ~100% error): lora_w the transposed view of
    PEFT's [E, width, r] B (rank stride 1), or contiguous (width stride 1)."""
    lx = torch.randn(rows, rank).to(dtype)
    if peft:
        lw = (torch.randn(num_experts, width, rank) / rank**0.5).to(dtype).transpose(1, 2)
    else:
        lw = (torch.randn(num_experts, rank, width) / rank**0.5).to(dtype)
    return lx, lw


def exact(x, w, plan, gather, activation, weights, lx, lw, top_k, a_scale=None, b_scale=None):
    """The reference in float64 (of the dequantized operands for fp8)."""
    if a_scale is not None:
        x, w = reference.dequantize_fp8(x, a_scale), reference.dequantize_fp8(w, b_scale)
    sw = weights.double() if weights is not None else None
    return reference.grouped_mm_fused(x.double(), w.double(), plan.expert_offsets, plan.source_index, top_k, gather,
                                      activation or "", sw, (lx.double(), lw.double()))


# (tokens, top_k, E, K, N, r, gather, activation, scatter, PEFT layout of lora_w, dropped pairs). Rows per expert
# pick the tiles: 60 rows over 3 experts are 64-row tiles, 8-12 rows over 5-6 experts the swap-AB
# decode tiles (16 token rows in wgmma's N). Every plan has an expert with no row and one with a
# single row (test_plan.make_ids); N is no multiple of a tile; r = 1, 5 and 33 take one masked
# rank step, r = 80 two (BLOCK_R 64).
CASES = {
    "plain_r16": (60, 1, 3, 48, 40, 16, False, None, False, True, 3),
    "gather_silu_r5": (60, 1, 3, 40, 24, 5, True, "silu", False, True, 0),
    "scatter_r1": (60, 1, 3, 24, 40, 1, False, None, True, False, 0),
    "decode_gather_gelu_r33": (6, 2, 5, 40, 24, 33, True, "gelu", False, False, 0),
    "decode_gather_silu_scatter_r80": (4, 2, 6, 32, 24, 80, True, "silu", True, True, 2),
    "decode_plain_k0_r3": (6, 2, 5, 0, 24, 3, False, None, False, True, 1),  # no K steps: the segment alone
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(CASES))
def test_lora_segment_matches_the_reference(case, backend):
    num_tokens, top_k, num_experts, k, n, rank, gather, activation, scatter, peft, dropped = CASES[case]
    width = 2 * n if activation else n
    plan, x, w = setup(num_tokens, top_k, num_experts, k, width, torch.bfloat16, dropped)
    if not gather:
        x = reference.permute(x, plan)
    rows = plan.source_index.shape[0]
    lx, lw = lora_operands(rows, num_experts, rank, width, torch.bfloat16, peft=peft)
    weights = torch.rand(num_tokens, top_k) if scatter else None
    out = gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=top_k, gather=gather,
                              activation=activation, scatter_weights=weights, backend=backend, lora_x=lx, lora_w=lw)
    want = exact(x, w, plan, gather, activation, weights, lx, lw, top_k)
    assert out.dtype == torch.bfloat16 and out.shape == want.shape
    assert rel_err(out, want) <= 4 * tolerance(torch.bfloat16, "cpu", backend, 2**-9)
    used = int(plan.expert_offsets[-1])  # the rows past it (dropped pairs) are zero, or their scatter targets
    assert used == rows - dropped and not out[plan.source_index[used:].long() if scatter else slice(used, None)].any()
    without = exact(x, w, plan, gather, activation, weights, lx, 0 * lw, top_k)
    assert rel_err(without, want) > 0.3  # the segment is no rounding error: the check above sees it


@pytest.mark.parametrize("backend", cpu_backends())
def test_lora_segment_is_one_launch(backend, monkeypatch):
    """The Triton path fuses the segment: one grouped_mm_kernel launch, no float32 product."""
    calls = []
    launch = gg._launch
    monkeypatch.setattr(gg, "_launch", lambda *a, **kw: calls.append(kw.get("lora")) or launch(*a, **kw))
    plan, x, w = fused_setup(6, 2, 5, 32, 48, torch.bfloat16, "cpu")
    lx, lw = lora_operands(12, 5, 16, 48, torch.bfloat16)
    gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=2, gather=True,
                        activation="silu", backend=backend, lora_x=lx, lora_w=lw)
    assert calls == ([(lx, lw)] if backend == "triton" else [])


@pytest.mark.parametrize("backend", cpu_backends())
def test_split_gated_decode_carries_the_segment(backend, monkeypatch):
    """A gated decode step that splits (configs.split_gated_decode, as on an H200) runs the
    segment in its plain launch over [K, 2N], before act(gate) * up."""
    calls = configs_for(monkeypatch, "h200")
    plan, x, w = fused_setup(3, 2, 6, 40, 48, torch.bfloat16, "cpu")
    lx, lw = lora_operands(6, 6, 7, 48, torch.bfloat16)
    out = gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=2, gather=True,
                              activation="silu", backend=backend, lora_x=lx, lora_w=lw)
    want = exact(x, w, plan, True, "silu", None, lx, lw, 2)
    assert rel_err(out, want) <= 4 * tolerance(torch.bfloat16, "cpu", backend, 2**-9)
    if backend == "triton":
        assert calls == [("gated", 24, True), ("plain", 48, False)]


# (mode, tokens, top_k, E, K, N, r, gather, activation, scatter): the segment in bf16 after the fp8
# scales. Blocks need K and N multiples of 128: one small plain case.
FP8_CASES = {
    "tensor": ("tensor", 6, 2, 5, 64, 24, 16, True, "silu", False),
    "rowcol": ("rowcol", 30, 2, 4, 64, 40, 5, False, None, True),
    "block": ("block", 12, 1, 3, 128, 128, 33, False, None, False),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", list(FP8_CASES))
def test_lora_segment_after_the_fp8_scales(case, backend):
    mode, num_tokens, top_k, num_experts, k, n, rank, gather, activation, scatter = FP8_CASES[case]
    width = 2 * n if activation else n
    plan, _, _ = fused_setup(num_tokens, top_k, num_experts, k, width, torch.bfloat16, "cpu")
    rows = plan.source_index.shape[0]
    qa, sa, qb, sb, _, _ = quantized_problem(num_tokens if gather else rows, k, width, num_experts, mode, "cpu")
    lx, lw = lora_operands(rows, num_experts, rank, width, torch.bfloat16)
    weights = torch.rand(num_tokens, top_k) if scatter else None
    out = gg.grouped_mm_fused(qa, qb, plan.expert_offsets, source_index=plan.source_index, top_k=top_k,
                              gather=gather, activation=activation, scatter_weights=weights, a_scale=sa, b_scale=sb,
                              backend=backend, lora_x=lx, lora_w=lw)
    want = exact(qa, qb, plan, gather, activation, weights, lx, lw, top_k, sa, sb)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) <= 1e-2


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("gather,activation,scatter", [(True, "silu", False), (False, None, True),
                                                       (True, "gelu", True)])
def test_lora_gradients_match_torch_autograd(gather, activation, scatter, backend):
    """d lora_x = grad @ lora_w[e]^T, d lora_w[e] = lora_x[seg e]^T @ grad (the gradient of the
    product before the epilogue), with x's, w's and the router weights', in float32 against torch
    autograd through the reference."""
    num_tokens, top_k, num_experts, k, n, rank = 10, 2, 5, 24, 16, 5
    width = 2 * n if activation else n
    plan, x, w = fused_setup(num_tokens, top_k, num_experts, k, width, torch.float32, "cpu")
    if not gather:
        x = reference.permute(x, plan)
    lx, lw = lora_operands(plan.source_index.shape[0], num_experts, rank, width, torch.float32)
    weights = torch.rand(num_tokens, top_k) if scatter else None
    leaves = [t.detach().requires_grad_() for t in (x, w, lx, lw) + ((weights,) if scatter else ())]
    out = gg.grouped_mm_fused(leaves[0], leaves[1], plan.expert_offsets, source_index=plan.source_index,
                              top_k=top_k, gather=gather, activation=activation,
                              scatter_weights=leaves[4] if scatter else None, backend=backend, lora_x=leaves[2],
                              lora_w=leaves[3])
    mirror = [t.detach().requires_grad_() for t in leaves]
    want = reference.grouped_mm_fused(mirror[0], mirror[1], plan.expert_offsets, plan.source_index, top_k, gather,
                                      activation or "", mirror[4] if scatter else None, (mirror[2], mirror[3]))
    assert rel_err(out, want) <= 1e-5
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, grad)
    expected = torch.autograd.grad(want, mirror, grad)
    for name, g, e in zip(("x", "w", "lora_x", "lora_w", "scatter_weights"), got, expected):
        assert g.shape == e.shape and rel_err(g, e) <= 1e-5, name


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck_with_lora(backend):
    num_tokens, top_k, num_experts, k, n, rank = 6, 2, 3, 16, 8, 3
    plan, x, w = fused_setup(num_tokens, top_k, num_experts, k, 2 * n, torch.float32, "cpu")
    lx, lw = lora_operands(12, num_experts, rank, 2 * n, torch.float32)
    torch.library.opcheck(torch.ops.moekernels.grouped_mm_fused.default,
                          (x.requires_grad_(), w.requires_grad_(), plan.expert_offsets, plan.source_index, top_k,
                           True, "silu", None, None, None, None, backend, lx.requires_grad_(), lw.requires_grad_()))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph_with_lora(backend):
    plan, x, w = fused_setup(6, 2, 4, 16, 16, torch.float32, "cpu")
    lx, lw = (t.requires_grad_() for t in lora_operands(12, 4, 4, 16, torch.float32))

    def layer(x, lx, lw):
        return gg.grouped_mm_fused(x, w, plan.expert_offsets, source_index=plan.source_index, top_k=2, gather=True,
                                   activation="silu", backend=backend, lora_x=lx, lora_w=lw).square().sum()

    loss = torch.compile(layer, fullgraph=True, backend="aot_eager")(x, lx, lw)
    got = torch.autograd.grad(loss, (lx, lw))
    want = layer(x, lx, lw)
    expected = torch.autograd.grad(want, (lx, lw))
    assert rel_err(loss, want) <= 1e-6 and all(rel_err(g, e) <= 1e-6 for g, e in zip(got, expected))


def test_lora_block():
    """BLOCK_R: gated, r rounded up to a power of two in [16, 64] (a bf16 wgmma's K at least);
    16 otherwise (wider steps cost the one-accumulator tiles their second program an SM)."""
    assert [configs.lora_block(r, True) for r in (1, 5, 16, 17, 33, 64, 80, 128)] == [16, 16, 16, 32, 64, 64, 64, 64]
    assert {configs.lora_block(r, False) for r in (1, 17, 64, 128)} == {16}


def test_lora_bad_input_names_the_argument():
    plan, x, w = fused_setup(5, 2, 4, 16, 16, torch.float32, "cpu")
    kw = dict(source_index=plan.source_index, top_k=2, gather=True)
    lx, lw = lora_operands(10, 4, 3, 16, torch.float32)
    with pytest.raises(ValueError, match="lora_x and lora_w"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, lora_x=lx, **kw)
    with pytest.raises(ValueError, match="lora_x must be"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, lora_x=lx[:9], lora_w=lw, **kw)
    with pytest.raises(ValueError, match="lora_w"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, lora_x=lx, lora_w=lw[:, :2], **kw)
    with pytest.raises(TypeError, match="lora_w"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, lora_x=lx, lora_w=lw.double(), **kw)
    with pytest.raises(ValueError, match="lora_x must be 2-D"):
        gg.grouped_mm_fused(x, w, plan.expert_offsets, lora_x=lx[None], lora_w=lw, **kw)



def test_launch_without_a_compiled_row_assumes_one_program_per_sm():
    """A LoRA launch the compiled table (configs/sm90_resources.json) lacks runs one program an SM:
    the segment's tiles add registers the estimate does not count (scatter 126 -> 130 at BLOCK_R
    32), so two would be a second wave. Without the segment the estimate stands."""
    bf16 = torch.bfloat16
    cfg = configs.grouped_mm_config("scatter", 512 * 128, 128, 2048, 768, bf16)
    cx = dict(gg.kernel_constexprs(cfg, a_tma=True, b_tma=True, kmajor=True, gather=False, scatter=True, act=0,
                                   scale=0, block_e=128), GROUP_M=cfg.GROUP_M * 2)  # untuned: not in the table
    assert gg.programs_per_sm(cfg, cx, bf16, bf16, cfg.num_stages) == configs.programs_per_sm(cfg, 2) == 2
    assert gg.programs_per_sm(cfg, dict(cx, LORA=True, BLOCK_R=16), bf16, bf16, cfg.num_stages) == 1
