"""moekernels.topk_routing against its reference, on every backend this machine can run."""

import math

import pytest
import torch
from conftest import cpu_backends, device_backends, gpu_backends, rel_err
from test_plan import make_ids

import moekernels
from moekernels import reference

# name -> (E, top_k, keyword arguments); covers every mode of the op: softmax / sigmoid,
# with and without bias, groups with and without bias, renormalisation, scaling, odd E.
MODES = {
    "mixtral_softmax_e8_k2": (8, 2, dict(renormalize=True)),
    "softmax_e8_k8_all": (8, 8, dict(renormalize=True)),
    "qwen3_softmax_e128_k8": (128, 8, dict(renormalize=True)),
    "softmax_e60_k4_plain": (60, 4, dict()),
    "sigmoid_e64_k4": (64, 4, dict(scoring="sigmoid")),
    "softmax_bias_e60_k4": (60, 4, dict(bias=True, routed_scaling_factor=1.5)),
    # Triton's rows of 20 experts in 32 columns, CUDA's group-by-range path, under a softmax denominator
    "softmax_bias_groups_e160_k6": (160, 6, dict(bias=True, n_group=8, topk_group=3, renormalize=True)),
    "deepseek_v3_e256_k8": (
        256, 8, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4, renormalize=True, routed_scaling_factor=2.5)
    ),
    "deepseek_v2_e160_k6": (160, 6, dict(n_group=8, topk_group=3, routed_scaling_factor=16.0)),
    "sigmoid_groups_e96_k32_whole": (96, 32, dict(scoring="sigmoid", bias=True, n_group=3, topk_group=1)),
    "sigmoid_groups_e64_k3_nobias": (64, 3, dict(scoring="sigmoid", n_group=4, topk_group=2, renormalize=True)),
    "sigmoid_e128_k48_picks_stored": (128, 48, dict(scoring="sigmoid", renormalize=True, routed_scaling_factor=2.0)),
    "softmax_e200_k40_plain": (200, 40, dict()),
    "single_expert": (1, 1, dict()),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(num_tokens, num_experts, kwargs, dtype, device="cpu", *, seed=None):
    """Fresh random logits with planted exact ties (duplicated columns and rows), and a bias."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(num_tokens, num_experts, generator=gen) * 3
    if num_experts >= 4:
        x[:, num_experts - 1] = x[:, 1]  # same logit for a low and a high id: ties go low
        x[:, 2] = x[:, 0]
    if num_tokens >= 3:
        x[num_tokens - 1] = x[0]
    kw = dict(kwargs)
    if kw.pop("bias", False):
        bias = torch.randn(num_experts, generator=gen) * 0.1
        if num_experts >= 4:
            bias[num_experts - 1] = bias[1]
        kw["bias"] = bias.to(device)
    return x.to(dtype).to(device), kw


def backends_against_reference():
    """device_backends() but cpu-torch, whose op *is* reference.topk_routing (a comparison with
    the reference that cannot fail), plus the torch backend on a GPU, held to the CPU reference."""
    return [p for p in device_backends() if p.id != "cpu-torch"] + [
        pytest.param("cuda", "torch", marks=pytest.mark.gpu, id="cuda-torch")]


def assert_same_routing(out, ref):
    (w, ids), (w_ref, ids_ref) = out, ref
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert ids.shape == ids_ref.shape and w.shape == w_ref.shape
    assert torch.equal(ids.cpu(), ids_ref.cpu()), "expert ids differ"
    assert rel_err(w, w_ref) <= 1e-6


@pytest.mark.parametrize("device,backend", backends_against_reference())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(mode, dtype, device, backend):
    num_experts, top_k, kwargs = MODES[mode]
    # The interpreter is slow: 37 tokens cross several programs; on a GPU 5003 cross many.
    for num_tokens in (1, 37) if device == "cpu" else (1, 5003):
        logits, kw = make_inputs(num_tokens, num_experts, kwargs, dtype, device)
        out = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
        assert out[0].device == logits.device and out[1].device == logits.device
        assert_same_routing(out, reference.topk_routing(logits, top_k, **kw))
        if device != "cpu":  # the reference itself is device-independent, bit for bit
            cpu_kw = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in kw.items()}
            assert_same_routing(out, reference.topk_routing(logits.cpu(), top_k, **cpu_kw))


@pytest.mark.parametrize("backend", cpu_backends())
def test_strided_logits_and_empty_input(backend):
    num_experts, top_k, kwargs = MODES["deepseek_v3_e256_k8"]
    wide, kw = make_inputs(19, num_experts + 8, kwargs, torch.float32)
    logits = wide[:, :num_experts]  # row stride E + 8: read in place, not copied
    kw["bias"] = kw["bias"][:num_experts].contiguous()
    out = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    assert_same_routing(out, reference.topk_routing(logits.contiguous(), top_k, **kw))

    w, ids = moekernels.topk_routing(logits[:0], top_k, backend=backend, **kw)
    assert w.shape == (0, top_k) and ids.shape == (0, top_k) and ids.dtype == torch.int32


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_experts(backend):
    """-inf logits (experts a model masks out) stay eligible, and rank below every finite one."""
    logits, _ = make_inputs(21, 64, {}, torch.float32)
    logits[:, 40:] = float("-inf")
    logits[3, :] = float("-inf")
    logits[3, 5] = 0.0
    for kw in (dict(renormalize=True), dict(n_group=4, topk_group=3), dict(scoring="sigmoid", n_group=4, topk_group=2)):
        out = moekernels.topk_routing(logits, 30, backend=backend, **kw)
        assert_same_routing(out, reference.topk_routing(logits, 30, **kw))
        assert (out[1][:, :24] < 40).all()


@pytest.mark.parametrize("backend", cpu_backends())
def test_deterministic(backend):
    num_experts, top_k, kwargs = MODES["deepseek_v3_e256_k8"]
    logits, kw = make_inputs(23, num_experts, kwargs, torch.float32)
    w1, i1 = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    w2, i2 = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    assert torch.equal(i1, i2) and torch.equal(w1.view(torch.int32), w2.view(torch.int32))


# ----------------------------------------------------------------------------- adversarial logits

# A softmax row whose float64 denominator rounds either way (issue 22 item 1): exp(0) = 1 and
# exp_f32(MID) = 0.77880079 (an odd multiple of 2**-24) sum to 1.77880079, exactly between two
# float32, and ties go to the even one, the lower; two exps of TINY, 0.6 * 2**-53 each, lift a
# float64 sum over that tie where they meet each other before the 1.78 (each alone is under the
# half ulp there, 2**-53, together over it). reference.softmax_scores drops them (floor(e * 2**s),
# s <= 52: 0), so every backend takes the lower denominator. MID and TINY are exact in every
# logits dtype, and the rest of the row (-45 and below) is dropped too.
MID, TINY = -0.25, -37.25
ADVERSARIAL_KINDS = ("wide", "midpoint", "subnormal", "ties", "nonfinite", "extremes")


def adversarial_logits(num_tokens, num_experts, kind, gen):
    """[T, E] float32 logits of one kind: "wide" spans > 20 (up to ~100), "midpoint" rows of the
    denominator tie above at random places, "subnormal" float32 and float16 subnormals among
    zeros of both signs, "ties" a few values, "nonfinite" +-inf and NaN among finite logits (whole
    rows of them too), "extremes" the edges of exp_f32 (+-87, +-88) and of float32 (+-3e38)."""
    shape = (num_tokens, num_experts)
    if kind == "wide":
        return torch.randn(shape, generator=gen) * 25
    if kind == "midpoint":
        x = -45 - torch.rand(shape, generator=gen) * 40
        for row in x:
            a, b, c, d = torch.randperm(num_experts, generator=gen)[:4].tolist() + [0, 0, 0, 0][: max(0, 4 - num_experts)]
            row[[d, c]] = TINY
            row[b] = MID
            row[a] = 0.0
        return x
    pick = lambda values: torch.tensor(values)[torch.randint(0, len(values), shape, generator=gen)]
    if kind == "subnormal":
        return pick([1e-45, -1e-45, 1e-40, -3e-39, 0.0, -0.0, 6e-8, -6e-8, 3e-5, 1e-3])
    if kind == "ties":
        return pick([-1.0, 0.0, 0.0, 2.0])
    if kind == "extremes":
        return pick([-3e38, 3e38, -88.5, -87.5, -87.0, 87.0, 88.0, 88.5, -100.0, 0.0])
    x = torch.randn(shape, generator=gen) * 3
    x[torch.rand(shape, generator=gen) < 0.3] = NAN
    x[torch.rand(shape, generator=gen) < 0.15] = INF
    x[torch.rand(shape, generator=gen) < 0.15] = -INF
    x[:1] = NAN  # a row with no softmax
    x[1:2] = -INF
    return x


def near_gap_bias(logits, scoring, bias, gen, rows):
    """bias with experts moved within an ulp of another's choice: for a pair (i, j) of each row
    r of ``rows`` in turn (distinct j), bias[j] = score[r, i] + bias[i] - score[r, j] (float32),
    then -1, 0 or +1 ulp, so that one ulp of a score (a denominator rounded the other way)
    changes the ids. A row's first pair is its best expert and the one it scores least (a
    midpoint row's 1.0 and a dropped exp)."""
    bias = bias.clone()
    scores = reference.routing_scores(logits, scoring)
    free = torch.randperm(bias.shape[0], generator=gen).tolist()
    for n in range(bias.shape[0] // 2):
        r = rows[n % len(rows)]
        row = scores[r].nan_to_num(-1.0)
        i, j = (int(row.argmax()), int(row.argmin())) if n < len(rows) else (free[-1], free[0])
        if i == j or j not in free or i not in free:
            continue
        free.remove(i)
        free.remove(j)
        b = (scores[r, i] + bias[i]) - scores[r, j]
        step = int(torch.randint(-1, 2, (), generator=gen))
        for _ in range(abs(step)):
            b = b.nextafter(torch.tensor(INF if step > 0 else -INF))
        if b.isfinite():
            bias[j] = b
    return bias


def adversarial_inputs(num_experts, kwargs, dtype, device, seed, rows_per_kind=4):
    """Logits of every adversarial kind, rows_per_kind rows each, and (if kwargs asks for one)
    a bias near the score gaps of each kind's first row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([adversarial_logits(rows_per_kind, num_experts, kind, gen) for kind in ADVERSARIAL_KINDS])
    x = x.to(dtype)
    kw = dict(kwargs)
    if kw.pop("bias", False):
        kw["bias"] = near_gap_bias(x.float(), kw.get("scoring", "softmax"), torch.randn(num_experts, generator=gen) * 0.1,
                                   gen, rows=list(range(0, x.shape[0], rows_per_kind))).to(device)
    return x.to(device), kw


@pytest.mark.parametrize("device,backend", backends_against_reference())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_adversarial_logits_match_reference(mode, dtype, device, backend):
    """Every mode on logits of every adversarial kind (issue 22 item 17), with biases within an
    ulp of the score gaps: ids identical, weights NaN at the same places and equal to rounding."""
    num_experts, top_k, kwargs = MODES[mode]
    logits, kw = adversarial_inputs(num_experts, kwargs, dtype, device, seed=0)
    out = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    cpu_kw = {k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}
    assert_same_nonfinite_routing(out, reference.topk_routing(logits.cpu(), top_k, **cpu_kw))


DENOMINATOR_MODES = {  # (E, keyword arguments): every tile layout of the kernels
    "e64": (64, dict()),
    "e160_groups_of_20": (160, dict(n_group=8, topk_group=8)),  # Triton rows of 20 in 32; CUDA's range path
    "e256_groups_of_32": (256, dict(n_group=8, topk_group=8)),  # CUDA's aligned group path
    "e1000": (1000, dict()),
}


@pytest.mark.parametrize("device,backend", [pytest.param("cpu", "torch", id="cpu-torch"), *backends_against_reference()])
@pytest.mark.parametrize("mode", DENOMINATOR_MODES)
def test_softmax_bias_on_a_denominator_tie(mode, device, backend):
    """Issue 22 item 1: the midpoint rows above, with expert 0 (logit -1000, score 0) biased by
    1 / 1.7788009 (the higher denominator's score of the best expert), 1 ulp under its score
    1 / 1.7788008 by the lower one, which the specification takes. The best expert must win on
    every backend and wherever the row puts it: a sum that lifts the tie gives expert 0 the tie,
    and the tie goes to the lower id, 0."""
    num_experts, kw = DENOMINATOR_MODES[mode]
    gen = torch.Generator().manual_seed(0)
    x = -45 - torch.rand(24, num_experts, generator=gen) * 40  # dropped by the specification too
    x[:, 0] = -1000.0
    for row in x:
        best, mid, tiny1, tiny2 = (1 + torch.randperm(num_experts - 1, generator=gen)[:4]).tolist()
        row[best], row[mid], row[[tiny1, tiny2]] = 0.0, MID, TINY
    lo = torch.tensor(1.0) + reference.exp_f32(torch.tensor(MID))  # the tie rounds to the even side, down
    hi = lo.nextafter(torch.tensor(INF))
    bias = torch.zeros(num_experts)
    bias[0] = 1.0 / hi
    assert bias[0] == (1.0 / lo).nextafter(torch.tensor(0.0))  # 1 ulp apart
    w, ids = moekernels.topk_routing(x.to(device), 1, bias=bias.to(device), backend=backend, **kw)
    assert torch.equal(ids.cpu()[:, 0].long(), x.argmax(1))
    assert torch.equal(w.cpu()[:, 0], (1.0 / lo).expand(24))


# ----------------------------------------------------------------------------- the reference


def choose(choice, top_k, n_group=None, topk_group=None, pairs=False, pair_sum=lambda a, b: a + b):
    """The ids of the specification's choice, a list per token, from its choice values (lists):
    groups by their best value (``pairs``: the pair_sum of their best two), then the top_k
    largest eligible values, ties to the lower id."""
    ids = []
    for row in choice:
        eligible = range(len(row))
        if n_group:
            size = len(row) // n_group
            groups = [sorted(row[g * size:(g + 1) * size], reverse=True) for g in range(n_group)]
            gscore = [pair_sum(g[0], g[1]) if pairs else g[0] for g in groups]
            kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
            eligible = [e for e in eligible if e // size in kept]
        ids.append(sorted(eligible, key=lambda e: (-row[e], e))[:top_k])
    return ids


def oracle(logits, top_k, scoring="softmax", renormalize=False, bias=None, n_group=None, topk_group=None,
           routed_scaling_factor=1.0):
    """The op's specification, written out per token in float64 Python."""
    weights, all_scores, choice = [], [], []
    for row in logits.double().tolist():
        if scoring == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + math.exp(-v)) for v in row]
        all_scores.append(scores)
        choice.append([s + b for s, b in zip(scores, bias.tolist())] if bias is not None else list(row))
    ids = choose(choice, top_k, n_group, topk_group, pairs=bias is not None)
    for scores, chosen in zip(all_scores, ids):
        w = [scores[e] for e in chosen]
        if renormalize:
            w = [v / (sum(w) + 1e-20) for v in w]
        weights.append([v * routed_scaling_factor for v in w])
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(ids, dtype=torch.int32)


