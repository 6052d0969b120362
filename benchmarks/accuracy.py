"""Accuracy of sparse training on real data: sparsefx against dense training and peer methods.

    python benchmarks/accuracy.py --quick          # under 5 minutes on 2 CPU cores
    python benchmarks/accuracy.py                  # the full run (3 seeds, every setting)
    python benchmarks/accuracy.py --combine a.json,b.json --json all.json  # runs made in parts

Settings: Fashion-MNIST (Debian's `dataset-fashion-mnist`) with a small CNN with BatchNorm
and with an MLP, and scikit-learn's digits with an MLP. Methods, all with the same epochs,
the same data order per seed, SGD with momentum and a cosine learning rate:

* dense: ordinary training.
* `--validate N`: train on all but the last N training examples and score on those N, not
  the test set, to choose options (a warm-up, the restart) without looking at test accuracy.
* `--restart-lr`: every method's cosine restarts from its peak when the search ends
  (learning-rate rewinding, Renda et al. 2020), reported as `<method> lr-restart`.
* sparsefx-paper / sparsefx-exact: `sparsefx.transform` with each score form of DESIGN §3;
  VR-PGE for the first `SEARCH` fraction of the epochs, then `freeze("topk", multiple=M)`
  (kept counts in the CPU's channel blocks, `--freeze-multiple`) and fine-tuning.
* paper-code: the VR-PGE code of Zhou et al. (2021) as it runs (masks multiply the weights
  before BatchNorm, dense compute, K=2 forwards and backwards), then the same freeze and
  fine-tuning with dense masked compute (`benchmarks/step_time.py` holds its step).
* static: a random channel mask at the density (per group), fixed, trained through sparsefx;
  `--static-kept 12,20,24` keeps those counts per group instead (reported as
  `static@12/20/24`: how much the allocation across layers alone is worth), and
  `--static-masks runs.json` the very channels a sparsefx run of that JSON (same setting,
  density and seed) ended with (reported as `static@sparsefx-paper`: the searched structure
  trained from the start, without the search).
* `--search-kept 12,20,24`: sparsefx's search with each group's budget fixed at those counts
  (a per-group projection, shrinking from the whole group as the budget warm-up shrinks the
  model's; the freeze keeps each group's top counts by s), reported as
  `sparsefx-paper@12/20/24`: the search at a split it does not choose itself.
* rigl: channel-level dynamic sparse training (RigL-style): every `RIGL_EVERY` steps until
  75% of training, each group drops the kept channels with the smallest weight-row norm and
  regrows as many dropped ones with the largest dense gradient (one dense step), the drop
  fraction decaying on a cosine; through sparsefx's compact ops with `set_masks`.

Reported per (setting, method, density): test accuracy (mean and spread over seeds), the
achieved channel density, training FLOPs (linear/conv FLOPs counted by FlopCounterMode on
every `FLOP_EVERY`-th step, their mean times the steps), the wall time of the training
steps (the others, at their mean pace for the counted ones) and the kept channels per group.
For the sparsefx methods each run also records how its search went (`Run.trace`, in the
JSON): every `TRACE_EVERY` search steps, the channels still undecided and the expected kept
count per group; the run's line says when every channel was decided.

Device: a CUDA GPU when one is present (`--device` to choose), else the CPU. Initial weights
and batch orders are drawn on the CPU either way, so a seed starts every device from the same
model; on CUDA every timed step is synchronised before the clock is read.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from common import channel_block, environment, format_table
from step_time import Scores, masked_forward, plan_of
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

import sparsefx
from sparsefx.policy.projection import project_to_budget
from sparsefx.tools.datasets import Split, load_digits, load_fashion_mnist

RESULTS = Path(__file__).parent / "results"
SEARCH = 0.5  # default fraction of the epochs that searches masks; the rest fine-tunes
RIGL_EVERY = 50  # steps between RigL mask updates
RIGL_DROP = 0.3  # initial fraction of kept channels RigL drops and regrows
MOMENTUM = 0.9
TRACE_EVERY = 25  # search steps between records of the structure's state
UNDECIDED = (0.02, 0.98)  # keep probabilities in this open range count as undecided
FLOP_EVERY = 13  # steps between FLOP-counted ones: spread over both phases and coprime to
# RIGL_EVERY, so sparsefx's polarising search and RigL's dense steps are counted at their rate


# -- settings -------------------------------------------------------------------------------


def cnn(channels: int, classes: int, widths: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """Three conv-BN-ReLU blocks (`widths` channels; strides 2, 2, 1), pool, linear."""
    layers: list[nn.Module] = []
    for width, stride in zip(widths, (2, 2, 1), strict=True):
        layers += [nn.Conv2d(channels, width, 3, stride, 1), nn.BatchNorm2d(width), nn.ReLU()]
        channels = width
    return nn.Sequential(
        *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, classes)
    )


def mlp(features: int, classes: int, width: int = 512) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, classes),
    )  # fmt: skip


@dataclass(frozen=True)
class Setting:
    load: Callable[[], Split]
    build: Callable[[Split], nn.Sequential]
    epochs: int
    batch: int
    lr: float
    flat: bool
    """Inputs flattened to vectors (the MLPs)."""


SETTINGS = {
    "fashion-cnn": Setting(
        load_fashion_mnist, lambda d: cnn(1, d.num_classes), epochs=10, batch=128, lr=0.05,
        flat=False,
    ),
    "fashion-cnn-wide": Setting(
        load_fashion_mnist, lambda d: cnn(1, d.num_classes, (64, 128, 256)), epochs=10,
        batch=128, lr=0.05, flat=False,
    ),
    "fashion-mlp": Setting(
        load_fashion_mnist, lambda d: mlp(784, d.num_classes), epochs=10, batch=128, lr=0.05,
        flat=True,
    ),
    "digits-mlp": Setting(
        load_digits, lambda d: mlp(64, d.num_classes), epochs=30, batch=64, lr=0.05, flat=True
    ),
}  # fmt: skip
QUICK_EPOCHS = {"fashion-cnn": 6, "fashion-cnn-wide": 6, "fashion-mlp": 6}
METHODS = ("dense", "sparsefx-paper", "sparsefx-exact", "paper-code", "static", "rigl")


# -- one training run -----------------------------------------------------------------------


@dataclass
class Run:
    """One method on one setting, density and seed."""

    setting: str
    method: str
    density: float
    seed: int
    accuracy: float = 0.0
    achieved_density: float = 1.0
    train_flops: float = 0.0
    train_seconds: float = 0.0
    step_flops: list[float] = field(default_factory=list, repr=False)
    kept: list[int] = field(default_factory=list)
    """Kept channels per group at the end (the sparse methods)."""
    channels: dict[str, list[int]] = field(default_factory=dict, repr=False)
    """The kept channels' indices per group at the end (the methods trained through sparsefx)."""
    trace: list[list[float]] = field(default_factory=list, repr=False)
    """sparsefx's search every TRACE_EVERY steps: [step, channels undecided, expected kept
    count per group...]."""

    def decided_step(self) -> int | None:
        """The first traced step from which no channel was undecided again."""
        step = None
        for point in self.trace:
            if point[1] > 0:
                step = None
            elif step is None:
                step = int(point[0])
        return step


