"""`sparsefx demo`: dense vs sparsefx training side by side on real data.

On 2 CPU cores the digits run takes about a minute, Fashion-MNIST (2 epochs of 60k images)
about six.

Each model is trained twice from the same initial weights, on the same batches in the same
order: once dense, once through `sparsefx.transform` at the given density. Step times are
measured in this run, so the speedup column compares like with like on this machine.
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

import sparsefx
from sparsefx.tools.datasets import Split, load_digits, load_fashion_mnist

DATASETS: dict[str, Callable[[], Split]] = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
}
DEFAULT_EPOCHS = {"digits": 20, "fashion-mnist": 2}
BATCH_SIZE = 64
Batches = list[list[torch.Tensor]]
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LR = 0.05


@dataclass(frozen=True)
class Result:
    """One row of the demo table.

    `density` (kept fraction of the channel budget), `flops_fraction` and `ms_per_step`
    describe the same timed VR-PGE steps (means and a median); dense rows are 1.0 by definition.
    """

    model: str
    method: str
    accuracy: float
    density: float
    flops_fraction: float
    ms_per_step: float
    speedup: float


def build_models(x: torch.Tensor, num_classes: int) -> dict[str, nn.Module]:
    """A CNN with BatchNorm and an MLP, wide enough that compact compute beats per-op overhead.

    Images of 16 px or more enter the CNN with stride 2, so its second convolution works on
    8-14 px as on digits and Fashion-MNIST stays affordable on a laptop CPU.
    """
    channels, height, width = x.shape[1:]
    stride = 2 if min(height, width) >= 16 else 1
    pooled = ((height - 1) // stride + 1) // 2 * (((width - 1) // stride + 1) // 2)
    cnn = nn.Sequential(
        nn.Conv2d(channels, 128, 3, stride=stride, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.Conv2d(128, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * pooled, num_classes),
    )
    mlp = nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * height * width, 2048),
        nn.ReLU(),
        nn.Linear(2048, 2048),
        nn.ReLU(),
        nn.Linear(2048, num_classes),
    )
    return {"cnn": cnn, "mlp": mlp}


def run_demo(
    dataset: str = "digits", density: float = 0.2, epochs: int | None = None, seed: int = 0
) -> list[Result]:
    """Train every demo model dense and with sparsefx, print the table, return its rows."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASETS)}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    epochs = DEFAULT_EPOCHS[dataset] if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    data = DATASETS[dataset]()
    batches = _batch_order(len(data.y_train), epochs, seed)
    torch.manual_seed(seed)
    models = build_models(data.x_train, data.num_classes)
    results = []
    with tqdm(total=len(models) * sum(map(len, batches)), unit="step") as bar:
        for name, model in models.items():
            bar.set_description(name)
            torch.manual_seed(seed)
            results += _train_pair(name, model, data, batches, density, bar)
    print(_header(dataset, data, epochs, density))
    print(format_table(results))
    search, tune = _phases(batches)
    print(
        f"ms/step: median over the {sum(map(len, search))} VR-PGE steps and the dense steps "
        f"beside them; fine-tuning epochs with the frozen mask (not timed): {len(tune)}"
    )
    return results


def _batch_order(n: int, epochs: int, seed: int) -> Batches:
    """Per-epoch shuffled full batches (the last partial one dropped), shared by all methods."""
    gen = torch.Generator().manual_seed(seed)
    return [
        list(torch.randperm(n, generator=gen)[: n - n % BATCH_SIZE].split(BATCH_SIZE))
        for _ in range(epochs)
    ]


