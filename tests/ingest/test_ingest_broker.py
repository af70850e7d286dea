"""The embedded broker: the ``sirenfeed broker`` command, and what a restart (memory storage) does."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
from ingest_support import (
    FAST_BATCHES, PARTITIONS, Stream, assert_ledger_contiguous, valid_event_ids, wait_until,
)
from kafka import KafkaAdminClient

from common.config import load_config
from common.repo import REPO_ROOT
from ingest.broker import BrokerError, EmbeddedBroker, ensure_topics
from ingest.clients import bootstrap_servers
from ingest.config import IngestConfig
from ingest.landing import LandingZone, read_landed

pytestmark = pytest.mark.slow

LANDED = "sirenfeed_ingest_events_landed_total"


def test_broker_command_creates_topics_publishes_its_address_and_stops_on_sigterm(tmp_path):
    run_dir = tmp_path / "run"
    config = load_config(IngestConfig, overrides=[f"broker.run_dir={run_dir}"])
    with pytest.raises(BrokerError, match="sirenfeed broker"):
        bootstrap_servers(config)  # nothing running yet: the error says what to do

    command = [sys.executable, "-m", "ingest.broker", "--topics", "alpha", "beta",
               f"broker.run_dir={run_dir}", "kafka.partitions=3"]
    broker = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: (run_dir / "broker.json").is_file() or broker.poll() is not None, 30,
                   "the broker's state file")
        state = json.loads((run_dir / "broker.json").read_text())
        assert bootstrap_servers(config) == state["address"]
        assert state["address"].startswith("127.0.0.1:")
        admin = KafkaAdminClient(bootstrap_servers=state["address"])
        try:
            described = {topic["name"]: topic for topic in admin.describe_topics(["alpha", "beta"])}
        finally:
            admin.close()
        assert {name: len(topic["partitions"]) for name, topic in described.items()} == \
            {"alpha": 3, "beta": 3}
        second = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, timeout=60)
        assert second.returncode == 1 and b"already running" in second.stderr

        broker.send_signal(signal.SIGTERM)
        assert broker.wait(timeout=30) == 0, broker.stdout.read().decode()
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
            if (run_dir / "broker.json").is_file():  # tansu runs in a session of its own
                os.kill(json.loads((run_dir / "broker.json").read_text())["pid"], signal.SIGKILL)
        broker.stdout.close()
    assert not (run_dir / "broker.json").exists()
    with pytest.raises(ProcessLookupError):
        os.kill(state["pid"], 0)


def test_a_restarted_memory_broker_leaves_landed_data_intact(tmp_path, raw_messages):
    config = load_config(IngestConfig, overrides=[f"broker.run_dir={tmp_path / 'broker'}",
                                                  f"kafka.partitions={PARTITIONS}"])
    broker = EmbeddedBroker(config)
    broker.start()
    stream = Stream(broker, tmp_path)
    try:
        before, after = list(raw_messages.values())
        consumer = stream.start_consumer(*FAST_BATCHES)
        stream.produce(before)
        first_wave = valid_event_ids(before, stream.config)
        consumer.wait_for_metric(LANDED, lambda count: count == sum(first_wave.values()), timeout_s=60)
        landed_files = _checksums(stream)

        address = broker.address
        broker.restart()  # same port, empty: offsets from 0 under a new topic id
        assert broker.address == address
        ensure_topics(address, stream.config.broker_topics, PARTITIONS)
        stream.produce(after)
        second_wave = valid_event_ids(after, stream.config)
        consumer.wait_for_metric(LANDED, lambda count: count >= sum((first_wave + second_wave).values()),
                                 timeout_s=90)
        assert consumer.terminate() == 0, consumer.logs()
    finally:
        stream.stop_all()
        broker.stop()

    current = _checksums(stream)
    assert {path: current.get(path) for path in landed_files} == landed_files  # nothing rewritten
    landed = Counter(read_landed(stream.landing).column("event_id").to_pylist())
    assert landed == first_wave + second_wave
    batches = LandingZone(stream.landing, stream.config.kafka.topic).landed_batches()
    covered = assert_ledger_contiguous(batches)  # each incarnation's offsets from 0, once
    assert len({topic_id for _, topic_id in covered}) == 2
    assert sum(covered.values()) == len(before) + len(after)


def _checksums(stream: Stream) -> dict[str, str]:
    return {str(path.relative_to(stream.landing)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(stream.landing.rglob("*.parquet"))}

