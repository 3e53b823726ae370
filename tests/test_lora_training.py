"""LoRA fine-tuning with moekernels.MoE(lora_rank=...): the module's contract (starts as the base layer,
only the adapters and the router train, quantize_experts), a fine-tuning run on frozen e4m3 experts (torch
backend to convergence, interpreted Triton for two steps against it), and that W + sBA is never formed: no
tensor the size of an expert weight stack is allocated, where PEFT's target_parameters allocates one."""

import copy

import pytest
import torch
from conftest import rel_err
from test_fp8 import calc_diff
from torch.utils._python_dispatch import TorchDispatchMode

import moekernels
FP8 = torch.float8_e4m3fn

ADAPTERS = ("lora_a1", "lora_b1", "lora_a2", "lora_b2")


def make_moe(hid=128, inter=128, experts=4, top_k=2, rank=8, **kw):
    torch.manual_seed(0)
    return moekernels.MoE(hid, inter, experts, top_k, lora_rank=rank, backend="torch", **kw)


def randomize_b(moe, std=0.3):
    """B non-zero (its init is zero): A's gradient and the adapters' effect become visible."""
    with torch.no_grad():
        moe.lora_b1.normal_(0, std)
        moe.lora_b2.normal_(0, std)


# ----------------------------------------------------------------------------- the module


def test_starts_as_the_base_layer_and_only_adapters_and_router_train():
    moe = make_moe(hid=64, inter=48, experts=6)
    x = torch.randn(21, 64)
    _, weights, ids = moe.route(x)
    base = moekernels.fused_moe(x, moe.w_gate_up, moe.w_down, weights, ids, backend="torch")
    y = moe(x)
    assert rel_err(y, base) <= 1e-6  # B = 0: the adapters add exactly nothing
    assert moe.lora_scale == 1.0  # lora_alpha defaults to the rank: s = alpha / r = 1
    assert {n for n, p in moe.named_parameters() if p.requires_grad} == {"gate.weight", *ADAPTERS}
    y.square().sum().backward()
    assert moe.w_gate_up.grad is None and moe.w_down.grad is None
    assert moe.gate.weight.grad.abs().sum() > 0
    assert moe.lora_b1.grad.abs().sum() > 0 and moe.lora_b2.grad.abs().sum() > 0
    assert not moe.lora_a1.grad.any() and not moe.lora_a2.grad.any()  # d/dA = B^T (...) = 0 at B = 0

    randomize_b(moe)
    moe.zero_grad()
    y = moe(x)
    assert rel_err(y, base) > 0.1  # now the adapters matter ...
    y.square().sum().backward()
    assert all(getattr(moe, n).grad.abs().sum() > 0 for n in ADAPTERS)  # ... and A trains too
    assert moe.w_gate_up.grad is None and moe.w_down.grad is None


def test_quantize_experts_keeps_the_adapters_training():
    moe = make_moe(lora_alpha=16.0)
    randomize_b(moe)
    x = torch.randn(19, 128)
    want = moe(x)
    moe.quantize_experts()
    assert moe.w_gate_up.dtype == FP8 and moe.w_down.dtype == FP8
    assert moe.w_gate_up_scale.shape == (4, 2, 1) and moe.w_down_scale.shape == (4, 1, 1)  # (128, 128) blocks
    assert {n for n, _ in moe.named_parameters()} == {"gate.weight", *ADAPTERS}  # the experts are buffers now
    assert {"w_gate_up", "w_down", "w_gate_up_scale", "w_down_scale"} <= set(moe.state_dict())
    got = moe(x)
    assert got.dtype == torch.float32 and calc_diff(got, want) <= 3e-3  # e4m3's error, not a different layer
    got.square().sum().backward()
    assert all(getattr(moe, n).grad.abs().sum() > 0 for n in ADAPTERS)
    moe.quantize_experts()  # a second call leaves it as it is
    assert moe.w_gate_up.dtype == FP8


@pytest.mark.parametrize("make,err,match", [
    (lambda: make_moe(rank=-1), ValueError, "lora_rank must be in"),
    (lambda: make_moe(rank=2.0), TypeError, "lora_rank must be an int"),
    (lambda: make_moe(rank=4, precision="fp8"), ValueError, "lora_rank > 0 .* precision='fp8'"),
    (lambda: make_moe(hid=96, rank=4).quantize_experts(), ValueError, "quantize_experts needs hidden_size"),
    (lambda: make_moe(inter=64, rank=4).quantize_experts(), ValueError, "quantize_experts needs hidden_size"),
])
def test_bad_arguments_name_the_argument(make, err, match):
    with pytest.raises(err, match=match):
        make()


# ----------------------------------------------------------------------------- fine-tuning


class Model(torch.nn.Module):
    """One MoE layer with a residual and a linear head: head(x + moe(x))."""

    def __init__(self, experts, rank, backend):
        super().__init__()
        self.moe = moekernels.MoE(128, 128, experts, 2, lora_rank=rank, lora_alpha=2 * rank, backend=backend)
        self.head = torch.nn.Linear(128, 32)

    def forward(self, x):
        return self.head(x + self.moe(x))


