"""A GPU smoke test of every public op: one small call each, on CUDA tensors, with every backend that
has a kernel for it, against backend="torch" (the reference) on the same inputs.

The device check's first call runs only these (benchmarks/device_check.sh stage 1, on 8 pytest-xdist
workers): a broken op shows there in seconds, before the full GPU suite of the second call. Shapes
are small and uneven (37 tokens, 136 columns: no multiple of a block), so the time is the Triton
compiles, ~30 of them. Index outputs must match exactly; float ones within bf16 rounding.
expert_parallel (moekernels.distributed) needs a process group: the full GPU suite covers it.
"""

import pytest
import torch

import moekernels
from moekernels import ExpertsLoRA

from conftest import gpu_backends, rel_err

DEVICE = "cuda"  # module-level, so that a check of this file without a GPU can point it at the CPU
pytestmark = pytest.mark.gpu
TOKENS, HIDDEN, EXPERTS, TOP_K = 37, 136, 16, 4
BF16_TOL = 2e-2  # both sides in bf16: a few roundings of 2**-8 apart


def randn(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_(requires_grad)


def grads(fn, inputs):
    """fn(*inputs) and the gradients of its sum of squares (a non-uniform upstream gradient)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out.float() ** 2).sum().backward()
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend", gpu_backends())
def test_route_plan_permute_unpermute(backend):
    """topk_routing (DeepSeek-V3's sigmoid + bias + groups), plan_routing, permute and unpermute, with
    the permutes' backward: the CUDA kernels of csrc/ or Triton's, against the reference."""
    logits, bias = randn(TOKENS, EXPERTS), randn(EXPERTS) * 0.1
    route = dict(scoring="sigmoid", renormalize=True, bias=bias, n_group=4, topk_group=2, routed_scaling_factor=2.5)
    weights, ids = moekernels.topk_routing(logits, TOP_K, **route, backend=backend)
    want_w, want_ids = moekernels.topk_routing(logits, TOP_K, **route, backend="torch")
    assert torch.equal(ids, want_ids) and rel_err(weights, want_w) <= 1e-6

    plan = moekernels.plan_routing(ids, EXPERTS, block_size=16, backend=backend)
    want_plan = moekernels.plan_routing(ids, EXPERTS, block_size=16, backend="torch")
    for field in ("expert_counts", "expert_offsets", "source_index", "dest_index", "padded_source_index",
                  "block_expert", "num_padded_rows"):
        assert torch.equal(getattr(plan, field), getattr(want_plan, field)), field

    x = randn(TOKENS, HIDDEN, dtype=torch.bfloat16)
    sorted_x, (gx,) = grads(lambda x: moekernels.permute(x, plan, backend=backend), [x])
    want_sorted, (want_gx,) = grads(lambda x: moekernels.permute(x, plan, backend="torch"), [x])
    assert torch.equal(sorted_x, want_sorted) and rel_err(gx, want_gx) <= BF16_TOL

    y = randn(TOKENS * TOP_K, HIDDEN, dtype=torch.bfloat16)
    out, (gy, gw) = grads(lambda y, w: moekernels.unpermute(y, plan, w, backend=backend), [y, weights])
    want, (want_gy, want_gw) = grads(lambda y, w: moekernels.unpermute(y, plan, w, backend="torch"), [y, weights])
    assert rel_err(out, want) <= BF16_TOL and rel_err(gy, want_gy) <= BF16_TOL and rel_err(gw, want_gw) <= BF16_TOL


def _offs():
    """Cumulative ends of 4 experts' rows over 100: expert 1 has none, expert 3 one."""
    return torch.tensor([40, 40, 99, 100], dtype=torch.int32, device=DEVICE)


def test_grouped_mm_forward_and_backward():
    x, w = randn(100, HIDDEN, dtype=torch.bfloat16), randn(4, HIDDEN, 72, dtype=torch.bfloat16) / HIDDEN**0.5
    out, (gx, gw) = grads(lambda x, w: moekernels.grouped_mm(x, w, _offs(), backend="triton"), [x, w])
    want, (want_gx, want_gw) = grads(lambda x, w: moekernels.grouped_mm(x, w, _offs(), backend="torch"), [x, w])
    assert rel_err(out, want) <= BF16_TOL and rel_err(gx, want_gx) <= BF16_TOL and rel_err(gw, want_gw) <= BF16_TOL


@pytest.mark.parametrize("granularity, backend", [
    ("tensor", "triton"), ("row", "triton"), ((1, 128), "triton"), ((128, 128), "triton"),
    *[((1, 128), b) for b in gpu_backends()[1:]],  # cuda, where the extension is built
], ids=str)
def test_quantize_fp8(granularity, backend):
    x = randn(TOKENS, 2 * HIDDEN, dtype=torch.bfloat16)
    q, scale = moekernels.quantize_fp8(x, granularity, backend=backend)
    want_q, want_scale = moekernels.quantize_fp8(x, granularity, backend="torch")
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(scale, want_scale)


def test_fp8_mm_and_grouped_mm_block_scaled():
    x, w = randn(100, 256, dtype=torch.bfloat16), randn(4, 72, 256, dtype=torch.bfloat16) / 16
    qa, sa = moekernels.quantize_fp8(x, (1, 128), backend="torch")
    qb, sb = moekernels.quantize_fp8(w, (128, 128), backend="torch")
    qb, sb = qb.transpose(1, 2), sb.transpose(1, 2)  # the logical [E, K, N]
    y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, _offs(), backend="triton")
    assert rel_err(y, moekernels.fp8_grouped_mm(qa, sa, qb, sb, _offs(), backend="torch")) <= BF16_TOL
    y = moekernels.fp8_mm(qa, sa, qb[0], sb[0], backend="triton")
    assert rel_err(y, moekernels.fp8_mm(qa, sa, qb[0], sb[0], backend="torch")) <= BF16_TOL


def _layer(hidden=HIDDEN, inter=48):
    w1 = randn(EXPERTS, 2 * inter, hidden, dtype=torch.bfloat16) / hidden**0.5
    w2 = randn(EXPERTS, hidden, inter, dtype=torch.bfloat16) / inter**0.5
    ids = torch.stack([torch.randperm(EXPERTS, device=DEVICE)[:TOP_K] for _ in range(TOKENS)]).int()
    ids[:, 0] = 0  # expert 0 takes every token; the rest share the others, some none
    return randn(TOKENS, hidden, dtype=torch.bfloat16), w1, w2, torch.softmax(randn(TOKENS, TOP_K), -1), ids


def test_fused_moe_forward_and_backward():
    x, w1, w2, tw, ids = _layer()
    out, got = grads(lambda x, w1, w2, tw: moekernels.fused_moe(x, w1, w2, tw, ids, backend="triton"), [x, w1, w2, tw])
    want, wanted = grads(lambda x, w1, w2, tw: moekernels.fused_moe(x, w1, w2, tw, ids, backend="torch"),
                         [x, w1, w2, tw])
    assert rel_err(out, want) <= BF16_TOL
    for name, g, w in zip(("x", "w_gate_up", "w_down", "topk_weights"), got, wanted):
        assert rel_err(g, w) <= BF16_TOL, name


def test_fused_moe_fp8_and_lora():
    x, w1, w2, tw, ids = _layer(hidden=128, inter=128)  # the fp8 weights' 128-wide blocks
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128), backend="torch")
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128), backend="torch")
    fp8 = dict(w_gate_up_scale=s1, w_down_scale=s2)
    want = moekernels.fused_moe(x, q1, q2, tw, ids, **fp8, backend="torch")
    assert rel_err(moekernels.fused_moe(x, q1, q2, tw, ids, **fp8, backend="triton"), want) <= BF16_TOL
    x, w1, w2, tw, ids = _layer()
    rank = 8
    lora = ExpertsLoRA(randn(EXPERTS, rank, HIDDEN, dtype=torch.bfloat16) / HIDDEN**0.5,
                       randn(EXPERTS, 96, rank, dtype=torch.bfloat16) / rank**0.5,
                       randn(EXPERTS, rank, 48, dtype=torch.bfloat16) / 48**0.5,
                       randn(EXPERTS, HIDDEN, rank, dtype=torch.bfloat16) / rank**0.5, scale=0.5)
    want = moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora, backend="torch")
    assert rel_err(moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora, backend="triton"), want) <= BF16_TOL


