"""The retraining configuration (``conf/retrain.yaml``): the schema of ``sirenfeed retrain`` and
``sirenfeed train --continuous``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from common.config import require
from features.settings import FeaturesConfig
from lifecycle.gate import GateConfig

CONTINUAL_TRAIN_OVERRIDES = ("schedule.kind=constant", "optim.lr=0.0001", "train.checkpoint_every=0")
"""On top of ``train_config`` for every warm-start segment by default: a constant learning rate well
below a batch run's peak (``optim.lr`` 1e-3 in conf/train.yaml), which would undo what it learned."""


@dataclass
class DrainConfig:
    enabled: bool = False
    config: str = ""
    """The ingest YAML (``conf/ingest.yaml``); its ``landing.dir`` must be ``features.raw``."""
    overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the ingest config."""
    idle_s: float = 5.0
    """Stop draining once no message arrived for this long."""

    def __post_init__(self) -> None:
        require(self.idle_s > 0, "drain.idle_s", "must be > 0")


@dataclass
class ContinuousConfig:
    """``sirenfeed train --continuous``: when a cycle starts (see :func:`run_continuous`)."""
    poll_s: float = 30.0
    """How often to look for raw files the feature dataset has not read yet."""
    every_s: float = 300.0
    """M: start a cycle once new raw files have waited this long (0: as soon as they land)."""
    every_events: int = 0
    """N: start one at once when this many new events wait, however recent (0: by time only).
    A segment trains on about ``every_events × context_len / stride / data.batch_size`` steps."""
    resident: bool = True
    """Keep one Spark application and one ``deepspeed`` launch up for all cycles
    (:mod:`lifecycle.resident`) instead of submitting the feature job and launching the ranks for
    every cycle (false: each cycle starts them afresh, as ``sirenfeed retrain`` does)."""

    def __post_init__(self) -> None:
        require(self.poll_s > 0, "continuous.poll_s", "must be > 0")
        require(self.every_s >= 0, "continuous.every_s", "must be >= 0")
        require(self.every_events >= 0, "continuous.every_events", "must be >= 0")


@dataclass
class PublishConfig:
    """How a published model is stored in ``registry/`` (:func:`lifecycle.registry.publish`)."""
    full_every: int = 4
    """Every `full_every`-th publish is a full copy of the model; the others are deltas on the model
    served before them: the dense weights and only the id-table rows that changed. A model is then
    read from at most `full_every` directories, and up to `full_every - 1` more are kept beside the
    newest `keep_published`, as the kept ones' ancestors. 1: always a full copy."""

    def __post_init__(self) -> None:
        require(self.full_every >= 1, "publish.full_every", "must be >= 1")


@dataclass
class RetrainConfig:
    dir: str = MISSING
    """Retraining state: lock, cycles/ journals and candidate runs, lineage.json, registry/."""
    initial_run: str = MISSING
    """Run directory of the batch training the lineage starts from (its newest checkpoint)."""
    features: FeaturesConfig = MISSING
    """The feature job (``raw``: the landing zone or raw log; ``out``: the dataset the initial run
    was trained on); ``incremental.enabled`` is forced on."""
    spark_submit: bool = True
    """Run the feature job through ``spark-submit`` (false: in this process)."""
    train_config: str = "conf/train.yaml"
    """The training config every warm-start segment starts from."""
    train_overrides: list[str] = field(default_factory=lambda: list(CONTINUAL_TRAIN_OVERRIDES))
    """``key=value`` overrides on top of ``train_config`` for every warm-start segment. The default
    is continual training: the warmup was done by the batch run, so a constant learning rate, well
    below the batch run's peak (``optim.lr`` 1e-3), which would undo what it learned."""
    nproc: int = 2
    """Ranks of the deepspeed launcher."""
    gate: GateConfig = field(default_factory=GateConfig)
    """When a candidate is published (:mod:`lifecycle.gate`): the paired per-event log-loss
    difference against the published model, with an interval over users."""
    keep_published: int = 3
    """Published models kept in ``registry/`` (the latest is never removed)."""
    publish: PublishConfig = field(default_factory=PublishConfig)
    drain: DrainConfig = field(default_factory=DrainConfig)
    """Optional: consume Kafka into ``features.raw`` before each cycle."""
    telemetry_port: int = 0
    """With ``--every`` or ``--continuous``: serve the freshness gauges on this port (0 = off)."""
    telemetry_host: str = "127.0.0.1"
    """Address the gauges are served on (``0.0.0.0`` for a Prometheus on another machine)."""
    metrics_textfile: str = ""
    """After every cycle the freshness gauges are written here in the Prometheus text format (for
    node_exporter's textfile collector); "" = ``DIR/sirenfeed_retrain.prom``."""
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)

    def __post_init__(self) -> None:
        require(bool(self.dir.strip()), "dir", "must not be empty")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(self.keep_published >= 1, "keep_published", "must be >= 1")
        require(0 <= self.telemetry_port <= 65535, "telemetry_port", "must be in [0, 65535]")
        # The gate compares the tasks of the features' schema: a misnamed one fails before any cycle.
        self.gate.tolerances(self.features.spec.event_schema)
        self.features.incremental.enabled = True