def teacher_and_student(experts, rank, backend):
    """The student: frozen e4m3 experts, a frozen router and head, B = 0. The teacher: the same model with a
    random low-rank delta on its experts, so that the adapters alone can reach its outputs."""
    torch.manual_seed(0)
    student = Model(experts, rank, backend)
    student.moe.quantize_experts()
    for p in [student.moe.gate.weight, *student.head.parameters()]:
        p.requires_grad_(False)
    teacher = copy.deepcopy(student)
    teacher.moe.backend = "torch"  # the target is computed once: no need for the interpreter there
    randomize_b(teacher.moe, 0.1)
    return teacher, student


def adapters(model):
    return [getattr(model.moe, n) for n in ADAPTERS]


def task(experts, rank, backend, tokens):
    """The student, the inputs, the teacher's outputs on them, and Adam on the student's adapters."""
    teacher, student = teacher_and_student(experts, rank, backend)
    x = torch.randn(tokens, 128)
    with torch.no_grad():
        target = teacher(x)
    return student, x, target, torch.optim.Adam(adapters(student), lr=1e-2)


def test_lora_on_frozen_fp8_experts_learns():
    """Adam on the adapters only: the loss against the teacher falls to a quarter or less (it starts at the teacher's
    delta, which predicting the base layer gives)."""
    student, x, target, opt = task(8, 8, "torch", 64)
    assert [p for p in student.parameters() if p.requires_grad] == adapters(student)
    losses = []
    for _ in range(15):
        loss = (student(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.25 * losses[0], losses  # ~0.03 of it in 15 steps
    assert student.moe.w_gate_up.dtype == FP8  # the experts stayed frozen in e4m3


def test_lora_fine_tuning_steps_on_interpreted_triton():
    """Two Adam steps on backend="triton" (the interpreter here, ~5 s a step): at each, the loss and the
    adapters' gradients match the torch backend's on the same parameters (gradients within the fp8 layer's
    bound), and the loss falls. At step 0 B = 0 (A's gradient is zero in both); at step 1 every adapter has
    one."""
    pytest.importorskip("triton")
    from moekernels import _backend

    if not _backend.interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    student, x, target, opt = task(4, 4, "triton", 16)
    losses = []
    for step in range(2):
        ref = copy.deepcopy(student)
        ref.moe.backend = "torch"
        ref_loss = (ref(x) - target).square().mean()
        ref_loss.backward()
        loss = (student(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert rel_err(loss.detach(), ref_loss.detach()) <= 1e-4
        for name, p, q in zip(ADAPTERS, adapters(student), adapters(ref)):
            if step == 0 and name in ("lora_a1", "lora_a2"):
                assert not p.grad.any() and not q.grad.any()
            else:
                assert q.grad.abs().sum() > 0 and calc_diff(p.grad, q.grad) <= 3e-3, (step, name)
        opt.step()
        losses.append(loss.item())
    assert losses[0] > losses[1], losses


# ----------------------------------------------------------------------------- no W + sBA


class Allocations(TorchDispatchMode):
    """The element count of every tensor an op allocates in the forward and backward: its outputs, less the
    views of its inputs (a transpose of a weight stack is no copy of it)."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numels.append(t.numel())
        return out


# A mid-sized layer: one expert weight stack is E*H*I = 2,097,152 elements (E*2I*H twice that); the
# largest activation is T*k x 2I = 65,536.
E, H, I, T, K, R = 16, 512, 256, 64, 2, 16


def test_no_weight_stack_is_allocated():
    torch.manual_seed(0)
    moe = moekernels.MoE(H, I, E, K, lora_rank=R, backend="torch")
    randomize_b(moe)
    x = torch.randn(T, H, requires_grad=True)
    with Allocations() as mode:
        moe(x).square().sum().backward()
    assert all(getattr(moe, n).grad.abs().sum() > 0 for n in ADAPTERS)
    assert len(mode.numels) > 20  # the mode saw the layer's ops (the custom op's insides included)
    assert max(mode.numels) < E * H * I, max(mode.numels)


def test_peft_target_parameters_allocate_the_weight_stack():
    """The comparison: PEFT's LoRA on the experts' 3-D parameters (LoraConfig(target_parameters=...)) on a
    one-layer Qwen3-MoE of the same sizes forms W + sBA, one [E, 2I, H] and one [E, H, I] tensor a
    forward, which the counting above would catch."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from transformers import Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=H, moe_intermediate_size=I, intermediate_size=I,
                            num_experts=E, num_experts_per_tok=K, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=32, decoder_sparse_step=1, mlp_only_layers=[])
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="grouped_mm")
    config = peft.LoraConfig(r=R, lora_alpha=R, target_modules=[],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, config)
    trained = [p for p in model.parameters() if p.requires_grad]
    assert len(trained) == 4  # A and B of the two stacks
    ids = torch.randint(0, 64, (1, T))
    with Allocations() as mode:
        model(input_ids=ids).logits.square().sum().backward()
    assert all(p.grad is not None for p in trained)
    assert max(mode.numels) >= E * 2 * I * H, max(mode.numels)
    assert sum(n >= E * H * I for n in mode.numels) >= 2  # both stacks