@pytest.mark.parametrize("mode", [m for m, (_, _, kw) in MODES.items()
                                  if not (kw.get("bias") and kw.get("scoring", "softmax") == "softmax")])
def test_reference_matches_the_specification(mode):
    """Integer logits and a bias on a 1/8 grid: many exact ties, and no near-tie that float32
    rounding could flip (softmax with a bias is left out: its choices near-tie at random)."""
    num_experts, top_k, kwargs = MODES[mode]
    kw = dict(kwargs)
    logits = torch.randint(-3, 4, (29, num_experts)).float()
    if kw.pop("bias", False):
        kw["bias"] = torch.randint(-2, 3, (num_experts,)).float() / 8
    w, ids = reference.topk_routing(logits, top_k, **kw)
    w_ref, ids_ref = oracle(logits, top_k, **kw)
    assert torch.equal(ids, ids_ref)
    assert rel_err(w, w_ref) <= 1e-6


def test_exp_f32_is_accurate():
    x = torch.cat([torch.linspace(-87, 88, 200_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    got = reference.exp_f32(x)
    want = torch.exp(x.double())
    ulp = (want.float().nextafter(torch.tensor(float("inf"))) - want.float()).double()
    assert ((got.double() - want).abs() / ulp).max() <= 2.0
    assert reference.exp_f32(torch.tensor(0.0)).item() == 1.0
    edges = reference.exp_f32(torch.tensor([float("-inf"), -100.0, 100.0, float("inf")]))
    assert edges.tolist() == [0.0, 0.0, float("inf"), float("inf")]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_routing_scores_match_torch(scoring):
    x = torch.randn(64, 160) * 4
    want = torch.softmax(x.double(), -1) if scoring == "softmax" else torch.sigmoid(x.double())
    assert rel_err(reference.routing_scores(x, scoring), want) <= 1e-6


# ----------------------------------------------------------------------------- autograd


def torch_autograd_weights(logits, ids, scoring, renormalize, scale):
    """topk_weights as differentiable torch ops, given the chosen ids."""
    x = logits.float()
    scores = torch.softmax(x, -1) if scoring == "softmax" else torch.sigmoid(x)
    w = scores.gather(1, ids.long())
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("mode", ["qwen3_softmax_e128_k8", "deepseek_v3_e256_k8", "softmax_e60_k4_plain",
                                  "sigmoid_e64_k4"])
def test_weights_gradient(mode, backend):
    num_experts, top_k, kwargs = MODES[mode]
    logits, kw = make_inputs(13, num_experts, kwargs, torch.float32)
    logits.requires_grad_(True)
    w, ids = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    grad_out = torch.randn_like(w)
    (grad,) = torch.autograd.grad((w * grad_out).sum(), logits)

    x = logits.detach().clone().requires_grad_(True)
    w_ref = torch_autograd_weights(x, ids, kw.get("scoring", "softmax"), kw.get("renormalize", False),
                                   kw.get("routed_scaling_factor", 1.0))
    (grad_ref,) = torch.autograd.grad((w_ref * grad_out).sum(), x)
    assert rel_err(grad, grad_ref) <= 1e-5


def test_weights_gradient_low_precision():
    logits = (torch.randn(9, 128) * 2).bfloat16().requires_grad_(True)
    w, ids = moekernels.topk_routing(logits, 8, renormalize=True)
    (grad,) = torch.autograd.grad((w * w).sum(), logits)
    assert grad.dtype == torch.bfloat16
    x = logits.detach().float().requires_grad_(True)
    w_ref = torch_autograd_weights(x, ids, "softmax", True, 1.0)
    (grad_ref,) = torch.autograd.grad((w_ref * w_ref).sum(), x)
    assert rel_err(grad, grad_ref) <= 1e-2  # bf16 rounding of the gradient: 2**-8


# ----------------------------------------------------------------------------- the custom op


@pytest.mark.parametrize("backend", cpu_backends())
def test_opcheck(backend):
    logits, kw = make_inputs(11, 64, dict(bias=True), torch.float32)
    logits.requires_grad_(True)
    args = (logits, 6, "sigmoid", True, kw["bias"], 4, 2, 2.5, backend)
    torch.library.opcheck(torch.ops.moekernels.topk_routing.default, args)


@pytest.mark.parametrize("backend", cpu_backends())
def test_torch_compile_fullgraph(backend):
    num_experts, top_k, kwargs = MODES["deepseek_v3_e256_k8"]

    def layer(x, bias):
        w, ids = moekernels.topk_routing(x, top_k, backend=backend, **{**kwargs, "bias": bias})
        return (w * w).sum(), ids

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=True)
    for num_tokens in (5, 17):
        logits, kw = make_inputs(num_tokens, num_experts, kwargs, torch.float32)
        x1 = logits.clone().requires_grad_(True)
        x2 = logits.clone().requires_grad_(True)
        loss1, ids1 = compiled(x1, kw["bias"])
        loss2, ids2 = layer(x2, kw["bias"])
        assert torch.equal(ids1, ids2)
        loss1.backward()
        loss2.backward()
        assert rel_err(loss1, loss2) <= 1e-6 and rel_err(x1.grad, x2.grad) <= 1e-6


# ----------------------------------------------------------------------------- non-finite logits

NAN, INF = float("nan"), float("inf")
FLT_MAX = torch.finfo(torch.float32).max
# name -> (E, top_k, keyword arguments): softmax and sigmoid, with and without bias and groups;
# groups of 10 (CUDA's range path) and of 8 (its aligned path), 2 rows a token in Triton.
NONFINITE_MODES = {
    "softmax": (40, 3, dict()),
    "softmax_renorm_groups": (40, 4, dict(renormalize=True, n_group=4, topk_group=2)),
    "softmax_bias": (40, 3, dict(bias=True, routed_scaling_factor=2.0)),
    "softmax_bias_groups": (64, 4, dict(bias=True, n_group=8, topk_group=3)),
    "sigmoid": (64, 4, dict(scoring="sigmoid", renormalize=True)),
    "sigmoid_bias_groups": (64, 6, dict(scoring="sigmoid", bias=True, n_group=8, topk_group=4, renormalize=True)),
    # top_k past the kernels' register tiles (32): picks stored one by one, renormalised from memory
    "softmax_k40_stored": (64, 40, dict(renormalize=True, routed_scaling_factor=2.0)),
    "sigmoid_bias_k40_stored": (64, 40, dict(scoring="sigmoid", bias=True)),
}
ALL_NONFINITE_ROWS = (8, 9, 10)  # no logit above -inf


def nonfinite_logits(num_experts, dtype, device):
    """Fresh random rows, each with its kind of non-finite logits (row r: case r below)."""
    x, _ = make_inputs(12, num_experts, {}, torch.float32)
    x[0, 5] = NAN  # one NaN: among the larger logits, so it would be picked if NaN ranked high
    x[0, 5 + num_experts // 2] = x[0].nan_to_num(-INF).max() + 1  # a finite best in another group
    x[1, 7] = INF  # one +inf: the whole softmax weight
    x[2, [3, num_experts - 2]] = INF  # two +inf: half each, the lower id first
    x[3, 1::3] = NAN  # many NaN
    x[4, ::2] = -INF  # -inf and NaN mixed with finite logits
    x[4, 1:9:2] = NAN
    x[5, [0, 9]] = INF
    x[5, [2, 4]] = NAN
    x[6, :] = -INF  # one finite logit, the rest -inf / NaN
    x[6, 1::2] = NAN
    x[6, num_experts - 1] = 0.5
    x[7, 0] = -INF  # finite but for a -inf on the first expert
    x[8] = NAN
    x[9] = -INF
    x[10, ::2] = NAN
    x[10, 1::2] = -INF
    return x.to(dtype).to(device)


def assert_same_nonfinite_routing(out, ref):
    """Ids equal; weights NaN at the same places, equal to rounding elsewhere."""
    (w, ids), (w_ref, ids_ref) = out, ref
    assert torch.equal(ids.cpu(), ids_ref.cpu()), "expert ids differ"
    assert torch.equal(w.isnan().cpu(), w_ref.isnan().cpu()), "NaN weights differ"
    assert rel_err(w.nan_to_num(0.0), w_ref.nan_to_num(0.0)) <= 1e-6


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", NONFINITE_MODES)
def test_nonfinite_logits_policy(mode, dtype, device, backend):
    """NaN is read as -inf and +inf as FLT_MAX (reference.py's "Non-finite logits"), the same
    on every backend: the outputs equal those of the substituted logits, and the reference's."""
    num_experts, top_k, kwargs = NONFINITE_MODES[mode]
    logits = nonfinite_logits(num_experts, dtype, device)
    _, kw = make_inputs(1, num_experts, kwargs, torch.float32, device)
    w, ids = out = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    assert_same_nonfinite_routing(out, reference.topk_routing(logits.cpu(), top_k, **{
        k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()}))

    # The substitution, done by hand, gives the same bits on the same backend.
    f = logits.float()
    subst = torch.where(f.isnan(), -INF, torch.where(f == INF, FLT_MAX, f))
    w_s, ids_s = moekernels.topk_routing(subst, top_k, backend=backend, **kw)
    assert torch.equal(ids, ids_s)
    assert torch.equal(w.nan_to_num(7.0).view(torch.int32), w_s.nan_to_num(7.0).view(torch.int32))

    w, ids, x = w.cpu(), ids.cpu().long(), logits.cpu().float()
    scale = kw.get("routed_scaling_factor", 1.0)
    softmax = kwargs.get("scoring", "softmax") == "softmax"
    some = [r for r in range(x.shape[0]) if r not in ALL_NONFINITE_ROWS]
    assert w[some].isfinite().all(), "a row with a logit above -inf has finite weights"
    # A NaN expert never outranks a finite one (row 0's NaN sits above most logits), and the
    # NaN and -inf experts a row must pick (row 6) weigh 0.
    if "bias" not in kw:  # (with a bias a NaN expert scores 0, like -inf, and its bias counts)
        assert 5 not in ids[0].tolist()
    if "n_group" not in kw:
        assert 5 + num_experts // 2 in ids[0].tolist()
    picked = x.gather(1, ids)
    assert (w[some][~picked[some].isfinite() & (picked[some] != INF)] == 0).all()
    assert ids[6, 0] == num_experts - 1  # its one finite logit, first, with the whole softmax
    assert w[6, 0] == scale or not softmax
    if "bias" not in kw:
        assert ids[1, 0] == 7 and ids[2, :2].tolist() == [3, num_experts - 2] and ids[5, :2].tolist() == [0, 9]
        if softmax:  # +inf takes the whole softmax weight, shared equally between two
            assert w[1, 0] == scale and w[2, 0] == w[2, 1] == scale / 2
        else:  # sigmoid(FLT_MAX) = 1
            assert w[2, 0] == w[2, 1] and (w[1, 0] > w[1, 1:]).all()
    for r in ALL_NONFINITE_ROWS:
        if softmax:  # no softmax: 0 / 0, and every key ties, so the lowest ids (lowest groups)
            assert w[r].isnan().all()
            assert ids[r].tolist() == list(range(top_k))
        else:  # sigmoid scores 0: weights 0, the bias alone chooses (lowest ids without one)
            assert (w[r] == 0).all()
            assert torch.equal(ids[r], ids[ALL_NONFINITE_ROWS[0]])
            if "bias" not in kw:
                assert ids[r].tolist() == list(range(top_k))


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("mode", NONFINITE_MODES)
def test_nonfinite_logits_gradient(mode, device, backend):
    """Finite gradients in every row with a logit above -inf, 0 at NaN and -inf logits; the
    gradient of the substituted logits, which torch's own autograd gives."""
    num_experts, top_k, kwargs = NONFINITE_MODES[mode]
    logits = nonfinite_logits(num_experts, torch.float32, device).requires_grad_(True)
    _, kw = make_inputs(1, num_experts, kwargs, torch.float32, device)
    w, ids = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    grad_out = torch.randn_like(w)
    (grad,) = torch.autograd.grad((w.nan_to_num(0.0) * grad_out).sum(), logits)
    grad, x = grad.cpu(), logits.detach().cpu()
    assert grad.isfinite().all()
    assert (grad[x.isnan() | (x == -INF)] == 0).all()
    assert (grad[list(ALL_NONFINITE_ROWS)] == 0).all()

    subst = torch.where(x.isnan(), -INF, torch.where(x == INF, FLT_MAX, x)).requires_grad_(True)
    w_ref = torch_autograd_weights(subst, ids.cpu(), kwargs.get("scoring", "softmax"), kw.get("renormalize", False),
                                   kw.get("routed_scaling_factor", 1.0))
    (grad_ref,) = torch.autograd.grad((w_ref.nan_to_num(0.0) * grad_out.cpu()).sum(), subst)
    some = [r for r in range(x.shape[0]) if r not in ALL_NONFINITE_ROWS]
    # float32 against float32 by two roundings of the same formula (exp_f32 and an IEEE division
    # against torch's exp and sigmoid, another order of the renormalized sum): ~3e-6 typical, 5.6e-6
    # the largest of 40 fresh draws, 1.7e-5 seen once; a wrong formula is off by O(1).
    assert rel_err(grad[some], grad_ref[some]) <= 5e-5


def test_exp_f32_of_the_substituted_extremes():
    """What softmax and sigmoid feed exp_f32 after the substitution: never NaN."""
    x = torch.tensor([-INF, -FLT_MAX, FLT_MAX, INF, -FLT_MAX - (-FLT_MAX), 0.0 - FLT_MAX])
    assert reference.exp_f32(x).tolist() == [0.0, 0.0, INF, INF, 1.0, 0.0]
    scores = reference.routing_scores(torch.tensor([[FLT_MAX, -INF, 0.0, NAN]]), "sigmoid")
    assert scores.tolist() == [[1.0, 0.0, 0.5, 0.0]]


# ----------------------------------------------------------------------------- bad input

BAD = [
    ("logits", dict(logits=[[1.0, 2.0]]), TypeError),
    ("logits", dict(logits=torch.randn(4, 8, 2)), ValueError),
    ("logits", dict(logits=torch.randn(4, 8).double()), TypeError),
    ("logits", dict(logits=torch.randint(0, 3, (4, 8))), TypeError),
    ("top_k", dict(top_k=0), ValueError),
    ("top_k", dict(top_k=9), ValueError),
    ("top_k", dict(top_k=2.0), TypeError),
    ("scoring", dict(scoring="relu"), ValueError),
    ("n_group", dict(n_group=3, topk_group=1), ValueError),
    ("topk_group", dict(n_group=4, topk_group=5), ValueError),
    ("topk_group", dict(n_group=4), ValueError),
    ("top_k", dict(top_k=5, n_group=4, topk_group=2), ValueError),  # 2 groups of 2 experts hold 4
    ("bias", dict(bias=torch.randn(7)), ValueError),
    ("bias", dict(bias=torch.randn(8).half()), TypeError),
    ("bias", dict(bias=torch.randn(8, device="meta")), ValueError),  # another device
    ("n_group", dict(bias=torch.randn(8), n_group=8, topk_group=2), ValueError),  # groups of 1, top-2 sum
    ("routed_scaling_factor", dict(routed_scaling_factor=float("nan")), ValueError),
    ("backend", dict(backend="tpu"), ValueError),
]


@pytest.mark.parametrize("name,change,error", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, change, error):
    args = dict(logits=torch.randn(4, 8), top_k=2)
    args.update(change)
    with pytest.raises(error, match=name):
        moekernels.topk_routing(args.pop("logits"), args.pop("top_k"), **args)


# ----------------------------------------------------------------------------- on the GPU


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_cuda_graph_and_compile(backend):
    num_experts, top_k, kwargs = MODES["deepseek_v3_e256_k8"]
    logits, kw = make_inputs(40000, num_experts, kwargs, torch.float32, "cuda")
    want = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # capture fails on any host sync
        got = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    got[0].fill_(-1)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])

    compiled = torch.compile(
        lambda x: moekernels.topk_routing(x, top_k, backend=backend, **kw), fullgraph=True
    )
    assert_same_routing(compiled(logits), want)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_weights_gradient(backend):
    num_experts, top_k, kwargs = MODES["deepseek_v3_e256_k8"]
    logits, kw = make_inputs(300, num_experts, kwargs, torch.float32, "cuda")
    logits.requires_grad_(True)
    w, ids = moekernels.topk_routing(logits, top_k, backend=backend, **kw)
    grad_out = torch.randn_like(w)
    (grad,) = torch.autograd.grad((w * grad_out).sum(), logits)
    x = logits.detach().clone().requires_grad_(True)
    w_ref = torch_autograd_weights(x, ids, "sigmoid", True, 2.5)
    (grad_ref,) = torch.autograd.grad((w_ref * grad_out).sum(), x)
    assert rel_err(grad, grad_ref) <= 1e-5


# ----------------------------------------------------------------------------- router losses


def transformers_load_balancing_loss(gate_logits, num_experts, top_k):
    """transformers' ``load_balancing_loss_func`` (Mixtral, Qwen-MoE), no attention mask,
    one layer: it routes by softmax top-k itself."""
    routing_weights = torch.nn.functional.softmax(gate_logits, dim=-1)
    _, selected_experts = torch.topk(routing_weights, top_k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected_experts, num_experts)
    tokens_per_expert = torch.mean(expert_mask.float(), dim=0)
    router_prob_per_expert = torch.mean(routing_weights, dim=0)
    return torch.sum(tokens_per_expert * router_prob_per_expert.unsqueeze(0)) * num_experts


LOSS_SHAPES = [(1, 1, 1), (37, 8, 2), (70, 128, 8), (9, 60, 4), (3, 1024, 16)]


@pytest.mark.parametrize("device,backend", device_backends(cuda=False))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=lambda s: "T{}_E{}_k{}".format(*s))
def test_losses_match_reference(shape, dtype, device, backend):
    num_tokens, num_experts, top_k = shape
    logits = (torch.randn(num_tokens, num_experts) * 3).to(dtype).to(device)
    ids = make_ids(num_tokens, top_k, num_experts, torch.int64, device)  # an expert with no pair, one with one
    if top_k > 1:
        ids[0, 1] = ids[0, 0]  # the same expert twice for one token: counted twice
    balance = moekernels.load_balancing_loss(logits, ids, num_experts, backend=backend)
    z = moekernels.router_z_loss(logits, backend=backend)
    assert balance.dtype == torch.float32 and balance.shape == () and z.dtype == torch.float32
    # float64 references: the float32 sums differ by their own rounding only
    assert rel_err(balance, reference.load_balancing_loss(logits.double(), ids, num_experts)) <= 1e-5
    assert rel_err(z, reference.router_z_loss(logits.double())) <= 1e-5


