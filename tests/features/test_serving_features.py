"""Serving parity: features.serving and features.spec.token_values compute, in Python, exactly the
token values and rows the Spark job writes, for the feed and for every shipped schema."""

from __future__ import annotations

import numpy as np
import pytest

from feature_support import raw_events
from features.full import fitted_spec
from features.schema import ContractConfig, load_schema, shipped_schemas
from features.serving import ServingInputError, deduplicated_timeline, latest_row, stack_rows
from features.spec import LOSS_MASK_COLUMN, PREV_ACTIONS_KNOWN_COLUMN, FeatureSpec, token_values, user_key
from features.transforms import (
    EVAL, SPLIT_COLUMN, WINDOW_COLUMN, cut_windows, deduplicate, split_ts_ms, token_features,
    valid_events, validate,
)

pytestmark = pytest.mark.slow

MINUTE_MS, HOUR_MS, DAY_MS = 60_000, 3_600_000, 86_400_000
SPEC = FeatureSpec(context_len=4, stride=2,
                   buckets={"item_id": 101, "author_id": 31, "content_type": 7, "topic": 11, "surface": 5})
CONTRACT = ContractConfig()
BASE_MS = 1_780_272_000_000  # 2026-06-01T00:00:00Z


@pytest.fixture(scope="module")
def events():
    """Four users: one with more than C events (overlapping windows), one with fewer, one whose
    newest event is duplicated with a later copy, one whose events come seconds apart (so some
    previous actions are still pending at the next event); items shared across users."""
    made = []

    def event(user, index, offset_ms, **fields):
        made.append({"event_id": f"{user}-{index}", "user_id": user, "item_id": f"i{index % 3}",
                     "author_id": f"a{index % 2}", "content_type": ("video", "image", "text", "podcast")[index % 4],
                     "topic": f"t{index % 5}", "surface": "feed", "event_ts": BASE_MS + offset_ms,
                     "dwell_ms": 1_700 * index * index, "click": index % 2 == 0, "like": index % 3 == 0,
                     "comment": index % 4 == 1, "share": index == 5, **fields})

    for index in range(9):
        event("long", index, index * 37 * MINUTE_MS + index * index * 1_234)
    for index in range(2):
        event("short", index, DAY_MS + index * 5 * HOUR_MS + 17)
    for index in range(3):
        event("dup", index, 2 * DAY_MS + index * 11 * MINUTE_MS)
    made.append(dict(made[-1], event_ts=made[-1]["event_ts"] + 5_000, dwell_ms=1))  # a later copy: dropped
    # Dwell 1.7 s · index², logging delay 30 s: available at 30 s, 51.7 s, 96.8 s.
    for index, offset_s in enumerate((0, 20, 60, 70)):
        event("burst", index, 3 * DAY_MS + offset_s * 1_000)
    return made


def test_serving_rows_equal_the_spark_rows(events_frame, events):
    split_ms = BASE_MS + 90 * MINUTE_MS  # "long" has train and eval events, the others eval only
    tokens = token_features(deduplicate(events_frame(events), SPEC.event_schema), SPEC)
    spark_rows = cut_windows(tokens, SPEC, split_ms).where(f"{SPLIT_COLUMN} = '{EVAL}'").collect()
    newest = {}  # the last eval window of each user ends at their newest event
    for row in spark_rows:
        if row["user_key"] not in newest or row[WINDOW_COLUMN] > newest[row["user_key"]][WINDOW_COLUMN]:
            newest[row["user_key"]] = row
    first_seen = {item: min(e["event_ts"] for e in events if e["item_id"] == item) // 1000
                  for item in {e["item_id"] for e in events}}

    rows = []
    for user in ("long", "short", "dup", "burst"):
        spark_row = newest[user_key(user)]
        scored = int(sum(spark_row[LOSS_MASK_COLUMN]))
        row = latest_row([e for e in events if e["user_id"] == user], SPEC, first_seen, scored=scored,
                         contract=CONTRACT)
        assert list(row) == list(SPEC.event_schema.training_columns)
        for name in SPEC.event_schema.training_columns:
            expected = np.asarray(spark_row[name], dtype=np.asarray(row[name]).dtype)
            assert np.array_equal(expected, row[name]), f"{user} {name}: spark {expected} vs serving {row[name]}"
        rows.append(row)
    assert newest[user_key("long")]["length"] == SPEC.context_len and newest[user_key("short")]["length"] == 2
    # Both outcomes of the availability rule are compared: known and still pending.
    assert rows[3][PREV_ACTIONS_KNOWN_COLUMN].tolist() == [0, 0, 1, 0]
    assert rows[0][PREV_ACTIONS_KNOWN_COLUMN].tolist() == [1, 1, 1, 1]
    batch = stack_rows(rows)
    assert batch["ts"].shape == (4, SPEC.context_len) and batch["user_key"].shape == (4,)


