"""Another event schema through the real embedded broker: watch events (``schema=watch``) replayed,
consumed and landed under the watch schema's own fields, bad ones dead-lettered with its reasons."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from ingest_support import FAST_BATCHES, Stream, valid_event_ids

from features.schema import SCHEMA_VERSION, load_schema
from features.validation import check_message
from ingest.demo import bad_messages
from ingest.landing import LandingZone, read_dead_letters, read_landed
from ingest.producer import event_messages, raw_dates, read_day

pytestmark = pytest.mark.slow


def test_watch_events_land_with_the_watch_schema_and_bad_ones_are_dead_lettered(broker, watch_raw_dir, tmp_path):
    schema = load_schema("watch")
    stream = Stream(broker, tmp_path, schema="watch")
    try:
        contract = stream.config.contract
        messages = [message for files in raw_dates(watch_raw_dir).values()
                    for message in event_messages(read_day(files, schema), schema)]
        template = next(event for event, _ in (check_message(value, schema, contract) for _, value in messages)
                        if event is not None)
        square = json.dumps({**template, "format": "square", "schema_version": SCHEMA_VERSION}).encode()
        corpus = [("not_allowed:format", square)] + bad_messages(template, schema, contract)
        messages += [(b"bad", raw) for _, raw in corpus]

        produced = stream.produce(messages)
        consumer = stream.start_consumer(*FAST_BATCHES, until_idle_s=3)
        assert consumer.wait(timeout_s=120) == 0, consumer.logs()
        assert consumer.summary()["consumed"] == produced == len(messages)

        expected = valid_event_ids(messages, stream.config)
        landed = read_landed(stream.landing, schema=schema)
        assert Counter(landed.column("impression_id").to_pylist()) == expected
        files = sorted(stream.landing.glob("date=*/hour=*/*.parquet"))
        assert files
        for path in files:  # the watch fields, by the UTC hour of their time in seconds
            table = pq.read_table(path, schema=schema.raw_arrow_schema)
            assert pq.read_schema(path).remove_metadata().equals(schema.raw_arrow_schema)
            hours = {dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("date=%Y-%m-%d/hour=%H")
                     for ts in table.column("ts").to_pylist()}
            assert hours == {f"{path.parent.parent.name}/{path.parent.name}"}
        batches = LandingZone(stream.landing, stream.config.kafka.topic, schema=schema).landed_batches()
        newest = max(batch["max_event_ts_ms"] for batch in batches if batch["events"])
        assert newest == 1000 * max(landed.column("ts").to_pylist())

        rejected = Counter(reason for _, reason in (check_message(raw, schema, contract) for _, raw in messages)
                           if reason is not None)
        dead = read_dead_letters(stream.landing / "_dead_letter")
        assert Counter(dead.column("reason").to_pylist()) == rejected
        letters = set(zip(dead.column("raw").to_pylist(), dead.column("reason").to_pylist()))
        for reason, raw in corpus:
            assert (raw, reason) in letters
        assert rejected["not_allowed:format"] >= 1
    finally:
        stream.stop_all()
