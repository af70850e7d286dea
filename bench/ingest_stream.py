"""Ingest benchmark: consumer-only and end-to-end throughput, and freshness at a fixed offered rate.

    .venv/bin/python bench/ingest_stream.py [--events N] [--clients kafka-python confluent-kafka]
        [--before REV] [--profile] [--rate EVENTS_PER_S] [--seconds S] [--repeat K]

On the embedded broker, one consumer (``python -m ingest.consumer``, default batching) and one
producer (``send_messages``), each its own process, on synthetic valid events of one day replayed
in event-time order:

- **consumer only**: the topic is filled first; then the consumer's rate, from its assignment (it
  starts fetching at once) to the last file of the run becoming visible;
- **end to end**: the producer sends while the consumer lands; from the first send to the last
  file visible (a file's visibility time is its ctime, which the publishing rename sets);
- **freshness** (the default client only): latency from ``send()`` to the event's file at a fixed
  offered rate.

Each throughput figure is measured per client library (``kafka.client``) and, with ``--before REV``,
for the code of git revision REV too (``git archive`` into a temporary directory: nothing of the
work tree changes), in the same run, alternating, best of ``--repeat``. ``--profile`` also runs the
consumer-only case under cProfile (main thread: kafka-python's network thread is not in it) and
writes the top functions to ``bench/results/ingest_profile.txt``. Writes ``bench/results/ingest.json``
(atomically). All numbers of one file come from one run on one machine; compare ratios, not
absolute values: on a shared machine, other load shows in them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import pickle
import platform
import pstats
import re
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
from features.validation import check_messages
from ingest.broker import embedded_broker, ensure_topics, free_port
from ingest.clients import make_producer
from ingest.config import CLIENTS, KAFKA_PYTHON, IngestConfig
from ingest.producer import event_messages, raw_dates, read_day, send_messages

RESULTS = REPO_ROOT / "bench" / "results" / "ingest.json"
PROFILE = REPO_ROOT / "bench" / "results" / "ingest_profile.txt"
LANDED = "sirenfeed_ingest_events_landed_total"
ASSIGNED = "sirenfeed_ingest_assigned_partitions"
UNTIL_IDLE_S = 1.0
"""The consumer publishes what is open and stops this long after its last message: the one wait of
a run that is no work (below ``consumer.max_seconds``, so no batch waits for its timer at the end)."""

# The producer process: runs inside the tree under test, with that tree's clients. It loads the
# messages and connects, says so, and sends once told to, reporting when it started: neither its
# imports nor its loading count, and the consumer is not kept idle meanwhile.
PRODUCE = """
import json, pickle, sys, time
from common.config import load_config
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.producer import send_messages
with open(sys.argv[1], "rb") as stream:
    messages = pickle.load(stream)
