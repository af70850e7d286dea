"""Serving-side features: a user's raw events → the model's input row, in Python, without Spark.

At serving time the ranker scores a user's newest impression given their history. This module
turns the user's raw events (dicts in the event contract, features/schema.py) into exactly the
row the Spark feature job would have written for the window ending at that impression: the last
``C`` events, left-padded, with every per-token value computed by the functions of
:mod:`features.spec` (the one home of the formulas; features/transforms.py is their Spark twin).

What the caller supplies that Spark derives from the whole dataset:

- enough history: the events before the window (at least the one just before it), because
  ``log_gap`` and ``prev_actions_known`` of the window's first token refer to its predecessor;
- ``item_first_seen_s``: the first time each item was seen (epoch seconds), the serving store's
  counterpart of the job's ``min(ts)`` per item (an item missing from it counts as first seen now,
  age 0).

Events are validated (:func:`features.validation.check_record`; an invalid one raises
:class:`ServingInputError` naming the event and the reason) and deduplicated by ``event_id`` the way
the job does (the first by ``event_ts``, then the other fields in contract order). ``loss_mask`` marks
the ``scored`` newest tokens (the ones a caller wants predictions for).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from features.schema import ACTION_FIELDS, FIELD_NAMES, ContractConfig
from features.spec import (
    ID_COLUMNS, LOSS_MASK_COLUMN, PREV_ACTIONS_KNOWN_COLUMN, TOKEN_COLUMNS, TOKEN_FLOAT_COLUMNS,
    TS_COLUMN, FeatureSpec, cyclical, hash_id, log_dwell, log_gap, log_item_age,
    long_dwell_threshold, prev_actions_known, user_key,
)
from features.validation import check_record

Event = Mapping[str, Any]


class ServingInputError(ValueError):
    """Events that cannot be turned into a row (invalid, mixed users, none at all)."""


def deduplicated_timeline(events: Sequence[Event], contract: ContractConfig,
                          processing_ms: int | None = None) -> list[Event]:
    """Valid events, one per ``event_id`` (the job's choice of copy), ordered by (event_ts, event_id)."""
    for event in events:
        reason = check_record(event, contract, processing_ms)
        if reason is not None:
            raise ServingInputError(f"event {event.get('event_id')!r} breaks the contract: {reason}")
    order = ["event_ts"] + [name for name in FIELD_NAMES if name not in ("event_id", "event_ts")]
    first: dict[str, Event] = {}
    for event in events:
        kept = first.get(event["event_id"])
        if kept is None or [event[name] for name in order] < [kept[name] for name in order]:
            first[event["event_id"]] = event
    return sorted(first.values(), key=lambda event: (event["event_ts"], event["event_id"]))


def token_columns(timeline: Sequence[Event], spec: FeatureSpec,
                  item_first_seen_s: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-token columns of a user's whole time-ordered timeline (``features.transforms.token_features``)."""
    ts = np.array([event["event_ts"] // 1000 for event in timeline], dtype=np.int64)
    columns: dict[str, np.ndarray] = {TS_COLUMN: ts}
    for name in ID_COLUMNS:
        columns[name] = np.array([hash_id(name, event[name], spec.buckets[name]) for event in timeline],
                                 dtype=np.int64)
    columns["log_gap"] = log_gap(ts)
    first_seen = np.array([item_first_seen_s.get(event["item_id"], seconds)
                           for event, seconds in zip(timeline, ts)], dtype=np.int64)
    columns["log_item_age"] = log_item_age(ts, first_seen)
    columns.update(cyclical(ts))
    for name in ACTION_FIELDS:
        columns[name] = np.array([event[name] for event in timeline], dtype=np.float32)
    dwell_ms = np.array([event["dwell_ms"] for event in timeline], dtype=np.int64)
    columns["log_dwell"] = log_dwell(dwell_ms)
    event_ts_ms = np.array([event["event_ts"] for event in timeline], dtype=np.int64)
    columns[PREV_ACTIONS_KNOWN_COLUMN] = prev_actions_known(event_ts_ms, dwell_ms, spec.action_log_delay_ms)
    columns["contribution"] = np.array([event["like"] or event["comment"] or event["share"]
                                        for event in timeline], dtype=np.float32)
    columns["long_dwell"] = np.array(
        [event["dwell_ms"] >= long_dwell_threshold(spec, event["content_type"]) for event in timeline],
        dtype=np.float32)
    missing = set(TOKEN_COLUMNS) - {LOSS_MASK_COLUMN} - set(columns)
    assert not missing, f"token columns without a serving definition: {missing}"
    return columns


def latest_row(events: Sequence[Event], spec: FeatureSpec, item_first_seen_s: Mapping[str, int], *,
               scored: int = 1, contract: ContractConfig | None = None,
               processing_ms: int | None = None) -> dict[str, np.ndarray]:
    """The training-row columns (``features.spec.TRAINING_COLUMNS``) of the window that ends at the
    user's newest event: ``[C]`` arrays per token column, scalars ``user_key`` and ``length``."""
    if not events:
        raise ServingInputError("no events: a row needs at least the impression to score")
    users = {event.get("user_id") for event in events}
    if len(users) != 1:
        raise ServingInputError(f"events of {len(users)} users given; a row holds one user's events")
    if not 1 <= scored <= spec.context_len:
        raise ServingInputError(f"scored must be in [1, {spec.context_len}], got {scored}")
    timeline = deduplicated_timeline(events, contract or ContractConfig(), processing_ms)
    tokens = token_columns(timeline, spec, item_first_seen_s)
    width = spec.context_len
    length = min(len(timeline), width)
    row: dict[str, Any] = {"user_key": np.int64(user_key(timeline[0]["user_id"])), "length": np.int32(length)}
    for name, values in tokens.items():
        dtype = np.float32 if name in TOKEN_FLOAT_COLUMNS else np.int64
        padded = np.zeros(width, dtype=dtype)
        padded[width - length:] = values[-length:]
        row[name] = padded
    mask = np.zeros(width, dtype=np.float32)
    mask[width - min(scored, length):] = 1.0
    row[LOSS_MASK_COLUMN] = mask
    return row


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of :func:`latest_row` → batch columns (``[B]`` and ``[B, C]``), ready for
    ``trainer.data.to_tensors``."""
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}

