"""Typed configuration of the Spark feature job (``conf/features.yaml`` is generated from it).

Loaded by both ``sirenfeed features`` (before it calls ``spark-submit``) and the job itself (before it
starts Spark), so an unknown key or a nonsensical value fails before any JVM starts, naming the key.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field

from omegaconf import MISSING

from common.config import add_config_arguments, config_from_args, require
from features.schema import ContractConfig
from features.spec import FeatureSpec

LOG_LEVELS = ("ALL", "TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL", "OFF")
_MEMORY = re.compile(r"^[1-9][0-9]*[kmgt]?$", re.IGNORECASE)


@dataclass
class SparkConfig:
    master: str = "local[*]"
    """Used by ``sirenfeed features`` (and by a job started without ``spark-submit``); a job started by
    ``spark-submit --master ...`` keeps the master it was given."""
    driver_memory: str = "2g"
    shuffle_partitions: int = 4
    """Few on one machine: every shuffle partition is a task with a fixed overhead."""
    log_level: str = "WARN"
    """Spark's own log level (``spark.log.level``); the job's progress is logged by Python."""
    conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings, e.g. ``{"spark.executor.memory": "8g"}``; they replace the job's own
    (:func:`features.spark.session_settings`), e.g. its JIT options in ``spark.*.extraJavaOptions``."""

    def __post_init__(self) -> None:
        require(bool(self.master.strip()), "spark.master", "must not be empty")
        require(bool(_MEMORY.match(self.driver_memory)), "spark.driver_memory",
                f"must look like 512m or 4g, got {self.driver_memory!r}")
        require(self.shuffle_partitions >= 1, "spark.shuffle_partitions", "must be >= 1")
        require(self.log_level.upper() in LOG_LEVELS, "spark.log_level",
                f"must be one of {', '.join(LOG_LEVELS)}")
        for key in self.conf:
            require(key.startswith("spark."), f"spark.conf.{key}", "Spark settings start with 'spark.'")


@dataclass
class IncrementalConfig:
    """``--incremental`` runs (:mod:`features.incremental`): append the raw files not read yet as a
    new batch of windows instead of replacing the dataset."""

    enabled: bool = False
    allowed_lateness_s: int = 86_400
    """An event up to this much older than the dataset's watermark is still added (and counted as
    late); an older one that was never seen is quarantined as ``too_late``. Event ids are remembered
    this long, so a re-delivered event inside the window is recognised and skipped."""
    holdout_s: int = 0
    """The newest ``holdout_s`` seconds of a batch go to ``eval`` (the freshest held-out slice),
    the rest to ``train``; 0 holds the whole batch out (it is trained on by the next cycle)."""

    def __post_init__(self) -> None:
        require(self.allowed_lateness_s >= 0, "incremental.allowed_lateness_s", "must be >= 0")
        require(self.holdout_s >= 0, "incremental.holdout_s", "must be >= 0 (0 = the whole batch)")


@dataclass
class FeaturesConfig:
    raw: str = MISSING
    """Raw events: a synthetic log (``date=YYYY-MM-DD/``) or the ingest landing zone
    (``date=YYYY-MM-DD/hour=HH/``); any URI Spark can read."""
    out: str = MISSING
    """The feature dataset directory, replaced as a whole when the job succeeds."""
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    contract: ContractConfig = field(default_factory=ContractConfig)
    """Limits every event must respect (:class:`features.schema.ContractConfig`); events breaking
    them are quarantined."""
    eval_days: int = 1
    """The last ``eval_days`` UTC days of the data are the held-out evaluation window."""
    train_files: int = 8
    """Parquet files of the train split: range partitions by (date, user), so a few more where a
    partition spans a date boundary. The trainer shards by row group, so every rank needs some."""
    eval_files: int = 4
    spark: SparkConfig = field(default_factory=SparkConfig)
    incremental: IncrementalConfig = field(default_factory=IncrementalConfig)

    def __post_init__(self) -> None:
        require(bool(self.raw.strip()), "raw", "must not be empty")
        require(bool(self.out.strip()), "out", "must not be empty")
        raw, out = self.raw.rstrip("/") + "/", self.out.rstrip("/") + "/"
        require(not raw.startswith(out) and not out.startswith(raw), "out",
                "must be neither raw, nor inside it, nor contain it")
        require(self.eval_days >= 0, "eval_days", "must be >= 0 (0 = no eval split)")
        require(self.train_files >= 1, "train_files", "must be >= 1")
        require(self.eval_files >= 1, "eval_files", "must be >= 1")


def parse_job_arguments(prog: str, description: str, argv: list[str]) -> FeaturesConfig:
    """The command line shared by the job file (any master) and ``sirenfeed features`` (its local
    wrapper): ``--raw``, ``--out``, ``--incremental``, ``--config FILE``, ``--print-config`` and
    ``key=value`` overrides. Raises :class:`common.config.ConfigError` naming the key, and
    ``SystemExit(0)`` once ``--print-config`` has printed the configuration."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--raw", help="raw events directory (config key raw)")
    parser.add_argument("--out", help="feature dataset directory (config key out)")
    parser.add_argument("--incremental", action="store_true", default=None,
                        help="append the raw files not read yet as a new batch (incremental.enabled)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return config_from_args(FeaturesConfig, args, raw=args.raw, out=args.out,
                            incremental=None if args.incremental is None else {"enabled": args.incremental})
