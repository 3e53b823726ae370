"""moekernels.integrations.transformers against transformers' own "eager" experts: tiny random Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V3 and gpt-oss models on CPU tensors, logits and the gradients of every parameter, on the torch
and the interpreted triton backend; moe_from_block; patch_experts."""

import copy
import functools
import subprocess
import sys

import pytest
import torch
from conftest import HAS_GPU, cpu_backends, rel_err
from torch import nn

transformers = pytest.importorskip("transformers")
integration = pytest.importorskip("moekernels.integrations.transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

import moekernels  # noqa: E402

# Tiny models: H 64, 8 experts, top-2, 2 layers (both MoE), 16 tokens, so 32 pairs over 8 experts: some experts get
# none or one. Weights drawn with std 0.1 (not transformers' 0.02) so the experts move the logits visibly.
COMMON = dict(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False, initializer_range=0.1)
CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, intermediate_size=32, num_local_experts=8,
                                                  num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=32,
                                                     shared_expert_intermediate_size=32, num_experts=8,
                                                     num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=16, intermediate_size=64,
                                                     moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                                     norm_topk_prob=True),
    # 4 groups of 2 experts, the best 2 groups eligible, one shared expert, every layer MoE, no MTP layer.
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, num_nextn_predict_layers=0),
    # swiglu_limit 0.3 (not 7) so that the clamp of gpt-oss's SwiGLU cuts some of these small activations.
    "gpt_oss": lambda: transformers.GptOssConfig(**COMMON, head_dim=16, intermediate_size=32, num_local_experts=8,
                                                 num_experts_per_tok=2, sliding_window=8, swiglu_limit=0.3),
}
MODELS = list(CONFIGS)
FUSED = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}  # gpt-oss (biases, its own gate) runs the stages
NUM_MOE_LAYERS = 2
BF16_EPS = 1e-3


def on_triton(*values, id):
    """A case on interpreted Triton (2-4 s a model), skipped where conftest's cpu_backends() skips triton."""
    return pytest.param(*values, "triton", marks=cpu_backends()[1].marks, id=id)


@functools.cache
def tiny_model(name: str, dtype: torch.dtype = torch.float32):
    """The model with seeded random weights, in eval mode (no dropout, no router jitter); bf16 is a copy of fp32."""
    if dtype != torch.float32:
        return copy.deepcopy(tiny_model(name)).to(dtype)
    torch.manual_seed(0)
    config = CONFIGS[name]()
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for module in model.modules():
            # Non-zero DeepSeek-V3 correction biases (they choose experts) and gpt-oss expert biases (init zero).
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(0, 0.2)
            if hasattr(module, "gate_up_proj_bias"):
                module.gate_up_proj_bias.normal_(0, 0.1)
                module.down_proj_bias.normal_(0, 0.1)
    return model


def inputs(device="cpu"):
    gen = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 64, (2, 8), generator=gen), torch.randint(0, 64, (16,), generator=gen)
    return ids.to(device), targets.to(device)


def routers(model):
    return [getattr(layer.mlp, "router", None) or layer.mlp.gate for layer in model.model.layers]


def forward_backward(model, router_inputs=None, hooked=None):
    """Logits and the gradient of a cross-entropy loss on them w.r.t. every trainable parameter (router and experts
    too). ``hooked``: the routers (default: ``routers(model)``; a PEFT model passes its base model's).

    ``router_inputs``: a list to record each router's input into, or the inputs recorded in another run, which the
    routers then see instead of their own (the gradient passes straight through to their own). A bf16 run differs
    from another in its last bits, enough to flip a near tie between two experts (with 16 tokens it happens: gpt-oss,
    2nd layer, logits 0.0728 and 0.0679), which moves a token's output by far more than rounding; fed the same
    inputs, the routers of two runs choose the same experts, and the rest of the model computes as it does.
    """
    ids, targets = inputs(model.device)
    replay = bool(router_inputs)

    def hook(module, args):
        if not replay:
            router_inputs.append(args[0].detach().clone())
            return None
        recorded = router_inputs[hooks.index(module)]
        return (recorded + (args[0] - args[0].detach()),)

    handles, hooks = [], hooked if hooked is not None else routers(model)
    if router_inputs is not None:
        handles = [r.register_forward_pre_hook(hook) for r in hooks]
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets).backward()
    finally:
        for h in handles:
            h.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@functools.cache
