"""The batch catalogue of a feature dataset (no Spark): every incremental run appends one batch, and
a dataset written by the full job alone is batch 0.

A batch entry names the data files the batch added per split (``files``, relative to the dataset),
its watermark and newest event time; warm starts select batches by index
(:mod:`lifecycle.view`), the incremental job (:mod:`features.incremental`) writes them.
"""

from __future__ import annotations

import re
from typing import Any

BATCH_NAME = re.compile(r"b(\d{6})")


def batch_name(index: int) -> str:
    return f"b{index:06d}"


def first_batch(manifest: dict[str, Any], files: dict[str, list[str]]) -> dict[str, Any]:
    """Batch 0: the full run's output, i.e. every data file (``files``, per split) the dataset holds
    before its first append."""
    return {"index": 0, "name": batch_name(0), "created_at": manifest.get("created_at"),
            "input_files": manifest.get("input_files", []), "events": manifest.get("events"),
            "late": 0, "too_late": 0, "duplicates": manifest.get("duplicates"),
            "watermark_ms": manifest["watermark_ms"], "max_event_ms": manifest["watermark_ms"],
            "split_ts_ms": manifest.get("split_ts_ms"), "splits": manifest.get("splits"), "files": files}
