"""FP8 where the GPU has no e4m3 MMA (sm_80, sm_86; issue 21 item 3). Triton cannot name e4m3
there, so the launchers pass e4m3 tensors as their bytes: the GEMMs decode them to bf16 as they
load them (kernels/_math.py), the quantize kernels encode them by integer operations
(kernels/_fp8.py), permute moves the bytes, and fused_moe keeps its tokens in bf16 (weight-only).

On the CPU the route is forced by ``configs.fp8_path`` (the ``sm80`` fixture): the byte codecs
bit for bit against torch, every fp8 op against the dequantized reference and against the e4m3
route, on both backends, with no e4m3 tensor reaching a kernel; and every such kernel compiled for
sm_80 by the real compiler (mma.sync on bf16, no e4m3 in the PTX)."""


import pytest
import torch
import triton
import triton.language as tl
from conftest import cpu_backends, rel_err
from test_fp8 import make_non_finite, quantized_problem, same_bits
from test_fp8_training import fp8_problem, moe_problem
from test_grouped_gemm import make_offs
from test_plan import make_ids

import moekernels
from moekernels import _backend, configs, fp8, reference
from moekernels import grouped_gemm as gg
from moekernels.kernels._fp8 import e4m3_bits
from moekernels.kernels._math import e4m3_to_float

FP8 = torch.float8_e4m3fn
needs_interpreter = pytest.mark.skipif(not _backend.interpreting(), reason="needs TRITON_INTERPRET=1")
# bf16's rounding of a result (a unit roundoff of 2**-9, as a norm well below it), with room for
# float32 sums in another order.
BF16 = 2**-8


@pytest.fixture
def sm80(monkeypatch):
    """An sm_80 device as the launchers see it; records the dtypes of the tensors (descriptors'
    bases included) that reach an interpreted kernel."""
    from triton.runtime import interpreter
    from triton.tools.tensor_descriptor import TensorDescriptor

    monkeypatch.setattr(configs, "fp8_path", lambda arch: "bytes")
    seen = set()
    run = interpreter.InterpretedFunction.run

    def recording(self, *args, **kwargs):
        for a in (*args, *kwargs.values()):
            t = a.base if isinstance(a, TensorDescriptor) else a
            if isinstance(t, torch.Tensor):
                seen.add(t.dtype)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", recording)
    return seen


def no_e4m3_reached_a_kernel(seen):
    return FP8 not in seen and torch.uint8 in seen


# ----------------------------------------------------------------------------- the byte codecs


@triton.jit
def decode_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, e4m3_to_float(tl.load(x_ptr + i, mask=i < n), y_ptr.dtype.element_ty), mask=i < n)


