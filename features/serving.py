"""Serving-side features: a user's raw events → the model's input row, in Python, without Spark.

At serving time the ranker scores a user's newest event given their history. This module turns
the user's raw events (dicts of the event schema's raw fields, :mod:`features.schema`) into exactly
the row the Spark feature job would have written for the window ending at that event: the last
``C`` events, left-padded, with every per-token value computed by :func:`features.spec.token_values`
(the one home of the formulas; features/transforms.py is their Spark twin). Pass the spec the
feature dataset (or the export) records: its schema carries the fitted standardize statistics.

What the caller supplies that Spark derives from the whole dataset:

- enough history: the events before the window (at least the one just before it), because
  ``log_gap`` and ``prev_actions_known`` of the window's first token refer to its predecessor;
- ``item_first_seen_s``: the first time each value of the schema's item-age field was seen (epoch
  seconds), the serving store's counterpart of the job's ``min(ts)`` per item (a value missing from
  it counts as first seen now, age 0).

Events are validated (:func:`features.validation.check_record`; an invalid one raises
:class:`ServingInputError` naming the event and the reason), made canonical
(:meth:`features.schema.EventSchema.canonical`) and deduplicated by ``event_id`` the way the job does
(the first by ``schema.dedup_order``). ``loss_mask`` marks the ``scored`` newest tokens (the ones a
caller wants predictions for).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from features.schema import EVENT_ID, EVENT_TS, USER_ID, ContractConfig, EventSchema
from features.spec import LOSS_MASK_COLUMN, FeatureSpec, token_values, user_key
from features.validation import check_record

Event = Mapping[str, Any]


class ServingInputError(ValueError):
    """Events that cannot be turned into a row (invalid, mixed users, none at all)."""


def deduplicated_timeline(events: Sequence[Event], schema: EventSchema, contract: ContractConfig,
                          processing_ms: int | None = None) -> list[dict[str, Any]]:
    """Raw events → valid canonical events, one per ``event_id`` (the job's choice of copy), ordered
    by (``event_ts``, ``event_id``)."""
    for event in events:
        reason = check_record(event, schema, contract, processing_ms)
        if reason is not None:
            raise ServingInputError(
                f"event {event.get(schema.config.event_id)!r} breaks the contract: {reason}")
    first: dict[str, dict[str, Any]] = {}
    for event in map(schema.canonical, events):
        kept = first.get(event[EVENT_ID])
        if kept is None or [event[name] for name in schema.dedup_order] < [kept[name] for name in schema.dedup_order]:
            first[event[EVENT_ID]] = event
    return sorted(first.values(), key=lambda event: (event[EVENT_TS], event[EVENT_ID]))


def latest_row(events: Sequence[Event], spec: FeatureSpec, item_first_seen_s: Mapping[str, int], *,
               scored: int = 1, contract: ContractConfig | None = None,
               processing_ms: int | None = None) -> dict[str, np.ndarray]:
    """The training-row columns (``spec.event_schema.training_columns``) of the window that ends at
    the user's newest event: ``[C]`` arrays per token column, scalars ``user_key`` and ``length``."""
    schema = spec.event_schema
    if not events:
        raise ServingInputError("no events: a row needs at least the event to score")
    users = {event.get(schema.config.user) for event in events}
    if len(users) != 1:
        raise ServingInputError(f"events of {len(users)} users given; a row holds one user's events")
    if not 1 <= scored <= spec.context_len:
        raise ServingInputError(f"scored must be in [1, {spec.context_len}], got {scored}")
    timeline = deduplicated_timeline(events, schema, contract or ContractConfig(), processing_ms)
    tokens = token_values(spec, timeline, item_first_seen_s)
    width = spec.context_len
    length = min(len(timeline), width)
    row: dict[str, Any] = {"user_key": np.int64(user_key(timeline[0][USER_ID])), "length": np.int32(length)}
    for name, values in tokens.items():
        dtype = np.float32 if name in schema.token_float_columns else np.int64
        padded = np.zeros(width, dtype=dtype)
        padded[width - length:] = values[-length:]
        row[name] = padded
    mask = np.zeros(width, dtype=np.float32)
    mask[width - min(scored, length):] = 1.0
    row[LOSS_MASK_COLUMN] = mask
    return {name: row[name] for name in schema.training_columns}


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of :func:`latest_row` → batch columns (``[B]`` and ``[B, C]``), ready for
    ``trainer.data.to_tensors``."""
    return {name: np.stack([row[name] for row in rows]) for name in rows[0]}
