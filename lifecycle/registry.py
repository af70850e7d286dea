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
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common.files import json_safe, point_symlink, staged_directory, write_json
from trainer.export import LATEST, export_problem, verify_export

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


def _valid(path: Path) -> bool:
    problem = export_problem(path)
    if problem is not None:
        log.warning("skipping published model %s: %s", path, problem)
    return problem is None


def current(registry: str | Path) -> Path | None:
    """The served model: ``latest`` if it verifies, else the newest published one that does."""
    root = Path(registry)
    link = root / LATEST
    if link.is_symlink() and _valid(link.resolve()):
        return link.resolve()
    for path in reversed(published(root)):
        if _valid(path):
            log.warning("falling back to the previous good published model %s", path.name)
            point_symlink(root / LATEST, path.name)
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
        with staged_directory(target) as staging:  # a broken leftover of the same name is replaced whole
            shutil.copytree(Path(export_dir).resolve(), staging, dirs_exist_ok=True)
            write_json(staging / TRAINED_FILE, {**trained, "published_at": time.time()})
            verify_export(staging)
    point_symlink(root / LATEST, name)
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
    text = path.read_text() if path.is_file() else ""
    for line in text.splitlines():
        try:
            if json.loads(line).get("cycle") == record["cycle"]:
                return False
        except json.JSONDecodeError:
            continue
    with path.open("a") as stream:
        # A torn last line (a crash mid-write) is ended first, or it would swallow this record.
        torn = "\n" if text and not text.endswith("\n") else ""
        stream.write(torn + json.dumps(json_safe(record), sort_keys=True) + "\n")
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


