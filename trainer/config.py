"""``TrainConfig``: the typed configuration of a training run, and the DeepSpeed config made from it.

Loaded like every command's config (``common.config.load_config``): defaults here, then
``conf/train.yaml`` (or ``--config FILE``), then ``key=value`` overrides. :func:`deepspeed_config`
is the one place that turns it into DeepSpeed's JSON dict, so DeepSpeed never sees a setting that
is not in this schema.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from common.config import require
from trainer.model import ModelConfig

SCHEDULES = ("cosine", "constant")
PRECISIONS = ("fp32", "bf16")
COMM_BACKENDS = ("auto", "gloo", "nccl", "ccl", "mpi")
FAULTS = ("none", "kill", "raise", "hang")
EMBEDDING_SHARDINGS = ("auto", "table_wise", "column_wise", "row_wise", "data_parallel")
EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
"""FBGEMM's CPU kernels implement these; Adam runs on GPU ranks only."""


@dataclass
class DataConfig:
    batch_size: int = 256
    """Rows per optimizer step over all ranks (the global batch); each rank's micro batch is
    ``batch_size / ranks``, so the same config trains the same way on any number of ranks."""
    shards: int = 0
    """Logical input shards; the sample order depends on them, never on the world size. Every world
    size that trains or resumes the run must divide it, and it must divide ``batch_size``.
    0 = the world size of the run that starts at step 0 (a resume keeps the checkpoint's); see
    docs/multinode.md."""
    eval_batch_size: int = 1024
    shuffle_buffer: int = 4096
    """Rows mixed by each shard's seeded shuffle buffer (0 = row-group order only)."""
    seed: int = 0
    """Seeds the row-group order of every epoch and the shuffle buffers."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "data.batch_size", "must be >= 1")
        require(self.shards >= 0, "data.shards", "must be >= 0 (0 = the world size)")
        require(self.shards == 0 or self.batch_size % self.shards == 0, "data.shards",
                f"must divide data.batch_size ({self.batch_size})")
        require(self.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
        require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")


@dataclass
class OptimConfig:
    """AdamW; ω, λ, biases, norms and embeddings get no weight decay (``model.parameter_groups``)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 = off)."""

    def __post_init__(self) -> None:
        require(self.lr > 0, "optim.lr", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "optim.betas",
                "must be two numbers in [0, 1)")
        require(self.eps > 0, "optim.eps", "must be > 0")
        require(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        require(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)")


@dataclass
class ScheduleConfig:
    kind: str = "cosine"
    """``cosine``: linear warmup, then cosine decay to ``min_lr`` at the last step; ``constant``:
    linear warmup, then ``optim.lr``."""
    warmup_steps: int = 100
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        require(self.kind in SCHEDULES, "schedule.kind", f"must be one of {', '.join(SCHEDULES)}")
        require(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        require(self.min_lr >= 0, "schedule.min_lr", "must be >= 0")


@dataclass
class LoopConfig:
    steps: int = 0
    """Optimizer steps every rank runs; 0 = derive from ``epochs``: ``epochs × ceil(train rows /
    data.batch_size)``."""
    epochs: float = 1.0
    """Passes over the training rows when ``steps`` is 0."""
    log_every: int = 50
    eval_every: int = 0
    """Evaluate every N steps (0 = at the end only; the end always evaluates)."""
    checkpoint_every: int = 1000
    """Checkpoint every N steps (0 = at the end only; the end always checkpoints)."""
    keep_checkpoints: int = 3
    resume: bool = False
    """Continue from the newest complete checkpoint in ``run/checkpoints`` (fails if none)."""

    def __post_init__(self) -> None:
        require(self.steps >= 0, "train.steps", "must be >= 0 (0 = use train.epochs)")
        require(self.steps > 0 or self.epochs > 0, "train.epochs", "must be > 0 when train.steps is 0")
        require(self.log_every >= 1, "train.log_every", "must be >= 1")
        require(self.eval_every >= 0, "train.eval_every", "must be >= 0")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
        require(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")


@dataclass
class EmbeddingsConfig:
    """The id tables (``embeddings.*`` in the training config): where they live and how they learn."""

    sharding: str = "auto"
    """auto (TorchRec's planner decides) | table_wise | column_wise | row_wise | data_parallel
    (dense ``nn.Embedding`` tables replicated in the DeepSpeed model, trained by its AdamW)."""
    optimizer: str = "rowwise_adagrad"
    """Fused into backward: rowwise_adagrad (one accumulator per row) | adagrad | sgd | adam (GPU only)."""
    lr: float = 0.003
    """The tables' learning rate, constant (the dense part follows ``optim.lr`` and ``schedule``).
    Row-wise Adagrad's first step moves a row by about ``lr`` per element (the initial rows are
    N(0, 0.02²)); 0.003 matched the dense design's AdamW on the demo's data, 0.05 overfit."""
    eps: float = 1e-8
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adam only."""
    column_shard_dim: int = 0
    """column_wise: the width of a column shard (0 = d_model / ranks)."""

    def __post_init__(self) -> None:
        require(self.sharding in EMBEDDING_SHARDINGS, "embeddings.sharding",
                f"must be one of {', '.join(EMBEDDING_SHARDINGS)}")
        require(self.optimizer in EMBEDDING_OPTIMIZERS, "embeddings.optimizer",
                f"must be one of {', '.join(EMBEDDING_OPTIMIZERS)}")
        require(self.lr > 0, "embeddings.lr", "must be > 0")
        require(self.eps > 0, "embeddings.eps", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "embeddings.betas",
                "must be two numbers in [0, 1)")
        require(self.column_shard_dim >= 0, "embeddings.column_shard_dim",
                "must be >= 0 (0 = d_model / ranks)")

    @property
    def sharded(self) -> bool:
        return self.sharding != "data_parallel"


