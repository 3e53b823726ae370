"""Errors that name their cause (issue 15, items 8-13 and 15): each test makes the mistake a
new user made and checks that the message names the argument, the value, and the fix."""

import re

import pytest
import torch

import moekernels
from moekernels import _backend, _ext


def _layer(**kw):
    return moekernels.MoE(64, 32, 8, 2, **kw)


# ----------------------------------------------------------------------------- MoE inputs


@pytest.mark.parametrize("layer_dtype,x_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float16)])
def test_moe_input_dtype_names_both_dtypes(layer_dtype, x_dtype):
    layer = _layer(dtype=layer_dtype)
    with pytest.raises(TypeError) as err:
        layer(torch.randn(3, 64, dtype=x_dtype))
    msg = str(err.value)
    assert msg.startswith("x has dtype")
    assert str(x_dtype).removeprefix("torch.") in msg and str(layer_dtype).removeprefix("torch.") in msg
    assert "w_gate_up" not in msg  # the input is the cause, not the layer's weights


@pytest.mark.parametrize("shape", [(3, 65), (2, 3, 63), (64,) * 0 + (5, 0)])
def test_moe_wrong_hidden_size_names_hidden_size(shape):
    layer = _layer()
    with pytest.raises(ValueError, match=re.escape(f"hidden_size=64], got shape {shape}")):
        layer(torch.randn(shape))


def test_moe_input_on_another_device():
    layer = _layer()
    with pytest.raises(ValueError, match="x is on meta"):
        layer(torch.randn(3, 64, device="meta"))


def test_moe_right_input_still_runs():
    layer = _layer(dtype=torch.bfloat16)
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    assert layer(x).shape == x.shape


# ----------------------------------------------------------------------------- MoE construction

# Each routing mistake raises in MoE(...) with the same message topk_routing gives for it.
BAD_ROUTING = [
    ("n_group", dict(n_group=3, topk_group=1)),  # 3 does not divide E = 8
    ("topk_group", dict(n_group=4, topk_group=5)),
    ("n_group and topk_group", dict(n_group=4)),
    ("top_k=2 exceeds", dict(n_group=8, topk_group=1)),  # one group of one expert holds 1 < k
    ("E / n_group must be >= 2", dict(n_group=8, topk_group=2, correction_bias=True)),
    ("renormalize", dict(renormalize=1)),
    ("routed_scaling_factor", dict(routed_scaling_factor=float("inf"))),
    ("routed_scaling_factor", dict(routed_scaling_factor="2.5")),
    ("scoring", dict(scoring="relu")),
]


@pytest.mark.parametrize("name,kw", BAD_ROUTING, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD_ROUTING)])
def test_moe_validates_routing_when_built(name, kw):
    with pytest.raises((ValueError, TypeError), match=re.escape(name)) as built:
        _layer(**kw)
    routing = {k: v for k, v in kw.items() if k != "correction_bias"}
    if kw.get("correction_bias"):
        routing["bias"] = torch.zeros(8)
    with pytest.raises(type(built.value)) as called:
        moekernels.topk_routing(torch.randn(3, 8), 2, **routing)
    assert str(called.value) == str(built.value)


def test_moe_good_groups_still_build():
    layer = _layer(n_group=4, topk_group=2, scoring="sigmoid", correction_bias=True)
    assert layer(torch.randn(3, 64)).shape == (3, 64)


@pytest.mark.parametrize("arg", ["dtype", "router_dtype"])
def test_moe_fp8_dtype_points_to_the_fp8_path(arg):
    with pytest.raises(TypeError) as err:
        _layer(**{arg: torch.float8_e4m3fn})
    msg = str(err.value)
    assert msg.startswith(f"{arg} must be one of") and "float8_e4m3fn" in msg
    assert "quantize_fp8" in msg and "fused_moe" in msg and "w_gate_up_scale" in msg


def test_moe_other_dtype_is_rejected_by_name():
    with pytest.raises(TypeError, match="dtype must be one of .* got torch.float64$"):
        _layer(dtype=torch.float64)


def test_the_fp8_path_the_message_names_runs():
    """The recipe of the fp8 message, as written: quantize a layer's weights (128, 128), pass
    them with their scales to fused_moe."""
    layer = moekernels.MoE(128, 128, 4, 2)
    x = torch.randn(5, 128)
    _, topk_weights, topk_ids = layer.route(x)
    q1, s1 = moekernels.quantize_fp8(layer.w_gate_up, (128, 128))
    q2, s2 = moekernels.quantize_fp8(layer.w_down, (128, 128))
    y = moekernels.fused_moe(x, q1, q2, topk_weights, topk_ids, w_gate_up_scale=s1, w_down_scale=s2)
    want = layer(x)
    # e4m3 keeps 3 mantissa bits (up to 6% per rounding, ~2% rms); x, both weights and h are
    # rounded: 6% measured. The accuracy itself is test_moe's fp8 test; this one runs the recipe.
    assert (y.float() - want).norm() <= 0.1 * want.norm()