def test_losses_and_correction_bias():
    logits = randn(TOKENS, EXPERTS)
    _, ids = moekernels.topk_routing(logits, TOP_K, backend="torch")
    for loss in (lambda b: moekernels.load_balancing_loss(logits, ids, EXPERTS, backend=b),
                 lambda b: moekernels.router_z_loss(logits, backend=b)):
        assert rel_err(loss("triton"), loss("torch")) <= 1e-5
    # No backend argument: the CUDA tensors' path against the CPU's.
    got = moekernels.sequence_balance_loss(logits, ids, EXPERTS, 37, scoring="sigmoid")
    assert rel_err(got, moekernels.sequence_balance_loss(logits.cpu(), ids.cpu(), EXPERTS, 37, scoring="sigmoid")) <= 1e-5
    bias, counts = randn(EXPERTS), torch.bincount(ids.flatten().long(), minlength=EXPERTS)
    want = bias.cpu()
    moekernels.update_correction_bias(want, counts.cpu(), 1e-3)
    moekernels.update_correction_bias(bias, counts, 1e-3)
    assert torch.equal(bias.cpu(), want)


def test_moe_layer_automatic_backend():
    """The nn.Module with its automatic backend (cuda, where built, for routing and the permutes)."""
    torch.manual_seed(0)
    layer = moekernels.MoE(HIDDEN, 48, EXPERTS, TOP_K, scoring="sigmoid", n_group=4, topk_group=2,
                           num_shared_experts=1, correction_bias=True, dtype=torch.bfloat16, device=DEVICE)
    ref = moekernels.MoE(HIDDEN, 48, EXPERTS, TOP_K, scoring="sigmoid", n_group=4, topk_group=2,
                         num_shared_experts=1, correction_bias=True, dtype=torch.bfloat16, device=DEVICE,
                         backend="torch")
    ref.load_state_dict(layer.state_dict())
    x = randn(2, TOKENS, HIDDEN, dtype=torch.bfloat16)
    out, (gx,) = grads(layer, [x])
    want, (want_gx,) = grads(ref, [x])
    assert rel_err(out, want) <= BF16_TOL and rel_err(gx, want_gx) <= BF16_TOL
