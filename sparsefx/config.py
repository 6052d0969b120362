"""SparseConfig: every option of sparsefx in one validated dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

Budget = Literal["channels", "params", "flops"]
ScoreForm = Literal["exact", "paper"]
ScoreOptimizer = Literal["adam", "sgd"]
Kernels = Literal["auto", "torch", "triton"]

_BUDGETS = ("channels", "params", "flops")
_SCORE_FORMS = ("exact", "paper")
_SCORE_OPTIMIZERS = ("adam", "sgd")
_KERNELS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class SparseConfig:
    """Options of a sparse model (DESIGN §3).

    Example::

        cfg = sparsefx.SparseConfig(density=0.1, samples=2, budget="channels")
    """

    density: float
    """Budget as a fraction of the model's prunable cost, in (0, 1]."""
    samples: int = 2
    """K masks per step: one trains the weights, K-1 are pure forwards for the score gradient."""
    budget: Budget = "channels"
    """Cost c_i of a channel: 1 ("channels"), its parameters or its FLOPs (DESIGN §3)."""
    score_form: ScoreForm = "paper"
    """psi = (m-s)/sqrt(s(1-s)) ("paper", the VR-PGE code) or (m-s)/(s(1-s)) ("exact")."""
    score_optimizer: ScoreOptimizer = "adam"
    score_lr: float = 0.3
    """Adam's lr on s. 0.3 from the accuracy benchmark (issue 7): it trains better than the
    VR-PGE code's ~1e-2 on every setting measured (docs/architecture.md, "Defaults")."""
    budget_warmup: int = 0
    """Training steps over which the budget shrinks from the whole model to the density
    (cubic, as gradual pruning), s starting at 1: the weights first train on (nearly) the
    whole model and the search decides on trained weights, at the cost of wider early steps.
    0 (the default): s starts at the density, the budget tight from the first step (DESIGN
    §3). freeze() needs the warm-up to be over."""
    score_eps: float = 1e-3
    """s is clamped to [eps, 1-eps] inside psi so the score function stays finite."""
    seed: int | None = None
    """Seed of the mask sampler; None draws one from torch's global RNG at transform time."""
    sparse_gradients: bool = False
    """Pruned layers' weight gradients as row-sparse COO tensors (kept output channels only),
    as nn.Embedding(sparse=True) does: no full-size zero fill, and torch.optim.SGD or
    SparseAdam then update only kept rows. Optimizers that need dense gradients (Adam, AdamW)
    reject them, so this is opt-in."""
    prune_streams: bool = False
    """Also prune residual streams: every tensor added into one stream (the producers that
    write into it, the layers that read it) is one shared group. By default streams stay
    dense and only the channels inside blocks are pruned."""
    conv_channel_multiple: int = 8
    """On CPU, while masks are sampled, compact convolutions run on kept-channel counts
    rounded up to a multiple of this with zero channels (exact): oneDNN JIT-compiles a
    primitive for every new shape, about a millisecond per convolution, and rounded counts
    repeat, so after a few steps every shape is cached. Fixed masks (freeze, set_masks) and
    eval keep one shape and run the exact counts, as does 1; a compiled model's training
    graph keeps rounding after freeze (free for freeze(multiple=8 or 16))."""
    kernels: Kernels = "auto"
    """Which kernels run the compact ops, the sampler and the projection: "triton" (fused
    gather-GEMMs that read weights by index, one-launch sampling and projection), "torch"
    (aten ops around index gathers; the reference), or "auto": Triton for a model on CUDA
    when triton is installed, else torch. "triton" on CPU tensors needs TRITON_INTERPRET=1
    (Triton's interpreter, for testing)."""

    def __post_init__(self) -> None:
        _check_real("density", self.density, "a float in (0, 1]")
        if not 0.0 < float(self.density) <= 1.0:
            raise ValueError(
                f"density must be in (0, 1] (the kept fraction of the budget), got {self.density}"
            )
        check_int("samples", self.samples, 2, "VR-PGE needs a second sample")
        _check_choice("budget", self.budget, _BUDGETS)
        _check_choice("score_form", self.score_form, _SCORE_FORMS)
        _check_choice("score_optimizer", self.score_optimizer, _SCORE_OPTIMIZERS)
        _check_choice("kernels", self.kernels, _KERNELS)
        _check_real("score_lr", self.score_lr, "a finite float > 0")
        if not 0 < self.score_lr < math.inf:
            raise ValueError(f"score_lr must be a finite float > 0, got {self.score_lr}")
        _check_real("score_eps", self.score_eps, "a float in (0, 0.5)")
        if not 0.0 < self.score_eps < 0.5:
            raise ValueError(f"score_eps must be in (0, 0.5), got {self.score_eps}")
        for name in ("sparse_gradients", "prune_streams"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        check_int("conv_channel_multiple", self.conv_channel_multiple, 1, "1: exact counts")
        check_int("budget_warmup", self.budget_warmup, 0, "training steps; 0: no warm-up")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise TypeError(f"seed must be an int (or None to draw one), got {self.seed!r}")
            if not -(2**63) <= self.seed < 2**63:
                raise ValueError(f"seed must fit in an int64, got {self.seed}")

    @classmethod
    def from_options(cls, options: dict | SparseConfig) -> SparseConfig:
        """Build from a plain dict (e.g. torch.compile options), naming any unknown key; a
        SparseConfig passes as it is."""
        if isinstance(options, SparseConfig):
            return options
        if not isinstance(options, dict):
            raise TypeError(
                "sparsefx options must be a dict of SparseConfig fields or a SparseConfig, "
                f"got {type(options).__name__}"
            )
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise TypeError(f"unknown sparsefx option(s) {unknown}; valid options: {sorted(valid)}")
        if "density" not in options:
            raise TypeError(
                "sparsefx needs a density, e.g. "
                'torch.compile(model, backend="sparsefx", options={"density": 0.1}); '
                f"valid options: {sorted(valid)}"
            )
        return cls(**options)


def _check_real(name: str, value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be {what}, got {value!r}")


def check_int(name: str, value: object, minimum: int, hint: str) -> None:
    """TypeError for a non-int (bools too), ValueError below `minimum`; both name `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum} ({hint}), got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({hint}), got {value!r}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def resolve_config(density: float | None, config: SparseConfig | None) -> SparseConfig:
    """One config from the `density=` shortcut and/or an explicit config."""
    if config is None:
        if density is None:
            raise TypeError("pass density=... (e.g. density=0.1) or config=SparseConfig(...)")
        return SparseConfig(density=density)
    if not isinstance(config, SparseConfig):
        raise TypeError(f"config must be a sparsefx.SparseConfig, got {type(config).__name__}")
    if density is not None and density != config.density:
        raise ValueError(
            f"density={density} conflicts with config.density={config.density}; pass one of them"
        )
    return config
