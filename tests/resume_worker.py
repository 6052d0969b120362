"""A training process for the checkpoint tests (tests/test_resume.py): trains a small sparse
CNN for `steps` steps, saving model and optimizer state dicts after every step, and prints
one JSON line per step (loss as a float's hex, and the masks used).

    python tests/resume_worker.py CHECKPOINT STEPS [--compile] [--resume] [--sleep SECONDS]

`--compile` trains torch.compile(model, backend="sparsefx"), whose structure state is saved
with sparsefx.structure_state (a transformed model's is inside its state_dict).

The batch of step i is drawn from a generator seeded by i, so a resumed run sees the same
data without any loader state.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

import sparsefx


def build(compiled: bool) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 24), nn.ReLU(), nn.Dropout(0.2), nn.Linear(24, 4),
    )  # fmt: skip
    x, _ = batch(0)
    options = {"density": 0.5, "seed": 1, "score_lr": 0.05}
    if compiled:
        sparse = torch.compile(model, backend="sparsefx", options=options)
    else:
        sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(**options))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, sparse, optimizer


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 3, 6, 6, generator=generator)
    return x, torch.randint(0, 4, (8,), generator=generator)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("steps", type=int)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0, help="pause after each checkpoint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, sparse, optimizer = build(args.compile)
    criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
    start = 0
    if args.resume:
        state = torch.load(args.checkpoint, weights_only=False)
        if args.compile:  # before the first call: applied when sparsefx compiles it
            model.load_state_dict(state["model"])
            sparsefx.load_structure_state(sparse, state["structure"])
        else:
            sparse.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    for step in range(start, args.steps):
        x, y = batch(step)
        optimizer.zero_grad()
        loss = criterion(sparse(x), y)
        loss.backward()
        optimizer.step()
        masks = {k: v.int().tolist() for k, v in sparsefx.masks(sparse).items()}
        state = {
            "model": (model if args.compile else sparse).state_dict(),
            "structure": sparsefx.structure_state(sparse) if args.compile else None,
            "optimizer": optimizer.state_dict(),
            "rng": torch.get_rng_state(),  # dropout draws from torch's global generator
            "step": step + 1,
        }
        torch.save(state, args.checkpoint + ".tmp")
        os.replace(args.checkpoint + ".tmp", args.checkpoint)  # never a half-written file
        print(json.dumps({"step": step, "loss": loss.item().hex(), "masks": masks}), flush=True)
        time.sleep(args.sleep)


if __name__ == "__main__":
    main()
