"""Cutting users' timelines into left-padded windows, against a plain Python reference."""

from __future__ import annotations

import datetime as dt

import pytest

from features.spec import FeatureSpec, user_key
from features.transforms import EVAL, TRAIN, cut_windows, deduplicate, split_ts_ms, token_features

MONDAY = 1_780_272_000_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
EVAL_DAY = MONDAY + 5 * DAY_MS
C = 4

# user → (train events, eval events): edge lengths around C, and splits with no events.
TIMELINES = {"one": (1, 0), "c-1": (C - 1, 0), "c": (C, 0), "c+1": (C + 1, 0),
             "mixed": (2 * C - 2, C + 1), "eval-only": (0, 2), "eval-one": (1, 1)}


@pytest.fixture(scope="module")
def events():
    result = []
    for user, (train, evaluation) in TIMELINES.items():
        times = [MONDAY + i * 7 * HOUR_MS for i in range(train)]
        times += [EVAL_DAY + i * HOUR_MS for i in range(evaluation)]
        for i, ts in enumerate(times):
            result.append({"event_id": f"{user}-{i:02d}", "user_id": user, "item_id": "i", "author_id": "a",
                           "content_type": "video", "topic": "t", "surface": "s", "event_ts": ts,
                           "dwell_ms": i, "click": False, "like": i % 2 == 0, "comment": False, "share": False})
    # Two events at the same instant keep the order of their event_id.
    result.append(dict(result[-1], event_id="eval-one-01b"))
    return result


def reference_windows(events, split_ms, context, stride):
    """(user_key, split, window) → (the window's event ids, its loss mask), by the docstring of cut_windows."""
    windows = {}
    for user in {event["user_id"] for event in events}:
        timeline = sorted((e for e in events if e["user_id"] == user), key=lambda e: (e["event_ts"], e["event_id"]))
        n_train = sum(e["event_ts"] < split_ms for e in timeline)
        for split, eligible in ((TRAIN, range(0, n_train)), (EVAL, range(n_train, len(timeline)))):
            for window, start in enumerate(range(0, len(eligible), stride)):
                group = eligible[start:start + stride]
                positions = range(max(0, group[-1] - context + 1), group[-1] + 1)
                windows[(user_key(user), split, window)] = (
                    [timeline[p]["event_ts"] // 1000 for p in positions],
                    [1.0 if p in group else 0.0 for p in positions])
    return windows


@pytest.mark.parametrize("stride", [C, C - 1, 1])
def test_windows_match_the_reference(events_frame, events, stride):
    spec = FeatureSpec(context_len=C, stride=stride)
    split_ms = split_ts_ms(max(e["event_ts"] for e in events), eval_days=1)
    assert split_ms == EVAL_DAY
    events_of_users = deduplicate(events_frame(events), spec.event_schema)
    rows = cut_windows(token_features(events_of_users, spec), spec, split_ms).collect()

    actual = {}
    for row in rows:
        length, padding = row["length"], C - row["length"]
        for name in spec.event_schema.token_columns:
            assert len(row[name]) == C, name
            assert all(value == 0 for value in row[name][:padding]), f"{name} is not left-padded with 0"
        actual[(row["user_key"], row["split"], row["window"])] = (row["ts"][padding:], row["loss_mask"][padding:])
        last_day = dt.datetime.fromtimestamp(row["ts"][-1], dt.timezone.utc).date().isoformat()
        assert row["date"] == last_day and length >= 1
    assert actual == reference_windows(events, split_ms, C, stride)

    split_s = split_ms // 1000
    label_ts = []
    for row in rows:
        real = list(zip(row["ts"], row["loss_mask"]))[C - row["length"]:]
        if row["split"] == TRAIN:
            assert all(ts < split_s for ts, _ in real), "a train window holds an eval event"
        else:
            assert all(ts >= split_s for ts, mask in real if mask == 1.0), "an eval window trains on train events"
        label_ts += [(row["user_key"], ts) for ts, mask in real if mask == 1.0]
    # Every event bears its label in exactly one window (compared as multisets: two events share an instant).
    assert len(label_ts) == len(events)
    assert sorted(label_ts) == sorted((user_key(e["user_id"]), e["event_ts"] // 1000) for e in events)