def eager(name: str, dtype: torch.dtype = torch.float32):
    """Eager's logits and gradients, and (bf16) the inputs its routers saw."""
    model = tiny_model(name, dtype)
    model.set_experts_implementation("eager")
    seen = [] if dtype != torch.float32 else None
    return (*forward_backward(model, seen), seen)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the two experts paths, so a test knows moekernels ran (not transformers' own code)."""
    calls = {"fused": 0, "unfused": 0}

    def wrap(attr, key):
        original = getattr(integration, attr)

        def counted(*args, **kwargs):
            calls[key] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(integration, attr, counted)

    wrap("fused_moe", "fused")
    wrap("_experts_unfused", "unfused")
    return calls


def check_ran(calls, name, layers=NUM_MOE_LAYERS):
    want = {"fused": layers, "unfused": 0} if name in FUSED else {"fused": 0, "unfused": layers}
    assert calls == want


def check_fp32(got, ref, tol=1e-5):
    """Rounding only: the experts sum their k pairs in another order than eager's index_add (seen: logits 2e-7,
    gradients 6e-7 relative, torch and interpreted Triton alike)."""
    (logits, grads), (ref_logits, ref_grads) = got, ref
    assert rel_err(logits, ref_logits) <= tol
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) <= tol, n


def check_low_precision(got, eager_low, ref):
    """DESIGN.md's rule: moekernels' error against float32 eager within twice eager's own bf16 error, plus eps.

    The same factor for Triton's interpreter: it used to need twice that (it truncated float32 to bf16, a bias that
    added up in the weight gradients: gpt-oss's first-layer expert gradients at 2.6 times eager's error), until
    moekernels/_interpreter.py made it round to nearest as the GPU does.
    """
    factor = 2
    (logits, grads), (low_logits, low_grads), (ref_logits, ref_grads) = got, eager_low, ref
    assert rel_err(logits, ref_logits) <= factor * rel_err(low_logits, ref_logits) + BF16_EPS
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) <= factor * rel_err(low_grads[n], ref_grads[n]) + BF16_EPS, n


def test_registered_and_import_is_lazy():
    assert "moekernels" in ALL_EXPERTS_FUNCTIONS
    assert ALL_EXPERTS_FUNCTIONS["moekernels"] is integration.moekernels_experts_forward
    # Importing moekernels (and its integrations package) never imports transformers.
    code = "import sys, moekernels, moekernels.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# A fresh interpreter per order of imports (this process has imported both long ago). A one-layer Qwen3-MoE built
# with experts_implementation="moekernels" is what a user does first.
_TINY = ("import torch, transformers\n"
         "config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, "
         "num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=64, moe_intermediate_size=32, "
         "num_experts=8, num_experts_per_tok=2)\n"
         "def build():\n"
         "    return transformers.AutoModelForCausalLM.from_config(config, experts_implementation='moekernels')\n")


