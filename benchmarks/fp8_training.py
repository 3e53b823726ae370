"""FP8 training against high precision: the same small MoE model trained twice from one seed.

    python -m benchmarks.fp8_training [--steps 200] [--backend torch] [--out benchmarks/results/fp8_training.png]

A token model whose only path from input to logits is an ``MoE`` (H = I = 128, E = 8, k = 2,
float32 master weights) learns a fixed random map of 128 tokens with 20% of the labels drawn at
random (the floor of the loss), by AdamW, once with ``precision=None`` (float32 experts) and
once with ``precision="fp8"`` (DeepSeek-V3's recipe: every expert GEMM and its gradients on
e4m3). Both runs draw the same batches. ``compare`` gives what tests/test_fp8_training.py bounds: the mean
loss from step 50 on and every 25-step window. A model this small is noisy: DeepSeek-V3's 0.25%
relative loss error is a figure at scale. Runs on the CPU (torch backend) in about a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from moekernels import MoE

HIDDEN, INTER, EXPERTS, TOP_K = 128, 128, 8, 2
VOCAB, TOKENS, NOISE = 128, 128, 0.2  # tokens a step; the share of labels drawn at random (the loss floor)


class TinyMoEModel(torch.nn.Module):
    """Embedding -> MoE -> linear head: the experts are the only path from a token to its logits."""

    def __init__(self, precision: str | None, backend: str):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.moe = MoE(HIDDEN, INTER, EXPERTS, TOP_K, precision=precision, backend=backend)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens):
        return self.head(self.moe(self.embed(tokens)))


def train(precision: str | None, steps: int, *, backend: str = "torch", seed: int = 0, lr: float = 3e-3) -> list[float]:
    """The per-step training losses (cross-entropy, plus 1e-2 x the load-balancing loss) of one
    run: predict a fixed random permutation of the input token, the labels of a NOISE share of the
    tokens drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    target_of = torch.randperm(VOCAB, generator=gen)
    model = TinyMoEModel(precision, backend)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(VOCAB, (TOKENS,), generator=gen)
        labels = torch.where(torch.rand(TOKENS, generator=gen) < NOISE, torch.randint(VOCAB, (TOKENS,), generator=gen),
                             target_of[tokens])
        loss = torch.nn.functional.cross_entropy(model(tokens), labels) + 1e-2 * model.moe.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def compare(high: list[float], fp8: list[float], *, start: int = 50, window: int = 25) -> dict:
    """Relative differences of the fp8 losses from the high-precision ones: the mean over steps
    >= start, and the worst mean over each window of steps from start on."""
    def mean(v):
        return sum(v) / len(v)
    windows = [abs(mean(fp8[i:i + window]) / mean(high[i:i + window]) - 1)
               for i in range(start, len(high) - window + 1, window)]
    return {"mean_rel": abs(mean(fp8[start:]) / mean(high[start:]) - 1), "worst_window_rel": max(windows),
            "first": (high[0], fp8[0]), "last": (mean(high[-window:]), mean(fp8[-window:]))}


def plot(high: list[float], fp8: list[float], path: Path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(high, label="float32 experts", lw=1.2)
    ax.plot(fp8, label='precision="fp8" (DeepSeek-V3 recipe)', lw=1.2, alpha=0.85)
    ax.set_yscale("log")
    ax.set_xlabel("AdamW step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(f"MoE H={HIDDEN} I={INTER} E={EXPERTS} k={TOP_K}: fp8 mean loss from step 50 "
                 f"{100 * stats['mean_rel']:.2f}% off", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--backend", default="torch")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fp8_training.png")
    args = p.parse_args(argv)
    high = train(None, args.steps, backend=args.backend)
    fp8 = train("fp8", args.steps, backend=args.backend)
    stats = compare(high, fp8)
    print(f"loss, first -> last 25 steps: float32 {stats['first'][0]:.4f} -> {stats['last'][0]:.4f}, "
          f"fp8 {stats['first'][1]:.4f} -> {stats['last'][1]:.4f}")
    print(f"fp8 vs float32: mean from step 50 {100 * stats['mean_rel']:.2f}%, "
          f"worst 25-step window {100 * stats['worst_window_rel']:.2f}%")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot(high, fp8, args.out, stats)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
