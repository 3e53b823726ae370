"""torchtitan's own trainer (``torchtitan.train.main``, torchtitan 0.3.0) with moekernels switched on by
``--override.imports``, against the same trainer stock: same config, seed and data, 4 steps on the CPU over
gloo, as 1 process and as 2 processes (FSDP 2 + EP 2: each process holds half the experts). tests/_titan.py
runs the trainer and holds the CPU workarounds. Importing torch and torchtitan costs ~6 s a process, so each
process runs its group of trainings in a row (a module fixture) and each test compares two of them.

Tolerances, on each step's loss (the global mean the trainer logs):
- bf16 (``experts``, ``routed_experts``, ``dispatcher``, FP8 dispatch): within 1e-3 relative of stock's. Stock
  casts the experts' operands to bf16 too; the two differ in rounding and summation order only, which moves
  step 1 (the same weights) by < 1e-5 and, through AdamW's first steps (which amplify tiny gradients to
  +-lr updates), step 4 by ~3e-4 here.
- FP8 experts (e4m3 GEMMs, DeepSeek-V3's (1, 128) / (128, 128) block scales): within 5e-3 relative of the same
  run in bf16. e4m3 rounds each operand by up to 2^-4 relative; measured here, the losses move by ~1.5e-4
  (the experts are a part of each layer and the loss averages over all tokens); 5e-3 leaves room for other
  data, while a wrong scale or layout moves the loss by far more. The FP8 runs must also differ from bf16's.
"""

import pytest

pytest.importorskip("torchtitan")  # the torchtitan extra; moekernels.integrations.torchtitan imports it

import _titan  # noqa: E402

M = "moekernels.integrations.torchtitan."
DSV3 = ("deepseek_v3", "deepseek_v3_debugmodel")  # dim 256, MoE hidden 256 (multiples of 128, as FP8 needs)
QWEN3 = ("_titan", "qwen3_moe_debug_1_layer")  # dim 256, MoE hidden 768, 64 experts, top-8
BF16, FP8 = 1e-3, 5e-3

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
    "dsv3 EP2 routed_experts_fp8": (2, DSV3, (M + "routed_experts_fp8",)),  # e4m3 GEMMs and e4m3 dispatch
}
COMPARISONS = [  # (run, reference run, relative tolerance)
    ("dsv3 routed_experts", "dsv3 stock", BF16),
    ("dsv3 experts", "dsv3 stock", BF16),
    ("qwen3 routed_experts", "qwen3 stock", BF16),
    ("dsv3 routed_experts_fp8", "dsv3 routed_experts", FP8),
    ("dsv3 EP2 experts+dispatcher", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 experts+dispatcher fp8", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 experts+dispatcher capacity 2.0", "dsv3 EP2 stock", BF16),
    ("dsv3 EP2 routed_experts_fp8", "dsv3 EP2 experts+dispatcher", FP8),
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
    return run["losses"]


@pytest.mark.parametrize("name, reference, rtol", COMPARISONS, ids=[c[0] for c in COMPARISONS])
def test_losses_track_reference(results, name, reference, rtol):
    ours, ref = _get(results, name), _get(results, reference)
    assert len(ours) == len(ref) == _titan.STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, ref)]
    table = "\n".join(f"  step {i + 1}: {b:.6f} {a:.6f} ({r:.1e})" for i, (a, b, r) in enumerate(zip(ours, ref, rel)))
    print(f"{name} vs {reference}: reference, ours (relative difference)\n{table}")  # with -s or -rP
    assert max(rel) <= rtol, f"{name}: a step's loss is more than {rtol:.0e} relative off {reference}'s\n{table}"
    if rtol == FP8:
        assert ours != ref, f"{name} gave {reference}'s losses bit for bit: did it run in FP8 at all?"
