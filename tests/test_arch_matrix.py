"""Configs per architecture and the compile matrix (issue 21, items 2 and 4).

The limits of each architecture are a pure function of its compute capability (configs.arch_limits),
so the configs a launcher picks on sm_80, sm_89, sm_100 or sm_120 are known without a device, and
every shipped Triton variant is compiled here with them (moekernels/_matrix.py, in one subprocess
per architecture, each (variant, architecture) compiled once and every check reading that one
result). sm_90 is not compiled again: tests/test_sm90_compile.py holds every variant to the sm_90
contract, which is stricter. A variant that cannot run on an architecture is listed with its
fallback (configs.variant_fallback), and its compile must still fail: a fallback that compiles is
stale.
"""

import functools
import json
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from moekernels import _sm90, configs, fp8, grouped_gemm

ARCHS = (80, 89, 100, 120)
NAMES = {a: [v.name for v in _sm90.shipped_variants(a)] for a in (90, *ARCHS)}
LIMITS = {a: configs.arch_limits(a) for a in ARCHS}
FALLBACK = {(a, n): configs.variant_fallback(n, LIMITS[a]) for a in ARCHS for n in NAMES[a]}
RUNS = [(a, n) for (a, n), f in FALLBACK.items() if f is None]
FALLS_BACK = [(a, n) for (a, n), f in FALLBACK.items() if f is not None]


