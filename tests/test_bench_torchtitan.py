"""The torchtitan benchmark (benchmarks/bench_torchtitan.py): its copy of stock torchtitan 0.3.0 against
torchtitan's own modules, its moekernels rows against the integration's modules, its CPU dry run,
checks and notes. Small shapes only; the timings are the benchmark's."""

import json

import pytest
import torch

from benchmarks import bench_torchtitan as bt, harness, run

E, D, F_, K = 4, 128, 128, 2  # fp8's 128-wide blocks; F_: F is torch.nn.functional elsewhere
COUNTS = [3, 0, 14, 1]  # an expert with no row, one with a single row, sizes off any block


def _titan():
    return pytest.importorskip("torchtitan.models.common.moe", reason="torchtitan is not installed")


def _init(module, dtype):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return module.to(dtype)


def _routing(tokens):
    """float32 scores and int64 ids [T, K], K distinct experts a token among the first E - 1 (the
    last has no token), and the counts."""
    gen = torch.Generator().manual_seed(2)
    ids = torch.rand(tokens, E - 1, generator=gen).topk(K, dim=-1).indices
    scores = torch.rand(tokens, K, generator=gen).requires_grad_()
    return scores, ids, torch.bincount(ids.reshape(-1), minlength=E)


def _grads(y, leaves, dy):
    return (y, *torch.autograd.grad(y, leaves, dy))


def _equal_grads(got, want, names, what):
    for name, a, b in zip(names, got, want):
        assert torch.equal(a, b), (what, name)


EXPERTS_GRADS = ("y", "dx", "dw1", "dw2", "dw3")
ROUTED_GRADS = ("y", "dx", "dscores", "dw1", "dw2", "dw3")


def _experts_grads(experts, bench, dtype):
    """(the benchmark's, the module's) output and gradients on COUNTS' rows."""
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D, dtype=dtype, requires_grad=True)
    dy = torch.randn(sum(COUNTS), D, dtype=dtype)
    leaves = (x, experts.w1_EFD, experts.w2_EDF, experts.w3_EFD)
    want = _grads(experts(x, counts), leaves, dy)
    assert want[0].dtype == dtype
    return _grads(bench(x, counts, *leaves[1:]), leaves, dy), want


def _routed_grads(layer, bench, dtype):
    tokens = 9
    scores, ids, counts = _routing(tokens)
    x = torch.randn(tokens, D, dtype=dtype, requires_grad=True)
    dy = torch.randn(tokens, D, dtype=dtype)
    inner = layer.inner_experts
    leaves = (x, scores, inner.w1_EFD, inner.w2_EDF, inner.w3_EFD)
    y = layer(x.view(1, tokens, D), scores.view(1, tokens, K), ids.view(1, tokens, K), counts)
    return _grads(bench(x, scores, ids, counts, *leaves[2:]), leaves, dy), _grads(y.view(tokens, D), leaves, dy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stock_copy_is_torchtitans_grouped_experts(dtype):
    """Bit for bit (torch.equal): the same ops in the same order, forward and every gradient; in fp32
    through stock's .bfloat16() casts and .type_as."""
    moe = _titan()
    experts = _init(moe.GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E).build(), dtype)
    _equal_grads(*_experts_grads(experts, bt.stock_experts, dtype), EXPERTS_GRADS, "stock")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_stock_copy_is_torchtitans_routed_experts(dtype):
    """RoutedExperts with LocalTokenDispatcher (argsort, gather, experts, float32 scores, the
    deterministic scatter add), bit for bit, forward and the gradients of x, the scores and the weights."""
    moe = _titan()
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    layer = _init(moe.RoutedExperts.Config(
        inner_experts=moe.GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E),
        token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)).build(), dtype)
    _equal_grads(*_routed_grads(layer, bt.stock_routed, dtype), ROUTED_GRADS, "stock")


