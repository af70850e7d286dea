"""Shared fixtures of the feature tests: one real local SparkSession, and raw events built by hand
(:mod:`feature_support` builds them for any schema)."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_support import BASE_MS, FEED, Event, raw_ddl
from features.schema import EventSchema
from features.settings import SparkConfig
from features.spark import build_session


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    session = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="1g",
                                        conf={"spark.ui.enabled": "false"}), app_name="sirenfeed-tests")
    yield session
    session.stop()


@pytest.fixture
def new_event() -> Callable[..., Event]:
    """A valid raw feed event with a fresh ``event_id``; keyword arguments override fields."""
    serial = itertools.count()

    def make(**fields: Any) -> Event:
        event = {"event_id": f"e{next(serial):05d}", "user_id": "u1", "item_id": "i1",
                 "author_id": "a1", "content_type": "video", "topic": "news", "surface": "feed",
                 "event_ts": BASE_MS, "dwell_ms": 1_000, "click": False, "like": False,
                 "comment": False, "share": False}
        event.update(fields)
        return event

    return make


@pytest.fixture
def events_frame(spark: Any) -> Callable[..., Any]:
    """Raw events (a schema's raw columns and types, the feed's by default) as a Spark DataFrame. For
    the feed raw events are canonical events too: its role fields have the canonical names."""
    def make(events: list[Event], schema: EventSchema = FEED) -> Any:
        return spark.createDataFrame(events, schema=raw_ddl(schema))

    return make


@pytest.fixture(scope="session")
def write_landing() -> Callable[..., None]:
    """Writes raw events (of the feed, or of ``schema``) in the ingest landing-zone layout
    ``date=YYYY-MM-DD/hour=HH/part-0.parquet`` (by the UTC hour of the event time; events without a
    usable one go to the first hour), plus what a reader must skip: a hidden in-progress file next
    to each part and an ``_``-prefixed folder."""
    def write(root: Path, events: list[Event], schema: EventSchema = FEED) -> None:
        by_hour: dict[dt.datetime, list[Event]] = {}
        for event in events:
            value = event[schema.time_field]
            ts = value * schema.time_unit_ms if isinstance(value, int) and value > 0 else BASE_MS
            hour = dt.datetime.fromtimestamp(ts // 3_600_000 * 3_600, dt.timezone.utc)
            by_hour.setdefault(hour, []).append(event)
        for hour, rows in by_hour.items():
            folder = root / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema.raw_arrow_schema), folder / "part-0.parquet")
            (folder / ".part-1.parquet.inprogress").write_bytes(b"half-written")
        (root / "_offsets").mkdir(parents=True, exist_ok=True)
        (root / "_offsets" / "partition-0.parquet").write_bytes(b"not parquet at all")

    return write
