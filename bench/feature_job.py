"""Throughput of the batch data path: synthetic log generation, then the Spark feature job.

``python bench/feature_job.py [--users N] [--days D] [--master local[2]] [--work DIR] [--baseline REV]``
writes a synthetic log (about 2 M events by default), runs the feature job on it and writes events/s
of both to ``bench/results/features.json``. Each job runs in a fresh process (its own JVM), with the
Spark session started before the clock starts, so the number is the job's, not the JVM's.

``--baseline REV`` also runs the job as it was at git revision ``REV`` (its ``features/full.py``,
``transforms.py``, ``hadoop.py`` and ``spark.py``, read with ``git show`` into a temporary package;
every other module is today's) on the same log, alternating with today's job ``--repeats`` times
each, checks that both wrote the same rows, and records before, after and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.files import write_json
from common.logs import configure_logging
from features.settings import FeaturesConfig, SparkConfig
from features.spark import build_session
from features.synth import SynthConfig, write_synthetic_logs

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "features.json"
BASELINE_MODULES = ("full", "transforms", "hadoop", "spark")
"""The job's own modules (``features/<name>.py``) a baseline takes from its revision."""
BASELINE_PACKAGE = "features_baseline"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=6_500, help="synthetic users (default: ~2 M events)")
    parser.add_argument("--days", type=int, default=14)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--driver-memory", default="4g")
    parser.add_argument("--shuffle-partitions", type=int, default=4)
    parser.add_argument("--baseline", metavar="REV", help="also measure the job of this git revision")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each job (median reported)")
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


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    raw = work / "raw"
    started = time.perf_counter()
    synth = write_synthetic_logs(SynthConfig(users=args.users, days=args.days, seed=args.seed), raw)
    synth_seconds = time.perf_counter() - started
    synth_rate = synth["events"] / synth_seconds
    spark = {"master": args.master, "driver_memory": args.driver_memory,
             "shuffle_partitions": args.shuffle_partitions}
    packages = {"after": "features"}
    if args.baseline:
        packages = {"before": baseline_package(args.baseline, work / "baseline"), **packages}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in packages}
    for repeat in range(args.repeats):
        for name, package in packages.items():  # alternating, so drifting machine load hits both
            runs[name].append(run_in_fresh_process(package, raw, work / f"features-{name}", spark))
            logger.info("%s run %d: %.1f s, %.1f JVM CPU s", name, repeat + 1, runs[name][-1]["seconds"],
                        runs[name][-1]["cpu_seconds"])
    jobs = {name: job_figures(entries, spark) for name, entries in runs.items()}
    result: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "synth": {"users": args.users, "days": args.days, "events": synth["events"],
                  "seconds": round(synth_seconds, 2), "events_per_s": round(synth_rate)},
        "features_job": jobs["after"],
        "job_to_synth_throughput": round(jobs["after"]["events_per_s"] / synth_rate, 3),
    }
    if args.baseline:
        result["baseline"] = {"revision": args.baseline, "commit": git("rev-parse", args.baseline).strip(),
                              "features_job": jobs["before"]}
        result["speedup"] = round(jobs["after"]["events_per_s"] / jobs["before"]["events_per_s"], 3)
        result["cpu_ratio"] = round(jobs["before"]["jvm_cpu_seconds"] / jobs["after"]["jvm_cpu_seconds"], 3)
        result["identical_output"] = same_output(work / "features-before", work / "features-after", spark)
    return result


def git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], cwd=REPO, check=True, capture_output=True, text=True).stdout


def baseline_package(revision: str, root: Path) -> str:
    """The job's modules at ``revision`` as the package ``features_baseline`` under ``root`` (a path
    the runs put first on ``sys.path``), importing each other instead of today's."""
    package = root / BASELINE_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    own = re.compile(rf"\bfeatures\.({'|'.join(BASELINE_MODULES)})\b")
    for name in BASELINE_MODULES:
        source = git("show", f"{revision}:features/{name}.py")
        (package / f"{name}.py").write_text(own.sub(rf"{BASELINE_PACKAGE}.\1", source))
    return str(root)


def run_in_fresh_process(package: str, raw: Path, out: Path, spark: dict[str, Any]) -> dict[str, Any]:
    """One timed full job in a new interpreter (and so a new JVM): ``package`` is ``features``
    or the directory holding the baseline package."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(timed_job, (package, str(raw), str(out), spark))


def timed_job(package: str, raw: str, out: str, spark: dict[str, Any]) -> dict[str, Any]:
    configure_logging()
    name = "features"
    if package != "features":
        sys.path.insert(0, package)
        name = BASELINE_PACKAGE
    full, spark_module = importlib.import_module(f"{name}.full"), importlib.import_module(f"{name}.spark")
    spark_config = SparkConfig(**spark, conf={"spark.ui.enabled": "false"})
    started = time.perf_counter()
    session = spark_module.build_session(spark_config, app_name="sirenfeed-bench")
    session_seconds = time.perf_counter() - started
    try:
        started, cpu = time.perf_counter(), jvm_cpu_seconds(session)
        manifest = full.run(session, FeaturesConfig(raw=raw, out=out, spark=spark_config))
        seconds, cpu = time.perf_counter() - started, jvm_cpu_seconds(session) - cpu
    finally:
        session.stop()
    return {"seconds": seconds, "cpu_seconds": cpu, "session_start_seconds": session_seconds,
            "manifest": manifest}


def jvm_cpu_seconds(session: Any) -> float:
    """CPU time the driver JVM (the whole of a local[N] job) has used, from /proc: on a shared
    machine it varies far less with other load than wall time does."""
    pid = session.sparkContext._jvm.java.lang.ProcessHandle.current().pid()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_figures(runs: list[dict[str, Any]], spark: dict[str, Any]) -> dict[str, Any]:
    manifest = runs[-1]["manifest"]
    seconds = statistics.median(run["seconds"] for run in runs)
    events = manifest["input_events"]
    return {**spark, "input_events": events, "train_rows": manifest["splits"]["train"]["rows"],
            "eval_rows": manifest["splits"]["eval"]["rows"],
            "session_start_seconds": round(statistics.median(run["session_start_seconds"]
                                                             for run in runs), 2),
            "seconds": round(seconds, 2), "all_seconds": [round(run["seconds"], 2) for run in runs],
            "events_per_s": round(events / seconds),
            "jvm_cpu_seconds": round(statistics.median(run["cpu_seconds"] for run in runs), 1)}


def same_output(before: Path, after: Path, spark: dict[str, Any]) -> bool:
    """Both outputs hold the same rows (as multisets) in train, eval and quarantine, and manifests
    that agree but for their creation time and configured output directory."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(compare_outputs, (str(before), str(after), spark))


def compare_outputs(before: str, after: str, spark: dict[str, Any]) -> bool:
    session = build_session(SparkConfig(**spark, conf={"spark.ui.enabled": "false"}),
                            app_name="sirenfeed-bench-check")
    try:
        for part in ("train", "eval", "quarantine"):
            old, new = session.read.parquet(f"{before}/{part}"), session.read.parquet(f"{after}/{part}")
            if old.schema != new.schema or old.exceptAll(new).count() or new.exceptAll(old).count():
                logger.error("%s differs between %s and %s", part, before, after)
                return False
    finally:
        session.stop()
    manifests = [json.loads(Path(root, "_MANIFEST.json").read_text()) for root in (before, after)]
    for manifest in manifests:
        del manifest["created_at"], manifest["processing_ms"], manifest["config"]["out"]
    return manifests[0] == manifests[1]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
