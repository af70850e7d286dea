"""Benchmark: the id tables sharded by TorchRec against today's dense design, as the item table grows.

    .venv/bin/python bench/embeddings.py [--config FILE] [key=value ...]   →  bench/results/embeddings.json

Every configuration is one launch of the real ``deepspeed`` launcher on ``world`` local CPU ranks
(one OpenMP thread each, as ``sirenfeed train`` runs them), training the default ranker on
``batch_size`` global rows of ``spec.context_len`` tokens exactly as ``trainer/train.py`` does
(``engine(batch, tables(batch))``, the token-share loss weight, ``engine.backward``,
``engine.step``), on synthetic rows (``trainer.model.synthetic_batch``: ids uniform over every
bucket, so a step touches rows all over the table). Two designs:

- ``sharded``: ``trainer.embeddings.ShardedTables`` (TorchRec's planner places the shards, fused
  row-wise Adagrad in backward) outside the DeepSpeed engine, which holds the dense model only;
- ``dense``: today's design, ``embeddings.sharding=data_parallel``: ``nn.Embedding`` tables inside
  the DeepSpeed module, replicated on every rank, trained by its AdamW (dense gradients of every
  row all-reduced each step). Built only where it fits: ``dense_bytes_per_parameter`` per rank
  (weight, gradient, two AdamW moments: 16 bytes, plus DeepSpeed's flattened gradient copy) plus
  ``rank_overhead_gib`` must stay within ``memory_budget_gib`` for the machine, else the
  configuration is recorded as skipped with the estimate.

Measured per configuration, over ``steps`` steps after ``warmup_steps`` (a barrier before each, a
step's time is its slowest rank's): the median step time and samples/s; per rank the peak RSS
(``ru_maxrss``) and the RSS after setup, the bytes the id tables occupy there (local shards:
weights and optimizer state; dense: weights and AdamW moments, gradients listed apart); and the
bytes handed to collectives per step. Those are counted by wrapping the ``torch.distributed``
functions TorchRec's ``comm_ops.py`` and ``dist_data.py`` call (``all_to_all_single``,
``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter``, ``reduce_scatter_tensor``, and the
functional ``all_to_all_single``) and ``all_reduce`` (DeepSpeed's gradient all-reduce, ZeRO-0) for
the timed steps, attributed by the calling package: ``tables`` (torchrec), ``dense`` (deepspeed),
``other`` (the loss weight's one-number all-reduce). A rank's payload is its send buffer, and a
step's figure sums the ranks'; for an all-to-all the part addressed to the rank itself is reported
too (``off_rank`` excludes it). On one rank TorchRec calls no collective and DeepSpeed's all-reduce
crosses no wire, but its payload is still counted. With the ids looked up per step (real tokens ×
id columns, all ranks) this gives bytes per id, which should not depend on the table's size.

Also run: the default ``FeatureSpec`` item table on one rank, both designs in one launch trained
alternately step by step on the same batches (their samples/s ratio; the peak RSS is then the
pair's), and
one large item table (``large_rows``) on ``large_world`` ranks with a forced ``large_sharding``
(row-wise by default), whose per-rank table bytes should be about the total over the ranks.
Sharded runs are screened for memory too: the tables' fp32 bytes (each row lives on one rank) times
``sharded_bytes_factor`` (1.3: the shards, their optimizer state and the allocator's slack; shards
are initialised one block of rows at a time, and 10M rows on 2 ranks peaked at 3.1 GB per rank for
2.6 GB of table) plus the overhead.

A configuration that fails (out of memory, a planner refusal, a timeout) is recorded with the tail
of its log and the rest go on. Everything runs in one invocation, one configuration at a time; the
JSON records the machine and its load average before and after, every configuration, the plans
TorchRec chose, and the target checks with the measured ratios.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import deepspeed
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as functional_collectives
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor

from common.concurrency import process_group
from common.config import add_config_arguments, config_from_args, load_config, require, to_dict
from common.files import write_json
from common.logs import DATE_FORMAT, LOG_FORMAT, configure_logging, configure_rank_logging
from features.spec import LOSS_MASK_COLUMN, FeatureSpec
from trainer.config import EMBEDDING_SHARDINGS, TrainConfig, deepspeed_config
from trainer.distributed import init_distributed, remove_leftover_segments
from trainer.embeddings import ShardedTables, describe_plan
from trainer.launcher import free_port, launch_env
from trainer.model import GenerativeRanker, masked_multitask_loss, parameter_groups, synthetic_batch

log = logging.getLogger("bench.embeddings")

RESULTS = Path(__file__).resolve().parent / "results" / "embeddings.json"
T_REF_SECONDS = 1_700_000_000
GIB = 1 << 30


@dataclass
class EmbeddingsBenchConfig:
    item_rows: list[int] = field(default_factory=lambda: [50_000, 1_000_000, 4_000_000, 10_000_000])
    """Item-table sizes of the sweep (the other id columns keep their ``FeatureSpec()`` buckets)."""
    worlds: list[int] = field(default_factory=lambda: [1, 2])
    batch_size: int = 256
    """The global batch, the same for every world size."""
    steps: int = 20
    """Timed steps per configuration (after ``warmup_steps``)."""
    warmup_steps: int = 5
    dense_steps: int = 6
    """Timed steps of the dense design's sweep (its steps take seconds at millions of rows)."""
    dense_warmup_steps: int = 2
    sharding: str = "auto"
    """``embeddings.sharding`` of the sharded sweep (``auto``: TorchRec's planner decides)."""
    dense_baseline: bool = True
    """Also run today's dense design (``embeddings.sharding=data_parallel``) where it fits."""
    default_table_check: bool = True
    """Run the default ``FeatureSpec`` item table on one rank in both designs."""
    large_rows: int = 20_000_000
    """The large item table (0 = skip that run)."""
    large_world: int = 2
    large_sharding: str = "row_wise"
    large_steps: int = 10
    """Timed steps of the large run (after ``warmup_steps``)."""
    memory_budget_gib: float = 18.0
    """What the ranks of one configuration may use together on this machine (estimated before starting)."""
    dense_bytes_per_parameter: float = 24.0
    """Dense design, per rank: weight, gradient and two AdamW moments (16 bytes, fp32) and
    DeepSpeed's flattened copy of the gradients for the all-reduce (measured: about 24-27)."""
    sharded_bytes_factor: float = 1.3
    """Sharded design: a rank's peak over its tables' fp32 weight bytes (the shard, its optimizer
    state, the allocator's slack)."""
    rank_overhead_gib: float = 1.5
    """Per rank: interpreter, libraries, the dense model, activations."""
    run_timeout_s: float = 900.0
    """A configuration running longer is stopped and recorded as failed."""
    max_step_ratio: float = 1.3
    """Target: step time at the largest item table / at the smallest, sharded, one rank."""
    min_samples_ratio: float = 1.25
    """Target: sharded / dense samples/s with the default item table on one rank."""
    bytes_per_id_tolerance: float = 0.1
    """Target: the tables' bytes per looked-up id vary at most this much (max / min − 1) over sizes."""
    train_overrides: list[str] = field(default_factory=list)
    """Extra ``TrainConfig`` overrides (model size, optimizer …); the design's sharding is set after them."""
    out: str = ""
    """Result file (default bench/results/embeddings.json)."""

    def __post_init__(self) -> None:
        require(bool(self.item_rows) and all(rows >= 2 for rows in self.item_rows), "item_rows",
                "must be table sizes >= 2")
        require(bool(self.worlds) and all(world >= 1 for world in self.worlds), "worlds",
                "must be world sizes >= 1")
        require(all(self.batch_size % world == 0 for world in [*self.worlds, self.large_world]), "batch_size",
                "must be divisible by every world size")
        require(min(self.steps, self.large_steps, self.dense_steps) >= 1
                and min(self.warmup_steps, self.dense_warmup_steps) >= 0, "steps",
                "needs steps, large_steps, dense_steps >= 1 and warmup steps >= 0")
        torchrec_shardings = [name for name in EMBEDDING_SHARDINGS if name != "data_parallel"]
        require(self.sharding in torchrec_shardings, "sharding",
                f"must be a TorchRec sharding: {', '.join(torchrec_shardings)}")
        require(self.large_sharding in torchrec_shardings, "large_sharding",
                f"must be a TorchRec sharding: {', '.join(torchrec_shardings)}")
        require(self.large_rows == 0 or self.large_rows >= 2, "large_rows", "must be 0 (skip) or >= 2")
        require(self.memory_budget_gib > 0 and self.run_timeout_s > 0, "memory_budget_gib",
                "budget and timeout must be > 0")


