"""Compile shipped Triton kernel configs for Hopper on a machine with no GPU, and read off the
static performance contract (DESIGN.md) from what the compiler produced.

``triton.compile`` with ``GPUTarget("cuda", 90, 32)`` gives TTGIR, PTX and a cubin without a
device. Register and spill counts on a ``CompiledKernel`` are only filled in when it is loaded on a
GPU, so they are read from the cubin (``cuobjdump -res-usage``: what ptxas built, with Triton's own
flags) and from the wheel's ``ptxas -v`` on the PTX (spills, stack frame).

Each stage module registers the function that lists its shipped variants (``_sm90_registry``)
at import; :func:`shipped_variants` imports the package once and reads the registry, so a new
stage or variant is compiled and checked without touching this file.

``python -m moekernels._sm90`` prints one JSON report per shipped variant;
``python -m moekernels._sm90 --write-resources`` regenerates the running Triton's table
(``configs/sm90_resources.json`` for 3.6, ``configs.sm90_resources_path``). Both must run without
``TRITON_INTERPRET=1`` (under the interpreter ``triton.jit`` gives objects that cannot be compiled),
which is why the test suite calls them in a subprocess.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

from .configs import HOPPER

# The occupancy rules of sm_90 (and of each architecture the compile matrix targets) are the
# fields of configs.ArchLimits, from CUDA 13.0's cuda_occupancy.h.
HOPPER_SMEM_LIMIT = HOPPER.smem_per_block  # bytes of shared memory one block can opt into on sm_90 (227 KB)
# Triton's pointer type of each torch dtype a shipped kernel takes (names, so torch stays unimported).
TRITON_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16", "float8_e4m3fn": "*fp8e4nv", "uint8": "*u8"}


def ptr(dtype) -> str:
    """The Triton signature type of a pointer to ``dtype`` elements."""
    return TRITON_PTR[str(dtype).removeprefix("torch.")]


@dataclass
class Variant:
    """One shipped kernel config: what ``triton.compile`` needs, and the contract it is held to."""

    name: str
    fn: object  # the @triton.jit function
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "constexpr", ...)
    constexprs: dict
    options: dict  # num_warps, num_stages, enable_fp_fusion, ...
    matrix: bool = False  # a matrix kernel must use wgmma
    # Arguments the launch specialises as divisible by 16, as Triton does for 16-byte-aligned
    # pointers and integers that are multiples of 16: what the vectorised loads depend on.
    aligned: tuple = ()
    # How each operand of a matrix kernel's K loop must arrive: "tma" (cp.async.bulk.tensor),
    # "cp.async" (16-byte cp.async: gathered rows) or "pointer" (no claim: the unaligned fallback).
    loads: dict = field(default_factory=dict)
    rows: bool = False  # a row-moving kernel (permute, combine, quantize): 16-byte global accesses
    # The launcher's identity of this config (configs.launch_key), when a launcher sizes its grid
    # from the compiled resources: the key of its row in configs/sm90_resources.json.
    launch_key: str | None = None
    # The trip counts of the loops of one shape's per-token path (see warp_instructions: loops,
    # skip), for the variants whose warp instructions per token are held to a ceiling.
    per_token: dict | None = None


def shipped_variants(capability: int = 90) -> list[Variant]:
    """Every stage's shipped variants, from the registry (moekernels/_sm90_registry.py), with the
    configs their launchers pick on ``capability`` (moekernels/_matrix.py compiles the others)."""
    import moekernels  # noqa: F401  (importing the package imports every stage, which registers)

    from ._sm90_registry import REGISTRY

    return [v for fn in REGISTRY.values() for v in fn(capability)]


@dataclass
class Report:
    name: str
    matrix: bool
    shared: int  # bytes per program: Triton's dynamic allocation (metadata.shared)
    registers: int  # per thread, from the cubin
    spill_stores: int
    spill_loads: int
    stack_frame: int
    wgmma: bool
    fma: bool
    vector16: bool = False  # a 16-byte global load or store (ld/st.global.v4 of 32-bit words)
    tma: bool = False  # a TMA bulk tensor copy (cp.async.bulk.tensor): descriptor loads
    wgmma_fp8: bool = False  # a wgmma on e4m3 operands
    shared_static: int = 0  # bytes per program ptxas placed in the cubin (.nv.shared: 1 KB with mbarriers)
    threads: int = 0  # num_warps * 32
    barriers: int = 0  # named barriers per block (ptxas "used N barriers")
    programs_per_sm: int = 0  # resident at once: see occupancy()
    limited_by: str = ""  # what bounds programs_per_sm
    k_loops: int = 0  # loops of the PTX that issue wgmma (or mma.sync) and hold no smaller such loop
    # The K loop facts below are of the main K loop: the first K loop of the code (a second one, after
    # it, is a low-rank segment's: see segment_mma).
    wgmma_depth: int | None = None  # min N of wgmma.wait_group N in the K loop (None: no K loop)
    k_waits: int = 0  # wgmma.wait_group in the PTX K loop bodies
    k_commits: int = 0  # wgmma.commit_group (wgmma groups issued) in the PTX K loop bodies
    ttgir_pendings: int | None = None  # min pendings of ttng.warp_group_dot_wait in the TTGIR's K loops
    k_barriers: int | None = None  # most BAR.SYNC in one SASS K loop's body
    smem_round_trip: bool = False  # a wgmma operand written back to shared memory from a local_load, in any K loop
    k_tma: int = 0  # cp.async.bulk.tensor in the PTX K loop body (per K step)
    k_cp16: int = 0  # 16-byte cp.async per thread in the PTX K loop body
    k_cp_narrow: int = 0  # cp.async of 4 or 8 bytes per thread in the PTX K loop body
    k_copy_bytes: int = 0  # bytes of the tiles (rank >= 2) the TTGIR K loop copies by cp.async
    segment_mma: str | None = None  # the second K loop's (a LoRA segment's) "wgmma" or "mma" (mma.sync); None: none
    segment_depth: int | None = None  # min N of wgmma.wait_group N in that loop
    rows: bool = False  # a row-moving kernel (Variant.rows)
    # a loop of the TTGIR yields an index (i32 / i64) loaded in its body: the next iteration's
    # destinations fetched while this iteration's rows move (issue 13 item 6)
    index_prefetch: bool = False
    launch_key: str | None = None
    # SASS instructions one warp executes per program on Variant.per_token's path, x warps / BLOCK_T
    warp_instructions_per_token: int | None = None
    error: str | None = None


def _nvidia_bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def ptxas_path() -> str:
    """The ptxas Triton itself runs for sm_90, so that ``ptxas -v`` reads the code of the cubin and
    takes the PTX's version: triton 3.6 runs bin/ptxas (CUDA 12.8); 3.9 writes PTX 9.x, which
    only its bin/ptxas-blackwell (CUDA 13.x) reads (its bin/ptxas, CUDA 12.9, stops at PTX 8.8)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(90).path


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


