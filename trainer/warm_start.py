"""Warm-start (continual) training: one rank of a segment that continues a checkpoint.

``sirenfeed train --features FEATURES_DIR --run RUN_DIR --resume-from latest|SOURCE_RUN
[--since-watermark auto|K]`` trains only on what the checkpoint has not seen, continuing its
weights, optimizer state, LR schedule position and step count (on any world size the checkpoint
allows: ZeRO stage 0 keeps the optimizer state whole). ``latest`` continues ``RUN_DIR`` itself.
A checkpoint trained on another event schema than the features' cannot be continued: the warm
start stops with ``SchemaError`` naming the differences, before anything is loaded.

The segment trains on a view of the feature dataset (:mod:`lifecycle.view`) that selects the
batches after the checkpoint's data watermark; :mod:`lifecycle.segment` builds it and launches this
module on every rank.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from common.config import add_config_arguments, config_from_args, require
from common.logs import configure_rank_logging
from common.repo import REPO_ROOT
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.distributed import exit_rank
from trainer.train import Trainer

log = logging.getLogger(__name__)

WARM_START_SCRIPT = REPO_ROOT / "trainer" / "warm_start.py"


def checkpoint_data_watermark(run_dir: str | Path) -> dict[str, Any]:
    """The ``data_watermark`` in the client state of ``run_dir``'s newest complete checkpoint."""
    tags = checkpoint.complete_tags(run_dir)
    if not tags:
        raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(run_dir)} holds no complete checkpoint")
    path = checkpoint.checkpoint_root(run_dir) / tags[-1] / "mp_rank_00_model_states.pt"
    with checkpoint.weights_only_loads():
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "data_watermark" not in state:
        raise checkpoint.CheckpointError(f"{path} records no data watermark: pass --since-watermark")
    return state["data_watermark"]


class WarmStartTrainer(Trainer):
    """A :class:`Trainer` that starts from another run's checkpoint instead of fresh weights."""

    def warm_start(self, source_run: str | Path) -> None:
        tag, client_state = checkpoint.load_latest(self.engine, source_run, self.spec.event_schema, self.tables)
        self.step = self.first_step = client_state["step"]
        self.total_steps += self.step
        self._continue_at_configured_lr()
        log.info("warm start from %s/%s at step %d (trained through batch %s); %d new steps",
                 source_run, tag, self.step, client_state.get("data_watermark", {}).get("batch"),
                 self.total_steps - self.step)

    def _continue_at_configured_lr(self) -> None:
        """The checkpoint brings its optimizer's and scheduler's learning rate (a batch run's peak
        ``optim.lr``, or wherever its cosine ended); a segment trains at this run's ``optim.lr``."""
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [self.config.optim.lr] * len(scheduler.base_lrs)
        rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(self.engine.optimizer.param_groups, rates):
            group["initial_lr"], group["lr"] = self.config.optim.lr, rate
        scheduler._last_lr = rates
        log.info("continual learning rate %.2e", rates[0])


def check_continual(config: TrainConfig) -> None:
    require(config.schedule.kind == "constant", "schedule.kind",
            "continual training needs 'constant' (a cosine decay would restart or sit at min_lr)")
    if config.train.steps != 0 or config.train.epochs != int(config.train.epochs):
        # Allowed (a fixed budget per segment can be what a user wants), but said out loud.
        log.warning("train.steps=%d, train.epochs=%g: this segment does not train every new event "
                    "the same whole number of times (needs train.steps=0 and whole train.epochs)",
                    config.train.steps, config.train.epochs)


def rank_main(argv: list[str]) -> NoReturn:
    """One rank of a warm-start segment (started by the ``deepspeed`` launcher)."""
    parser = argparse.ArgumentParser(prog="trainer/warm_start.py")
    parser.add_argument("--resume-from", required=True, help="run directory to continue from")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    check_continual(config)
    try:
        trainer = WarmStartTrainer(config)
        try:
            trainer.warm_start(args.resume_from)
            trainer.fit()
        finally:
            trainer.close()
    except Exception:
        # No destroy_process_group: with a peer gone it can hang instead of returning.
        log.exception("rank %s failed", os.environ.get("RANK", "?"))
        exit_rank(1)
    dist.destroy_process_group()
    exit_rank(0)


if __name__ == "__main__":
    configure_rank_logging(int(os.environ.get("RANK", "0")))
    sys.exit(rank_main(sys.argv[1:]))