@dataclass
class RunSpec:
    """One configuration: a design, an item-table size, a world size."""

    name: str
    designs: list[str]
    """``sharded`` and/or ``dense``; two are trained in one launch, alternately step by step."""
    item_rows: int
    world: int
    sharding: str
    """``embeddings.sharding`` of the sharded design."""
    steps: int
    warmup_steps: int
    group: str
    """``sweep`` | ``default_table`` | ``large``."""


# --- the rank side ------------------------------------------------------------------------------

def _caller_package(depth: int = 2) -> str:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name.split(".", 1)[0]


CATEGORIES = {"torchrec": "tables", "deepspeed": "dense"}


class CollectiveCounter:
    """Counts the bytes this rank hands to ``torch.distributed`` collectives during a design's
    timed step, by calling package: the wrapped functions replace the module attributes TorchRec and DeepSpeed
    look up on every call."""

    FUNCTIONS: dict[str, Callable[[inspect.BoundArguments], list[torch.Tensor]]] = {
        "all_to_all_single": lambda a: [a.arguments["input"]],
        "all_gather": lambda a: [a.arguments["tensor"]],
        "all_gather_into_tensor": lambda a: [a.arguments["input_tensor"]],
        "reduce_scatter": lambda a: list(a.arguments["input_list"]),
        "reduce_scatter_tensor": lambda a: [a.arguments["input"]],
        "all_reduce": lambda a: [a.arguments["tensor"]],
        "all_reduce_coalesced": lambda a: list(a.arguments["tensors"]),
    }

    def __init__(self) -> None:
        self.design: str | None = None
        """The design whose step is running (None: count nothing)."""
        self.bytes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.to_self: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.calls: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._originals: list[tuple[Any, str, Any]] = []

    def install(self) -> None:
        for name, payload in self.FUNCTIONS.items():
            self._wrap(dist, name, payload, all_to_all=name == "all_to_all_single")
        self._wrap(functional_collectives, "all_to_all_single", lambda a: [a.arguments["self"]],
                   all_to_all=True, label="functional.all_to_all_single")

    def uninstall(self) -> None:
        for module, name, original in reversed(self._originals):
            setattr(module, name, original)
        self._originals.clear()

    def _wrap(self, module: Any, name: str, payload: Callable, all_to_all: bool, label: str = "") -> None:
        original = getattr(module, name)
        signature = inspect.signature(original)
        label = label or name
        counter = self

        def counted(*args: Any, **kwargs: Any) -> Any:
            design = counter.design
            if design is not None:
                bound = signature.bind(*args, **kwargs)
                tensors = payload(bound)
                key = f"{CATEGORIES.get(_caller_package(), 'other')}.{label}"
                counter.bytes[design][key] += sum(_tensor_bytes(tensor) for tensor in tensors)
                counter.calls[design][key] += 1
                if all_to_all and tensors:
                    counter.to_self[design][key] += _addressed_to_self(bound, tensors[0])
            return original(*args, **kwargs)

        counted.__wrapped__ = original
        self._originals.append((module, name, original))
        setattr(module, name, counted)