@triton.jit
def encode_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, e4m3_bits(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def _run(kernel, x, y):
    kernel[(-(-x.numel() // 8192),)](x, y, x.numel(), BLOCK=8192)
    return y


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_decode_every_byte(dtype):
    """All 256 bytes: the value torch reads from them, bit for bit (-0.0, subnormals, +-448), and
    NaN for 0x7F and 0xFF."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = _run(decode_kernel, b, torch.empty(256, dtype=dtype))
    want = b.view(FP8).to(dtype)
    nan = want.isnan()
    assert nan.sum() == 2 and torch.equal(got.isnan(), nan)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got[~nan].view(bits), want[~nan].view(bits))


@needs_interpreter
def test_encode_is_torchs_cast():
    """Every bfloat16 value (as float32: both signs, subnormals, every binade, the ties of e4m3's
    grid), random float32 over 24 binades, the saturation edges and inf: torch's cast, bit for bit
    (which saturates as the GPU's cvt.rn.satfinite); NaN -> 0x7F (torch keeps a NaN's sign)."""
    torch.manual_seed(0)
    x = torch.cat([torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).float(),
                   torch.randn(50000) * torch.logspace(-12, 3, 50000),
                   torch.tensor([448.0, 463.99, 464.0, 464.01, 1e30, float("inf"), -464.0, -float("inf")])])
    got = _run(encode_kernel, x, torch.empty(x.shape, dtype=torch.uint8))
    want = x.to(FP8).view(torch.uint8)
    nan = x.isnan()
    assert torch.equal(got[~nan], want[~nan])
    assert (got[nan] == 0x7F).all() and nan.any()
    assert (got[x.abs() >= 448] & 0x7F == 0x7E).all()  # +-448


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("granularity", ["tensor", "col", (1, 128), (128, 128), (32, 64)], ids=str)
def test_quantize_is_bit_exact(granularity, backend, sm80):
    """quantize_fp8 through the integer encoder (one and two passes), NaN and inf blocks included:
    the reference's bits."""
    from test_fp8 import check_non_finite

    x = make_non_finite((2, 300, 260), torch.float32, "cpu")
    q, scale = moekernels.quantize_fp8(x, granularity, backend=backend)
    check_non_finite(x, q, scale, *fp8.block_shape(granularity, 300, 260), False)
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)


@pytest.mark.parametrize("backend", cpu_backends())
def test_quantize_gathered_and_segments_are_bit_exact(backend, sm80):
    x = (torch.randn(23, 200) * torch.logspace(-3, 1, 200)).bfloat16()
    ids = make_ids(23, 2, 5)
    plan = moekernels.plan_routing(ids, 5, backend="torch")
    q, scale = fp8.quantize_fp8_gathered(x, plan, scale_layout="col_major", backend=backend)
    rows = reference.permute_rows(x, plan.source_index, 2)
    want_q, want_s = reference.quantize_fp8(rows, (1, 128))
    assert same_bits(q, want_q) and torch.equal(scale, want_s)
    offs = plan.expert_offsets
    q, scale = fp8.quantize_fp8_segments(rows, offs, pow2_scale=True, backend=backend)
    want_q, want_s = reference.quantize_fp8_segments(rows, offs, pow2_scale=True)
    assert same_bits(q, want_q) and torch.equal(scale, want_s)
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)


@pytest.mark.parametrize("backend", cpu_backends())
def test_permute_moves_e4m3_bytes(backend, sm80):
    x, _ = moekernels.quantize_fp8(torch.randn(9, 160), (1, 128), backend="torch")
    x[0, :8] = torch.tensor([float("nan"), -0.0, 448, -448, 2**-9, -(2**-9), 0.5, 1]).to(FP8)
    plan = moekernels.plan_routing(make_ids(9, 3, 6), 6, backend="torch")
    out = moekernels.permute(x, plan, backend=backend)
    assert out.dtype == FP8 and same_bits(out, reference.permute_rows(x, plan.source_index, 3))
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)


# ----------------------------------------------------------------------------- GEMMs


CASES = [(50, 256, 192, 3, 3), (9, 128, 72, 5, 0), (1, 128, 128, 2, 0)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["tensor", "rowcol", "block"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}_K{}_N{}_E{}_tail{}".format(*c))
def test_fp8_grouped_mm_decodes_to_bf16(case, mode, backend, sm80, monkeypatch):
    """e4m3 x e4m3 on bf16 MMA, against the dequantized reference. Per tensor and per row x
    column the scales apply after the loop: e4m3 values are exact in bf16, so the product is the
    reference's within float32 sums, and (interpreted) the e4m3 route's bit for bit. Blocks: each
    K step's tiles times their scales, rounded to bf16 (kernels/_grouped_gemm.py,
    _dequantized_loop): within bf16's rounding. An expert with no rows, one with a single row,
    sizes off the tiles, rows past offs[-1]."""
    rows, k, n, num_experts, tail = case
    torch.manual_seed(1)
    qa, sa, qb, sb, _, _ = quantized_problem(rows, k, n, num_experts, mode, "cpu")
    offs = make_offs(rows, num_experts, tail)
    y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend=backend)
    deq = reference.grouped_mm(fp8.dequantize_fp8(qa, sa).double(), fp8.dequantize_fp8(qb, sb).double(), offs)
    exact = backend == "torch" or mode != "block"
    assert rel_err(y, deq) <= (1e-6 if exact else BF16) and not y[rows - tail:].any()
    bf16 = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, backend=backend)
    assert rel_err(bf16, deq) <= 2 * BF16
    if backend == "triton":
        assert no_e4m3_reached_a_kernel(sm80)
        monkeypatch.setattr(configs, "fp8_path", lambda arch: "e4m3")
        native = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend=backend)
        assert torch.equal(y, native) if exact else rel_err(y, native) <= BF16


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["tensor", "rowcol", "block"])
def test_weight_only_fused_gemms(mode, backend, sm80):
    """bf16 x times e4m3 w (b_scale alone): GEMM 1 gathering with SwiGLU, GEMM 2 scattering with
    the router weights, against the reference on the dequantized weights (x unquantized)."""
    torch.manual_seed(2)
    num_tokens, top_k, num_experts, hidden, inter = 13, 2, 5, 256, 128
    plan = moekernels.plan_routing(make_ids(num_tokens, top_k, num_experts), num_experts, backend="torch")
    x = torch.randn(num_tokens, hidden).bfloat16()
    w1 = (torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter) / inter**0.5).bfloat16()
    gran = {"tensor": "tensor", "rowcol": "row", "block": (128, 128)}[mode]
    (q1, s1), (q2, s2) = (moekernels.quantize_fp8(w, gran, backend="torch") for w in (w1, w2))
    weights = torch.rand(num_tokens, top_k)
    common = dict(source_index=plan.source_index, top_k=top_k, backend=backend)
    h = gg.grouped_mm_fused(x, q1.transpose(1, 2), plan.expert_offsets, gather=True, activation="silu",
                            b_scale=s1.transpose(1, 2), **common)
    out = gg.grouped_mm_fused(h, q2.transpose(1, 2), plan.expert_offsets, scatter_weights=weights,
                              b_scale=s2.transpose(1, 2), **common)
    assert h.dtype == out.dtype == torch.bfloat16
    d1, d2 = (fp8.dequantize_fp8(q, s).transpose(1, 2) for q, s in ((q1, s1), (q2, s2)))
    want_h = reference.grouped_mm_fused(x.float(), d1, plan.expert_offsets, plan.source_index, top_k, True, "silu",
                                        None)
    want = reference.grouped_mm_fused(h.float(), d2, plan.expert_offsets, plan.source_index, top_k, False, "",
                                      weights)
    assert rel_err(h, want_h) <= BF16 and rel_err(out, want) <= BF16
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)