@functools.cache
def matrix() -> dict:
    """(name, capability) -> the cell: the architectures compile in parallel subprocesses."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {a: subprocess.Popen([sys.executable, "-m", "moekernels._matrix", "--arch", str(a), "--check-fallbacks"],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in ARCHS}
    cells = {}
    for a, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err
        cells.update({(r["name"], a): r for r in json.loads(out)})
    return cells


def ids(cases):
    return [f"sm_{a}-{n}" for a, n in cases]


@pytest.mark.parametrize("capability", ARCHS)
def test_every_shipped_variant_has_a_cell(capability):
    assert sorted(n for n, a in matrix() if a == capability) == sorted(NAMES[capability])
    # The launchers' variant lists are Hopper's on every architecture (only their configs differ),
    # plus, where e4m3 goes as bytes, the weight-only GEMMs that fused_moe runs there.
    extra = set(NAMES[capability]) - set(NAMES[90])
    assert set(NAMES[90]) <= set(NAMES[capability])
    if configs.fp8_path(LIMITS[capability]) == "bytes":
        assert extra == {f"fp8_grouped_mm/{n}" for n in fp8.WEIGHT_ONLY_GEMMS}
    else:
        assert not extra


_BLOCK_FP8 = ("the (1, 128) x (128, 128) fp8 loop without wgmma: accumulators, the step's partial and the "
              "scales at 255 registers spill; no per-arch tile for it yet")
_PTXAS_BW = ("ptxas-blackwell (CUDA 12.9) gives this 4-warp row kernel 48-64 registers and spills 4-12 B, "
             "where ptxas 12.8 on sm_90a spills none")
# (capability, variant) -> why it spills today: strict xfails, so a fix must remove its entry.
KNOWN_SPILLS = {
    **{(89, f"fp8_grouped_mm/{n}"): _BLOCK_FP8 for n in (
        "fp8_block_gather_gated_kmajor", "fp8_block_gather_gated_kmajor_lora16", "fp8_block_scatter_kmajor",
        "fp8_block_gather_gated_kmajor_split")},
    **{(120, f"fp8_grouped_mm/{n}"): _BLOCK_FP8 for n in (
        "fp8_block_gather_gated_kmajor", "fp8_block_gather_gated_kmajor_lora16",
        "fp8_block_gather_gated_kmajor_split")},
    (100, "fp8_grouped_mm/fp8_block_gather_gated_kmajor_lora16"): "8 B at 255 registers: the LoRA segment after "
                                                                  "the block-scaled loop",
    (89, "fp8_grouped_mm/wgrad_segments"): "the fp8 weight gradient reads its segment copies by descriptors only: "
                                           "without TMA, plain loads at 255 registers (228 B)",
    (120, "grouped_mm/gather_gated_prefill_bf16_kmajor_lora16"): "12 B at 255 registers: the segment's tiles after "
                                                                 "two 128 x 64 accumulators",
    (100, "grouped_mm/gather_gated_prefill_bf16_kmajor_split"): "4 B: the up weight's second descriptor beside "
                                                                "two 128 x 64 accumulators (ptxas-blackwell; the "
                                                                "fused weight's variant spills none)",
    **{(80, f"fp8_grouped_mm/{n}"): f"{b} B: the byte route (e4m3 decoded to bf16 in registers by integer "
                                    "operations, then mma.sync) on Hopper's tile; no per-arch tile search for it yet"
       for n, b in (("fp8_block_prefill_kmajor", 172), ("fp8_block_prefill_kmajor_colscale", 172),
                    ("fp8_rowcol_prefill_kmajor", 724), ("fp8_tensor_prefill_kmajor", 580),
                    ("fp8_block_gather_gated_kmajor", 24), ("fp8_block_gather_gated_decode", 24),
                    ("fp8_block_gather_gated_kmajor_lora16", 16), ("fp8_block_scatter_kmajor", 156),
                    ("fp8_block_gather_gated_kmajor_split", 28), ("fp8_block_gather_gated_decode_split", 8),
                    ("w8a16_block_gather_gated_kmajor", 92), ("w8a16_block_gather_gated_decode", 100),
                    ("w8a16_block_scatter_kmajor", 96))},
    (80, "fp8_grouped_mm/wgrad_segments"): "14,168 B of stack at 32 registers: the fp8 weight gradient's byte route "
                                           "without TMA compiles degenerately on sm_80 (correct on the interpreter, "
                                           "tests/test_fp8_sm80.py); not looked into yet",
    (100, "permute_backward_bf16_h7168_k8"): _PTXAS_BW,
    (100, "load_balancing_loss/qwen3_e128"): _PTXAS_BW,
    (120, "load_balancing_loss/qwen3_e128"): _PTXAS_BW,
    (120, "plan_scatter/qwen15_e60_b64"): _PTXAS_BW,
}


def runs():
    return [pytest.param(a, n, id=f"sm_{a}-{n}", marks=pytest.mark.xfail(strict=True, reason=KNOWN_SPILLS[a, n]))
            if (a, n) in KNOWN_SPILLS else pytest.param(a, n, id=f"sm_{a}-{n}") for a, n in RUNS]


def test_known_spills_name_running_variants():
    assert set(KNOWN_SPILLS) <= set(RUNS)


@pytest.mark.parametrize("capability,name", runs())
def test_compiles_within_the_architecture(capability, name):
    cell, arch = matrix()[name, capability], LIMITS[capability]
    assert cell["error"] is None, cell["error"]
    assert cell["spill_stores"] == 0 and cell["spill_loads"] == 0, cell
    assert 0 <= cell["shared"] <= arch.smem_per_block, f"{name}: {cell['shared']} B > {arch.smem_per_block} B a block"
    assert cell["registers"] <= arch.max_registers, cell
    assert cell["programs_per_sm"] >= 1, f"{name}: no program fits an sm_{capability} SM ({cell['limited_by']})"
    if cell["matrix"]:
        assert cell["mma"] == [arch.mma], f"{name}: {cell['mma']} in the PTX, not {arch.mma}"


@pytest.mark.parametrize("capability,name", FALLS_BACK, ids=ids(FALLS_BACK))
def test_listed_fallbacks_cannot_compile(capability, name):
    """A variant listed with a fallback really cannot run there: when it compiles, the listing is
    stale and configs.variant_fallback must say so. (Empty today: every variant runs everywhere.)"""
    cell = matrix()[name, capability]
    assert cell["error"] is not None, cell


@pytest.mark.parametrize("capability", ARCHS)
def test_fp8_without_e4m3_mma_runs_on_bytes(capability):
    """Issue 21: 21 of 97 variants failed on sm_80 with "type fp8e4nv not supported in this
    architecture". Where the GPU has no e4m3 MMA every fp8 variant now compiles with e4m3 as its
    bytes (no e4m3 type left in the PTX), its GEMMs on bf16 mma.sync; elsewhere on e4m3."""
    fp8_cells = [c for (n, a), c in matrix().items() if a == capability and n.startswith(
        ("fp8_grouped_mm/", "quantize_fp8/", "quantize_fp8_segments/", "permute_fp8"))]
    assert len(fp8_cells) >= 21
    assert not FALLS_BACK
    if configs.fp8_path(LIMITS[capability]) == "bytes":
        assert not any(c["e4m3"] for c in fp8_cells), [c["name"] for c in fp8_cells if c["e4m3"]]
    elif LIMITS[capability].mma != "tcgen05":  # tcgen05 names the type in its instruction descriptor
        assert all(c["e4m3"] for c in fp8_cells if c["name"].startswith("fp8_grouped_mm/")
                   and "w8a16" not in c["name"])


# ----------------------------------------------------------------------------- the limits (no compile)


def test_arch_limits_table():
    """Issue 21: sm_80 164 KB an SM; sm_86, sm_89 and sm_120 100 KB; sm_90 and sm_100 228 KB; a
    block can opt into 1 KB less. The MMA each gets from Triton, and e4m3 from sm_89 on."""
    kb = 1024
    for cap, per_sm in {80: 164, 86: 100, 89: 100, 90: 228, 100: 228, 120: 100}.items():
        a = configs.arch_limits(cap)
        assert (a.smem_per_sm, a.smem_per_block) == (per_sm * kb, (per_sm - 1) * kb), cap
    assert {c: a.mma for c, a in configs.ARCH_LIMITS.items()} == {
        80: "mma.sync", 86: "mma.sync", 89: "mma.sync", 90: "wgmma", 100: "tcgen05", 120: "mma.sync"}
    assert [c for c, a in configs.ARCH_LIMITS.items() if not a.fp8] == [80, 86]
    assert configs.HOPPER.smem_per_sm == configs.HOPPER_SMEM_PER_SM
    assert (configs.HOPPER.target, configs.arch_limits(80).target, configs.arch_limits(120).target) == (
        "sm_90a", "sm_80", "sm_120a")


def test_arch_limits_inputs():
    assert configs.arch_limits((9, 0)) is configs.arch_limits("9.0") is configs.arch_limits(90) is configs.HOPPER
    assert configs.arch_limits((8, 7)).capability == 86  # the major's nearest lower entry
    assert configs.arch_limits((12, 1)).capability == 120
    with pytest.raises(ValueError, match="capability 75"):
        configs.arch_limits(75)
    with pytest.raises(TypeError, match="capability"):
        configs.arch_limits(9.0)


def _props(**over):
    base = dict(name="NVIDIA H100 80GB HBM3", major=9, minor=0, shared_memory_per_block_optin=227 * 1024,
                shared_memory_per_multiprocessor=228 * 1024, regs_per_multiprocessor=65536,
                max_threads_per_multi_processor=2048)
    return types.SimpleNamespace(**(base | over))


def test_device_limits_confirm_the_table():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert configs.device_limits(_props()) is configs.HOPPER
        assert configs.device_limits(_props(name="RTX 5090", major=12, shared_memory_per_block_optin=99 * 1024,
                                            shared_memory_per_multiprocessor=100 * 1024,
                                            max_threads_per_multi_processor=1536)) is configs.arch_limits(120)


def test_device_limits_report_a_mismatch():
    """A device that reports less than its table entry is reported, and the configs fit the less."""
    with pytest.warns(RuntimeWarning, match="smem_per_block = 101376, the sm_90 table says 232448"):
        got = configs.device_limits(_props(shared_memory_per_block_optin=99 * 1024))
    assert got.smem_per_block == 99 * 1024 and got.smem_per_sm == configs.HOPPER.smem_per_sm


GEMMS = [(name, *spec) for name, spec in grouped_gemm.SM90_GEMMS.items()]


@pytest.mark.parametrize("capability", (90, 100))
def test_hopper_configs_are_unchanged(capability):
    """Every shipped GEMM config fits sm_90 and sm_100 (227 KB a block) as Hopper chose it: the
    fit is the identity there, so the sm_90 contract and sm90_resources.json keep their facts."""
    arch = configs.arch_limits(capability)
    for name, variant, per_expert, n, k, dtype, kmajor, *_ in GEMMS:
        hopper = grouped_gemm.sm90_config(variant, per_expert, n, k, dtype, kmajor=kmajor)
        assert grouped_gemm.sm90_config(variant, per_expert, n, k, dtype, kmajor=kmajor, arch=arch) == hopper, name
    assert fp8.wgrad_config(32768, 256, 2048, 7168, None, arch) == fp8.wgrad_config(32768, 256, 2048, 7168, None)


@pytest.mark.parametrize("capability", (80, 89, 120))
def test_configs_fit_smaller_shared_memory(capability):
    """The gated decode tiles (16 x 64 x 128 bf16 with gate and up: 36 KB a K step) took 4 stages,
    108 KB on mma.sync (one buffer fewer than stages), over the 99 KB a block of sm_89 and sm_120
    (issue 21: the three variants that ran out there); 3 stages fit. sm_80's 163 KB keeps 4."""
    arch = configs.arch_limits(capability)
    for name, variant, per_expert, n, k, dtype, kmajor, *_ in GEMMS:
        cfg = grouped_gemm.sm90_config(variant, per_expert, n, k, dtype, kmajor=kmajor, arch=arch)
        kind = grouped_gemm.config_variant(variant)
        assert configs.gemm_smem(cfg, dtype.itemsize, kind, arch) + arch.smem_reserved <= arch.smem_per_block, name
    cfg = grouped_gemm.sm90_config("gated", 8, 2048, 7168, torch.bfloat16, arch=arch)
    assert cfg.num_stages == (4 if capability == 80 else 3)


