"""The training script every rank runs under the ``deepspeed`` launcher.

    deepspeed --num_gpus 2 trainer/train.py --config conf/train.yaml features=FEATURES_DIR run=RUN_DIR

(``sirenfeed train`` builds this command, for one node or many.) Each rank trains on its share of
every global batch (``trainer.data``: the same global batches on any number of ranks), and all ranks
run the same number of AdamW steps (warmup + cosine through a ``LambdaLR`` DeepSpeed steps after
each optimizer step, gradient clipping in DeepSpeed). Each rank weights its loss by its share of the
global batch's label-bearing tokens, so an update is the gradient of the global batch's mean loss
whatever the world size. Every
``train.log_every`` steps rank 0 logs loss, samples/s, tokens/s, the share of time spent waiting for
data and the SIREN-RoPE gate λ. Evaluation on ``FEATURES_DIR/eval`` is exact and distributed
(every ``train.eval_every`` steps and at the end; ``RUN_DIR/metrics.json``). Checkpoints every
``train.checkpoint_every`` steps and at the end (``trainer.checkpoint``); ``train.resume=true``
continues from the newest complete one at the same data position, on the same or another number of
ranks. At the end rank 0 exports the model (``trainer.export``).

Failures: collectives time out after ``distributed.timeout_s``; a :class:`~trainer.watchdog.Watchdog`
makes every rank exit non-zero within ``distributed.heartbeat_timeout_s`` of another rank's death
or crash, naming it; ``distributed.fault`` is the fire drill that proves it.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, TextIO

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from common.config import add_config_arguments, config_from_args, require, to_dict
from common.logs import configure_rank_logging
from features.schema import LOSS_MASK_COLUMN
from features.spec import FEATURE_SPEC_VERSION
from trainer import checkpoint
from trainer.config import TrainConfig, deepspeed_config, lr_factor
from trainer.data import (
    DataError, TrainStream, check_layout, count_rows, read_feature_manifest, real_rows,
    row_fingerprints, split_dir, training_steps,
)
from trainer.distributed import exit_rank, init_distributed
from trainer.embeddings import ShardedTables
from trainer.evaluate import Metrics, evaluate_split, write_metrics
from trainer.export import export_model
from trainer.metrics import format_table
from trainer.model import GenerativeRanker, masked_multitask_loss, parameter_groups, resolve_task_weights
from trainer.telemetry import TrainerTelemetry
from trainer.watchdog import Watchdog, die_with_parent, inject_fault

log = logging.getLogger(__name__)

GATE_PARAMETER_NAMES = ("ordinal_gate", "lam")
"""Names the SIREN-RoPE gate λ goes by in the model's parameters (last component)."""
TRACE_DIR = "trace"
"""``RUN_DIR/trace/rank<R>.jsonl`` (``distributed.trace``)."""
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


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A distinct, reproducible seed per rank (dropout masks must differ between ranks); ``step``
    reseeds a resume whose RNG states cannot be restored (another world size)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def rotary_gate(model: nn.Module) -> float | None:
    """The learned λ of the SIREN-RoPE encoding, or None for variants without one."""
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in GATE_PARAMETER_NAMES and parameter.numel() == 1:
            return float(parameter.detach().float().item())
    return None


def data_position(config: TrainConfig, shards: int, steps: int) -> dict[str, int]:
    """What a checkpoint records about the input, in global terms: with the same seed, shards,
    global batch and buffer, ``steps`` global batches in is the same place on any world size."""
    return {"steps": steps, "shards": shards, "seed": config.data.seed,
            "batch_size": config.data.batch_size, "shuffle_buffer": config.data.shuffle_buffer}


def check_resumable(saved: dict[str, int], current: dict[str, int]) -> None:
    for key in ("shards", "seed", "batch_size", "shuffle_buffer"):
        if saved[key] != current[key]:
            raise checkpoint.CheckpointError(
                f"cannot resume at the same data position: the checkpoint was written with "
                f"data.{key}={saved[key]}, this run has data.{key}={current[key]}")


