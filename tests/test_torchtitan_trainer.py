"""torchtitan's own trainer (``torchtitan.train.main``, torchtitan 0.3.0) with moekernels switched on by
``--override.imports``, against the same trainer stock: same config, seed and data, 4 steps on the CPU over
gloo, as 1 process and as 2 processes (FSDP 2 + EP 2: each process holds half the experts). tests/_titan.py
runs the trainer and holds the CPU workarounds. Importing torch and torchtitan costs ~6 s a process, so each
process runs its group of trainings in a row (a module fixture) and each test compares two of them.

Two measures, each against a reference run:
- each step's loss (the global mean the trainer logs), relative difference;
- step 1's gradients of the first MoE layer's expert weights (w1, w2, w3, rank 0's shard), relative error
  norm. Step 1's weights are the same in both runs, so this is the experts' forward and backward inside the
  trainer. The loss alone cannot tell a broken expert from a correct one at init: in the DeepSeek-V3 debug
  model, scaling the experts' output by 1.0625, or swapping w1 and w3, moved no step's loss by more than
  1.2e-4 relative, while bf16 rounding alone moves step 4 by 3e-4; the same faults moved these gradients by
  6.3e-2 and 0.3.

Tolerances:
- bf16 (``experts``, ``routed_experts``, ``dispatcher``): losses within 1e-3 relative, gradients within 1e-2
  (2.5 bf16 roundings, 2^-8 each) of stock's. Stock casts the experts'
  operands to bf16 too; the two differ in rounding and summation order only. Measured: the unfused experts'
  gradients 6e-5 off stock's, fused_moe's 5e-3 (it applies the router scores inside its bf16 GEMM, stock in
  float32 after it).
- FP8 experts (e4m3 operands, DeepSeek-V3's (1, 128) / (128, 128) block scales): against the same run in
  bf16, losses within 5e-3 and gradients within 0.1. e4m3 rounds each operand by up to 2^-4 relative
  (~2^-5.5 rms), and a weight gradient is a product of two rounded operands; measured, the gradients 6.1e-2
  to 6.6e-2 off bf16's (an average over 65536 elements a tensor: steady from run to run), the losses
  < 2e-4. The FP8 runs must also differ from bf16's (or they did not run in FP8).
- FP8 dispatch (e4m3 rows on the wire, bf16 experts): losses within 1e-3 of stock's, gradients within 0.1
  (the experts' input is rounded to e4m3 once: measured 3.5e-2).
"""

import pytest

pytest.importorskip("torchtitan")  # the torchtitan extra; moekernels.integrations.torchtitan imports it

import torch  # noqa: E402

import _titan  # noqa: E402
from conftest import rel_err  # noqa: E402

M = "moekernels.integrations.torchtitan."
DSV3 = ("deepseek_v3", "deepseek_v3_debugmodel")  # dim 256, MoE hidden 256 (multiples of 128, as FP8 needs)
QWEN3 = ("_titan", "qwen3_moe_debug_1_layer")  # dim 256, MoE hidden 768, 64 experts, top-8
# (losses, step-1 expert gradients), relative; see the docstring
BF16, FP8 = (1e-3, 1e-2), (5e-3, 0.1)
FP8_WIRE = (1e-3, 0.1)  # e4m3 rows on the wire: the experts' input rounded once, gradients as FP8's

