"""Freshness telemetry of a retraining directory: how old the served model and its data are, and how
the last cycles went.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from common.metrics import start_metrics_server
from lifecycle.config import RetrainConfig
from lifecycle.cycle import LOCKED
from lifecycle.registry import read_log, trained_record
from trainer.export import LATEST

log = logging.getLogger(__name__)






class FreshnessTelemetry:
    """Gauges about the served model, computed at scrape time from the registry:

    - ``sirenfeed_published_max_event_timestamp_seconds``: newest event time the served model saw
    - ``sirenfeed_published_freshness_seconds``: now − that (the model's staleness)
    - ``sirenfeed_published_event_to_published_seconds``: that event's age when the model went live
    - ``sirenfeed_published_timestamp_seconds``: when the served model was published
    - ``sirenfeed_published_age_seconds``: now − that (how long publishing has not moved)
    - ``sirenfeed_retrain_consecutive_refusals``: gate refusals (a worse or broken candidate) since
      the last publish; a decision of insufficient evidence neither adds to it nor resets it
    - ``sirenfeed_retrain_published_unevaluable``: 1 if the last gate decision could not evaluate the
      served model (the candidate was published on its own health), else 0
    - ``sirenfeed_retrain_last_cycle_timestamp_seconds`` / ``sirenfeed_retrain_last_exit_code``

    Served by the long-running modes; :meth:`write_textfile` leaves them for node_exporter's
    textfile collector after a one-shot cycle (a file cannot recompute ``now − …`` at scrape
    time: dashboards and alerts use ``time() - sirenfeed_published_max_event_timestamp_seconds``
    and ``time() - sirenfeed_published_timestamp_seconds``).
    """

    def __init__(self, registry_dir: str | Path):
        self.registry = CollectorRegistry()
        self._dir = Path(registry_dir)
        max_event = Gauge("sirenfeed_published_max_event_timestamp_seconds",
                          "Newest event time the served model was trained on.", registry=self.registry)
        freshness = Gauge("sirenfeed_published_freshness_seconds",
                          "Now minus the newest event time the served model was trained on.",
                          registry=self.registry)
        latency = Gauge("sirenfeed_published_event_to_published_seconds",
                        "Age of the served model's newest event when the model was published.",
                        registry=self.registry)
        published_at = Gauge("sirenfeed_published_timestamp_seconds",
                             "Unix time the served model was published.", registry=self.registry)
        age = Gauge("sirenfeed_published_age_seconds", "Now minus the time the served model was published.",
                    registry=self.registry)
        refusals = Gauge("sirenfeed_retrain_consecutive_refusals",
                         "Gate refusals (worse or broken candidates) since the last publish.",
                         registry=self.registry)
        unevaluable = Gauge("sirenfeed_retrain_published_unevaluable",
                            "1 if the last gate decision could not evaluate the served model.",
                            registry=self.registry)
        max_event.set_function(self.max_event_seconds)
        freshness.set_function(lambda: time.time() - self.max_event_seconds())
        latency.set_function(self.event_to_published_seconds)
        published_at.set_function(self.published_seconds)
        age.set_function(lambda: time.time() - self.published_seconds())
        refusals.set_function(self.consecutive_refusals)
        unevaluable.set_function(self.published_unevaluable)
        self.last_cycle = Gauge("sirenfeed_retrain_last_cycle_timestamp_seconds",
                                "Unix time the last retraining cycle ended.", registry=self.registry)
        self.last_exit_code = Gauge("sirenfeed_retrain_last_exit_code",
                                    "Exit code of the last retraining cycle.", registry=self.registry)

    def _served_record(self) -> dict[str, Any]:
        link = self._dir / LATEST
        return trained_record(link.resolve()) if link.is_symlink() else {}

    def max_event_seconds(self) -> float:
        record = self._served_record()
        return record["max_event_ms"] / 1000 if record.get("max_event_ms") else math.nan

    def published_seconds(self) -> float:
        return float(self._served_record().get("published_at") or math.nan)

    def consecutive_refusals(self) -> int:
        count = 0
        for record in reversed(read_log(self._dir)):
            if record.get("published"):
                break
            # A record without an outcome is from a log that knew only publish and refuse.
            count += record.get("outcome", "refuse") == "refuse"
        return count

    def published_unevaluable(self) -> int:
        decisions = read_log(self._dir)
        return int(bool(decisions and decisions[-1].get("published_error")))

    def event_to_published_seconds(self) -> float:
        for record in reversed(read_log(self._dir)):
            if record.get("published") and record.get("event_to_published_s") is not None:
                return float(record["event_to_published_s"])
        return math.nan

    def on_cycle(self, exit_code: int) -> None:
        self.last_cycle.set(time.time())
        self.last_exit_code.set(exit_code)

    def write_textfile(self, path: str | Path) -> None:
        """Write the gauges in the Prometheus text format, atomically (temporary file + rename)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), self.registry)


class CycleTelemetry:
    """The freshness gauges of a retraining directory: served on ``telemetry_port`` by the
    long-running modes, and written to ``metrics_textfile`` after every cycle."""

    def __init__(self, config: RetrainConfig, serve: bool):
        self.gauges = FreshnessTelemetry(Path(config.dir) / "registry")
        self.textfile = Path(config.metrics_textfile or Path(config.dir) / "sirenfeed_retrain.prom")
        self.server = (start_metrics_server(config.telemetry_port, config.telemetry_host,
                                            registry=self.gauges.registry) if serve else None)

    def on_cycle(self, code: int) -> None:
        if code == LOCKED:  # the cycle holding the lock reports itself when it ends
            return
        self.gauges.on_cycle(code)
        try:
            self.gauges.write_textfile(self.textfile)
        except OSError as error:  # monitoring must not fail the cycle it reports on
            log.warning("could not write the metrics text file %s: %s", self.textfile, error)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
