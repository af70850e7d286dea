"""Helpers of the ingest tests: consumer subprocesses (``python -m ingest.consumer``, so that a
SIGKILL is a real one), a fresh topic pair per test on the shared broker, metric scraping, and checks
of the landing zone's ledger. Fixtures built from them live in ``conftest.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from common.config import load_config
from common.repo import REPO_ROOT
from features.validation import check_message
from ingest.broker import EmbeddedBroker, ensure_topics, free_port
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.producer import send_messages

PARTITIONS = 4
# Small batches, so that a run publishes many of them and a kill can land in the middle of one.
FAST_BATCHES = ("consumer.max_seconds=0.3", "consumer.max_events=150", "consumer.poll_ms=100")

Message = tuple[bytes | None, bytes | None]


def valid_event_ids(messages: Iterable[Message], config: IngestConfig) -> Counter:
    schema = config.event_schema
    verdicts = (check_message(value or b"", schema, config.contract) for _, value in messages)
    return Counter(event[schema.config.event_id] for event, _ in verdicts if event is not None)


def metric_values(port: int) -> dict[str, float]:
    """``name{label="v",...}`` → value of a consumer's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{key}="{value}"' for key, value in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


class ConsumerProcess:
    """``python -m ingest.consumer`` in its own process, with its Prometheus endpoint."""

    def __init__(self, args: list[str], log_dir: Path, name: str) -> None:
        self.metrics_port = free_port()
        self.stdout_path = log_dir / f"{name}.out"
        self.log_path = log_dir / f"{name}.log"
        command = [sys.executable, "-m", "ingest.consumer", *args, f"metrics.port={self.metrics_port}"]
        with open(self.stdout_path, "wb") as stdout, open(self.log_path, "wb") as stderr:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=stdout, stderr=stderr,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def metric(self, name: str) -> float:
        try:
            return metric_values(self.metrics_port).get(name, 0.0)
        except OSError:
            return 0.0  # not serving yet

    def wait_for_metric(self, name: str, predicate: Callable[[float], bool], timeout_s: float) -> float:
        wait_until(lambda: self.alive_or_fail() and predicate(self.metric(name)), timeout_s,
                   f"{name} of consumer pid {self.process.pid}\n{self.logs()}")
        return self.metric(name)

    def alive_or_fail(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"consumer exited with {self.process.returncode}\n{self.logs()}")
        return True

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout_s: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def wait(self, timeout_s: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"consumer did not exit within {timeout_s}s\n{self.logs()}") from None

    def summary(self) -> dict:
        return json.loads(self.stdout_path.read_text())

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


class Stream:
    """A fresh topic pair and consumer group on the shared broker, and a landing zone, for one test;
    its producer and consumers use the client library ``client`` (empty: the configured default)."""

    def __init__(self, broker: EmbeddedBroker, tmp_path: Path, schema: str = "feed", client: str = "") -> None:
        tag = uuid.uuid4().hex[:8]
        self.broker = broker
        self.tmp_path = tmp_path
        self.landing = tmp_path / "landing"
        self.overrides = [f"kafka.bootstrap_servers={broker.address}", f"kafka.topic=events-{tag}",
                          f"kafka.dead_letter_topic=dead-{tag}", f"kafka.group_id=group-{tag}",
                          f"kafka.partitions={PARTITIONS}", "metrics.report_lag=false",
                          f"broker.run_dir={tmp_path / 'run'}", f"landing.dir={self.landing}",
                          f"schema={schema}", *([f"kafka.client={client}"] if client else [])]
        self.config = load_config(IngestConfig, overrides=self.overrides)
        ensure_topics(broker.address, self.config.broker_topics, PARTITIONS)
        self._consumers = 0
        self._running: list[ConsumerProcess] = []

    def produce(self, messages: Iterable[Message], rate: float = 0.0) -> int:
        producer = make_producer(self.config)
        try:
            return send_messages(producer, self.config.kafka.topic, messages, rate=rate)
        finally:
            producer.close()

    def start_consumer(self, *overrides: str, until_idle_s: float | None = None) -> ConsumerProcess:
        self._consumers += 1
        args = ["--out", str(self.landing)]
        if until_idle_s is not None:
            args += ["--until-idle", str(until_idle_s)]
        args += [*self.overrides, *overrides]  # key=value overrides after every option
        consumer = ConsumerProcess(args, self.tmp_path, f"consumer-{self._consumers}")
        self._running.append(consumer)
        return consumer

    def all_logs(self) -> str:
        return "\n".join(f"--- consumer pid {consumer.process.pid}\n{consumer.logs()}"
                         for consumer in self._running)

    def stop_all(self) -> None:
        for consumer in self._running:
            if consumer.process.poll() is None:
                consumer.process.kill()
                consumer.process.wait()


def read_topic(config: IngestConfig, topic: str, count: int, timeout_s: float = 30) -> list:
    """Up to ``count`` records of ``topic`` (all partitions, from the start), read without a group."""
    reader = KafkaConsumer(bootstrap_servers=config.kafka.bootstrap_servers, group_id=None,
                           enable_auto_commit=False, auto_offset_reset="earliest")
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic))]
        reader.assign(partitions)
        reader.seek_to_beginning(*partitions)
        records: list = []
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in reader.poll(timeout_ms=200).values():
                records.extend(batch)
        return records
    finally:
        reader.close()


def assert_ledger_contiguous(batches: list[dict]) -> dict[tuple[int, str], int]:
    """Landed batches of each (partition, topic id) cover offsets 0.. without gap or overlap;
    returns the number of messages landed per (partition, topic id)."""
    covered: dict[tuple[int, str], int] = {}
    for batch in sorted(batches, key=lambda b: (b["partition"], b["topic_id"], b["start_offset"])):
        key = (batch["partition"], batch["topic_id"])
        expected_start = covered.get(key, 0)
        assert batch["start_offset"] == expected_start, f"gap or overlap before {batch['batch_id']}"
        assert batch["messages"] == batch["events"] + batch["dead_letters"]
        covered[key] = batch["end_offset"] + 1
    return covered
