"""Exact evaluation on ``FEATURES_DIR/eval``, and ``sirenfeed evaluate``.

:func:`evaluate_split` is the one evaluation routine: the trainer calls it during and after
training, the command calls it on an exported model. Each rank reads its disjoint share of the eval
split once (:func:`trainer.data.eval_batches`), keeps every label-bearing token, and all ranks
gather them (a collective every rank enters, whatever its batch count) so the metrics are exact and
the same on 1 or N ranks.

``sirenfeed evaluate --run RUN_DIR [--features FEATURES_DIR] [--nproc N]`` evaluates
``RUN_DIR/export/latest`` (on the features the run was trained on unless told otherwise), prints the
metrics table and writes ``RUN_DIR/metrics.json``. ``--nproc 1`` runs in this process; more ranks
go through the ``deepspeed`` launcher and give the same numbers. Features of another event schema
than the model's are refused naming the differences (``SchemaError``), features of the same schema
but another spec (context length, stride) with a ``DataError``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

from common.config import add_config_arguments, config_from_args, require
from common.files import write_json
from common.logs import configure_rank_logging
from features.schema import LOSS_MASK_COLUMN, require_same_schema
from features.spec import FeatureSpec
from trainer.data import DataError, eval_batches, read_feature_manifest
from trainer.distributed import exit_rank, init_distributed
from trainer.export import export_root, load_exported
from trainer.launcher import run_deepspeed
from trainer.metrics import EvalAccumulator, format_table

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
Metrics = dict[str, dict[str, float]]


@dataclass
class EvaluateConfig:
    run: str = ""
    """Run directory whose ``export/latest`` is evaluated (required)."""
    features: str = ""
    """Feature dataset (default: the one the run was trained on)."""
    nproc: int = 1
    """Ranks; 1 evaluates in this process, more run through the deepspeed launcher."""
    batch_size: int = 1024
    bins: int = 15
    """Equal-width calibration bins for ECE."""

    def __post_init__(self) -> None:
        require(bool(self.run), "run", "required: the run directory to evaluate (--run)")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.bins >= 1, "bins", "must be >= 1")


def evaluate_split(model: nn.Module, features_dir: str | Path, spec: FeatureSpec, batch_size: int,
                   rank: int, world: int, device: torch.device | str, bins: int = 15,
                   autocast_dtype: torch.dtype | None = None, lockstep: bool = False) -> Metrics | None:
    """Metrics per task of ``spec``'s schema over the whole eval split (``spec``: the dataset's);
    every rank must call it (collective).

    Returns the metrics on rank 0 and ``None`` elsewhere.
    """
    tokens = evaluate_tokens(model, features_dir, spec, batch_size, rank, world, device, autocast_dtype,
                             lockstep)
    return tokens.compute(bins=bins) if rank == 0 else None


@torch.no_grad()
def evaluate_tokens(model: nn.Module, features_dir: str | Path, spec: FeatureSpec, batch_size: int,
                    rank: int, world: int, device: torch.device | str,
                    autocast_dtype: torch.dtype | None = None, lockstep: bool = False) -> EvalAccumulator:
    """Every label-bearing token of the eval split with its predictions, gathered from all ranks
    (collective; on one rank, in file order): what :func:`evaluate_split` computes the metrics of.

    ``lockstep``: every call of ``model`` is a collective (sharded tables), so the ranks take their
    batches in step, and a rank whose share ran out calls ``model.idle`` until all are done."""
    was_training = model.training
    model.eval()
    tasks = spec.event_schema.label_columns
    accumulator = EvalAccumulator(tasks)
    device = torch.device(device)
    for batch in _in_step(eval_batches(features_dir, spec, batch_size, rank, world), lockstep, device):
        if batch is None:
            model.idle(spec.context_len)
            continue
        batch = {name: tensor.to(device, non_blocking=True) for name, tensor in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            logits = model(batch)
        accumulator.add({task: torch.sigmoid(logits[task].float()) for task in tasks},
                        {task: batch[task] for task in tasks}, batch[LOSS_MASK_COLUMN],
                        batch["user_key"])
    merged = accumulator.gather()
    model.train(was_training)
    return merged


def _in_step(batches: Iterator[dict[str, torch.Tensor]], lockstep: bool,
             device: torch.device) -> Iterator[dict[str, torch.Tensor] | None]:
    """``batches``, then (``lockstep``) ``None`` until every rank's batches are done."""
    if not lockstep:
        yield from batches
        return
    while True:
        batch = next(batches, None)
        pending = torch.tensor([int(batch is not None)], dtype=torch.int64, device=device)
        dist.all_reduce(pending, op=dist.ReduceOp.MAX)
        if pending.item() == 0:
            return
        yield batch


