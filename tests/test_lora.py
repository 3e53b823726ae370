"""fused_moe(lora=ExpertsLoRA(...)): LoRA on the experts against the per-expert loop of
reference.fused_moe (forward, and its autograd for the gradients), on float32, bfloat16 and
float8_e4m3fn base weights, plus the custom op's contract (opcheck, compile, autocast) and the
argument checks."""

import pytest
import torch
from conftest import cpu_backends, device_backends, rel_err
from test_fp8 import calc_diff
from test_moe import make_layer

import moekernels
from moekernels import ExpertsLoRA, reference

# (T, H, I, E, k, r1, r2): rank 1; ranks not powers of two, r1 != r2; H and I not multiples of any
# tile; make_ids gives an expert no pair and one a single pair.
CASES = [(13, 40, 24, 6, 2, 1, 1), (30, 64, 48, 8, 3, 5, 12), (1, 32, 16, 4, 2, 16, 3)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def case_id(c):
    return "T{}_H{}_I{}_E{}_k{}_r{}_{}".format(*c)


def make_adapters(num_experts, hid, inter, r1, r2, dtype, device, *, requires_grad=True):
    """A1 [E, r1, H], B1 [E, 2I, r1], A2 [E, r2, I], B2 [E, H, r2], with B non-zero (PEFT starts B at
    zero, which would hide every B-side bug) and the delta about as large as the base product."""
    shapes = [(num_experts, r1, hid), (num_experts, 2 * inter, r1), (num_experts, r2, inter), (num_experts, hid, r2)]
    out = [(torch.randn(s, device=device) / s[2] ** 0.5).to(dtype) for s in shapes]
    return [t.requires_grad_(requires_grad) for t in out]


def grads(y, inputs, g):
    return torch.autograd.grad(y, inputs, g, allow_unused=True)


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("case,dtype,activation", [
    (CASES[0], torch.float32, "silu"), (CASES[1], torch.float32, "gelu"), (CASES[1], torch.bfloat16, "silu"),
    (CASES[2], torch.bfloat16, "gelu")], ids=lambda v: case_id(v) if isinstance(v, tuple) else str(v))
def test_forward_and_backward_match_the_loop(case, dtype, activation, device, backend):
    num_tokens, hid, inter, num_experts, top_k, r1, r2 = case
    x, w1, w2, tw, ids = make_layer(case[:5], dtype, device)
    x.requires_grad_()
    tw.requires_grad_()
    w1.requires_grad_()  # frozen under an adapter: no gradient even though it asks for one
    adapters = make_adapters(num_experts, hid, inter, r1, r2, dtype, device)
    lora = ExpertsLoRA(*adapters, scale=0.5, scale2=2.0)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, activation=activation, lora=lora, backend=backend)
    # The reference in float64 on the same (rounded) inputs.
    ref_inputs = [t.detach().double().requires_grad_() for t in (x, tw, *adapters)]
    lora64 = ExpertsLoRA(*ref_inputs[2:], scale=0.5, scale2=2.0)
    want = reference.fused_moe(ref_inputs[0], w1.detach().double(), w2.double(), ref_inputs[1], ids,
                               activation=activation, lora=lora64)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y, want) <= TOL[dtype]
    g = torch.randn_like(want)
    got = grads(y, [x, tw, *adapters, w1], g.to(dtype))
    assert got[-1] is None
    for name, a, b in zip(("x", "topk_weights", "a1", "b1", "a2", "b2"), got, grads(want, ref_inputs, g)):
        assert a.shape == b.shape and a.dtype == (torch.float32 if name == "topk_weights" else dtype), name
        assert rel_err(a, b) <= 2 * TOL[dtype], (name, rel_err(a, b))


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_one_projection_only(which, device, backend):
    """An adapter on one projection: the other takes the plain path, and its fields stay None."""
    x, w1, w2, tw, ids = make_layer(CASES[1][:5], torch.float32, device)
    a1, b1, a2, b2 = make_adapters(8, 64, 48, 4, 4, torch.float32, device)
    lora = ExpertsLoRA(a1, b1, scale=0.3) if which == "gate_up" else ExpertsLoRA(a2=a2, b2=b2, scale=0.3)
    y = moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora, backend=backend)
    want = reference.fused_moe(x.double(), w1.double(), w2.double(), tw, ids,
                               lora=ExpertsLoRA(*[None if t is None else t.detach().double() for t in lora.tensors()],
                                                scale=0.3))
    assert rel_err(y, want) <= 1e-5
    assert rel_err(want, reference.fused_moe(x.double(), w1.double(), w2.double(), tw, ids)) > 1e-2  # it matters
    trained = [t for t in lora.tensors() if t is not None]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in torch.autograd.grad(y.sum(), trained))


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
def test_frozen_fp8_base_weights(device, backend):
    """Adapters on e4m3 experts with (128, 128) block scales: forward and every trained gradient
    (dx through the e4m3 base weights' dgrad with the adapters' low-rank segment) within the fp8
    layer's calc_diff bound (3e-3, test_moe) of the loop on the dequantized weights."""
    num_tokens, hid, inter, num_experts, top_k = 9, 128, 128, 4, 2
    x, w1, w2, tw, ids = make_layer((num_tokens, hid, inter, num_experts, top_k), torch.bfloat16, device)
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128), backend=backend)
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128), backend=backend)
    adapters = make_adapters(num_experts, hid, inter, 3, 7, torch.bfloat16, device)
    x.requires_grad_()
    tw.requires_grad_()
    y = moekernels.fused_moe(x, q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2,
                             lora=ExpertsLoRA(*adapters, scale=0.7), backend=backend)
    ref_inputs = [t.detach().float().requires_grad_() for t in (x, tw, *adapters)]
    want = reference.fused_moe(ref_inputs[0], q1, q2, ref_inputs[1], ids, w_gate_up_scale=s1, w_down_scale=s2,
                               lora=ExpertsLoRA(*ref_inputs[2:], scale=0.7))
    assert y.dtype == torch.bfloat16 and calc_diff(y, want) <= 3e-3
    g = torch.randn_like(want)
    for name, a, b in zip(("x", "topk_weights", "a1", "b1", "a2", "b2"), grads(y, [x, tw, *adapters], g.bfloat16()),
                          grads(want, ref_inputs, g)):
        assert calc_diff(a, b) <= 3e-3, (name, calc_diff(a, b))


