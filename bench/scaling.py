"""Benchmark: training throughput on 1 rank and on 2 ranks at the same global batch, and the share
of step time spent communicating.

    .venv/bin/python bench/scaling.py [--config FILE] [key=value ...]   →  bench/results/scaling.json

For each world size in ``worlds`` the real ``deepspeed`` launcher starts this file's worker on that
many local ranks (one OpenMP thread each, as ``sirenfeed train`` runs them). Every rank builds the
configured ranker and its DeepSpeed engine (``trainer.config.deepspeed_config``), reads its share of
each global batch from a synthetic feature dataset through ``trainer.data.TrainStream`` and times the
parts of every step:

- ``data``: the next micro batch;
- ``compute``: forward and backward, with DeepSpeed's gradient all-reduce held back
  (``engine.enable_backward_allreduce = False``, as DeepSpeed's pipeline engine does);
- ``communication``: that all-reduce, run right after (``engine.allreduce_gradients``);
- ``optimizer``: ``engine.step`` (clipping, AdamW, LR schedule).

Reported per ZeRO stage and world size: samples/s (global batch / median step time, the slowest
rank's), the median wall time of each part and its CPU time (the process's, gloo's threads
included: on a shared machine a rank may not get a core to itself, and CPU time shows the work a
rank does whatever the wait); then the speedup of 2 ranks over 1 and, for ZeRO-0, the
communication share of a 2-rank step (under ZeRO-1 the gradient reduction is timed as
communication, but the parameter all-gather happens inside ``engine.step``). All runs go in one
invocation, one after the other, so machine load hits them alike; the load average is recorded
with them, as is the all-reduce volume per step (4 bytes × the DeepSpeed module's parameters)
that ``docs/scaling.md`` builds on.

The id tables follow ``embeddings.sharding`` like training: sharded by TorchRec by default (their
all-to-all then happens inside ``compute``), or ``train_overrides=[embeddings.sharding=data_parallel]``
for the dense design, whose fp32 table gradients DeepSpeed all-reduces with the rest
(``bench/embeddings.py`` compares the two designs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from common.config import add_config_arguments, config_from_args, load_config, require, to_dict
from common.files import write_json
from common.logs import configure_rank_logging
from features.dataset import write_manifest
from features.spec import FEATURE_SPEC_VERSION, LOSS_MASK_COLUMN, FeatureSpec
from trainer.config import TrainConfig, deepspeed_config
from trainer.data import TrainStream, read_feature_manifest, write_training_rows
from trainer.distributed import init_distributed
from trainer.embeddings import ShardedTables
from trainer.launcher import free_port, launch_env
from trainer.model import GenerativeRanker, masked_multitask_loss, parameter_groups, synthetic_batch

RESULTS = Path(__file__).resolve().parent / "results" / "scaling.json"
T_REF_SECONDS = 1_700_000_000


@dataclass
class ScalingBenchConfig:
    worlds: list[int] = field(default_factory=lambda: [1, 2])
    batch_size: int = 256
    """The global batch, the same for every world size."""
    steps: int = 12
    """Timed steps per world size (after ``warmup_steps``)."""
    warmup_steps: int = 3
    rows: int = 8192
    row_group: int = 512
    zero_stages: list[int] = field(default_factory=lambda: [0, 1])
    train_overrides: list[str] = field(default_factory=list)
    """Extra ``TrainConfig`` overrides (model size, precision …)."""
    out: str = ""
    """Result file (default bench/results/scaling.json)."""

    def __post_init__(self) -> None:
        require(bool(self.worlds) and all(world >= 1 for world in self.worlds), "worlds",
                "must be world sizes >= 1")
        require(all(self.batch_size % world == 0 for world in self.worlds), "batch_size",
                "must be divisible by every world size")
        require(self.steps >= 1 and self.warmup_steps >= 0, "steps", "needs steps >= 1, warmup_steps >= 0")
        require(self.rows >= self.batch_size, "rows", "must be >= batch_size")
        require(all(stage in (0, 1, 2) for stage in self.zero_stages) and self.zero_stages, "zero_stages",
                "must be ZeRO stages 0, 1 or 2")


def write_dataset(root: Path, spec: FeatureSpec, rows: int, row_group: int) -> Path:
    """Synthetic training rows in the feature job's layout (train and a one-group eval split)."""
    batch = synthetic_batch(spec, rows, seed=0, start_seconds=T_REF_SECONDS - 30 * 86_400)
    columns = {name: tensor.numpy() for name, tensor in batch.items()}
    write_training_rows(root / "train" / "date=2024-05-01" / "part-00000.parquet", columns, spec, row_group)
    write_training_rows(root / "eval" / "date=2024-05-02" / "part-00000.parquet",
                        {name: values[:row_group] for name, values in columns.items()}, spec, row_group)
    write_manifest(root, {"spec": spec.record(),
                          "feature_spec_version": FEATURE_SPEC_VERSION, "watermark_ms": T_REF_SECONDS * 1000,
                          "splits": {"train": {"rows": rows}}})
    return root