def test_cpu_dry_run(tmp_path, monkeypatch, capsys):
    """Both groups at T 16 on the torch backend, every row checked against float32 (stock's too:
    there is no naive row), 'x stock' beside each, and the targets not judged on CPU timings."""
    monkeypatch.setattr(harness, "has_gpu", lambda: False)
    assert run.main(["--quick", "--out", str(tmp_path), "--only", "torchtitan", "--tokens", "16"]) == 0
    payload = json.loads((tmp_path / "bench.json").read_text())
    records, notes = payload["results"], payload["notes"]
    fused_fp8 = () if bt.fused_fp8_unsupported() else ("fused_fp8",)
    assert [(r["group"], r["impl"]) for r in records] == (
        [("qwen3-30b-a3b /8 experts fwd+bwd", i) for i in ("stock", "experts", "experts_fp8")]
        + [("qwen3-30b-a3b /8 routed fwd+bwd", i) for i in ("stock", "experts", "fused", "experts_fp8", *fused_fp8)])
    for r in records:
        assert r["error"] is None, r
        assert r["check"]["ok"] and 0 < r["check"]["rel_err"], r
        assert r["flops"] == 18 * 16 * 8 * 256 * 128 and r["speedup_vs_stock"] > 0
    assert f"torchtitan bf16 (experts, fused) vs stock: target >= 1.20: {harness.NOT_MEASURED}" in notes
    assert f"torchtitan fp8 (experts_fp8, fused_fp8) vs stock bf16: target >= 1.50: {harness.NOT_MEASURED}" in notes
    assert "| case | T | impl | median us | p20-p80 us | GB/s | TFLOP/s | x stock | check | timing |" in (
        tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("group", ["experts", "routed"])
def test_check_catches_a_wrong_gradient(group):
    case = next(c for c in bt.cases("cpu", True, [16]) if c.params["what"] == group)
    (inp,) = case.make_inputs()
    outs, inp, kind = case.impls["stock"](inp)
    assert case.compare((outs, inp, kind), None)["ok"]
    for i in range(len(outs)):  # each output, spoilt in turn: a dropped score or a wrong expert is O(1)
        bad = list(outs)
        bad[i] = bad[i] * 1.1
        check = case.compare((tuple(bad), inp, kind), None)
        assert not check["ok"], (group, i, check)


def test_gpu_sweeps():
    """The quick suite (the device check's stage 2) and the full one: the issue's shapes and T."""
    quick = bt.cases("cuda", True)  # builds cases only: no input is made
    assert [(c.group, c.x) for c in quick] == [
        ("qwen3-30b-a3b experts fwd+bwd", 4096), ("qwen3-30b-a3b routed fwd+bwd", 4096),
        ("deepseek-v3 E32 experts fwd+bwd", 4096)]
    assert list(quick[0].impls) == ["stock", "experts", "experts_fp8"]
    assert list(quick[1].impls)[:4] == ["stock", "experts", "fused", "experts_fp8"] and not quick[1].eager
    full = {(c.group, c.x, c.params["E"], c.params["R"]) for c in bt.cases("cuda", False)}
    assert full == {(f"{g} fwd+bwd", t, e, t * 8) for g, e in (("qwen3-30b-a3b experts", 128),
                                                               ("qwen3-30b-a3b routed", 128),
                                                               ("deepseek-v3 E32 experts", 32))
                    for t in (4096, 16384)}
    ds = next(c for c in bt.cases("cuda", False) if c.group.startswith("deepseek"))
    assert ds.flops == 3 * 3 * 2 * (4096 * 8) * 7168 * 2048  # 3 GEMMs, 2x for backward


def test_notes_report_the_targets():
    def rec(group, impl, x, speedup):
        return {"bench": "torchtitan", "group": group, "impl": impl, "x": x, "error": None, "method": "graph",
                "speedup_vs_stock": speedup}
    records = [rec("q experts fwd+bwd", "stock", 4096, 1.0), rec("q experts fwd+bwd", "experts", 4096, 1.3),
               rec("q routed fwd+bwd", "fused", 4096, 1.1), rec("q experts fwd+bwd", "experts_fp8", 4096, 1.6)]
    lines = bt.notes(records)
    assert lines[:2] == [
        "torchtitan bf16 (experts, fused) vs stock: target >= 1.20: met in 1 of 2; worst q routed fwd+bwd T=4096: 1.10",
        "torchtitan fp8 (experts_fp8, fused_fp8) vs stock bf16: target >= 1.50: met in 1 of 1; worst q experts "
        "fwd+bwd T=4096: 1.60"]
    assert bt.notes([{**records[0], "bench": "moe"}]) == []



def _integration():
    _titan()
    from moekernels.integrations import torchtitan as mt  # not skipped: with torchtitan there, it must import

    return mt


def _routed_pair(mt, moe, precision, dtype, fused):
    """A routed layer of the integration's (stock's RoutedExperts around the `experts` override, or the
    `routed_experts` override's fused path) and the benchmark's function for it."""
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    experts_cfg = moe.GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E)
    cfg = moe.RoutedExperts.Config(inner_experts=mt.experts(experts_cfg, precision=precision, backend="torch"),
                                   token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K))
    if fused:
        cfg = mt.routed_experts(cfg, precision=precision, backend="torch")
        return _init(cfg.build(), dtype), bt.moekernels_fused(precision, "torch")
    return _init(cfg.build(), dtype), bt.routed_with(bt.moekernels_experts(precision, "torch"))


PARAMS = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32_params", "bf16_params"])
PRECISIONS = pytest.mark.parametrize("precision", [None, "fp8"], ids=["bf16", "fp8"])


@PRECISIONS
@PARAMS
def test_experts_rows_are_the_integrations_modules(dtype, precision):
    """The benchmark's `experts` and `experts_fp8` rows compute what the integration's modules do, bit for
    bit (torch.equal: the same ops on the same backend), forward and every gradient: the `experts`
    override alone, and stock's RoutedExperts around it."""
    mt, moe = _integration(), _titan()
    cfg = moe.GroupedExperts.Config(dim=D, hidden_dim=F_, num_experts=E)
    ours = _init(mt.experts(cfg, precision=precision, backend="torch").build(), dtype)
    assert type(ours) is mt.MoekernelsGroupedExperts
    _equal_grads(*_experts_grads(ours, bt.moekernels_experts(precision, "torch"), dtype), EXPERTS_GRADS, "experts")
    _equal_grads(*_routed_grads(*_routed_pair(mt, moe, precision, dtype, False), dtype), ROUTED_GRADS, "routed")


@PRECISIONS
@PARAMS
def test_fused_rows_are_the_integrations_fused_path(dtype, precision):
    """The benchmark's `fused` and `fused_fp8` rows against the `routed_experts` override without an EP
    mesh (its fused_moe path), bit for bit, forward and every gradient."""
    mt, moe = _integration(), _titan()
    if precision == "fp8" and bt.fused_fp8_unsupported():
        pytest.skip(f"fused_moe(precision='fp8') does not take the (w1, w3) pair yet: {bt.fused_fp8_unsupported()}")
    layer, bench = _routed_pair(mt, moe, precision, dtype, True)
    assert type(layer) is mt.MoekernelsRoutedExperts and layer.fusable()
    _equal_grads(*_routed_grads(layer, bench, dtype), ROUTED_GRADS, "fused")