class Trainer:
    """A method's training: `step(x, y)` per batch (the loop sets the learning rate),
    `fine_tune()` when the search ends, `predict(x)` in eval mode, and the density of the
    structure it ends with. `options` are SparseConfig fields for the sparsefx methods."""

    def __init__(
        self, model: nn.Sequential, density: float, example: Tensor, seed: int, options: dict
    ):
        self.model, self.density = model, density
        self.net: nn.Module = model
        """The module to call: its train/eval mode is the run's."""
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=MOMENTUM)

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(self.model(x), y)

    def step(self, x: Tensor, y: Tensor) -> None:
        loss = self.loss(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def fine_tune(self) -> None:
        """Called once when the mask search ends (a no-op for methods without one)."""

    def predict(self, x: Tensor) -> Tensor:
        return self.model(x)

    def achieved_density(self) -> float:
        return 1.0

    def kept(self) -> list[int]:
        """Kept channels per group of the structure it ends with (none for dense)."""
        return []

    def kept_channels(self) -> dict[str, list[int]]:
        """{group: kept channel indices} of the structure it ends with (sparsefx's groups)."""
        return {}

    def search_state(self) -> list[float] | None:
        """[channels undecided, expected kept count per group...] while masks are sampled."""
        return None


class Dense(Trainer):
    pass


class Sparsefx(Trainer):
    """sparsefx as a user writes it: transform, wrap_loss, an ordinary loop, then freeze."""

    score_form = "paper"
    freeze_multiple = 1
    """`freeze(multiple=)`: kept counts rounded to the CPU's channel block (`--freeze-multiple`)."""
    search_kept: list[int] | None = None
    """`--search-kept`: the kept counts per group the search was held to (`hold_to`)."""

    def __init__(
        self, model: nn.Sequential, density: float, example: Tensor, seed: int, options: dict
    ):
        super().__init__(model, density, example, seed, options)
        options = {"score_form": self.score_form, **options}
        config = sparsefx.SparseConfig(density=density, seed=seed, **options)
        self.sparse = self.net = sparsefx.transform(model, (example,), config=config)
        self.criterion = sparsefx.wrap_loss(self.sparse, nn.CrossEntropyLoss())
        self.searching = True

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        return self.criterion(self.sparse(x), y)

    def hold_to(self, counts: list[int]) -> None:
        """Search with a budget per group: group i keeps `counts[i]` channels in expectation,
        shrinking from the whole group by the budget warm-up's own schedule, so the search
        decides which channels within each group at a split it did not choose. (A benchmark
        experiment: this structure's projection is replaced, without the reserve for the
        sampler's two-channel minimum.)"""
        state = self.sparse.runtime.structure
        sizes = [b - a for a, b in zip(state.offsets, state.offsets[1:], strict=False)]
        if (
            state.config.budget != "channels"
            or len(counts) != len(sizes)
            or sum(counts) != round(state.target_budget)
            or not all(2 <= k <= n for k, n in zip(counts, sizes, strict=True))
        ):
            raise SystemExit(
                f"--search-kept {counts}: need one count in 2..size per group (sizes {sizes}) "
                f"summing to the density's {round(state.target_budget)} channels, with "
                "budget=channels"
            )

        def project(z: Tensor, *, triton: bool) -> Tensor:
            spare = state.total_cost - state.target_budget
            remaining = (state.budget - state.target_budget) / spare if spare else 0.0
            groups = zip(z.split(sizes), state.costs.split(sizes), counts, sizes, strict=True)
            return torch.cat(
                [project_to_budget(zg, cg, k + (n - k) * remaining) for zg, cg, k, n in groups]
            )

        state._project = project
        state.probabilities.copy_(project(state.probabilities, triton=False))
        self.search_kept = counts

    def fine_tune(self) -> None:
        if self.search_kept:  # each group's top counts by s, as its own budget searched
            probabilities = sparsefx.probabilities(self.sparse)
            masks = {}
            for (group, s), count in zip(probabilities.items(), self.search_kept, strict=True):
                masks[group] = torch.zeros_like(s, dtype=torch.bool)
                masks[group][s.topk(count).indices] = True
            sparsefx.set_masks(self.sparse, masks)
        else:
            sparsefx.freeze(self.sparse, "topk", multiple=self.freeze_multiple)
        self.searching = False

    def predict(self, x: Tensor) -> Tensor:
        return self.sparse(x)

    def achieved_density(self) -> float:
        return sparsefx.stats(self.sparse)["channel_density"]

    def kept(self) -> list[int]:
        return [int(mask.sum()) for mask in sparsefx.masks(self.sparse).values()]

    def kept_channels(self) -> dict[str, list[int]]:
        return {g: m.nonzero().flatten().tolist() for g, m in sparsefx.masks(self.sparse).items()}

    def search_state(self) -> list[float] | None:
        if not self.searching:
            return None
        low, high = UNDECIDED
        s = list(sparsefx.probabilities(self.sparse).values())
        undecided = sum(int(((p > low) & (p < high)).sum()) for p in s)
        return [undecided, *(float(p.sum()) for p in s)]


class SparsefxExact(Sparsefx):
    score_form = "exact"


class Static(Sparsefx):
    """A random mask at the density (the same fraction of every group), never changed."""

    def __init__(
        self, model: nn.Sequential, density: float, example: Tensor, seed: int, options: dict
    ):
        super().__init__(model, density, example, seed, options)
        self.seed, self.searching = seed, False
        self.keep([max(2, round(density * g.size)) for g in sparsefx.groups(self.sparse)])

    def keep(self, counts: list[int]) -> None:
        """Fix a random mask (drawn from the seed) that keeps `counts[i]` channels of group i."""
        groups = sparsefx.groups(self.sparse)
        if len(counts) != len(groups) or not all(
            0 < k <= g.size for k, g in zip(counts, groups, strict=False)
        ):
            sizes = [g.size for g in groups]
            raise ValueError(
                f"need one kept count in 1..size per group (sizes {sizes}), got {counts}"
            )
        generator = torch.Generator().manual_seed(self.seed)
        self.fix(
            {
                group.name: torch.randperm(group.size, generator=generator)[:count].tolist()
                for group, count in zip(groups, counts, strict=True)
            }
        )

    def fix(self, channels: dict[str, list[int]]) -> None:
        """Fix the mask that keeps these channel indices of each group."""
        masks = {}
        for group in sparsefx.groups(self.sparse):
            masks[group.name] = torch.zeros(group.size, dtype=torch.bool)
            masks[group.name][channels[group.name]] = True
        sparsefx.set_masks(self.sparse, masks)

    def fine_tune(self) -> None:
        pass


class RigL(Static):
    """Channel-level RigL: periodically drop the weakest kept channels (weight-row norm) and
    regrow the dropped ones with the largest gradient, from one dense step on the batch."""

    def __init__(
        self, model: nn.Sequential, density: float, example: Tensor, seed: int, options: dict
    ):
        super().__init__(model, density, example, seed, options)
        self.steps = 0
        self.total_steps = 1  # set by `train` before the first step

    def step(self, x: Tensor, y: Tensor) -> None:
        self.steps += 1
        if self.steps % RIGL_EVERY == 0 and self.steps < 0.75 * self.total_steps:
            self._update(x, y)
        super().step(x, y)

    def _update(self, x: Tensor, y: Tensor) -> None:
        groups = sparsefx.groups(self.sparse)
        masks = sparsefx.masks(self.sparse)  # the fixed masks, as the last step used them
        horizon = 0.75 * self.total_steps
        fraction = RIGL_DROP * (1 + math.cos(math.pi * self.steps / horizon)) / 2
        sparsefx.set_masks(
            self.sparse, {g.name: torch.ones(g.size, dtype=torch.bool) for g in groups}
        )
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.sparse(x), y).backward()  # a dense step's gradients
        new = {}
        for group in groups:
            weight = self.model.get_parameter(group.members[0][0])  # the producer's weight
            norms = weight.detach().flatten(1).norm(dim=1)
            grads = weight.grad.flatten(1).norm(dim=1)
            kept = masks[group.name].to(norms.device, copy=True)
            count = int(fraction * int(kept.sum()))
            if count:
                kept[torch.where(kept, norms, math.inf).topk(count, largest=False).indices] = False
                kept[torch.where(kept, -math.inf, grads).topk(count).indices] = True
            new[group.name] = kept
        self.optimizer.zero_grad(set_to_none=True)
        sparsefx.set_masks(self.sparse, new)