@pytest.mark.parametrize("num_experts,top_k", [(8, 2), (60, 4)])
def test_load_balancing_loss_is_transformers(num_experts, top_k):
    logits = torch.randn(41, num_experts, dtype=torch.float64)
    ids = torch.softmax(logits, -1).topk(top_k, dim=-1).indices
    want = transformers_load_balancing_loss(logits, num_experts, top_k)
    got = moekernels.load_balancing_loss(logits, ids, num_experts)
    assert rel_err(got, want) <= 1e-6  # transformers takes its token shares in float32
    z = sum(torch.logsumexp(row, 0) ** 2 for row in logits) / len(logits)
    assert rel_err(moekernels.router_z_loss(logits), z) <= 1e-12


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_losses_gradients(dtype, backend):
    logits = (torch.randn(23, 40) * 2).to(dtype).requires_grad_(True)
    ids = torch.rand(23, 40).topk(6, dim=1).indices.int()
    got = torch.autograd.grad(moekernels.load_balancing_loss(logits, ids, 40, backend=backend) * 1.7
                              + moekernels.router_z_loss(logits, backend=backend) * 0.3, logits)[0]
    x = logits.detach().float().requires_grad_(True)
    want = torch.autograd.grad(reference.load_balancing_loss(x, ids, 40) * 1.7
                               + reference.router_z_loss(x) * 0.3, x)[0]
    assert got.dtype == dtype
    assert rel_err(got, want) <= (1e-5 if dtype == torch.float32 else 2**-7)