def _addressed_to_self(bound: inspect.BoundArguments, tensor: torch.Tensor) -> int:
    """The bytes of an all-to-all's input that stay on this rank."""
    group = bound.arguments.get("group")
    if isinstance(group, (str, list, tuple)) or group is None:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = dist.get_rank(group), dist.get_world_size(group)
    splits = bound.arguments.get("input_split_sizes")
    if not splits:
        return tensor.numel() * tensor.element_size() // max(world, 1)
    row_bytes = (tensor.numel() // max(tensor.shape[0], 1)) * tensor.element_size() if tensor.ndim else 0
    return int(splits[rank]) * row_bytes


def _local_bytes(value: Any) -> int:
    """Bytes this rank holds of a state-dict value: local shards of a sharded tensor, a DTensor's
    local part, a tensor, or nested containers of them."""
    if isinstance(value, ShardedTensor):
        return sum(shard.tensor.numel() * shard.tensor.element_size() for shard in value.local_shards())
    if isinstance(value, DTensor):
        local = value.to_local()
        return local.numel() * local.element_size()
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_local_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_local_bytes(item) for item in value)
    return 0


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def sharded_table_bytes(tables: ShardedTables) -> dict[str, int]:
    weights = _local_bytes(tables.module.state_dict())
    optimizer = _local_bytes(tables.module.fused_optimizer.state_dict()["state"])
    return {"weights": weights, "optimizer": optimizer, "total": weights + optimizer}


def dense_table_bytes(engine: Any, model: GenerativeRanker) -> dict[str, int]:
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    parameters = [parameter for table in model.id_embeddings.values() for parameter in table.parameters()]
    weights = sum(_tensor_bytes(parameter) for parameter in parameters)
    moments = sum(_tensor_bytes(value) for parameter in parameters
                  for value in optimizer.state.get(parameter, {}).values() if isinstance(value, torch.Tensor))
    return {"weights": weights, "optimizer": moments, "total": weights + moments}


