"""Data-parallel training: 2 ranks (gloo, CPU) under DistributedDataParallel or FSDP2 sample
the same masks, keep identical structure state, and match one process training on the
concatenated batch; ranks that disagree on the sampler get a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import sparsefx

STEPS = 5
WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3)
    )  # fmt: skip


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(16, 12, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _train(model: nn.Module, rank: int | None, mode: str) -> list[dict]:
    """STEPS steps; under DDP (rank given) each rank takes its half of every batch."""
    x, _ = _batch(0)
    options = {"density": 0.5, "seed": 3, "score_lr": 0.1}
    if mode == "compile":  # "transform" and "fsdp2" transform the model
        sparse = torch.compile(model, backend="sparsefx", options=options)
    else:
        sparse = sparsefx.transform(model, (x[:8],), config=sparsefx.SparseConfig(**options))
    if rank is None:
        run = sparse
    elif mode == "fsdp2":  # shard the transformed model's parameters, then build the optimizer
        fully_shard(model)
        run = sparse
    else:
        run = DistributedDataParallel(sparse)
    criterion = sparsefx.wrap_loss(run, nn.functional.cross_entropy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    records = []
    for step in range(STEPS):
        x, y = _batch(step)
        if rank is not None:
            x, y = x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]
        optimizer.zero_grad()
        criterion(run(x), y).backward()
        optimizer.step()
        records.append(
            {
                "masks": {k: v.clone() for k, v in sparsefx.masks(run).items()},
                "s": {k: v.clone() for k, v in sparsefx.probabilities(run).items()},
            }
        )
    weights = {k: getattr(v, "full_tensor", v.detach)() for k, v in model.state_dict().items()}
    records.append({"weights": {k: v.detach().clone() for k, v in weights.items()}})
    return records


def _rank(rank: int, path: str, mode: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        results[rank] = _train(_model(), rank, mode)
    finally:
        dist.destroy_process_group()


def _spawn(target, *args) -> dict:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(target, args=(*args, results), nprocs=WORLD, join=True)
        return dict(results)


@pytest.mark.parametrize("mode", ["transform", "compile", "fsdp2"])
def test_two_ranks_match_one_process_on_the_concatenated_batch(tmp_path, mode):
    """DDP for a transformed and a compiled model; FSDP2's fully_shard on a transformed
    model (its hooks run around the compact graph: gather before, reduce-scatter after)."""
    ranks = _spawn(_rank, str(tmp_path / "pg"), mode)
    single = _train(_model(), None, mode)
    for step in range(STEPS):
        for rank in range(WORLD):
            for name, mask in single[step]["masks"].items():
                assert torch.equal(ranks[rank][step]["masks"][name], mask), (step, rank, name)
            for name, s in single[step]["s"].items():
                torch.testing.assert_close(ranks[rank][step]["s"][name], s)
    for rank in range(WORLD):
        for name, weight in single[-1]["weights"].items():
            torch.testing.assert_close(ranks[rank][-1]["weights"][name], weight, msg=name)


def _disagreeing_rank(rank: int, path: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        x, y = _batch(0)
        sparse = sparsefx.transform(
            _model(), (x,), config=sparsefx.SparseConfig(density=0.5, seed=rank)
        )
        criterion = sparsefx.wrap_loss(sparse, nn.functional.cross_entropy)
        try:
            criterion(sparse(x), y)
            results[rank] = "no error"
        except RuntimeError as error:
            results[rank] = str(error)
    finally:
        dist.destroy_process_group()


def test_ranks_with_different_seeds_are_rejected(tmp_path):
    results = _spawn(_disagreeing_rank, str(tmp_path / "pg"))
    for rank in range(WORLD):
        assert "ranks disagree on the sparsefx structure" in results[rank]
        assert "SparseConfig(seed=...)" in results[rank]


def _sharded_rank(rank: int, path: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=WORLD)
    try:
        x, _ = _batch(0)
        model = _model()
        sparse = sparsefx.transform(model, (x,), config=sparsefx.SparseConfig(density=0.5, seed=0))
        sparsefx.freeze(sparse)
        expected = sparse.eval()(x)  # the eval graph, captured before sharding
        fully_shard(model)
        same = torch.equal(sparse(x), expected)
        try:
            sparse(x[None])  # a new input rank needs a new capture: sharded weights cannot give one
            results[rank] = (same, "no error")
        except sparsefx.CaptureError as error:
            results[rank] = (same, str(error))
    finally:
        dist.destroy_process_group()


def test_fsdp2_eval_runs_graphs_captured_before_sharding_and_names_the_fix(tmp_path):
    results = _spawn(_sharded_rank, str(tmp_path / "pg"))
    for rank in range(WORLD):
        same, message = results[rank]
        assert same
        assert "before calling fully_shard" in message
