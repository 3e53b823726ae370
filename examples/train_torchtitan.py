"""Train torchtitan's DeepSeek-V3 debug model with moekernels as its routed experts, through torchtitan's own
trainer (torchtitan 0.3.0, ``pip install moekernels[torchtitan]``).

moekernels is switched on by torchtitan's override flag; nothing else in the model, config or checkpoints
changes. On GPUs the same run is the command line

    torchrun --nproc_per_node 8 -m torchtitan.train --module deepseek_v3 --config deepseek_v3_debugmodel \\
        --override.imports moekernels.integrations.torchtitan.routed_experts

This script runs it in-process on one device: ``torchtitan.train.main`` with those flags. On a CPU it first
applies the test suite's CPU workarounds (tests/_titan.py: torchtitan 0.3.0 assumes an accelerator, and its
FlexAttention has no CPU backward), and, on any device, makes a tiny tokenizer and data set (torchtitan's
debug configs read tests/assets/ of its source tree, which the wheel does not ship). The check: the
moekernels experts are in the model, and the loss falls.
"""

import os
import pathlib
import socket
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import _titan  # noqa: E402  (the CPU workarounds and the tiny data set)

STEPS = 6  # the loss falls from ~8.0 to ~5.7 by step 6 (5.6 by step 10)
ON_CPU = not torch.cuda.is_available()

with socket.socket() as s:  # one process: the env:// rendezvous that torchrun would set up
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port)).items():
    os.environ.setdefault(key, value)

scratch = tempfile.TemporaryDirectory()  # removed at exit
folder = _titan.make_assets(pathlib.Path(scratch.name))
overrides = ["moekernels.integrations.torchtitan.routed_experts"]
flags = ["--module", "deepseek_v3", "--config", "deepseek_v3_debugmodel",
         "--hf_assets_path", str(folder / "tokenizer"), "--dataloader.dataset_path", str(folder / "data"),
         "--dump_folder", str(folder / "out"),
         "--training.steps", str(STEPS), "--training.seq_len", "64", "--training.local_batch_size", "2",
         "--debug.seed", "0"]
if ON_CPU:  # CPU only (tests/_titan.py says why each is needed); a GPU run needs none of these
    _titan.cpu_workarounds()  # the device type, gloo's missing ops; before torchtitan.distributed is imported
    flags += ["--parallelism.spmd_backend", "partial_dtensor", "--training.disable_cuda_graphs"]
    overrides.append("_titan.causal_sdpa")  # FlexAttention -> causal SDPA
flags += ["--override.imports", *overrides]
records = _titan.record_steps()  # each logged step's loss and the model's classes

import torchtitan.train  # noqa: E402

sys.argv = ["torchtitan.train", *flags]
torchtitan.train.main()

loss = [r["loss"] for r in records]
print("loss by step:", " ".join(f"{x:.3f}" for x in loss))
assert "MoekernelsRoutedExperts" in records[0]["classes"], records[0]["classes"]
assert len(loss) == STEPS and loss[-1] < loss[0] - 1.0, loss
print(f"check: torchtitan trained DeepSeek-V3's debug model on moekernels' routed experts for {STEPS} steps; "
      f"the loss fell from {loss[0]:.3f} to {loss[-1]:.3f}")