def test_fit_shrinks_tiles_after_stages():
    small = configs.ArchLimits(0, 48 * 1024, 47 * 1024, 48, 16, 16, "mma.sync", tma=False, fp8=False)
    cfg = configs.GemmConfig(128, 128, 64, 8, False, 8, 4)  # 32 KB a K step
    got = configs.fit_gemm_config(cfg, 2, "plain", small)
    assert (got.num_stages, got.BLOCK_N, got.BLOCK_M, got.BLOCK_K) == (3, 32, 128, 64)  # 2 x 20 KB
    with pytest.raises(ValueError, match="fits"):
        configs.fit_gemm_config(cfg, 2, "plain", configs.ArchLimits(0, 4096, 3072, 48, 16, 16, "mma.sync",
                                                                    tma=False, fp8=False))


def test_programs_per_sm_use_the_architecture():
    """The sm_90 resource table sizes Hopper's grid only: on sm_120 a launch's programs per SM are
    the estimate with sm_120's 100 KB an SM (the 128 x 128 bf16 prefill tiles: 64 KB, one)."""
    bf16, arch = torch.bfloat16, configs.arch_limits(120)
    for capability in (90, 120):
        a = configs.arch_limits(capability)
        cfg = configs.grouped_mm_config("plain", 512 * 128, 128, 2048, 768, bf16, arch=a)
        cx = grouped_gemm.kernel_constexprs(cfg, a_tma=True, b_tma=True, kmajor=True, gather=False, scatter=False,
                                            act=0, scale=0, block_e=128)
        got = grouped_gemm.programs_per_sm(cfg, cx, bf16, bf16, cfg.num_stages, a)
        if capability == 90:
            key = configs.launch_key("grouped_mm_kernel", bf16, bf16, cx, cfg.num_warps, cfg.num_stages)
            assert got == configs.sm90_programs_per_sm(key) == 2
        else:
            assert got == configs.programs_per_sm(cfg, 2, "plain", 1, arch) == 1


