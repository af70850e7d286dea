"""Throughput of the batch data path: synthetic log generation, then the Spark feature job.

``python bench/feature_job.py [--users N] [--days D] [--master local[2]] [--work DIR]`` writes a synthetic
log (about 2 M events by default), runs the feature job on it in-process (the Spark session is started
before the clock starts, so the number is the job's, not the JVM's) and writes events/s of both to
``bench/results/features.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common.files import write_json
from common.logs import configure_logging
from features.full import run
from features.settings import FeaturesConfig, SparkConfig
from features.spark import build_session
from features.synth import SynthConfig, write_synthetic_logs

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results" / "features.json"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6_500, help="synthetic users (default: ~2 M events)")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--shuffle-partitions", type=int, default=4)
    parser.add_argument("--work", help="directory for the log and the features (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    args = parser.parse_args(argv)
    configure_logging()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="sirenfeed-bench-"))
    try:
        result = measure(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    write_json(Path(args.out), result)
    print(json.dumps(result, indent=2))
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict:
    raw, features = work / "raw", work / "features"
    started = time.perf_counter()
    synth = write_synthetic_logs(SynthConfig(users=args.users, days=args.days, seed=args.seed), raw)
    synth_seconds = time.perf_counter() - started

    spark_config = SparkConfig(master=args.master, driver_memory=args.driver_memory,
                               shuffle_partitions=args.shuffle_partitions, conf={"spark.ui.enabled": "false"})
    started = time.perf_counter()
    spark = build_session(spark_config, app_name="sirenfeed-bench")
    session_seconds = time.perf_counter() - started
    try:
        started = time.perf_counter()
        manifest = run(spark, FeaturesConfig(raw=str(raw), out=str(features), spark=spark_config))
        job_seconds = time.perf_counter() - started
    finally:
        spark.stop()

    events = manifest["input_events"]
    synth_rate, job_rate = synth["events"] / synth_seconds, events / job_seconds
    return {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "synth": {"users": args.users, "days": args.days, "events": synth["events"],
                  "seconds": round(synth_seconds, 2), "events_per_s": round(synth_rate)},
        "features_job": {"master": args.master, "driver_memory": args.driver_memory,
                         "shuffle_partitions": args.shuffle_partitions, "input_events": events,
                         "train_rows": manifest["splits"]["train"]["rows"],
                         "eval_rows": manifest["splits"]["eval"]["rows"],
                         "session_start_seconds": round(session_seconds, 2),
                         "seconds": round(job_seconds, 2), "events_per_s": round(job_rate)},
        "job_to_synth_throughput": round(job_rate / synth_rate, 3),
    }


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
