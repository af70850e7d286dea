"""A human summary of a feature dataset, read from its manifest (what ``sirenfeed features`` prints)."""

from __future__ import annotations

import os
from typing import Any

from common.logs import utc_text
from features.dataset import read_manifest
from features.schema import load_schema
from features.transforms import EVAL, TRAIN


def describe(path: str | os.PathLike[str]) -> str:
    """Rows, events and label tokens per split, task base rates, quarantine, duplicates, watermark,
    schema (with its fitted standardize statistics), context length and columns of the complete
    feature dataset at ``path``."""
    manifest = read_manifest(path)
    spec = manifest["spec"]
    schema = load_schema(spec["schema"])
    labels = schema.label_columns
    lines = [f"feature dataset {path}",
             f"  spec v{manifest['feature_spec_version']}: C={spec['context_len']} "
             f"stride={spec['stride']}, eval window from {utc_text(manifest['split_ts_ms'])}",
             f"  schema {schema.name} (fingerprint {manifest['schema_fingerprint']}), tasks {', '.join(labels)}",
             *[f"  standardize {name}: mean {step.mean:.6g}, std {step.std:.6g}"
               for name, step in schema.standardize_steps()],
             f"  input events {manifest['input_events']:,}: {manifest['events']:,} kept, "
             f"{manifest['duplicates']:,} duplicates, {manifest['quarantined']:,} quarantined",
             f"  watermark {utc_text(manifest['watermark_ms'])}", ""]
    header = ["split", "rows", "events", "label tokens", *[f"{name} rate" for name in labels]]
    table = [header] + [_split_row(name, manifest["splits"][name], labels) for name in (TRAIN, EVAL)]
    widths = [max(len(row[index]) for row in table) for index in range(len(header))]
    lines += ["  " + "  ".join(cell.rjust(width) if index else cell.ljust(width)
                                for index, (cell, width) in enumerate(zip(row, widths)))
              for row in table]
    if manifest["quarantined_by_reason"]:
        lines += ["", "  quarantined by reason:"]
        lines += [f"    {reason:<28} {count:,}" for reason, count in manifest["quarantined_by_reason"].items()]
    lines += ["", "  columns: " + ", ".join(f"{name} {kind}" for name, kind in manifest["columns"])]
    return "\n".join(lines)


def _split_row(name: str, entry: dict[str, Any], labels: tuple[str, ...]) -> list[str]:
    label_tokens = entry["label_tokens"]
    rates = [f"{entry['positives'][label] / label_tokens:.4f}" if label_tokens else "-"
             for label in labels]
    return [name, f"{entry['rows']:,}", f"{entry['events']:,}", f"{label_tokens:,}", *rates]
