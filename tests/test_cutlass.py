"""The opt-in CUTLASS FP8 grouped GEMM (csrc/fp8_grouped_cutlass*.cu, moekernels/_cutlass.py), issue 23.

Two kernels: Hopper's (sm_90a, fp8_grouped_cutlass.cu) and datacenter Blackwell's (sm_100a,
fp8_grouped_cutlass_sm100.cu), chosen by the GPU's capability. Without a GPU: their static contracts read from the
built .so (each arch's SASS and resources), the device set-up's CPU twin (against the set-up's own code run on the
host, for sm_100a's scale layouts) and CUTLASS's scale layouts emulated against our tensors' strides and the
reference, and the op's errors. With one (``gpu``, benchmarks/device_check.sh; an sm_90 or sm_100 GPU): the set-up
kernel against its twin, bit for bit, and the op against the Triton FP8 path and the reference at DeepSeek-V3's
shapes.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch

import moekernels
from moekernels import _cutlass, _ext, fp8, reference
from moekernels.fp8 import fp8_grouped_mm, prepare_weight, quantize_fp8
from tests.conftest import rel_err
from tests.test_cuda_ext import _cuobjdump, load_setup

needs_cutlass = pytest.mark.skipif(bool(_ext.CUTLASS_ERROR),
                                   reason=f"the CUTLASS kernel is not built: {_ext.CUTLASS_ERROR}")
_WHY = _ext.CUTLASS_ERROR or "not in its arch list"
needs_sm90a = pytest.mark.skipif("sm_90a" not in _cutlass.BUILT_ARCHS, reason=f"no sm_90a CUTLASS kernel built: {_WHY}")
needs_sm100a = pytest.mark.skipif("sm_100a" not in _cutlass.BUILT_ARCHS,
                                  reason=f"no sm_100a CUTLASS kernel built: {_WHY}")
SUFFIX = {arch: suffix for arch, suffix in _cutlass.KERNEL_ARCHS.values()}  # "sm_100a" -> "_sm100"


def operands(counts, n, k, *, col_major=False, device="cpu", seed=0):
    """DeepSeek-V3's operands: a [M, K] with (1, 128) scales, the weight [E, K, N] with (128, 128) ones."""
    g = torch.Generator(device).manual_seed(seed)  # on the GPU there: E 32 x 7168 x 4096 is 3.7 GB in float32
    x = torch.randn(sum(counts), k, generator=g, device=device).to(torch.bfloat16)
    w = (torch.randn(len(counts), k, n, generator=g, device=device) / k ** 0.5).to(torch.bfloat16)
    a, sa = quantize_fp8(x, (1, 128), scale_layout="col_major" if col_major else "row_major")
    b, sb = prepare_weight(w, (128, 128))
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    return a, sa, b, sb, offs


# ----------------------------------------------------------------------------- the static contract


def _gemm_image(arch):
    """(name, resources, SASS) of the one CUTLASS GEMM in the .so's image for arch."""
    usage = _cuobjdump("-res-usage", "-arch", arch)
    found = re.findall(r"Function (\S*GemmUniversal\S*):\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+[^\n]*)", usage)
    assert len(found) == 1, f"one CUTLASS GEMM instantiation in the {arch} image (build time: ~45 s of nvcc each)"
    name, resources = found[0]
    return name, resources, _cuobjdump("-sass", "-arch", arch, "-fun", name)


@pytest.fixture(scope="module")
def gemm_sass():
    """(name, resources, SASS) of the CUTLASS kernel's sm_90a image."""
    return _gemm_image("sm_90a")


@needs_sm90a
def test_contract_is_the_fp8_blockwise_cooperative_kernel(gemm_sass):
    name, _, _ = gemm_sass
    assert "KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise" in name
    assert "MMA_64x128x32_F32E4M3E4M3" in name  # 2 consumer warpgroups x 64 rows of the 128x128 tile


def _ops(sass):
    """(address, instruction) of each SASS line."""
    return [(int(addr, 16), text.strip()) for addr, text in re.findall(r"/\*([0-9a-f]+)\*/\s+([^;]*);", sass)]


def main_loop(ops):
    """The (start, end) addresses of the innermost loop (a branch back to an earlier address) that issues QGMMA.
    The others: the persistent loop over tiles around it, and the barrier waits' retry paths past the kernel's
    end that branch back into it."""
    return _loop_with(ops, "QGMMA")