producer = make_producer(load_config(IngestConfig, overrides=sys.argv[3:]))
print("ready", flush=True)
sys.stdin.readline()
started = time.time()
send_messages(producer, sys.argv[2], messages)
sent = time.time()
producer.close()
print(json.dumps({"started": started, "sent": sent}))
"""


def synthetic_messages(events: int, work: Path) -> list[tuple[bytes | None, bytes]]:
    """About ``events`` valid replay messages (one synthetic day, about 20 events per user)."""
    start = (dt.date.today() - dt.timedelta(days=3)).isoformat()
    raw = work / "raw"
    write_synthetic_logs(SynthConfig(users=max(1, events // 20), days=1, seed=11, start_date=start,
                                     bad_fraction=0.0, duplicate_fraction=0.0), raw)
    messages = [message for files in raw_dates(raw).values() for message in event_messages(read_day(files))]
    return messages[:events]


def metric(port: int, name: str) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return sample.value
    return 0.0


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval_s)


class Stream:
    """A fresh topic pair and group on the broker, with a landing zone, run by the code of ``tree``."""

    def __init__(self, address: str, work: Path, partitions: int, tree: Path, client: str | None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tree = tree
        self.landing = work / tag
        self.topic = f"bench-{tag}"
        self.overrides = [f"kafka.bootstrap_servers={address}", f"kafka.topic={self.topic}",
                          f"kafka.dead_letter_topic=bench-dead-{tag}", f"kafka.group_id=bench-{tag}",
                          f"kafka.partitions={partitions}", "metrics.report_lag=false",
                          *([f"kafka.client={client}"] if client else [])]
        self.log = work / f"{tag}.log"
        ensure_topics(address, [self.topic, f"bench-dead-{tag}"], partitions)

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.tree)}

    def produce(self, messages_file: Path) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-c", PRODUCE, str(messages_file), self.topic, *self.overrides],
                                cwd=self.tree, env=self.env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)

    def consume(self, port: int, profile: Path | None = None) -> subprocess.Popen[bytes]:
        profiler = ["-m", "cProfile", "-o", str(profile)] if profile else []
        command = [sys.executable, *profiler, "-m", "ingest.consumer", "--out", str(self.landing),
                   "--until-idle", str(UNTIL_IDLE_S), *self.overrides, f"metrics.port={port}"]
        with open(self.log, "ab") as log:
            return subprocess.Popen(command, cwd=self.tree, env=self.env(), stdout=subprocess.DEVNULL,
                                    stderr=log)

    def landed(self) -> tuple[int, float]:
        """Rows landed and the time the last file became visible."""
        files = visible_files(self.landing)
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
        return rows, max((path.stat().st_ctime for path in files), default=0.0)


def run_consumer(stream: Stream, profile: Path | None = None) -> tuple[subprocess.Popen[bytes], float]:
    """Start the consumer; returns it and when it had every partition (it fetches from then on)."""
    port = free_port()
    consumer = stream.consume(port, profile)
    wait_for(lambda: consumer.poll() is not None or metric(port, ASSIGNED) > 0, 120, "the assignment")
    assigned_at = time.time()
    if consumer.poll() is not None:
        raise RuntimeError(f"the consumer exited with {consumer.returncode}: see {stream.log}")
    return consumer, assigned_at


def finish(stream: Stream, consumer: subprocess.Popen[bytes], events: int) -> float:
    if consumer.wait(timeout=900) != 0:
        raise RuntimeError(f"the consumer exited with {consumer.returncode}: see {stream.log}")
    rows, last_visible = stream.landed()
    if rows != events:
        raise RuntimeError(f"{rows} of {events} events landed: see {stream.log}")
    return last_visible


def consumer_only(address: str, work: Path, messages: list, partitions: int, tree: Path,
                  client: str | None, profile: Path | None = None) -> dict:
    stream = Stream(address, work, partitions, tree, client)
    # Filled by this tree's client of the same name (the code before has kafka-python only).
    producer = make_producer(load_config(IngestConfig, overrides=[stream.overrides[0],
                                                                  f"kafka.client={client or KAFKA_PYTHON}"]))
    try:
        send_messages(producer, stream.topic, messages, description="fill")
    finally:
        producer.close()
    consumer, assigned_at = run_consumer(stream, profile)
    seconds = finish(stream, consumer, len(messages)) - assigned_at
    return {"events": len(messages), "seconds": round(seconds, 3), "events_per_s": round(len(messages) / seconds)}


def end_to_end(address: str, work: Path, messages_file: Path, events: int, partitions: int, tree: Path,
               client: str | None) -> dict:
    stream = Stream(address, work, partitions, tree, client)
    producer = stream.produce(messages_file)
    if producer.stdout.readline().strip() != b"ready":
        raise RuntimeError(f"the producer exited with {producer.wait()}")
    consumer, _ = run_consumer(stream)
    output, _ = producer.communicate(b"go\n", timeout=900)
    if producer.returncode != 0:
        consumer.kill()
        raise RuntimeError(f"the producer exited with {producer.returncode}")
    times = json.loads(output.decode().strip().splitlines()[-1])
    seconds = finish(stream, consumer, events) - times["started"]
    produced_s = times["sent"] - times["started"]
    return {"events": events, "produce_seconds": round(produced_s, 3),
            "produce_events_per_s": round(events / produced_s), "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds)}


def freshness(address: str, work: Path, messages: list, rate: float, partitions: int) -> dict:
    """Latency from ``send()`` to the event's file becoming visible, at ``rate`` events per second."""
    stream = Stream(address, work, partitions, REPO_ROOT, None)
    consumer, _ = run_consumer(stream)
    config = load_config(IngestConfig, overrides=stream.overrides)
    sent_at: dict[str, float] = {}

    def timed():
        for key, value in messages:
            sent_at[json.loads(value)["event_id"]] = time.time()
            yield key, value

    producer = make_producer(config)
    try:
        send_messages(producer, stream.topic, timed(), rate=rate, description="produce (fixed rate)")
    finally:
        producer.close()
    finish(stream, consumer, len(messages))
    latencies = []
    for path in visible_files(stream.landing):
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