def _ptxas_info(ptx: str, fmad: bool = True, gpu_name: str = "sm_90a", ptxas: str | None = None,
                log: str = "") -> dict:
    """Spills and stack frame from ``ptxas -v``, with Triton's --fmad flag so the code matches
    (``ptxas``: the binary, for another ``gpu_name`` than sm_90a; the wheel's by default). ``log``:
    the ``-v`` output Triton's own ptxas run printed (compile_kernel), read instead of a second run
    of ptxas on the same PTX (a second or more a kernel); empty where the compile was cached."""
    if "bytes spill stores" not in log:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "k.ptx")
            with open(src, "w") as f:
                f.write(ptx)
            log = _run([ptxas or ptxas_path(), "-v", *([] if fmad else ["--fmad=false"]), "--gpu-name", gpu_name,
                        src, "-o", os.path.join(tmp, "k.cubin")])

    def grab(pattern: str, default: int | None = None) -> int:
        m = re.search(pattern, log)
        if m is None:
            if default is not None:
                return default
            raise RuntimeError(f"ptxas -v printed no {pattern!r}:\n{log}")
        return int(m.group(1))

    return {
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "barriers": grab(r"used (\d+) barriers", 0),
    }


def _cubin_info(cubin: bytes, sass: bool = True) -> tuple[dict, str]:
    """Registers and static shared memory of the cubin Triton built, and its SASS if ``sass`` (a
    second of nvdisasm each: only the matrix kernels' K loops are read from it)."""
    usage = res_usage(cubin)
    sass = _disassemble(cubin, "-c") if sass else ""
    return {"registers": usage["registers"], "shared_static": usage["shared_static"]}, sass


def res_usage(cubin: bytes) -> dict:
    """``cuobjdump -res-usage`` of a cubin, for any architecture: registers a thread, stack frame
    and local memory (bytes a thread: a spill needs them), static shared memory (bytes a block)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = _run([_nvidia_bin("cuobjdump"), "-res-usage", path])
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK/SHARED/LOCAL:\n{usage}")
    return dict(zip(("registers", "stack", "shared_static", "local"), map(int, m.groups())))


def _disassemble(cubin: bytes, *flags: str) -> str:
    """nvdisasm of a cubin (``-c``: code only; ``-gi``: with source lines and where they were inlined)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return _run([_nvidia_bin("nvdisasm"), *flags, path])


# ----------------------------------------------------------------------------- occupancy