def run_python(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_after_transformers_registers():
    """transformers first, then moekernels: registered by the import alone, and a model builds with it."""
    code = ("import transformers, moekernels\n" + _TINY +
            "model = build()\n"
            "assert model.config._experts_implementation == 'moekernels'\n"
            "assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)\n"
            "print('ok')\n")
    assert run_python(code).strip() == "ok"


def test_register_transformers_after_import_of_moekernels():
    """moekernels first: transformers raises its own error (the one docs/API.md quotes) until
    moekernels.register_transformers() registers the backend; that returns the name and can be called again."""
    code = ("import sys, moekernels\n"
            "assert 'transformers' not in sys.modules\n" + _TINY +
            "try:\n"
            "    build()\n"
            "except ValueError as exc:\n"
            "    print(exc)\n"
            "else:\n"
            "    raise AssertionError('built without registering')\n"
            "assert moekernels.register_transformers() == moekernels.register_transformers() == 'moekernels'\n"
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS\n"
            "import moekernels.integrations.transformers as integration\n"
            "assert ALL_EXPERTS_FUNCTIONS['moekernels'] is integration.moekernels_experts_forward\n"
            "assert build().config._experts_implementation == 'moekernels'\n")
    out = run_python(code)
    assert 'Specified `experts_implementation="moekernels"` is not supported' in out
    assert '`experts_implementation="eager"`' in out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_set_experts_implementation_matches_eager(name, dtype, backend, monkeypatch, spy):
    monkeypatch.setenv("MOEKERNELS_BACKEND", backend)
    ref = eager(name)[:2]
    *low, seen = eager(name, dtype)  # run before the switch: the two share the model
    model = tiny_model(name, dtype)
    model.set_experts_implementation("moekernels")
    assert model.config._experts_implementation == "moekernels"
    got = forward_backward(model, seen)
    if dtype == torch.float32:
        check_fp32(got, ref)
    else:
        check_low_precision(got, low, ref)
    check_ran(spy, name)


# The load path does not change the kernels that run (the test above covers them on both backends): every model on
# torch, one on interpreted Triton.
@pytest.mark.parametrize("name,backend", [(name, "torch") for name in MODELS] + [
    on_triton("deepseek_v3", id="deepseek_v3-triton")])
def test_from_pretrained_matches_eager(name, backend, tmp_path, monkeypatch, spy):
    monkeypatch.setenv("MOEKERNELS_BACKEND", backend)
    tiny_model(name).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moekernels")
    assert model.config._experts_implementation == "moekernels"
    got = forward_backward(model)
    check_ran(spy, name)
    check_fp32(got, eager(name)[:2])


def test_from_pretrained_bf16_deepseek_keeps_its_float32_router(tmp_path, monkeypatch):
    """A bf16 load keeps DeepSeek-V3's router weight and correction bias in float32 (_keep_in_fp32_modules): the
    experts get float32 router weights with bf16 tokens."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    tiny_model("deepseek_v3").save_pretrained(tmp_path)
    runs, seen = {}, []
    for impl in ("eager", "moekernels"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation=impl, dtype=torch.bfloat16)
        assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
        runs[impl] = forward_backward(model, seen)
    check_low_precision(runs["moekernels"], runs["eager"], eager("deepseek_v3")[:2])


# ----------------------------------------------------------------------------- one experts module


def experts_module(hidden_act="silu", dtype=torch.float32):
    config = transformers.MixtralConfig(hidden_size=48, intermediate_size=40, num_local_experts=6,
                                        num_experts_per_tok=3, hidden_act=hidden_act)
    torch.manual_seed(0)
    experts = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2)
        experts.down_proj.normal_(0, 0.2)
    return experts


def routing(num_tokens, num_experts, top_k, dtype=torch.float32):
    """Distinct experts per token, never expert 0 (an expert without tokens), random softmax weights."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.zeros(num_tokens, top_k, dtype=torch.long)
    for t in range(num_tokens):
        ids[t] = torch.randperm(num_experts - 1, generator=gen)[:top_k] + 1
    weights = torch.rand(num_tokens, top_k, generator=gen).softmax(-1)
    return weights.to(dtype), ids


def experts_run(experts, impl, x, weights, ids):
    experts.config._experts_implementation = impl
    experts.zero_grad(set_to_none=True)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    y = experts(x, ids, weights)
    if y.requires_grad:  # eager's output for no tokens is a constant
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype).view_as(y)))
    return y.detach(), [t.grad for t in (x, weights, experts.gate_up_proj, experts.down_proj)]


