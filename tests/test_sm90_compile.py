"""Every shipped Triton kernel config, compiled for Hopper (sm_90) by the real compiler.

The interpreter accepts code that the compiler rejects, so this is where a kernel proves it
compiles. Registers and spills come from the wheel's ptxas on the PTX (moekernels/_sm90.py).
"""

import functools
import json
import os
import subprocess
import sys

import pytest

from moekernels import _sm90, configs, fp8, grouped_gemm, plan, route
from moekernels.permute import SM90_PERMUTES

VARIANTS = (
    [f"topk_routing/{name}" for name in route.SM90_ROUTERS]
    + [f"{loss}/{name}" for name in route.SM90_LOSSES for loss in ("load_balancing_loss", "router_z_loss")]
    + [f"plan_{part}/{name}" for name in plan.SM90_PLANS for part in ("count", "scan", "scatter", "pad")]
    + [f"plan_scatter_single/{name}" for name in plan.SM90_PLANS]
    + list(SM90_PERMUTES)
    + [f"grouped_mm/{name}" for name in grouped_gemm.SM90_GEMMS]
    + [f"fp8_grouped_mm/{name}" for name in fp8.SM90_FP8_GEMMS]
    + [f"quantize_fp8/{name}{suffix}" for name, (g, r, c, _, _) in fp8.SM90_QUANTS.items()
       for suffix in (("_pass1", "_pass2") if configs.quant_config(*fp8.block_shape(g, r, c), r, c).two_pass
                      else ("",))]
)


@functools.cache
def reports():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "moekernels._sm90"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for r in json.loads(out.stdout)}


def test_every_shipped_variant_is_listed():
    assert sorted(reports()) == sorted(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_compiles_for_sm90(name):
    r = reports()[name]
    assert r["error"] is None, r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["stack_frame"] == 0, r
    assert 0 <= r["shared"] <= _sm90.HOPPER_SMEM_LIMIT, r
    assert r["registers"] <= 255, r
    if r["matrix"]:
        assert r["wgmma"], f"{name}: no wgmma in the PTX"


@pytest.mark.parametrize("name", [v for v in VARIANTS if v.startswith("topk_routing/")])
def test_routing_arithmetic_is_not_fused(name):
    """exp_f32 is bit-exact across backends only if no multiply-add is fused (kernels/_math.py)."""
    assert not reports()[name]["fma"], f"{name}: fma.rn.f32 in the PTX"


@pytest.mark.parametrize("name", list(SM90_PERMUTES))
def test_permutes_move_16_bytes_per_access(name):
    """Row moves are memory-bound: with H a multiple of 16 they must use 16-byte vector accesses."""
    assert reports()[name]["vector16"], f"{name}: no ld/st.global.v4 in the PTX"


@pytest.mark.parametrize("name", [f"grouped_mm/{n}" for n, v in grouped_gemm.SM90_GEMMS.items()
                                  if v[0] not in ("dw", "dw_gather", "unaligned")])
def test_grouped_gemm_loads_through_tma(name):
    """The weight tiles (and the rows, unless gathered) come through TMA descriptors."""
    assert reports()[name]["tma"], f"{name}: no cp.async.bulk.tensor in the PTX"


@pytest.mark.parametrize("name", [f"grouped_mm/{n}" for n, v in grouped_gemm.SM90_GEMMS.items() if v[0] != "unaligned"])
def test_grouped_gemm_pipelines_its_k_loop(name):
    """num_stages >= 3 keeps two K steps in flight: shared memory holds more than one stage of tiles
    (one stage of the 128x128x64 bf16 tiles is 32 KB; the report's 98 KB is three). Not the
    unaligned fallback: cp.async needs aligned 4-16 byte chunks, so its loads are plain."""
    variant, per_expert, n, k, dtype, _ = grouped_gemm.SM90_GEMMS[name.split("/")[1]]
    cfg = grouped_gemm.sm90_config(variant, per_expert, n, k, dtype)
    stage = configs.stage_bytes(cfg, dtype.itemsize, grouped_gemm.config_variant(variant))
    assert reports()[name]["shared"] >= 2 * stage, (reports()[name]["shared"], stage)


@pytest.mark.parametrize("name", [f"fp8_grouped_mm/{n}" for n in fp8.SM90_FP8_GEMMS])
def test_fp8_gemms_run_fp8_wgmma(name):
    """The scaled GEMMs multiply on e4m3 operands (wgmma ... .e4m3.e4m3), not upcast to bf16."""
    r = reports()[name]
    assert r["wgmma_fp8"] and r["tma"], r
