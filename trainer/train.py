"""The training script every rank runs under the ``deepspeed`` launcher.

    deepspeed --num_gpus 2 trainer/train.py --config conf/train.yaml features=FEATURES_DIR run=RUN_DIR

(``sirenfeed train`` builds this command.) Each rank reads its Petastorm shard of
``FEATURES_DIR/train``, and all ranks run the same number of AdamW steps (warmup + cosine through a
``LambdaLR`` DeepSpeed steps after each optimizer step, gradient clipping in DeepSpeed). Every
``train.log_every`` steps rank 0 logs loss, samples/s, tokens/s, the share of time spent waiting for
data and the SIREN-RoPE gate λ. Evaluation on ``FEATURES_DIR/eval`` is exact and distributed
(every ``train.eval_every`` steps and at the end; ``RUN_DIR/metrics.json``). Checkpoints every
``train.checkpoint_every`` steps and at the end (``trainer.checkpoint``); ``train.resume=true``
continues from the newest complete one at the same data position. At the end rank 0 exports the
model (``trainer.export``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import random
import sys
import time
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from features.config import add_config_arguments, config_from_args, to_dict
from features.spec import FEATURE_SPEC_VERSION, LABEL_COLUMNS, LOSS_MASK_COLUMN
from trainer import checkpoint
from trainer.config import TrainConfig, deepspeed_config, lr_factor
from trainer.data import TrainStream, read_feature_manifest, training_steps
from trainer.evaluate import Metrics, evaluate_split, write_metrics
from trainer.export import export_model
from trainer.launch import configure_logging
from trainer.metrics import format_table
from trainer.model import GenerativeRanker, masked_multitask_loss, parameter_groups
from trainer.telemetry import TrainerTelemetry

log = logging.getLogger(__name__)

GATE_PARAMETER_NAMES = ("ordinal_gate", "lam")
"""Names the SIREN-RoPE gate λ goes by in the model's parameters (last component)."""
HISTORY_FILE = "history.jsonl"
"""``RUN_DIR/history.jsonl``: one JSON line per log window (rank 0), read by ``sirenfeed report``."""


