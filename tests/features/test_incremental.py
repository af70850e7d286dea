"""Incremental feature runs on a hand-built landing zone: full-vs-incremental equivalence of the
label-bearing tokens; the watermark bookkeeping across three batches with late, too-late and
re-delivered events and a crashed append (nothing trained twice, nothing skipped), down to the
batches that chained warm-start segments train on."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_support import raw_events
from features.dataset import MANIFEST_NAME, read_manifest
from features.full import run
from features.hadoop import FeatureJobError
from features.incremental import REASON_TOO_LATE, pending_raw_files, run_incremental
from features.schema import ContractConfig, EventSchema, SchemaError, load_schema
from features.settings import FeaturesConfig, IncrementalConfig
from features.spec import FeatureSpec, transform, user_key
from lifecycle.view import NothingNew, select

MONDAY = 1_780_272_000_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
SPEC = FeatureSpec(context_len=4, stride=2,
                   buckets={"item_id": 97, "author_id": 11, "content_type": 5, "topic": 7, "surface": 3})
LABEL_FIELDS = ("user_key", "ts", "item_id", "contribution", "like", "long_dwell", "prev_actions_known")


def events_of_day(day: int, users: int = 5, per_user: int = 4) -> list[dict]:
    """Events hours apart, and for user u1 also some seconds apart: one 20 s after its first of the
    day, one just after midnight and two just before the next, so some previous actions are still
    pending at the next event, within a day and across days (batches)."""
    rows = []

    def add(user: int, name: str, offset_ms: int, dwell_ms: int, i: int) -> None:
        rows.append({"event_id": f"d{day}-u{user}-{name}", "user_id": f"u{user}",
                     "item_id": f"i{(i * 7 + user) % 9}",
                     "author_id": "a", "content_type": ["video", "text"][i % 2], "topic": "t",
                     "surface": "feed", "event_ts": MONDAY + day * DAY_MS + offset_ms,
                     "dwell_ms": dwell_ms, "click": True, "like": (i + user) % 3 == 0,
                     "comment": False, "share": i == 2})

    for user in range(users):
        for i in range(per_user + user % 2):
            add(user, str(i), (user * 5 + i * 3) * HOUR_MS // 2, 2_000 * i, i)
        if user == 1:
            add(user, "early", 5_000, 0, 0)
            add(user, "burst", 5 * HOUR_MS // 2 + 20_000, 3_000, 1)
            add(user, "night", DAY_MS - 60_000, 0, 2)
            add(user, "midnight", DAY_MS - 10_000, 25_000, 3)
    return rows


def write_raw(root: Path, name: str, events: list[dict], date: str, schema: EventSchema = SPEC.event_schema) -> None:
    folder = root / f"date={date}" / "hour=00"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(events, schema=schema.raw_arrow_schema), folder / f"{name}.parquet")


def date_of(day: int) -> str:
    return str(np.datetime64(MONDAY + day * DAY_MS, "ms").astype("datetime64[D]"))


def config(raw: Path, out: Path, spec: FeatureSpec = SPEC, **incremental) -> FeaturesConfig:
    return FeaturesConfig(raw=str(raw), out=str(out), spec=spec, train_files=2, eval_files=1,
                          contract=ContractConfig(now_ms=MONDAY + 30 * DAY_MS),
                          incremental=IncrementalConfig(enabled=bool(incremental), **incremental))


def label_tokens(out: Path, files: list[str] | None = None, fields: tuple[str, ...] = LABEL_FIELDS) -> Counter:
    """Multiset of (user, ts, item, labels) over every loss_mask=1 position of the given files
    (default: every visible data file of both splits)."""
    paths = [out / name for name in files] if files is not None else \
        [path for split in ("train", "eval") for path in sorted((out / split).rglob("*.parquet"))
         if not path.name.startswith(".")]
    tokens: Counter = Counter()
    for path in paths:
        table = pq.read_table(path, columns=[*fields, "loss_mask"]).to_pylist()
        for row in table:
            for position, mask in enumerate(row["loss_mask"]):
                if mask == 1.0:
                    tokens[(row["user_key"], *(row[name][position] for name in fields[1:]))] += 1
    return tokens


def newest_files(out: Path) -> list[str]:
    entry = read_manifest(out)["batches"][-1]
    return entry["files"]["train"] + entry["files"]["eval"]


def rows_holding(out: Path, files: list[str], user: int, ts: int) -> list[dict]:
    """The rows of ``files`` in which the event of ``user`` at ``ts`` (seconds) bears its label."""
    rows = [row for name in files for row in pq.read_table(out / name).to_pylist()]
    return [row for row in rows if row["user_key"] == user and any(
        t == ts and mask == 1.0 for t, mask in zip(row["ts"], row["loss_mask"]))]


@pytest.fixture(scope="module")
def appended(spark, tmp_path_factory):
    """Days 0-1 as a full run, then day 2 appended by an incremental run (holdout 0)."""
    root = tmp_path_factory.mktemp("incremental")
    raw, out = root / "raw", root / "features"
    days = {day: events_of_day(day) for day in range(3)}
    write_raw(raw, "part-0", days[0] + days[1], date_of(0))
    run(spark, config(raw, out))
    assert pending_raw_files(config(raw, out)) == {}
    write_raw(raw, "part-0", days[2], date_of(2))
    assert pending_raw_files(config(raw, out)) == {str(raw / f"date={date_of(2)}" / "hour=00" / "part-0.parquet"):
                                                    len(days[2])}
    run_incremental(spark, config(raw, out, allowed_lateness_s=6 * 3600))
    return {"root": root, "raw": raw, "out": out, "days": days}


@pytest.mark.slow
def test_full_run_equals_full_run_plus_incremental_day(spark, appended):
    raw_all, days = appended["root"] / "raw_all", appended["days"]
    for day, events in days.items():
        write_raw(raw_all, "part-0", events, date_of(day))
    full_dir = appended["root"] / "full"
    run(spark, config(raw_all, full_dir))

    full, incremental = label_tokens(full_dir), label_tokens(appended["out"])
    assert sum(full.values()) == sum(len(events) for events in days.values())
    assert incremental == full
    # The first event of day 2 came 15 s after u1's last of day 1 (dwell 25 s): pending across the
    # batch boundary, and known or pending inside the new batch.
    first_of_day_2 = (user_key("u1"), (MONDAY + 2 * DAY_MS + 5_000) // 1000)
    assert [key[-1] for key in incremental if key[:2] == first_of_day_2] == [0.0]
    assert {key[-1] for key in label_tokens(appended["out"], newest_files(appended["out"]))} == {0.0, 1.0}
    assert max(incremental.values()) == 1
    newest = read_manifest(appended["out"])["batches"][-1]
    assert newest_files(appended["out"]) == newest["files"]["eval"]
    assert (newest["index"], newest["events"]) == (1, len(days[2]))
    assert not newest["files"]["train"]  # holdout 0: the whole batch is the freshest held-out slice
    full_eval = [str(path.relative_to(full_dir)) for path in (full_dir / "eval").rglob("*.parquet")]
    assert label_tokens(appended["out"], newest["files"]["eval"]) == label_tokens(full_dir, full_eval)


@pytest.mark.slow
def test_late_too_late_redelivered_events_and_a_crashed_append(spark, appended, monkeypatch):
    raw, out, days = appended["raw"], appended["out"], appended["days"]
    settings = config(raw, out, allowed_lateness_s=6 * 3600)
    watermark = read_manifest(out)["watermark_ms"]
    # u1's last events of day 2 (its context in the next batch) are at watermark − 50 s (dwell 0)
    # and at the watermark (dwell 25 s); this late event falls between them.
    late = {**days[2][0], "user_id": "u1", "event_id": "late-1", "event_ts": watermark - 30_000}
    assert watermark == MONDAY + 3 * DAY_MS - 10_000
    too_late = {**days[2][0], "event_id": "too-late-1", "event_ts": watermark - 30 * HOUR_MS}
    # Its id is remembered: inside the lateness window.
    redelivered = {event["event_id"]: event for event in days[2]}["d2-u1-night"]
    third = events_of_day(3, users=3)
    assert pending_raw_files(settings) == {}
    write_raw(raw, "part-late", [late, too_late, redelivered], date_of(2))  # an older partition
    write_raw(raw, "part-0", third, date_of(3))
    (raw / "_ignored.parquet").write_bytes(b"")  # what the job skips, the poller skips
    before = label_tokens(out)
    pending = pending_raw_files(settings)
    assert sorted(pending.values()) == sorted([3, len(third)])
    assert {Path(path).parent.parent.name for path in pending} == {f"date={date_of(2)}", f"date={date_of(3)}"}

    from features import incremental

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash at the commit point")

    monkeypatch.setattr(incremental.DatasetFiles, "replace_text", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_incremental(spark, settings)
    monkeypatch.undo()
    assert label_tokens(out) == before, "a crashed append must not be visible"
    assert read_manifest(out)["newest_batch"] == 1

    run_incremental(spark, settings)
    assert run_incremental(spark, settings)["newest_batch"] == 2, "a run with nothing new adds no batch"
    assert not list(out.rglob(".b0*.parquet")), "hidden leftovers of the crashed run remain"
    assert pending_raw_files(settings) == {}, "the poller sees files the job would read again"

    manifest = read_manifest(out)
    batch = manifest["batches"][2]
    assert (batch["late"], batch["too_late"], batch["duplicates"]) == (1, 1, 1)
    assert batch["events"] == len(third) + 1
    assert batch["quarantined_by_reason"] == {REASON_TOO_LATE: 1}
    quarantined = pq.read_table(next((out / "quarantine").glob("b000002-*.parquet"))).to_pylist()
    assert [(row["event_id"], row["reason"]) for row in quarantined] == [("too-late-1", REASON_TOO_LATE)]

    # The late event follows its user's stored events in the row, two of them later than itself:
    # the actions of its row predecessor, and those that predecessor carries, were not yet known.
    (late_row,) = rows_holding(out, batch["files"]["train"] + batch["files"]["eval"], user_key("u1"),
                               late["event_ts"] // 1000)
    at = late_row["ts"].index(late["event_ts"] // 1000)
    assert late_row["ts"][at - 2:at] == [(watermark - 50_000) // 1000, watermark // 1000]
    assert late_row["prev_actions_known"][at - 1:at + 1] == [0.0, 0.0]
    assert late_row["loss_mask"][at - 1:at + 1] == [0.0, 1.0]

    tokens = label_tokens(out)
    everything = sum(len(events) for events in days.values()) + len(third) + 1
    assert max(tokens.values()) == 1, "an event bears its label twice"
    assert sum(tokens.values()) == everything
    per_batch = [label_tokens(out, entry["files"]["train"] + entry["files"]["eval"])
                 for entry in manifest["batches"]]
    assert sum(per_batch, Counter()) == tokens, "the batches' file lists cover the dataset exactly"
    assert [sum(counter.values()) for counter in per_batch] == [
        len(days[0]) + len(days[1]), len(days[2]), len(third) + 1]
    consumed = json.loads((out / manifest["state"] / "consumed.json").read_text())
    assert len(consumed) == 4 and len(list((out / "_state").iterdir())) == 1

    # The batch run trained on batch 0's train part; a warm-start segment after it trains on
    # everything else but the freshest held-out slice, each event once.
    trained = label_tokens(out, manifest["batches"][0]["files"]["train"])
    trained += label_tokens(out, select(out, 0)["train"])
    held_out = label_tokens(out, select(out, 0)["eval"])
    assert max(trained.values()) == 1 and not set(trained) & set(held_out)
    assert trained + held_out == tokens
    assert label_tokens(out, select(out, 1)["train"]) == per_batch[1] + label_tokens(
        out, manifest["batches"][2]["files"]["train"])
    with pytest.raises(NothingNew):
        select(out, 2)


def test_a_run_with_another_spec_fails_naming_the_difference(spark, appended):
    """Checked before the run reads anything: the dataset is left as it was."""
    raw, out = appended["raw"], appended["out"]
    before = (out / MANIFEST_NAME).read_text()
    resized = FeatureSpec(context_len=4, stride=2, buckets={**SPEC.buckets, "topic": 8})
    with pytest.raises(SchemaError, match=r"categoricals\.topic\.buckets: 7 vs 8"):
        run_incremental(spark, config(raw, out, resized, allowed_lateness_s=60))
    with pytest.raises(SchemaError, match=r"holds schema 'feed'.*name: 'feed' vs 'watch'"):
        run_incremental(spark, config(raw, out, FeatureSpec(context_len=4, stride=2, schema="watch"),
                                      allowed_lateness_s=60))
    with pytest.raises(FeatureJobError, match="spec.context_len=4, this run has 5"):
        run_incremental(spark, config(raw, out, FeatureSpec(context_len=5, stride=2, buckets=SPEC.buckets),
                                      allowed_lateness_s=60))
    assert (out / MANIFEST_NAME).read_text() == before


WATCH = load_schema("watch")
WATCH_SPEC = FeatureSpec(context_len=4, stride=2, schema="watch", buckets={"post_id": 97, "creator_id": 11})
WATCH_LABELS = ("user_key", "ts", "post_id", "origin_post_id", "follow", "watched", "prev_actions_known")


@pytest.mark.slow
def test_another_schema_appends_with_its_recorded_fitted_schema(spark, tmp_path):
    """The watch schema (time in seconds, a shared table, item ages by post, a standardized numeric):
    a full run of the first days plus an incremental run of the last equals one full run, and the
    batch uses the standardize statistics the full run fitted, not a re-fit."""
    events = raw_events(WATCH, users=5, per_user=10, seed=3)
    by_date: dict[str, list[dict]] = {}
    for event in events:
        by_date.setdefault(str(np.datetime64(event["ts"], "s").astype("datetime64[D]")), []).append(event)
    *first_days, last_day = sorted(by_date)
    raw, raw_all, out, full_dir = (tmp_path / name for name in ("raw", "raw_all", "features", "full"))
    for date in first_days:
        write_raw(raw, "part-0", by_date[date], date, WATCH)
    for date in by_date:
        write_raw(raw_all, "part-0", by_date[date], date, WATCH)
    run(spark, config(raw, out, WATCH_SPEC))
    fitted = read_manifest(out)["spec"]
    write_raw(raw, "part-0", by_date[last_day], last_day, WATCH)
    manifest = run_incremental(spark, config(raw, out, WATCH_SPEC, allowed_lateness_s=6 * 3600))
    run(spark, config(raw_all, full_dir, WATCH_SPEC))

    assert manifest["spec"] == fitted and manifest["newest_batch"] == 1
    full, incremental = label_tokens(full_dir, fields=WATCH_LABELS), label_tokens(out, fields=WATCH_LABELS)
    assert sum(full.values()) == len({event["impression_id"] for event in events})
    assert incremental == full

    state = out / manifest["state"]
    assert pq.read_schema(next((state / "users").glob("*.parquet"))).names == list(WATCH.canonical_field_names)
    assert pq.read_schema(next((state / "items").glob("*.parquet"))).names == ["post_id", "item_first_ts"]
    recorded = FeatureSpec(**fitted).event_schema.config.numerics["log_video_s"].transforms
    assert recorded[-1].mean is not None
    batch = manifest["batches"][1]
    rows = [row for name in batch["files"]["eval"] for row in pq.read_table(out / name).to_pylist()]
    video_s = {event["ts"]: event["video_s"] for event in by_date[last_day]}
    checked = 0
    for row in rows:
        for position, mask in enumerate(row["loss_mask"]):
            if mask == 1.0 and row["ts"][position] in video_s:
                expected = transform([video_s[row["ts"][position]]], recorded)[0]
                assert row["log_video_s"][position] == np.float32(expected)
                checked += 1
    assert checked > 3