def write_metrics(run_dir: str | Path, metrics: Metrics, **context: Any) -> Path:
    """``RUN_DIR/metrics.json`` (atomic): the metrics plus where they came from; undefined values
    (``nan``) are written as ``null`` so the file stays standard JSON."""
    target = Path(run_dir) / METRICS_FILE
    write_json(target, {**context, "metrics": metrics})
    return target


def check_features_fit(model_spec: FeatureSpec, data_spec: FeatureSpec, features: str | Path,
                       model_source: str | Path) -> None:
    """Refuse a feature dataset the model cannot be scored on: another event schema than the
    model's (``SchemaError`` naming the differences, the model's value first; re-fitted
    standardize statistics are no difference), or windows of another length or stride
    (``DataError``)."""
    require_same_schema(model_spec.event_schema, data_spec.event_schema,
                        f"the feature dataset {features} (scored by the model {model_source})")
    if (data_spec.context_len, data_spec.stride) != (model_spec.context_len, model_spec.stride):
        raise DataError(f"{features} was built with another feature spec than the model in {model_source}: "
                        f"context_len {data_spec.context_len}, stride {data_spec.stride} vs "
                        f"{model_spec.context_len}, {model_spec.stride}")


def _evaluate(config: EvaluateConfig) -> Metrics | None:
    """Evaluate ``run/export/latest`` on this process's rank (1 rank without torch.distributed);
    returns the metrics on rank 0, ``None`` on the others."""
    distributed = config.nproc > 1
    accelerator = deepspeed.get_accelerator()
    if distributed:
        init_distributed()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device(accelerator.current_device_name())
    export = export_root(config.run) / "latest"
    model, train_config, spec = load_exported(export)
    features = config.features or train_config.features
    _, data_spec = read_feature_manifest(features)
    check_features_fit(spec, data_spec, features, export)
    metrics = evaluate_split(model.to(device), features, data_spec, config.batch_size,
                             rank, world, device, bins=config.bins)
    if rank == 0:
        target = write_metrics(config.run, metrics, source=str(export.resolve()), features=features,
                               ranks=world)
        log.info("wrote %s", target)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sirenfeed evaluate", description="Evaluate RUN_DIR/export/latest exactly on FEATURES_DIR/eval.")
    parser.add_argument("--run", help="run directory (evaluates its export/latest)")
    parser.add_argument("--features", help="feature dataset (default: the run's)")
    parser.add_argument("--nproc", type=int, help="ranks (default 1: in this process)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(EvaluateConfig, args, run=args.run, features=args.features or None,
                              nproc=args.nproc)
    if config.nproc > 1 and not _under_launcher():
        overrides = [*args.overrides, f"run={config.run}", f"nproc={config.nproc}"]
        if config.features:
            overrides.append(f"features={config.features}")
        return run_deepspeed(Path(__file__), config.nproc, args.config, overrides)
    metrics = _evaluate(config)
    if metrics is not None:
        print(format_table({Path(config.run).name: metrics}))
    if config.nproc > 1:
        exit_rank(0)
    return 0


def _under_launcher() -> bool:
    """True inside a rank the ``deepspeed`` launcher started (it sets the torch.distributed env)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


if __name__ == "__main__":
    configure_rank_logging(int(os.environ.get("RANK", "0")))
    sys.exit(main(sys.argv[1:]))