def test_losses_gradcheck_on_the_reference_path():
    logits = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    ids = torch.rand(7, 12).topk(3, dim=1).indices
    assert torch.autograd.gradcheck(lambda x: moekernels.load_balancing_loss(x, ids, 12, backend="torch"), (logits,))
    assert torch.autograd.gradcheck(lambda x: moekernels.router_z_loss(x, backend="torch"), (logits,))


@pytest.mark.parametrize("backend", cpu_backends())
def test_losses_empty_opcheck_and_compile(backend):
    logits, ids = torch.randn(11, 16, requires_grad=True), torch.rand(11, 16).topk(2, dim=1).indices.int()
    assert moekernels.load_balancing_loss(logits[:0], ids[:0], 16, backend=backend).item() == 0.0
    assert moekernels.router_z_loss(logits[:0], backend=backend).item() == 0.0
    torch.library.opcheck(torch.ops.moekernels.load_balancing_loss.default, (logits, ids, 16, backend))
    torch.library.opcheck(torch.ops.moekernels.router_z_loss.default, (logits, backend))

    def losses(x, topk_ids):
        return (moekernels.load_balancing_loss(x, topk_ids, 16, backend=backend)
                + moekernels.router_z_loss(x, backend=backend))

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager", dynamic=True)
    got = torch.autograd.grad(compiled(logits, ids), logits)[0]
    want = torch.autograd.grad(losses(logits, ids), logits)[0]
    assert rel_err(got, want) <= 1e-6