@pytest.mark.parametrize("capability,want", [(80, "bytes"), (86, "bytes"), (89, "e4m3"), (90, "e4m3"), (120, "e4m3")])
def test_fp8_path_per_architecture(capability, want):
    """Without e4m3 in Triton (sm_80, sm_86) the fp8 ops take e4m3 as bytes (tests/test_fp8_sm80.py
    runs that route), 8.7 taking 8.6's entry."""
    assert configs.fp8_path(configs.arch_limits(capability)) == want
    assert configs.fp8_path(configs.arch_limits((8, 7))) == "bytes"


@pytest.mark.parametrize("kmajor", [True, False])
@pytest.mark.parametrize("rows", [1, 37])  # a decode step's tiles (swap-AB) and the prefill tiles
def test_launch_without_tma_matches_float64(monkeypatch, kmajor, rows):
    """A launch on an architecture without TMA (sm_80's limits, interpreted on CPU tensors): both
    operands by pointer (not descriptors), the configs fitted to sm_80, against float64. 4 experts
    (one empty), K = 48 and N = 40: no multiple of a tile."""
    from test_grouped_gemm import exact_mm, make_offs, make_weight

    from conftest import rel_err

    seen = []
    constexprs = grouped_gemm.kernel_constexprs
    monkeypatch.setattr(grouped_gemm, "device_arch", lambda device: configs.arch_limits(80))
    monkeypatch.setattr(grouped_gemm, "kernel_constexprs", lambda cfg, **kw: seen.append(kw) or constexprs(cfg, **kw))
    x = torch.randn(rows, 48).to(torch.bfloat16)
    w = make_weight(4, 48, 40, torch.bfloat16, "cpu", kmajor)
    offs = make_offs(rows, 4)
    out = grouped_gemm.grouped_mm(x, w, offs, backend="triton")
    assert [(kw["a_tma"], kw["b_tma"]) for kw in seen] == [(False, False)]
    assert rel_err(out, exact_mm(x, w, offs)) <= 2**-7