@pytest.mark.parametrize("backend", cpu_backends())
def test_no_tokens(backend):
    x, w1, w2, tw, ids = make_layer((0, 32, 16, 4, 2), torch.float32, "cpu")
    adapters = make_adapters(4, 32, 16, 2, 2, torch.float32, "cpu")
    x.requires_grad_()
    y = moekernels.fused_moe(x, w1, w2, tw, ids, lora=ExpertsLoRA(*adapters), backend=backend)
    assert y.shape == (0, 32)
    for a, g in zip(adapters, torch.autograd.grad(y.sum(), adapters)):
        assert g.shape == a.shape and not g.any()


# ----------------------------------------------------------------------------- the custom op


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x, w1, w2, tw, ids = make_layer(CASES[1][:5], torch.float32, "cpu", requires_grad=True)
    adapters = make_adapters(8, 64, 48, 5, 3, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.moekernels.fused_moe.default,
                          (x, w1, w2, tw, ids, "silu", None, None, backend, *adapters, 0.5, 2.0))


def test_torch_compile_fullgraph():
    x, w1, w2, tw, ids = make_layer(CASES[1][:5], torch.float32, "cpu")
    lora = ExpertsLoRA(*make_adapters(8, 64, 48, 5, 3, torch.float32, "cpu"), scale=0.5)

    def step(x):
        return moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora)

    want = step(x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(got, want) <= 1e-6
    gw = torch.autograd.grad(got.sum(), lora.a1)[0]
    assert rel_err(gw, torch.autograd.grad(want.sum(), lora.a1)[0]) <= 1e-6


def test_autocast_casts_the_adapters():
    """Under autocast the adapters compute in its dtype with the tokens; their float32 gradients
    come back through the cast."""
    x, w1, w2, tw, ids = make_layer(CASES[1][:5], torch.float32, "cpu")
    adapters = make_adapters(8, 64, 48, 4, 4, torch.float32, "cpu")
    with torch.autocast("cpu", torch.bfloat16):
        y = moekernels.fused_moe(x, w1, w2, tw, ids, lora=ExpertsLoRA(*adapters, scale=0.5))
    assert y.dtype == torch.bfloat16
    want = reference.fused_moe(x.double(), w1.double(), w2.double(), tw, ids,
                               lora=ExpertsLoRA(*[a.detach().double() for a in adapters], scale=0.5))
    assert rel_err(y, want) <= 3e-2
    assert all(g.dtype == torch.float32 for g in torch.autograd.grad(y.float().sum(), adapters))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("change,match", [
    (lambda a: dict(a1=a[0][:, :, :-1]), "lora.a1 must be"),
    (lambda a: dict(b1=a[1][:, 1:]), "lora.b1 must be"),
    (lambda a: dict(b2=a[3][:, :, :1]), "lora.b2 must be"),
    (lambda a: dict(a2=a[2].double()), "lora.a2 must have dtype"),
    (lambda a: dict(b1=None), "lora.a1 and lora.b1 go together"),
    (lambda a: dict(a1=a[0][:2]), "lora.a1 must be"),
    (lambda a: dict(scale="2"), "lora.scale must be a float"),
])
def test_bad_adapters_name_the_field(change, match):
    x, w1, w2, tw, ids = make_layer(CASES[1][:5], torch.float32, "cpu")
    adapters = make_adapters(8, 64, 48, 4, 4, torch.float32, "cpu", requires_grad=False)
    fields = dict(zip(("a1", "b1", "a2", "b2"), adapters)) | change(adapters)
    with pytest.raises((TypeError, ValueError), match=match):
        moekernels.fused_moe(x, w1, w2, tw, ids, lora=ExpertsLoRA(**fields))


def test_lora_with_fp8_precision_raises():
    x, w1, w2, tw, ids = make_layer((4, 128, 128, 2, 1), torch.bfloat16, "cpu")
    lora = ExpertsLoRA(*make_adapters(2, 128, 128, 2, 2, torch.bfloat16, "cpu"))
    with pytest.raises(ValueError, match="precision='fp8'"):
        moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora, precision="fp8")
    with pytest.raises(TypeError, match="lora must be a moekernels.ExpertsLoRA"):
        moekernels.fused_moe(x, w1, w2, tw, ids, lora=(1, 2))