RUNS = {  # (processes, model, --override.imports)
    "dsv3 stock": (1, DSV3, ()),
    "dsv3 routed_experts": (1, DSV3, (M + "routed_experts",)),  # fused_moe (no EP mesh)
    "dsv3 experts": (1, DSV3, (M + "experts",)),
    "dsv3 routed_experts_fp8": (1, DSV3, (M + "routed_experts_fp8",)),
    "qwen3 stock": (1, QWEN3, ()),
    "qwen3 routed_experts": (1, QWEN3, (M + "routed_experts",)),
    "dsv3 EP2 stock": (2, DSV3, ()),
    "dsv3 EP2 experts+dispatcher": (2, DSV3, (M + "experts", M + "dispatcher")),
    "dsv3 EP2 experts+dispatcher fp8": (2, DSV3, (M + "experts", M + 'dispatcher={"fp8": true}')),
    # C = ceil(2.0 * T * top_k / 2) = T * top_k rows for each pair of ranks, as many as a rank can send: nothing
    # is dropped, so the losses must be stock's.
    "dsv3 EP2 experts+dispatcher capacity 2.0": (2, DSV3, (M + "experts", M + 'dispatcher={"capacity_factor": 2.0}')),
    "dsv3 EP2 routed_experts": (2, DSV3, (M + "routed_experts",)),  # the README's command, at EP 2
    "dsv3 EP2 routed_experts_fp8": (2, DSV3, (M + "routed_experts_fp8",)),  # e4m3 GEMMs and e4m3 dispatch
}
COMPARISONS = [  # (run, reference run, relative tolerance)
    ("dsv3 routed_experts", "dsv3 stock", BF16),
    ("dsv3 experts", "dsv3 stock", BF16),
    ("qwen3 routed_experts", "qwen3 stock", BF16),
    ("dsv3 routed_experts_fp8", "dsv3 routed_experts", FP8),
    ("dsv3 EP2 experts+dispatcher", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 experts+dispatcher fp8", "dsv3 EP2 stock", FP8_WIRE),
    ("dsv3 EP2 experts+dispatcher capacity 2.0", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 routed_experts", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 routed_experts_fp8", "dsv3 EP2 routed_experts", FP8),
]
# The classes each run's model must hold (fully_shard's FSDP<name> classes count by their MRO): a test that
# compared stock with stock would pass.
OURS = {"experts": ["MoekernelsGroupedExperts"], "dispatcher": ["MoekernelsTokenDispatcher"],
        "routed_experts": ["MoekernelsRoutedExperts", "MoekernelsGroupedExperts", "MoekernelsTokenDispatcher"]}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    folder = _titan.make_assets(tmp_path_factory.mktemp("titan"))
    out = {}
    for processes in (1, 2):
        names = [name for name, (n, _, _) in RUNS.items() if n == processes]
        args = [_titan.base_args(*RUNS[name][1], folder, overrides=RUNS[name][2], world_size=processes, ep=processes)
                for name in names]
        out.update(zip(names, _titan.train(args, folder, world_size=processes)))
    return out


def _get(results, name):
    run = results[name]
    if "error" in run:
        pytest.fail(f"{name}: torchtitan raised\n{run['error'][-5000:]}", pytrace=False)
    overrides = RUNS[name][2]
    expected = {c for o in overrides for key, classes in OURS.items()
                if o.split("=")[0].removeprefix(M).removesuffix("_fp8") == key for c in classes}
    missing = expected - set(run["classes"])
    assert not missing, f"{name}: {sorted(missing)} not in the model, whose classes are {run['classes']}"
    if not overrides:
        assert not {c for c in run["classes"] if c.startswith("Moekernels")}, run["classes"]
    return run


@pytest.mark.parametrize("name, reference, rtol", COMPARISONS, ids=[c[0] for c in COMPARISONS])
def test_run_tracks_reference(results, name, reference, rtol):
    ours, ref = _get(results, name), _get(results, reference)
    loss_rtol, grad_rtol = rtol
    assert len(ours["losses"]) == len(ref["losses"]) == _titan.STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(ours["losses"], ref["losses"])]
    grads, ref_grads = torch.load(ours["expert_grads"]), torch.load(ref["expert_grads"])
    assert sorted(grads) == sorted(ref_grads) == ["w1_EFD", "w2_EDF", "w3_EFD"], sorted(grads)
    grad_rel = {k: rel_err(grads[k], ref_grads[k]) for k in sorted(ref_grads)}
    table = "\n".join(f"  step {i + 1}: {b:.6f} {a:.6f} ({r:.1e})"
                      for i, (a, b, r) in enumerate(zip(ours["losses"], ref["losses"], rel)))
    report = (f"{name} vs {reference}: loss by step, reference and ours (relative difference)\n{table}\n"
              f"  step-1 expert gradients, relative error: " + ", ".join(f"{k} {v:.1e}" for k, v in grad_rel.items()))
    print(report)  # with -s or -rP
    assert max(rel) <= loss_rtol, f"a step's loss is more than {loss_rtol:.0e} relative off\n{report}"
    assert max(grad_rel.values()) <= grad_rtol, f"expert gradients more than {grad_rtol:.0e} off\n{report}"
    if grad_rtol == FP8[1]:
        assert ours["losses"] != ref["losses"], f"{name} gave {reference}'s losses bit for bit: was it FP8?"
