"""Freshness benchmark: events produced to Kafka at a steady rate through the long-lived continuous
pipeline, and how long each second's events take to be landed, in a feature batch, trained on and
published.

    .venv/bin/python bench/freshness.py [--rate 40] [--seconds 240] [--warmup-s 45] [--users N]

Setup (not timed): the lineage of ``bench/retrain.py`` (synthetic history, the Spark feature job, a
2-rank batch training run) and the embedded Kafka-protocol broker. Then three processes run side by
side, as in production: ``sirenfeed ingest`` (one consumer, into the landing zone), ``sirenfeed
train --continuous`` (resident Spark application and ranks, ``continuous.every_s=0``: a cycle as
soon as new files land) and this script's producer, which sends the fresh days' events in time
order at ``--rate`` per second for ``--seconds``. Each second's events are one *event batch*; its
times, from the moment its last event was acknowledged by the broker:

- *landed*: its last event's landing file was written (the file's modification time);
- *featured*: the cycle whose feature batch holds that file ended its features step;
- *trained*: the first cycle that trained through that feature batch ended its train step;
- *published*: the first published model trained through it was published (the publish log).

Event batches produced in the first ``--warmup-s`` seconds are left out of the statistics (the
workers' first requests warm their JIT and caches). The gate keeps its statistics but not its
evidence thresholds (``gate.min_events=1``, ``gate.min_positives=0``) and tolerates any regression,
so every healthy candidate is published: this measures the pipeline's latency, not the model.
Writes ``bench/results/freshness.json`` (atomically): p50/p95 of each stage (cumulative from
produced, and each stage alone), the cycles' step times and outcomes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from retrain import build_lineage

from common.concurrency import die_with_parent
from common.config import load_config
from common.files import visible_files, write_json
from common.repo import REPO_ROOT
from ingest.broker import embedded_broker
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.producer import event_messages, read_day, send_messages
from lifecycle.registry import read_log
from lifecycle.view import batches

RESULTS = REPO_ROOT / "bench" / "results" / "freshness.json"
STAGES = ("landed", "featured", "trained", "published")
BENCH_GATE = ["gate.min_events=1", "gate.min_positives=0", "gate.default_tolerance=0.99"]


class LandingWatcher(threading.Thread):
    """Records, for every event id that lands, the modification time of the file it landed in."""

    def __init__(self, raw: Path):
        super().__init__(daemon=True)
        self.raw, self.landed, self.files = raw, {}, {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.2):
            for path in visible_files(self.raw):
                if path not in self.files:
                    self.files[path] = path.stat().st_mtime
                    for event_id in pq.read_table(path, columns=["event_id"]).column(0).to_pylist():
                        self.landed.setdefault(event_id, (path, self.files[path]))


def start(command: list[str], log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=output, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    return {"p50": round(float(np.percentile(values, 50)), 2), "p95": round(float(np.percentile(values, 95)), 2),
            "n": len(values)}


def stage_times(root: Path, features: Path) -> tuple[dict[str, int], dict[int, dict[str, float]]]:
    """Landing file → feature batch, and feature batch → when it was featured, trained, published."""
    batch_of = {uri.removeprefix("file:"): entry["index"] for entry in batches(features)
                for uri in entry["input_files"]}
    journals = [json.loads(path.read_text()) for path in sorted((root / "cycles").glob("c*/state.json"))]
    published = [record for record in read_log(root / "registry") if record["published"]]
    times: dict[int, dict[str, float]] = {}
    for index in sorted(set(batch_of.values())):
        made = [j["ended_at"]["features"] for j in journals if j.get("newest_batch") == index
                and "features" in j.get("ended_at", {})]
        trained = [j["ended_at"]["train"] for j in journals if "train" in j.get("ended_at", {})
                   and j.get("batch", -1) >= index]
        served = [record["decided_at"] for record in published if record["trained"]["batch"] >= index]
        times[index] = {"featured": min(made, default=np.nan), "trained": min(trained, default=np.nan),
                        "published": min(served, default=np.nan)}
    return batch_of, times


def published(watcher: LandingWatcher, root: Path, features: Path, event_id: str) -> bool:
    """Whether a published model has trained on ``event_id``."""
    if event_id not in watcher.landed:
        return False
    batch_of, times = stage_times(root, features)
    index = batch_of.get(str(watcher.landed[event_id][0]))
    return index is not None and bool(np.isfinite(times[index]["published"]))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="events per second")
    parser.add_argument("--seconds", type=int, default=240, help="how long the producer sends")
    parser.add_argument("--warmup-s", type=float, default=45.0, help="event batches left out at the start")
    parser.add_argument("--drain-s", type=float, default=300.0, help="how long to wait for the last to publish")
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--days", type=int, default=4, help="days of history for the batch run")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    if args.seconds <= args.warmup_s:
        parser.error("--seconds must be longer than --warmup-s")

    work = Path(tempfile.mkdtemp(prefix="bench-freshness-"))
    processes: list[subprocess.Popen] = []
    try:
        lineage = build_lineage(work, args.users, args.days, 2, args.nproc)
        raw, root = lineage["raw"], lineage["root"]
        stream = read_day([path for day in lineage["fresh"] for path in lineage["days"][day]]).sort_by("event_ts")
        needed = int(args.rate * args.seconds)
        if stream.num_rows < needed:
            raise SystemExit(f"the fresh days hold {stream.num_rows} events, fewer than --rate × --seconds "
                             f"= {needed}: raise --users")
        ingest = load_config(IngestConfig, None, lineage["ingest_overrides"])
        with embedded_broker(ingest) as address:
            kafka = f"kafka.bootstrap_servers={address}"
            cli = [sys.executable, "-m", "sirenfeed.cli"]
            processes.append(start([*cli, "ingest", *lineage["ingest_overrides"], kafka], work / "ingest.log"))
            processes.append(start([*cli, "train", "--continuous", "--config", str(REPO_ROOT / "conf" / "retrain.yaml"),
                                    *lineage["overrides"], *BENCH_GATE, "continuous.every_s=0",
                                    "continuous.poll_s=0.5"], work / "continuous.log"))
            watcher = LandingWatcher(raw)
            watcher.start()
            producer = make_producer(load_config(IngestConfig, None, [*lineage["ingest_overrides"], kafka]))
            sent: list[tuple[float, list[str]]] = []
            began = time.monotonic()
            try:
                for second in range(args.seconds):
                    rows = stream.slice(int(second * args.rate), int((second + 1) * args.rate) - int(second * args.rate))
                    send_messages(producer, ingest.kafka.topic, event_messages(rows), description=f"second {second}")
                    sent.append((time.time(), rows.column("event_id").to_pylist()))
                    time.sleep(max(0.0, began + second + 1 - time.monotonic()))
            finally:
                producer.close()
            measured = [(at, ids) for at, ids in sent if at - sent[0][0] >= args.warmup_s]
            deadline = time.monotonic() + args.drain_s
            while time.monotonic() < deadline and not published(watcher, root, lineage["features"], sent[-1][1][-1]):
                time.sleep(2)
            watcher.stop.set()
            for process in processes:
                process.send_signal(signal.SIGTERM)
            codes = [process.wait(timeout=300) for process in processes]
        batch_of, times = stage_times(root, lineage["features"])
        latencies: dict[str, list[float]] = {stage: [] for stage in STAGES}
        alone: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for produced_at, ids in measured:
            landed = [watcher.landed.get(event_id) for event_id in ids]
            if any(entry is None for entry in landed):
                continue
            at = {"landed": max(mtime for _, mtime in landed)}
            indices = {batch_of.get(str(path)) for path, _ in landed}
            if None in indices:
                continue
            for stage in ("featured", "trained", "published"):
                at[stage] = max(times[index][stage] for index in indices)
            previous = produced_at
            for stage in STAGES:
                if np.isfinite(at[stage]):
                    latencies[stage].append(at[stage] - produced_at)
                    alone[stage].append(at[stage] - previous)
                previous = at[stage]
        journals = [json.loads(path.read_text()) for path in sorted((root / "cycles").glob("c*/state.json"))]
        outcomes = {}
        for journal in journals:
            outcomes[str(journal.get("outcome"))] = outcomes.get(str(journal.get("outcome")), 0) + 1
        result = {
            "benchmark": "freshness", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            "setup": {"rate_events_per_s": args.rate, "seconds": args.seconds, "warmup_s": args.warmup_s,
                      "users": args.users, "history_events": lineage["history_events"], "nproc": args.nproc,
                      "gate": BENCH_GATE, "continuous": ["continuous.every_s=0", "continuous.poll_s=0.5",
                                                         "continuous.resident=true"]},
            "event_batches": {"produced": len(sent), "measured": len(measured),
                              "published": len(latencies["published"])},
            "produced_to": {stage: percentiles(values) for stage, values in latencies.items()},
            "stage_alone": {stage: percentiles(values) for stage, values in alone.items()},
            "cycles": {"count": len(journals), "outcomes": outcomes,
                       "seconds_by_step": {step: percentiles([j["seconds"][step] for j in journals
                                                              if step in j.get("seconds", {})])
                                           for step in ("features", "train", "gate", "publish")},
                       "features_worker": sorted({str(j.get("features_worker")) for j in journals}),
                       "trainer_worker": sorted({str(j.get("trainer_worker")) for j in journals})},
            "exit_codes": {"ingest": codes[0], "continuous": codes[1]},
        }
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)
    write_json(RESULTS, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