# ----------------------------------------------------------------------------- GPU (device check)


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16_base", "fp8_base"])
def test_gpu_model_shapes(fp8):
    """Qwen3-30B-A3B's layer (bf16 experts) and DeepSeek-V3's slice of 32 experts (e4m3 experts) at
    512 tokens with r = 16 adapters: the Triton path (the fused low-rank segment in both GEMMs and
    their dgrads) against the torch backend's composition, forward and every trained gradient."""
    case = (512, 7168, 2048, 32, 8) if fp8 else (512, 2048, 768, 128, 8)
    num_tokens, hid, inter, num_experts, top_k = case
    x, w1, w2, tw, ids = make_layer(case, torch.bfloat16, "cuda")
    scales = {}
    if fp8:
        (w1, s1), (w2, s2) = moekernels.quantize_fp8(w1, (128, 128)), moekernels.quantize_fp8(w2, (128, 128))
        scales = dict(w_gate_up_scale=s1, w_down_scale=s2)
    adapters = make_adapters(num_experts, hid, inter, 16, 16, torch.bfloat16, "cuda")
    x.requires_grad_()
    tw.requires_grad_()
    lora = ExpertsLoRA(*adapters, scale=2.0)
    outs = [moekernels.fused_moe(x, w1, w2, tw, ids, lora=lora, backend=b, **scales) for b in ("triton", "torch")]
    assert calc_diff(*outs) <= (3e-3 if fp8 else 1e-4)
    g = torch.randn_like(outs[0])
    for a, b in zip(*(grads(y, [x, tw, *adapters], g) for y in outs)):
        assert calc_diff(a, b) <= (3e-3 if fp8 else 1e-4)
