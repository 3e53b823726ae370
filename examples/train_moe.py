"""Train a moekernels.MoE layer under torch.compile, with its router losses.

The layer learns to imitate a fixed random "teacher" MoE of the same shape on one batch of tokens. The loss is the
mean squared error plus the two router losses the layer sets in training mode: ``aux_loss`` (transformers'
load-balancing loss) and ``z_loss`` (ST-MoE's router z-loss). The checks: the compiled step computes what the eager
one does, and the error falls well below the target's own variance (what predicting zero would give).

Runs as it is on a CPU and on a CUDA GPU.
"""

import sys
import time

import torch

import moekernels

device = "cuda" if torch.cuda.is_available() else "cpu"
T, H, I, E, K = 128, 64, 32, 8, 2  # tokens, hidden size, expert intermediate size, experts, experts per token
STEPS = 40
AUX_COEF, Z_COEF = 1e-2, 1e-3  # Switch Transformer's and ST-MoE's coefficients

torch.manual_seed(0)
# float32 parameters (a mixed-precision run's master weights); the grouped GEMMs run as tf32 on the GPU.
teacher = moekernels.MoE(H, I, E, K, device=device).eval()
layer = moekernels.MoE(H, I, E, K, device=device)  # training mode: the forward sets aux_loss and z_loss
opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
x = torch.randn(T, H, device=device)
with torch.no_grad():
    target = teacher(x)


def loss_fn(x, target):
    mse = (layer(x) - target).square().mean()
    return mse + AUX_COEF * layer.aux_loss + Z_COEF * layer.z_loss, mse, layer.aux_loss, layer.z_loss


# fullgraph=True: the whole layer (routing, the fused experts, both losses) traces as one graph, no Python fallback.
# On the GPU, inductor. On the CPU, aot_eager: the same tracing (dynamo, the custom ops' fakes, AOTAutograd's
# backward graph) without generated code, because inductor builds C++ there (it needs gcc or clang): measured on 2
# busy cores, 30-60 s for this step's forward and backward against aot_eager's 5 s, to run the same custom ops.
# `python examples/train_moe.py inductor` takes inductor anyway.
backend = sys.argv[1] if len(sys.argv) > 1 else "inductor" if device == "cuda" else "aot_eager"
compiled_loss = torch.compile(loss_fn, fullgraph=True, backend=backend)

# The compiled step against the eager one (the first call compiles: timed).
start = time.perf_counter()
got = compiled_loss(x, target)
compile_s = time.perf_counter() - start
want = loss_fn(x, target)
diff = max(abs(a.item() - b.item()) / abs(b.item()) for a, b in zip(got, want))
print(f"first compiled call ({backend}, compiles) {compile_s:.1f} s; compiled vs eager, the loss and each term: "
      f"max relative difference {diff:.1e}")
assert diff < 1e-4, diff

start = time.perf_counter()
for step in range(STEPS):
    loss, mse, aux, z = compiled_loss(x, target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if step % 10 == 0 or step == STEPS - 1:
        print(f"step {step:2d}  loss {loss.item():.5f}  mse {mse.item():.5f}  aux {aux.item():.3f}  z {z.item():.3f}")
train_s = time.perf_counter() - start

variance = target.var().item()
print(f"check: mse {mse.item():.2e} after {STEPS} steps ({train_s:.1f} s), target variance {variance:.2e}")
assert mse.item() < 0.3 * variance, (mse.item(), variance)