LOSS_BAD = [
    ("logits", dict(logits=torch.randn(4, 8).int()), TypeError),
    ("logits", dict(logits=torch.randn(4, 8, 1)), ValueError),
    ("topk_ids", dict(topk_ids=torch.zeros(4, 2)), TypeError),
    ("topk_ids", dict(topk_ids=torch.zeros(5, 2, dtype=torch.int64)), ValueError),
    ("topk_ids", dict(topk_ids=torch.full((4, 2), 8)), ValueError),  # an id out of range
    ("topk_ids", dict(topk_ids=torch.full((4, 2), -1)), ValueError),
    ("num_experts", dict(num_experts=7), ValueError),
    ("num_experts", dict(num_experts="8"), TypeError),
]


@pytest.mark.parametrize("name,change,error", LOSS_BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(LOSS_BAD)])
def test_losses_bad_input_names_the_argument(name, change, error):
    args = dict(logits=torch.randn(4, 8), topk_ids=torch.zeros(4, 2, dtype=torch.int64), num_experts=8)
    args.update(change)
    with pytest.raises(error, match=name):
        moekernels.load_balancing_loss(args["logits"], args["topk_ids"], args["num_experts"])


# ----------------------------------------------------------------------------- DeepSeek-V3 balancing


def report_sequence_loss(logits, ids, num_experts, seq_len, scoring):
    """DeepSeek-V3 report eq. 17-20, one sequence at a time, written from the formulas in float64:
    f_i = N_r / (K_r T) * sum_t 1(i chosen at t), s'_t = s_t / sum_j s_jt, P_i = mean_t s'_it."""
    total, x, k = 0.0, logits.double(), ids.shape[1]
    seqs = range(0, logits.shape[0], seq_len)
    for start in seqs:
        xs, chosen = x[start:start + seq_len], ids[start:start + seq_len].tolist()
        s = torch.softmax(xs, -1) if scoring == "softmax" else torch.sigmoid(xs)
        s = s / s.sum(-1, keepdim=True)
        for i in range(num_experts):
            f = num_experts / (k * seq_len) * sum(row.count(i) for row in chosen)
            total += f * s[:, i].mean().item()
    return torch.tensor(total / max(len(seqs), 1), dtype=torch.float64)