@pytest.mark.parametrize("backend", cpu_backends())
def test_fused_moe_keeps_bf16_tokens_on_e4m3_weights(backend, sm80, monkeypatch):
    """The layer on e4m3 experts runs weight-only there: within bf16's roundings (of h, of each
    pair's product, of the sum: 4e-3 seen) of the float32 reference (weights dequantized, tokens
    not quantized), which the w8a8 route, quantizing the tokens and h to e4m3, misses by 4x or
    more (4.3e-2 to 5.0e-2 seen). An expert with no tokens, one with a single pair."""
    torch.manual_seed(4)
    num_tokens, top_k, num_experts, hidden, inter = 11, 2, 5, 256, 128
    ids = make_ids(num_tokens, top_k, num_experts)
    x = torch.randn(num_tokens, hidden).bfloat16()
    w1 = torch.randn(num_experts, 2 * inter, hidden) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter) / inter**0.5
    (q1, s1), (q2, s2) = (moekernels.quantize_fp8(w, (128, 128), backend="torch") for w in (w1, w2))
    tw = torch.rand(num_tokens, top_k).softmax(-1)
    want = reference.fused_moe(x.float(), q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2)
    args = (x, q1, q2, tw, ids)
    kwargs = dict(w_gate_up_scale=s1, w_down_scale=s2, backend=backend)
    y = moekernels.fused_moe(*args, **kwargs)
    assert y.dtype == torch.bfloat16 and rel_err(y, want) <= 2 * BF16
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)
    monkeypatch.setattr(configs, "fp8_path", lambda arch: "e4m3")
    assert rel_err(moekernels.fused_moe(*args, **kwargs), want) > 8 * BF16


@pytest.mark.parametrize("backend", cpu_backends())
def test_lora_on_e4m3_experts_trains_weight_only(backend, sm80):
    """LoRA adapters on frozen e4m3 experts: the forward and the tokens', router weights' and
    adapters' gradients on the weight-only route, against the reference on the dequantized
    weights (float32 tokens: tf32 on a GPU, exact here)."""
    from test_lora import make_adapters

    torch.manual_seed(5)
    num_tokens, top_k, num_experts, hidden, inter = 9, 2, 4, 128, 128
    ids = make_ids(num_tokens, top_k, num_experts)
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    tw = torch.rand(num_tokens, top_k).softmax(-1).requires_grad_()
    (q1, s1), (q2, s2) = (moekernels.quantize_fp8(torch.randn(num_experts, n, k) / k**0.5, (128, 128),
                                                  backend="torch")
                          for n, k in ((2 * inter, hidden), (hidden, inter)))
    adapters = make_adapters(num_experts, hidden, inter, 4, 8, torch.float32, "cpu")
    lora = moekernels.ExpertsLoRA(*adapters, scale=0.5, scale2=2.0)
    kwargs = dict(w_gate_up_scale=s1, w_down_scale=s2, lora=lora)
    y = moekernels.fused_moe(x, q1, q2, tw, ids, backend=backend, **kwargs)
    want = reference.fused_moe(x, q1, q2, tw, ids, **kwargs)
    assert rel_err(y, want) <= 1e-5
    dy = torch.randn_like(y)
    params = (x, tw, *adapters)
    for g, w in zip(torch.autograd.grad(y, params, dy), torch.autograd.grad(want, params, dy)):
        assert rel_err(g, w) <= 1e-5
    assert backend == "torch" or no_e4m3_reached_a_kernel(sm80)


@needs_interpreter
def test_fp8_training_runs_on_decoded_e4m3(sm80, monkeypatch):
    """grouped_mm_fp8 (fprop, dgrad, wgrad) and fused_moe(precision="fp8") keep DeepSeek-V3's
    recipe there, every e4m3 operand decoded to bf16 in the kernels. grouped_mm_fp8: the e4m3
    route's results within the bf16 rounding of the block-scaled operands (fprop and dgrad; wgrad's
    per-tile scales apply in float32). The layer, whose h is quantized to e4m3 again (one e4m3 ulp
    is 2**-4: 1.8e-2 apart from the e4m3 route seen), within test_fp8_training's bounds of the
    high-precision layer, as the e4m3 route is."""
    from test_fp8_training import calc_diff

    def gemm():
        x, w, offs = fp8_problem((0, 1, 130, 7, 200), 256, 128, "cpu")
        y = fp8.grouped_mm_fp8(x, w, offs, backend="triton")
        return (y.detach(), *torch.autograd.grad(y, (x, w), torch.ones_like(y).cumsum(-1).sin()))

    def layer(**kwargs):
        xs, w1, w2, tw, ids = moe_problem(21, 256, 128, 4, 2, "cpu")
        y = moekernels.fused_moe(xs, w1, w2, tw, ids, **kwargs)
        return (y.detach(), *torch.autograd.grad(y, (xs, w1, w2, tw), torch.ones_like(y).cumsum(-1).cos()))

    got_gemm, got_layer = gemm(), layer(precision="fp8", backend="triton")
    assert no_e4m3_reached_a_kernel(sm80)
    high = layer(backend="torch")
    for i, (a, b) in enumerate(zip(got_layer, high)):
        assert calc_diff(a, b) <= (3e-3 if i == 0 else 6e-3), i
    monkeypatch.setattr(configs, "fp8_path", lambda arch: "e4m3")
    for i, (a, b) in enumerate(zip(got_gemm, gemm())):
        assert rel_err(a, b) <= BF16, i


def test_weight_only_has_no_backward():
    qb = torch.zeros(2, 64, 128, dtype=FP8).transpose(1, 2)
    x = torch.randn(4, 128, requires_grad=True)
    y = gg.grouped_mm_fused(x, qb, torch.tensor([2, 4], dtype=torch.int32), b_scale=torch.ones(2, 1, 1),
                            backend="torch")
    with pytest.raises(NotImplementedError, match="inference-only"):
        y.sum().backward()


@pytest.mark.gpu
def test_gpu_byte_route_on_a_real_compiler(monkeypatch):
    """On any GPU (an H100 too: the route is forced), the byte kernels compiled: quantize bit-exact,
    the block GEMM within bf16's rounding of the dequantized product, the layer weight-only."""
    monkeypatch.setattr(configs, "fp8_path", lambda arch: "bytes")
    torch.manual_seed(0)
    x = make_non_finite((300, 260), torch.float32, "cuda")
    q, scale = moekernels.quantize_fp8(x, (1, 128), backend="triton")
    from test_fp8 import check_non_finite

    check_non_finite(x, q, scale, 1, 128, False)
    qa, sa, qb, sb, _, _ = quantized_problem(300, 512, 256, 8, "block", "cuda")
    offs = make_offs(300, 8, 5, "cuda")
    y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend="triton")
    deq = reference.grouped_mm(fp8.dequantize_fp8(qa, sa).double(), fp8.dequantize_fp8(qb, sb).double(), offs)
    assert rel_err(y, deq) <= BF16
    ids = make_ids(64, 4, 8, device="cuda")
    hidden = torch.randn(64, 512, device="cuda").bfloat16()
    (q1, s1), (q2, s2) = (moekernels.quantize_fp8(torch.randn(8, n, k, device="cuda") / k**0.5, (128, 128))
                          for n, k in ((512, 512), (512, 256)))
    tw = torch.rand(64, 4, device="cuda").softmax(-1)
    got = moekernels.fused_moe(hidden, q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2, backend="triton")
    want = reference.fused_moe(hidden.float(), q1, q2, tw, ids, w_gate_up_scale=s1, w_down_scale=s2)
    assert rel_err(got, want) <= 2 * BF16


# The sm_80 compile of every fp8 variant as bytes (no e4m3 in the PTX, bf16 mma.sync) is the
# compile matrix's: tests/test_arch_matrix.py::test_fp8_without_e4m3_mma_runs_on_bytes.
