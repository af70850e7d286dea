"""The landing zone's exactly-once publish, including every state a crashed publisher can leave."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from features.schema import load_schema
from ingest.deadletter import DeadLetter
from ingest.landing import (
    BATCH_MANIFEST, METADATA_KEY, Batch, LandingZone, read_dead_letters, read_landed,
)

HOUR_MS = 3_600_000
T0 = 1_780_000_000_000 - 1_780_000_000_000 % (24 * HOUR_MS)  # a UTC midnight
TOPIC_ID = "0123456789abcdef0123456789abcdef"


def event(index: int, ts: int) -> dict:
    return {"event_id": f"e{index}", "user_id": f"u{index % 3}", "item_id": "i", "author_id": "a",
            "content_type": "video", "topic": "t", "surface": "feed", "event_ts": ts, "dwell_ms": 10,
            "click": True, "like": False, "comment": False, "share": False}


def batch(start: int, end: int, topic_id: str = TOPIC_ID, dead: int = 0, partition: int = 1) -> Batch:
    """Messages ``start..end``: the last ``dead`` are dead letters, the others span two hours."""
    valid = end - start + 1 - dead
    events = [event(start + i, T0 + 23 * HOUR_MS + i * HOUR_MS // max(valid, 1) * 2) for i in range(valid)]
    letters = [DeadLetter(raw=b"{oops", key=None, topic="events", partition=partition, offset=end - i,
                          kafka_timestamp_ms=T0, reason="not_json", dead_lettered_at_ms=T0)
               for i in range(dead)]
    return Batch("events", topic_id, partition, start, end, events, letters)


@pytest.fixture
def zone(tmp_path) -> LandingZone:
    return LandingZone(tmp_path / "landing", "events")


def test_a_batch_lands_by_event_hour_with_its_offsets_recorded(zone):
    published = zone.publish(batch(0, 9, dead=2), now_ms=T0 + 1)
    assert published is not None and published.events == 8
    relative = sorted(str(path.relative_to(zone.root)) for path in published.files)
    name = f"p0001-000000000000-000000000009-{TOPIC_ID}.parquet"
    day, next_day = "date=2026-05-28", "date=2026-05-29"
    assert relative == [f"_dead_letter/date=2026-05-28/dead-{name}", f"{day}/hour=23/part-{name}",
                        f"{next_day}/hour=00/part-{name}"]
    for path in published.files:
        origin = json.loads(pq.read_schema(path).metadata[METADATA_KEY])
        assert (origin["partition"], origin["start_offset"], origin["end_offset"]) == (1, 0, 9)
    landed = read_landed(zone.root)
    assert landed.schema.equals(load_schema("feed").raw_arrow_schema) and landed.num_rows == 8
    assert read_dead_letters(zone.dead_letter_root).column("offset").to_pylist() == [9, 8]
    assert zone.next_offset(1, TOPIC_ID) == 10
    assert zone.next_offset(1, "another-incarnation") is None
    assert zone.next_offset(2, TOPIC_ID) is None


def test_an_overlapping_batch_is_refused_and_the_next_one_accepted(zone):
    assert zone.publish(batch(0, 9)) is not None
    assert zone.publish(batch(5, 14)) is None  # a former owner's late copy
    assert zone.publish(batch(10, 19)) is not None
    assert zone.publish(batch(0, 4, topic_id="f" * 32)) is not None  # a new incarnation restarts at 0
    assert sorted(read_landed(zone.root).column("event_id").to_pylist()) == \
        sorted([f"e{i}" for i in range(20)] + [f"e{i}" for i in range(5)])
    assert [(b["start_offset"], b["end_offset"]) for b in zone.landed_batches()] == [(0, 9), (10, 19), (0, 4)]


def test_a_crash_before_the_manifest_leaves_nothing(zone):
    staged = zone.stage(batch(0, 9, dead=1))
    (staged / BATCH_MANIFEST).unlink()  # the crash came before the commit point
    assert zone.resume_offset(1, TOPIC_ID) is None
    assert not staged.exists()
    assert read_landed(zone.root).num_rows == 0 and not list(zone.dead_letter_root.rglob("*.parquet"))


def test_a_crash_after_the_manifest_is_rolled_forward(zone):
    staged = zone.stage(batch(0, 9, dead=1))
    assert read_landed(zone.root).num_rows == 0  # staged files are invisible
    assert zone.resume_offset(1, TOPIC_ID) == 10  # a new owner finishes the batch before resuming
    assert not staged.exists()
    assert read_landed(zone.root).num_rows == 9
    assert read_dead_letters(zone.dead_letter_root).num_rows == 1


def test_a_crash_between_renames_is_finished_without_duplicates(zone):
    staged = zone.stage(batch(0, 9))
    manifest = json.loads((staged / BATCH_MANIFEST).read_text())
    first = manifest["files"][0]
    target = zone.root / first["target"]
    target.parent.mkdir(parents=True)
    (staged / first["staged"]).rename(target)  # one file moved, then the crash
    assert zone.resume_offset(1, TOPIC_ID) == 10
    assert sorted(read_landed(zone.root).column("event_id").to_pylist()) == sorted(f"e{i}" for i in range(10))


def test_recovery_is_idempotent_after_a_crash_before_cleanup(zone):
    staged = zone.stage(batch(0, 9, dead=1))
    leftover = staged.parent / "copy"
    shutil.copytree(staged, leftover)
    zone.apply(staged)
    leftover.rename(staged)  # as if the crash came after the renames and the ledger, before cleanup
    before = {path: path.read_bytes() for path in zone.root.rglob("*.parquet") if "_ingest" not in path.parts}
    assert zone.resume_offset(1, TOPIC_ID) == 10
    after = {path: path.read_bytes() for path in zone.root.rglob("*.parquet") if "_ingest" not in path.parts}
    assert after == before
    assert len(zone.landed_batches()) == 1
    assert not list(zone.staging_dir(1).iterdir())


def test_recovery_removes_what_an_interrupted_ledger_write_left(zone):
    zone.publish(batch(0, 9))
    leftover = zone.landed_dir(1, TOPIC_ID) / ".000000000010-000000000019.json.k3x9"
    leftover.write_text("{")  # a SIGKILL between the temporary write and its rename
    assert zone.resume_offset(1, TOPIC_ID) == 10
    assert not leftover.exists()


def test_events_of_another_schema_land_by_their_own_time_field(tmp_path):
    watch = load_schema("watch")
    zone = LandingZone(tmp_path / "landing", "watch-events", schema=watch)
    seconds = T0 // 1000 + 23 * 3600
    events = [{"impression_id": f"w{i}", "viewer": "v1", "ts": seconds + i * 1800, "tz_offset_min": 60,
               "post_id": "p1", "origin_post_id": "p0", "creator_id": "c1", "format": "short",
               "country": "de", "video_s": 12.5, "watch_ms": 3000, "hide": False, "follow": i == 1}
              for i in range(3)]
    published = zone.publish(Batch("watch-events", TOPIC_ID, 0, 0, 2, events))
    assert sorted(str(path.relative_to(zone.root)).split("/part-")[0] for path in published.files) == [
        "date=2026-05-28/hour=23", "date=2026-05-29/hour=00"]
    assert published.max_event_ts_ms == (seconds + 3600) * 1000
    landed = read_landed(zone.root, schema=watch)
    assert landed.schema.equals(watch.raw_arrow_schema)
    assert landed.column("impression_id").to_pylist() == ["w0", "w1", "w2"]