def _train_pair(
    name: str, model: nn.Module, data: Split, batches: Batches, density: float, bar: tqdm
) -> list[Result]:
    """Train dense and sparsefx copies of `model` in lockstep, one step each per batch.

    Interleaving the steps exposes both methods to the same machine load, so their step-time
    ratio stays honest on a shared CPU. VR-PGE searches the masks in the first half of the
    epochs; the second half fine-tunes the frozen top-budget mask.
    Only the VR-PGE steps, and the dense steps beside them, are timed: they are what sparse
    training costs per step at worst.
    """
    dense_model = copy.deepcopy(model)
    dense = _Run(dense_model, nn.CrossEntropyLoss(), dense_model)
    sparse_model = copy.deepcopy(model)
    smodel = sparsefx.transform(sparse_model, (data.x_train[:BATCH_SIZE],), density=density)
    sparse = _Run(smodel, sparsefx.wrap_loss(smodel, nn.CrossEntropyLoss()), sparse_model)
    search, tune = _phases(batches)
    stats = []
    for idx in itertools.chain.from_iterable(search):
        dense.step(data, idx, timed=True)
        sparse.step(data, idx, timed=True)
        stats.append(sparsefx.stats(smodel))
        bar.update()
    if tune:
        sparsefx.freeze(smodel, strategy="topk")
    for idx in itertools.chain.from_iterable(tune):
        dense.step(data, idx, timed=False)
        sparse.step(data, idx, timed=False)
        bar.update()
    dense_ms, sparse_ms = _ms(dense.times), _ms(sparse.times)
    density = statistics.fmean(s["sampled_density"] for s in stats)
    flops = statistics.fmean(s["flops_fraction"] for s in stats)
    return [
        Result(name, "dense", _accuracy(dense.net, data), 1.0, 1.0, dense_ms, 1.0),
        Result(
            name,
            "sparsefx",
            _accuracy(smodel, data),
            density,
            flops,
            sparse_ms,
            dense_ms / sparse_ms,
        ),
    ]


def _phases(batches: Batches) -> tuple[Batches, Batches]:
    """Split epochs into the VR-PGE search (first half, rounded up) and the fine-tuning."""
    half = (len(batches) + 1) // 2
    return batches[:half], batches[half:]


class _Run:
    """One training run: the module to call, its loss, an optimizer on `model`, step times."""

    def __init__(self, net: nn.Module, criterion: Criterion, model: nn.Module):
        self.net, self.criterion = net, criterion
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        self.times: list[float] = []
        net.train()

    def step(self, data: Split, idx: torch.Tensor, timed: bool) -> None:
        """One training step; its wall time (batch gather excluded) is kept if `timed`."""
        x, y = data.x_train[idx], data.y_train[idx]
        start = time.perf_counter()
        loss = self.criterion(self.net(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if timed:
            self.times.append(time.perf_counter() - start)


def _ms(times: list[float]) -> float:
    """Median step time in ms: robust to the first steps' warm-up and to scheduler noise."""
    return 1000 * statistics.median(times)


@torch.no_grad()
def _accuracy(net: nn.Module, data: Split) -> float:
    """Test accuracy in eval mode (running BatchNorm statistics, deterministic masks)."""
    net.eval()
    correct = sum(
        (net(x).argmax(1) == y).sum().item()
        for x, y in zip(data.x_test.split(1024), data.y_test.split(1024), strict=True)
    )
    return correct / len(data.y_test)


def _header(dataset: str, data: Split, epochs: int, density: float) -> str:
    """What was measured, so a pasted table carries its conditions with it."""
    return (
        f"{dataset}: {len(data.y_train)} train / {len(data.y_test)} test, {epochs} epochs, "
        f"batch {BATCH_SIZE}, density {density}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads"
    )


def format_table(results: list[Result]) -> str:
    """Fixed-width table: model, method, accuracy, density, FLOPs, ms/step, speedup."""
    rows = [("model", "method", "test acc", "density", "FLOPs", "ms/step", "speedup")]
    rows += [
        (
            r.model,
            r.method,
            f"{100 * r.accuracy:.1f}%",
            f"{r.density:.2f}",
            f"{r.flops_fraction:.2f}",
            f"{r.ms_per_step:.2f}",
            f"{r.speedup:.2f}x",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )
