"""The feature spec and the Python definitions of every token value, shared by Spark and serving.

Training rows (Spark output, read by the trainer through Petastorm) hold one window of one user's
time-ordered events, left-padded to ``context_len`` tokens. Which columns a row has comes from the
event schema (:mod:`features.schema`, ``spec.schema``); their meaning:

======================  ==========  ===============================================================
column                  type        meaning
======================  ==========  ===============================================================
``user_key``            int64       60-bit hash of the user field (:func:`user_key`), groups rows for GAUC
``length``              int32       number of real (non-padding) tokens in the window
``ts``                  int64[C]    event time, epoch seconds UTC (0 = padding)
categoricals            int64[C]    ``1 + hash60(table, value) mod (buckets − 1)`` (:func:`hash_id`, 0 = padding)
``log_gap``             float32[C]  ``log1p(seconds since the user's previous event)``, 0 for the first
``log_item_age``        float32[C]  ``log1p(seconds since the item's first impression in the data)``
numerics                float32[C]  the field through its transforms (:func:`transform`)
``NAME_sin/_cos``       float32[C]  ``sin/cos(2π·T/period)`` per period, T = ts (+ the UTC offset)
actions                 float32[C]  the token's outcome, model inputs for later tokens
``prev_actions_known``  float32[C]  1 if the previous token's actions were known at this token's event
                                    time (:func:`prev_actions_known`), 0 if not and for the first
labels                  float32[C]  one per task (:func:`label_values`)
``loss_mask``           float32[C]  1 for label-bearing tokens, 0 for context-only tokens and padding
======================  ==========  ===============================================================

plus the hive partition column ``date`` (``YYYY-MM-DD`` of the window's last event), which the
trainer does not read. Spark computes these with column expressions (``features.transforms``); the
Python functions here compute the same values for serving, and a parity test holds them equal for
every shipped schema.

An event's actions become known at ``event_ts + duration + delay`` (``actions.known_after`` of the
schema: for the feed, its dwell ends, then logging takes its time). At request time nothing later is
known, so a token may use only the actions known at its own event time: the model masks the
previous token's actions where ``prev_actions_known`` is 0 and tells it that they are pending.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from common.config import require
from features.schema import (
    DEFAULT_SCHEMA, LOSS_MASK_COLUMN, PARTITION_COLUMN, PREV_ACTIONS_KNOWN_COLUMN, ROW_COLUMNS,
    TS_COLUMN, EventSchema, LabelConfig, TransformConfig, load_schema,
)

FEATURE_SPEC_VERSION = "3"
"""Readers refuse other versions. 3: the event schema is part of the spec."""

SECONDS_PER_DAY = 86_400
HASH_SEPARATOR = "\x1f"
HASH_HEX_DIGITS = 15  # 60 bits: fits a signed int64 on every platform and in Spark's conv()

__all__ = ["LOSS_MASK_COLUMN", "PARTITION_COLUMN", "PREV_ACTIONS_KNOWN_COLUMN", "ROW_COLUMNS", "TS_COLUMN"]


@dataclass
class FeatureSpec:
    """What defines the features; recorded in every manifest (with the whole schema) so readers
    build matching models."""

    context_len: int = 50
    """C: tokens per training row."""
    stride: int = 50
    """New label-bearing tokens per window; ``stride < context_len`` gives overlapping windows
    whose first ``context_len - stride`` tokens are context."""
    schema: Any = DEFAULT_SCHEMA
    """The event schema: a shipped schema's name (``conf/schemas/NAME.yaml``) or a schema file's
    path. Manifests record the loaded schema itself."""
    buckets: dict[str, int] = dataclasses.field(default_factory=dict)
    """Rows per table, overriding the schema's (a deployment's table sizes); the rest keep theirs."""

    def __post_init__(self) -> None:
        require(self.context_len >= 2, "spec.context_len", "must be >= 2")
        require(1 <= self.stride <= self.context_len, "spec.stride", "must be in [1, context_len]")
        for name, count in self.buckets.items():
            require(count >= 2, f"spec.buckets.{name}", "must be >= 2 (id 0 is padding)")
        schema = load_schema(self.schema)
        # A config rendered from the defaults (conf/features.yaml, or the dataclass defaults under
        # spec.schema=OTHER) carries the default schema's table sizes: for a schema without those
        # tables they are not overrides. Any other entry must name one of the schema's tables.
        defaults = _default_tables()
        overrides = {table: rows for table, rows in self.buckets.items()
                     if table in schema.tables or defaults.get(table) != rows}
        self._event_schema = schema.with_buckets(overrides)
        self.buckets = dict(self._event_schema.tables)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSpec) and self.record() == other.record()

    @property
    def event_schema(self) -> EventSchema:
        return self._event_schema

    def record(self) -> dict[str, Any]:
        """The spec as manifests and exports record it: ``FeatureSpec(**record)`` rebuilds it."""
        return {"context_len": self.context_len, "stride": self.stride,
                "schema": self._event_schema.to_dict(), "buckets": dict(self.buckets)}

    def with_schema(self, schema: EventSchema) -> "FeatureSpec":
        """This spec over another (e.g. fitted) schema."""
        return FeatureSpec(self.context_len, self.stride, schema.to_dict(), dict(schema.tables))


@functools.lru_cache(maxsize=1)
def _default_tables() -> dict[str, int]:
    return dict(load_schema(DEFAULT_SCHEMA).tables)


def hash60(table: str, value: str) -> int:
    """The project's stable hash: the first 60 bits of ``md5(table + "\\x1f" + value)``.

    MD5 is a standard digest (Spark's ``md5`` and Python's ``hashlib`` agree byte for byte, and
    neither changes across versions), so the same string maps to the same id in every run, Spark
    version and the Python serving path.
    """
    digest = hashlib.md5(f"{table}{HASH_SEPARATOR}{value}".encode("utf-8")).hexdigest()
    return int(digest[:HASH_HEX_DIGITS], 16)


def hash_id(table: str, value: str, buckets: int) -> int:
    """Categorical id in ``[1, buckets)``; 0 is reserved for padding."""
    return 1 + hash60(table, value) % (buckets - 1)


def user_key(user_id: str) -> int:
    return hash60("user_id", user_id)


def log_gap(ts_seconds: np.ndarray) -> np.ndarray:
    """``log1p`` of seconds since the previous event of a user's time-ordered events (0 for the first)."""
    ts = np.asarray(ts_seconds, dtype=np.float64)
    gaps = np.diff(ts, prepend=ts[:1]) if ts.size else ts
    return np.log1p(np.maximum(gaps, 0.0)).astype(np.float32)