@dataclass
class DeepSpeedSettings:
    zero_stage: int = 0
    """ZeRO stage: 0, 1 or 2."""
    precision: str = "fp32"
    """``fp32`` | ``bf16``: bf16 on GPUs; on CPU ranks fp32 (bf16 there is an order of magnitude
    slower)."""
    torch_adam: bool = True
    """Use ``torch.optim.AdamW`` (no JIT-built op); ``false`` lets DeepSpeed pick its fused Adam."""
    comm_backend: str = "auto"
    """``auto`` = the accelerator's default: gloo on CPU, nccl on NVIDIA GPUs."""

    def __post_init__(self) -> None:
        require(self.zero_stage in (0, 1, 2), "deepspeed.zero_stage", "must be 0, 1 or 2")
        require(self.precision in PRECISIONS, "deepspeed.precision",
                f"must be one of {', '.join(PRECISIONS)}")
        require(self.comm_backend in COMM_BACKENDS, "deepspeed.comm_backend",
                f"must be one of {', '.join(COMM_BACKENDS)}")


@dataclass
class DistributedConfig:
    """How ranks find each other's failures (``trainer.watchdog``)."""

    timeout_s: float = 600.0
    """Bound on every collective and on the rendezvous: a rank waiting longer fails, then all do."""
    heartbeat_timeout_s: float = 60.0
    """A rank silent this long is declared dead; every other rank then exits non-zero naming it."""
    trace: bool = False
    """Write RUN_DIR/trace/rank<R>.jsonl: per step, ids of the real rows this rank trained on (an
    epoch's padding rows left out) and a digest of its parameters after the step (to audit that
    every row is trained once per epoch, and replica agreement)."""
    fault: str = "none"
    """Fire drill: ``kill`` (SIGKILL), ``raise`` or ``hang`` rank ``fault_rank`` after step ``fault_step``."""
    fault_rank: int = 0
    fault_step: int = 1

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "distributed.timeout_s", "must be > 0")
        require(self.heartbeat_timeout_s > 0, "distributed.heartbeat_timeout_s", "must be > 0")
        require(self.fault in FAULTS, "distributed.fault", f"must be one of {', '.join(FAULTS)}")
        require(self.fault_rank >= 0, "distributed.fault_rank", "must be >= 0")
        require(self.fault_step >= 1, "distributed.fault_step", "must be >= 1")


@dataclass
class TelemetryConfig:
    port: int = 0
    """Prometheus metrics port on rank 0 (0 = off)."""
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "telemetry.port", "must be in [0, 65535] (0 = off)")


@dataclass
class TrainConfig:
    features: str = MISSING
    """Feature dataset directory (the Spark job's output, with ``train/`` and ``eval/``)."""
    run: str = MISSING
    """Run directory: checkpoints/, export/, metrics.json."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The ranker (:class:`trainer.model.ModelConfig`); the defaults are the paper's scale: 2 layers,
    d = 128, 4 heads, over windows of C = ``spec.context_len`` = 50 tokens of the features."""
    embeddings: EmbeddingsConfig = field(default_factory=EmbeddingsConfig)
    """The id tables (:mod:`trainer.embeddings`): sharded by TorchRec, or dense in the DeepSpeed model."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    seed: int = 0
    """Seeds model initialisation (every rank starts from the same weights)."""

    def __post_init__(self) -> None:
        require(self.schedule.min_lr <= self.optim.lr, "schedule.min_lr", "must be <= optim.lr")


def lr_factor(schedule: ScheduleConfig, lr: float, total_steps: int, step: int) -> float:
    """Multiplier of ``lr`` at ``step`` (0-based): linear warmup, then cosine or constant."""
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    if schedule.kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / decay_steps)
    floor = schedule.min_lr / lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(config: TrainConfig, world: int, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed's config dict for this run on ``world`` ranks (one micro batch per step, the global
    batch split evenly; ``load_universal`` to resume from a checkpoint's universal form)."""
    optim = config.optim
    require(config.data.batch_size % world == 0, "data.batch_size",
            f"the global batch of {config.data.batch_size} rows cannot be split over {world} ranks")
    return {
        "train_micro_batch_size_per_gpu": config.data.batch_size // world,
        "gradient_accumulation_steps": 1,
        "train_batch_size": config.data.batch_size,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": config.deepspeed.torch_adam}},
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": config.deepspeed.zero_stage},
        "checkpoint": {"load_universal": load_universal},
        "bf16": {"enabled": config.deepspeed.precision == "bf16"},
        "fp16": {"enabled": False},
        # Our own logger reports progress; DeepSpeed's per-step prints would drown it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