def best(runs: list[dict]) -> dict:
    chosen = max(runs, key=lambda run: run["events_per_s"])
    return {**chosen, "runs_events_per_s": [run["events_per_s"] for run in runs]}


def profile_summary(path: Path, top: int = 25) -> str:
    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    # File names without their folders, and no profile path: nothing of the machine it ran on.
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    return re.sub(r"\S+\.prof\b", "", text.getvalue())


def archive(revision: str, work: Path) -> Path:
    """The tree of ``revision``, extracted from git into ``work`` (the work tree is not touched)."""
    tree = work / "before"
    tree.mkdir()
    data = subprocess.run(["git", "archive", revision], cwd=REPO_ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=data, check=True)
    return tree


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events of each throughput run")
    parser.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS),
                        help="client libraries to measure (kafka.client)")
    parser.add_argument("--before", metavar="REV", help="also measure the code of this git revision")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each case; the best counts")
    parser.add_argument("--profile", action="store_true", help="write a cProfile summary of the consumer")
    parser.add_argument("--rate", type=float, default=1000.0, help="offered rate of the freshness run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the freshness run (0 = none)")
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        config = load_config(IngestConfig, overrides=[f"broker.run_dir={work / 'broker'}"])
        fixed_rate_events = int(args.rate * args.seconds)
        generated = synthetic_messages(max(args.events, fixed_rate_events), work)
        # Every run waits until all its events have landed: keep the valid ones only.
        _, rejected = check_messages([value for _, value in generated], config.event_schema, config.contract)
        dropped = {index for index, _ in rejected}
        messages = [message for index, message in enumerate(generated) if index not in dropped]
        throughput = messages[:args.events]
        messages_file = work / "messages.pickle"
        messages_file.write_bytes(pickle.dumps(throughput))
        # (name, tree, kafka.client): the code before knows no kafka.client.
        cases = [(client, REPO_ROOT, client) for client in args.clients]
        if args.before:
            cases.insert(0, (f"before ({args.before})", archive(args.before, work), None))
        runs: dict[str, dict[str, list[dict]]] = {name: {"consumer_only": [], "end_to_end": []}
                                                  for name, _, _ in cases}
        with embedded_broker(config) as address:
            for _ in range(args.repeat):
                for name, tree, client in cases:
                    runs[name]["consumer_only"].append(
                        consumer_only(address, work, throughput, args.partitions, tree, client))
                    runs[name]["end_to_end"].append(
                        end_to_end(address, work, messages_file, len(throughput), args.partitions, tree, client))
            if args.profile:
                for name, tree, client in cases:
                    profile = work / f"{uuid.uuid4().hex[:8]}.prof"
                    consumer_only(address, work, throughput, args.partitions, tree, client, profile)
                    runs[name]["profile"] = profile_summary(profile)
            fresh = (freshness(address, work, messages[:fixed_rate_events], args.rate, args.partitions)
                     if fixed_rate_events else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    default = load_config(IngestConfig).kafka.client
    measured = {name: {"consumer_only": best(case["consumer_only"]), "end_to_end": best(case["end_to_end"])}
                for name, case in runs.items()}
    chosen = measured[default if default in measured else next(iter(measured))]
    result = {
        "benchmark": "ingest", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average": os.getloadavg()},
        "command": "bench/ingest_stream.py " + " ".join(argv),
        "partitions": args.partitions, "events": len(throughput), "default_client": default,
        "consumer_only_events_per_s": chosen["consumer_only"]["events_per_s"],
        "end_to_end_events_per_s": chosen["end_to_end"]["events_per_s"],
        "by_code": measured,
        "freshness": fresh,
    }
    if args.before:
        before = measured[f"before ({args.before})"]
        result["before"] = {"revision": subprocess.run(["git", "rev-parse", args.before], cwd=REPO_ROOT,
                                                       capture_output=True, text=True).stdout.strip(),
                            "consumer_only_events_per_s": before["consumer_only"]["events_per_s"],
                            "end_to_end_events_per_s": before["end_to_end"]["events_per_s"]}
    write_json(RESULTS, result)
    if args.profile:
        PROFILE.write_text("".join(f"=== {name}: consumer only, cProfile of the main thread, by own time\n"
                                   f"{case['profile']}\n" for name, case in runs.items()))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
