"""Exactly once across crashes: consumers SIGKILLed at random moments while the stream flows, with
either client library."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest
from ingest_support import FAST_BATCHES, Stream, assert_ledger_contiguous, valid_event_ids

from ingest.config import CLIENTS
from ingest.landing import LandingZone, read_landed

pytestmark = pytest.mark.slow

KILLS = 3
# A killed member holds its partitions until its session times out; keep that short here.
QUICK_REJOIN = ("kafka.session_timeout_ms=2000", "kafka.heartbeat_interval_ms=250")
PUBLISHED = 'sirenfeed_ingest_batches_total{outcome="published"}'


@pytest.mark.parametrize("client", CLIENTS)
def test_sigkilled_consumers_neither_lose_nor_duplicate(broker, tmp_path, raw_messages, client):
    stream = Stream(broker, tmp_path, client=client)
    try:
        crash_and_check(stream, raw_messages)
    finally:
        stream.stop_all()


def crash_and_check(stream: Stream, raw_messages) -> None:
    messages = [message for day in raw_messages.values() for message in day]
    rate = len(messages) / 15  # the stream keeps flowing through the kills
    producer = threading.Thread(target=stream.produce, args=(messages, rate), daemon=True)
    producer.start()
    chooser = random.Random(20240601)
    for _ in range(KILLS):
        consumer = stream.start_consumer(*FAST_BATCHES, *QUICK_REJOIN)
        # Killed only once it is landing, at a random point of its 0.3 s batch cycle.
        consumer.wait_for_metric(PUBLISHED, lambda count: count > 0, timeout_s=60)
        time.sleep(chooser.uniform(0.05, 1.0))
        consumer.kill()
    producer.join(timeout=60)
    assert not producer.is_alive()

    final = stream.start_consumer(*FAST_BATCHES, *QUICK_REJOIN, until_idle_s=3)
    assert final.wait(timeout_s=120) == 0, final.logs()

    landed = Counter(read_landed(stream.landing).column("event_id").to_pylist())
    expected = valid_event_ids(messages, stream.config)
    assert landed == expected, (f"missing {sorted((expected - landed).items())[:10]}, duplicated "
                                f"{sorted((landed - expected).items())[:10]}\n{stream.all_logs()}")
    zone = LandingZone(stream.landing, stream.config.kafka.topic)
    covered = assert_ledger_contiguous(zone.landed_batches())
    assert sum(covered.values()) == len(messages)
    # Nothing half-published is left behind.
    assert not list(stream.landing.glob("_ingest/*/partition=*/staging/*"))
    temporary = [path for path in stream.landing.rglob(".*") if path.name != ".lock"]
    assert not temporary