def occupancy(registers: int, threads: int, shared: int, barriers: int = 1, arch=None) -> tuple[int, str]:
    """Programs (blocks) of ``threads`` threads resident on one SM of ``arch`` (a configs.ArchLimits;
    sm_90 by default) at once, and the limit that binds: cuda_occupancy.h's rules. On sm_90:
    registers go to warps in 256-register units (a thread's count rounded up to 8), each warp from
    one of 4 sub-partitions of 16384; at most 64 warps and 32 blocks; ``shared`` bytes per block
    plus the 1 KB the driver reserves, in 128-byte units, out of 228 KB; 64 named barriers.
    ``shared`` counts what ptxas placed statically too (callers add it)."""
    a = arch or HOPPER
    warps = -(-threads // 32)
    per_warp = -(-registers * 32 // a.reg_granule) * a.reg_granule
    by_regs = (a.registers // a.sub_partitions // per_warp) * a.sub_partitions // warps if per_warp else 99
    smem = -(-(shared + a.smem_reserved) // a.smem_granule) * a.smem_granule
    fits = registers <= a.max_registers and per_warp * -(-warps // a.sub_partitions) * a.sub_partitions <= a.registers
    limits = {"registers": by_regs if fits else 0, "warps": a.max_warps // warps,
              "blocks": a.max_blocks, "shared memory": a.smem_per_sm // smem if shared <= a.smem_per_block else 0,
              "barriers": a.barriers // barriers if barriers else a.max_blocks}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


# ----------------------------------------------------------------------------- loops of the code


def _natural_loops(insts: list[str], succ: list[list[int]]) -> list[set[int]]:
    """Natural loops of an instruction-level control-flow graph (``succ``: each instruction's
    successors; instruction 0 the entry). A back edge u -> h is an edge whose target h dominates u
    (every path from the entry to u passes h); its loop is h with every instruction that reaches u
    without passing h. Loops that share a header are one loop. Returned as sets of indices."""
    n = len(insts)
    if n == 0:
        return []
    order, seen, stack = [], [False] * n, [(0, 0)]
    seen[0] = True
    while stack:  # iterative DFS postorder
        node, i = stack.pop()
        if i < len(succ[node]):
            stack.append((node, i + 1))
            s = succ[node][i]
            if not seen[s]:
                seen[s] = True
                stack.append((s, 0))
        else:
            order.append(node)
    rpo = order[::-1]
    index = {v: i for i, v in enumerate(rpo)}
    pred: list[list[int]] = [[] for _ in range(n)]
    for u in rpo:
        for s in succ[u]:
            pred[s].append(u)
    idom = {0: 0}
    changed = True
    while changed:  # Cooper, Harvey and Kennedy: "A Simple, Fast Dominance Algorithm"
        changed = False
        for v in rpo[1:]:
            ps = [p for p in pred[v] if p in idom]
            new = ps[0]
            for p in ps[1:]:
                a, b = p, new
                while a != b:
                    while index[a] > index[b]:
                        a = idom[a]
                    while index[b] > index[a]:
                        b = idom[b]
                new = a
            if idom.get(v) != new:
                idom[v], changed = new, True

    def dominates(h: int, u: int) -> bool:
        while u != h and idom[u] != u:
            u = idom[u]
        return u == h

    loops: dict[int, set[int]] = {}
    for u in rpo:
        for h in succ[u]:
            if dominates(h, u):
                body, work = loops.setdefault(h, {h}), [u]
                while work:
                    x = work.pop()
                    if x not in body:
                        body.add(x)
                        work.extend(pred[x])
    return list(loops.values())


def _cfg(lines: list[str], label_re: str, branch_re: str, exit_re: str, scoped: bool):
    """Instructions, successor lists and the instruction index of each label of PTX or SASS text.
    ``branch_re`` matches a branch, group 1 its predicate (empty if unconditional), group 2 its
    target. PTX labels are scoped by braces (each inline-asm block declares its own ``waitLoop``)."""
    insts, label_at, pending, scopes, refs = [], {}, [], [0], []
    next_scope = 1
    for line in lines:
        text = line.split("//")[0].strip() if scoped else line.strip()
        if scoped and text == "{":
            scopes.append(next_scope)
            next_scope += 1
            continue
        if scoped and text == "}":
            scopes.pop()
            continue
        m = re.match(label_re, text)
        if m:
            pending.append((scopes[-1] if scoped else 0, m.group(1)))
            continue
        if not text or (scoped and not text.endswith(";")) or (scoped and text.startswith(".")):
            continue
        for key in pending:
            label_at[key] = len(insts)
        pending = []
        insts.append(text)
        refs.append(tuple(scopes))
    succ: list[list[int]] = []
    for i, text in enumerate(insts):
        nxt = [i + 1] if i + 1 < len(insts) else []
        b = re.search(branch_re, text)
        if b:
            target = next((label_at[(s, b.group(2))] for s in reversed(refs[i]) if (s, b.group(2)) in label_at), None)
            if target is None:
                target = label_at.get((0, b.group(2)))
            succ.append(([target] if target is not None else []) + (nxt if b.group(1) else []))
        elif re.search(exit_re, text):
            succ.append(nxt if text.startswith("@") else [])
        else:
            succ.append(nxt)
    return insts, succ


def _k_loops(insts: list[str], succ: list[list[int]], mma_re: str) -> list[list[str]]:
    """The K loops: innermost loops that issue an mma (``mma_re``), each as its instructions, in
    the order of the code (the main K loop first, then a low-rank segment's)."""
    with_mma = [body for body in _natural_loops(insts, succ) if any(re.search(mma_re, insts[i]) for i in body)]
    inner = sorted((b for b in with_mma if not any(o < b for o in with_mma)), key=min)
    return [[insts[i] for i in sorted(b)] for b in inner]


def ptx_k_loops(ptx: str) -> list[list[str]]:
    """K loops of the PTX: loops of its control-flow graph (natural loops: a branch back to a label
    that dominates it) that issue ``wgmma.mma_async`` (or ``mma.sync``) and contain no smaller such loop. This skips
    the persistent grid's tile loop around the K loop and the mbarrier wait's spin loop inside it,
    and does not depend on where the compiler placed the blocks."""
    insts, succ = _cfg(ptx.splitlines(), r"^([$\w]+):", r"^(@!?%?\w+\s+)?bra(?:\.uni)?\s+([$\w]+)\s*;",
                       r"^(?:@!?%?\w+\s+)?(?:ret|exit|trap)\s*;", scoped=True)
    return _k_loops(insts, succ, r"\bwgmma\.mma_async|\bmma\.sync\.aligned")


def sass_k_loops(sass: str) -> list[list[str]]:
    """K loops of the SASS (nvdisasm -c), found as in :func:`ptx_k_loops` (HGMMA/QGMMA/..., HMMA)."""
    lines = []
    for line in sass.splitlines():
        inst = re.match(_SASS_INST, line)
        if inst or re.match(r"^[.$\w]+:", line):
            lines.append(inst.group(1) if inst else line.strip())
    return _k_loops(*_sass_cfg(lines), r"\b[A-Z]*GMMA\b|\bHMMA\b")


_SASS_INST = r"^\s*/\*[0-9a-f]+\*/\s*([^;]*;)"  # nvdisasm -c: /*address*/ instruction ;


def _sass_cfg(lines: list[str]):
    """:func:`_cfg` of SASS lines (labels and instructions)."""
    return _cfg(lines, r"^([.$\w]+):", r"^(@!?U?P\w+\s+)?BRA(?:\.\w+)*\s+`\(([.$\w]+)\)",
                r"^(?:@!?U?P\w+\s+)?(?:EXIT|RET)\b", scoped=False)


def ttgir_k_loops(ttgir: str) -> list[list[str]]:
    """K loops of the TTGIR: the innermost ``scf.for`` regions that hold a ``ttng.warp_group_dot``
    (or a ``tt.dot``: mma.sync), in the order of the code.
    A region runs from the ``scf.for`` line to the ``}`` at its indentation."""
    lines = ttgir.splitlines()
    regions = []
    for i, line in enumerate(lines):
        if "scf.for" in line and line.rstrip().endswith("{"):
            indent = len(line) - len(line.lstrip())
            j = next(j for j in range(i + 1, len(lines))
                     if lines[j].lstrip().startswith("}") and len(lines[j]) - len(lines[j].lstrip()) == indent)
            regions.append((i, j))
    with_dot = [(i, j) for i, j in regions
                if any(re.search(r"(ttng\.warp_group_dot|tt\.dot) ", lines[x]) for x in range(i, j))]
    inner = [(i, j) for i, j in with_dot if not any(i < a and b < j for a, b in with_dot)]
    return [lines[i:j + 1] for i, j in inner]


# Ops that view or re-lay out a value without moving it through memory: a dot operand made by one
# of them is made by the op under it.
_VIEW_OPS = ("ttg.memdesc_trans", "ttg.memdesc_index", "ttg.memdesc_subslice", "ttg.memdesc_subview",
             "ttg.memdesc_reshape", "ttg.memdesc_reinterpret", "ttg.convert_layout", "tt.trans", "tt.reshape")
_SSA = r"%[\w.$-]+"  # an SSA value (%c-1_i32 included); "#n" picks a result of a multi-result op


def smem_round_trip(loop: list[str]) -> bool:
    """A wgmma operand in this TTGIR loop (its ``scf.for`` line to its ``}``) written to shared memory
    in the loop (``ttg.local_alloc``, or ``ttg.local_store`` into the buffer it views) from a value
    that comes, through any ops, from ``ttg.local_load``: a tile read out of shared memory and
    written back, a transpose through shared memory every K step. The operand is followed down
    view ops (memdesc_trans, memdesc_index, convert_layout, ...) and iteration arguments (to the
    value the loop yields), which the compiler puts between the write and the dot."""
    defs = {}
    for line in loop:
        m = re.match(rf"\s*({_SSA})(?::\d+)?\s*=\s*([\w.]+)\s*(.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), re.findall(_SSA, m.group(3).split(" : ")[0]))
    # iteration arguments: %argN of the header's iter_args(...) -> what the loop's own scf.yield passes
    head = re.search(r"iter_args\((.*?)\)\s*->", loop[0]) if loop else None
    args = re.findall(rf"({_SSA}) = ", head.group(1)) if head else []
    yields = [line for line in loop if re.match(r"\s*scf\.yield\b", line)]
    passed = re.findall(_SSA, yields[-1].split(" : ")[0]) if yields else []
    carried = dict(zip(args, passed))

    def base(value: str) -> str:
        """The value under ``value``'s views, iteration arguments and wgmma waits (which pass
        their operands through: result #i is operand i)."""
        seen = set()
        while value not in seen:
            seen.add(value)
            name, _, index = value.partition("#")
            op = defs.get(name)
            if name in carried:
                value = carried[name]
            elif op and op[0] == "ttng.warp_group_dot_wait" and index and int(index) < len(op[1]):
                value = op[1][int(index)]
            elif op and op[0] in _VIEW_OPS and op[1]:
                value = op[1][0]
        return value.partition("#")[0]

    def from_load(value: str) -> bool:
        """Whether ``value`` is computed, through any ops of the loop, from a ttg.local_load."""
        seen, work = set(), [value]
        while work:
            name = work.pop().partition("#")[0]
            if name in seen:
                continue
            seen.add(name)
            if name in carried:
                work.append(carried[name])
            op = defs.get(name)
            if op and op[0] == "ttg.local_load":
                return True
            work.extend(op[1] if op else ())
        return False

    # buffers written in the loop from shared memory: local_alloc results, local_store destinations
    written = set()
    for value, (name, operands) in defs.items():
        if name == "ttg.local_alloc" and any(from_load(v) for v in operands):
            written.add(value)
    for line in loop:
        m = re.match(rf"\s*ttg\.local_store\s+({_SSA}),\s*({_SSA})", line)
        if m and from_load(m.group(1)):
            written.add(base(m.group(2)))
    for line in loop:
        m = re.search(rf"ttng\.warp_group_dot\s+({_SSA}(?:#\d+)?),\s*({_SSA}(?:#\d+)?)", line)
        if m and any(base(operand) in written for operand in m.groups()):
            return True
    return False


# cp.async.{ca,cg}.shared.global [dst], [src], bytes(, src-size): the byte count in hex or decimal.
_CP_ASYNC = re.compile(r"cp\.async\.c[ag]\.shared(?:::\w+)?\.global(?:\.\w+)*"
                       r"\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)")


def index_prefetch(ttgir: str) -> bool:
    """Whether an ``scf.yield`` of the TTGIR carries a value that a ``tt.load`` of i32 / i64
    pointers defined: an index loaded one iteration ahead of its use (SSA names are unique in the
    function, so the load is the one in the loop body that yields it)."""
    index_loads = set(re.findall(r"(%[\w.]+) = tt\.load [^\n]*!tt\.ptr<i(?:32|64)>", ttgir))
    return any(name in index_loads for line in re.findall(r"scf\.yield ([^:\n]*)", ttgir)
               for name in re.findall(r"%[\w.]+", line))


def loop_facts(ttgir: str, ptx: str, sass: str) -> dict:
    """The K-loop facts of one compiled kernel (see Report): of its main K loop, the first of the
    code, and what a second one (a low-rank segment's) multiplies with."""
    ptx_all = ptx_k_loops(ptx)
    ptx_loops, sass_loops, ir_loops = ptx_all[:1], sass_k_loops(sass)[:1], ttgir_k_loops(ttgir)[:1]
    segment = ptx_all[1] if len(ptx_all) > 1 else []
    seg_waits = [int(w) for i in segment for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", i)]
    waits = [int(w) for loop in ptx_loops for i in loop
             for w in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", i)]
    pend = [int(p) for loop in ir_loops for i in loop if "warp_group_dot_wait" in i
            for p in re.findall(r"pendings = (\d+)", i)]
    body = [i for loop in ptx_loops for i in loop]
    widths = [int(m.group(1), 0) for i in body for m in [_CP_ASYNC.search(i)] if m]
    return dict(
        k_loops=len(ptx_all),
        wgmma_depth=min(waits) if waits else None,
        k_waits=len(waits),
        k_commits=sum("wgmma.commit_group" in i for i in body),
        ttgir_pendings=min(pend) if pend else None,
        k_barriers=max((sum(bool(re.match(r"(@!?U?P\w+\s+)?BAR\.SYNC", i)) for i in loop) for loop in sass_loops),
                       default=None),
        smem_round_trip=any(smem_round_trip(loop) for loop in ttgir_k_loops(ttgir)),  # a segment's loop too
        k_tma=sum("cp.async.bulk.tensor" in i for i in body),
        k_cp16=widths.count(16),
        k_cp_narrow=sum(w < 16 for w in widths),
        k_copy_bytes=sum(_tile_bytes(i) for loop in ir_loops for i in loop if "ttg.async_copy_global_to_local" in i),
        segment_mma=next((name for name, pat in (("wgmma", "wgmma.mma_async"), ("mma", "mma.sync.aligned"))
                          if any(pat in i for i in segment)), None),
        segment_depth=min(seg_waits) if seg_waits else None,
    )


def _tile_bytes(line: str) -> int:
    """Bytes of the pointer tile an async copy reads (0 for a vector: an index, not an operand)."""
    m = re.search(r"tensor<((?:\d+x)+)!tt\.ptr<[a-z]*(\d+)", line)
    if m is None or m.group(1).count("x") < 2:
        return 0
    elements = 1
    for d in m.group(1).rstrip("x").split("x"):
        elements *= int(d)
    return elements * int(m.group(2)) // 8


# ----------------------------------------------------------------------------- compile


def compile_kernel(v: Variant, capability: int = 90, with_log: bool = False):
    """``triton.compile`` of a variant for ``GPUTarget("cuda", capability, 32)``, no device needed.
    ``with_log``: also return the ``ptxas -v`` output of Triton's own ptxas run (its
    TRITON_DUMP_PTXAS_LOG knob prints it), the ptxas and flags that built the cubin; empty where the
    compile came from Triton's cache."""
    import contextlib
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(v.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in v.aligned}
    src = ASTSource(fn=v.fn, signature=v.signature, constexprs=v.constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, 32)
    if not with_log:
        return triton.compile(src, target=target, options=v.options)
    knobs, out = triton.knobs.nvidia, io.StringIO()
    before = knobs.dump_ptxas_log
    knobs.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(out):
            kernel = triton.compile(src, target=target, options=v.options)
    finally:
        knobs.dump_ptxas_log = before
    return kernel, out.getvalue()


def compile_variant(v: Variant) -> Report:
    kernel, log = compile_kernel(v, with_log=True)
    ptx = kernel.asm["ptx"]
    cubin, sass = _cubin_info(kernel.asm["cubin"], sass=v.matrix)
    per_token = None
    if v.per_token is not None:
        lined = _disassemble(kernel.asm["cubin"], "-gi", "-c")
        path = warp_instructions(lined, inspect.getsourcefile(v.fn.fn), v.per_token["loops"], v.per_token["skip"])
        per_token = path["count"] * kernel.metadata.num_warps // v.constexprs["BLOCK_T"]
    info = _ptxas_info(ptx, fmad=v.options.get("enable_fp_fusion", True), log=log)
    threads = kernel.metadata.num_warps * 32
    per_sm, limit = occupancy(cubin["registers"], threads, kernel.metadata.shared + cubin["shared_static"],
                              info["barriers"])
    return Report(
        name=v.name,
        matrix=v.matrix,
        shared=kernel.metadata.shared,
        wgmma="wgmma" in ptx,
        fma=re.search(r"\bfma\.rn\.f32\b", ptx) is not None,
        vector16=re.search(r"\b(ld|st)\.global(\.\w+)*\.v4\.(b32|f32|u32|s32)\b", ptx) is not None,
        index_prefetch=v.rows and index_prefetch(kernel.asm["ttgir"]),
        tma="cp.async.bulk.tensor" in ptx,
        wgmma_fp8=re.search(r"wgmma\.mma_async\S*\.e4m3\.e4m3", ptx) is not None,
        threads=threads,
        programs_per_sm=per_sm,
        limited_by=limit,
        rows=v.rows,
        launch_key=v.launch_key,
        warp_instructions_per_token=per_token,
        **cubin,
        **info,
        **loop_facts(kernel.asm["ttgir"], ptx, sass),
    )


# ----------------------------------------------------------------------------- instructions per token


def _source_line(text: str, snippet: str) -> int:
    """1-based line of the first line of ``text`` that contains ``snippet`` (tables name lines by
    their code, so they follow edits of the source)."""
    for n, line in enumerate(text.splitlines(), 1):
        if snippet in line:
            return n
    raise ValueError(f"no line contains {snippet!r}")


def warp_instructions(sass: str, source: str, loops: dict, skip: list) -> dict:
    """Warp instructions one warp executes on the path of one shape, counted on SASS with line info
    (``nvdisasm -gi -c``, one function): each instruction reachable from the entry once, times the
    trip count of the loop it is in. ``source`` is the kernel's source file; ``loops`` maps a loop's
    ``for`` line (a snippet of it) to (trip count, regex of an instruction its body issues
    ``per`` times an iteration, ``per``): a SASS loop's unroll factor is the count of that
    instruction in its body / ``per``; an unrolled loop's remainder loop runs trips % unroll.
    ``skip``: (first, last) snippet pairs of source lines the shape does not execute (an untaken
    branch); an instruction from those lines is not counted, nor a loop holding any. The
    division's slow path (a CALL: denormal or huge operands) is not counted."""
    with open(source) as f:
        text = f.read()
    base = os.path.basename(source)
    lines, src, cur, pending = [], [], set(), set()
    for line in sass.splitlines():
        m = re.search(r'//## File "([^"]*)", line (\d+)(?: inlined at "([^"]*)", line (\d+))?', line)
        if m:  # an instruction's annotations: its line, each inlined at its call site
            pending |= {int(m.group(2)) if m.group(1).endswith(base) else None,
                        int(m.group(4)) if m.group(3) and m.group(3).endswith(base) else None} - {None}
            continue
        inst = re.match(_SASS_INST, line)
        if inst:
            cur, pending = pending or cur, set()
            lines.append(inst.group(1))
            src.append(cur)
        elif re.match(r"^[.$\w]+:", line):
            lines.append(line.strip())
    insts, succ = _sass_cfg(lines)
    skipped = set()
    for a, b in skip:
        skipped.update(range(_source_line(text, a), _source_line(text, b) + 1))
    dead = {i for i in range(len(insts)) if src[i] & skipped}
    # The block that calls a slow path (the division's, for denormal or huge operands) is jumped
    # over on ordinary data: from the branch before the CALL to the label after it.
    cut = {s for i, ss in enumerate(succ) for s in ss if s != i + 1}
    cut |= {i + 1 for i, inst in enumerate(insts) if re.search(r"\bBRA\b", inst)}
    for c in (i for i, inst in enumerate(insts) if inst.startswith("CALL")):
        a, b = c, c + 1
        while a not in cut and a > 0:
            a -= 1
        while b not in cut and b < len(insts):
            b += 1
        dead.update(range(a, b))
    reach, work = set(), [0]
    while work:
        x = work.pop()
        if x not in reach:
            reach.add(x)
            work.extend(succ[x])
    table = {_source_line(text, snip): spec for snip, spec in loops.items()}
    found, weight = [], {}
    for body in _natural_loops(insts, succ):
        if any(src[i] & skipped for i in body) or not body <= reach:
            continue
        heads = [line for line in table if any(line in src[i] for i in body)]
        if len(heads) != 1:
            lines_in = sorted(set().union(*(src[i] for i in body)))
            raise RuntimeError(f"a SASS loop of source lines {lines_in} matches {len(heads)} loops of the table")
        trips, marker, per = table[heads[0]]
        unroll = max(1, sum(bool(re.search(marker, insts[i])) for i in body) // per) if marker else 1
        found.append(dict(line=heads[0], unroll=unroll, size=len(body), body=body, trips=trips))
    for f in found:
        widest = max(g["unroll"] for g in found if g["line"] == f["line"])
        f["iterations"] = f["trips"] // widest if f["unroll"] == widest else f["trips"] % widest
        for i in f["body"]:
            weight[i] = weight.get(i, 1) * f["iterations"]
    for line, (trips, _, _) in table.items():  # the SASS loops of each source loop run all its trips
        done = sum(f["unroll"] * f["iterations"] for f in found if f["line"] == line)
        if done != trips:
            raise RuntimeError(f"the SASS loops of source line {line} run {done} of its {trips} iterations")
    counted = [i for i in reach if i not in dead]
    count = sum(weight.get(i, 1) for i in counted)
    by_line: dict[str, int] = {}
    for i in counted:
        key = ",".join(map(str, sorted(src[i])))
        by_line[key] = by_line.get(key, 0) + weight.get(i, 1)
    return dict(count=count, loops=sorted((f["line"], f["unroll"], f["size"], f["iterations"]) for f in found),
                straight=sum(1 for i in counted if i not in weight), by_line=by_line)


# DeepSeek-V3 routing (fp32 logits, sigmoid + bias, 8 groups keep 4, top-8 of 256, renormalized): the
# trip counts of the loops of its per-token path, per kernel. csrc/route.cu's <float, VPT = 8,
# LANES = 32> instantiation: a warp per token, a lane 8 experts (the loops over them unrolled).
ROUTE_CU_DSV3 = dict(
    loops={"for (int o = 1; o < lanes_per_group; o <<= 1)": (2, r"\bSHFL\b", 2),  # 32 / 8 = 4 lanes a group
           "for (int h = 0; h < n_group; ++h)": (8, r"\bSHFL\b", 1),  # rank against 8 group scores
           "for (int j = 0; j < top_k; ++j) {": (8, r"\bSHFL\b", 7)},  # 8 picks: seg_max 5 + 2 shuffles
    skip=[("if (softmax) {", "score[i] = __fdiv_rn(score[i], denom)"),  # sigmoid
          ("x[i] = first + i < num_experts ? sanitize", "x[i] = first + i < num_experts ? sanitize"),  # 16 B loads
          ("} else {  // any other group size", "if (lane == g) my_group"),  # 32-expert groups: aligned
          ("} else if (live && lane == 0) {", "out_id[j] = e;"),  # top_k 8 <= 32: picks in registers
          ("__syncwarp();  // lane 0's stores", "for (int j = lane; j < top_k; j += LANES)")],
    kernel="topk_routing_kernelIfLi8ELi32E")
# kernels/_route.py's variant topk_routing/deepseek_v3_e256_k8_g8_4_bias (BLOCK_T = 32 tokens, 8 warps:
# 4 tokens a warp, so the count x warps / BLOCK_T is per token). Constexprs compile out the other
# branches and unroll the group selection (KEPT); the run-time pick loop is not unrolled.
ROUTE_TRITON_DSV3 = dict(router="deepseek_v3_e256_k8_g8_4_bias", skip=[],
                         loops={"for j in range(top_k):": (8, None, 1)})  # 8 picks


def route_cu_instructions(nvcc: str = "nvcc") -> dict:
    """Warp instructions per DeepSeek-V3 token of csrc/route.cu (a warp per token), compiled here
    with nvcc for sm_90a as setup.py builds it, plus -lineinfo."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    source = os.path.join(root, "csrc", "route.cu")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "route.cubin")
        _run([nvcc, "-O3", "-std=c++17", "-lineinfo", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
              "-I", os.path.dirname(source), source, "-o", cubin])
        sass = _run([_nvidia_bin("nvdisasm"), "-gi", "-c", cubin])
    fn = _function(sass, ROUTE_CU_DSV3["kernel"])
    return warp_instructions(fn, source, ROUTE_CU_DSV3["loops"], ROUTE_CU_DSV3["skip"])


def _function(sass: str, name: str) -> str:
    """The SASS of the one function whose mangled name contains ``name``."""
    starts = [m.start() for m in re.finditer(r"(?m)^\s*\.section\s+\.text\.", sass)] + [len(sass)]
    parts = [sass[a:b] for a, b in zip(starts, starts[1:]) if name in sass[a:b].splitlines()[0]]
    if len(parts) != 1:
        raise RuntimeError(f"{len(parts)} functions named like {name!r} in the SASS")
    return parts[0]


def signature(fn, constexprs: dict, **types) -> dict:
    """A kernel's Triton signature: ``types`` for the named arguments (pointers, floats), "i32"
    for the other run-time ones, "constexpr" for the constexprs."""
    return {
        name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names
    }


def compile_all(variants: list[Variant] | None = None) -> list[Report]:
    """A report per variant; a variant that fails to compile gets one with ``error`` set."""
    reports = []
    for v in shipped_variants() if variants is None else variants:
        try:
            reports.append(compile_variant(v))
        except Exception as exc:  # report every variant, not just the first failure
            reports.append(Report(v.name, v.matrix, -1, -1, -1, -1, -1, False, False, rows=v.rows,
                                  launch_key=v.launch_key, error=f"{type(exc).__name__}: {exc}"))
    return reports


def resources(reports: list[dict]) -> dict:
    """The rows of configs/sm90_resources.json: per launch key, what the compile reports (as dicts).
    Variants that differ only in a stride Triton specialises (a column-major scale's stride 1)
    share a key: the row is the one that fits fewest programs an SM (then the most registers), so
    that the launcher's grid never assumes a program resident that one of them cannot fit."""
    rows = {}
    for r in sorted(reports, key=lambda r: (r["launch_key"] or "", r["name"])):
        if not r["launch_key"] or r["error"] is not None:
            continue
        row = dict(variant=r["name"], registers=r["registers"], shared=r["shared"] + r["shared_static"],
                   threads=r["threads"], programs_per_sm=r["programs_per_sm"])
        old = rows.get(r["launch_key"])
        if old is None or (row["programs_per_sm"], -row["registers"]) < (old["programs_per_sm"], -old["registers"]):
            rows[r["launch_key"]] = row
    return rows


def main(argv: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    reports = compile_all()
    if "--write-resources" in argv:
        from . import configs

        path = configs.sm90_resources_path(write=True)
        with open(path, "w") as f:
            json.dump({"generated_by": "python -m moekernels._sm90 --write-resources",
                       "target": "cuda sm_90a, triton " + __import__("triton").__version__,
                       "configs": resources([asdict(r) for r in reports])}, f, indent=1)
            f.write("\n")
        print(f"wrote {path}", file=sys.stderr)
    else:
        print(json.dumps([asdict(r) for r in reports], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