def resolved_shards(config: TrainConfig, world: int, saved: dict[str, int] | None) -> int:
    """The run's logical shards: the checkpoint's on a resume, else ``data.shards`` or the world size."""
    if saved is None:
        return config.data.shards or world
    require(config.data.shards in (0, saved["shards"]), "data.shards",
            f"the checkpoint's data order has {saved['shards']} shards; resume with "
            f"data.shards={saved['shards']} (or 0)")
    return saved["shards"]


def parameter_digest(model: nn.Module) -> str:
    """sha256 of every parameter's bytes: equal on two ranks only if their weights are identical."""
    digest = hashlib.sha256()
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _make_scheduler(config: TrainConfig, total_steps: int, optimizer) -> LambdaLR:
    return LambdaLR(optimizer, functools.partial(lr_factor, config.schedule, config.optim.lr, total_steps))


class LogWindow:
    """Sums since the last log line, reduced across ranks when it is written. Loss, token and row
    counts stay on the device until then, so logging does not synchronise every step. ``tasks``:
    the schema's, in order."""

    def __init__(self, device: torch.device, tasks: tuple[str, ...]):
        self.tasks = tasks
        self.started = time.perf_counter()
        self.steps = 0
        self.rows = torch.zeros((), dtype=torch.float64, device=device)
        """Real rows trained on: an epoch's padding rows are no samples."""
        self.data_wait = 0.0
        # loss, label-bearing tokens, then each task's loss
        self.sums = torch.zeros(2 + len(tasks), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, task_losses: dict[str, torch.Tensor],
            batch: dict[str, torch.Tensor], waited: float) -> None:
        """``loss`` and ``task_losses`` are means over this rank's label-bearing tokens; they are
        summed weighted by those tokens, so the reduced values are token means over all ranks."""
        self.steps += 1
        self.rows += real_rows(batch).sum()
        self.data_wait += waited
        tokens = batch[LOSS_MASK_COLUMN].sum().double()
        self.sums += torch.stack([loss.detach().double() * tokens, tokens]
                                 + [task_losses[task].double() * tokens for task in self.tasks])

    def reduce(self) -> dict[str, float]:
        """Collective: loss mean over all ranks' tokens, throughput over all ranks, mean wait share."""
        world = dist.get_world_size()
        totals = torch.cat([self.sums, self.rows.view(1), self.sums.new_tensor([self.data_wait])])
        dist.all_reduce(totals)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        loss, tokens, *task_sums, rows, waited = totals.tolist()
        counted = max(tokens, 1.0)
        return {"loss": loss / counted, "samples_per_s": rows / elapsed,
                "tokens_per_s": tokens / elapsed, "data_wait": min(1.0, waited / world / elapsed),
                "task_loss": {task: value / counted for task, value in zip(self.tasks, task_sums)}}


class ShardedRanker:
    """The dense model and the sharded tables called as one model (evaluation during training):
    every call is a collective, so every rank must make the same number of calls (``idle``)."""

    def __init__(self, dense: nn.Module, tables: ShardedTables):
        self.dense, self.tables = dense, tables

    @property
    def training(self) -> bool:
        return self.dense.training

    def train(self, mode: bool = True) -> None:
        self.dense.train(mode)
        self.tables.train(mode)

    def eval(self) -> None:
        self.train(False)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.dense(batch, self.tables(batch))

    def idle(self, context_len: int) -> None:
        self.tables.idle(context_len)