SEQ_SHAPES = [(1, 1, 4, 2), (3, 7, 8, 2), (2, 33, 60, 4), (4, 5, 16, 16), (1, 9, 1, 1)]  # B, S, E, k


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SEQ_SHAPES, ids=lambda s: "B{}_S{}_E{}_k{}".format(*s))
def test_sequence_balance_loss_is_the_report(shape, dtype, scoring):
    batch, seq_len, num_experts, top_k = shape
    logits = (torch.randn(batch * seq_len, num_experts) * 2).to(dtype)
    logits[:, num_experts // 2] = -30  # an expert no token picks (unless k = E)
    ids = logits.float().topk(top_k, dim=-1).indices
    got = moekernels.sequence_balance_loss(logits, ids, num_experts, seq_len, scoring=scoring)
    assert got.shape == () and got.dtype == reference.acc_dtype(dtype)
    assert rel_err(got, report_sequence_loss(logits, ids, num_experts, seq_len, scoring)) <= 1e-5
    assert rel_err(got, reference.sequence_balance_loss(logits.double(), ids, num_experts, seq_len, scoring)) <= 1e-5


def test_sequence_balance_loss_sees_sequence_boundaries():
    """Two sequences, each on its own expert: balanced over the batch, not within a sequence."""
    seq_len, num_experts = 6, 2
    logits = torch.tensor([[4.0, -4.0]] * seq_len + [[-4.0, 4.0]] * seq_len, dtype=torch.float64)
    ids = logits.topk(1, dim=-1).indices
    p = torch.softmax(logits[0], 0)[0].item()
    per_seq = moekernels.sequence_balance_loss(logits, ids, num_experts, seq_len)
    whole = moekernels.sequence_balance_loss(logits, ids, num_experts, 2 * seq_len)
    assert rel_err(per_seq, torch.tensor(2 * p, dtype=torch.float64)) <= 1e-12  # f = (2, 0), P = (p, 1 - p) in each sequence
    assert rel_err(whole, torch.tensor(1.0, dtype=torch.float64)) <= 1e-12  # f = (1, 1), P = (1/2, 1/2)
    # One sequence is the batch-wise loss divided by k; shuffling tokens within a sequence changes nothing.
    logits = torch.randn(4 * 10, 12, dtype=torch.float64)
    ids = logits.topk(3, dim=-1).indices
    whole = moekernels.sequence_balance_loss(logits, ids, 12, 40)
    assert rel_err(whole, moekernels.load_balancing_loss(logits, ids, 12) / 3) <= 1e-12
    perm = torch.cat([torch.randperm(10) + 10 * b for b in range(4)])
    got = moekernels.sequence_balance_loss(logits[perm], ids[perm], 12, 10)
    assert rel_err(got, moekernels.sequence_balance_loss(logits, ids, 12, 10)) <= 1e-12
    swap = torch.cat([torch.arange(5, 15), torch.arange(5), torch.arange(15, 40)])  # tokens change sequence
    assert rel_err(moekernels.sequence_balance_loss(logits[swap], ids[swap], 12, 10),
                   moekernels.sequence_balance_loss(logits, ids, 12, 10)) > 1e-6


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_sequence_balance_loss_gradients(scoring):
    logits = torch.randn(3 * 5, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.rand(15, 9).topk(3, dim=1).indices
    assert torch.autograd.gradcheck(
        lambda x: moekernels.sequence_balance_loss(x, ids, 9, 5, scoring=scoring), (logits,))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-7)):
        x = logits.detach().to(dtype).requires_grad_(True)
        got = torch.autograd.grad(moekernels.sequence_balance_loss(x, ids, 9, 5, scoring=scoring) * 1.3, x)[0]
        xr = x.detach().double().requires_grad_(True)
        want = torch.autograd.grad(reference.sequence_balance_loss(xr, ids, 9, 5, scoring) * 1.3, xr)[0]
        assert got.dtype == dtype and rel_err(got, want) <= tol