def test_invalid_or_mixed_events_are_refused_with_the_reason(events):
    broken = dict(events[0], dwell_ms=-1)
    with pytest.raises(ServingInputError, match="long-0.*out_of_range:dwell_ms"):
        latest_row([broken], SPEC, {}, contract=CONTRACT)
    with pytest.raises(ServingInputError, match="2 users"):
        latest_row([events[0], events[-1]], SPEC, {}, contract=CONTRACT)
    with pytest.raises(ServingInputError, match="no events"):
        latest_row([], SPEC, {})


NOW_MS = BASE_MS + 30 * DAY_MS


def spark_events(events_frame, schema, raw):
    """The raw events through the job's validation and deduplication: canonical, one per id."""
    validated = validate(events_frame(raw, schema), schema, CONTRACT, NOW_MS)
    return deduplicate(valid_events(validated, schema), schema)


@pytest.mark.parametrize("name", shipped_schemas())
def test_spark_token_values_and_rows_equal_the_python_ones_for_every_schema(events_frame, name):
    """Per shipped schema: every token column of every event from Spark's token_features equals
    features.spec.token_values of the user's timeline (validated, canonical, deduplicated by
    features.serving), and each user's newest eval window equals features.serving.latest_row."""
    schema = load_schema(name)
    raw = raw_events(schema, users=5, per_user=9, seed=len(name))
    unique = spark_events(events_frame, schema, raw).persist()
    split_ms = split_ts_ms(max(row["event_ts"] for row in unique.select("event_ts").collect()), 2)
    spec = fitted_spec(FeatureSpec(context_len=5, stride=2, schema=name), unique, split_ms)
    assert not spec.event_schema.needs_fit  # the watch schema's standardize statistics are fitted
    tokens = token_features(unique, spec).collect()
    rows = cut_windows(token_features(unique, spec), spec, split_ms).where(f"{SPLIT_COLUMN} = '{EVAL}'").collect()
    unique.unpersist()

    canonical = [schema.canonical(event) for event in raw]
    item = schema.item_age_field
    first_seen = {}
    for event in canonical if item else []:
        first_seen[event[item]] = min(first_seen.get(event[item], event["event_ts"] // 1000), event["event_ts"] // 1000)
    columns = [column for column in schema.token_columns if column != LOSS_MASK_COLUMN]
    users = sorted({event["user_id"] for event in canonical})
    assert len(tokens) == len({event["event_id"] for event in canonical}) < len(raw)
    served_users = []
    for user in users:
        own = [event for event in raw if event[schema.config.user] == user]
        timeline = deduplicated_timeline(own, schema, CONTRACT, NOW_MS)
        python = token_values(spec, timeline, first_seen)
        assert list(python) == columns
        spark_rows = sorted((row for row in tokens if row["user_id"] == user),
                            key=lambda row: (row["event_ts"], row["event_id"]))
        assert [row["event_id"] for row in spark_rows] == [event["event_id"] for event in timeline]
        assert all(row["user_key"] == user_key(user) for row in spark_rows)
        for column in columns:
            values = np.array([row[column] for row in spark_rows], dtype=python[column].dtype)
            assert np.array_equal(values, python[column]), f"{name} {user} {column}: {values} vs {python[column]}"

        own_rows = [row for row in rows if row["user_key"] == user_key(user)]
        if not own_rows:  # no event on the eval day
            continue
        served_users.append(user)
        newest = max(own_rows, key=lambda row: row[WINDOW_COLUMN])
        served = latest_row(own, spec, first_seen, scored=int(sum(newest[LOSS_MASK_COLUMN])), contract=CONTRACT,
                            processing_ms=NOW_MS)
        assert list(served) == list(schema.training_columns)
        for column in schema.training_columns:
            expected = np.asarray(newest[column], dtype=np.asarray(served[column]).dtype)
            assert np.array_equal(expected, served[column]), f"{name} {user} {column}"
    assert len(served_users) >= 2
    # Both outcomes of every label and of the availability rule occur, so the comparison says something.
    for column in (*schema.label_columns, PREV_ACTIONS_KNOWN_COLUMN):
        assert {row[column] for row in tokens} == {0.0, 1.0}, f"{name} {column}"
    for column in schema.config.numerics:
        assert len({row[column] for row in tokens}) > 3