def current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def bench_spec(item_rows: int) -> FeatureSpec:
    return FeatureSpec(buckets={**FeatureSpec().buckets, "item_id": item_rows})


@dataclass
class Trainee:
    """One design's model on this rank, and what its timed steps measured."""

    design: str
    engine: Any
    model: GenerativeRanker
    tables: ShardedTables | None
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    gradient_bytes: int = 0


def build_trainee(design: str, bench: EmbeddingsBenchConfig, run: RunSpec, spec: FeatureSpec, scratch: Path,
                  world: int) -> tuple[Trainee, TrainConfig]:
    sharding = run.sharding if design == "sharded" else "data_parallel"
    config = load_config(TrainConfig, overrides=[
        f"features={scratch}", f"run={scratch}", f"data.batch_size={bench.batch_size}",
        "schedule.warmup_steps=0", *bench.train_overrides, f"embeddings.sharding={sharding}"])
    torch.manual_seed(config.seed)
    tables = (ShardedTables(config.embeddings, spec, config.model.d_model, torch.device("cpu"), config.seed)
              if config.embeddings.sharded else None)
    model = GenerativeRanker(config.model, spec, T_REF_SECONDS, tables_outside=tables is not None)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, config.optim.weight_decay),
        config=deepspeed_config(config, world))
    return Trainee(design, engine, model, tables), config


def train_step(trainee: Trainee, batch: dict[str, torch.Tensor], config: TrainConfig, world: int,
               last: bool) -> torch.Tensor:
    """One step as ``trainer.train.Trainer._train_steps`` takes it."""
    tokens = batch[LOSS_MASK_COLUMN].sum()
    all_tokens = tokens.clone()
    dist.all_reduce(all_tokens)  # the trainer's loss weighting (trainer.train.Trainer._token_share)
    tables = trainee.tables
    logits = trainee.engine(batch, tables(batch) if tables is not None else None)
    loss, _ = masked_multitask_loss(logits, batch, trainee.model.task_weights)
    trainee.engine.backward(loss * tokens * world / all_tokens.clamp_min(1.0))
    if last and tables is None:  # DeepSpeed frees the gradients in its step
        trainee.gradient_bytes = sum(_tensor_bytes(parameter.grad) for table in trainee.model.id_embeddings.values()
                                     for parameter in table.parameters())
    trainee.engine.step()
    return loss


