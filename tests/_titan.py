"""Runs torchtitan's own trainer (``torchtitan.train.main``) on the CPU over gloo and returns each step's loss.

The pytest side calls :func:`train`: it writes a tiny tokenizer and data set into a temporary folder, starts
``world_size`` processes (each ``python -c "import _titan; _titan.child(spec)"``, with the env:// variables that
torchrun would set), and reads back what rank 0 recorded: each step's loss and gradient norm, the model's classes
and step 1's expert gradients. One start of a process costs ~6 s of imports on this machine, so each process runs
several trainings in a row (``runs``: one argument list each); every run builds its own config, process group and
model from scratch, so runs do not share state.

Everything here that torchtitan 0.3.0 needs to run on a CPU is a test workaround, not moekernels' code: each
says why. Stock and moekernels runs take the same ones; only causal SDPA changes what the model computes (the
documents packed in a sequence attend to each other), for both alike.
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import traceback
import types

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# 2 sequences of 64 tokens: a step of the debug model takes ~0.5 s on one core. (With 32 tokens a sequence,
# the noisier steps let bf16 rounding move step 4 by 8e-4 relative between two correct runs; with 64, by 3e-4.)
SEQ_LEN, BATCH, STEPS = 64, 2, 4


def base_args(module: str, config: str, assets: pathlib.Path, *, overrides: tuple[str, ...] = (),
              world_size: int = 1, ep: int = 1, steps: int = STEPS, seed: int = 0) -> list[str]:
    """The command line of one run (what ``python -m torchtitan.train`` would take): the stock config
    ``module``/``config`` on :func:`make_assets`' data, plus ``--override.imports`` ``overrides`` (each
    ``module.function`` or ``module.function={json kwargs}``), FSDP over ``world_size`` processes and EP ``ep``."""
    args = [
        "--module", module, "--config", config,
        "--hf_assets_path", str(assets / "tokenizer"),
        "--dataloader.dataset_path", str(assets / "data"),
        "--dump_folder", str(assets / "out"),
        "--training.seq_len", str(SEQ_LEN), "--training.local_batch_size", str(BATCH),
        "--training.steps", str(steps),
        "--debug.seed", str(seed),
        # CPU: with the default spmd_types backend, FSDP over 2 CPU processes fails to shard ("When dp_mesh_dims
        # is provided, all parameters must be DTensors on the full SPMD mesh"); partial_dtensor is the plain
        # DTensor path (DTensor on the parallel axes only). The same flag on 1 process, for one config.
        "--parallelism.spmd_backend", "partial_dtensor",
        # CPU: CUDA graphs need CUDA. With EP > 1 the config check refuses the stock (host-synchronizing)
        # dispatcher unless they are off; on 1 process they would fall back to eager with a warning.
        "--training.disable_cuda_graphs",
        # CPU: FlexAttention has no CPU backward; see causal_sdpa. One flag takes every override (a second
        # --override.imports would replace the first).
        "--override.imports", "_titan.causal_sdpa", *overrides,
    ]
    if world_size > 1:
        args += ["--parallelism.data_parallel_shard_degree", str(world_size),
                 "--parallelism.expert_parallel_degree", str(ep)]
    return args


# --- the CPU workarounds (run in each child before torchtitan's trainer is imported) -------------------------

def cpu_workarounds() -> None:
    """What torchtitan 0.3.0's trainer needs to run on a CPU, beyond the flags in :func:`base_args`; call it
    before anything imports torchtitan.distributed. Registers the ``_titan.causal_sdpa`` override."""
    import torch
    import torch.distributed as dist

    # CPU: torchtitan picks its device type once, at import, as _get_available_device_type() or "cuda"; a CPU-only
    # torch has no accelerator, so it would call torch.cuda. Every torchtitan module that reads device_type or
    # device_module imports them from torchtitan.tools.utils by name, so they are set before those imports.
    import torchtitan.tools.utils as tt_utils
    assert "torchtitan.distributed" not in sys.modules, "device type must be set before torchtitan.distributed loads"
    # torch.cpu lacks the memory-monitor calls torchtitan's metrics make (device name, capacity, memory stats),
    # so the device module is torch.cpu plus those, reporting the host's memory and no allocator statistics.
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cpu = types.SimpleNamespace(**{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})
    cpu.get_device_name = lambda device=None: "cpu"
    cpu.get_device_properties = lambda device=None: types.SimpleNamespace(name="cpu", total_memory=memory)
    cpu.memory_stats = lambda device=None: {}
    # torch.cpu.current_device() is the string "cpu"; torchtitan passes it to barrier(device_ids=[...]), which
    # takes device indices (gloo ignores them).
    cpu.current_device = lambda: 0
    cpu.reset_peak_memory_stats = cpu.empty_cache = lambda device=None: None
    tt_utils.device_type, tt_utils.device_module = "cpu", cpu

    # CPU: torchtitan lowers every process group's timeout after the first step with
    # torch.distributed.set_timeout, which torch 2.13 does not have; the timeout is only a watchdog setting.
    if not hasattr(dist, "set_timeout"):
        dist.set_timeout = lambda timeout, group=None: None

    # CPU: FSDP2 reduce-scatters gradients with ReduceOp.AVG or PREMUL_SUM (a division folded into the
    # reduction); gloo has neither ("RuntimeError: Cannot use ReduceOp.PREMUL_SUM with Gloo" with EP 2). Forced
    # to SUM, FSDP divides afterwards instead: the same gradient, one more division.
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll
    factors = coll._get_gradient_divide_factors
    signature = inspect.signature(factors)

    def sum_reduction(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["force_sum_reduction_for_comms"] = True
        return factors(*bound.args, **bound.kwargs)

    coll._get_gradient_divide_factors = sum_reduction

    global causal_sdpa
    causal_sdpa = _register_causal_sdpa()  # --override.imports _titan.causal_sdpa finds it registered


def _register_causal_sdpa():
    from torchtitan.config.override import override
    from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention

    # CPU: "NotImplementedError: FlexAttention does not support backward on CPU" (measured, torch 2.13). Causal
    # SDPA is the same attention without the per-document mask (documents packed in a sequence then see each
    # other), the same for stock and moekernels runs. With SDPA the trainer builds no masks (it builds them for
    # Flex and Varlen only).
    @override(target=FlexAttention.Config, exact=True, description="CPU test: causal SDPA for FlexAttention")
    def causal_sdpa(cfg):
        return ScaledDotProductAttention.Config()

    return causal_sdpa


EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")  # GroupedExperts' parameters (the shared experts' are Linears)


def record_steps() -> list[dict]:
    """Hooks torchtitan's metrics so that each logged step appends to the list returned ``{"step", "loss",
    "grad_norm", "classes"}``: the global mean loss and the gradient norm the trainer logs (at full precision),
    the model's class names, and at step 1 ``"expert_grads"``: this rank's shard of the first MoE layer's expert
    weights' gradients (float32, clipped as the optimizer took them). Step 1's weights are the same in every run
    of a seed, so these compare the experts' backward directly; the loss barely sees the experts at init (in
    the DeepSeek-V3 debug model, scaling their output by 1.0625, or swapping w1 and w3, moved no step's loss by
    more than 1.2e-4 relative, less than bf16 rounding moves step 4)."""
    from torch.distributed.tensor import DTensor
    from torchtitan.components.metrics import MetricsProcessor

    records: list[dict] = []
    log = MetricsProcessor.log

    def record(self, step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs):
        model = self.model_parts[0]
        # The classes (and each MoE's token dispatcher's), so a test can see the overrides took hold;
        # fully_shard renames a module's class FSDP<name>, hence the MRO.
        modules = list(model.modules())
        classes = ({c.__name__ for m in modules for c in type(m).__mro__}
                   | {type(m.token_dispatcher).__name__ for m in modules if hasattr(m, "token_dispatcher")})
        entry = {"step": step, "loss": float(global_avg_loss), "grad_norm": float(grad_norm),
                 "classes": sorted(classes)}
        if step == 1:
            grads = {name: p.grad for name, p in model.named_parameters() if name.endswith(EXPERT_WEIGHTS)}
            first = min(grads, key=lambda n: int(n.split("layers.")[1].split(".")[0]))  # the first MoE layer
            layer = first.split("layers.")[1].split(".")[0]
            entry["expert_grads"] = {
                name.rsplit(".", 1)[1]: (g.to_local() if isinstance(g, DTensor) else g).detach().float().clone()
                for name, g in grads.items() if name.split("layers.")[1].split(".")[0] == layer}
        records.append(entry)
        return log(self, step, global_avg_loss, global_max_loss, grad_norm, *args, **kwargs)

    MetricsProcessor.log = record
    return records


# --- the child process ----------------------------------------------------------------------------------------

def child(spec_path: str) -> None:
    """Runs each argument list of the spec through ``torchtitan.train.main`` and writes, after each run, this
    rank's results so far: per-step losses and model classes, or the traceback of a run that raised. With more
    than one process a failed run ends the process (its peers may be waiting in a collective)."""
    spec = json.loads(pathlib.Path(spec_path).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    base = pathlib.Path(spec["out"])
    out = base.with_suffix(f".rank{rank}.json")
    cpu_workarounds()
    records = record_steps()
    import torch
    import torchtitan.train
    import torchtitan.trainer

    # Test speed, not CPU: rank 0 sleeps 2 s after training "for other ranks to complete" (each rank then
    # tears down its own process group); ten runs would spend 20 s asleep.
    torchtitan.trainer.time = types.SimpleNamespace(perf_counter=time.perf_counter, sleep=lambda seconds: None)

    results = []
    for i, args in enumerate(spec["runs"]):
        records.clear()
        # Each run makes a new process group (main() destroys its own at the end); a fresh port avoids waiting
        # for the last store's socket to close.
        os.environ["MASTER_PORT"] = str(spec["ports"][i])
        sys.argv = ["torchtitan.train", *args]
        try:
            torchtitan.train.main()
            assert [r["step"] for r in records] == list(range(1, len(records) + 1)), records
            grads = base.with_suffix(f".run{i}.rank{rank}.pt")
            torch.save(records[0]["expert_grads"], grads)
            results.append({"losses": [r["loss"] for r in records], "grad_norms": [r["grad_norm"] for r in records],
                            "classes": records[0]["classes"], "expert_grads": str(grads)})
        except Exception:
            traceback.print_exc()
            results.append({"error": f"rank {rank}: " + traceback.format_exc()})
            if torch.distributed.is_initialized():  # main() tears it down only after a run that succeeded
                torch.distributed.destroy_process_group()
        out.write_text(json.dumps(results))
        if "error" in results[-1] and world_size > 1:
            sys.stdout.flush()
            os._exit(1)


# --- the pytest side ------------------------------------------------------------------------------------------

def make_assets(folder: pathlib.Path, vocab_size: int = 512) -> pathlib.Path:
    """A word-level tokenizer (tokenizers' own format, with BOS/EOS) and a JSON-lines text data set that the
    stock ``c4_test`` loader (``load_dataset(path, split="train")``) reads from a folder: the wheel ships
    neither, and the run must not touch the network."""
    import random

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(vocab_size - 3)]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer" / "tokenizer.json"))
    (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}))

    rng = random.Random(0)
    # A Zipf-like draw, so the model has something to learn in 4 steps (the loss falls).
    weights = [1.0 / (i + 1) for i in range(len(words))]
    docs = [" ".join(rng.choices(words, weights, k=rng.randint(20, 120))) for _ in range(200)]
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return folder


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def train(runs: list[list[str]], folder: pathlib.Path, *, world_size: int = 1, timeout: float = 300) -> list[dict]:
    """Runs each argument list (see :func:`base_args`) as a ``world_size``-process torchtitan training and
    returns, for each run, ``{"losses", "grad_norms", "classes", "expert_grads"}``: its per-step losses and
    gradient norms (rank 0's log: global), the class names in its model (with each token dispatcher's), and
    the path of a ``torch.save`` of rank 0's step-1 expert gradients (see :func:`record_steps`); or ``{"error": ...}``
    with the traceback of a run that failed. Each process's output is in ``folder/log<world_size>_rank<r>.txt``."""
    spec = folder / f"spec{world_size}.json"
    out = folder / f"losses{world_size}.json"
    spec.write_text(json.dumps({"runs": runs, "out": str(out), "ports": _free_ports(len(runs))}))
    path = [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")]  # this checkout's moekernels, and _titan
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    # The trainer's CPU tensors take moekernels' torch backend, as a user's would; interpreting Triton in a
    # training run would take minutes.
    env.pop("TRITON_INTERPRET", None)
    env.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
               OMP_NUM_THREADS="1")
    for f in [*folder.glob(out.stem + ".rank*.json"), *folder.glob(out.stem + ".run*.pt")]:  # an earlier call's
        f.unlink()
    logs = [open(folder / f"log{world_size}_rank{rank}.txt", "w") for rank in range(world_size)]
    procs = [subprocess.Popen([sys.executable, "-c", "import sys, _titan; _titan.child(sys.argv[1])", str(spec)],
                              cwd=folder, env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=logs[rank], stderr=subprocess.STDOUT)
             for rank in range(world_size)]
    # Until all exit, or one fails (then the others get 10 s, as a peer may wait on it in a collective).
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode for p in procs):
            deadline = min(deadline, time.monotonic() + 10)
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()
    done = [json.loads(f.read_text()) if f.exists() else []
            for f in (out.with_suffix(f".rank{rank}.json") for rank in range(world_size))]
    results = []
    for i in range(len(runs)):
        errors = [d[i]["error"] for d in done if i < len(d) and "error" in d[i]]
        if errors or i >= len(done[0]):
            log = (folder / f"log{world_size}_rank0.txt").read_text()[-3000:]
            results.append({"error": "\n".join(errors) or f"not run or not finished (an earlier run failed, or "
                                                            f"the {timeout:.0f} s ran out); rank 0's log ends:\n{log}"})
        else:
            results.append(done[0][i])
    return results


def qwen3_moe_debug_1_layer():
    """torchtitan's ``qwen3_moe_debug`` with the first of its 8 layers (``--module _titan --config
    qwen3_moe_debug_1_layer``): each layer holds 64 experts of 256 x 768 (38 M parameters, top-8 routing); all 8
    took 92 s and 7 GB for 4 steps on this machine's CPU, 2 took 15 s; one keeps the same layer."""
    from torchtitan.models.qwen3.config_registry import qwen3_moe_debug

    config = qwen3_moe_debug()
    config.model_spec.model.layers = config.model_spec.model.layers[:1]
    return config
