"""Retraining benchmark: one ``sirenfeed retrain`` cycle broken down by step at a fixed amount of new
data, and the end-to-end freshness of continuous mode (events produced to Kafka → model published).

    .venv/bin/python bench/retrain.py [--users N] [--days D] [--nproc 2]

Setup (not timed): ``D`` days of synthetic history through the Spark feature job (spark-submit, local
master) and a 2-rank batch training run of SIREN-RoPE. Then:

1. *cycle*: one fresh day lands in the raw landing zone as files; one cycle runs (features through
   spark-submit, warm start through the ``deepspeed`` launcher, gate, publish). Each step's time comes
   from the cycle's own journal (``cycles/<id>/state.json``, ``seconds``).
2. *continuous*: ``sirenfeed train --continuous`` (``continuous.every_s=0``, draining the embedded
   Kafka-protocol broker) runs while the next fresh day is produced to Kafka; freshness is the time from
   the first event sent to the gate's decision (and to serving, when it publishes).

Writes ``bench/results/retrain.json`` (atomically). All numbers of one file come from one run on one
machine; on this machine most of a cycle is fixed start-up cost (a JVM, a launcher and its ranks).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from common.config import load_config
from common.files import write_json
from common.repo import REPO_ROOT
from features.dataset import read_manifest
from features.settings import FeaturesConfig
from features.submit import run_job
from features.synth import SynthConfig, write_synthetic_logs
from ingest.broker import embedded_broker
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.producer import event_messages, raw_dates, read_day, send_messages
from lifecycle.config import CONTINUAL_TRAIN_OVERRIDES, RetrainConfig
from lifecycle.cycle import run_once
from lifecycle.poller import run_continuous
from lifecycle.registry import read_log
from sirenfeed.demo import split_history
from trainer.launcher import TRAIN_SCRIPT, run_deepspeed
from trainer.variants import variant_overrides

RESULTS = REPO_ROOT / "bench" / "results" / "retrain.json"
FEATURE_OVERRIDES = ["spec.buckets.item_id=20011"]
TRAIN_OVERRIDES = [*variant_overrides("siren"), "data.batch_size=128", "train.log_every=50",
                   "schedule.warmup_steps=30", "train.checkpoint_every=0"]


def journal_of(root: Path, cycle: str) -> dict:
    return json.loads((root / "cycles" / cycle / "state.json").read_text())


def land_day(files: list[Path], raw: Path, date: str) -> int:
    """A day's raw files into the landing zone (hard links, as the ingest would publish them)."""
    target = raw / f"date={date}" / "hour=00"
    target.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(files):
        os.link(path, target / f"bench-{index:03d}.parquet")
    return read_day(files).num_rows


def build_lineage(work: Path, users: int, days: int, fresh_days: int, nproc: int) -> dict:
    """``days`` days of synthetic history through the Spark feature job (spark-submit) and a batch
    training run on ``nproc`` ranks, and ``fresh_days`` more days kept aside (not landed); returns
    the paths, the fresh days' files and the retrain and ingest overrides of a lineage from it."""
    synth_dir, raw, features, initial = work / "synth", work / "raw", work / "features", work / "initial"
    write_synthetic_logs(load_config(SynthConfig, None, [f"users={users}", f"days={days + fresh_days}",
                                                         "seed=5"]), synth_dir)
    fresh = split_history(synth_dir, raw, fresh_days)
    if run_job(load_config(FeaturesConfig, None, [f"raw={raw}", f"out={features}", *FEATURE_OVERRIDES])):
        raise RuntimeError("the feature job failed")
    if run_deepspeed(TRAIN_SCRIPT, nproc, str(REPO_ROOT / "conf" / "train.yaml"),
                     [f"features={features}", f"run={initial}", *TRAIN_OVERRIDES, "train.epochs=1"]):
        raise RuntimeError("the batch training run failed")
    root = work / "retrain"
    ingest_overrides = [f"landing.dir={raw}", f"broker.run_dir={work / 'broker'}", "broker.port=0",
                        "metrics.report_lag=false"]
    overrides = [f"dir={root}", f"initial_run={initial}", f"features.raw={raw}", f"features.out={features}",
                 *[f"features.{item}" for item in FEATURE_OVERRIDES], f"nproc={nproc}",
                 "train_overrides=[" + ",".join([*CONTINUAL_TRAIN_OVERRIDES, *TRAIN_OVERRIDES,
                                                 "train.epochs=1"]) + "]"]
    return {"raw": raw, "features": features, "root": root, "days": raw_dates(synth_dir), "fresh": fresh,
            "history_events": read_manifest(features)["events"], "overrides": overrides,
            "ingest_overrides": ingest_overrides}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=400)
    parser.add_argument("--days", type=int, default=6, help="days of history for the batch run")
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    try:
        lineage = build_lineage(work, args.users, args.days, 2, args.nproc)
        raw, root, overrides, ingest_overrides = (lineage["raw"], lineage["root"], lineage["overrides"],
                                                  lineage["ingest_overrides"])
        days, fresh, history_events = lineage["days"], lineage["fresh"], lineage["history_events"]
        config = load_config(RetrainConfig, REPO_ROOT / "conf" / "retrain.yaml", overrides)

        new_events = land_day(days[fresh[0]], raw, fresh[0])
        started = time.monotonic()
        code = run_once(config)
        cycle_wall = time.monotonic() - started
        first = journal_of(root, "c000001")
        cycle = {"exit_code": code, "new_events": new_events, "wall_s": round(cycle_wall, 2),
                 "seconds_by_step": first["seconds"], "published": read_log(root / "registry")[-1]["published"]}

        ingest = load_config(IngestConfig, None, ingest_overrides)
        with embedded_broker(ingest) as address:
            kafka = f"kafka.bootstrap_servers={address}"
            config = load_config(RetrainConfig, REPO_ROOT / "conf" / "retrain.yaml", [
                *overrides, "drain.enabled=true", "drain.idle_s=2",
                "drain.overrides=[" + ",".join([*ingest_overrides, kafka]) + "]",
                "continuous.every_s=0", "continuous.poll_s=1"])
            stop = threading.Event()
            loop = threading.Thread(target=run_continuous, args=(config, stop), daemon=True)
            loop.start()
            day = read_day(days[fresh[1]])
            producer = make_producer(load_config(IngestConfig, None, [*ingest_overrides, kafka]))
            try:
                sent_at = time.time()
                send_messages(producer, ingest.kafka.topic, event_messages(day), total=day.num_rows,
                              description=f"produce {fresh[1]}")
                produced_s = time.time() - sent_at
            finally:
                producer.close()
            deadline = time.monotonic() + 1800
            while len(read_log(root / "registry")) < 2 and loop.is_alive() and time.monotonic() < deadline:
                time.sleep(0.5)
            stop.set()
            loop.join(timeout=600)
        decisions = read_log(root / "registry")
        if len(decisions) < 2:
            raise RuntimeError("continuous mode made no decision on the produced day")
        second = journal_of(root, decisions[-1]["cycle"])
        continuous = {
            "events": day.num_rows, "produce_s": round(produced_s, 2),
            "produced_to_decided_s": round(decisions[-1]["decided_at"] - sent_at, 2),
            "published": decisions[-1]["published"], "seconds_by_step": second["seconds"],
            "gate": decisions[-1]["reason"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "retrain", "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "setup": {"users": args.users, "history_days": args.days, "history_events": history_events,
                  "nproc": args.nproc},
        "cycle": cycle, "continuous": continuous,
    }
    write_json(RESULTS, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
