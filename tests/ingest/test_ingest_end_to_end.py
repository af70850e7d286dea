"""Replay → Kafka → ingest consumer → landing zone, on the real embedded broker."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest
from ingest_support import FAST_BATCHES, assert_ledger_contiguous, read_topic, valid_event_ids

from common.repo import REPO_ROOT
from features.validation import check_message
from ingest.demo import bad_messages
from ingest.landing import METADATA_KEY, LandingZone, read_dead_letters, read_landed

pytestmark = pytest.mark.slow


def test_replay_lands_every_valid_event_once_and_dead_letters_the_rest(stream, raw_messages):
    good = [message for day in raw_messages.values() for message in day]
    schema, contract = stream.config.event_schema, stream.config.contract
    template = next(event for event, _ in (check_message(value, schema, contract) for _, value in good)
                    if event is not None)
    corpus = bad_messages(template, schema, contract) + [("not_json", None)]  # a tombstone
    assert len({reason.split(":")[0] for reason, _ in corpus}) >= 10
    messages = list(good)
    step = len(good) // (len(corpus) + 1)
    for index, (_, raw) in enumerate(corpus):  # bad messages among the good ones, from several keys
        messages.insert((index + 1) * step + index, (f"bad-{index % 3}".encode(), raw))

    produced = stream.produce(messages)
    consumer = stream.start_consumer(*FAST_BATCHES, until_idle_s=3)
    assert consumer.wait(timeout_s=120) == 0, consumer.logs()

    expected = valid_event_ids(messages, stream.config)
    landed = read_landed(stream.landing)
    assert Counter(landed.column("event_id").to_pylist()) == expected
    summary = consumer.summary()
    assert summary["consumed"] == produced == len(messages)
    assert summary["landed"] == sum(expected.values()) == landed.num_rows

    # Every rejected message is dead-lettered once, with its reason and its raw bytes.
    rejected = Counter(reason for _, reason in (check_message(raw or b"", schema, contract)
                                                for _, raw in messages) if reason is not None)
    dead = read_dead_letters(stream.landing / "_dead_letter")
    assert Counter(dead.column("reason").to_pylist()) == rejected
    assert summary["dead_lettered"] == dict(sorted(rejected.items()))
    letters = set(zip(dead.column("raw").to_pylist(), dead.column("reason").to_pylist()))
    for reason, raw in corpus:
        assert (raw or b"", reason) in letters
    for record in read_topic(stream.config, stream.config.kafka.dead_letter_topic, sum(rejected.values())):
        headers = {key: value.decode() for key, value in record.headers}
        assert (record.value or b"", headers["reason"]) in letters
    dead_topic = read_topic(stream.config, stream.config.kafka.dead_letter_topic, sum(rejected.values()) + 1,
                            timeout_s=1.5)
    assert len(dead_topic) == sum(rejected.values())

    # The ledger covers every offset once; the files say which offsets they came from.
    zone = LandingZone(stream.landing, stream.config.kafka.topic)
    covered = assert_ledger_contiguous(zone.landed_batches())
    assert sum(covered.values()) == produced

    # Same key, same partition; and each user's events land in the order they happened.
    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    times_of_user: dict[str, list[int]] = defaultdict(list)
    files = sorted(stream.landing.glob("date=*/hour=*/*.parquet"),
                   key=lambda path: (path.name, path.parent.parent.name, path.parent.name))
    for path in files:
        table = pq.read_table(path)
        origin = json.loads(table.schema.metadata[METADATA_KEY])
        assert path.name == f"part-{origin['batch_id']}.parquet"
        for user, ts in zip(table.column("user_id").to_pylist(), table.column("event_ts").to_pylist()):
            partitions_of_user[user].add(origin["partition"])
            times_of_user[user].append(ts)
    assert all(len(partitions) == 1 for partitions in partitions_of_user.values())
    assert all(times == sorted(times) for times in times_of_user.values())


def test_produce_command_replays_the_chosen_dates_at_a_rate(stream, raw_dir, raw_messages):
    _, last = sorted(raw_messages)
    command = [sys.executable, "-m", "ingest.producer", "--raw", str(raw_dir), "--from", last, "--to", last,
               "--rate", "2000", *stream.overrides]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    report = json.loads(done.stdout)
    assert report["dates"] == [last] and report["sent"] == len(raw_messages[last])
    assert report["events_per_s"] <= 2000 * 1.1
    records = read_topic(stream.config, stream.config.kafka.topic, report["sent"])
    assert sorted(record.value for record in records) == sorted(value for _, value in raw_messages[last])