def append_history(run_dir: str, record: dict[str, Any]) -> None:
    """Append one line to the run's history; a resumed run appends after it (readers keep the
    last record of a step, and skip a torn last line a crash may leave)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, HISTORY_FILE), "a") as stream:
        stream.write(json.dumps(record, sort_keys=True) + "\n")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct, reproducible seed per rank (dropout masks must differ between ranks)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def rotary_gate(model: nn.Module) -> float | None:
    """The learned λ of the SIREN-RoPE encoding, or None for variants without one."""
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATE_PARAMETER_NAMES and parameter.numel() == 1:
            return float(parameter.detach().float().item())
    return None


def data_position(config: TrainConfig, world: int, batches: int) -> dict[str, int]:
    """What a checkpoint records about the input: with the same seed, ranks, batch size and
    buffer, skipping ``batches`` reproduces the uninterrupted stream exactly."""
    return {"batches": batches, "seed": config.data.seed, "world": world,
            "batch_size": config.data.batch_size, "shuffle_buffer": config.data.shuffle_buffer}


def check_resumable(saved: dict[str, int], current: dict[str, int]) -> None:
    for key in ("seed", "world", "batch_size", "shuffle_buffer"):
        if saved[key] != current[key]:
            raise checkpoint.CheckpointError(
                f"cannot resume at the same data position: the checkpoint was written with "
                f"{key}={saved[key]}, this run has {key}={current[key]}")


def _make_scheduler(config: TrainConfig, total_steps: int, optimizer) -> LambdaLR:
    return LambdaLR(optimizer, functools.partial(lr_factor, config.schedule, config.optim.lr, total_steps))


class LogWindow:
    """Sums since the last log line, reduced across ranks when it is written. Loss and token
    counts stay on the device until then, so logging does not synchronise every step."""

    def __init__(self, device: torch.device):
        self.started = time.perf_counter()
        self.steps = 0
        self.rows = 0
        self.data_wait = 0.0
        # loss, label-bearing tokens, then each task's loss
        self.sums = torch.zeros(2 + len(LABEL_COLUMNS), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, task_losses: dict[str, torch.Tensor],
            batch: dict[str, torch.Tensor], waited: float) -> None:
        self.steps += 1
        self.rows += batch[LOSS_MASK_COLUMN].shape[0]
        self.data_wait += waited
        self.sums += torch.stack([loss.detach().double(), batch[LOSS_MASK_COLUMN].sum().double()]
                                 + [task_losses[task].double() for task in LABEL_COLUMNS])

    def reduce(self) -> dict[str, float]:
        """Collective: loss mean over ranks and steps, throughput over all ranks, mean wait share."""
        world = dist.get_world_size()
        totals = torch.cat([self.sums, self.sums.new_tensor([self.rows, self.data_wait])])
        dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        loss, tokens, *task_sums, rows, waited = totals.tolist()
        steps = world * max(self.steps, 1)
        return {"loss": loss / steps, "samples_per_s": rows / elapsed,
                "tokens_per_s": tokens / elapsed, "data_wait": min(1.0, waited / world / elapsed),
                "task_loss": {task: value / steps for task, value in zip(LABEL_COLUMNS, task_sums)}}


class Trainer:
    """One rank's training run: the engine, its input stream, evaluation, checkpoints and export."""

    def __init__(self, config: TrainConfig):
        self.config = config
        backend = None if config.deepspeed.comm_backend == "auto" else config.deepspeed.comm_backend
        deepspeed.init_distributed(dist_backend=backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        configure_logging(self.rank)
        accelerator = get_accelerator()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device(accelerator.current_device_name())
        self.autocast = torch.bfloat16 if config.deepspeed.precision == "bf16" else None

        manifest, self.spec = read_feature_manifest(config.features)
        self.t_ref = config.model.t_ref_seconds or manifest["watermark_ms"] // 1000
        # What this run trains on, kept in every checkpoint: continual training starts after it.
        self.data_watermark = manifest.get("data_watermark") or {
            "batch": manifest.get("newest_batch", 0), "watermark_ms": manifest["watermark_ms"]}
        self.total_steps = training_steps(config.features, config.train.steps, config.train.epochs,
                                          config.data.batch_size, self.world)
        seed_everything(config.seed)  # the same initial weights on every rank
        model = GenerativeRanker(config.model, self.spec, self.t_ref)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, config.optim.weight_decay),
            lr_scheduler=functools.partial(_make_scheduler, config, self.total_steps),
            config=deepspeed_config(config, self.world))
        seed_everything(rank_seed(config.seed, self.rank))
        self.telemetry = (TrainerTelemetry(config.telemetry.port, config.telemetry.host)
                          if self.rank == 0 else None)
        self.step = 0
        self.first_step = 0
        """The step this run's input stream started at (a warm start continues a count)."""
        self.metrics: Metrics | None = None
        self.checkpointed_step: int | None = None
        log.info("training %d steps on %d ranks, global batch %d, device %s", self.total_steps,
                 self.world, config.data.batch_size * self.world, self.device)

    def resume(self) -> None:
        tag, client_state = checkpoint.load_latest(self.engine, self.config.run)
        check_resumable(client_state["data"], data_position(self.config, self.world, 0))
        self.step = client_state["step"]
        self.metrics = client_state.get("metrics") or None
        self.checkpointed_step = self.step
        log.info("resuming at step %d from %s", self.step, tag)

    def fit(self) -> Metrics | None:
        config = self.config
        with TrainStream(config.features, self.spec.context_len, config.data.batch_size,
                         config.data.shuffle_buffer, config.data.seed, self.rank, self.world,
                         skip_batches=self.step - self.first_step) as stream:
            self._train_steps(stream)
            self.evaluate()
            if self.checkpointed_step != self.step:
                self.save(stream.consumed)
        if self.rank == 0:
            export_model(self.engine.module, config, self.spec, self.t_ref, config.run,
                         checkpoint.tag_for(self.step), self.step)
            log.info("final metrics at step %d:\n%s", self.step, format_table({"eval": self.metrics}))
        dist.barrier()  # the export is complete before any rank reports success
        return self.metrics

    def _train_steps(self, stream: TrainStream) -> None:
        config = self.config.train
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=self.rank != 0, mininterval=2.0)
        window = LogWindow(self.device)
        run_wait, run_started = 0.0, time.perf_counter()
        while self.step < self.total_steps:
            started = time.perf_counter()
            batch = {name: tensor.to(self.device, non_blocking=True) for name, tensor in next(stream).items()}
            waited = time.perf_counter() - started
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                logits = self.engine(batch)
            loss, task_losses = masked_multitask_loss(logits, batch, self.config.model.task_weights)
            self.engine.backward(loss)
            self.engine.step()
            self.step += 1
            window.add(loss, task_losses, batch, waited)
            run_wait += waited
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self._log(window)
                window = LogWindow(self.device)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if (config.checkpoint_every and self.step % config.checkpoint_every == 0
                    and self.step < self.total_steps):
                self.save(stream.consumed)
        progress.close()
        elapsed = time.perf_counter() - run_started
        if elapsed > 0:
            log.info("rank 0 waited for data %.1f%% of %.1f s of training", 100 * run_wait / elapsed, elapsed)

    def _log(self, window: LogWindow) -> None:
        stats = window.reduce()
        lam = rotary_gate(self.engine.module)
        if self.rank != 0:
            return
        lr = self.engine.get_lr()[0]
        log.info("step %d/%d loss %.4f lr %.2e samples/s %.0f tokens/s %.0f data-wait %.1f%%%s",
                 self.step, self.total_steps, stats["loss"], lr, stats["samples_per_s"],
                 stats["tokens_per_s"], 100 * stats["data_wait"],
                 "" if lam is None else f" lambda {lam:.4f}")
        self.telemetry.on_step(self.step, stats["loss"], stats["samples_per_s"], stats["tokens_per_s"],
                               stats["data_wait"], lam)
        append_history(self.config.run, {
            "step": self.step, "loss": stats["loss"], "task_loss": stats["task_loss"], "lr": lr,
            "lambda": lam, "samples_per_s": stats["samples_per_s"]})

    def evaluate(self) -> None:
        metrics = evaluate_split(self.engine.module, self.config.features, self.spec.context_len,
                                 self.config.data.eval_batch_size, self.rank, self.world, self.device,
                                 autocast_dtype=self.autocast)
        if self.rank == 0:
            self.metrics = metrics
            write_metrics(self.config.run, metrics, step=self.step, source="train",
                          features=self.config.features, ranks=self.world)
            self.telemetry.on_eval(metrics)
            summary = ", ".join(f"{task} NE {values['ne']:.4f} AUC {values['auc']:.4f}"
                                for task, values in metrics.items())
            log.info("eval at step %d: %s", self.step, summary)

    def save(self, consumed_batches: int) -> None:
        client_state: dict[str, Any] = {
            "step": self.step, "data": data_position(self.config, self.world, consumed_batches),
            "config": to_dict(self.config), "feature_spec_version": FEATURE_SPEC_VERSION,
            "metrics": self.metrics or {}, "data_watermark": self.data_watermark}
        checkpoint.save(self.engine, self.config.run, self.step, client_state,
                        self.config.train.keep_checkpoints)
        self.checkpointed_step = self.step
        if self.telemetry is not None:
            self.telemetry.on_checkpoint(self.step)

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()


def train(config: TrainConfig) -> Metrics | None:
    """Run one rank of a training run (inside a launcher-started process); returns the final
    metrics on rank 0."""
    trainer = Trainer(config)
    try:
        if config.train.resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trainer/train.py",
                                     description="One rank of a training run (started by deepspeed).")
    add_config_arguments(parser)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher passes it
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    train(config)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
