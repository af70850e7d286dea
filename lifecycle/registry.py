"""Atomic publishing of gated exports, the publish log and the freshness gauge.

A *registry* directory holds the published models::

    REGISTRY/<name>/        a verified copy of a run's export (trainer.export) plus _TRAINED.json:
                            the data watermark and the max event time the model was trained on,
                            and when it was published (``published_at``)
    REGISTRY/latest         relative symlink to the served one, swapped atomically
    REGISTRY/publish.jsonl  one line per gate decision: both metric sets, the decision, freshness

:func:`publish` copies under a hidden name, verifies the checksums, renames into place, then moves
``latest`` and keeps the newest ``keep`` models (never the served one). :func:`current` resolves
``latest`` and verifies it; a corrupt or incomplete one is skipped for the previous good model,
and ``latest`` is pointed back at it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from features.dataset import atomic_write_text, json_safe
from trainer.export import LATEST, ExportError, verify_export

log = logging.getLogger(__name__)

TRAINED_FILE = "_TRAINED.json"
PUBLISH_LOG = "publish.jsonl"


def published(registry: str | Path) -> list[Path]:
    """Published model directories, oldest first."""
    root = Path(registry)
    if not root.is_dir():
        return []
    return sorted(path for path in root.iterdir()
                  if path.is_dir() and not path.is_symlink() and not path.name.startswith((".", "_")))


def _point_latest(root: Path, name: str) -> None:
    temporary = root / f".{LATEST}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    os.symlink(name, temporary)
    os.replace(temporary, root / LATEST)


def _valid(path: Path) -> bool:
    try:
        verify_export(path)
    except ExportError as error:
        log.warning("skipping published model %s: %s", path, error)
        return False
    return True


def current(registry: str | Path) -> Path | None:
    """The served model: ``latest`` if it verifies, else the newest published one that does."""
    root = Path(registry)
    link = root / LATEST
    if link.is_symlink() and _valid(link.resolve()):
        return link.resolve()
    for path in reversed(published(root)):
        if _valid(path):
            log.warning("falling back to the previous good published model %s", path.name)
            _point_latest(root, path.name)
            return path
    return None


def publish(export_dir: str | Path, registry: str | Path, name: str, trained: dict[str, Any],
            keep: int) -> Path:
    """Publish a verified copy of ``export_dir`` as ``REGISTRY/name`` and serve it (idempotent)."""
    root = Path(registry)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not (target.is_dir() and _valid(target)):
        verify_export(export_dir)
        staging = root / f".{name}.{uuid.uuid4().hex[:8]}"
        shutil.copytree(Path(export_dir).resolve(), staging)
        record = {**trained, "published_at": time.time()}
        atomic_write_text(staging / TRAINED_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
        verify_export(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    _point_latest(root, name)
    for path in published(root)[:-keep]:
        if path != target:
            shutil.rmtree(path)
    log.info("published %s (latest -> %s)", target, name)
    return target


def trained_record(path: str | Path) -> dict[str, Any]:
    file = Path(path) / TRAINED_FILE
    return json.loads(file.read_text()) if file.is_file() else {}


def append_log(registry: str | Path, record: dict[str, Any]) -> bool:
    """Append one decision to the publish log unless a line for its ``cycle`` is there already
    (a re-run after a crash); returns whether it appended. A torn last line is ignored."""
    path = Path(registry) / PUBLISH_LOG
    path.parent.mkdir(parents=True, exist_ok=True)
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            if json.loads(line).get("cycle") == record["cycle"]:
                return False
        except json.JSONDecodeError:
            continue
    with path.open("a") as stream:
        stream.write(json.dumps(json_safe(record), sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    return True


def read_log(registry: str | Path) -> list[dict[str, Any]]:
    path = Path(registry) / PUBLISH_LOG
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records



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
