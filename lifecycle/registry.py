"""Atomic publishing of gated exports, the publish log and the freshness gauge.

A *registry* directory holds the published models::

    REGISTRY/<name>/        a verified copy of a run's export (trainer.export), full or as a delta
                            on the model served before it, plus _TRAINED.json: the data watermark
                            and the max event time the model was trained on, when it was published
                            (``published_at``) and how it is stored (``publication``)
    REGISTRY/latest         relative symlink to the served one, swapped atomically
    REGISTRY/publish.jsonl  one line per gate decision: both metric sets, the decision, freshness

:func:`publish` writes under a hidden name, verifies the checksums, renames into place, then moves
``latest`` and keeps the newest ``keep`` models (never the served one), and every model a kept one's
chain of deltas needs. With ``full_every`` N > 1 a publish is a delta (:func:`trainer.export.write_delta`:
the dense weights and the table rows that changed) on the served model, unless there is none, its
chain already holds N - 1 deltas, or the state dict's keys or a table's shape differ; then it is a
full copy. So a model is read from at most N directories. :func:`current` resolves ``latest`` and
verifies it, chain included; a corrupt or incomplete one (or one whose ancestor is) is skipped for
the previous good model, and ``latest`` is pointed back at it.
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
from trainer.export import (
    DELTA_FILE, LATEST, MODEL_FILE, DeltaMismatch, ExportError, ancestry, export_problem, verify_export,
    write_delta,
)

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
            keep: int, *, full_every: int = 1) -> Path:
    """Publish a verified copy of the full export ``export_dir`` as ``REGISTRY/name`` and serve it
    (idempotent); a delta on the served model unless ``full_every`` says a full copy is due."""
    root = Path(registry)
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    if not (target.is_dir() and _valid(target)):
        source = Path(export_dir).resolve()
        if "delta" in verify_export(source):
            raise ExportError(f"{source} is a delta, readable only beside its ancestors: publish a full export")
        parent = current(root)
        with staged_directory(target) as staging:  # a broken leftover of the same name is replaced whole
            publication = _write_model(source, staging, parent, full_every)
            write_json(staging / TRAINED_FILE,
                       {**trained, "published_at": time.time(), "publication": publication})
            verify_export(staging)
        detail = (f"a delta on {publication['parent']} ({publication['chain_length']} from its full base)"
                  if publication["kind"] == "delta" else f"a full copy ({publication['reason']})")
        log.info("wrote %s as %s: %d bytes, %.1f%% of the full model", target, detail,
                 publication["bytes"], 100 * publication["bytes"] / publication["full_bytes"])
    point_symlink(root / LATEST, name)
    _prune(root, target, keep)
    log.info("published %s (latest -> %s)", target, name)
    return target


def _write_model(source: Path, staging: Path, parent: Path | None, full_every: int) -> dict[str, Any]:
    """Fill ``staging`` with ``source`` as a delta on ``parent`` or whole; what was written (the
    ``publication`` record of ``_TRAINED.json``)."""
    full_bytes = (source / MODEL_FILE).stat().st_size
    if parent is None:
        reason = "no served model to be a delta on"
    elif (deltas := len(ancestry(parent)) - 1) + 1 >= full_every:
        reason = f"full_every={full_every}: a full copy is due ({parent.name} is {deltas} deltas from its base)"
    else:
        try:
            changed = write_delta(source, parent, staging)
        except DeltaMismatch as error:
            reason = f"not a delta on {parent.name}: {error}"
        else:
            return {"kind": "delta", "parent": parent.name, "chain_length": deltas + 1, "changed_rows": changed,
                    "bytes": (staging / DELTA_FILE).stat().st_size, "full_bytes": full_bytes}
    shutil.copytree(source, staging, dirs_exist_ok=True)
    return {"kind": "full", "reason": reason, "parent": None, "chain_length": 0, "bytes": full_bytes,
            "full_bytes": full_bytes}


def _prune(root: Path, target: Path, keep: int) -> None:
    """Remove the models older than the newest ``keep`` (never ``target``, the served one) that no
    kept model's chain of deltas needs."""
    kept = {target, *published(root)[-keep:]}
    needed = {ancestor.name for model in kept for ancestor in ancestry(model)}
    for path in published(root):
        if path.name not in needed:
            shutil.rmtree(path)


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