def _reports_failure(method):
    """A :class:`Trainer` step whose exception every other rank must hear about (and stop)."""
    @functools.wraps(method)
    def wrapper(self: "Trainer", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            self.fail(error)
            raise
    return wrapper


class Trace:
    """``distributed.trace``: per step, one JSON line per rank with the ids of the real rows the rank
    trained on (:func:`trainer.data.row_fingerprints`; padding rows are left out) and the digest of
    its parameters after the update, so sharding (each row once per epoch) and replica agreement can
    be checked after the fact."""

    def __init__(self, run_dir: str | Path, rank: int):
        path = Path(run_dir) / TRACE_DIR / f"rank{rank:05d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._stream: TextIO = path.open("a", buffering=1)

    def write(self, step: int, batch: dict[str, torch.Tensor], model: nn.Module) -> None:
        real = real_rows(batch).numpy()
        rows = row_fingerprints(batch["user_key"].numpy()[real], batch["ts"].numpy()[real])
        self._stream.write(json.dumps({"step": step, "rows": rows, "params": parameter_digest(model)}) + "\n")

    def close(self) -> None:
        self._stream.close()


class Trainer:
    """One rank's training run: the engine, its input stream, evaluation, checkpoints and export."""

    def __init__(self, config: TrainConfig, watchdog: Watchdog | None = None):
        """``watchdog``: the one of ranks that outlive this run (:mod:`trainer.resident`, whose
        process group is already up); by default the run starts both and ends its watchdog."""
        self.config = config
        if watchdog is None:
            start_distributed(config)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        configure_rank_logging(self.rank)
        self._failed = False
        self._owns_watchdog = watchdog is None
        self.watchdog = watchdog or Watchdog.from_environment(config.distributed.heartbeat_timeout_s)
        if self._owns_watchdog:
            self.watchdog.start()
        self._set_up()

    @_reports_failure
    def _set_up(self) -> None:
        config = self.config
        accelerator = get_accelerator()
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.device = torch.device(accelerator.current_device_name())
        self.autocast = torch.bfloat16 if config.deepspeed.precision == "bf16" else None

        manifest, self.spec = read_feature_manifest(config.features)
        self.tasks = self.spec.event_schema.label_columns
        # Before any collective: a model.task_weights key the schema has no task for fails every rank alike.
        self.task_weights = resolve_task_weights(config.model, self.spec.event_schema)
        # T_ref of fresh weights only: a resumed or warm-started model keeps its checkpoint's
        # anchor (a buffer), and the export records the anchor the model holds.
        self.t_ref = config.model.t_ref_seconds or manifest["watermark_ms"] // 1000
        # What this run trains on, kept in every checkpoint: continual training starts after it.
        self.data_watermark = manifest.get("data_watermark") or {
            "batch": manifest.get("newest_batch", 0), "watermark_ms": manifest["watermark_ms"]}
        self.plan = self._plan_resume() if config.train.resume else None
        self.shards = resolved_shards(config, self.world, self.plan.newest.data if self.plan else None)
        check_layout(config.data.batch_size, self.shards, self.world)
        if config.distributed.fault != "none":
            require(config.distributed.fault_rank < self.world, "distributed.fault_rank",
                    f"must name one of the {self.world} ranks")
        self.total_steps = training_steps(config.features, config.train.steps, config.train.epochs,
                                          config.data.batch_size)
        self._check_ranks_agree()
        seed_everything(config.seed)  # the same initial weights on every rank
        self.tables = (ShardedTables(config.embeddings, self.spec, config.model.d_model, self.device,
                                     config.seed) if config.embeddings.sharded else None)
        model = GenerativeRanker(config.model, self.spec, self.t_ref, tables_outside=self.tables is not None)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameter_groups(model, config.optim.weight_decay),
            lr_scheduler=functools.partial(_make_scheduler, config, self.total_steps),
            config=deepspeed_config(config, self.world,
                                    load_universal=bool(self.plan and self.plan.universal)))
        seed_everything(rank_seed(config.seed, self.rank))
        self.telemetry = (TrainerTelemetry(self.tasks, config.telemetry.port, config.telemetry.host)
                          if self.rank == 0 else None)
        self.trace = Trace(config.run, self.rank) if config.distributed.trace else None
        self.step = 0
        self.first_step = 0
        """The step this run's input stream started at (a warm start continues a count)."""
        self.metrics: Metrics | None = None
        self.checkpointed_step: int | None = None
        log.info("training %d steps on %d ranks, global batch %d (%d per rank, %d logical shards), "
                 "device %s", self.total_steps, self.world, config.data.batch_size,
                 config.data.batch_size // self.world, self.shards, self.device)

    def _plan_resume(self) -> checkpoint.ResumePlan:
        """Rank 0 reads the checkpoint markers, every rank gets its plan (one view of the files); a
        checkpoint of another event schema than the dataset's stops the run here (``SchemaError``)."""
        plan = [checkpoint.plan_resume(self.config.run, self.world, self.spec.event_schema)
                if self.rank == 0 else None]
        dist.broadcast_object_list(plan, src=0)
        return plan[0]

    def _check_ranks_agree(self) -> None:
        """Every rank must see the same training split: a node with a stale or partial copy would
        otherwise train on other rows or run another number of steps (and hang the others)."""
        rows, groups = count_rows(split_dir(self.config.features, "train"))
        facts = torch.tensor([self.total_steps, rows, groups, self.shards], dtype=torch.int64,
                             device=self.device)
        low, high = facts.clone(), facts.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise DataError(f"ranks disagree about {split_dir(self.config.features, 'train')} "
                            f"(steps, rows, row groups, shards) between {low.tolist()} and "
                            f"{high.tolist()}: every node must see the same feature dataset")

    def fail(self, error: BaseException) -> None:
        """This rank failed: make sure every other rank stops too (see ``trainer.watchdog``)."""
        if not self._failed:
            self._failed = True
            self.watchdog.fail(error)

    @_reports_failure
    def resume(self) -> None:
        saved, client_state = checkpoint.load(self.engine, self.config.run, self.plan, self.tables)
        check_resumable(client_state["data"], data_position(self.config, self.shards, 0))
        self.step = client_state["step"]
        self.first_step = self.step - client_state["data"]["steps"]
        self.metrics = client_state.get("metrics") or None
        self.checkpointed_step = self.step
        if saved.world != self.world:
            seed_everything(rank_seed(self.config.seed, self.rank, self.step))
            log.info("checkpoint %s was written by %d ranks: weights, optimizer state, schedule and data "
                     "position carry over; the per-rank RNG streams (dropout) start afresh",
                     saved.tag, saved.world)
        log.info("resuming at step %d from %s", self.step, saved.tag)

    @_reports_failure
    def fit(self) -> Metrics | None:
        config = self.config
        with TrainStream(config.features, self.spec, config.data.batch_size,
                         config.data.shuffle_buffer, config.data.seed, self.rank, self.world,
                         self.shards, skip_steps=self.step - self.first_step) as stream:
            self._train_steps(stream)
            self.evaluate()
            if self.checkpointed_step != self.step:
                self.save(stream.steps)
        serving = self._serving_model()
        if self.rank == 0:
            export_model(serving, config, self.spec, config.run, checkpoint.tag_for(self.step), self.step)
            log.info("final metrics at step %d:\n%s", self.step, format_table({"eval": self.metrics}))
        dist.barrier()  # the export is complete before any rank reports success
        return self.metrics

    def _train_steps(self, stream: TrainStream) -> None:
        config = self.config.train
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=self.rank != 0, mininterval=2.0)
        window = LogWindow(self.device, self.tasks)
        run_wait, run_started = 0.0, time.perf_counter()
        while self.step < self.total_steps:
            started = time.perf_counter()
            host_batch = next(stream)
            batch = {name: tensor.to(self.device, non_blocking=True) for name, tensor in host_batch.items()}
            waited = time.perf_counter() - started
            share = self._token_share(batch)
            with torch.autocast(self.device.type, dtype=self.autocast or torch.float32,
                                enabled=self.autocast is not None):
                logits = self.engine(batch, self.tables(batch) if self.tables is not None else None)
            loss, task_losses = masked_multitask_loss(logits, batch, self.task_weights)
            self.engine.backward(loss * share)
            self.engine.step()
            self.step += 1
            self.watchdog.step = self.step
            window.add(loss, task_losses, batch, waited)
            if self.trace is not None:
                self.trace.write(self.step, host_batch, self.engine.module)
            run_wait += waited
            progress.update(1)
            if self.step % config.log_every == 0 or self.step == self.total_steps:
                self._log(window)
                window = LogWindow(self.device, self.tasks)
            if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                self.evaluate()
            if (config.checkpoint_every and self.step % config.checkpoint_every == 0
                    and self.step < self.total_steps):
                self.save(stream.steps)
            self._fire_drill()
        progress.close()
        elapsed = time.perf_counter() - run_started
        if elapsed > 0:
            log.info("rank 0 waited for data %.1f%% of %.1f s of training", 100 * run_wait / elapsed, elapsed)

    def _token_share(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """This rank's loss weight: its label-bearing tokens × ranks / all ranks' tokens.

        The loss is a mean over this rank's tokens and DeepSpeed averages gradients over ranks; with
        this weight the update is the gradient of the mean over the global batch's tokens, so it
        does not depend on how the global batch is split (W → W' resumes continue exactly). Padding
        rows hold no label-bearing token, so they weigh nothing, even where a rank's whole micro
        batch is padding (its share is 0)."""
        tokens = batch[LOSS_MASK_COLUMN].sum()
        total = tokens.detach().clone()
        dist.all_reduce(total)
        return tokens * self.world / total.clamp_min(1.0)

    def _fire_drill(self) -> None:
        drill = self.config.distributed
        if drill.fault != "none" and self.rank == drill.fault_rank and self.step == drill.fault_step:
            inject_fault(drill.fault, self.rank, self.step)

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

    def _serving_model(self) -> GenerativeRanker | None:
        """The whole model on rank 0, tables included (``None`` elsewhere); collective with sharded
        tables, which are gathered whole into it."""
        if self.tables is None:
            return self.engine.module if self.rank == 0 else None
        serving = None
        if self.rank == 0:
            serving = GenerativeRanker(self.config.model, self.spec, self.t_ref)
            missing, unexpected = serving.load_state_dict(self.engine.module.state_dict(), strict=False)
            tables = {f"id_embeddings.{table}.weight" for table in self.tables.rows}
            if set(missing) != tables or unexpected:
                raise RuntimeError(f"the dense model and the tables do not make the serving model: "
                                   f"missing {sorted(set(missing) - tables)}, unexpected {unexpected}")
        self.tables.gather(None if serving is None else {
            table: serving.id_embeddings[table].weight.data for table in self.tables.rows})
        return serving

    def evaluate(self) -> None:
        model = self.engine.module if self.tables is None else ShardedRanker(self.engine.module, self.tables)
        metrics = evaluate_split(model, self.config.features, self.spec,
                                 self.config.data.eval_batch_size, self.rank, self.world, self.device,
                                 autocast_dtype=self.autocast, lockstep=self.tables is not None)
        if self.rank == 0:
            self.metrics = metrics
            write_metrics(self.config.run, metrics, step=self.step, source="train",
                          features=self.config.features, ranks=self.world)
            self.telemetry.on_eval(metrics)
            summary = ", ".join(f"{task} NE {values['ne']:.4f} AUC {values['auc']:.4f}"
                                for task, values in metrics.items())
            log.info("eval at step %d: %s", self.step, summary)

    def save(self, stream_steps: int) -> None:
        """Checkpoint (collective); ``stream_steps`` is the input stream's position in global batches."""
        data = data_position(self.config, self.shards, stream_steps)
        client_state: dict[str, Any] = {
            "step": self.step, "config": to_dict(self.config), "feature_spec_version": FEATURE_SPEC_VERSION,
            "metrics": self.metrics or {}, "data_watermark": self.data_watermark}
        checkpoint.save(self.engine, self.config.run, self.step, client_state, data, self.spec,
                        self.config.train.keep_checkpoints, self.tables)
        self.checkpointed_step = self.step
        if self.telemetry is not None:
            self.telemetry.on_checkpoint(self.step)

    def close(self) -> None:
        if self.telemetry is not None:
            self.telemetry.close()
        if self.trace is not None:
            self.trace.close()
        if self._owns_watchdog:
            self.watchdog.close()


def start_distributed(config: TrainConfig) -> None:
    """torch.distributed for this launcher-started rank, on ``config``'s backend and timeout."""
    backend = None if config.deepspeed.comm_backend == "auto" else config.deepspeed.comm_backend
    init_distributed(backend, config.distributed.timeout_s)


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


def main(argv: list[str]) -> NoReturn:
    parser = argparse.ArgumentParser(prog="trainer/train.py",
                                     description="One rank of a training run (started by deepspeed).")
    add_config_arguments(parser)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the launcher passes it
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    die_with_parent()
    try:
        train(config)
    except Exception:
        # No destroy_process_group: with a peer gone it can hang instead of returning.
        log.exception("rank %s failed", os.environ.get("RANK", "?"))
        exit_rank(1)
    dist.destroy_process_group()
    exit_rank(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
