"""Shared fixtures of the feature tests: one real local SparkSession, and raw events built by hand."""

from __future__ import annotations

import datetime as dt
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.schema import RAW_ARROW_SCHEMA, spark_ddl
from features.settings import SparkConfig
from features.spark import build_session

BASE_MS = 1_780_272_000_000
"""2026-06-01T00:00:00Z, a Monday: the default ``event_ts`` of :func:`new_event`."""

Event = dict[str, Any]


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    session = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="1g",
                                        conf={"spark.ui.enabled": "false"}), app_name="sirenfeed-tests")
    yield session
    session.stop()


@pytest.fixture
def new_event() -> Callable[..., Event]:
    """A valid raw event with a fresh ``event_id``; keyword arguments override fields."""
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
def events_frame(spark: Any) -> Callable[[list[Event]], Any]:
    """Raw events (contract columns and types) as a Spark DataFrame."""
    def make(events: list[Event]) -> Any:
        return spark.createDataFrame(events, schema=spark_ddl())

    return make


@pytest.fixture(scope="session")
def write_landing() -> Callable[[Path, list[Event]], None]:
    """Writes events in the ingest landing-zone layout ``date=YYYY-MM-DD/hour=HH/part-0.parquet``
    (by the UTC hour of ``event_ts``; events without one go to the first hour), plus what a reader
    must skip: a hidden in-progress file next to each part and an ``_``-prefixed folder."""
    def write(root: Path, events: list[Event]) -> None:
        by_hour: dict[dt.datetime, list[Event]] = {}
        for event in events:
            ts = event["event_ts"] if isinstance(event["event_ts"], int) and event["event_ts"] > 0 else BASE_MS
            hour = dt.datetime.fromtimestamp(ts // 3_600_000 * 3_600, dt.timezone.utc)
            by_hour.setdefault(hour, []).append(event)
        for hour, rows in by_hour.items():
            folder = root / f"date={hour:%Y-%m-%d}" / f"hour={hour:%H}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=RAW_ARROW_SCHEMA), folder / "part-0.parquet")
            (folder / ".part-1.parquet.inprogress").write_bytes(b"half-written")
        (root / "_offsets").mkdir(parents=True, exist_ok=True)
        (root / "_offsets" / "partition-0.parquet").write_bytes(b"not parquet at all")

    return write
