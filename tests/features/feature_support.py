"""Raw events of the feature tests, built by hand or, for any schema, from its fields alone."""

from __future__ import annotations

import math
import random
from typing import Any

from features.schema import EventSchema, load_schema

BASE_MS = 1_780_272_000_000
"""2026-06-01T00:00:00Z, a Monday: where the feed events of the fixtures and :func:`raw_events` start."""
FEED = load_schema("feed")
MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000

Event = dict[str, Any]

_SPARK_DDL = {"string": "STRING", "int64": "BIGINT", "int32": "INT", "bool": "BOOLEAN", "float64": "DOUBLE"}


def raw_ddl(schema: EventSchema) -> str:
    """The schema's raw fields as a Spark DDL string (raw names: the role fields not renamed)."""
    return ", ".join(f"{field.name} {_SPARK_DDL[field.kind]}" for field in schema.fields)


def raw_events(schema: EventSchema, users: int = 4, per_user: int = 9, seed: int = 0,
               start_ms: int = BASE_MS) -> list[Event]:
    """Valid raw events of any schema, generated from its fields alone: per user, events seconds to
    hours apart with two day-long gaps (so some previous actions are still pending at the next
    event, and every user has events on three days: the last can be an eval split); every value
    inside its field's range and ``values``, string values drawn from a few per table (shared by
    users, so item ages and tables repeat; a ``by`` field's from its label's thresholds), bools and
    numbers at random (integers within ±90 000, so durations reach 90 s). Plus a later copy of one
    event (the deduplication drops it) and an exact duplicate of another."""
    generator = random.Random(seed)
    vocabulary = {}
    for field in schema.fields:
        # A shared table's columns draw the same values; a label's ``by`` field hits its thresholds.
        stem = schema.column_tables.get(field.name, field.name)
        vocabulary[field.name] = list(field.values) or [f"{stem}-{k}" for k in range(4)] + ["ü🙂"]
    for label in schema.config.labels.values():
        if label.by:
            vocabulary[label.by] = [*label.thresholds, *vocabulary[label.by][:1]]
    gaps_ms = [4_000, 20_000, 50_000, 7 * MINUTE_MS, 3 * HOUR_MS, 11 * HOUR_MS]
    events: list[Event] = []
    for user in range(users):
        ts_ms = start_ms + generator.randint(0, HOUR_MS)
        for index in range(per_user):
            if index:
                ts_ms += DAY_MS if index in (per_user // 3, 2 * per_user // 3) else generator.choice(gaps_ms)
            event: Event = {}
            for field in schema.fields:
                if field.name == schema.config.event_id:
                    value: Any = f"{schema.name}-u{user}-{index}"
                elif field.name == schema.config.user:
                    value = f"user-{user}"
                elif field.name == schema.time_field:
                    value = ts_ms // schema.time_unit_ms
                elif field.kind == "string":
                    value = generator.choice(vocabulary[field.name])
                elif field.kind == "bool":
                    value = generator.random() < 0.4
                elif field.kind == "float64":
                    low, high = max(field.lower, -1e4), min(field.upper, 1e4)
                    value = round(generator.uniform(low, high), 3)
                else:
                    value = generator.randint(math.ceil(max(field.lower, -90_000)), math.floor(min(field.upper, 90_000)))
                event[field.name] = value
            events.append(event)
    late_copy = dict(events[3], **{schema.time_field: events[3][schema.time_field] + 5})
    return events + [late_copy, dict(events[5])]