@pytest.mark.parametrize("hidden_act,fused,backend", [
    ("silu", True, "torch"), ("gelu", True, "torch"), ("gelu_python", True, "torch"),
    ("gelu_pytorch_tanh", False, "torch"), ("relu", False, "torch"),
    # fused_moe's gelu epilogue in the Triton kernel (the models above are all silu)
    on_triton("gelu", True, id="gelu-True-triton")])
def test_activations(hidden_act, fused, backend, monkeypatch, spy):
    """silu and the exact gelu run fused_moe; approximations and other activations run the stages with the module's
    own act_fn. Both match eager."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", backend)
    experts = experts_module(hidden_act)
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(3))
    weights, ids = routing(7, 6, 3)
    y, grads = experts_run(experts, "moekernels", x, weights, ids)
    assert spy == {"fused": int(fused), "unfused": int(not fused)}
    ref_y, ref_grads = experts_run(experts, "eager", x, weights, ids)
    assert rel_err(y, ref_y) <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-5


@use_experts_implementation(is_transposed=True)
class TransposedExperts(nn.Module):
    """Experts stored [E, H, 2I] and [E, I, H] (as gpt-oss stores them), with SwiGLU and no biases: fused_moe reads
    them through transposed views."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, hidden, inter = config.num_local_experts, config.hidden_size, config.intermediate_size
        gen = torch.Generator().manual_seed(8)
        self.gate_up_proj = nn.Parameter(torch.randn(self.num_experts, hidden, 2 * inter, generator=gen) * 0.2)
        self.down_proj = nn.Parameter(torch.randn(self.num_experts, inter, hidden, generator=gen) * 0.2)
        self.act_fn = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for e, w in zip(top_k_index[t].tolist(), top_k_weights[t]):
                gate, up = (hidden_states[t] @ self.gate_up_proj[e]).chunk(2)
                out[t] += w * ((self.act_fn(gate) * up) @ self.down_proj[e])
        return out


@pytest.mark.parametrize("backend", cpu_backends())
def test_transposed_experts_take_fused_moe_through_views(backend, monkeypatch, spy):
    monkeypatch.setenv("MOEKERNELS_BACKEND", backend)
    config = transformers.MixtralConfig(hidden_size=48, intermediate_size=40, num_local_experts=6)
    experts = TransposedExperts(config)
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(9))
    weights, ids = routing(5, 6, 3)
    y, grads = experts_run(experts, "moekernels", x, weights, ids)
    assert spy == {"fused": 1, "unfused": 0}
    ref_y, ref_grads = experts_run(experts, "eager", x, weights, ids)
    assert rel_err(y, ref_y) <= 1e-5
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape and rel_err(g, ref) <= 1e-5


@pytest.mark.parametrize("hidden_act", ["silu", "relu"])
@pytest.mark.parametrize("num_tokens", [0, 1])
def test_no_token_and_one_token(num_tokens, hidden_act, monkeypatch):
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    experts = experts_module(hidden_act)
    x = torch.randn(num_tokens, 48, generator=torch.Generator().manual_seed(10))
    weights, ids = routing(num_tokens, 6, 3)
    y, grads = experts_run(experts, "moekernels", x, weights, ids)
    ref_y, ref_grads = experts_run(experts, "eager", x, weights, ids)
    assert y.shape == (num_tokens, 48) and rel_err(y, ref_y) <= 1e-5
    for g, ref in zip(grads, ref_grads):
        if ref is None:  # no tokens: eager's loop touched nothing; moekernels' gradients, if any, are zeros
            assert g is None or not g.any()
        else:
            assert rel_err(g, ref) <= 1e-5


