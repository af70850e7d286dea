"""What the retraining tests share: a tiny raw log by day, tiny model and feature settings, and the
start of a lineage (a full feature run and a real 2-rank batch training run on days 0-1, with day 2
landed afterwards for the first cycle)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common.config import load_config
from common.repo import REPO_ROOT
from features.full import run as run_full_job
from features.schema import load_schema
from features.settings import IncrementalConfig, SparkConfig
from features.spark import build_session
from lifecycle.config import RetrainConfig

MARKER = "SIRENFEED_TEST_CYCLE"
"""An environment variable the kill tests give the process they start: every process it starts
inherits it, so Spark and deepspeed runs of other tests on the machine do not count."""
MONDAY = 1_780_272_000_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
RAW_ARROW_SCHEMA = load_schema("feed").raw_arrow_schema
"""The feed's raw events at rest, what the landing zone holds."""
TINY = ["model.n_layers=1", "model.d_model=16", "model.n_heads=2", "model.siren_width=8",
        "data.batch_size=8", "data.eval_batch_size=64", "data.shuffle_buffer=16", "train.log_every=5",
        "train.checkpoint_every=0", "schedule.warmup_steps=2", "optim.lr=0.01"]
SPEC = ["spec.context_len=6", "spec.stride=3", "spec.buckets.item_id=31", "spec.buckets.author_id=7",
        "spec.buckets.content_type=5", "spec.buckets.topic=5", "spec.buckets.surface=3"]


def day_events(day: int, users: int = 12) -> list[dict]:
    rng = np.random.default_rng(day)
    rows = []
    for user in range(users):
        for i in range(6):
            item = int(rng.integers(0, 12))
            rows.append({"event_id": f"d{day}-u{user}-{i}", "user_id": f"u{user}", "item_id": f"i{item}",
                         "author_id": f"a{item % 3}", "content_type": ["video", "text"][item % 2],
                         "topic": "t", "surface": "feed",
                         "event_ts": MONDAY + day * DAY_MS + (user * 60 + i * 200) * 60_000,
                         "dwell_ms": int(rng.integers(0, 30_000)), "click": True,
                         "like": bool(item % 3 == 0 and rng.random() < 0.8), "comment": False,
                         "share": bool(item % 4 == 0 and rng.random() < 0.5)})
    return rows


def date_of(day: int) -> str:
    return str(np.datetime64(MONDAY + day * DAY_MS, "ms").astype("datetime64[D]"))


def write_day(raw: Path, day: int) -> None:
    folder = raw / f"date={date_of(day)}" / "hour=00"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(day_events(day), schema=RAW_ARROW_SCHEMA), folder / "part-0.parquet")


def start_lineage(root: Path, *overrides: str) -> dict[str, Any]:
    """Days 0-1 as a full feature run and a 2-rank batch training run; day 2 lands afterwards.
    ``overrides`` of the retrain config come last."""
    raw, features, initial = root / "landing", root / "features", root / "initial"
    for day in (0, 1):
        write_day(raw, day)
    overrides = [f"dir={root / 'retrain'}", f"initial_run={initial}", f"features.raw={raw}",
                 f"features.out={features}", "features.train_files=2", "features.eval_files=1",
                 "features.spark.shuffle_partitions=2", f"features.contract.now_ms={MONDAY + 30 * DAY_MS}",
                 "nproc=2", *[f"features.{item}" for item in SPEC], *overrides]
    config = load_config(RetrainConfig, REPO_ROOT / "conf" / "retrain.yaml", overrides)
    spark = build_session(SparkConfig(master="local[2]", shuffle_partitions=2, driver_memory="1g",
                                      conf={"spark.ui.enabled": "false"}), app_name="sirenfeed-tests")
    run_full_job(spark, dataclasses.replace(config.features, incremental=IncrementalConfig()))
    command = [sys.executable, "-m", "sirenfeed.cli", "train", "--features", str(features), "--run", str(initial),
               "--nproc", "2", "--config", str(REPO_ROOT / "conf" / "train.yaml"), *TINY, "train.steps=8"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    write_day(raw, 2)
    return {"config": config, "overrides": overrides, "root": root, "features": features, "initial": initial}


def marked_processes(marker: str, also_set: str | None = None) -> dict[int, str]:
    """``pid → command line`` of every live process whose environment carries ``marker`` (and sets
    ``also_set``: a variable's name, or ``NAME=VALUE``); a zombie's environment reads empty: it is
    dead already."""
    entry = f"{MARKER}={marker}".encode()
    wanted = (also_set or "").encode()

    def matches(variable: bytes) -> bool:
        return variable == wanted if b"=" in wanted else variable.startswith(wanted + b"=")

    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environment = (proc / "environ").read_bytes().split(b"\0")
            command = (proc / "cmdline").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if entry in environment and (not wanted or any(matches(variable) for variable in environment)):
            found[int(proc.name)] = command.replace(b"\0", b" ").decode(errors="replace")
    return found
