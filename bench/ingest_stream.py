"""Ingest benchmark: sustained produce → landed-Parquet throughput with one and two consumers, and
freshness (event sent → its Parquet file visible) at a fixed offered rate.

    .venv/bin/python bench/ingest_stream.py [--events N] [--rate EVENTS_PER_S] [--seconds S]

Runs on the embedded broker with consumer subprocesses (``python -m ingest.consumer``, default
batching: ``consumer.max_events``, ``consumer.max_seconds``), on synthetic events. A file's visibility
time is its ctime, which the publishing rename sets. Writes ``bench/results/ingest.json`` (atomically).
All numbers of one file come from one run on one machine; compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
from prometheus_client.parser import text_string_to_metric_families

from common.config import load_config
from common.files import visible_files, write_json
from common.repo import REPO_ROOT
from features.synth import SynthConfig, write_synthetic_logs
from features.validation import check_message
from ingest.broker import embedded_broker, ensure_topics, free_port
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.producer import event_messages, raw_dates, read_day, send_messages

RESULTS = REPO_ROOT / "bench" / "results" / "ingest.json"
LANDED = "sirenfeed_ingest_events_landed_total"
ASSIGNED = "sirenfeed_ingest_assigned_partitions"


def synthetic_messages(events: int, work: Path) -> list[tuple[bytes | None, bytes]]:
    """About ``events`` valid replay messages (one synthetic day, about 20 events per user)."""
    start = (dt.date.today() - dt.timedelta(days=3)).isoformat()
    raw = work / "raw"
    write_synthetic_logs(SynthConfig(users=max(1, events // 20), days=1, seed=11, start_date=start,
                                     bad_fraction=0.0, duplicate_fraction=0.0), raw)
    messages = [message for files in raw_dates(raw).values() for message in event_messages(read_day(files))]
    return messages[:events]


class Consumer:
    def __init__(self, overrides: list[str], landing: Path, log_path: Path) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "ingest.consumer", "--out", str(landing), *overrides,
                   f"metrics.port={self.port}"]
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def metric(self, name: str) -> float:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and not sample.labels:
                    return sample.value
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def fresh_stream(address: str, work: Path, partitions: int) -> tuple[IngestConfig, list[str]]:
    tag = uuid.uuid4().hex[:8]
    overrides = [f"kafka.bootstrap_servers={address}", f"kafka.topic=bench-{tag}",
                 f"kafka.dead_letter_topic=bench-dead-{tag}", f"kafka.group_id=bench-{tag}",
                 f"kafka.partitions={partitions}", "metrics.report_lag=false"]
    config = load_config(IngestConfig, overrides=overrides + [f"landing.dir={work / tag}"])
    ensure_topics(address, config.broker_topics, partitions)
    return config, overrides


def throughput(address: str, work: Path, messages, consumers: int, partitions: int) -> dict:
    """Time from the first send until every event has landed, with ``consumers`` group members."""
    config, overrides = fresh_stream(address, work, partitions)
    landing = Path(config.landing.dir)
    members = [Consumer(overrides, landing, work / f"consumer-{consumers}-{index}.log")
               for index in range(consumers)]
    try:
        wait_for(lambda: sum(member.metric(ASSIGNED) for member in members) == partitions
                 and all(member.metric(ASSIGNED) > 0 for member in members), 90, "the group to settle")
        producer = make_producer(config)
        started = time.perf_counter()
        send_messages(producer, config.kafka.topic, messages, description=f"produce ({consumers} consumer)")
        produced_s = time.perf_counter() - started
        producer.close()
        wait_for(lambda: sum(member.metric(LANDED) for member in members) >= len(messages), 600, "landing")
        landed_s = time.perf_counter() - started
    finally:
        for member in members:
            member.stop()
    return {"consumers": consumers, "events": len(messages), "produce_seconds": round(produced_s, 3),
            "produce_events_per_s": round(len(messages) / produced_s),
            "landed_seconds": round(landed_s, 3), "events_per_s": round(len(messages) / landed_s)}


def freshness(address: str, work: Path, messages, rate: float, partitions: int) -> dict:
    """Latency from ``send()`` to the event's file becoming visible, at ``rate`` events per second."""
    config, overrides = fresh_stream(address, work, partitions)
    landing = Path(config.landing.dir)
    consumer = Consumer(overrides, landing, work / "consumer-freshness.log")
    sent_at: dict[str, float] = {}
    try:
        wait_for(lambda: consumer.metric(ASSIGNED) == partitions, 90, "the consumer to join")

        def timed():
            for key, value in messages:
                sent_at[json.loads(value)["event_id"]] = time.time()
                yield key, value

        producer = make_producer(config)
        send_messages(producer, config.kafka.topic, timed(), rate=rate, description="produce (fixed rate)")
        producer.close()
        wait_for(lambda: consumer.metric(LANDED) >= len(messages), 300, "landing")
    finally:
        consumer.stop()
    latencies = []
    for path in visible_files(landing):
        visible_at = path.stat().st_ctime
        event_ids = pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist()
        latencies += [visible_at - sent_at[event_id] for event_id in event_ids]
    latencies.sort()
    return {"offered_events_per_s": rate, "events": len(latencies),
            "p50_s": round(statistics.median(latencies), 3),
            "p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "max_s": round(latencies[-1], 3),
            "consumer_max_seconds": config.consumer.max_seconds,
            "consumer_max_events": config.consumer.max_events}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000, help="events for the throughput runs")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate of the freshness run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the freshness run")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        contract = load_config(IngestConfig).contract
        fixed_rate_events = int(args.rate * args.seconds)
        generated = synthetic_messages(max(args.events, fixed_rate_events), work)
        # Every run waits until all its events have landed: keep the valid ones only.
        messages = [message for message in generated if check_message(message[1], contract)[0] is not None]
        config = load_config(IngestConfig, overrides=[f"broker.run_dir={work / 'broker'}"])
        with embedded_broker(config) as address:
            one = throughput(address, work, messages[:args.events], 1, args.partitions)
            two = throughput(address, work, messages[:args.events], 2, args.partitions)
            fresh = freshness(address, work, messages[:fixed_rate_events], args.rate, args.partitions)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "ingest", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "partitions": args.partitions,
        "throughput": {"one_consumer": one, "two_consumers": two,
                       "two_over_one": round(two["events_per_s"] / one["events_per_s"], 2)},
        "freshness": fresh,
    }
    write_json(RESULTS, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
