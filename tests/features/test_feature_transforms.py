"""Deduplication, labels, per-token features and standardize statistics of the Spark job against
features.spec."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from pyspark.sql import Window
from pyspark.sql import functions as F

from features import spec as S
from features.schema import ContractConfig, SchemaError, TransformConfig, load_schema
from features.spec import FeatureSpec
from features.transforms import (
    columns_to_fit, deduplicate, fitted_statistics, spark_label, spark_prev_actions_known,
    spark_transform, split_ts_ms, standardize_partials, token_features, valid_events, validate,
)

from feature_support import raw_events

SPEC = FeatureSpec()
FEED = SPEC.event_schema
MONDAY = 1_780_272_000_000  # 2026-06-01T00:00:00Z
DAY_MS = 86_400_000
NOW_MS = MONDAY + 30 * DAY_MS
CONTRACT = ContractConfig(now_ms=NOW_MS)
THRESHOLDS = {"video": 15_000, "image": 4_000, "text": 8_000, "link": 10_000}
"""The feed's long-dwell thresholds per content type (10 s for the others)."""


def features_of(events_frame, events, spec=SPEC):
    rows = token_features(deduplicate(events_frame(events), spec.event_schema), spec).collect()
    return {row["event_id"]: row.asDict() for row in rows}


def test_deduplicate_keeps_the_first_copy_by_time_then_by_the_other_columns(events_frame, new_event):
    earliest = new_event(event_id="a", event_ts=MONDAY + 5, dwell_ms=9)
    later = dict(earliest, event_ts=MONDAY + 6, dwell_ms=1)
    smaller_user = new_event(event_id="b", user_id="u1", event_ts=MONDAY)
    larger_user = dict(smaller_user, user_id="u2")
    not_liked = new_event(event_id="c", like=False)
    liked = dict(not_liked, like=True)
    unique = new_event(event_id="d")
    events = [later, earliest, larger_user, smaller_user, liked, not_liked, unique, unique]
    for order in (events, events[::-1]):
        kept = {row["event_id"]: row.asDict() for row in deduplicate(events_frame(order), FEED).collect()}
        assert kept == {"a": earliest, "b": smaller_user, "c": not_liked, "d": unique}
    assert deduplicate(events_frame(events), FEED).columns == list(FEED.field_names)


def test_labels(events_frame, new_event):
    events = [
        new_event(event_id="none"),
        new_event(event_id="like", like=True),
        new_event(event_id="comment", comment=True, click=True),
        new_event(event_id="share", share=True),
        new_event(event_id="video-long", content_type="video", dwell_ms=15_000),
        new_event(event_id="video-short", content_type="video", dwell_ms=14_999),
        new_event(event_id="image-long", content_type="image", dwell_ms=4_000),
        new_event(event_id="unknown-long", content_type="podcast", dwell_ms=10_000),
        new_event(event_id="unknown-short", content_type="podcast", dwell_ms=9_999),
    ]
    rows = features_of(events_frame, events)
    labels = {event_id: (row["contribution"], row["like"], row["long_dwell"], row["click"])
              for event_id, row in rows.items()}
    assert labels == {
        "none": (0, 0, 0, 0), "like": (1, 1, 0, 0), "comment": (1, 0, 0, 1), "share": (1, 0, 0, 0),
        "video-long": (0, 0, 1, 0), "video-short": (0, 0, 0, 0), "image-long": (0, 0, 1, 0),
        "unknown-long": (0, 0, 1, 0), "unknown-short": (0, 0, 0, 0),
    }


@pytest.mark.parametrize(("instant", "seconds_into_day", "seconds_into_week"), [
    # The UTC epoch week starts on Thursday 00:00: Monday 00:00 is 4 days in, Sunday 23:59 3 days in.
    (MONDAY, 0, 4 * 86_400),
    (MONDAY + 6 * DAY_MS + 86_340_000, 86_340, 3 * 86_400 + 86_340),
])
def test_cyclical_features_at_known_instants(events_frame, new_event, instant, seconds_into_day,
                                             seconds_into_week):
    row = features_of(events_frame, [new_event(event_id="x", event_ts=instant)])["x"]
    day, week = 2 * math.pi * seconds_into_day / 86_400, 2 * math.pi * seconds_into_week / 604_800
    assert row["ts"] == instant // 1000
    assert row["tod_sin"] == pytest.approx(math.sin(day), abs=1e-6)
    assert row["tod_cos"] == pytest.approx(math.cos(day), abs=1e-6)
    assert row["dow_sin"] == pytest.approx(math.sin(week), abs=1e-6)
    assert row["dow_cos"] == pytest.approx(math.cos(week), abs=1e-6)
    if seconds_into_day == 0:
        assert (row["tod_sin"], row["tod_cos"]) == (0.0, 1.0)