def worker(bench: EmbeddingsBenchConfig, run: RunSpec, scratch: Path, result_file: Path) -> None:
    """One rank of one configuration (inside the launcher). With two designs, both are built and
    trained on the same batches step by step, alternating which goes first, so machine load hits
    them alike."""
    init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    configure_rank_logging(rank)
    started = time.perf_counter()
    spec = bench_spec(run.item_rows)
    share = bench.batch_size // world
    total_steps = run.warmup_steps + run.steps
    # Every step's global batch, made before the clock starts; this rank trains on its slice.
    batches = []
    for step in range(total_steps):
        batch = synthetic_batch(spec, bench.batch_size, seed=step, start_seconds=T_REF_SECONDS - 30 * 86_400)
        batches.append({name: tensor[rank * share:(rank + 1) * share].contiguous()
                        for name, tensor in batch.items()})
    built = [build_trainee(design, bench, run, spec, scratch, world) for design in run.designs]
    trainees = [trainee for trainee, _ in built]
    config = built[0][1]
    setup_s = time.perf_counter() - started
    rss_after_setup = current_rss()
    log.info("%s: set up in %.1f s, RSS %.2f GiB", run.name, setup_s, rss_after_setup / GIB)
    counter = CollectiveCounter()
    counter.install()
    ids_looked_up = 0
    for step, batch in enumerate(batches):
        timed = step >= run.warmup_steps
        for trainee in trainees if step % 2 == 0 else trainees[::-1]:
            dist.barrier()
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            counter.design = trainee.design if timed else None
            loss = train_step(trainee, batch, config, world, last=step == total_steps - 1)
            counter.design = None
            if timed:
                trainee.wall.append(time.perf_counter() - wall_start)
                trainee.cpu.append(time.process_time() - cpu_start)
            if step == 0 or (step + 1) % 10 == 0:
                log.info("%s, %s: step %d/%d, loss %.4f", run.name, trainee.design, step + 1, total_steps,
                         loss.item())
        if timed:
            ids_looked_up += int(batch["length"].sum()) * len(spec.event_schema.id_columns)
    counter.uninstall()
    records = []
    for trainee in trainees:
        timings = torch.tensor([trainee.wall, trainee.cpu], dtype=torch.float64)
        dist.all_reduce(timings, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
        tables = trainee.tables
        table_bytes = (sharded_table_bytes(tables) if tables is not None
                       else {**dense_table_bytes(trainee.engine, trainee.model), "gradients": trainee.gradient_bytes})
        mine = {"rank": rank, "peak_rss_bytes": peak_rss(), "rss_after_setup_bytes": rss_after_setup,
                "table_bytes": table_bytes, "ids_looked_up_per_step": ids_looked_up / run.steps, "setup_s": setup_s,
                **{name: {key: value / run.steps for key, value in sorted(counts[trainee.design].items())}
                   for name, counts in (("collective_bytes_per_step", counter.bytes),
                                        ("collective_bytes_to_self_per_step", counter.to_self),
                                        ("collective_calls_per_step", counter.calls))}}
        ranks: list[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(ranks, mine)
        step_s = statistics.median(timings[0].tolist())
        records.append({
            **{key: value for key, value in asdict(run).items() if key != "designs"},
            "design": trainee.design, "sharding": run.sharding if tables is not None else "data_parallel",
            "status": "ok", "median_step_s": step_s, "median_step_cpu_s": statistics.median(timings[1].tolist()),
            "samples_per_s": bench.batch_size / step_s, "ranks": ranks,
            "deepspeed_module_parameters": sum(parameter.numel() for parameter in trainee.model.parameters()),
            "trained_alongside": [other.design for other in trainees if other is not trainee],
            "plan": (describe_plan(tables.plan) if tables is not None
                     else "data_parallel (nn.Embedding in the DeepSpeed module, replicated)"),
            "plan_types": plan_types(tables.plan) if tables is not None else {}})
    if rank == 0:
        write_json(result_file, records)
    dist.destroy_process_group()


def plan_types(plan: Any) -> dict[str, dict[str, Any]]:
    """Per table: its sharding type and the ranks holding its shards."""
    described = {}
    for module_plan in plan.plan.values():
        for table, parameter in module_plan.items():
            shards = parameter.sharding_spec.shards if parameter.sharding_spec else []
            described[table] = {"sharding_type": parameter.sharding_type,
                                "ranks": sorted({shard.placement.rank() for shard in shards})}
    return described


# --- the launching side -------------------------------------------------------------------------

def table_parameters(item_rows: int, dim: int) -> int:
    return sum(bench_spec(item_rows).buckets.values()) * dim


def memory_estimate(bench: EmbeddingsBenchConfig, run: RunSpec, dim: int) -> int:
    """Bytes the ranks of ``run`` would need together at their peak, on this machine."""
    parameters = table_parameters(run.item_rows, dim)
    estimate = run.world * bench.rank_overhead_gib * GIB
    if "dense" in run.designs:
        estimate += run.world * bench.dense_bytes_per_parameter * parameters
    if "sharded" in run.designs:
        # Every row lives on one rank, so the ranks' peaks add up to the factor times the tables,
        # however the planner splits them.
        estimate += bench.sharded_bytes_factor * 4 * parameters
    return int(estimate)


def run_configuration(bench: EmbeddingsBenchConfig, run: RunSpec, config_file: str | None, overrides: list[str],
                      scratch: Path, dim: int) -> list[dict]:
    """One launch; one record per design (skipped or failed: the same outcome for each)."""
    base = {key: value for key, value in asdict(run).items() if key != "designs"}
    outcome: dict[str, Any] = {"memory_estimate_bytes": memory_estimate(bench, run, dim)}
    estimate = outcome["memory_estimate_bytes"]
    if estimate > bench.memory_budget_gib * GIB:
        outcome.update(status="skipped", reason=(
            f"estimated {estimate / GIB:.1f} GiB for {run.world} rank(s) exceeds the memory budget of "
            f"{bench.memory_budget_gib:g} GiB"))
        log.info("%s: skipped (%s)", run.name, outcome["reason"])
        return [_record(base, design, run, outcome) for design in run.designs]
    spec_file, result_file, log_file = (scratch / f"{run.name}.{suffix}" for suffix in ("run.json", "json", "log"))
    spec_file.write_text(json.dumps(asdict(run)))
    port = free_port()
    command = [str(Path(sys.prefix) / "bin" / "deepspeed"), "--num_gpus", str(run.world), "--master_port",
               str(port), str(Path(__file__).resolve()), "--worker", str(spec_file), str(scratch),
               str(result_file)]
    if config_file:
        command += ["--config", config_file]
    command += overrides
    log.info("%s: %s, item table %d rows, %d rank(s), %s (estimate %.1f GiB)", run.name, " and ".join(run.designs),
             run.item_rows, run.world, run.sharding, estimate / GIB)
    outcome["load_average_1min_before"] = os.getloadavg()[0]
    started = time.perf_counter()
    code: int | str
    try:
        with open(log_file, "w") as output:
            try:
                with process_group(command, env=launch_env(), stdout=output, stderr=subprocess.STDOUT) as process:
                    code = process.wait(timeout=bench.run_timeout_s)
            except subprocess.TimeoutExpired:
                code = f"timed out after {bench.run_timeout_s:g} s"
    finally:
        remove_leftover_segments(port)
    outcome.update(launch_s=time.perf_counter() - started, load_average_1min_after=os.getloadavg()[0])
    if result_file.is_file():  # rank 0 writes it once every rank has reported its measurements
        if code != 0:
            # A rank that dies after the measurements, in its teardown (seen: gloo ranks ending in
            # "terminate called without an active exception"), leaves them valid; say so.
            outcome["teardown_error"] = f"exit {code} after the measurements: {_error_text(log_file)[0]}"
            log.warning("%s: %s", run.name, outcome["teardown_error"])
        records = [{**record, **outcome} for record in json.loads(result_file.read_text())]
        for record in records:
            log.info("%s, %s: %.0f ms/step (cpu %.0f), %.0f samples/s, peak RSS %s GiB, %.0f s", run.name,
                     record["design"], 1000 * record["median_step_s"], 1000 * record["median_step_cpu_s"],
                     record["samples_per_s"],
                     "/".join(f"{rank['peak_rss_bytes'] / GIB:.2f}" for rank in record["ranks"]),
                     outcome["launch_s"])
        return records
    summary, text = _error_text(log_file)
    outcome.update(status="failed", exit=code, error=text,
                   reason=code if isinstance(code, str) else summary or f"exit code {code}")
    log.warning("%s: failed: %s", run.name, outcome["reason"])
    return [_record(base, design, run, outcome) for design in run.designs]


def _record(base: dict, design: str, run: RunSpec, outcome: dict) -> dict:
    return {**base, "design": design, "sharding": run.sharding if design == "sharded" else "data_parallel",
            **outcome}


def _error_text(log_file: Path, lines: int = 30) -> tuple[str, str]:
    """A failed run's error in one line (the last exception, else the launcher's exit line), and
    the end of its log with its error lines first."""
    text = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    errors = [line for line in text if any(mark in line for mark in ("Error", "error:", "Killed", "killed",
                                                                      "Traceback", "exits with", "terminate"))]
    raised = [line for line in errors if "Error:" in line or "Error(" in line
              or "terminate called" in line]
    exits = [match.group(1) for line in errors if (match := re.search(r"exits with return code = (-?\d+)", line))]
    summary = raised[-1] if raised else f"a rank exited with return code {exits[-1]}" if exits else ""
    if summary.endswith("return code -9"):
        summary += " (SIGKILL: out of memory?)"
    return summary, "\n".join(dict.fromkeys(errors[-10:] + text[-lines:]))


def configurations(bench: EmbeddingsBenchConfig) -> list[RunSpec]:
    runs = [RunSpec(f"sharded-{rows}-w{world}", ["sharded"], rows, world, bench.sharding, bench.steps,
                    bench.warmup_steps, "sweep") for rows in bench.item_rows for world in bench.worlds]
    if bench.dense_baseline:
        runs += [RunSpec(f"dense-{rows}-w{world}", ["dense"], rows, world, bench.sharding, bench.dense_steps,
                         bench.dense_warmup_steps, "sweep") for rows in bench.item_rows for world in bench.worlds]
    if bench.default_table_check:
        # Both designs in one launch, on the same batches, alternately, so machine load hits them alike.
        rows = FeatureSpec().buckets["item_id"]
        runs.append(RunSpec(f"default-{rows}-w1", ["sharded", "dense"], rows, 1, bench.sharding, bench.steps,
                            bench.warmup_steps, "default_table"))
    if bench.large_rows:
        runs.append(RunSpec(f"large-{bench.large_rows}-w{bench.large_world}", ["sharded"], bench.large_rows,
                            bench.large_world, bench.large_sharding, bench.large_steps, bench.warmup_steps,
                            "large"))
    return runs


# --- the summary --------------------------------------------------------------------------------

def _sum_category(rank: dict, category: str, off_rank: bool = False) -> float:
    total = sum(value for key, value in rank["collective_bytes_per_step"].items()
                if key.startswith(category + "."))
    if off_rank:
        total -= sum(value for key, value in rank["collective_bytes_to_self_per_step"].items()
                     if key.startswith(category + "."))
    return total


def figures(record: dict) -> dict:
    """The per-configuration numbers of the table (all ranks summed where it says so)."""
    ranks = record["ranks"]
    ids = sum(rank["ids_looked_up_per_step"] for rank in ranks)
    tables = sum(_sum_category(rank, "tables") for rank in ranks)
    return {
        "step_ms": 1000 * record["median_step_s"], "step_cpu_ms": 1000 * record["median_step_cpu_s"],
        "samples_per_s": record["samples_per_s"],
        "peak_rss_gib_per_rank": [rank["peak_rss_bytes"] / GIB for rank in ranks],
        "peak_rss_over_table_bytes_per_rank": [rank["peak_rss_bytes"] / max(rank["table_bytes"]["total"], 1)
                                               for rank in ranks],
        "table_bytes_per_rank": [rank["table_bytes"]["total"] for rank in ranks],
        "ids_looked_up_per_step": ids,
        "tables_bytes_per_step": tables,
        "tables_off_rank_bytes_per_step": sum(_sum_category(rank, "tables", off_rank=True) for rank in ranks),
        "dense_bytes_per_step": sum(_sum_category(rank, "dense") for rank in ranks),
        "dense_bytes_per_step_per_rank": [_sum_category(rank, "dense") for rank in ranks],
        "tables_bytes_per_id": tables / ids if ids else None,
        "tables_off_rank_bytes_per_id": (sum(_sum_category(rank, "tables", off_rank=True) for rank in ranks) / ids
                                         if ids else None),
    }


def targets(bench: EmbeddingsBenchConfig, runs: list[dict]) -> dict:
    ok = {(run["design"], run["item_rows"], run["world"], run["group"]): run for run in runs
          if run["status"] == "ok"}
    checks: dict[str, Any] = {}
    smallest, largest = min(bench.item_rows), max(bench.item_rows)
    small, big = ok.get(("sharded", smallest, 1, "sweep")), ok.get(("sharded", largest, 1, "sweep"))
    ratio = big["median_step_s"] / small["median_step_s"] if small and big else None
    checks["step_time_flat"] = {
        "what": f"sharded step time, 1 rank: {largest} rows / {smallest} rows <= {bench.max_step_ratio}",
        "ratio": ratio, "met": ratio is not None and ratio <= bench.max_step_ratio,
        "cpu_time_ratio": big["median_step_cpu_s"] / small["median_step_cpu_s"] if small and big else None}
    large = next((run for run in runs if run["group"] == "large"), None)
    if large is not None:
        check: dict[str, Any] = {"what": f"{large['item_rows']} rows on {large['world']} ranks "
                                         f"({large['sharding']}) trains to the end",
                                 "sharding": large["sharding"], "met": large["status"] == "ok"}
        if large["status"] == "ok":
            per_rank = [rank["table_bytes"]["total"] for rank in large["ranks"]]
            check.update(table_bytes_per_rank=per_rank, table_bytes_total=sum(per_rank),
                         table_bytes_total_over_ranks=sum(per_rank) / len(per_rank),
                         largest_rank_share=max(per_rank) / sum(per_rank),
                         peak_rss_gib_per_rank=[rank["peak_rss_bytes"] / GIB for rank in large["ranks"]],
                         steps=large["steps"] + large["warmup_steps"])
        else:
            check["error"] = large.get("reason") or large.get("error")
        checks["large_table_completes"] = check
    proportional = {}
    for world in bench.worlds:
        per_id = {run_rows: figures(ok[("sharded", run_rows, world, "sweep")])["tables_bytes_per_id"]
                  for run_rows in bench.item_rows if ("sharded", run_rows, world, "sweep") in ok}
        values = [value for value in per_id.values() if value is not None]
        if len(values) < 2:
            spread = None
        elif max(values) == 0:
            spread = 0.0  # one rank: TorchRec sends nothing, whatever the table's size
        else:
            spread = max(values) / min(values) - 1 if min(values) > 0 else float("inf")
        proportional[str(world)] = {"bytes_per_id": per_id, "spread": spread,
                                    "met": spread is not None and spread <= bench.bytes_per_id_tolerance}
    checks["tables_bytes_proportional_to_ids"] = {
        "what": f"sharded tables' collective bytes per looked-up id vary <= {bench.bytes_per_id_tolerance:.0%} "
                "over item-table sizes", "per_world": proportional,
        "met": all(entry["met"] for entry in proportional.values())}
    rows = FeatureSpec().buckets["item_id"]
    sharded, dense = ok.get(("sharded", rows, 1, "default_table")), ok.get(("dense", rows, 1, "default_table"))
    ratio = sharded["samples_per_s"] / dense["samples_per_s"] if sharded and dense else None
    checks["default_table_speedup"] = {
        "what": f"{rows} rows, 1 rank: sharded / dense samples/s >= {bench.min_samples_ratio} "
                "(trained alternately in one launch)",
        "ratio": ratio, "met": ratio is not None and ratio >= bench.min_samples_ratio,
        "cpu_time_ratio": dense["median_step_cpu_s"] / sharded["median_step_cpu_s"] if sharded and dense else None}
    return checks


def label(run: dict) -> str:
    return f"{run['name']}-{run['design']}" if run["group"] == "default_table" else run["name"]


def table_lines(runs: list[dict]) -> list[str]:
    header = (f"{'configuration':<26} {'step ms':>8} {'cpu ms':>7} {'samples/s':>9} {'peak RSS GiB':>13} "
              f"{'table MB/rank':>17} {'tables MB/step':>14} {'off-rank':>9} {'B/id':>7} {'dense MB/step':>13}")
    lines = [header]
    for run in runs:
        if run["status"] != "ok":
            why = (run.get("reason") or run.get("error") or "").splitlines()
            lines.append(f"{label(run):<26} {run['status']}: {why[-1] if why else ''}")
            continue
        f = figures(run)
        rss = "/".join(f"{value:.2f}" for value in f["peak_rss_gib_per_rank"])
        table = "/".join(f"{value / 1e6:.0f}" for value in f["table_bytes_per_rank"])
        per_id = f"{f['tables_bytes_per_id']:.0f}" if f["tables_bytes_per_id"] is not None else "-"
        lines.append(f"{label(run):<26} {f['step_ms']:>8.0f} {f['step_cpu_ms']:>7.0f} {f['samples_per_s']:>9.0f} "
                     f"{rss:>13} {table:>17} {f['tables_bytes_per_step'] / 1e6:>14.2f} "
                     f"{f['tables_off_rank_bytes_per_step'] / 1e6:>9.2f} "
                     f"{per_id:>7} {f['dense_bytes_per_step'] / 1e6:>13.1f}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/embeddings.py", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("RUN", "SCRATCH", "RESULT"), help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    bench = config_from_args(EmbeddingsBenchConfig, args)
    if args.worker:
        run = RunSpec(**json.loads(Path(args.worker[0]).read_text()))
        worker(bench, run, Path(args.worker[1]), Path(args.worker[2]))
        return 0
    # TorchRec's import already gave the root logger a WARNING-level handler, so configure_logging's
    # basicConfig alone would change nothing.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, datefmt=DATE_FORMAT, force=True)
    configure_logging()
    dim = load_config(TrainConfig, overrides=["features=.", "run=.", *bench.train_overrides]).model.d_model
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs = []
    with tempfile.TemporaryDirectory(prefix="sirenfeed-embeddings-") as scratch:
        for run in configurations(bench):
            runs += run_configuration(bench, run, args.config, list(args.overrides), Path(scratch), dim)
    for run in runs:
        if run["status"] == "ok":
            run["figures"] = figures(run)
    plans = {f"{run['item_rows']} rows, {run['world']} rank(s), {run['sharding']}": run["plan"]
             for run in runs if run["status"] == "ok" and run["design"] == "sharded"}
    summary = {
        "config": to_dict(bench),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "load_average_before": list(load_before), "load_average_after": list(os.getloadavg())},
        "wall_s": time.perf_counter() - started, "runs": runs, "plans": plans, "targets": targets(bench, runs)}
    out = Path(bench.out) if bench.out else RESULTS
    write_json(out, summary)
    print("\n".join(table_lines(runs)))
    for name, check in summary["targets"].items():
        ratio = check.get("ratio")
        print(f"{name}: {'met' if check['met'] else 'NOT met'}"
              f"{f' (ratio {ratio:.2f})' if isinstance(ratio, float) else ''} - {check['what']}")
    print(f"wall {summary['wall_s']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
