"""moekernels.fused_moe and moekernels.MoE: against a per-pair float64 loop and the unfused ops,
forward and backward; the fp8 path against the bf16 layer."""

import pytest
import torch
from conftest import cpu_backends, device_backends, rel_err
from test_fp8 import calc_diff
from test_grouped_gemm import configs_for
from test_plan import make_ids

import moekernels
from moekernels import reference

ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu}
# (T, H, I, E, k): decode (one token), several tokens per expert, an expert with no pair and one
# with a single pair (make_ids), H and I not multiples of any tile.
CASES = [(1, 32, 16, 4, 2), (13, 40, 24, 6, 2), (30, 64, 48, 8, 3)]


def case_id(c):
    return "T{}_H{}_I{}_E{}_k{}".format(*c)


def make_layer(case, dtype, device, requires_grad=False):
    num_tokens, hid, inter, num_experts, top_k = case
    x = torch.randn(num_tokens, hid, device=device).to(dtype)
    w1 = (torch.randn(num_experts, 2 * inter, hid, device=device) / hid**0.5).to(dtype)
    w2 = (torch.randn(num_experts, hid, inter, device=device) / inter**0.5).to(dtype)
    ids = (make_ids(num_tokens, top_k, num_experts, device=device) if num_tokens
           else torch.empty(0, top_k, dtype=torch.int32, device=device))
    tw = torch.softmax(torch.randn(num_tokens, top_k, device=device), -1)
    tensors = [x, w1, w2, tw]
    if requires_grad:
        tensors = [t.requires_grad_() for t in tensors]
    return (*tensors, ids)


def loop_moe(x, w1, w2, tw, ids, activation="silu"):
    """The definition, pair by pair, in float64."""
    x, w1, w2, tw = (t.double().cpu() for t in (x, w1, w2, tw))
    ids = ids.cpu()
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64)
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate, up = (w1[e] @ x[t]).chunk(2)
            acc = acc + tw[t, j] * (w2[e] @ (ACT[activation](gate) * up))
        rows.append(acc)
    return torch.stack(rows)