def test_sequence_balance_loss_empty_opcheck_and_compile():
    logits, ids = torch.randn(12, 16, requires_grad=True), torch.rand(12, 16).topk(2, dim=1).indices.int()
    assert moekernels.sequence_balance_loss(logits[:0], ids[:0], 16, 4).item() == 0.0
    for scoring in ("softmax", "sigmoid"):
        torch.library.opcheck(torch.ops.moekernels.sequence_balance_loss.default, (logits, ids, 16, 4, scoring))

    def loss(x, topk_ids):
        return moekernels.sequence_balance_loss(x, topk_ids, 16, 4, scoring="sigmoid")

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager", dynamic=True)
    got = torch.autograd.grad(compiled(logits, ids), logits)[0]
    assert rel_err(got, torch.autograd.grad(loss(logits, ids), logits)[0]) <= 1e-6


SEQ_BAD = [
    ("seq_len", dict(seq_len=5), ValueError),  # does not divide 12 tokens
    ("seq_len", dict(seq_len=0), ValueError),
    ("seq_len", dict(seq_len=4.0), TypeError),
    ("scoring", dict(scoring="relu"), ValueError),
    ("topk_ids", dict(topk_ids=torch.full((12, 2), 8)), ValueError),
    ("num_experts", dict(num_experts=9), ValueError),
]


