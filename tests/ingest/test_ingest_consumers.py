"""Consumer-group behaviour: two members split the partitions; a graceful stop publishes what is open."""

from __future__ import annotations

import signal
from collections import Counter, defaultdict

import pytest
from ingest_support import FAST_BATCHES, PARTITIONS, valid_event_ids, wait_until

from ingest.landing import LandingZone, read_landed

pytestmark = pytest.mark.slow

ASSIGNED = "sirenfeed_ingest_assigned_partitions"
LANDED = "sirenfeed_ingest_events_landed_total"


def test_two_consumers_split_the_partitions_and_land_everything_once(stream, raw_messages):
    first = stream.start_consumer(*FAST_BATCHES)
    first.wait_for_metric(ASSIGNED, lambda count: count == PARTITIONS, timeout_s=60)
    second = stream.start_consumer(*FAST_BATCHES)
    wait_until(lambda: first.alive_or_fail() and second.alive_or_fail()
               and first.metric(ASSIGNED) > 0 and second.metric(ASSIGNED) > 0
               and first.metric(ASSIGNED) + second.metric(ASSIGNED) == PARTITIONS,
               timeout_s=60, what=f"the group to rebalance\n{first.logs()}\n{second.logs()}")

    messages = [message for day in raw_messages.values() for message in day]
    stream.produce(messages)
    expected = valid_event_ids(messages, stream.config)
    wait_until(lambda: first.metric(LANDED) + second.metric(LANDED) >= sum(expected.values()),
               timeout_s=60, what=f"everything to land\n{first.logs()}\n{second.logs()}")
    for consumer in (first, second):
        consumer.process.send_signal(signal.SIGTERM)  # both at once: no rebalance onto the last one
    assert first.wait() == 0, first.logs()
    assert second.wait() == 0, second.logs()

    landed = Counter(read_landed(stream.landing).column("event_id").to_pylist())
    assert landed == expected
    writers_of_partition: dict[int, set[str]] = defaultdict(set)
    for batch in LandingZone(stream.landing, stream.config.kafka.topic).landed_batches():
        writers_of_partition[batch["partition"]].add(batch["writer"])
    assert sorted(writers_of_partition) == list(range(PARTITIONS))
    assert all(len(writers) == 1 for writers in writers_of_partition.values())
    assert len(set.union(*writers_of_partition.values())) == 2
    assert first.summary()["consumed"] + second.summary()["consumed"] == len(messages)


def test_graceful_stop_publishes_the_open_batches(stream, raw_messages):
    # Batches that never fill up and never time out: only the stop can publish them.
    consumer = stream.start_consumer("consumer.max_seconds=600", "consumer.max_events=1000000")
    messages = next(iter(raw_messages.values()))
    stream.produce(messages)
    consumer.wait_for_metric("sirenfeed_ingest_events_consumed_total",
                             lambda count: count == len(messages), timeout_s=60)
    assert consumer.metric(LANDED) == 0
    assert not list(stream.landing.glob("date=*"))

    assert consumer.terminate() == 0, consumer.logs()
    landed = Counter(read_landed(stream.landing).column("event_id").to_pylist())
    assert landed == valid_event_ids(messages, stream.config)
    assert consumer.summary()["landed"] == sum(landed.values())