def unfused(x, w1, w2, tw, ids, activation="silu", backend=None):
    """The composition of the unfused public ops: plan, permute, grouped_mm, act, grouped_mm, unpermute."""
    plan = moekernels.plan_routing(ids, w1.shape[0], backend=backend)
    xs = moekernels.permute(x, plan, backend=backend)
    z = moekernels.grouped_mm(xs, w1.transpose(1, 2), plan.expert_offsets, backend=backend)
    gate, up = z.chunk(2, dim=-1)
    h = ACT[activation](gate) * up
    y = moekernels.grouped_mm(h, w2.transpose(1, 2), plan.expert_offsets, backend=backend)
    return moekernels.unpermute(y, plan, tw, backend=backend)


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}  # bf16: a few roundings of 2**-8 through two GEMMs


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_the_definition(case, dtype, activation, device, backend):
    x, w1, w2, tw, ids = make_layer(case, dtype, device, requires_grad=True)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, activation=activation, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w1, w2, tw)]
    want = loop_moe(*leaves, ids, activation)
    assert rel_err(y, want) <= TOL[dtype]
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2, tw), grad)
    expected = torch.autograd.grad(want, leaves, grad.double().cpu())
    for name, a, b in zip(("hidden", "w_gate_up", "w_down", "topk_weights"), got, expected):
        assert a.shape == b.shape and rel_err(a, b) <= 2 * TOL[dtype], name


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("case", [(1, 32, 24, 5, 2), (3, 40, 24, 6, 2)], ids=case_id)
def test_decode_step_with_the_split_gated_gemm(case, device, backend, monkeypatch):
    """A decode step too small to fill an H200 (configs.split_gated_decode): GEMM 1 as the plain
    kernel over [K, 2I] and the activation after it; the layer still matches its definition, forward
    and backward (which recomputes the product unsplit). An empty expert, one with a single pair, H
    and I not multiples of a tile."""
    calls = configs_for(monkeypatch, "h200")
    x, w1, w2, tw, ids = make_layer(case, torch.bfloat16, device, requires_grad=True)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, backend=backend)
    leaves = [t.detach().double().cpu().requires_grad_() for t in (x, w1, w2, tw)]
    want = loop_moe(*leaves, ids)
    assert rel_err(y, want) <= TOL[torch.bfloat16]
    if backend == "triton":
        inter = case[2]
        assert calls[:2] == [("gated", inter, True), ("plain", 2 * inter, False)]
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w1, w2, tw), grad)
    expected = torch.autograd.grad(want, leaves, grad.double().cpu())
    for name, a, b in zip(("hidden", "w_gate_up", "w_down", "topk_weights"), got, expected):
        assert rel_err(a, b) <= 2 * TOL[torch.bfloat16], name


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_matches_the_unfused_ops(backend):
    x, w1, w2, tw, ids = make_layer((21, 48, 40, 5, 2), torch.float32, "cpu", requires_grad=True)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, backend=backend)
    want = unfused(x, w1, w2, tw, ids, backend=backend)
    assert rel_err(y, want) <= 1e-6
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w1, w2, tw), grad), torch.autograd.grad(want, (x, w1, w2, tw), grad)):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", cpu_backends())
def test_weight_gradients_keep_the_parameter_layout(backend):
    x, w1, w2, tw, ids = make_layer(CASES[1], torch.float32, "cpu", requires_grad=True)
    moekernels.fused_moe(x, w1, w2, tw, ids, backend=backend).sum().backward()
    assert w1.grad.is_contiguous() and w2.grad.is_contiguous()


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_tokens(backend):
    x, w1, w2, tw, ids = make_layer((0, 16, 8, 4, 2), torch.float32, "cpu", requires_grad=True)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, backend=backend)
    assert y.shape == (0, 16)
    y.sum().backward()
    assert not w1.grad.any()


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
def test_fp8_path_against_the_bf16_layer(device, backend):
    """w8a8 blocks: within 1e-2 of the same layer on the dequantized weights, and in calc_diff within
    3e-3 of the bf16 layer: two block-scaled GEMMs (<= 1e-3 each, the FP8 issue's bound) and the
    quantized h between them; 2.1e-3 measured at this shape."""
    num_tokens, hid, inter, num_experts, top_k = 64, 256, 256, 8, 2
    x, w1, w2, tw, ids = make_layer((num_tokens, hid, inter, num_experts, top_k), torch.bfloat16, device)
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128), backend=backend)
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128), backend=backend)
    y = moekernels.fused_moe(x, q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2, backend=backend)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, dequantized_layer(x, q1, s1, q2, s2, tw, ids)) <= 1e-2
    bf16_layer = moekernels.fused_moe(x.float(), w1.float(), w2.float(), tw, ids, backend="torch")
    assert calc_diff(y, bf16_layer) <= 3e-3


def dequantized_layer(x, q1, s1, q2, s2, tw, ids):
    """The w8a8 layer on dequantized operands in float64: x and h quantized (1, 128) as the layer
    does, every product and sum exact (the FP8 issue's "against the dequantized inputs"). h is
    rounded to bf16 to nearest, as a GPU and (moekernels/_interpreter.py) Triton's interpreter do:
    h is quantized again, and one bf16 ulp moved across an e4m3 rounding boundary is a 6% step of
    that element (truncation there gave 1.4e-2 of the layer)."""
    plan = reference.plan_routing(ids.cpu(), q1.shape[0])

    def deq(t, granularity=(1, 128)):
        return reference.dequantize_fp8(*reference.quantize_fp8(t, granularity)).double()

    rows = reference.permute_rows(deq(x.cpu()), plan.source_index, plan.top_k)
    z = reference.grouped_mm(rows, reference.dequantize_fp8(q1, s1).double().cpu().transpose(1, 2),
                             plan.expert_offsets)
    h = reference.gated_activation(z, "silu")
    h = h.to(x.dtype)  # the layer writes h in x's dtype
    y = reference.grouped_mm(deq(h.cpu()), reference.dequantize_fp8(q2, s2).double().cpu().transpose(1, 2),
                             plan.expert_offsets)
    return reference.combine_rows(y, plan.dest_index, plan.top_k, tw.double().cpu(), plan.expert_offsets[-1])