class PaperCode(Trainer):
    """The paper's code: K masked-weight dense forwards and backwards, then the score update;
    after the search, the top-budget mask multiplies the weights for fine-tuning."""

    def __init__(
        self, model: nn.Sequential, density: float, example: Tensor, seed: int, options: dict
    ):
        super().__init__(model, density, example, seed, options)
        self.plan = plan_of(model)
        self.scores = Scores(self.plan.widths, density, device=example.device)
        self.fixed: Tensor | None = None

    def step(self, x: Tensor, y: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.fixed is not None:
            loss = F.cross_entropy(self._forward(x, self.fixed), y)
            loss.backward()
            self.optimizer.step()
            return
        masks = self.scores.sample(2)
        losses = []
        for mask in masks.float():
            loss = F.cross_entropy(self._forward(x, mask), y)
            (loss / 2).backward()
            losses.append(loss.detach())
        self.optimizer.step()
        self.scores.update(torch.stack(losses), masks)

    def _forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return masked_forward(self.plan, x, self.scores.split(mask), at_output=False)

    def fine_tune(self) -> None:
        budget = round(self.scores.budget)
        top = self.scores.s.topk(budget).indices
        self.fixed = torch.zeros_like(self.scores.s).index_fill_(0, top, 1.0)

    def predict(self, x: Tensor) -> Tensor:
        if self.fixed is None:
            self.fine_tune()
        return self._forward(x, self.fixed)

    def achieved_density(self) -> float:
        return float(self.fixed.mean()) if self.fixed is not None else self.density

    def kept(self) -> list[int]:
        if self.fixed is None:
            return []
        return [int(mask.sum()) for mask in self.scores.split(self.fixed)]


TRAINERS: dict[str, type[Trainer]] = {
    "dense": Dense,
    "sparsefx-paper": Sparsefx,
    "sparsefx-exact": SparsefxExact,
    "paper-code": PaperCode,
    "static": Static,
    "rigl": RigL,
}


def train(
    name: str, setting: Setting, data: Split, method: str, density: float, seed: int,
    search: float = SEARCH, options: dict | None = None, freeze_multiple: int = 1,
    device: torch.device | str = "cpu", static_kept: list[int] | None = None,
    static_masks: Run | None = None, restart_lr: bool = False,
    search_kept: list[int] | None = None,
) -> Run:  # fmt: skip
    """Train one method from the seed's initial weights on the seed's batch order
    (`static_kept`: the static method's kept counts per group instead of the density's;
    `static_masks`: a run whose final channels the static method keeps instead;
    `restart_lr`: the cosine learning rate restarts from its peak when the search ends;
    `search_kept`: the sparsefx methods search with these counts per group,
    `Sparsefx.hold_to`)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    model = setting.build(data).to(device)  # initialised on the CPU: the same on any device
    x_train, x_test = data.x_train.to(device), data.x_test.to(device)
    y_train, y_test = data.y_train.to(device), data.y_test.to(device)
    if setting.flat:
        x_train, x_test = x_train.flatten(1), x_test.flatten(1)
    order = torch.Generator().manual_seed(seed)
    epochs = [
        [
            idx.to(device)
            for idx in torch.randperm(len(x_train), generator=order).split(setting.batch)[:-1]
        ]
        for _ in range(setting.epochs)
    ]
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    total = sum(map(len, epochs))
    trainer = TRAINERS[method](model, density, x_train[: setting.batch], seed, options or {})
    if isinstance(trainer, RigL):
        trainer.total_steps = total
    if isinstance(trainer, Sparsefx):
        trainer.freeze_multiple = freeze_multiple
    run = Run(name, method, density if method != "dense" else 1.0, seed)
    if search_kept and isinstance(trainer, Sparsefx) and not isinstance(trainer, Static):
        trainer.hold_to(search_kept)
        run.method += f"@{'/'.join(map(str, search_kept))}"
    if static_kept and isinstance(trainer, Static) and not isinstance(trainer, RigL):
        trainer.keep(static_kept)
        run.method = f"static@{'/'.join(map(str, static_kept))}"
    if static_masks and isinstance(trainer, Static) and not isinstance(trainer, RigL):
        trainer.fix(static_masks.channels)
        run.method = f"static@{static_masks.method}"
    if restart_lr:
        run.method += " lr-restart"
    search_epochs = math.ceil(search * setting.epochs)
    step, restart, span = 0, 0, total  # step, and the cosine's first step and length
    for epoch, batches in enumerate(epochs):
        if epoch == search_epochs:
            trainer.fine_tune()
            if restart_lr:
                restart, span = step, total - step
        trainer.net.train()
        for idx in batches:
            for group in trainer.optimizer.param_groups:  # cosine learning rate
                group["lr"] = setting.lr * (1 + math.cos(math.pi * (step - restart) / span)) / 2
            x, y = x_train[idx], y_train[idx]
            if step % TRACE_EVERY == 0 and (state := trainer.search_state()) is not None:
                run.trace.append([step, *state])
            if step % FLOP_EVERY == 0:
                with FlopCounterMode(display=False) as counter:
                    trainer.step(x, y)
                run.step_flops.append(counter.get_total_flops())
            else:
                synchronize()
                start = time.perf_counter()
                trainer.step(x, y)
                synchronize()
                run.train_seconds += time.perf_counter() - start
            step += 1
    counted = len(run.step_flops)
    run.train_flops = statistics.fmean(run.step_flops) * total
    run.train_seconds *= total / (total - counted)  # the FLOP-counted steps, at the mean pace
    trainer.net.eval()
    with torch.no_grad():
        logits = torch.cat([trainer.predict(x) for x in x_test.split(1024)])
    run.accuracy = float((logits.argmax(1) == y_test).float().mean())
    run.achieved_density = trainer.achieved_density() if method != "dense" else 1.0
    run.kept = trainer.kept()
    run.channels = trainer.kept_channels()
    return run


# -- the table and plots --------------------------------------------------------------------


def _base(method: str) -> str:
    """The method a run label names: "static" of "static@12/20/24" or "static lr-restart"."""
    return method.partition("@")[0].partition(" ")[0]


def summarize(runs: list[Run]) -> list[dict]:
    """Mean and spread over seeds per (setting, method, density)."""
    keys = sorted(
        {(r.setting, r.method, r.density) for r in runs},
        key=lambda k: (k[0], -k[2], METHODS.index(_base(k[1])), k[1]),
    )
    rows = []
    for setting, method, density in keys:
        group = [r for r in runs if (r.setting, r.method, r.density) == (setting, method, density)]
        accuracy = [100 * r.accuracy for r in group]
        rows.append(
            {
                "setting": setting,
                "method": method,
                "density": density,
                "seeds": len(group),
                "accuracy": statistics.fmean(accuracy),
                "spread": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                "achieved_density": statistics.fmean(r.achieved_density for r in group),
                "train_gflops": statistics.fmean(r.train_flops for r in group) / 1e9,
                "train_seconds": statistics.fmean(r.train_seconds for r in group),
                "kept": [
                    statistics.fmean(k)
                    for k in zip(*(r.kept for r in group if r.kept), strict=True)
                ],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    return format_table(
        ["setting", "method", "density", "test acc %", "± sd", "achieved", "kept per group",
         "train GFLOPs", "train s"],
        [
            [
                r["setting"], r["method"], f"{r['density']:.2f}", f"{r['accuracy']:.2f}",
                f"{r['spread']:.2f}", f"{r['achieved_density']:.3f}",
                "/".join(f"{k:.3g}" for k in r.get("kept", [])), f"{r['train_gflops']:.1f}",
                f"{r['train_seconds']:.1f}",
            ]
            for r in rows
        ],
    )  # fmt: skip


def plot(rows: list[dict], out: Path) -> list[Path]:
    """Accuracy against density and against training time, one line per method, per setting."""
    from matplotlib.figure import Figure

    paths = []
    for setting in sorted({r["setting"] for r in rows}):
        figure = Figure(figsize=(10, 4))
        by_density, by_time = figure.subplots(1, 2)
        dense = [r for r in rows if r["setting"] == setting and _base(r["method"]) == "dense"]
        methods = {r["method"] for r in rows if r["setting"] == setting}
        for method in sorted(methods, key=lambda m: (METHODS.index(_base(m)), m)):
            points = sorted(
                (r for r in rows if r["setting"] == setting and r["method"] == method),
                key=lambda r: r["density"],
            )
            if not points or _base(method) == "dense":
                continue
            by_density.errorbar(
                [r["density"] for r in points], [r["accuracy"] for r in points],
                yerr=[r["spread"] for r in points], marker="o", capsize=3, label=method,
            )  # fmt: skip
            by_time.plot(
                [r["train_seconds"] for r in points], [r["accuracy"] for r in points],
                marker="o", label=method,
            )  # fmt: skip
        for r in dense:
            by_density.axhline(r["accuracy"], color="black", linestyle="--", label="dense")
            by_time.plot([r["train_seconds"]], [r["accuracy"]], "k*", markersize=10, label="dense")
        by_density.set(
            xscale="log", xlabel="density (kept channel fraction)", ylabel="test accuracy %"
        )
        by_time.set(xlabel="training wall time (s)", ylabel="test accuracy %")
        by_density.legend(fontsize=7)
        figure.suptitle(setting)
        path = out / f"accuracy_{setting}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        paths.append(path)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes: small subsets, 1 seed")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--densities", default="0.5,0.25,0.1")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=None, help="override every setting's epochs")
    parser.add_argument("--limit", type=int, default=None, help="Fashion-MNIST examples per split")
    parser.add_argument(
        "--validate",
        type=int,
        default=None,
        metavar="N",
        help="train on all but the last N training examples and report accuracy on those N "
        "instead of the test set (settings named <setting>-val): choose options on these, "
        "then run the chosen ones on the test set",
    )
    parser.add_argument(
        "--search", type=float, default=SEARCH, help="fraction of the epochs that search masks"
    )
    parser.add_argument(
        "--device",
        type=torch.device,
        default=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        help="where to train (default: a CUDA GPU when one is present, else the CPU)",
    )
    parser.add_argument(
        "--freeze-multiple",
        type=int,
        default=None,
        help="sparsefx.freeze(multiple=...) after the search: kept counts in blocks of this "
        "(default: the device's channel block, on CPU 16 with AVX-512 and 8 with AVX2, 8 on "
        "CUDA; 1 keeps exact counts)",
    )
    parser.add_argument(
        "--restart-lr",
        action="store_true",
        help="restart the cosine learning rate from its peak when the search ends, for every "
        "method (learning-rate rewinding: sparsefx fine-tunes its frozen structure on a "
        "whole cosine)",
    )
    parser.add_argument(
        "--static-kept",
        type=_counts,
        default=None,
        metavar="N,N,...",
        help="the static method keeps these channel counts per group (in group order) instead "
        "of the density's fraction of each",
    )
    parser.add_argument(
        "--search-kept",
        type=_counts,
        default=None,
        metavar="N,N,...",
        help="the sparsefx methods search with each group's budget fixed at these channel "
        "counts (in group order, summing to the density's), and keep each group's top counts "
        "by s when the search ends: the search at a given split",
    )
    parser.add_argument(
        "--static-masks",
        type=Path,
        default=None,
        metavar="JSON",
        help="the static method keeps the channels that the sparsefx run of this JSON with "
        "the same setting, density and seed ended with (the searched structure without the "
        "search)",
    )
    parser.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a SparseConfig field for the sparsefx methods, e.g. score_lr=0.1 or samples=4",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "accuracy.json")
    parser.add_argument(
        "--combine",
        default=None,
        metavar="JSON,...",
        help="train nothing: the table, JSON and plots of the runs saved in these files "
        "(a run split into parts, e.g. slow baselines apart)",
    )
    return parser.parse_args(argv)


def _counts(text: str) -> list[int]:
    """Channel counts per group, "12,20,24" (`--static-kept`, `--search-kept`)."""
    return [int(k) for k in text.split(",")]


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.option = dict(args.option)
    if args.freeze_multiple is None:
        args.freeze_multiple = channel_block(args.device)
    if args.quick:  # digits at its full length; Fashion-MNIST on a subset, fewer epochs
        args.settings, args.densities, args.seeds = "digits-mlp,fashion-cnn", "0.25", "0"
        args.limit = args.limit or 6000
    if args.combine:
        runs = [
            Run(**run)
            for path in args.combine.split(",")
            for run in json.loads(Path(path).read_text())["runs"]
        ]
    else:
        runs = train_all(args)
    rows = summarize(runs)
    print(table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": vars(args)
                | {
                    "json": str(args.json),
                    "device": str(args.device),
                    "static_masks": args.static_masks and str(args.static_masks),
                },
                "rows": rows,
                "runs": [asdict(r) for r in runs],
            },
            indent=1,
        )
    )
    for path in plot(rows, args.json.parent):
        print(f"plot: {path}")


def train_all(args: argparse.Namespace) -> list[Run]:
    """Every (setting, seed, method, density) run the arguments name, printed as it ends."""
    print(" | ".join(f"{k}: {v}" for k, v in environment().items()))
    densities = [float(d) for d in args.densities.split(",")]
    searched = _searched_runs(args.static_masks) if args.static_masks else {}
    runs: list[Run] = []
    for name in args.settings.split(","):
        setting = SETTINGS[name]
        epochs = args.epochs or (QUICK_EPOCHS.get(name) if args.quick else None)
        if epochs:
            setting = Setting(**{**asdict_setting(setting), "epochs": epochs})
        data = (
            load_fashion_mnist(limit=args.limit)
            if setting.load is load_fashion_mnist
            else setting.load()
        )
        if args.validate:
            data, name = held_out(data, args.validate), f"{name}-val"
        for seed in (int(s) for s in args.seeds.split(",")):
            for method in args.methods.split(","):
                for density in [1.0] if method == "dense" else densities:
                    source = None
                    if searched and method == "static":
                        source = searched.get((name, density, seed))
                        if source is None:
                            raise SystemExit(
                                f"--static-masks {args.static_masks} holds no sparsefx run of "
                                f"{name} at density {density} with seed {seed}"
                            )
                    start = time.perf_counter()
                    run = train(
                        name, setting, data, method, density, seed, args.search, args.option,
                        args.freeze_multiple, args.device, args.static_kept, source,
                        args.restart_lr, args.search_kept,
                    )  # fmt: skip
                    runs.append(run)
                    print(
                        f"{name} {run.method} d={density} seed={seed}: {100 * run.accuracy:.2f}% "
                        f"({time.perf_counter() - start:.0f} s){_structure_line(run)}", flush=True,
                    )  # fmt: skip
    return runs


def _searched_runs(path: Path) -> dict[tuple[str, float, int], Run]:
    """The sparsefx runs saved in a results JSON, by (setting, density, seed): one each."""
    runs: dict[tuple[str, float, int], Run] = {}
    for saved in json.loads(path.read_text())["runs"]:
        run = Run(**saved)
        if not run.method.startswith("sparsefx"):
            continue
        key = (run.setting, run.density, run.seed)
        if key in runs:
            raise SystemExit(
                f"{path} holds two sparsefx runs of {key} ({runs[key].method}, {run.method}): "
                "--static-masks needs one (train one method per file)"
            )
        if not run.channels:
            raise SystemExit(f"{path}: its {run.method} run saved no channels (an older file)")
        runs[key] = run
    return runs


def _structure_line(run: Run) -> str:
    """The kept channels per group and, for a search, when it decided and where it went."""
    line = f", kept {'/'.join(map(str, run.kept))}" if run.kept else ""
    if run.trace:
        expected = ["/".join(f"{k:.0f}" for k in point[2:]) for point in run.trace]
        decided = run.decided_step()
        line += (
            f"; search: every channel decided from step {decided}"
            if decided is not None
            else f"; search: {run.trace[-1][1]:.0f} channels still undecided at its end"
        )
        line += f", expected kept {expected[0]} at step 0 -> {expected[-1]} at its end"
    return line


def held_out(data: Split, count: int) -> Split:
    """The split that trains on all but the last `count` training examples and tests on them."""
    if not 0 < count < len(data.x_train):
        raise SystemExit(
            f"--validate {count}: hold out between 1 and {len(data.x_train) - 1} of the "
            f"{len(data.x_train)} training examples"
        )
    return Split(
        data.x_train[:-count], data.y_train[:-count], data.x_train[-count:],
        data.y_train[-count:], data.num_classes,
    )  # fmt: skip


def asdict_setting(setting: Setting) -> dict:
    return {f: getattr(setting, f) for f in Setting.__dataclass_fields__}


if __name__ == "__main__":
    main()
