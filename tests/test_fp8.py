"""FP8: quantize_fp8 bit-exact against the reference, and the scaled GEMMs against the dequantized
product and the original bf16 one (DeepGEMM's calc_diff)."""

import pytest
import torch
from conftest import cpu_backends, device_backends, gpu_backends, rel_err
from test_grouped_gemm import make_offs
from test_plan import make_ids

import moekernels
from moekernels import fp8, reference
from moekernels import grouped_gemm as gg

FP8 = torch.float8_e4m3fn
GRANULARITIES = ["tensor", "row", "col", (1, 128), (128, 128), (1, 16), (32, 64)]
# (shape): a tail in both dims (300 rows of 128-row blocks, 260 columns of 128), a batch dim
# (experts), one row, and fewer columns than one block.
SHAPES = [(300, 260), (3, 130, 384), (1, 7), (17, 128)]


def gran_id(g):
    return g if isinstance(g, str) else "{}x{}".format(*g)


def make_x(shape, dtype, device):
    """Random values over a wide range, one all-zero row (an all-zero block for row-wise scales)
    and one channel 100x larger than the rest (an outlier)."""
    x = torch.randn(shape, device=device) * torch.logspace(-3, 1, shape[-1], device=device)
    x[..., 0, :] = 0
    x[..., -1] *= 100
    return x.to(dtype)


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype == FP8 else torch.equal(a, b)


def calc_diff(x, y):
    """DeepGEMM's calc_diff: 1 - cosine similarity-like ratio, ~ rel_err**2 / 2."""
    x, y = x.double(), y.double()
    return (1 - 2 * (x * y).sum() / (x * x + y * y).sum()).item()


# ----------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("pow2", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=gran_id)
def test_quantize_is_bit_exact(granularity, shape, dtype, pow2, device, backend):
    x = make_x(shape, dtype, device)
    q, scale = moekernels.quantize_fp8(x, granularity, pow2_scale=pow2, backend=backend)
    br, bc = fp8.block_shape(granularity, shape[-2], shape[-1])
    want_q, want_s = reference.quantize_fp8(x.cpu(), (br, bc), pow2_scale=pow2)
    assert q.dtype == FP8 and q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == (*shape[:-2], -(-shape[-2] // br), -(-shape[-1] // bc))
    assert same_bits(scale.cpu(), want_s) and same_bits(q.cpu(), want_q)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=gran_id)
def test_quantize_values(granularity, backend):
    """scale = max(amax, 1e-12) / 448 per block, q * scale ~ x, all-zero blocks finite and zero."""
    x = make_x((2, 200, 300), torch.float32, "cpu")
    q, scale = moekernels.quantize_fp8(x, granularity, backend=backend)
    br, bc = fp8.block_shape(granularity, 200, 300)
    pad = torch.zeros(2, -(-200 // br) * br, -(-300 // bc) * bc)
    pad[:, :200, :300] = x.abs()
    amax = pad.view(2, pad.shape[1] // br, br, pad.shape[2] // bc, bc).amax(dim=(2, 4))
    assert torch.equal(scale, amax.clamp(min=1e-12) / 448)
    assert scale.isfinite().all() and (scale > 0).all()
    assert rel_err(fp8.dequantize_fp8(q, scale), x) <= 2**-4  # e4m3 keeps 3 mantissa bits
    if granularity in ("row", (1, 128), (1, 16)):
        assert not q[:, 0].float().any()  # the all-zero row quantizes to zeros


def make_non_finite(shape, dtype, device):
    """make_x with a NaN, a -NaN, an inf and a -inf in four places of the first matrix (the
    last three in the last row or column: the block tails); the other matrices finite."""
    x = make_x(shape, dtype, device)
    for (r, c), v in zip([(1, 3), (-1, 5), (shape[-2] // 2, -1), (-1, -1)],
                         [float("nan"), -float("nan"), float("inf"), -float("inf")]):
        x.view(-1, *shape[-2:])[0, r, c] = v
    return x


def check_non_finite(x, q, scale, br, bc, pow2):
    """Blocks holding a NaN or an inf: scale the canonical NaN and every q NaN; the other blocks
    bit-exact against the reference."""
    rows, cols = x.shape[-2:]
    pad = torch.zeros(*x.shape[:-2], -(-rows // br) * br, -(-cols // bc) * bc, dtype=torch.bool)
    pad[..., :rows, :cols] = ~x.cpu().isfinite()
    bad = pad.view(*x.shape[:-2], pad.shape[-2] // br, br, pad.shape[-1] // bc, bc).any(-1).any(-2)
    assert bad.any() and not bad.all()  # both kinds of block are checked
    scale, q = scale.cpu(), q.cpu()
    assert torch.equal(scale.view(torch.int32) == 0x7FC00000, bad)
    bad_values = bad.repeat_interleave(br, -2).repeat_interleave(bc, -1)[..., :rows, :cols]
    assert torch.equal(q.float().isnan(), bad_values)
    want_q, want_s = reference.quantize_fp8(x.cpu(), (br, bc), pow2_scale=pow2)
    assert torch.equal(scale.view(torch.int32), want_s.view(torch.int32))  # equal bits, NaN included
    assert same_bits(q[~bad_values], want_q[~bad_values])


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("pow2", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=gran_id)
def test_non_finite_blocks_quantize_to_nan(granularity, pow2, device, backend):
    """NaN and inf are data errors: their block's scale and values become NaN on every backend
    (the compiled max drops NaN; the kernels must not). 2 x 300 x 260 runs "tensor" and "col" in
    two passes (atomic_max of the block maxima), the others in one."""
    x = make_non_finite((2, 300, 260), torch.float32, device)
    q, scale = moekernels.quantize_fp8(x, granularity, pow2_scale=pow2, backend=backend)
    check_non_finite(x, q, scale, *fp8.block_shape(granularity, 300, 260), pow2)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_non_finite_tokens_quantize_to_nan_1x128(dtype, device, backend):
    """The (1, 128) path of every backend, csrc/quantize.cu included on the GPU, alone and
    fused with the gather."""
    num_tokens, top_k, num_experts, hidden = 13, 2, 4, 384
    x = make_non_finite((num_tokens, hidden), dtype, device)
    check_non_finite(x, *moekernels.quantize_fp8(x, (1, 128), backend=backend), 1, 128, False)
    plan = moekernels.plan_routing(make_ids(num_tokens, top_k, num_experts, device=device), num_experts,
                                   backend="torch")
    xs = moekernels.permute(x, plan, backend="torch")
    check_non_finite(xs, *fp8.quantize_fp8_gathered(x, plan, backend=backend), 1, 128, False)


@pytest.mark.parametrize("backend", cpu_backends())
def test_pow2_scales_are_powers_of_two_that_cover_amax(backend):
    x = make_x((64, 256), torch.bfloat16, "cpu")
    q, scale = moekernels.quantize_fp8(x, (1, 128), pow2_scale=True, backend=backend)
    mantissa = scale.view(torch.int32) & 0x7FFFFF
    assert not mantissa.any()
    plain = moekernels.quantize_fp8(x, (1, 128), backend="torch")[1]
    assert (scale >= plain).all() and (scale < 2 * plain).all()


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("granularity,transposed", [("row", "col"), ((128, 128), (128, 128)), ((1, 128), (128, 1))])
def test_transposes_compose(granularity, transposed, backend):
    """Quantizing an [N, K] weight, then transposing q and scale, is the transposed granularity of
    the logical [K, N] matrix, bit for bit."""
    w = make_x((4, 192, 256), torch.bfloat16, "cpu")
    q, scale = moekernels.quantize_fp8(w, granularity, backend=backend)
    qt, st = moekernels.quantize_fp8(w.transpose(-1, -2), transposed, backend=backend)
    assert same_bits(q.transpose(-1, -2).contiguous(), qt) and same_bits(scale.transpose(-1, -2).contiguous(), st)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("layout", fp8.SCALE_LAYOUTS)
def test_quantize_fused_with_the_gather(layout, device, backend):
    num_tokens, top_k, num_experts, hidden = 13, 3, 6, 384
    ids = make_ids(num_tokens, top_k, num_experts, device=device)
    plan = moekernels.plan_routing(ids, num_experts, backend="torch")
    x = make_x((num_tokens, hidden), torch.bfloat16, device)
    q, scale = fp8.quantize_fp8_gathered(x, plan, scale_layout=layout, backend=backend)
    want_q, want_s = moekernels.quantize_fp8(moekernels.permute(x, plan, backend="torch"), (1, 128), backend="torch")
    assert same_bits(q, want_q) and same_bits(scale, want_s)
    assert scale.stride() == ((1, scale.shape[0]) if layout == "col_major" else (scale.shape[1], 1))


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("shape", [(3, 130, 384), (300, 260)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("granularity", GRANULARITIES, ids=gran_id)
def test_col_major_scales_are_the_same_bits(granularity, shape, device, backend):
    """scale_layout="col_major": the same q and scale bits, the scale stored [..., nbc, nbr]
    (a transposed view of a contiguous tensor), on the one-pass and two-pass kernels."""
    x = make_x(shape, torch.bfloat16, device)
    q, scale = moekernels.quantize_fp8(x, granularity, scale_layout="col_major", backend=backend)
    want_q, want_s = moekernels.quantize_fp8(x, granularity, backend="torch")
    assert want_s.is_contiguous() and scale.transpose(-1, -2).is_contiguous() and scale.shape == want_s.shape
    assert same_bits(q, want_q) and same_bits(scale, want_s)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_col_major_scales_1x128(backend):
    """csrc/quantize.cu and the Triton kernel write column-major (1, 128) scales, bit for bit."""
    x = make_x((300, 7168), torch.bfloat16, "cuda")
    q, scale = moekernels.quantize_fp8(x, (1, 128), scale_layout="col_major", backend=backend)
    want_q, want_s = moekernels.quantize_fp8(x, (1, 128), backend="torch")
    assert scale.stride() == (1, 300) and same_bits(q, want_q) and same_bits(scale, want_s)


# ----------------------------------------------------------------------------- GEMMs


def quantized_problem(rows, k, n, num_experts, mode, device, *, outliers=False):
    """x [M, K] and an nn.Linear-layout weight [E, N, K] in bf16, quantized for ``mode``: the fp8
    operands, their scales (b's for the logical [E, K, N]) and the bf16 originals."""
    x = torch.randn(rows, k, device=device)
    if outliers:  # a few channels 100x larger: what per-tensor scaling handles worst
        x[:, torch.randperm(k)[:4]] *= 100
    x = x.bfloat16()
    w = (torch.randn(num_experts, n, k, device=device) / k**0.5).bfloat16()
    ga, gb = {"tensor": ("tensor", "tensor"), "rowcol": ("row", "row"), "block": ((1, 128), (128, 128))}[mode]
    qa, sa = moekernels.quantize_fp8(x, ga, backend="torch")
    qb, sb = moekernels.quantize_fp8(w, gb, backend="torch")
    return qa, sa, qb.transpose(1, 2), sb.transpose(1, 2), x, w.transpose(1, 2)


MODES = ["tensor", "rowcol", "block"]


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", [(50, 256, 192, 3, 3), (9, 128, 72, 5, 0), (130, 384, 128, 4, 1)],
                         ids=lambda c: "M{}_K{}_N{}_E{}_tail{}".format(*c))
def test_fp8_grouped_mm_matches_the_dequantized_product(case, mode, device, backend):
    rows, k, n, num_experts, tail = case
    qa, sa, qb, sb, x, w = quantized_problem(rows, k, n, num_experts, mode, device)
    offs = make_offs(rows, num_experts, tail, device)
    y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, backend=backend)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    deq = reference.grouped_mm(fp8.dequantize_fp8(qa, sa).double().cpu(), fp8.dequantize_fp8(qb, sb).double().cpu(),
                               offs.cpu())
    assert rel_err(y, deq) <= 1e-2
    assert not y[rows - tail:].any()
    original = reference.grouped_mm(x.double().cpu(), w.double().cpu(), offs.cpu())
    if mode == "block":
        assert calc_diff(y, original) <= 1e-3


@pytest.mark.parametrize("backend", cpu_backends())
def test_block_scaling_beats_per_tensor_on_outlier_channels(backend):
    rows, k, n, num_experts = 64, 512, 128, 2
    diffs = {}
    for mode in ("tensor", "block"):
        torch.manual_seed(7)  # the same inputs for both modes
        qa, sa, qb, sb, x, w = quantized_problem(rows, k, n, num_experts, mode, "cpu", outliers=True)
        offs = make_offs(rows, num_experts)
        y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, backend=backend)
        diffs[mode] = calc_diff(y, reference.grouped_mm(x.double(), w.double(), offs))
    assert diffs["block"] <= 1e-3 and diffs["block"] < diffs["tensor"], diffs


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("case", [(50, 256, 192, 3, 3), (130, 384, 128, 4, 1), (1, 128, 128, 2, 0)],
                         ids=lambda c: "M{}_K{}_N{}_E{}_tail{}".format(*c))
def test_fp8_grouped_mm_takes_col_major_activation_scales(case, device, backend):
    """The (1, 128) activation scales in either layout: the same product, bit for bit (only the
    scale addresses differ), within 1e-2 of the dequantized product."""
    rows, k, n, num_experts, tail = case
    qa, sa, qb, sb, x, w = quantized_problem(rows, k, n, num_experts, "block", device)
    sa_col = sa.t().contiguous().t()
    offs = make_offs(rows, num_experts, tail, device)
    y = moekernels.fp8_grouped_mm(qa, sa_col, qb, sb, offs, out_dtype=torch.float32, backend=backend)
    assert torch.equal(y, moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend=backend))
    deq = reference.grouped_mm(fp8.dequantize_fp8(qa, sa).double().cpu(), fp8.dequantize_fp8(qb, sb).double().cpu(),
                               offs.cpu())
    assert rel_err(y, deq) <= 1e-2


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode,layout", [(m, "row_major") for m in MODES] + [("block", "col_major")])
def test_fp8_mm_dense(mode, layout, backend):
    qa, sa, qb, sb, x, w = quantized_problem(40, 256, 96, 1, mode, "cpu")
    if layout == "col_major":
        sa = sa.t().contiguous().t()
    y = moekernels.fp8_mm(qa, sa, qb[0], sb[0], out_dtype=torch.float32, backend=backend)
    deq = fp8.dequantize_fp8(qa, sa).double() @ fp8.dequantize_fp8(qb[0], sb[0]).double()
    assert y.dtype == torch.float32 and rel_err(y, deq) <= 1e-2


@pytest.mark.parametrize("device,backend", [p for p in device_backends(cuda=False) if p.values[1] == "triton"])
def test_fp8_mm_weight_descriptor_is_well_formed(device, backend, monkeypatch):
    """fp8_mm's b is the transposed view of an [N, K] weight; as the one expert of a 3-D TMA
    descriptor over its [1, N, K] storage, every stride must cover the dims inside it (the view's
    own outer stride, K, does not)."""
    from triton.tools import tensor_descriptor

    made = []

    class Recording(tensor_descriptor.TensorDescriptor):
        def __init__(self, base, shape, strides, block_shape, *args, **kwargs):
            made.append((list(shape), list(strides)))
            super().__init__(base, shape, strides, block_shape, *args, **kwargs)

    monkeypatch.setattr(tensor_descriptor, "TensorDescriptor", Recording)
    qa, sa, qb, sb, _, _ = quantized_problem(40, 256, 96, 1, "block", device)
    y = moekernels.fp8_mm(qa, sa, qb[0], sb[0], out_dtype=torch.float32, backend=backend)
    offs = torch.tensor([40], dtype=torch.int32, device=device)
    assert torch.equal(y, moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend=backend))
    weights = [(shape, strides) for shape, strides in made if len(shape) == 3]
    assert weights and all(shape == [1, 96, 256] for shape, _ in weights), made
    for shape, strides in weights:
        assert strides[2] == 1 and strides[1] >= shape[2] and strides[0] >= shape[1] * strides[1], (shape, strides)


# ----------------------------------------------------------------------------- prepared weights


def kmajor(q):
    """The transposed view of a contiguous tensor: what wgmma reads e4m3 weights as."""
    return q.transpose(-1, -2).is_contiguous()


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("granularity", ["tensor", "col", (128, 128)], ids=gran_id)
@pytest.mark.parametrize("shape,storage", [((3, 260, 130), "ekn"), ((3, 260, 130), "enk"), ((200, 72), "ekn")],
                         ids=["ekn", "enk", "2d"])
def test_prepare_weight_is_the_quantized_storage_transposed(shape, storage, granularity, device, backend):
    """q, scale of the logical [.., K, N] (either storage): the bits quantize_fp8 gives the
    [.., N, K] storage with the transposed granularity, transposed; q K-major."""
    w_nk = make_x((*shape[:-2], shape[-1], shape[-2]), torch.bfloat16, device)  # [.., N, K]
    w = w_nk.transpose(-1, -2) if storage == "enk" else w_nk.transpose(-1, -2).contiguous()
    q, scale = fp8.prepare_weight(w, granularity, backend=backend)
    on_storage = {"tensor": "tensor", "col": "row"}.get(granularity, granularity) if isinstance(granularity, str) \
        else granularity
    want_q, want_s = moekernels.quantize_fp8(w_nk, on_storage, backend="torch")
    assert kmajor(q) and q.shape == w.shape
    assert same_bits(q, want_q.transpose(-1, -2)) and same_bits(scale, want_s.transpose(-1, -2))
    # ... and the logical matrix's own quantization (a block's scale does not depend on its orientation).
    logical_q, logical_s = moekernels.quantize_fp8(w.contiguous(), granularity, backend="torch")
    assert same_bits(q, logical_q) and same_bits(scale, logical_s)


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("mode", MODES)
def test_fp8_grouped_mm_on_prepared_weights(mode, device, backend):
    """A contiguous [E, K, N] weight, prepared once: the product of quantizing its [E, N, K]
    transpose and passing the transposed views, bit for bit; fp8_mm likewise on [K, N]."""
    rows, k, n, num_experts, tail = 50, 256, 192, 3, 3
    qa, sa, qb, sb, _, w = quantized_problem(rows, k, n, num_experts, mode, device)
    offs = make_offs(rows, num_experts, tail, device)
    granularity = {"tensor": "tensor", "rowcol": "col", "block": (128, 128)}[mode]
    pq, ps = fp8.prepare_weight(w.contiguous(), granularity, backend=backend)  # w: the bf16 [E, K, N]
    y = moekernels.fp8_grouped_mm(qa, sa, pq, ps, offs, out_dtype=torch.float32, backend=backend)
    assert torch.equal(y, moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, out_dtype=torch.float32, backend=backend))
    pq, ps = fp8.prepare_weight(w[0].contiguous(), granularity, backend=backend)
    y = moekernels.fp8_mm(qa, sa, pq, ps, out_dtype=torch.float32, backend=backend)
    assert torch.equal(y, moekernels.fp8_mm(qa, sa, qb[0], sb[0], out_dtype=torch.float32, backend=backend))


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
def test_prepare_weight_of_an_fp8_weight_transposes_its_bytes(device, backend):
    """An fp8 [E, K, N] weight quantized as stored (N inner): prepare_weight(q, scale=s) copies its
    bytes K-major once, scales untouched, and the GEMM takes it (an N-major one it refuses)."""
    rows, k, n, num_experts = 40, 256, 128, 2
    qa, sa, _, _, _, w = quantized_problem(rows, k, n, num_experts, "block", device)
    q_kn, s_kn = moekernels.quantize_fp8(w.contiguous(), (128, 128), backend="torch")  # N-major
    pq, ps = fp8.prepare_weight(q_kn, scale=s_kn)
    assert kmajor(pq) and same_bits(pq, q_kn) and ps is s_kn
    assert fp8.prepare_weight(pq, scale=ps)[0].data_ptr() == pq.data_ptr()  # already K-major: no copy
    offs = make_offs(rows, num_experts, 1, device)
    y = moekernels.fp8_grouped_mm(qa, sa, pq, ps, offs, out_dtype=torch.float32, backend=backend)
    deq = reference.grouped_mm(fp8.dequantize_fp8(qa, sa).double().cpu(),
                               fp8.dequantize_fp8(q_kn, s_kn).double().cpu(), offs.cpu())
    assert rel_err(y, deq) <= 1e-5
    with pytest.raises(ValueError, match="prepare_weight"):
        moekernels.fp8_grouped_mm(qa, sa, q_kn, s_kn, offs, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_n_major_fp8_weight_is_rejected_naming_prepare_weight(backend):
    """The kernel has no N-major e4m3 path (issue 13, item 3: it was a transpose through shared
    memory every K step): fp8_grouped_mm, fp8_mm, the fused op and the launcher itself refuse a
    contiguous [E, K, N] fp8 weight, with the fix in the message, on every backend."""
    qa, sa, qb, sb, _, _ = quantized_problem(16, 256, 128, 2, "block", "cpu")
    offs = torch.tensor([5, 16], dtype=torch.int32)
    n_major = qb.contiguous()
    calls = {
        "fp8_grouped_mm": lambda: moekernels.fp8_grouped_mm(qa, sa, n_major, sb, offs, backend=backend),
        "fp8_mm": lambda: moekernels.fp8_mm(qa, sa, n_major[0], sb[0], backend=backend),
        "grouped_mm_fused": lambda: gg.grouped_mm_fused(qa, n_major, offs, a_scale=sa, b_scale=sb, backend=backend),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"K-major.*prepare_weight") as err:
            call()
        assert ("[N, K]" if name == "fp8_mm" else "[E, N, K]") in str(err.value), name
    w1, s1 = moekernels.quantize_fp8(torch.randn(2, 256, 256), (128, 128), backend="torch")
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # [E, 2I, H] stored H outer: N-major for the GEMM
    w2, s2 = moekernels.quantize_fp8(torch.randn(2, 256, 128), (128, 128), backend="torch")
    with pytest.raises(ValueError, match=r"w_gate_up must be stored with its last dim contiguous.*prepare_weight"):
        moekernels.fused_moe(torch.randn(16, 256), w1, w2, torch.rand(16, 1), torch.zeros(16, 1, dtype=torch.int32),
                             w_gate_up_scale=s1, w_down_scale=s2, backend=backend)
    out = torch.empty(16, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"K-major.*prepare_weight"):  # the launch, under every entry point
        gg._launch(qa, n_major, offs, out, variant="plain", rows=16, scales=(3, sa, sb))


def test_prepare_weight_bad_input():
    w = torch.randn(2, 256, 128)
    with pytest.raises(ValueError, match="granularity"):  # "row" of [K, N] is per K: no GEMM takes it
        fp8.prepare_weight(w, "row")
    with pytest.raises(ValueError, match="granularity"):
        fp8.prepare_weight(w, (1, 128))
    with pytest.raises(ValueError, match="scale is required"):
        fp8.prepare_weight(w.to(FP8))
    with pytest.raises(ValueError, match="scale goes with"):
        fp8.prepare_weight(w, scale=torch.ones(2, 2, 1))
    with pytest.raises(TypeError, match="w"):
        fp8.prepare_weight(w.int())
    with pytest.raises(ValueError, match="w must be"):
        fp8.prepare_weight(torch.randn(256))


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("layout", fp8.SCALE_LAYOUTS)
def test_fp8_moe_path(layout, device, backend):
    """The w8a8 block path of the MoE layer: tokens quantized (1, 128) once, GEMM 1 gathers their
    fp8 rows and scales with SwiGLU in its epilogue, h quantized (1, 128), GEMM 2 scatters with
    the router weights; against the same composition on the dequantized operands."""
    num_tokens, top_k, num_experts, hidden, inter = 11, 2, 5, 256, 128
    ids = make_ids(num_tokens, top_k, num_experts, device=device)
    plan = moekernels.plan_routing(ids, num_experts, backend="torch")
    x = torch.randn(num_tokens, hidden, device=device).bfloat16()
    w1 = (torch.randn(num_experts, 2 * inter, hidden, device=device) / hidden**0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device=device) / inter**0.5).bfloat16()
    weights = torch.rand(num_tokens, top_k, device=device)
    qx, sx = moekernels.quantize_fp8(x, (1, 128), scale_layout=layout, backend=backend)
    q1, s1 = moekernels.quantize_fp8(w1, (128, 128), backend=backend)
    q2, s2 = moekernels.quantize_fp8(w2, (128, 128), backend=backend)
    common = dict(source_index=plan.source_index, top_k=top_k, backend=backend)
    h = gg.grouped_mm_fused(qx, q1.transpose(1, 2), plan.expert_offsets, gather=True, activation="silu",
                            a_scale=sx, b_scale=s1.transpose(1, 2), **common)
    qh, sh = moekernels.quantize_fp8(h, (1, 128), scale_layout=layout, backend=backend)
    out = gg.grouped_mm_fused(qh, q2.transpose(1, 2), plan.expert_offsets, scatter_weights=weights, a_scale=sh,
                              b_scale=s2.transpose(1, 2), **common)
    deq = {name: fp8.dequantize_fp8(q, s) for name, q, s in (("x", qx, sx), ("h", qh, sh))}
    want_h = gg.grouped_mm_fused(deq["x"], fp8.dequantize_fp8(q1, s1).transpose(1, 2), plan.expert_offsets,
                                 gather=True, activation="silu", **common)
    want = gg.grouped_mm_fused(deq["h"], fp8.dequantize_fp8(q2, s2).transpose(1, 2), plan.expert_offsets,
                               scatter_weights=weights, **common)
    assert rel_err(h, want_h) <= 1e-2 and rel_err(out, want) <= 1e-2
    bf16 = gg.grouped_mm_fused(x.float(), w1.float().transpose(1, 2), plan.expert_offsets, gather=True,
                               activation="silu", **common)
    # h = silu(gate) * up multiplies two products, each with the block mode's error (<= 1e-3 in
    # calc_diff): their errors add, so twice the GEMM's bound.
    assert calc_diff(h, bf16) <= 2e-3


# ----------------------------------------------------------------------------- the custom ops


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    x = make_x((3, 40, 256), torch.bfloat16, "cpu")
    ops = torch.ops.moekernels
    torch.library.opcheck(ops.quantize_fp8.default, (x, 1, 128, False, None, None, 1, False, backend))
    torch.library.opcheck(ops.quantize_fp8.default, (x, 1, 128, False, None, None, 1, True, backend))  # col-major
    torch.library.opcheck(ops.quantize_fp8.default, (x, 40, 256, True, None, None, 1, False, backend))  # 2 passes
    qa, sa, qb, sb, _, _ = quantized_problem(24, 256, 64, 3, "block", "cpu")
    offs = make_offs(24, 3, 2)
    # test_schema compares the inputs before and after with arithmetic torch lacks for fp8 on the
    # CPU ("mul_cpu_reduced_float" for Float8_e4m3fn); the fake, autograd and dispatch checks run.
    torch.library.opcheck(ops.grouped_mm_fused.default,
                          (qa, qb, offs, offs.new_empty(0), 1, False, "", None, sa, sb, torch.bfloat16, backend),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("layout", fp8.SCALE_LAYOUTS)
def test_torch_compile_fullgraph(layout, backend):
    qa, sa, qb, sb, x, w = quantized_problem(30, 256, 64, 3, "block", "cpu")
    offs = make_offs(30, 3, 1)

    def layer(x, qb, sb, offs):
        qx, sx = moekernels.quantize_fp8(x, (1, 128), scale_layout=layout, backend=backend)
        return moekernels.fp8_grouped_mm(qx, sx, qb, sb, offs, backend=backend)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    assert torch.equal(compiled(x, qb, sb, offs), layer(x, qb, sb, offs))


# ----------------------------------------------------------------------------- bad input


def _bad_gemm_cases():
    qa, sa, qb, sb, _, _ = quantized_problem(16, 256, 64, 2, "block", "cpu")
    offs = torch.tensor([5, 16], dtype=torch.int32)
    qk, sk, qbk, sbk, _, _ = quantized_problem(16, 192, 64, 2, "block", "cpu")
    return [
        ("a", dict(a=qa.float()), TypeError),
        ("b", dict(b=qb.bfloat16()), TypeError),
        ("a_scale", dict(a_scale=sa.double()), TypeError),
        ("a_scale", dict(a_scale=sa[:, :1]), ValueError),
        ("b_scale", dict(b_scale=sb[:, :1]), ValueError),
        ("K % 128", dict(a=qk, a_scale=sk, b=qbk, b_scale=sbk), ValueError),
        ("b", dict(b=qb.to("meta")), ValueError),
        ("offs", dict(offs=offs.long()), TypeError),
        ("K mismatch", dict(b=qb[:, :128]), ValueError),
    ], dict(a=qa, a_scale=sa, b=qb, b_scale=sb, offs=offs)


CASES_BAD, BASE = _bad_gemm_cases()


@pytest.mark.parametrize("name,change,error", CASES_BAD, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES_BAD)])
def test_bad_gemm_input_names_the_argument(name, change, error):
    args = {**BASE, **change}
    with pytest.raises(error, match=name.replace("%", "%")):
        moekernels.fp8_grouped_mm(args["a"], args["a_scale"], args["b"], args["b_scale"], args["offs"])


@pytest.mark.parametrize("granularity,match", [((1, 100), "powers of two"), ("block", "granularity"),
                                               ((0, 128), "granularity"), ((1, 128, 1), "granularity")])
def test_bad_granularity(granularity, match):
    with pytest.raises(ValueError, match=match):
        moekernels.quantize_fp8(torch.randn(4, 256), granularity)


def test_fused_fp8_bad_input():
    qa, sa, qb, sb, _, _ = quantized_problem(16, 256, 192, 2, "block", "cpu")
    offs = torch.tensor([5, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="N % 128"):  # gate/up halves of 96 columns: up starts mid-block
        gg.grouped_mm_fused(qa, qb, offs, activation="silu", a_scale=sa, b_scale=sb)
    with pytest.raises(TypeError, match="x"):
        gg.grouped_mm_fused(qa.float(), qb, offs, a_scale=sa, b_scale=sb)
    with pytest.raises(TypeError, match="out_dtype"):
        gg.grouped_mm_fused(qa, qb, offs, a_scale=sa, b_scale=sb, out_dtype=torch.int32)


def test_bad_quantize_input():
    with pytest.raises(TypeError, match="x"):
        moekernels.quantize_fp8(torch.randn(4, 8).int(), "row")
    with pytest.raises(ValueError, match="x"):
        moekernels.quantize_fp8(torch.randn(8), "row")
    with pytest.raises(TypeError, match="dtype"):
        moekernels.quantize_fp8(torch.randn(4, 8), "row", dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="scale_layout"):
        moekernels.quantize_fp8(torch.randn(4, 8), "row", scale_layout="k_major")


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows_per_expert", [4, 1024])
def test_gpu_deepseek_shapes(mode, rows_per_expert):
    """DeepGEMM's grouped contiguous case shape (N 4096, K 7168), and decode."""
    num_experts, k, n = 8, 7168, 4096
    rows = rows_per_expert * num_experts
    qa, sa, qb, sb, x, w = quantized_problem(rows, k, n, num_experts, mode, "cuda")
    offs = make_offs(rows, num_experts, 0, "cuda")
    y = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, backend="triton")
    ref = moekernels.fp8_grouped_mm(qa, sa, qb, sb, offs, backend="torch")
    assert rel_err(y, ref) <= 1e-2
    if mode == "block":
        assert calc_diff(y, moekernels.grouped_mm(x, w, offs, backend="triton")) <= 1e-3


@pytest.mark.gpu
def test_gpu_quantize_cuda_graph():
    x = make_x((4096, 7168), torch.bfloat16, "cuda")
    want = moekernels.quantize_fp8(x, (1, 128), backend="torch")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        got = moekernels.quantize_fp8(x, (1, 128), backend="triton")
    graph.replay()
    torch.cuda.synchronize()
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


@pytest.mark.gpu
@pytest.mark.parametrize("pow2", [False, True], ids=["scale", "pow2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("hidden", [7168, 4098, 130, 100])  # 4098 and 130: no 4-column vectors; 100: one group
@pytest.mark.parametrize("backend", gpu_backends()[1:])  # cuda, where the extension is built
def test_gpu_cuda_quantize_matches_triton_bit_for_bit(backend, hidden, dtype, pow2):
    """csrc/quantize.cu against the Triton kernel and the reference: the same q and scale bits,
    alone and fused with the permute."""
    num_tokens, top_k, num_experts = 300, 8, 64
    x = make_x((num_tokens, hidden), dtype, "cuda")
    got = moekernels.quantize_fp8(x, (1, 128), pow2_scale=pow2, backend=backend)
    for other in ("triton", "torch"):
        want = moekernels.quantize_fp8(x, (1, 128), pow2_scale=pow2, backend=other)
        assert same_bits(got[0], want[0]) and same_bits(got[1], want[1]), other
    plan = moekernels.plan_routing(make_ids(num_tokens, top_k, num_experts, device="cuda"), num_experts)
    got = fp8.quantize_fp8_gathered(x, plan, pow2_scale=pow2, backend=backend)
    want = fp8.quantize_fp8_gathered(x, plan, pow2_scale=pow2, backend="triton")
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