def test_fp8_has_no_backward():
    x, w1, w2, tw, ids = make_layer((4, 128, 128, 2, 1), torch.bfloat16, "cpu")
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128))
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128))
    x.requires_grad_()
    y = moekernels.fused_moe(x, q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2)
    with pytest.raises(NotImplementedError, match="inference-only"):
        y.sum().backward()


# ----------------------------------------------------------------------------- the custom op


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x, w1, w2, tw, ids = make_layer(CASES[1], torch.float32, "cpu", requires_grad=True)
    torch.library.opcheck(torch.ops.moekernels.fused_moe.default, (x, w1, w2, tw, ids, "silu", None, None, backend))


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend):
    layer = moekernels.MoE(32, 24, 6, 2, backend=backend)
    x = torch.randn(2, 5, 32)
    want = layer(x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    assert rel_err(compiled(x), want) <= 1e-6
    compiled(x).square().sum().backward()
    assert layer.w_gate_up.grad is not None and layer.gate.weight.grad is not None


# ----------------------------------------------------------------------------- bad input


def _bad():
    x, w1, w2, tw, ids = make_layer((6, 32, 24, 4, 2), torch.float32, "cpu")
    q1, s1 = moekernels.quantize_fp8(torch.randn(4, 256, 128), (128, 128))
    q2, s2 = moekernels.quantize_fp8(torch.randn(4, 128, 128), (128, 128))
    x8 = torch.randn(6, 128)
    return [
        ("w_gate_up", dict(w1=w1[:, :, :16])),  # H mismatch
        ("w_gate_up", dict(w1=w1.transpose(1, 2))),  # [E, H, 2I]: the wrong layout
        ("w_down", dict(w2=w2[:, :, :8])),  # I mismatch
        ("w_down", dict(w2=w2.transpose(1, 2))),
        ("w_gate_up", dict(w1=w1.double())),  # dtype mix
        ("hidden", dict(x=x.int())),
        ("topk_ids", dict(ids=ids.float())),
        ("topk_weights", dict(tw=tw[:, :1])),
        ("activation", dict(activation="relu")),
        ("w_gate_up_scale", dict(x=x8, w1=q1, w2=q2, s1=s1[:, :1], s2=s2)),  # scale shape mismatch
        ("w_down_scale", dict(x=x8, w1=q1, w2=q2, s1=s1, s2=None)),
        ("w_gate_up_scale", dict(s1=s1)),  # scales with bf16 weights
    ], dict(x=x, w1=w1, w2=w2, tw=tw, ids=ids, activation="silu", s1=None, s2=None)


CASES_BAD, BASE = _bad()


@pytest.mark.parametrize("name,change", CASES_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES_BAD)])
def test_bad_input_names_the_argument(name, change):
    a = {**BASE, **change}
    with pytest.raises((ValueError, TypeError), match=name):
        moekernels.fused_moe(a["x"], a["w1"], a["w2"], a["tw"], a["ids"], activation=a["activation"],
                             w_gate_up_scale=a["s1"], w_down_scale=a["s2"])


def test_out_of_range_ids_raise_on_cpu():
    x, w1, w2, tw, ids = make_layer((5, 16, 8, 4, 2), torch.float32, "cpu")
    ids[2, 1] = 4
    with pytest.raises(ValueError, match="topk_ids"):
        moekernels.fused_moe(x, w1, w2, tw, ids)


# ----------------------------------------------------------------------------- the module


@pytest.mark.parametrize("backend", cpu_backends())
def test_module_is_router_then_fused_moe(backend):
    """DeepSeek-V3's routing (sigmoid, correction bias, groups, scaling) and shared experts."""
    layer = moekernels.MoE(32, 16, 8, 2, scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                           num_shared_experts=1, correction_bias=True, backend=backend)
    with torch.no_grad():
        layer.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    x = torch.randn(3, 7, 32)
    y = layer(x)
    x2 = x.reshape(-1, 32)
    tw, ids = reference.topk_routing(x2 @ layer.gate.weight.T, 2, scoring="sigmoid", renormalize=True,
                                     bias=layer.e_score_correction_bias, n_group=4, topk_group=2,
                                     routed_scaling_factor=2.5)
    want = loop_moe(x2, layer.w_gate_up, layer.w_down, tw, ids) + layer.shared_experts(x2).double()
    assert y.shape == x.shape and rel_err(y.reshape(-1, 32), want) <= 1e-5
    assert layer.aux_loss is not None and layer.z_loss is not None  # modules start in training mode
    assert rel_err(layer.aux_loss, reference.load_balancing_loss(x2 @ layer.gate.weight.T, ids, 8)) <= 1e-6
    layer.eval()
    layer.aux_loss = None
    layer(x)
    assert layer.aux_loss is None