def log_item_age(ts_seconds: np.ndarray, item_first_seen_seconds: np.ndarray) -> np.ndarray:
    age = np.asarray(ts_seconds, dtype=np.float64) - np.asarray(item_first_seen_seconds, np.float64)
    return np.log1p(np.maximum(age, 0.0)).astype(np.float32)


def cyclical(ts_seconds: np.ndarray, periods: Mapping[str, float],
             offset_seconds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``NAME_sin, NAME_cos = sin/cos(2π·mod(T, P)/P)`` per period P, in float64, rounded to float32
    at the end; T = ts, plus the per-event UTC offset for local time (UTC epoch phase otherwise: the
    week of 604800 s starts on Thursday 00:00)."""
    ts = np.asarray(ts_seconds, dtype=np.float64)
    if offset_seconds is not None:
        ts = ts + np.asarray(offset_seconds, dtype=np.float64)
    columns = {}
    for name, period in periods.items():
        phase = 2.0 * np.pi * np.mod(ts, period) / period
        columns[f"{name}_sin"] = np.sin(phase).astype(np.float32)
        columns[f"{name}_cos"] = np.cos(phase).astype(np.float32)
    return columns


def transform(values: np.ndarray, steps: Sequence[TransformConfig]) -> np.ndarray:
    """A numeric field through its transform chain, in float64 (``features.transforms`` has the
    Spark twin): clip, divide, log1p, standardize ``(x − mean) / std``."""
    x = np.asarray(values, dtype=np.float64)
    for step in steps:
        if step.op == "clip":
            x = x if step.min is None else np.maximum(x, float(step.min))
            x = x if step.max is None else np.minimum(x, float(step.max))
        elif step.op == "divide":
            x = x / float(step.by)
        elif step.op == "log1p":
            x = np.log1p(x)
        elif step.op == "standardize":
            if step.mean is None or step.std is None:
                raise ValueError("standardize has no statistics yet: the full feature job fits them")
            x = (x - float(step.mean)) / float(step.std)
        else:
            raise ValueError(f"unknown transform {step.op!r}")
    return x


def label_values(label: LabelConfig, events: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """One label over canonical events, float32 0/1 (``features.transforms.spark_label``)."""
    if label.any_of:
        values = [any(event[name] for name in label.any_of) for event in events]
    elif label.all_of:
        values = [all(event[name] for name in label.all_of) for event in events]
    elif label.equals is not None:
        values = [_equals(event[label.field], label.equals) for event in events]
    elif label.at_least is not None:
        values = [event[label.field] >= threshold(label, event.get(label.by)) for event in events]
    else:
        values = [event[label.field] for event in events]
    return np.asarray(values, dtype=np.float32)


def _equals(value: Any, expected: str) -> bool:
    if isinstance(value, str):
        return value == expected
    if isinstance(value, bool):
        return value == (expected.lower() == "true")
    return float(value) == float(expected)


def threshold(label: LabelConfig, by_value: str | None) -> float:
    """``at_least``, or the threshold of the ``by`` field's value where it has its own."""
    return label.thresholds.get(by_value, label.at_least) if label.by else label.at_least


def action_available_ms(event_ts_ms: np.ndarray, duration_ms: np.ndarray | None, delay_ms: int) -> np.ndarray:
    """When an event's actions become known: ``event_ts + max(duration, 0) + delay`` (epoch ms, int64)."""
    event_ts = np.asarray(event_ts_ms, dtype=np.int64)
    duration = np.zeros_like(event_ts) if duration_ms is None else np.maximum(np.asarray(duration_ms, np.int64), 0)
    return event_ts + duration + np.int64(delay_ms)


def prev_actions_known(event_ts_ms: np.ndarray, duration_ms: np.ndarray | None, delay_ms: int,
                       as_of_ms: np.ndarray | None = None) -> np.ndarray:
    """For one user's events in timeline order: ``known_i = 1`` where the previous event's actions
    were known at event i, ``available_{i−1} ≤ as_of_i`` (:func:`action_available_ms`), else 0; 0 for
    the first event, which has no previous one.

    ``as_of_i`` is event i's own time unless given: the incremental job judges its stored context
    events as of its new events' earliest time, so a late event placed after later context never
    sees actions through them (``features.incremental``)."""
    event_ts = np.asarray(event_ts_ms, dtype=np.int64)
    as_of = event_ts if as_of_ms is None else np.asarray(as_of_ms, dtype=np.int64)
    available = action_available_ms(event_ts, duration_ms, delay_ms)
    known = np.zeros(event_ts.shape, dtype=np.float32)
    known[1:] = available[:-1] <= as_of[1:]
    return known


def token_values(spec: FeatureSpec, timeline: Sequence[Mapping[str, Any]],
                 item_first_seen_s: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Every per-token column but ``loss_mask`` of one user's time-ordered canonical events
    (``features.transforms.token_features`` in Spark). ``item_first_seen_s``: first impression
    (epoch seconds) per value of the item-age field; a value missing from it counts as first seen
    at its event (age 0)."""
    schema = spec.event_schema
    config = schema.config
    event_ts_ms = np.array([event["event_ts"] for event in timeline], dtype=np.int64)
    ts = event_ts_ms // 1000
    columns: dict[str, np.ndarray] = {TS_COLUMN: ts}
    for name in schema.id_columns:
        table = schema.column_tables[name]
        columns[name] = np.array([hash_id(table, event[name], spec.buckets[table]) for event in timeline],
                                 dtype=np.int64)
    if config.time_features.gap:
        columns["log_gap"] = log_gap(ts)
    if schema.item_age_field:
        first_seen = np.array([item_first_seen_s.get(event[schema.item_age_field], seconds)
                               for event, seconds in zip(timeline, ts)], dtype=np.int64)
        columns["log_item_age"] = log_item_age(ts, first_seen)
    for name, value in config.numerics.items():
        columns[name] = _value_column(value, timeline)
    offset = None
    if schema.utc_offset_field:
        offset = np.array([event[schema.utc_offset_field] for event in timeline], np.int64) * schema.utc_offset_unit_s
    columns.update(cyclical(ts, schema.periods, offset))
    for name, value in config.actions.columns.items():
        columns[name] = _value_column(value, timeline)
    duration = (np.array([event[schema.known_after_field] for event in timeline], dtype=np.int64)
                if schema.known_after_field else None)
    columns[PREV_ACTIONS_KNOWN_COLUMN] = prev_actions_known(event_ts_ms, duration, schema.action_delay_ms)
    for name in schema.label_columns:
        columns[name] = label_values(config.labels[name], timeline)
    return {name: columns[name] for name in schema.token_columns if name != LOSS_MASK_COLUMN}


def _value_column(value: Any, timeline: Sequence[Mapping[str, Any]]) -> np.ndarray:
    raw = np.array([event[value.field] for event in timeline], dtype=np.float64)
    return transform(raw, value.transforms).astype(np.float32)