@pytest.mark.parametrize("name,change,error", SEQ_BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(SEQ_BAD)])
def test_sequence_balance_loss_bad_input_names_the_argument(name, change, error):
    args = dict(logits=torch.randn(12, 8), topk_ids=torch.zeros(12, 2, dtype=torch.int64), num_experts=8,
                seq_len=4, scoring="softmax")
    args.update(change)
    with pytest.raises(error, match=name):
        moekernels.sequence_balance_loss(args["logits"], args["topk_ids"], args["num_experts"], args["seq_len"],
                                         scoring=args["scoring"])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.float32], ids=str)
def test_update_correction_bias(dtype):
    num_experts, rate = 16, 1e-3
    counts = torch.randint(0, 50, (num_experts,))
    counts[3] = 0  # an empty expert: underloaded
    counts[7] = 0
    counts[7] = counts.sum() // (num_experts - 1) if counts.sum() % (num_experts - 1) == 0 else 0
    counts = counts.to(dtype)
    mean = counts.double().mean().item()
    bias = torch.randn(num_experts) * 0.01
    want = bias.clone()
    for e in range(num_experts):  # the report: down by rate when overloaded, up when underloaded
        load = counts[e].item()
        want[e] += rate if load < mean else -rate if load > mean else 0.0
    before = bias.data_ptr()
    moekernels.update_correction_bias(bias, counts, rate)
    assert bias.data_ptr() == before  # in place: the module's buffer itself
    assert torch.equal(bias, want)
    # An expert exactly at the mean keeps its bias; equal loads change nothing; rate 0 neither.
    even = torch.full((num_experts,), 7, dtype=dtype)
    moekernels.update_correction_bias(bias, even, rate)
    moekernels.update_correction_bias(bias, counts, 0.0)
    assert torch.equal(bias, want)
    one = torch.zeros(num_experts, dtype=dtype)
    one[11] = 1  # a single token
    moekernels.update_correction_bias(bias, one, rate)
    assert torch.equal(bias, reference.update_correction_bias(want, one, rate))
    assert bias[11] == want[11] - rate and bias[0] == want[0] + rate


def test_update_correction_bias_opcheck_compile_and_errors():
    bias, counts = torch.randn(8), torch.randint(0, 9, (8,))
    torch.library.opcheck(torch.ops.moekernels.update_correction_bias.default, (bias, counts, 0.01))

    def step(b, c):
        moekernels.update_correction_bias(b, c, 0.01)
        return b * 2

    b1, b2 = bias.clone(), bias.clone()
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(b1, counts)
    assert torch.equal(out, step(b2, counts)) and torch.equal(b1, b2)
    with pytest.raises(TypeError, match="bias"):
        moekernels.update_correction_bias(bias.double(), counts, 0.01)
    with pytest.raises(ValueError, match="expert_counts"):
        moekernels.update_correction_bias(bias, counts[:7], 0.01)
    with pytest.raises(ValueError, match="rate"):
        moekernels.update_correction_bias(bias, counts, -1.0)
    with pytest.raises(TypeError, match="rate"):
        moekernels.update_correction_bias(bias, counts, None)
