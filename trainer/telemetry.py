"""Operator telemetry: Prometheus gauges the trainer's rank 0 updates and serves over HTTP.

Every :class:`TrainerTelemetry` owns its own ``CollectorRegistry`` (never the process-global one),
so several trainers or tests in one process never collide on metric names. Exposed series:

- ``sirenfeed_trainer_step``: last optimizer step
- ``sirenfeed_trainer_loss``: training loss of the last step
- ``sirenfeed_trainer_samples_per_second``: training rows (windows) per second
- ``sirenfeed_trainer_tokens_per_second``: label-bearing tokens per second
- ``sirenfeed_trainer_data_wait_fraction``: share of step time spent waiting for input, in [0, 1]
- ``sirenfeed_trainer_siren_lambda``: the learned SIREN-RoPE gate λ (NaN for variants without one)
- ``sirenfeed_trainer_eval_ne{task}``, ``sirenfeed_trainer_eval_auc{task}``: NE and AUC of the last
  evaluation, one series per task of the run's event schema (NaN before the first)
- ``sirenfeed_trainer_last_checkpoint_timestamp_seconds``: unix time of the last checkpoint (0: none)
- ``sirenfeed_trainer_last_checkpoint_step``: step of the last checkpoint
"""

from __future__ import annotations

import logging
import math
import time
from typing import Mapping, Sequence

from prometheus_client import CollectorRegistry, Gauge

from common.metrics import start_metrics_server

logger = logging.getLogger(__name__)

PREFIX = "sirenfeed_trainer"


class TrainerTelemetry:
    """The trainer's gauges in a dedicated registry, optionally served on ``host:port``."""

    def __init__(self, tasks: Sequence[str], port: int = 0, host: str = "127.0.0.1"):
        self.registry = CollectorRegistry()

        def gauge(name: str, text: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", text, labelnames=labels, registry=self.registry)

        self.step = gauge("step", "Last optimizer step.")
        self.loss = gauge("loss", "Training loss of the last step.")
        self.samples_per_second = gauge("samples_per_second", "Training rows per second.")
        self.tokens_per_second = gauge("tokens_per_second", "Label-bearing tokens per second.")
        self.data_wait_fraction = gauge("data_wait_fraction", "Share of step time spent waiting for input.")
        self.siren_lambda = gauge("siren_lambda", "Learned SIREN-RoPE gate lambda.")
        self.eval_ne = gauge("eval_ne", "Normalized entropy of the last evaluation.", ("task",))
        self.eval_auc = gauge("eval_auc", "ROC AUC of the last evaluation.", ("task",))
        self.last_checkpoint_time = gauge("last_checkpoint_timestamp_seconds",
                                          "Unix time of the last checkpoint.")
        self.last_checkpoint_step = gauge("last_checkpoint_step", "Step of the last checkpoint.")

        # NaN, not 0, until known: a dashboard must not read "NE 0" before the first evaluation.
        self.siren_lambda.set(math.nan)
        for task in tasks:
            self.eval_ne.labels(task=task).set(math.nan)
            self.eval_auc.labels(task=task).set(math.nan)
        self.server = start_metrics_server(port, host, registry=self.registry)

    def on_step(self, step: int, loss: float, samples_per_s: float, tokens_per_s: float,
                data_wait: float, lam: float | None) -> None:
        """Record one training step; ``lam`` is None for model variants without a λ gate."""
        self.step.set(step)
        self.loss.set(loss)
        self.samples_per_second.set(samples_per_s)
        self.tokens_per_second.set(tokens_per_s)
        self.data_wait_fraction.set(data_wait)
        self.siren_lambda.set(math.nan if lam is None else lam)

    def on_eval(self, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """Record an evaluation: task → metrics, as ``EvalAccumulator.compute`` returns them."""
        for task, values in metrics.items():
            self.eval_ne.labels(task=task).set(values["ne"])
            self.eval_auc.labels(task=task).set(values["auc"])

    def on_checkpoint(self, step: int) -> None:
        self.last_checkpoint_time.set(time.time())
        self.last_checkpoint_step.set(step)

    def close(self) -> None:
        """Stop serving (if serving); the gauges stay readable through :attr:`registry`."""
        if self.server is not None:
            self.server.close()
            self.server = None