def test_module_trains():
    """SGD on the output of a random teacher layer lowers the loss, router losses included."""
    torch.manual_seed(0)
    teacher, layer = moekernels.MoE(16, 12, 4, 2), moekernels.MoE(16, 12, 4, 2)
    x = torch.randn(64, 16)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - target).square().mean()
        total = loss + 0.01 * layer.aux_loss + 0.001 * layer.z_loss
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_module_router_dtype():
    """A float32 router in a bf16 layer (DeepSeek-V3's): logits from float32 x and weight."""
    layer = moekernels.MoE(32, 16, 8, 2, dtype=torch.bfloat16, router_dtype=torch.float32)
    assert layer.gate.weight.dtype == torch.float32 and layer.w_gate_up.dtype == torch.bfloat16
    x = torch.randn(5, 32).bfloat16()
    logits, _, ids = layer.route(x)
    assert logits.dtype == torch.float32
    assert torch.equal(ids, reference.topk_routing(x.float() @ layer.gate.weight.T, 2, renormalize=True)[1])
    assert layer(x).dtype == torch.bfloat16


def test_module_deepseek_v3_balancing():
    """seq_aux_loss over the [B, S] sequences (top-k of the unbiased, ungrouped scores), the loads
    counted over training forwards only, and update_bias applying them at the end of a step."""
    layer = moekernels.MoE(32, 16, 8, 2, scoring="sigmoid", n_group=4, topk_group=2, correction_bias=True,
                           bias_update_rate=0.01)
    with torch.no_grad():
        layer.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    bias0 = layer.e_score_correction_bias.clone()
    assert layer.expert_load.dtype == torch.int64 and "expert_load" not in layer.state_dict()
    x, x_single = torch.randn(3, 7, 32), torch.randn(1, 32)
    want_load = torch.zeros(8, dtype=torch.int64)
    for inp in (x, x_single):  # B = 3 sequences of 7, then one sequence of a single token
        layer(inp)
        x2 = inp.reshape(-1, 32)
        logits = x2 @ layer.gate.weight.T
        seq_len = inp.shape[-2] if inp.dim() > 2 else x2.shape[0]
        want = reference.sequence_balance_loss(logits.double(), logits.topk(2).indices, 8, seq_len, "sigmoid")
        assert rel_err(layer.seq_aux_loss, want) <= 1e-5
        _, ids = reference.topk_routing(logits, 2, scoring="sigmoid", renormalize=True,
                                        bias=layer.e_score_correction_bias, n_group=4, topk_group=2)
        want_load += torch.bincount(ids.reshape(-1).long(), minlength=8)
    assert torch.equal(layer.expert_load, want_load)
    layer.eval()
    layer(x)  # inference: no loads counted
    assert torch.equal(layer.expert_load, want_load)
    layer.update_bias()
    assert torch.equal(layer.e_score_correction_bias, reference.update_correction_bias(bias0, want_load, 0.01))
    assert not layer.expert_load.any()
    plain = moekernels.MoE(32, 16, 8, 2)
    plain(x)  # no bias, no groups: the routed ids themselves; a softmax router
    logits = x.reshape(-1, 32) @ plain.gate.weight.T
    _, ids = reference.topk_routing(logits, 2, renormalize=True)
    assert rel_err(plain.seq_aux_loss, reference.sequence_balance_loss(logits.double(), ids, 8, 7)) <= 1e-5
    assert plain.expert_load is None
    with pytest.raises(ValueError, match="correction_bias"):
        plain.update_bias()