# ----------------------------------------------------------------------------- repr


def test_moe_repr_shows_the_configuration():
    layer = moekernels.MoE(64, 32, 16, 4, scoring="sigmoid", n_group=4, topk_group=2, correction_bias=True,
                           routed_scaling_factor=2.5, num_shared_experts=2, activation="gelu")
    text = repr(layer)
    for part in ("hidden_size=64", "intermediate_size=32", "num_experts=16", "top_k=4", "activation='gelu'",
                 "scoring='sigmoid'", "n_group=4, topk_group=2", "renormalize=True", "routed_scaling_factor=2.5",
                 "num_shared_experts=2", "correction_bias=True", "(gate): Linear"):
        assert part in text, (part, text)
    plain = repr(_layer(renormalize=False))
    assert "n_group" not in plain and "renormalize=False" in plain and "num_shared_experts=0" in plain
    assert "local experts" not in plain


def test_moe_repr_shows_the_local_experts(monkeypatch):
    from moekernels import distributed

    monkeypatch.setattr(distributed, "world_and_rank", lambda group: (4, 2))  # rank 2 of 4
    layer = moekernels.MoE(64, 32, 16, 2, expert_parallel_group=object())
    assert repr(layer).splitlines()[1].endswith("num_experts=16, top_k=2, activation='silu', scoring='softmax', "
                                                "renormalize=True, routed_scaling_factor=1.0, num_shared_experts=0, "
                                                "correction_bias=False, local experts 8..11")


# ----------------------------------------------------------------------------- MOEKERNELS_BACKEND


def _choose_error(monkeypatch, env, requested, device="cpu", *, interpret=True, ext=True):
    if env is None:
        monkeypatch.delenv("MOEKERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("MOEKERNELS_BACKEND", env)
    monkeypatch.setenv("TRITON_INTERPRET", "1" if interpret else "0")
    monkeypatch.setattr(_ext, "HAS_CUDA_EXT", ext)
    with pytest.raises((ValueError, RuntimeError)) as err:
        _backend.choose("topk_routing", torch.device(device), requested)
    return str(err.value)


@pytest.mark.parametrize("case,env,kw,expect", [
    ("cuda-on-cpu", "cuda", {}, "needs CUDA tensors"),
    ("not-built", "cuda", dict(ext=False), "moekernels._C is not built"),
    ("triton-no-interpreter", "triton", dict(interpret=False), "needs Triton's interpreter"),
    ("unknown", "tpu", {}, "must be one of"),
])
def test_backend_errors_name_the_environment_variable(monkeypatch, case, env, kw, expect):
    msg = _choose_error(monkeypatch, env, None, **kw)
    assert "MOEKERNELS_BACKEND" in msg and "environment variable" in msg and expect in msg
    assert repr(env) in msg
    # The same mistake as an argument names the argument, even with the variable set.
    msg = _choose_error(monkeypatch, "torch", env, **kw)
    assert "MOEKERNELS_BACKEND" not in msg and expect in msg
    assert msg.startswith("backend must") or f"backend={env!r}" in msg


def test_backend_variable_error_through_the_public_op(monkeypatch):
    monkeypatch.setenv("MOEKERNELS_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"topk_routing: MOEKERNELS_BACKEND='cuda' \(environment variable\) needs "
                                         r"CUDA tensors, got cpu tensors"):
        moekernels.topk_routing(torch.randn(2, 8), 2)


# ----------------------------------------------------------------------------- fp8 messages


def test_quantize_unknown_granularity_lists_every_form():
    with pytest.raises(ValueError) as err:
        moekernels.quantize_fp8(torch.randn(4, 128), "block")
    msg = str(err.value)
    assert "'tensor', 'row', 'col'" in msg and "(rows, cols)" in msg and "(128, 128)" in msg and "'block'" in msg


def _fp8(rows, cols, granularity):
    return moekernels.quantize_fp8(torch.randn(rows, cols), granularity)


def test_fp8_mm_reports_2d_shapes():
    a, sa = _fp8(4, 256, (1, 128))
    w, sw = _fp8(48, 256, (128, 128))  # [N, K]: b is its transpose, b_scale must be too
    with pytest.raises(ValueError) as err:
        moekernels.fp8_mm(a, sa, w.t(), sw)
    msg = str(err.value)
    assert "b [256, 48]" in msg and "b_scale (1, 2)" in msg and "((4, 2) and (2, 1))" in msg
    assert "[1, 256, 48]" not in msg and "per expert" not in msg
    y = moekernels.fp8_mm(a, sa, w.t(), sw.t())  # the fix the message gives
    assert y.shape == (4, 48)


def test_fp8_grouped_mm_keeps_the_expert_dim():
    a, sa = _fp8(4, 256, (1, 128))
    w, sw = _fp8(48, 256, (128, 128))
    offs = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match=re.escape("b [1, 256, 48]")):
        moekernels.fp8_grouped_mm(a, sa, w.t().unsqueeze(0), sw.unsqueeze(0), offs)