def worker(bench: ScalingBenchConfig, features: Path, zero_stage: int, result_file: Path) -> None:
    """One rank of a timed run (inside the launcher)."""
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    configure_rank_logging(rank)
    config = load_config(TrainConfig, overrides=[
        f"features={features}", f"run={features}", f"data.batch_size={bench.batch_size}",
        f"deepspeed.zero_stage={zero_stage}", "schedule.warmup_steps=0", *bench.train_overrides])
    _, spec = read_feature_manifest(features)
    torch.manual_seed(config.seed)
    tables = (ShardedTables(config.embeddings, spec, config.model.d_model, torch.device("cpu"), config.seed)
              if config.embeddings.sharded else None)
    model = GenerativeRanker(config.model, spec, T_REF_SECONDS, tables_outside=tables is not None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, config.optim.weight_decay),
        config=deepspeed_config(config, world))
    engine.enable_backward_allreduce = False
    names = ("data", "compute", "communication", "optimizer", "step")
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    with TrainStream(features, spec, bench.batch_size, config.data.shuffle_buffer,
                     config.data.seed, rank, world) as stream:
        for step in range(bench.warmup_steps + bench.steps):
            dist.barrier()  # every step starts together, so each part is timed on its own
            marks = [(time.perf_counter(), time.process_time())]
            batch = next(stream)
            marks.append((time.perf_counter(), time.process_time()))
            looked_up = tables(batch) if tables is not None else None
            loss, _ = masked_multitask_loss(engine(batch, looked_up), batch, model.task_weights)
            tokens = batch[LOSS_MASK_COLUMN].sum()
            all_tokens = tokens.clone()
            dist.all_reduce(all_tokens)  # the trainer's loss weighting (trainer.train.Trainer._token_share)
            engine.backward(loss * tokens * world / all_tokens.clamp_min(1.0))
            marks.append((time.perf_counter(), time.process_time()))
            engine.allreduce_gradients()
            marks.append((time.perf_counter(), time.process_time()))
            engine.step()
            marks.append((time.perf_counter(), time.process_time()))
            if step >= bench.warmup_steps:
                spans = [*zip(marks, marks[1:]), (marks[0], marks[-1])]
                for name, (start, stop) in zip(names, spans):
                    wall[name].append(stop[0] - start[0])
                    cpu[name].append(stop[1] - start[1])
    # A step takes as long as its slowest rank: keep, per step, the maximum over ranks.
    timings = torch.tensor([wall[name] for name in names] + [cpu[name] for name in names],
                           dtype=torch.float64)
    dist.all_reduce(timings, op=dist.ReduceOp.MAX)
    if rank == 0:
        medians = [statistics.median(values) for values in timings.tolist()]
        median_wall = dict(zip(names, medians[:len(names)]))
        parameters = sum(parameter.numel() for parameter in model.parameters())
        write_json(result_file, {
            "zero_stage": zero_stage, "world": world, "samples_per_s": bench.batch_size / median_wall["step"],
            "median_s": median_wall, "median_cpu_s": dict(zip(names, medians[len(names):])),
            "parameters": parameters, "allreduce_bytes_per_step": 4 * parameters})
    dist.destroy_process_group()


def run_world(config_file: str | None, overrides: list[str], features: Path, zero_stage: int, world: int,
              scratch: Path) -> dict:
    result_file = scratch / f"zero{zero_stage}-world{world}.json"
    command = [str(Path(sys.prefix) / "bin" / "deepspeed"), "--num_gpus", str(world), "--master_port",
               str(free_port()), str(Path(__file__).resolve()), "--worker", str(features), str(zero_stage),
               str(result_file)]
    if config_file:
        command += ["--config", config_file]
    started = time.perf_counter()
    subprocess.run(command + overrides, env=launch_env(), check=True, stdout=subprocess.DEVNULL)
    result = json.loads(result_file.read_text())
    result["launch_s"] = time.perf_counter() - started
    result["load_average_1min"] = os.getloadavg()[0]
    return result


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("FEATURES", "STAGE", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    bench = config_from_args(ScalingBenchConfig, args)
    if args.worker:
        worker(bench, Path(args.worker[0]), int(args.worker[1]), Path(args.worker[2]))
        return 0
    with tempfile.TemporaryDirectory(prefix="sirenfeed-scaling-") as scratch:
        scratch_path = Path(scratch)
        features = write_dataset(scratch_path / "features", FeatureSpec(), bench.rows, bench.row_group)
        runs = [run_world(args.config, list(args.overrides), features, stage, world, scratch_path)
                for stage in bench.zero_stages for world in bench.worlds]
    summary = {"config": to_dict(bench), "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                     "python": platform.python_version()},
               "runs": runs, "speedup_2_over_1": {}}
    by_key = {(run["zero_stage"], run["world"]): run for run in runs}
    for stage in bench.zero_stages:
        if (stage, 1) in by_key and (stage, 2) in by_key:
            summary["speedup_2_over_1"][f"zero{stage}"] = (by_key[stage, 2]["samples_per_s"]
                                                          / by_key[stage, 1]["samples_per_s"])
    if (0, 2) in by_key:
        two = by_key[0, 2]["median_s"]
        summary["communication_share_2_ranks_zero0"] = two["communication"] / two["step"]
    out = Path(bench.out) if bench.out else RESULTS
    write_json(out, summary)
    for run in runs:
        parts = ", ".join(f"{name} {wall * 1000:.0f} ms (cpu {run['median_cpu_s'][name] * 1000:.0f})"
                          for name, wall in run["median_s"].items())
        print(f"ZeRO-{run['zero_stage']} {run['world']} rank(s): {run['samples_per_s']:.0f} samples/s, load "
              f"{run['load_average_1min']:.1f}: {parts}")
    for stage, speedup in summary["speedup_2_over_1"].items():
        print(f"{stage}: 2 ranks / 1 rank = {speedup:.2f}x")
    if "communication_share_2_ranks_zero0" in summary:
        print(f"ZeRO-0, 2 ranks: all-reduce {100 * summary['communication_share_2_ranks_zero0']:.0f}% of the "
              f"step ({runs[0]['allreduce_bytes_per_step'] / 1e6:.0f} MB per step)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