def test_module_balancing_compiles():
    """A training forward with the load count and the bias update traces under fullgraph."""
    layer = moekernels.MoE(16, 8, 4, 2, scoring="sigmoid", correction_bias=True)

    def step(inp):
        y = layer(inp)
        loss = y.square().mean() + 1e-4 * layer.seq_aux_loss
        layer.update_bias()
        return loss

    x = torch.randn(2, 5, 16)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    bias0 = layer.e_score_correction_bias.clone()
    ids = layer.route(x.reshape(-1, 16))[2]  # the ids of the step, before its bias update
    compiled(x).backward()
    want = reference.update_correction_bias(bias0, reference.pair_counts(ids, 4, torch.int64), 1e-3)
    assert torch.equal(layer.e_score_correction_bias, want) and not layer.expert_load.any()
    assert layer.gate.weight.grad is not None


@pytest.mark.parametrize("backend", cpu_backends())
def test_autocast_training_step(backend):
    """MoE(64, 32, 8, 2) with float32 master weights under CPU bf16 autocast: a bf16 output, the
    same loss as the layer with its weights cast by hand, and float32 gradients equal to that
    layer's; then the same step under torch.compile(fullgraph=True)."""
    import copy

    torch.manual_seed(0)
    layer = moekernels.MoE(64, 32, 8, 2, backend=backend)
    by_hand = copy.deepcopy(layer).bfloat16()
    x = torch.randn(2, 5, 64)

    def step(model, inp):
        y = model(inp)
        loss = y.float().square().mean() + 0.01 * model.aux_loss
        loss.backward()
        return y, loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, loss = step(layer, x)
    y_hand, loss_hand = step(by_hand, x.bfloat16())
    assert y.dtype == torch.bfloat16 and rel_err(y, y_hand) <= 1e-6 and rel_err(loss, loss_hand) <= 1e-6
    for (name, p), p_hand in zip(layer.named_parameters(), by_hand.parameters()):
        assert p.dtype == p.grad.dtype == torch.float32, name
        assert rel_err(p.grad, p_hand.grad) <= 1e-6, name
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_c, _ = step(compiled, x)
    assert y_c.dtype == torch.bfloat16 and rel_err(y_c, y) <= 1e-6
    assert all(rel_err(p.grad, g) <= 1e-6 for p, g in zip(layer.parameters(), grads))


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_moe_autocast_keeps_router_weights(backend):
    """fused_moe and its op under autocast: hidden and weights in the autocast dtype (fp16
    here), topk_weights as given (float32), and their gradient float32."""
    x, w1, w2, tw, ids = make_layer(CASES[1], torch.float32, "cpu")
    tw = tw.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        got = moekernels.fused_moe(x, w1, w2, tw, ids, backend=backend)
        got_op = torch.ops.moekernels.fused_moe(x, w1, w2, tw, ids, "silu", None, None, backend)[0]
    want = moekernels.fused_moe(x.half(), w1.half(), w2.half(), tw, ids, backend=backend)
    assert got.dtype == torch.float16 and torch.equal(got, want) and torch.equal(got_op, want)
    assert not torch.equal(want, moekernels.fused_moe(x.half(), w1.half(), w2.half(), tw.half(), ids,
                                                      backend=backend))
    got.float().sum().backward()
    assert tw.grad.dtype == torch.float32


