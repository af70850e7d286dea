"""The replay side: which raw files, in which order, encoded how (no broker needed)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.dataset import MANIFEST_NAME
from features.schema import SCHEMA_VERSION, load_schema
from ingest.producer import RawInputError, event_messages, raw_dates, read_day


def test_dates_are_selected_in_order_and_underscore_directories_ignored(raw_dir):
    dates = list(raw_dates(raw_dir))
    assert len(dates) == 2 and dates == sorted(dates)
    assert list(raw_dates(raw_dir, from_date=dates[1])) == [dates[1]]
    assert list(raw_dates(raw_dir, to_date=dates[0])) == [dates[0]]
    assert all("_truth" not in str(path) for files in raw_dates(raw_dir).values() for path in files)


def test_a_day_is_sent_in_event_time_order_keyed_by_user(raw_dir):
    files = next(iter(raw_dates(raw_dir).values()))
    table = read_day(files)
    times = table.column("event_ts").to_pylist()
    assert times == sorted(times)
    key, value = next(event_messages(table))
    decoded = json.loads(value)
    assert decoded["schema_version"] == SCHEMA_VERSION
    assert set(decoded) == set(table.column_names) | {"schema_version"}
    assert key == (decoded["user_id"].encode() if decoded["user_id"] else None)
    assert sum(1 for _ in event_messages(table)) == table.num_rows


def test_files_outside_the_contract_and_unfinished_datasets_are_refused(tmp_path):
    day = tmp_path / "raw" / "date=2026-06-01"
    day.mkdir(parents=True)
    pq.write_table(pa.table({"event_id": ["e1"], "user_id": ["u1"]}), day / "part-0.parquet")
    with pytest.raises(RawInputError, match="raw event schema"):
        read_day(raw_dates(tmp_path / "raw")["2026-06-01"])
    (tmp_path / "raw" / MANIFEST_NAME).write_text("{}")
    with pytest.raises(RawInputError, match="success marker"):
        raw_dates(tmp_path / "raw")
    with pytest.raises(RawInputError, match="does not exist"):
        raw_dates(tmp_path / "missing")


def test_another_schema_is_read_in_its_time_order_keyed_by_its_user(raw_dir, watch_raw_dir):
    watch = load_schema("watch")
    files = next(iter(raw_dates(watch_raw_dir).values()))
    table = read_day(files, watch)
    times = table.column("ts").to_pylist()
    assert times == sorted(times) and table.schema.equals(watch.raw_arrow_schema)
    for key, value in event_messages(table, watch):
        decoded = json.loads(value)
        assert key == (decoded["viewer"].encode() if decoded["viewer"] else None)
    with pytest.raises(RawInputError, match="schema 'watch'"):
        read_day(next(iter(raw_dates(raw_dir).values())), watch)
