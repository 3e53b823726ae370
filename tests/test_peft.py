"""PEFT LoRA on the 3-D expert parameters of tiny transformers MoE models (``LoraConfig(target_parameters=...)``):
``experts_implementation="moekernels"`` against PEFT's own computation (transformers' ``"eager"`` experts on the
weight PEFT materializes), logits and gradients; the fused path taken without building W + delta; adapters disabled,
merged, several at once; save and load."""

import copy
import functools
import warnings

import pytest
import torch
from conftest import cpu_backends, rel_err
from torch.utils._python_dispatch import TorchDispatchMode

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("moekernels.integrations.transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import layer as peft_lora  # noqa: E402
from test_transformers import BF16_EPS, CONFIGS, forward_backward, inputs, routers  # noqa: E402

integration.register()  # PEFT imported after the integration (test_transformers): let it reach the experts

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# gpt-oss (transposed weights, biases, its own clamped gate) takes the unfused stages, with the adapter as two
# grouped GEMMs through rank r; the other two take fused_moe(lora=...).
MODELS = ["qwen3_moe", "mixtral", "gpt_oss"]
FUSED = {"qwen3_moe", "mixtral"}
NUM_LAYERS = 2


def base_model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def lora(name, adapters=("default",), targets=TARGETS, r=4):
    """A PEFT model with LoRA adapters on the experts' parameters (rank 4, alpha 8 for the first, rank 3, alpha 3 for
    the others: scales 2 and 1). B is zero at init (delta 0); drawn here with std 0.1 so the adapters move the logits.
    The non-expert parameters (routers, attention, embeddings) train too: their gradients check the ones fused_moe
    returns for hidden and topk_weights."""
    model = get_peft_model(base_model(name), LoraConfig(r=r, lora_alpha=2 * r, target_parameters=targets),
                           adapter_name=adapters[0])
    for adapter in adapters[1:]:
        model.add_adapter(adapter, LoraConfig(r=3, lora_alpha=3, target_parameters=targets))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "lora_" not in n and "experts" not in n:
                p.requires_grad_(True)
    return model


@functools.cache
def peft_model(name, dtype=torch.float32):
    """fp32, or a bf16 copy whose adapters stay in float32, as get_peft_model keeps them on a bf16 model (PEFT casts
    them to the weights' dtype in its forward)."""
    if dtype == torch.float32:
        return lora(name)
    model = copy.deepcopy(peft_model(name)).to(dtype)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    return model


def run(model, impl, router_inputs=None):
    """Logits and the gradients of every trainable parameter under experts implementation ``impl``. Router inputs:
    as test_transformers.forward_backward (a bf16 run replays the routers' inputs of the reference run, so that near
    ties choose the same experts)."""
    model.get_base_model().set_experts_implementation(impl)
    logits, grads = forward_backward(model, router_inputs, routers(model.get_base_model()))
    assert grads
    return logits, grads


@pytest.fixture
def spy(monkeypatch):
    """Records the LoRA each fused_moe / unfused call gets and counts the evaluations of PEFT's parametrizations
    (each one builds W + delta, the size of the expert stack)."""
    calls = {"fused": [], "unfused": [], "materialized": 0}

    def wrap(attr, key, lora_of):
        original = getattr(integration, attr)

        def recorded(*args, **kwargs):
            calls[key].append(lora_of(args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(integration, attr, recorded)

    wrap("fused_moe", "fused", lambda args, kwargs: (args[1], args[2], kwargs.get("lora")))
    wrap("_experts_unfused", "unfused", lambda args, kwargs: (args[2], args[3], args[7:9]))
    for proxy in (peft_lora._LoraFactorsProxy, peft_lora._LoraParameterProxy):
        def counted(self, w, _forward=proxy.forward):
            calls["materialized"] += 1
            return _forward(self, w)

        monkeypatch.setattr(proxy, "forward", counted)
    return calls


@pytest.fixture
def peft_patch():
    """Gives back, after the test, the patch state the other tests run under (PEFT's class is process-wide)."""
    wrapper = peft_lora.ParamWrapper
    saved = wrapper.__dict__["_activate_lora"], integration._peft_decided
    yield wrapper
    wrapper._activate_lora, integration._peft_decided = saved


def experts_of(model):
    return [layer.mlp.experts.get_base_layer() for layer in model.get_base_model().model.layers]


def check_lora_calls(calls, model, name, with_lora=True):
    """One call per layer, on the path the model takes, with the base parameters themselves (PEFT's parametrization,
    removed after the forward, held them and gave them back), and LoRA factors exactly when an adapter is active and
    unmerged."""
    fused, unfused = calls["fused"], calls["unfused"]
    assert (len(fused), len(unfused)) == ((NUM_LAYERS, 0) if name in FUSED else (0, NUM_LAYERS))
    for (w1, w2, adapter), experts in zip(fused or unfused, experts_of(model)):
        assert w1 is experts.gate_up_proj and w2 is experts.down_proj
        if name in FUSED:
            assert (adapter is not None) == with_lora
        else:
            assert all((a is not None) == with_lora for a in adapter)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_lora_matches_peft(name, dtype, monkeypatch, spy):
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = peft_model(name, dtype)
    ref = run(peft_model(name), "eager")
    # The spy sees PEFT's W + delta under eager: at least one per parameter and layer (0.21.2: two, the
    # registration's check and the experts' read).
    assert spy["materialized"] >= 2 * NUM_LAYERS
    seen = [] if dtype != torch.float32 else None
    low = run(model, "eager", seen)
    spy["materialized"] = 0
    got = run(model, "moekernels", seen)
    assert spy["materialized"] == 0
    check_lora_calls(spy, model, name)
    with peft_model(name).disable_adapter():  # the adapters matter: without them the logits move far more
        assert rel_err(run(peft_model(name), "eager")[0], ref[0]) > 0.05
    (logits, grads), (ref_logits, ref_grads) = got, ref
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    if dtype == torch.float32:
        assert rel_err(logits, ref_logits) <= 1e-5
        for n in ref_grads:
            assert rel_err(grads[n], ref_grads[n]) <= 1e-5, n
    else:  # test_transformers' rule: within twice eager's own bf16 error against float32, plus eps
        low_logits, low_grads = low
        assert rel_err(logits, ref_logits) <= 2 * rel_err(low_logits, ref_logits) + BF16_EPS
        for n in ref_grads:
            assert rel_err(grads[n], ref_grads[n]) <= 2 * rel_err(low_grads[n], ref_grads[n]) + BF16_EPS, n


@pytest.mark.parametrize("backend", cpu_backends()[1:])
def test_lora_matches_peft_triton(backend, monkeypatch, spy):
    """fused_moe(lora=...) on interpreted Triton under the same adapter."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", backend)
    got, ref = run(peft_model("qwen3_moe"), "moekernels"), run(peft_model("qwen3_moe"), "eager")
    check_lora_calls(spy, peft_model("qwen3_moe"), "qwen3_moe")
    assert rel_err(got[0], ref[0]) <= 1e-5
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-5, n


class LargestOutput(TorchDispatchMode):
    """The most elements of a new tensor any op (forward or backward) returns while active. Views and in-place ops
    (their schema's returns alias an input) make none: torch's parametrization calls ``W.set_(W)``."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        outs = out if isinstance(out, tuple) else out if isinstance(out, list) else [out]
        if isinstance(out, list):  # a single Tensor[] return
            returns = returns * len(out)
        for t, ret in zip(outs, returns):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_the_size_of_an_expert_stack(monkeypatch, name="qwen3_moe"):
    """Forward and backward under moekernels make no tensor as large as the smaller expert stack (down_proj, E H I
    = 16384 elements; the next largest are the 64 x 64 = 4096 embeddings); under eager PEFT makes W + delta."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = peft_model(name)
    stack = experts_of(model)[0].down_proj.numel()
    for impl, makes_stack in (("eager", True), ("moekernels", False)):
        with LargestOutput() as mode:
            run(model, impl)
        assert (mode.largest >= stack) == makes_stack, (impl, mode.largest)


def test_one_parameter_targeted(monkeypatch, spy):
    """Only down_proj adapted: ExpertsLoRA with a1 = b1 = None."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = lora("qwen3_moe", targets=["mlp.experts.down_proj"])
    got, ref = run(model, "moekernels"), run(model, "eager")
    adapters = [call[2] for call in spy["fused"]]
    assert len(adapters) == NUM_LAYERS and all(a.a1 is None and a.b1 is None and a.a2 is not None for a in adapters)
    assert rel_err(got[0], ref[0]) <= 1e-5
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-5, n


def test_disabled_merged_and_several_adapters(monkeypatch, spy):
    """Disabled or merged adapters leave no parametrization: the plain base path (merged: on the merged weight).
    Another adapter set active: its own factors. Two adapters active at once (PEFT would sum their deltas into one
    weight-sized tensor): their factors concatenated along the rank."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = lora("mixtral", adapters=("default", "other"))
    expected = {}
    for case in ("disabled", "default", "other", "both", "merged"):
        for impl in ("eager", "moekernels"):
            spy["fused"].clear()
            if case == "disabled":
                with model.disable_adapter():
                    expected.setdefault(case, []).append(run(model, impl)[0])
            elif case == "merged":
                model.base_model.set_adapter("default")
                model.merge_adapter()
                model.get_base_model().set_experts_implementation(impl)
                with torch.no_grad():
                    expected.setdefault(case, []).append(model(input_ids=inputs()[0]).logits)
                model.unmerge_adapter()
            else:
                model.base_model.set_adapter(["default", "other"] if case == "both" else case)
                expected.setdefault(case, []).append(run(model, impl)[0])
            if impl == "moekernels":
                check_lora_calls(spy, model, "mixtral", with_lora=case not in ("disabled", "merged"))
    for case, (eager, fused) in expected.items():
        assert rel_err(fused, eager) <= 1e-5, case
    assert rel_err(expected["merged"][1], expected["default"][1]) <= 1e-5
    for a, b in [("default", "disabled"), ("other", "disabled"), ("both", "default"), ("both", "other")]:
        assert rel_err(expected[a][1], expected[b][1]) > 0.05, (a, b)


def test_base_weights_that_require_grad_get_their_gradient(monkeypatch, spy):
    """fused_moe(lora=...) keeps the base weights frozen; if a user trains them too, PEFT's W + delta (of both
    weights) is used, so that they get their gradient (as under eager)."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = lora("qwen3_moe")
    for experts in experts_of(model):
        experts.gate_up_proj.requires_grad_(True)
    got, ref = run(model, "moekernels"), run(model, "eager")
    assert [call[2] for call in spy["fused"]] == [None] * NUM_LAYERS
    assert any(n.endswith("gate_up_proj") for n in ref[1])
    for n in ref[1]:
        assert rel_err(got[1][n], ref[1][n]) <= 1e-5, n


def test_peft_imported_after_the_integration(monkeypatch, peft_patch, spy):
    """PEFT imported after register(): the first forward under an adapter runs PEFT's own activation (which builds
    W + delta once, to check its parametrization) and patches it; the next forwards build nothing. Both right."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    wrapper = peft_patch
    integration.unpatch_peft()
    monkeypatch.setattr(integration, "_peft_decided", False)  # as before the patch
    model = peft_model("mixtral")
    ref = run(model, "eager")[0]
    spy["materialized"] = 0
    first = run(model, "moekernels")[0]
    assert spy["materialized"] > 0 and hasattr(wrapper._activate_lora, "_moekernels_wraps")
    spy["materialized"] = 0
    second = run(model, "moekernels")[0]
    assert spy["materialized"] == 0
    assert rel_err(first, ref) <= 1e-5 and rel_err(second, ref) <= 1e-5


def test_fp8_training_takes_no_adapter(monkeypatch):
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = lora("qwen3_moe")
    model.get_base_model().set_experts_implementation("moekernels_fp8")
    with pytest.raises(ValueError, match="'moekernels_fp8' trains the base weights on e4m3 and takes no LoRA"):
        model(input_ids=inputs()[0])


def test_save_and_load_adapter(tmp_path, monkeypatch, spy):
    """save_pretrained writes the adapter; PeftModel.from_pretrained on a fresh base model built with
    experts_implementation="moekernels" gives the same logits, through the fused LoRA."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    model = peft_model("qwen3_moe")
    ref = run(model, "moekernels")[0]
    model.save_pretrained(tmp_path / "adapter")
    base_model("qwen3_moe").save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", experts_implementation="moekernels")
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    spy["fused"].clear()
    with torch.no_grad():
        logits = loaded(input_ids=inputs()[0]).logits
    check_lora_calls(spy, loaded, "qwen3_moe")
    assert spy["materialized"] == 0
    assert rel_err(logits, ref) <= 1e-6


def logits(model, impl):
    model.get_base_model().set_experts_implementation(impl)
    with torch.no_grad():
        return model(input_ids=inputs()[0]).logits


class Scaled(torch.nn.Module):
    """A parametrization of the user's own, under PEFT's: W * 1.25."""

    def forward(self, w):
        return w * 1.25


@pytest.mark.parametrize("adapters", [("default",), ("default", "other")], ids=len)
def test_adapters_under_another_parametrization_leave_it_alone(adapters, monkeypatch):
    """A parameter that has a parametrization of its own (here on gate_up_proj): each forward adds the adapters' one
    after it and removes it again, so after any number of forwards only the user's is left and every forward gives
    PEFT's result (``eager``, on a fresh copy: PEFT 0.21.2's own single-adapter path leaves its proxy behind too).
    PEFT's removal takes only its ``_LoraParameterProxy`` off a parameter with several parametrizations: one of ours
    left behind would add the adapters' delta once more at every forward."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    models = []
    for _ in range(2):
        models.append(lora("mixtral", adapters=adapters))
        models[-1].base_model.set_adapter(list(adapters))
        for experts in experts_of(models[-1]):
            torch.nn.utils.parametrize.register_parametrization(experts, "gate_up_proj", Scaled())
    model, fresh = models
    ref = logits(fresh, "eager")
    with fresh.disable_adapter():  # the user's parametrization matters too
        assert rel_err(logits(fresh, "eager"), ref) > 0.05
    for _ in range(4):
        got = logits(model, "moekernels")
        for experts in experts_of(model):
            assert [type(p) for p in experts.parametrizations["gate_up_proj"]] == [Scaled]
            assert "down_proj" not in experts.parametrizations
        assert rel_err(got, ref) <= 1e-5


def test_peft_outside_the_tested_versions_keeps_its_own_path(monkeypatch, peft_patch, spy):
    """A PEFT other than 0.21.x may have another _activate_lora: it is left as it is, with one warning naming the
    version and the opt-out, and the adapters still give PEFT's result."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    original = peft_patch.__dict__["_activate_lora"]._moekernels_wraps
    integration.unpatch_peft()
    monkeypatch.setattr(integration, "_peft_decided", False)  # as a fresh process
    monkeypatch.setattr(peft, "__version__", "0.22.0")
    model = peft_model("mixtral")
    ref = logits(model, "eager")
    with pytest.warns(UserWarning, match=r"PEFT 0\.22\.0.*MOEKERNELS_PEFT_PATCH=0") as record:
        integration.register()
        got = [logits(model, "moekernels") for _ in range(2)]
        integration.register()
    assert len([w for w in record if "MOEKERNELS_PEFT_PATCH" in str(w.message)]) == 1
    assert peft_patch.__dict__["_activate_lora"] is original
    assert spy["materialized"] > 0 and all(rel_err(g, ref) <= 1e-5 for g in got)


def test_opt_out_by_environment(monkeypatch, peft_patch, spy):
    """MOEKERNELS_PEFT_PATCH=0: PEFT's _activate_lora stays PEFT's, silently; the adapters still give its result."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    original = peft_patch.__dict__["_activate_lora"]._moekernels_wraps
    integration.unpatch_peft()
    monkeypatch.setattr(integration, "_peft_decided", False)
    monkeypatch.setenv("MOEKERNELS_PEFT_PATCH", "0")
    model = peft_model("mixtral")
    ref = logits(model, "eager")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*MOEKERNELS_PEFT_PATCH")
        integration.register()
        got = logits(model, "moekernels")
    assert peft_patch.__dict__["_activate_lora"] is original
    assert spy["materialized"] > 0 and rel_err(got, ref) <= 1e-5


def test_unpatch_and_patch_again(monkeypatch, peft_patch, spy):
    """unpatch_peft() gives PEFT back its own _activate_lora, and the next forwards do not patch it again (W + delta
    is built); patch_peft() patches it again (nothing the size of the weights is built)."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    original = peft_patch.__dict__["_activate_lora"]._moekernels_wraps
    model = peft_model("mixtral")
    ref = logits(model, "eager")
    integration.unpatch_peft()
    integration.unpatch_peft()  # harmless
    assert peft_patch.__dict__["_activate_lora"] is original
    for _ in range(2):
        spy["materialized"] = 0
        assert rel_err(logits(model, "moekernels"), ref) <= 1e-5
        assert spy["materialized"] > 0 and peft_patch.__dict__["_activate_lora"] is original
    assert integration.patch_peft() and integration.patch_peft()  # idempotent
    assert peft_patch.__dict__["_activate_lora"]._moekernels_wraps is original
    spy["materialized"] = 0
    assert rel_err(logits(model, "moekernels"), ref) <= 1e-5
    assert spy["materialized"] == 0