# DeepSeek-V3's router at a small size: E = 64 sigmoid scores in 8 groups, 4 of them kept, top-8.
# Under bf16 autocast the gate's logits were bf16 and 46 of 2,048 tokens got another expert set.
GROUPED = dict(scoring="sigmoid", n_group=8, topk_group=4)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("routing", [GROUPED, dict(scoring="softmax")], ids=["grouped_sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_router_dtype_under_autocast(dtype, routing, backend):
    """router_dtype=float32 routes on float32 logits under bf16 autocast: the ids autocast picks are
    those picked without it, exactly (256 tokens; bf16 logits change some of them)."""
    torch.manual_seed(0)
    layer = moekernels.MoE(64, 16, 64, 8, dtype=dtype, router_dtype=torch.float32, backend=backend, **routing)
    x = torch.randn(256, 64).to(dtype)
    logits, weights, ids = layer.route(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ac, weights_ac, ids_ac = layer.route(x)
    assert logits_ac.dtype == torch.float32
    assert torch.equal(ids_ac, ids) and torch.equal(weights_ac, weights) and torch.equal(logits_ac, logits)


@pytest.mark.parametrize("backend", cpu_backends())
def test_module_router_dtype_trains_under_autocast(backend):
    """A float32 layer with router_dtype=float32 under bf16 autocast trains as the bf16 layer with a
    float32 router (DeepSeek-V3's) does without autocast: the same output, losses and gradients
    (float32 ones, the gate's included)."""
    import copy

    torch.manual_seed(0)
    layer = moekernels.MoE(64, 32, 8, 2, router_dtype=torch.float32, backend=backend, **dict(GROUPED, n_group=4,
                                                                                             topk_group=2))
    by_hand = copy.deepcopy(layer)
    by_hand.w_gate_up.data, by_hand.w_down.data = layer.w_gate_up.data.bfloat16(), layer.w_down.data.bfloat16()
    x = torch.randn(2, 5, 64).bfloat16()  # bf16 values: the float32 router sees the same x in both

    def loss_of(model, inp):
        y = model(inp)
        return y, y.float().square().mean() + 0.01 * model.aux_loss + 0.001 * model.z_loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, loss = loss_of(layer, x.float())
    loss.backward()  # outside autocast, as torch.autocast's documentation asks
    y_hand, loss_hand = loss_of(by_hand, x)
    loss_hand.backward()
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_hand) and rel_err(loss, loss_hand) <= 1e-6
    assert layer.gate.weight.grad.dtype == torch.float32 and layer.gate.weight.grad.abs().sum() > 0
    for (name, p), p_hand in zip(layer.named_parameters(), by_hand.parameters()):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, p_hand.grad) <= 1e-6, name


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layer_dtype, x_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
                         ids=["fp32_layer_bf16_x", "bf16_layer_fp32_x"])
def test_module_mixed_precision_under_autocast(layer_dtype, x_dtype, backend):
    """Under bf16 autocast an fp32 layer takes a bf16 x (an autocast nn.Linear's output) and a bf16
    layer an fp32 x, as nn.Linear and fused_moe do: the layer is its router then fused_moe under
    the same autocast. Outside autocast the mismatch is the input's error, as before."""
    torch.manual_seed(0)
    layer = moekernels.MoE(40, 24, 6, 2, num_shared_experts=1, dtype=layer_dtype, backend=backend)
    x = torch.randn(13, 40).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        _, weights, ids = layer.route(x)
        want = moekernels.fused_moe(x, layer.w_gate_up, layer.w_down, weights, ids, backend=backend)
        want = want + layer.shared_experts(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, want)
    with pytest.raises(TypeError, match="x has dtype"):
        layer(x)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        moekernels.MoE(16, 8, 4, 5)
    with pytest.raises(ValueError, match="scoring"):
        moekernels.MoE(16, 8, 4, 2, scoring="relu")


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 64, 4096])
def test_gpu_qwen3_layer(num_tokens):
    """Qwen3-30B-A3B's layer (H 2048, I 768, E 128, k 8) against the unfused ops, bf16."""
    x, w1, w2, tw, ids = make_layer((num_tokens, 2048, 768, 128, 8), torch.bfloat16, "cuda", requires_grad=True)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, backend="triton")
    want = unfused(x, w1, w2, tw, ids, backend="triton")
    assert rel_err(y, want) <= 2**-6
    grad = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w1, w2, tw), grad), torch.autograd.grad(want, (x, w1, w2, tw), grad)):
        assert rel_err(a, b) <= 2**-5


@pytest.mark.gpu
def test_gpu_decode_step_in_a_cuda_graph():
    """A decode step, routing to combine, captured in a CUDA graph (any host sync fails capture)."""
    layer = moekernels.MoE(2048, 768, 128, 8, dtype=torch.bfloat16, device="cuda").eval()
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer(x)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got = layer(x)
        got.zero_()
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_fp8_layer():
    x, w1, w2, tw, ids = make_layer((512, 7168, 2048, 32, 8), torch.bfloat16, "cuda")
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128))
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128))
    y = moekernels.fused_moe(x, q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2)
    assert calc_diff(y, moekernels.fused_moe(x, w1, w2, tw, ids)) <= 3e-3