def test_expert_parallel_sentinels_on_cpu(monkeypatch):
    """Ids >= E (other ranks' experts, weight 0) add nothing and get no router gradient, as in eager."""
    monkeypatch.setenv("MOEKERNELS_BACKEND", "torch")
    experts = experts_module()
    experts._is_expert_parallel = True
    x = torch.randn(5, 48, generator=torch.Generator().manual_seed(4))
    weights, ids = routing(5, 6, 3)
    ids[1:3, 1] = 6
    weights[1:3, 1] = 0.0
    y, grads = experts_run(experts, "moekernels", x, weights, ids)
    ref_y, ref_grads = experts_run(experts, "eager", x, weights, ids)
    assert rel_err(y, ref_y) <= 1e-5
    assert (grads[1][1:3, 1] == 0).all()
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-5


def test_float64_experts_raise_naming_the_module():
    experts = experts_module(dtype=torch.float64)
    experts.config._experts_implementation = "moekernels"
    weights, ids = routing(3, 6, 3, torch.float64)
    with pytest.raises(TypeError, match="MixtralExperts.*float64"):
        experts(torch.randn(3, 48, dtype=torch.float64), ids, weights)


# ----------------------------------------------------------------------------- moe_from_block


def block(name, layer=1):
    model = tiny_model(name)
    model.set_experts_implementation("eager")
    return model.model.layers[layer].mlp


def qwen3_without_norm_topk_prob():
    blk = copy.deepcopy(block("qwen3_moe"))
    blk.gate.norm_topk_prob = False
    return blk


BLOCKS = {
    "mixtral": lambda: block("mixtral"),
    "qwen3_moe": lambda: block("qwen3_moe"),
    "qwen3_moe-no_norm_topk_prob": qwen3_without_norm_topk_prob,
    "deepseek_v3": lambda: block("deepseek_v3"),
}


# Mixtral's softmax and DeepSeek-V3's grouped sigmoid routing on interpreted Triton too; the Qwen3 blocks route
# as Mixtral's (with and without the renormalization) and run on torch only.
@pytest.mark.parametrize("case,backend", [(case, "torch") for case in BLOCKS] + [
    on_triton(case, id=f"{case}-triton") for case in ("mixtral", "deepseek_v3")])
def test_moe_from_block_matches_the_block(case, backend):
    blk = BLOCKS[case]()
    moe = integration.moe_from_block(blk, backend=backend)
    assert isinstance(moe, moekernels.MoE) and not moe.training
    assert moe.w_gate_up.data_ptr() != blk.experts.gate_up_proj.data_ptr()  # a copy
    if case == "deepseek_v3":
        assert moe.scoring == "sigmoid" and moe.n_group == 4 and moe.shared_experts is not None
        assert torch.equal(moe.e_score_correction_bias, blk.gate.e_score_correction_bias)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(5))
    outs = []
    for module in (moe, blk):
        xg = x.clone().requires_grad_()
        y = module(xg)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype).view_as(y)))
        outs.append((y.detach(), xg.grad))
    (y, gx), (ref_y, ref_gx) = outs
    assert rel_err(y, ref_y) <= 1e-5
    assert rel_err(gx, ref_gx) <= 1e-5


@pytest.mark.parametrize("name,match", [("qwen2_moe", "shared expert"), ("gpt_oss", "bias")])
def test_moe_from_block_rejects_what_moe_cannot_hold(name, match):
    with pytest.raises(ValueError, match=match):
        integration.moe_from_block(block(name))


# ----------------------------------------------------------------------------- patch_experts


