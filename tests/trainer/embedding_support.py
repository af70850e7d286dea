"""Ranks for the sharded-table tests: real gloo process groups of 1 or 2 processes on this machine,
each running one scenario and saving what the test checks to ``OUT/rank<R>.pt``."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.config import ConfigError
from trainer.config import EmbeddingsConfig, ModelConfig
from trainer.distributed import exit_rank
from trainer.embeddings import ShardedTables
from trainer.model import GenerativeRanker, masked_multitask_loss, synthetic_batch
from training_fixtures import TINY_SPEC, TINY_WATCH_SPEC

DIM = 16
SEED = 7
T_REF = 1_700_000_000
TINY = ModelConfig(n_layers=1, d_model=DIM, n_heads=2, siren_width=8)
SPECS = {"feed": TINY_SPEC, "watch": TINY_WATCH_SPEC}
"""A scenario's ``schema`` argument names its spec (names travel to spawned ranks unpickled)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(scenario: Callable[..., dict[str, Any]], world: int, out: Path, **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``scenario(rank, world, **kwargs)`` on ``world`` gloo ranks; returns each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank, args=(world, free_port(), scenario, out, kwargs), nprocs=world,
                       start_method="spawn")
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _rank(rank: int, world: int, port: int, scenario, out: Path, kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(scenario(rank, world, **kwargs), out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    exit_rank(0)


def tables(sharding: str, optimizer: str = "rowwise_adagrad", lr: float = 0.1, schema: str = "feed") -> ShardedTables:
    return ShardedTables(EmbeddingsConfig(sharding=sharding, optimizer=optimizer, lr=lr), SPECS[schema], DIM,
                         torch.device("cpu"), SEED)


def gathered(sharded: ShardedTables, rank: int) -> dict[str, torch.Tensor] | None:
    into = ({table: torch.zeros(rows, DIM) for table, rows in sharded.rows.items()} if rank == 0 else None)
    sharded.gather(into)
    return into


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    rows = batch["length"].shape[0] // world
    return {name: tensor[rank * rows:(rank + 1) * rows] for name, tensor in batch.items()}


def train_steps(rank: int, world: int, sharding: str, optimizer: str, steps: int,
                schema: str = "feed") -> dict[str, Any]:
    """``steps`` updates of the tables alone on one global batch of 8 rows split over the ranks; the
    loss of each rank is its share of the global mean, as the trainer weights it."""
    sharded = tables(sharding, optimizer, schema=schema)
    initial = gathered(sharded, rank)
    batch = rank_slice(synthetic_batch(SPECS[schema], 8, seed=1), rank, world)
    for _ in range(steps):
        embedded = sharded(batch)
        loss = sum((vectors.sum(-1) - 1.0).square().sum() for vectors in embedded.values()) / 8 * world
        loss.backward()
    return {"initial": initial, "trained": gathered(sharded, rank), "columns": sharded.columns,
            "features": sharded.features}


def save_and_reload(rank: int, world: int, sharding: str, path: str, save: bool) -> dict[str, Any]:
    """Train two steps and save (``save``), or load what was saved; returns whole tables and each
    rank's optimizer state as whole tensors."""
    sharded = tables(sharding)
    if save:
        batch = rank_slice(synthetic_batch(TINY_SPEC, 8, seed=2), rank, world)
        for _ in range(2):
            sum(vectors.square().sum() for vectors in sharded(batch).values()).backward()
        sharded.save(Path(path))
    else:
        try:
            sharded.load(Path(path))
        except ValueError as error:
            return {"error": str(error)}
    return {"tables": gathered(sharded, rank), "momentum": _whole_momentum(sharded, rank)}


def _whole_momentum(sharded: ShardedTables, rank: int) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """This rank's shards of every optimizer moment, as (first row, values): the test joins the ranks'."""
    state = sharded.module.fused_optimizer.state_dict()["state"]
    return {f"{parameter}/{name}": [(shard.metadata.shard_offsets[0], shard.tensor.clone())
                                    for shard in moment.local_shards()]
            for parameter, moments in state.items() for name, moment in moments.items()}


def joined(results: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Every moment whole, from each rank's shards (``save_and_reload``'s ``momentum``)."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for result in results:
        for name, shards in result["momentum"].items():
            pieces.setdefault(name, []).extend(shards)
    return {name: torch.cat([values for _, values in sorted(shards, key=lambda shard: shard[0])])
            for name, shards in pieces.items()}


def serving_parity(rank: int, world: int, sharding: str, schema: str = "feed") -> dict[str, Any]:
    """The dense model fed by the sharded tables, against the whole model built from the gathered
    tables and the same dense weights (what the export holds): their logits."""
    spec = SPECS[schema]
    sharded = tables(sharding, schema=schema)
    torch.manual_seed(SEED)
    dense = GenerativeRanker(TINY, spec, T_REF, tables_outside=True)
    batch = synthetic_batch(spec, 6, seed=3)
    batch["length"][2] = 0  # a padding row: its ids are padding too, as in the data contract
    for column in sharded.columns:
        batch[column][2] = 0
    logits = dense(batch, sharded(batch))
    whole = None
    if rank == 0:
        whole = GenerativeRanker(TINY, spec, T_REF)
        whole.load_state_dict(dense.state_dict(), strict=False)
    tables_whole = gathered(sharded, rank)
    if rank == 0:
        with torch.no_grad():
            for table, rows in tables_whole.items():
                whole.id_embeddings[table].weight.copy_(rows)
        served = whole(batch)
        loss, _ = masked_multitask_loss(logits, batch, dense.task_weights)
        return {"sharded": {task: value.detach() for task, value in logits.items()}, "whole": served,
                "finite_loss": bool(torch.isfinite(loss))}
    return {}


def adam_on_cpu(rank: int, world: int) -> dict[str, Any]:
    try:
        tables("table_wise", optimizer="adam")
    except ConfigError as error:
        return {"error": str(error)}
    return {"error": None}