def _loop_with(ops, pattern):
    """The innermost loop (start, end) whose body has an instruction matching pattern."""
    loops = []
    for addr, text in ops:
        m = re.search(r"\bBRA(?:\.\w+)?\s+(?:\S+,\s*)?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            start = int(m.group(1), 16)
            if any(start <= a <= addr and re.search(pattern, t) for a, t in ops):
                loops.append((start, addr))
    return min(loops, key=lambda loop: loop[1] - loop[0])


@needs_sm90a
def test_contract_instructions(gemm_sass):
    """QGMMA e4m3 (Hopper's fp8 wgmma) in the main loop, TMA loads (A multicast to the cluster), setmaxnreg
    (warp specialization: the producer warpgroup gives registers to the two consumers), the TMA store of D."""
    _, _, sass = gemm_sass
    ops = _ops(sass)
    qgmma = [a for a, t in ops if re.search(r"\bQGMMA\.64x128x32\.F32\.E4M3\.E4M3\b", t)]
    # A 128-deep K tile is 4 k-steps of 32 for each consumer warpgroup's 64x128: 4 in the main loop, 4 in the
    # first K tile peeled before it and 4 in a second peeled copy. Counted so that a change of schedule or
    # tile shows here (the ping-pong trial had 24: 128 rows a warpgroup).
    assert len(qgmma) == 12, len(qgmma)
    start, end = main_loop(ops)
    body = [t for a, t in ops if start <= a <= end]
    assert sum("QGMMA" in t for t in body) == 4
    # The block-scale promotion: each K tile's partial (64 fp32 a thread) times its scales into the accumulator.
    assert sum(bool(re.match(r"(@!?P\d )?FFMA\b", t)) for t in body) == 64
    assert not any(re.search(r"\b(LDL|STL)\b", t) for t in body)
    loads = re.findall(r"\bUTMALDG\.2D(\.MULTICAST)?\b", sass)
    assert sorted(loads) == ["", ".MULTICAST"], loads  # B per CTA; A multicast across the 1x2 cluster
    assert re.findall(r"\bUSETMAXREG\.(\S+) (?:UP0, )?(0x[0-9a-f]+)", sass) == [
        ("TRY_ALLOC.CTAPOOL", "0xe8"), ("DEALLOC.CTAPOOL", "0x28")]  # consumers 232 registers, producer 40
    assert re.search(r"\bUTMASTG\.2D\b", sass)  # the epilogue's TMA store of D


@needs_sm90a
def test_contract_registers_no_spills(gemm_sass):
    """ptxas -v at build: 168 registers, 0 bytes stack frame, 0 bytes spill stores/loads, 2 barriers. The
    issue's ping-pong 128x128x128 trial spilled 704 bytes (each warpgroup held the whole 128x128 accumulator and
    its promotion temporaries, 256 registers over setmaxnreg's 240); cooperative halves it."""
    _, resources, sass = gemm_sass
    fields = dict(re.findall(r"(\w+):(\d+)", resources))
    assert int(fields["REG"]) == 168, resources  # 65536 / 384 threads, rounded down to 8; setmaxnreg then moves them
    assert fields["STACK"] == "0" and fields["LOCAL"] == "0", resources
    assert not re.search(r"\b(LDL|STL)\b", sass), "local memory (spills) in the CUTLASS kernel"
    assert set(re.findall(r"\bBAR\.\w+(?:\.\w+)* (0x[0-9a-f]+)", sass)) == {"0x0", "0x1"}  # ptxas: 2 barriers


# ----------------------------------------------------------------------------- sm_100a's static contract


@pytest.fixture(scope="module")
def sm100_sass():
    """(name, resources, SASS) of the CUTLASS kernel's sm_100a image (triton 3.6's cuobjdump, CUDA 12.8, reads it)."""
    return _gemm_image("sm_100a")


def _body(ops, loop):
    return [t for a, t in ops if loop[0] <= a <= loop[1]]


@needs_sm100a
def test_sm100_contract_is_example_81s_2sm_kernel(sm100_sass):
    """Example 81's grouped blockwise kernel on 2 SMs: the mainloop with 8 smem stages, 1 scheduler stage and 4 TMEM
    accumulator stages, tcgen05's f8f6f4 MMA across a 2x1 cluster, its TMA loads, and the ptr-array epilogue."""
    name, _, _ = sm100_sass
    assert "MainloopSm100ArrayTmaUmmaWarpSpecializedBlockwiseScalingILi8ELi1ELi4E" in name
    assert "SM100_MMA_F8F6F4_2x1SM_SS" in name and "SM100_TMA_2SM_LOAD" in name
    assert "Sm100PtrArrayTmaWarpSpecialized" in name and "SM100_TMEM_LOAD_32dp32b32x" in name


@needs_sm100a
def test_sm100_contract_instructions(sm100_sass):
    """The warps' loops, each its own (warp specialization, no setmaxnreg-starved warp doing two jobs):
    - MMA warp: 4 UTCQMMA.2CTA (tcgen05.mma kind::f8f6f4 over the pair's 256x128, K 32 each: a 128-deep K tile)
      and 2 UTCBAR.2CTA.MULTICAST (the commits that free the smem stage and hand the partial to the epilogue);
    - TMA warp: UTMALDG.2D.2CTA of A and B (a copy of the loop for a group's first tile, 2 in each);
    - scale warp: LDGSTS (cp.async) of the K tile's scales, 4 for A's 128 rows (32 lanes x 4 B) and 1 for B's;
    - epilogue warps: 4 LDTM.x32 (the partial's 128 fp32 of a thread's row from TMEM) then 1 FMUL (sfa * sfb) and
      128 FFMA (acc += partial * scale) a K tile, no local memory; setmaxnreg gives them 256 registers (0x100),
      the other warps keep 48 (0x30); the tile leaves by 4 UTMASTG.2D."""
    _, _, sass = sm100_sass
    ops = _ops(sass)
    assert len([t for _, t in ops if re.search(r"\bUTCQMMA\b", t)]) == 4  # the main loop's alone: nothing peeled
    mma = _body(ops, _loop_with(ops, r"\bUTCQMMA\b"))
    assert [re.match(r"\S+", t).group() for t in mma if "UTCQMMA" in t or "UTCBAR" in t] == \
        ["UTCQMMA.2CTA"] * 4 + ["UTCBAR.2CTA.MULTICAST"] * 2
    tma = _body(ops, _loop_with(ops, r"\bUTMALDG\b"))
    assert [t.split()[0] for t in tma if "UTMALDG" in t] == ["UTMALDG.2D.2CTA"] * 2
    assert len(re.findall(r"\bUTMALDG\.2D\.2CTA\b", sass)) == 4
    scales = _body(ops, _loop_with(ops, r"\bLDGSTS\b"))
    assert sum(bool(re.match(r"(@!?P\d )?LDGSTS\.E\b", t)) for t in scales) == 5
    assert sum(t.startswith("ARRIVES.LDGSTSBAR") for t in scales) == 1  # the cp.asyncs' arrival on the stage's barrier
    promote = _body(ops, _loop_with(ops, r"\bLDTM\b"))
    assert sum(bool(re.match(r"LDTM\.x32\b", t)) for t in promote) == 4
    assert sum(bool(re.match(r"(@!?P\d )?FFMA\b", t)) for t in promote) == 128
    assert sum(bool(re.match(r"(@!?P\d )?FMUL\b", t)) for t in promote) == 1
    assert not any(re.search(r"\b(LDL|STL)\b", t) for t in promote + mma + tma + scales)
    assert sorted(set(re.findall(r"\bUSETMAXREG\.(\S+) (?:UP0, )?(0x[0-9a-f]+)", sass))) == [
        ("DEALLOC.CTAPOOL", "0x30"), ("TRY_ALLOC.CTAPOOL", "0x100")]
    assert len(re.findall(r"\bUTMASTG\.2D\b", sass)) == 4


@needs_sm100a
def test_sm100_contract_registers_no_spills(sm100_sass):
    """ptxas -v at build: 168 registers (65536 / 384 threads: 12 warps, rounded down to 8), 0 bytes stack, no
    spill stores or loads anywhere in the kernel (the 1-SM schedule measured the same), named barriers 0, 1 and 6
    (ptxas: 7 barriers, the highest id + 1)."""
    _, resources, sass = sm100_sass
    fields = dict(re.findall(r"(\w+):(\d+)", resources))
    assert int(fields["REG"]) == 168, resources
    assert fields["STACK"] == "0" and fields["LOCAL"] == "0", resources
    assert not re.search(r"\b(LDL|STL)\b", sass), "local memory (spills) in the sm_100a CUTLASS kernel"
    assert set(re.findall(r"\bBAR\.\w+(?:\.\w+)* (0x[0-9a-f]+)", sass)) == {"0x0", "0x1", "0x6"}


@needs_cutlass
def test_each_cutlass_kernel_is_in_its_arch_image_alone():
    """Hopper's kernel in the sm_90a image, Blackwell's in the sm_100a image, neither anywhere else."""
    for arch in (a for a in _ext.BUILD_ARCHS if a.startswith("sm_")):
        names = re.findall(r"Function (\S*GemmUniversal\S*):", _cuobjdump("-res-usage", "-arch", arch))
        hopper = [n for n in names if "KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise" in n]
        blackwell = [n for n in names if "MainloopSm100ArrayTmaUmmaWarpSpecializedBlockwiseScaling" in n]
        assert len(names) == len(hopper) + len(blackwell), arch
        assert (len(hopper), len(blackwell)) == ((arch == "sm_90a") * (arch in _cutlass.BUILT_ARCHS),
                                                 (arch == "sm_100a") * (arch in _cutlass.BUILT_ARCHS)), arch


# ----------------------------------------------------------------------------- CUTLASS's scale layouts


def test_cute_offset_splits_coordinates_colexicographically():
    # ((2, 3), 4):((1, 8), 2) at 7 = (7 % 6, 7 // 6) = ((1, 0), 1): 1 + 2; at (4, 3) = ((0, 2), 3): 16 + 6
    assert _cutlass.cute_offset(((2, 3), 4), ((1, 8), 2), 7) == 3
    assert _cutlass.cute_offset(((2, 3), 4), ((1, 8), 2), (4, 3)) == 22


@pytest.mark.parametrize("arch", [pytest.param("sm_90a", marks=needs_sm90a),
                                  pytest.param("sm_100a", marks=needs_sm100a)])
@pytest.mark.parametrize("mnk", [(200, 256, 384), (1, 128, 128), (129, 384, 7168), (0, 128, 256)], ids=str)
def test_scale_layout_is_the_built_kernels(mnk, arch):
    """The emulation and our tensors' layouts against the ScaleConfig each kernel was built with (host code):
    Sm90BlockwiseScaleConfig and Sm100BlockwiseScaleConfig, both <1, 128, 128, K, K>."""
    m, n, k = mnk
    sfa = torch.full((m, k // 128), -1, dtype=torch.int64)
    sfb = torch.full((n // 128, k // 128), -1, dtype=torch.int64)
    getattr(_ext.C, "fp8_grouped_cutlass_scale_offsets" + SUFFIX[arch])(m, n, k, sfa.data_ptr(), sfb.data_ptr())
    assert torch.equal(_cutlass.scale_offsets(m, k, 1, 128, _cutlass.SFA_MAJOR), sfa)
    assert torch.equal(_cutlass.scale_offsets(n, k, 128, 128, _cutlass.SFB_MAJOR), sfb)
    # quantize_fp8's row-major scales and prepare_weight's [E, K/128, N/128] (its storage's transposed view), by
    # their strides: the same offsets from an expert's first element
    _, sa, _, sb, _ = operands([m, 1], n, k)
    assert torch.equal(_strided_offsets(sa[:m]), sfa)
    assert torch.equal(_strided_offsets(sb[1].transpose(0, 1)), sfb)


def test_scale_layout_matches_cutlass_compiled(tmp_path):
    """The emulated tile_atom_to_shape_SFA/SFB, K- and MN-major (the default, which the kernel does not use),
    against CUTLASS's own compiled on the host (nvcc, no GPU; ~15 s, one compile), where its headers are."""
    nvcc = shutil.which("nvcc")
    includes, why = load_setup().find_cutlass()  # where the build finds them
    if not nvcc or not includes:
        pytest.skip(f"needs nvcc and CUTLASS's headers: {why or 'no nvcc'}")
    cases = [(200, 256, 384), (1, 128, 128), (129, 384, 7168)]  # (M, N, K)
    src = tmp_path / "layout.cu"
    src.write_text(f"""
#include <cstdio>
#include "cutlass/detail/blockwise_scale_layout.hpp"
template <class C> void print(int m, int n, int k) {{
  auto la = C::tile_atom_to_shape_SFA(cute::make_shape(m, n, k, 1));
  auto lb = C::tile_atom_to_shape_SFB(cute::make_shape(m, n, k, 1));
  for (int i = 0; i < m; ++i) for (int j = 0; j < k; j += 128) printf("%d ", int(la(i, j, 0)));
  printf("\\n");
  for (int i = 0; i < n; i += 128) for (int j = 0; j < k; j += 128) printf("%d ", int(lb(i, j, 0)));
  printf("\\n");
}}
using K = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128, cute::GMMA::Major::K, cute::GMMA::Major::K>;
using MN = cutlass::detail::Sm90BlockwiseScaleConfig<1, 128, 128>;  // the default: MN-major
int main() {{
  int cases[][3] = {{{', '.join('{%d, %d, %d}' % c for c in cases)}}};
  for (auto& c : cases) {{ print<K>(c[0], c[1], c[2]); print<MN>(c[0], c[1], c[2]); }}
}}
""")
    exe = tmp_path / "layout"
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-I", includes[0], str(src),
                    "-o", str(exe)], check=True, capture_output=True)
    lines = iter(subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines())
    for m, n, k in cases:
        for major in ("K", "MN"):
            for rows, vec in ((m, 1), (n, 128)):  # SFA, then SFB
                want = [int(v) for v in next(lines).split()]
                assert _cutlass.scale_offsets(rows, k, vec, 128, major).reshape(-1).tolist() == want, (m, n, k, major)


def _strided_offsets(t: torch.Tensor) -> torch.Tensor:
    """Each element's offset from t's first, by its strides."""
    rows, cols = t.shape
    return torch.arange(rows)[:, None] * t.stride(0) + torch.arange(cols)[None, :] * t.stride(1)


def test_scale_layouts_match_ours_without_a_copy():
    """K-major SFA is quantize_fp8's row-major scales from each expert's first row on; K-major SFB is
    prepare_weight's [E, N/128, K/128] storage from each expert's on: no copy. MN-major SFA would be [K/128, M_e]
    packed per expert, which the col_major scales ([K/128, M] with stride M) are not: they are copied."""
    counts, n, k = [3, 0, 130, 1], 256, 384
    _, sa, _, sb, _ = operands(counts, n, k)
    _, sa_col, _, _, _ = operands(counts, n, k, col_major=True)
    start = 0
    for e, rows in enumerate(counts):
        ours = _strided_offsets(sa[start:start + rows]) if rows else torch.empty(0, k // 128, dtype=torch.int64)
        assert torch.equal(_cutlass.scale_offsets(rows, k, 1, 128, _cutlass.SFA_MAJOR), ours)
        if rows > 1:  # the column-major scales' M stride is M, not M_e: CUTLASS's MN-major map differs
            col = _strided_offsets(sa_col[start:start + rows])
            assert not torch.equal(_cutlass.scale_offsets(rows, k, 1, 128, "MN"), col)
        storage = sb[e].transpose(0, 1)  # the [N/128, K/128] view CUTLASS reads
        assert torch.equal(_cutlass.scale_offsets(n, k, 128, 128, _cutlass.SFB_MAJOR), _strided_offsets(storage))
        start += rows


# ----------------------------------------------------------------------------- the device set-up's twin


BASES = dict(a=0x7F0000000000, b=0x7F1000000000, d=0x7F2000000000, sfa=0x7F3000000000, sfb=0x7F4000000000)


def emulate(a, sa, b, sb, offs):
    """What the kernel computes, from the twin's set-up alone: each expert's (M, N, K), pointers and strides
    into flat copies of the operands' storage, and its scales through CUTLASS's (emulated) K-major layouts."""
    groups, k, n = b.shape
    flat = dict(a=a.float().reshape(-1), b=b.transpose(1, 2).contiguous().float().reshape(-1),
                sfa=sa.contiguous().reshape(-1), sfb=sb.transpose(1, 2).contiguous().reshape(-1))
    setup = _cutlass.read_setup(_cutlass.setup_twin(offs, n, k, **BASES), groups)
    out = torch.zeros(a.shape[0] * n)
    for e in range(groups):
        m, n_e, k_e = setup["shapes"][e].tolist()
        assert (n_e, k_e) == (n, k)
        if not m:
            continue
        at = lambda name, size: (int(setup[name][e]) - BASES[name.lower()]) // size  # noqa: E731
        a_e = flat["a"].as_strided((m, k), (int(setup["stride_A"][e]), 1), at("A", 1))
        b_e = flat["b"].as_strided((n, k), (int(setup["stride_B"][e]), 1), at("B", 1))
        sfa = flat["sfa"][at("SFA", 4) + _cutlass.scale_offsets(m, k, 1, 128, "K")]
        sfb = flat["sfb"][at("SFB", 4) + _cutlass.scale_offsets(n, k, 128, 128, "K")]
        a_deq = a_e * sfa.repeat_interleave(128, 1)
        b_deq = b_e * sfb.repeat_interleave(128, 0).repeat_interleave(128, 1)
        d = (int(setup["D"][e]) - BASES["d"]) // 2
        out.as_strided((m, n), (int(setup["stride_D"][e]), 1), d).copy_(a_deq @ b_deq.T)
    return out.reshape(a.shape[0], n)


@pytest.mark.parametrize("counts", [[3, 0, 130, 1], [0, 0, 5], [256, 128], [0]], ids=str)
def test_setup_twin_against_the_reference(counts):
    """Zero-row experts, M % 128 != 0, one row: the twin's shapes, offsets and scale index maps give the
    reference's product (fp8_grouped_mm's torch backend), with no padding."""
    a, sa, b, sb, offs = operands(counts, 256, 384)
    want = fp8_grouped_mm(a, sa, b, sb, offs, backend="torch").float()
    got = emulate(a, sa, b, sb, offs).bfloat16()  # the reference rounds its float32 product to bfloat16 too
    assert rel_err(got, want) < 1e-4  # a bfloat16 ulp here and there (float32 sums in another order)


@needs_sm90a
def test_setup_buffer_and_workspace_sizes_are_the_builds():
    """Host code, no GPU: the twin's buffer layout has the built kernel's size; CUTLASS's can_implement accepts the
    arguments the op makes (workspace_bytes runs it, and raises where it fails); its workspace is its TMA
    descriptors, 128 B each, a set an SM: A and B for the mainloop, D for each of the 2 epilogue warpgroups (no C)."""
    for groups in (1, 3, 32, 257):
        assert _ext.C.fp8_grouped_cutlass_setup_bytes(groups) == _cutlass.setup_bytes(groups)
    assert _ext.C.fp8_grouped_cutlass_workspace_bytes(32, 132) == _ext.C.fp8_grouped_cutlass_workspace_bytes(8, 132)
    assert _ext.C.fp8_grouped_cutlass_workspace_bytes(32, 132) == 4 * 128 * 132


@needs_sm100a
@pytest.mark.parametrize("counts", [[3, 0, 130, 1], [0, 0, 5], [0]], ids=str)
def test_sm100_setup_twin_is_the_setup_code(counts):
    """sm_100a's set-up (csrc/fp8_grouped_cutlass_setup.cuh's write_entry, the code its kernel runs) executed on the
    host, byte for byte against the twin: shapes, pointers, strides, and each expert's SFA and SFB layouts as
    CUTLASS's own tile_atom_to_shape_SFA/SFB build them (so the twin's field order is the compiled Layout's)."""
    n, k = 384, 7168
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    groups = len(counts)
    buf = torch.full((_ext.C.fp8_grouped_cutlass_setup_bytes_sm100(groups),), 0xAB, dtype=torch.uint8)
    assert buf.numel() == _cutlass.setup_bytes(groups, "sm_100a")
    _ext.C.fp8_grouped_cutlass_setup_host_sm100(offs.data_ptr(), groups, n, k, *BASES.values(), buf.data_ptr())
    want = _cutlass.setup_twin(offs, n, k, **BASES, arch="sm_100a")
    want[groups * 12:(groups * 12 + 15) // 16 * 16] = 0xAB  # the shapes' padding to 16 bytes, written by neither
    assert torch.equal(buf, want)  # every other byte written, and as the twin writes it
    fields = _cutlass.read_setup(buf, groups, "sm_100a")
    rows = torch.tensor(counts, dtype=torch.int32)
    assert torch.equal(fields["layout_SFA"][:, 0], rows) and torch.equal(fields["layout_SFA"][:, 4], rows * 56)
    assert fields["layout_SFB"].tolist() == [[3, 56, 1, 56, 168]] * groups
    # The layouts as the kernel reads them (K-major: ((vec, blocks), (128, K/128), L):((0, stride), (0, 1), L's)):
    # the same index map as the emulation's, which test_scale_layout_is_the_built_kernels ties to our strides.
    for e, rows_e in enumerate(counts):
        for name, vec, count in (("layout_SFA", 1, rows_e), ("layout_SFB", 128, n)):
            blocks, kb, one, stride, l_stride = fields[name][e].tolist()
            layout = (((vec, blocks), (128, kb), one), ((0, stride), (0, 1), l_stride))
            offsets = [[_cutlass.cute_offset(*layout, (r * vec, c * 128, 0)) for c in range(kb)] for r in range(blocks)]
            assert offsets == _cutlass.scale_offsets(count, k, vec, 128, "K").tolist()
    # and the set-up's first part is the Hopper kernel's (one Setup template in C++, one twin here)
    hopper = _cutlass.setup_twin(offs, n, k, **BASES)
    assert torch.equal(_cutlass.setup_twin(offs, n, k, **BASES, arch="sm_100a")[:hopper.numel()], hopper)


@needs_sm100a
def test_sm100_setup_buffer_and_workspace_sizes():
    """Host code, no GPU: CUTLASS's can_implement accepts the sm_100a kernel's arguments (workspace_bytes runs it);
    its workspace is its TMA descriptors, 128 B each, a set an SM (B200: 148): A and B for the mainloop, D for the
    epilogue (one epilogue warpgroup here, Hopper's kernel has two), whatever the number of experts."""
    for groups in (1, 3, 32, 257):
        assert _ext.C.fp8_grouped_cutlass_setup_bytes_sm100(groups) == _cutlass.setup_bytes(groups, "sm_100a")
        assert _ext.C.fp8_grouped_cutlass_workspace_bytes_sm100(groups, 148) == 3 * 128 * 148


def test_setup_twin_fields():
    offs = torch.tensor([3, 3, 133, 140], dtype=torch.int32)
    s = _cutlass.read_setup(_cutlass.setup_twin(offs, 256, 384, **BASES), 4)
    assert s["shapes"].tolist() == [[3, 256, 384], [0, 256, 384], [130, 256, 384], [7, 256, 384]]
    assert (s["A"] - BASES["a"]).tolist() == [0, 3 * 384, 3 * 384, 133 * 384]
    assert (s["B"] - BASES["b"]).tolist() == [e * 256 * 384 for e in range(4)]
    assert (s["D"] - BASES["d"]).tolist() == [0, 3 * 512, 3 * 512, 133 * 512]
    assert (s["SFA"] - BASES["sfa"]).tolist() == [0, 3 * 12, 3 * 12, 133 * 12]
    assert (s["SFB"] - BASES["sfb"]).tolist() == [e * 2 * 3 * 4 for e in range(4)]
    assert s["stride_A"].tolist() == [384] * 4 and s["stride_D"].tolist() == [256] * 4
    # a decreasing offs: an empty expert, not a negative M
    bad = _cutlass.read_setup(_cutlass.setup_twin(torch.tensor([5, 2], dtype=torch.int32), 256, 384, **BASES), 2)
    assert bad["shapes"][:, 0].tolist() == [5, 0]


# ----------------------------------------------------------------------------- the op's errors


def test_cutlass_backend_says_why_it_cannot_run():
    a, sa, b, sb, offs = operands([3, 5], 256, 384)
    with pytest.raises(RuntimeError, match="backend='cutlass' cannot run this call: .*(not built|built without|"
                                           "needs CUDA tensors)"):
        fp8_grouped_mm(a, sa, b, sb, offs, backend="cutlass")
    with pytest.raises(RuntimeError, match="backend='cutlass' cannot run this call"):  # fp8_mm: one group
        moekernels.fp8_mm(a, sa, b[0], sb[0], backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of"):  # a name of the fp8 GEMMs' alone
        moekernels.grouped_mm(a.float(), b.float(), offs, backend="cutlass")


@needs_cutlass
def test_dispatch_by_capability_names_why(monkeypatch):
    """sm_90 -> the Hopper kernel, sm_100 -> the Blackwell one (their arch-specific code runs on that capability
    alone); any other GPU is refused naming its capability, and a kernel missing from the build names the list.
    The GPU is faked: these reasons come before any CUDA call."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = torch.device("cuda", 0)
    for capability, words in [((8, 0), "8.0"), ((10, 3), "10.3"), ((12, 0), "sm_120a"), ((9, 0), "including 9.0")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        monkeypatch.setattr(_cutlass, "BUILT_ARCHS", ("sm_100a",))  # 9.0's kernel "not built" for the last case
        reason = _cutlass.unavailable(cuda)
        assert words in reason, reason
        if capability != (9, 0):
            assert "sm_90a (Hopper, 9.0) and sm_100a (B200/GB200, 10.0)" in reason
    for capability, name in [((10, 0), "fp8_grouped_mm_cutlass_sm100"), ((9, 0), "fp8_grouped_mm_cutlass")]:
        if hasattr(_ext.C, name):  # built
            monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
            assert _cutlass.binding(_cutlass.KERNEL, cuda) is getattr(_ext.C, name)


def test_operand_problems_name_the_argument():
    a, sa, b, sb, offs = operands([3, 5], 256, 384)
    ok = _cutlass.operand_problem
    assert ok(a, sa, b, sb, offs, torch.bfloat16) is None
    assert "out_dtype" in ok(a, sa, b, sb, offs, torch.float32)
    assert "b must be the transposed view" in ok(a, sa, b.contiguous(), sb, offs, torch.bfloat16)
    assert "a_scale" in ok(a, sa[:, :1], b, sb, offs, torch.bfloat16)
    assert "offs" in ok(a, sa, b, sb, offs.long(), torch.bfloat16)
    a2, sa2, b2, sb2, offs2 = operands([3, 5], 200, 384)
    assert "multiples of 128" in ok(a2, sa2, b2, sb2, offs2, torch.bfloat16)


# ----------------------------------------------------------------------------- on an sm_90 or sm_100 GPU


def _gpu_arch():
    """The CUTLASS kernel's arch for this machine's GPU where the build holds it, else None."""
    if not torch.cuda.is_available():
        return None
    arch, _ = _cutlass.KERNEL_ARCHS.get(torch.cuda.get_device_capability(), (None, None))
    return arch if arch in _cutlass.BUILT_ARCHS else None


GPU_ARCH = _gpu_arch()
# sm_90 runs the Hopper kernel, sm_100 (B200/GB200) the Blackwell one: the same tests, the kernel the op picks.
needs_cutlass_gpu = pytest.mark.skipif(GPU_ARCH is None, reason="needs an sm_90 or sm_100 GPU and its kernel built")


@pytest.mark.gpu
@needs_cutlass_gpu
def test_setup_kernel_matches_its_twin():
    counts = [3, 0, 130, 1, 0]
    a, sa, b, sb, offs = operands(counts, 256, 384, device="cuda")
    out = torch.empty(a.shape[0], 256, dtype=torch.bfloat16, device="cuda")
    suffix = SUFFIX[GPU_ARCH]
    buf = torch.zeros(_cutlass.setup_bytes(len(counts), GPU_ARCH), dtype=torch.uint8, device="cuda")
    assert getattr(_ext.C, "fp8_grouped_cutlass_setup_bytes" + suffix)(len(counts)) == buf.numel()
    getattr(_ext.C, "fp8_grouped_cutlass_setup" + suffix)(
        offs.data_ptr(), len(counts), 256, 384, a.data_ptr(), b.data_ptr(), out.data_ptr(), sa.data_ptr(),
        sb.data_ptr(), buf.data_ptr(), _ext.stream(a))
    want = _cutlass.setup_twin(offs, 256, 384, a.data_ptr(), b.data_ptr(), out.data_ptr(), sa.data_ptr(),
                               sb.data_ptr(), arch=GPU_ARCH)
    assert torch.equal(buf.cpu(), want)


@pytest.mark.gpu
@needs_cutlass_gpu
@pytest.mark.parametrize("col_major", [False, True], ids=["row_major", "col_major"])
def test_parity_deepseek_v3_shapes(col_major):
    """E 32 local experts, N 4096, K 7168; uneven rows with empty experts and M % 128 != 0 (no padding)."""
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 700, (32,), generator=g)
    counts[[3, 17]] = 0
    counts[5], counts[6] = 1, 129
    a, sa, b, sb, offs = operands(counts.tolist(), 4096, 7168, col_major=col_major, device="cuda")
    assert _cutlass.binding(_cutlass.KERNEL, a.device).__name__ == _cutlass.KERNEL + SUFFIX[GPU_ARCH]
    got = fp8_grouped_mm(a, sa, b, sb, offs, backend="cutlass")
    triton = fp8_grouped_mm(a, sa, b, sb, offs, backend="triton")
    want = fp8_grouped_mm(a, sa, b, sb, offs, backend="torch")
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert rel_err(got, want) < 1e-2 and rel_err(got, triton) < 1e-2
    tail = a.new_zeros(a.shape[0] + 7, a.shape[1])  # rows past offs[-1] are zero
    tail[:a.shape[0]] = a
    sa_tail = torch.ones(tail.shape[0], sa.shape[1], device="cuda")
    sa_tail[:a.shape[0]] = sa
    out = fp8_grouped_mm(tail, sa_tail, b, sb, offs, backend="cutlass")
    assert torch.equal(out[a.shape[0]:], torch.zeros_like(out[a.shape[0]:]))
    assert torch.equal(out[:a.shape[0]], got)


@pytest.mark.gpu
@needs_cutlass_gpu
def test_fp8_mm_is_one_group():
    a, sa, b, sb, _ = operands([1000], 4096, 7168, device="cuda")
    got = moekernels.fp8_mm(a, sa, b[0], sb[0], backend="cutlass")
    assert rel_err(got, moekernels.fp8_mm(a, sa, b[0], sb[0], backend="torch")) < 1e-2


@pytest.mark.gpu
@needs_cutlass_gpu
def test_cuda_graph_capture():
    """No host sync: the op captures in a CUDA graph and replays with new offs."""
    a, sa, b, sb, offs = operands([100, 0, 300], 256, 384, device="cuda")
    fp8_grouped_mm(a, sa, b, sb, offs, backend="cutlass")  # warm: the module's load
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_grouped_mm(a, sa, b, sb, offs, backend="cutlass")
    offs.copy_(torch.tensor([0, 250, 400], dtype=torch.int32))
    graph.replay()
    assert rel_err(out, fp8_grouped_mm(a, sa, b, sb, offs, backend="torch")) < 1e-2


# ----------------------------------------------------------------------------- the build


def test_setup_finds_cutlass_or_says_why(monkeypatch, tmp_path):
    setup = load_setup()
    monkeypatch.setenv("CUTLASS_PATH", str(tmp_path))  # the override comes first, and is checked
    includes, error = setup.find_cutlass()
    assert includes is None and "CUTLASS_PATH" in error and "include/cutlass/cutlass.h" in error
    (tmp_path / "include" / "cutlass").mkdir(parents=True)
    (tmp_path / "include" / "cutlass" / "cutlass.h").touch()
    includes, error = setup.find_cutlass()
    assert error is None and includes == [str(tmp_path / "include"), str(tmp_path / "tools" / "util" / "include")]
    monkeypatch.delenv("CUTLASS_PATH")
    monkeypatch.setitem(__import__("sys").modules, "cutlass_library", None)  # not installed
    includes, error = setup.find_cutlass()
    assert includes is None and "nvidia-cutlass==4.2.0.0" in error


@pytest.mark.parametrize("arch_list, built", [("9.0", ["sm_90a"]), ("10.0", ["sm_100a"]), ("8.0;9.0;10.0;12.0+PTX",
                                                ["sm_90a", "sm_100a"]), ("8.0;12.0", [])], ids=str)
def test_setup_builds_each_cutlass_file_for_its_arch(monkeypatch, arch_list, built):
    """setup.py (no compile): each CUTLASS file where the list has its arch, for that arch alone, and the macros
    that bind it; with neither 9.0 nor 10.0, none, and the reason."""
    monkeypatch.delenv("MOEKERNELS_BUILD_CUDA", raising=False)  # read as setup.py loads
    monkeypatch.delenv("CUTLASS_PATH", raising=False)
    setup = load_setup()
    if setup.find_cuda_home() is None or setup.find_cutlass()[0] is None:
        pytest.skip("needs nvcc and CUTLASS's headers")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    [ext] = setup.extensions()
    assert [real for _, real in ext.cutlass_archs] == built
    macros = dict(ext.define_macros)
    assert macros["MOEKERNELS_CUTLASS_ARCHS"] == f'"{" ".join(built)}"'
    assert ("MOEKERNELS_WITH_CUTLASS_SM90" in macros, "MOEKERNELS_WITH_CUTLASS_SM100" in macros) == (
        "sm_90a" in built, "sm_100a" in built)
    assert (macros["MOEKERNELS_CUTLASS_ERROR"] == '""') == bool(built)
    if not built:
        assert "neither 9.0 nor 10.0" in macros["MOEKERNELS_CUTLASS_ERROR"]


def test_build_requires_the_pinned_wheel():
    text = open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml")).read()
    requires = re.search(r"^requires = \[(.*)\]", text, re.M).group(1)
    assert '"nvidia-cutlass==4.2.0.0"' in requires


# ----------------------------------------------------------------------------- the training paths
# grouped_mm_fp8(backend="cutlass") and fused_moe(precision="fp8", backend="cutlass"): fprop and dgrad on the
# CUTLASS kernel, the rest (quantizes, gathers, SwiGLU, the combine, the wgrad) on the automatic choice. On the CPU
# the launch is stood in by its contract (``contract``: no kernel built from csrc/ runs here), so these check
# the wiring: which GEMMs reach the kernel, with operands its layout checks accept (_cutlass.operand_problem runs
# on them), against the torch fp8 path. The ``gpu`` ones run the kernel itself against the Triton path.


def contract(a, a_scale, b, b_scale, offs):
    """What the kernel computes, in torch: the float32 product of the dequantized operands per expert (rows
    [offs[e-1], offs[e]), a count clamped at 0), rounded to bf16; rows at or after offs[-1] zero."""
    x = reference.dequantize_fp8(a, a_scale)
    out = torch.zeros(a.shape[0], b.shape[2])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ reference.dequantize_fp8(b[e], b_scale[e])
        start = max(start, end)
    return out.bfloat16()


@pytest.fixture
def stand_in(monkeypatch):
    """The launch (_cutlass.grouped_mm, the one caller of _C.fp8_grouped_mm_cutlass) replaced by ``contract``,
    and _cutlass.unavailable told the kernel runs here. Returns the calls: (a's shape, b's shape, whether
    a_scale reached the launch row-major, i.e. without the copy the launch makes of any other layout)."""
    calls = []

    def launch(a, a_scale, b, b_scale, offs):
        calls.append((tuple(a.shape), tuple(b.shape), a_scale.is_contiguous()))
        return contract(a, a_scale, b, b_scale, offs)

    monkeypatch.setattr(_cutlass, "grouped_mm", launch)
    monkeypatch.setattr(_cutlass, "unavailable", lambda device: None)
    return calls


def training_problem(counts, k, n, *, device="cpu", kmajor=True, seed=0):
    """x [M, K] bf16, w [E, K, N] bf16 (the transposed view of an [E, N, K] leaf where kmajor), offs."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(sum(counts), k, generator=g, device=device).bfloat16()
    w = (torch.randn(len(counts), n, k, generator=g, device=device) / k ** 0.5).bfloat16()
    w = w if kmajor else w.transpose(1, 2).contiguous()
    offs = torch.tensor(counts, device=device).cumsum(0).int()
    return x, w, offs


def grouped_mm_fp8_step(x, w, offs, kmajor, backend, dy):
    """y and (dx, dw) of grouped_mm_fp8 on fresh leaves (dw in w's own layout)."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8.grouped_mm_fp8(x, w.transpose(1, 2) if kmajor else w, offs, backend=backend)
    return (y, *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("kmajor", [True, False], ids=["w_kmajor", "w_nmajor"])
@pytest.mark.parametrize("counts", [[3, 0, 130, 1], [0, 0, 5]], ids=str)
def test_grouped_mm_fp8_cutlass_fprop_and_dgrad(stand_in, counts, kmajor):
    """fprop and dgrad reach the kernel (2 calls: wgrad, a K-grouped GEMM, does not), each with its K-major
    weight (dgrad: the forward's blocks transposed, K-major [E, N, K] storage) and row-major activation scales;
    y, dx and dw the torch fp8 path's bits: the stand-in's product is the torch backend's, on the same e4m3
    operands and scales, and both run the same wgrad on the same x and dy."""
    k, n = 256, 384
    x, w, offs = training_problem(counts, k, n, kmajor=kmajor)
    dy = torch.randn(x.shape[0], n, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = grouped_mm_fp8_step(x, w, offs, kmajor, "cutlass", dy)
    want = grouped_mm_fp8_step(x, w, offs, kmajor, "torch", dy)
    m, groups = x.shape[0], len(counts)
    assert stand_in == [((m, k), (groups, k, n), True), ((m, n), (groups, n, k), True)]
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert a.dtype == b.dtype == torch.bfloat16 and torch.equal(a, b), name
    assert got[0].any() and got[1].any()  # not a zero stand-in


def moe_training_problem(device="cpu", *, pair=False, seed=3):
    """T 40, k 2, E 4, H 256, I 128 in bf16; expert 0 gets no row, expert 1 one, experts 2 and 3 40 and 39 (M %
    128 != 0)."""
    g = torch.Generator(device).manual_seed(seed)
    t, h, i, e = 40, 256, 128, 4
    x = torch.randn(t, h, generator=g, device=device).bfloat16()
    w1 = (torch.randn(e, 2 * i, h, generator=g, device=device) / h ** 0.5).bfloat16()
    w2 = (torch.randn(e, h, i, generator=g, device=device) / i ** 0.5).bfloat16()
    ids = torch.tensor([[1, 2]] + [[2, 3], [3, 2]] * 19 + [[2, 3]], dtype=torch.int32, device=device)
    tw = torch.rand(t, 2, generator=g, device=device).softmax(-1)
    gate_up = w1.chunk(2, 1) if pair else (w1,)
    return x, gate_up, w2, tw, ids


def fused_moe_fp8_step(x, gate_up, w2, tw, ids, backend, dy):
    """y and the gradients of hidden, the gate/up weight(s), w_down and topk_weights, on fresh leaves."""
    leaves = [t.clone().requires_grad_() for t in (x, *gate_up, w2, tw)]
    x, *gu, w2, tw = leaves
    y = moekernels.fused_moe(x, gu[0] if len(gu) == 1 else tuple(gu), w2, tw, ids, precision="fp8", backend=backend)
    return (y, *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("pair", [False, True], ids=["w_gate_up", "w_gate_w_up"])
def test_fused_moe_fp8_cutlass_matches_the_fp8_path(stand_in, pair):
    """Both GEMMs and their dgrads reach the kernel (the fused form: forward 2 calls, backward 3: GEMM 1
    recomputed, GEMM 2's dgrad, GEMM 1's; the pair: one a weight, 3 + 5), with row-major activation scales
    (gathered rows, h and dz quantized row-major: no copy); never a wgrad.

    Against the torch fp8 path: the backward the same bits (both recompute z rounded to bf16 from the same
    operands), but for the pair's hidden gradient (its two products each rounded to bf16 before their sum:
    3e-3). The output differs by 1.2-1.6e-2 (3 seeds): SwiGLU reads z rounded to bf16 (the Triton path, the
    float32 accumulator), so a third of h's bf16 values move by an ulp and 2% of its e4m3 values by a step
    (~6%); the combine of bf16 rows adds 3e-3. Its error against the float32 layer is the fp8 path's (6.6e-2
    both): the roundings move it, they do not grow it."""
    x, gate_up, w2, tw, ids = moe_training_problem(pair=pair)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = fused_moe_fp8_step(x, gate_up, w2, tw, ids, "cutlass", dy)
    want = fused_moe_fp8_step(x, gate_up, w2, tw, ids, "torch", dy)
    rows, (h, i) = ids.numel(), w2.shape[1:]
    gemm1 = [((rows, h), (4, h, gate_up[0].shape[1]), True)] * len(gate_up)
    dgrad1 = [((rows, gate_up[0].shape[1]), (4, gate_up[0].shape[1], h), True)] * len(gate_up)
    assert stand_in == gemm1 + [((rows, i), (4, i, h), True)] + gemm1 + [((rows, h), (4, h, i), True)] + dgrad1
    names = ("y", "hidden", *(f"w_gate_up[{j}]" for j in range(len(gate_up))), "w_down", "topk_weights")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if name == "y" or (name == "hidden" and pair):
            assert rel_err(a, b) < (3e-2 if name == "y" else 1e-2), name
        else:
            assert torch.equal(a, b), name
    with torch.no_grad():
        exact = moekernels.fused_moe(x.float(), torch.cat(gate_up, 1).float(), w2.float(), tw, ids, backend="torch")
    assert rel_err(got[0], exact) < 1.05 * rel_err(want[0], exact)
    for g in got[2:-1]:  # expert 0 has no rows: no weight gradient
        assert not g[0].any() and g[1].any()


def test_training_paths_say_why_cutlass_cannot_run(monkeypatch):
    """Without the stand-in: the kernel cannot run on CPU tensors, and the ops say so by name; bad arguments
    are named before that; 'cutlass' is an argument of these ops alone, never MOEKERNELS_BACKEND's."""
    x, w, offs = training_problem([3, 5], 256, 384)
    wt = w.transpose(1, 2)
    with pytest.raises(RuntimeError, match="grouped_mm_fp8: backend='cutlass' cannot run this call: .*(not built|"
                                           "built without|needs CUDA tensors)"):
        fp8.grouped_mm_fp8(x, wt, offs, backend="cutlass")
    with pytest.raises(TypeError, match="x must be torch.bfloat16"):
        fp8.grouped_mm_fp8(x.float(), wt.float(), offs, backend="cutlass")
    with pytest.raises(ValueError, match="recipe='block' alone"):
        fp8.grouped_mm_fp8(x, wt, offs, recipe="row", backend="cutlass")
    with pytest.raises(ValueError, match="2D x 3D form alone"):
        fp8.grouped_mm_fp8(x.view(2, 4, 256), wt[:2], None, backend="cutlass")
    hidden, gate_up, w2, tw, ids = moe_training_problem()
    with pytest.raises(RuntimeError, match="fused_moe: backend='cutlass' cannot run this call"):
        moekernels.fused_moe(hidden, gate_up[0], w2, tw, ids, precision="fp8", backend="cutlass")
    with pytest.raises(TypeError, match="hidden must be torch.bfloat16"):
        moekernels.fused_moe(hidden.float(), gate_up[0].float(), w2.float(), tw, ids, precision="fp8",
                             backend="cutlass")
    with pytest.raises(ValueError, match="precision='fp8'"):  # the bf16 path has no CUTLASS GEMM
        moekernels.fused_moe(hidden, gate_up[0], w2, tw, ids, backend="cutlass")
    with pytest.raises(ValueError, match="backend must be one of"):  # nor has the layer's quantize
        moekernels.quantize_fp8(hidden, (1, 128), backend="cutlass")
    calls = []
    monkeypatch.setattr(_cutlass, "grouped_mm", lambda *args: calls.append(args))
    monkeypatch.setattr(_cutlass, "unavailable", lambda device: None)
    monkeypatch.setenv("MOEKERNELS_BACKEND", "cutlass")
    with pytest.raises(ValueError, match="MOEKERNELS_BACKEND .*must be one of"):
        fp8.grouped_mm_fp8(x, wt, offs)
    monkeypatch.delenv("MOEKERNELS_BACKEND")
    moekernels.fused_moe(hidden, gate_up[0], w2, tw, ids, precision="fp8")  # the automatic choice: not CUTLASS
    assert calls == []


@pytest.mark.gpu
@needs_cutlass
@needs_cutlass_gpu
@pytest.mark.parametrize("kmajor", [True, False], ids=["w_kmajor", "w_nmajor"])
def test_grouped_mm_fp8_cutlass_on_the_gpu(kmajor):
    """The kernel's fprop and dgrad against the Triton fp8 path (E 8, K 1024, N 2048, uneven rows with an empty
    expert, one row, M % 128 != 0); dw the same bits (the same Triton wgrad on the same x and dy)."""
    counts = [300, 0, 1, 129, 700, 64, 0, 333]
    x, w, offs = training_problem(counts, 1024, 2048, device="cuda", kmajor=kmajor)
    dy = torch.randn(x.shape[0], 2048, device="cuda").bfloat16()
    got = grouped_mm_fp8_step(x, w, offs, kmajor, "cutlass", dy)
    want = grouped_mm_fp8_step(x, w, offs, kmajor, "triton", dy)
    for name, a, b in zip(("y", "dx"), got, want):
        assert a.dtype == b.dtype and rel_err(a, b) < 1e-2, name
    assert torch.equal(got[2], want[2])


@pytest.mark.gpu
@needs_cutlass
@needs_cutlass_gpu
@pytest.mark.parametrize("pair", [False, True], ids=["w_gate_up", "w_gate_w_up"])
def test_fused_moe_fp8_cutlass_on_the_gpu(pair):
    """fused_moe(precision="fp8") with both GEMMs and their dgrads on the kernel against the Triton path: within
    the 3e-2 that the bf16 roundings of z (before SwiGLU, then h's e4m3 quantize) allow (the CPU test's 1.6e-2,
    and here z's accumulation order too), and the output as far from the float32 layer as the Triton path's."""
    x, gate_up, w2, tw, ids = moe_training_problem("cuda", pair=pair)
    dy = torch.randn(x.shape, device="cuda").bfloat16()
    got = fused_moe_fp8_step(x, gate_up, w2, tw, ids, "cutlass", dy)
    want = fused_moe_fp8_step(x, gate_up, w2, tw, ids, "triton", dy)
    for j, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and rel_err(a, b) < 3e-2, j
    with torch.no_grad():
        exact = moekernels.fused_moe(x.float(), torch.cat(gate_up, 1).float(), w2.float(), tw, ids, backend="torch")
    assert rel_err(got[0], exact) < 1.1 * rel_err(want[0], exact)