def test_spark_features_equal_the_python_definitions(events_frame, new_event):
    generator = random.Random(3)
    events = [new_event(user_id=f"u{generator.randint(1, 4)}", item_id=f"i{generator.randint(1, 6)}",
                        author_id=generator.choice(["a1", "a2", "ü"]),
                        content_type=generator.choice(["video", "image", "text", "other"]),
                        topic=generator.choice(["news", "sport"]), surface=generator.choice(["feed", "search"]),
                        event_ts=MONDAY + generator.randint(0, 9 * DAY_MS),
                        dwell_ms=generator.choice([0, 1, 999, 4_000, 20_000, 2**31 - 1]),
                        click=generator.random() < 0.5, like=generator.random() < 0.3,
                        comment=generator.random() < 0.1, share=generator.random() < 0.1)
              for _ in range(60)]
    events.append(dict(events[0], event_id="same-time", item_id="i9"))  # a zero gap
    rows = features_of(events_frame, events)
    assert set(rows) == {event["event_id"] for event in events}

    first_seen = {}
    for event in events:
        item, seconds = event["item_id"], event["event_ts"] // 1000
        first_seen[item] = min(first_seen.get(item, seconds), seconds)
    for user in {event["user_id"] for event in events}:
        timeline = sorted((e for e in events if e["user_id"] == user), key=lambda e: (e["event_ts"], e["event_id"]))
        ts = np.array([e["event_ts"] // 1000 for e in timeline])
        expected = {
            "ts": ts,
            "log_gap": S.log_gap(ts),
            "log_item_age": S.log_item_age(ts, np.array([first_seen[e["item_id"]] for e in timeline])),
            **S.cyclical(ts, {"tod": 86_400, "dow": 604_800}),
            "log_dwell": np.log1p(np.maximum(np.array([e["dwell_ms"] for e in timeline], np.float64), 0)
                                  / 1000).astype(np.float32),
            "long_dwell": np.array([e["dwell_ms"] >= THRESHOLDS.get(e["content_type"], 10_000)
                                    for e in timeline], dtype=np.float32),
            "contribution": np.array([e["like"] or e["comment"] or e["share"] for e in timeline], np.float32),
            S.PREV_ACTIONS_KNOWN_COLUMN: S.prev_actions_known(
                np.array([e["event_ts"] for e in timeline]), np.array([e["dwell_ms"] for e in timeline]),
                30_000),
            **{name: np.array([e[name] for e in timeline], np.float32) for name in ("click", "like", "comment", "share")},
            **{name: np.array([S.hash_id(name, e[name], SPEC.buckets[name]) for e in timeline])
               for name in FEED.id_columns},
        }
        assert set(expected) | {"loss_mask"} == set(FEED.token_columns)
        actual = [rows[e["event_id"]] for e in timeline]
        assert all(row["user_key"] == S.user_key(user) for row in actual)
        for name, values in expected.items():
            got = np.array([row[name] for row in actual])
            if values.dtype == np.float32:
                np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-6, err_msg=name)
            else:
                np.testing.assert_array_equal(got, values, err_msg=name)
    assert rows["same-time"]["log_gap"] == 0.0 or rows[events[0]["event_id"]]["log_gap"] == 0.0
    assert {row[S.PREV_ACTIONS_KNOWN_COLUMN] for row in rows.values()} == {0.0, 1.0}


DELAY_MS = 30_000
"""The feed's ``actions.known_after.delay_ms``."""
AVAILABILITY = [  # (event, offset ms, dwell ms, whether the previous event's actions are known at it)
    ("first", 0, 10_000, 0.0),                            # a user's first event has no previous one
    ("exactly-then", 10_000 + DELAY_MS, 5_000, 1.0),      # prev ts + dwell + delay == ts: known
    ("one-ms-early", 45_000 + DELAY_MS - 1, 0, 0.0),      # one millisecond before that: pending
    ("by-the-delay", 74_999 + DELAY_MS - 1, 0, 0.0),      # no dwell: the delay alone keeps it pending
    ("much-later", 3_600_000, 2**31 - 1, 1.0),
    ("after-a-long-dwell", 3_600_000 + 2**31 - 2 + DELAY_MS, 0, 0.0),
]


def with_delay(delay_ms: int) -> FeatureSpec:
    values = FEED.to_dict()
    values["actions"]["known_after"]["delay_ms"] = delay_ms
    return FeatureSpec(schema=values)


def test_prev_actions_known_at_the_boundaries(events_frame, new_event):
    spec = FeatureSpec()
    assert spec.event_schema.action_delay_ms == DELAY_MS and spec.event_schema.known_after_field == "dwell_ms"
    events = [new_event(event_id=name, event_ts=MONDAY + offset, dwell_ms=dwell)
              for name, offset, dwell, _ in AVAILABILITY]
    events.append(new_event(event_id="other-user", user_id="u2", event_ts=MONDAY + 20_000 + DELAY_MS))
    rows = features_of(events_frame, events, spec)
    expected = {name: known for name, _, _, known in AVAILABILITY} | {"other-user": 0.0}
    assert {name: row[S.PREV_ACTIONS_KNOWN_COLUMN] for name, row in rows.items()} == expected
    python = S.prev_actions_known(np.array([MONDAY + offset for _, offset, _, _ in AVAILABILITY]),
                                  np.array([dwell for _, _, dwell, _ in AVAILABILITY]), DELAY_MS)
    assert python.dtype == np.float32
    assert python.tolist() == [known for _, _, _, known in AVAILABILITY]
    instantly = features_of(events_frame, events, with_delay(0))
    assert instantly["by-the-delay"][S.PREV_ACTIONS_KNOWN_COLUMN] == 1.0


def test_prev_actions_known_as_of_an_earlier_time(events_frame, new_event):
    """The Spark expression and the Python rule agree when the time that counts is not the event's
    own (the incremental job's context events)."""
    offsets, dwells = [0, 40_000, 90_000, 125_000], [0, 5_000, 0, 0]
    as_of = [0, 35_000, 60_000, 125_000]  # e2 is judged at 60 s, before e1's actions (75 s)
    events = [new_event(event_id=f"e{i}", event_ts=MONDAY + offset, dwell_ms=dwell)
              for i, (offset, dwell) in enumerate(zip(offsets, dwells))]
    as_of_by_event = F.create_map(*[F.lit(value) for i, ms in enumerate(as_of)
                                    for value in (f"e{i}", MONDAY + ms)])
    timeline = Window.partitionBy("user_id").orderBy("event_ts", "event_id")
    known = spark_prev_actions_known(FEED, timeline, as_of_by_event[F.col("event_id")])
    spark = [row["known"] for row in
             events_frame(events).select("event_id", known.alias("known")).orderBy("event_id").collect()]
    python = S.prev_actions_known(np.array(offsets) + MONDAY, np.array(dwells), DELAY_MS,
                                  as_of_ms=np.array(as_of) + MONDAY)
    assert spark == python.tolist() == [0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("value", [-1, -30_000])
def test_action_log_delay_must_not_be_negative(value):
    with pytest.raises(SchemaError, match="actions.known_after.delay_ms"):
        with_delay(value)


def test_split_time_is_midnight_utc_of_the_first_eval_day():
    last_event = MONDAY + 3 * DAY_MS + 1_234
    assert split_ts_ms(last_event, 1) == MONDAY + 3 * DAY_MS
    assert split_ts_ms(last_event, 2) == MONDAY + 2 * DAY_MS
    assert split_ts_ms(MONDAY + 3 * DAY_MS, 1) == MONDAY + 3 * DAY_MS
    assert split_ts_ms(last_event, 0) == MONDAY + 4 * DAY_MS


# --- schema-declared values: labels, transforms, standardize --------------------------------------

WATCH = load_schema("watch")


def every_label_kind() -> dict:
    """The watch schema with one label of every kind the schema file can declare."""
    values = WATCH.to_dict()
    values["labels"].update({
        "hidden_and_followed": {"all_of": ["hide", "follow"]},
        "hide_or_follow": {"any_of": ["hide", "follow"]},
        "is_live": {"field": "format", "equals": "live"},
        "hidden": {"field": "hide", "equals": "TRUE"},
        "at_utc_plus_one": {"field": "tz_offset_min", "equals": "60"},
        "long_video": {"field": "video_s", "at_least": 5_000.5},
        "over_8s": {"field": "watch_ms", "at_least": 8_000.5},
    })
    values["tasks"].update({name: 1.0 for name in values["labels"] if name not in values["tasks"]})
    return values


def canonical_frame(spark, schema, events):
    return spark.createDataFrame([schema.canonical(event) for event in events], schema.canonical_ddl())


def test_spark_labels_equal_the_python_labels_for_every_kind(spark):
    schema = load_schema(every_label_kind())
    raw = raw_events(schema, users=3, per_user=30, seed=4)
    raw += [dict(raw[0], impression_id="edge-1", tz_offset_min=60, video_s=5_000.5, watch_ms=8_001),
            dict(raw[0], impression_id="edge-2", tz_offset_min=59, video_s=5_000.25, watch_ms=8_000)]
    events = [schema.canonical(event) for event in raw]
    frame = canonical_frame(spark, schema, raw)
    labels = schema.config.labels
    rows = frame.select(*[spark_label(labels[name], schema).cast("float").alias(name) for name in labels]).collect()
    for name, label in labels.items():
        python = S.label_values(label, events)
        assert [row[name] for row in rows] == python.tolist(), name
        assert 0 < python.sum() < len(events), f"{name} takes one value only: the corpus tells nothing"
    assert [row["at_utc_plus_one"] for row in rows[-2:]] == [1.0, 0.0]
    assert [row["long_video"] for row in rows[-2:]] == [1.0, 0.0]
    assert [row["over_8s"] for row in rows[-2:]] == [1.0, 0.0]


def test_equals_must_fit_the_field_type():
    values = every_label_kind()
    values["labels"]["hidden"]["equals"] = "yes"
    with pytest.raises(SchemaError, match="labels.hidden.equals"):
        load_schema(values)


def standardized_watch(events_frame, raw, split_ms):
    """The fitted (mean, std) of the raw watch events' train split (before ``split_ms``)."""
    validated = validate(events_frame(raw, WATCH), WATCH, CONTRACT, NOW_MS)
    unique = deduplicate(valid_events(validated, WATCH), WATCH)
    return fitted_statistics(WATCH, standardize_partials(unique, WATCH, split_ms).collect())


def test_spark_transforms_equal_the_python_transforms(spark):
    steps = [TransformConfig(op="clip", min=-0.5, max=36_000), TransformConfig(op="divide", by=-3.0),
             TransformConfig(op="clip", max=2.0), TransformConfig(op="divide", by=-1.5),
             TransformConfig(op="log1p"), TransformConfig(op="standardize", mean=0.25, std=1.5)]
    values = [-7.0, -0.5, -0.0, 0.0, 1e-9, 0.3, 2.5, 1e6, 36_001.0]
    frame = spark.createDataFrame([(value,) for value in values], "x double")
    for end in range(len(steps) + 1):
        spark_values = np.array([row["y"] for row in
                                 frame.select(spark_transform(F.col("x"), steps[:end]).alias("y")).collect()])
        python = S.transform(np.array(values), steps[:end])
        # The JVM's log1p and numpy's may part in the last bit of a double; a token holds the float32.
        np.testing.assert_allclose(spark_values, python, rtol=1e-15, atol=0, err_msg=str(steps[:end]))
        assert spark_values.astype(np.float32).tolist() == python.astype(np.float32).tolist()
    with pytest.raises(ValueError, match="no statistics"):
        spark_transform(F.col("x"), [TransformConfig(op="standardize")])


def test_standardize_is_fitted_on_the_train_split_only(events_frame):
    raw = raw_events(WATCH, users=5, per_user=12, seed=9)
    assert columns_to_fit(WATCH) == ["log_video_s"]
    times = sorted(event["ts"] * 1000 for event in raw)
    split_ms = split_ts_ms(times[-1], 1)
    train = {event["impression_id"]: event for event in raw if event["ts"] * 1000 < split_ms}
    evaluation = [event for event in raw if event["ts"] * 1000 >= split_ms]
    assert len(train) > 10 and evaluation

    statistics = standardized_watch(events_frame, raw, split_ms)
    steps = WATCH.config.numerics["log_video_s"].transforms
    # The value before standardize, over the deduplicated train events (a duplicate counts once).
    x = S.transform(np.array([event["video_s"] for event in train.values()]), steps[:-1])
    mean, std = statistics["log_video_s"]
    assert mean == pytest.approx(x.mean(), rel=1e-12) and std == pytest.approx(x.std(ddof=0), rel=1e-12)

    moved = [dict(event, video_s=event["video_s"] * 3 + 1) if event in evaluation else event for event in raw]
    assert standardized_watch(events_frame, moved, split_ms) == statistics, "an eval value moved the fit"
    shuffled = raw[::-1] + raw[:5]
    assert standardized_watch(events_frame, shuffled, split_ms) == statistics, "the fit depends on row order"
    changed = [dict(event, video_s=event["video_s"] + 1) if event["impression_id"] in train else event
               for event in raw]
    assert standardized_watch(events_frame, changed, split_ms) != statistics

    fitted = WATCH.fitted(statistics)
    assert not fitted.needs_fit and columns_to_fit(fitted) == []
    assert standardized_watch(events_frame, raw, 0) == {"log_video_s": (0.0, 1.0)}, "no train events"