class LoopExperts(nn.Module):
    """User code with its own vLLM-style experts: w13 [E, 2I, H] (gate rows, then up), w2 [E, H, I], a loop."""

    def __init__(self, num_experts=6, hidden=48, inter=40, transposed=False):
        super().__init__()
        gen = torch.Generator().manual_seed(6)
        w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2
        w2 = torch.randn(num_experts, hidden, inter, generator=gen) * 0.2
        self.transposed = transposed
        self.w13_weight = nn.Parameter(w13.transpose(1, 2).contiguous() if transposed else w13)
        self.w2_weight = nn.Parameter(w2.transpose(1, 2).contiguous() if transposed else w2)

    def forward(self, x, topk_weights, topk_ids):
        w13, w2 = self.w13_weight, self.w2_weight
        if self.transposed:
            w13, w2 = w13.transpose(1, 2), w2.transpose(1, 2)
        out = torch.zeros_like(x)
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
        k = topk_ids.shape[-1]
        for t, (ids, ws) in enumerate(zip(topk_ids.reshape(-1, k), topk_weights.reshape(-1, k))):
            for e, w in zip(ids.tolist(), ws):
                gate, up = (w13[e] @ flat_x[t]).chunk(2)
                flat_out[t] += w * (w2[e] @ (nn.functional.silu(gate) * up))
        return out


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("transposed", [False, True])
def test_patch_experts(transposed, backend):
    module = LoopExperts(transposed=transposed)
    x = torch.randn(2, 3, 48, generator=torch.Generator().manual_seed(7))
    weights, ids = routing(6, 6, 3)
    weights, ids = weights.view(2, 3, 3), ids.view(2, 3, 3)

    def run():
        module.zero_grad(set_to_none=True)
        xg, wg = x.clone().requires_grad_(), weights.clone().requires_grad_()
        y = module(xg, wg, ids)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype).view_as(y)))
        return [y.detach(), xg.grad, wg.grad, module.w13_weight.grad, module.w2_weight.grad]

    ref = run()
    integration.patch_experts(module, w13="w13_weight", w2="w2_weight", transposed=transposed, backend=backend)
    got = run()
    for g, r in zip(got, ref):
        assert g.shape == r.shape and rel_err(g, r) <= 1e-5
    integration.unpatch_experts(module)
    assert "forward" not in module.__dict__


def test_patch_experts_names_a_missing_weight():
    with pytest.raises(ValueError, match="w13: LoopExperts has no tensor attribute 'w13'"):
        integration.patch_experts(LoopExperts())


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", MODELS)
def test_cuda_bf16_matches_eager(name):
    """The compiled Triton kernels (the automatic choice on CUDA) in a bf16 model, against eager on the GPU."""
    ref_logits, ref_grads, _ = eager(name)
    runs, seen = {}, []
    for impl in ("eager", "moekernels"):
        model = copy.deepcopy(tiny_model(name)).to("cuda", torch.bfloat16)
        model.set_experts_implementation(impl)
        logits, grads = forward_backward(model, seen)
        runs[impl] = logits.cpu(), {n: g.cpu() for n, g in grads.items()}
    check_low_precision(runs["moekernels"], runs["eager"], (ref_logits, ref_grads))


def test_fp8_experts_implementation_trains_close_to_eager():
    """``experts_implementation="moekernels_fp8"``: the experts' GEMMs and their gradients on e4m3 with the
    model's float32 weights as the master copy (H and I multiples of 128): logits and gradients within the fp8
    recipe's error of "eager", and the experts' weights get gradients."""
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**dict(COMMON, hidden_size=128, num_hidden_layers=1), head_dim=32,
                                         intermediate_size=128, moe_intermediate_size=128, num_experts=4,
                                         num_experts_per_tok=2, norm_topk_prob=True)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()

    def run(implementation):
        model.set_experts_implementation(implementation)
        model.zero_grad(set_to_none=True)
        ids, targets = inputs()
        logits = model(ids).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets).backward()
        experts = model.model.layers[0].mlp.experts
        return logits.detach(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    def calc_diff(x, y):
        x, y = x.double(), y.double()
        return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()

    eager, fp8 = run("eager"), run(moekernels.integrations.transformers.IMPLEMENTATION_FP8)
    assert fp8[1].abs().sum() > 0 and fp8[2].abs().sum() > 0
    for name, a, b in zip(("logits", "d gate_up_proj", "d down_proj"), fp8, eager):
        assert calc_diff(a, b) <= 5e-3, name
