"""Two incremental feature jobs on one dataset: a run that starts while another is appending fails
at once with the lock error, and the dataset holds exactly the one append a run alone gives; a run
started while the lock is held exits 5 through ``spark-submit``, and ``sirenfeed retrain`` reports
that as exit 5 (another run holds a lock) in both of its feature-job modes, the dataset untouched."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common.config import load_config
from features.dataset import MANIFEST_NAME, read_manifest
from features.full import run
from features.incremental import run_incremental
from features.schema import load_schema
from features.settings import FeaturesConfig
from lifecycle import cycle as retrain
from lifecycle.config import RetrainConfig

pytestmark = pytest.mark.slow

MONDAY = 1_780_272_000_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
LOCK_FILE = "_LOCK"
"""The documented lock of a feature dataset (an ``flock`` any tool may take)."""
OPTIONS = ["spark.master=local[2]", "spark.shuffle_partitions=2", "spark.driver_memory=1g",
           "train_files=2", "eval_files=1", f"contract.now_ms={MONDAY + 30 * DAY_MS}",
           "spec.context_len=4", "spec.stride=2", "spec.buckets.item_id=97", "spec.buckets.author_id=11",
           "spec.buckets.content_type=5", "spec.buckets.topic=7", "spec.buckets.surface=3"]
VOLATILE = ("created_at", "updated_at", "files")
"""Manifest fields that differ between two equal appends (times, Spark's part-file names)."""


def events_of_day(day: int, users: int = 6, per_user: int = 5) -> list[dict]:
    return [{"event_id": f"d{day}-u{user}-{i}", "user_id": f"u{user}", "item_id": f"i{(i * 7 + user) % 9}",
             "author_id": "a", "content_type": ["video", "text"][i % 2], "topic": "t", "surface": "feed",
             "event_ts": MONDAY + day * DAY_MS + (user * 5 + i * 3) * HOUR_MS // 2, "dwell_ms": 2_000 * i,
             "click": True, "like": (i + user) % 3 == 0, "comment": False, "share": i == 2}
            for user in range(users) for i in range(per_user)]


def write_day(raw: Path, day: int) -> None:
    folder = raw / f"date={time.strftime('%Y-%m-%d', time.gmtime((MONDAY + day * DAY_MS) / 1000))}" / "hour=00"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(events_of_day(day), schema=load_schema("feed").raw_arrow_schema),
                   folder / "part-0.parquet")


def features_config(raw: Path, out: Path, incremental: bool = True) -> FeaturesConfig:
    return load_config(FeaturesConfig, None, [f"raw={raw}", f"out={out}", *OPTIONS,
                                              f"incremental.enabled={str(incremental).lower()}"])


def features_command(config: FeaturesConfig) -> list[str]:
    return [sys.executable, "-m", "sirenfeed.cli", "features", "--incremental", "--raw", config.raw,
            "--out", config.out, *OPTIONS]


@pytest.fixture(scope="module")
def full_run(spark, tmp_path_factory) -> dict[str, Path]:
    """Days 0-1 as a full run; day 2 has landed since, for an incremental run to append."""
    root = tmp_path_factory.mktemp("incremental-lock")
    raw, out = root / "raw", root / "full"
    for day in (0, 1):
        write_day(raw, day)
    run(spark, features_config(raw, out, incremental=False))
    write_day(raw, 2)
    return {"raw": raw, "out": out}


def dataset_copy(full_run: dict[str, Path], target: Path) -> FeaturesConfig:
    shutil.copytree(full_run["out"], target)
    return features_config(full_run["raw"], target)


@contextlib.contextmanager
def held_lock(path: Path) -> Iterator[None]:
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


def split_rows(out: Path) -> dict[str, list[Any]]:
    """Every visible row of both splits, sorted: the dataset as a reader sees it."""
    return {split: sorted(map(repr, pq.read_table(out / split).to_pylist())) for split in ("train", "eval")}


def stable_manifest(out: Path) -> dict[str, Any]:
    manifest = read_manifest(out)
    return {**{key: value for key, value in manifest.items() if key not in VOLATILE},
            "batches": [{key: value for key, value in entry.items() if key not in VOLATILE}
                        for entry in manifest["batches"]]}


def assert_consistent(out: Path) -> None:
    """The manifest lists exactly the data files on disk, and nothing hidden or staged is left."""
    manifest = read_manifest(out)
    listed = {name for entry in manifest["batches"] for split in ("train", "eval")
              for name in entry["files"][split]}
    on_disk = {str(path.relative_to(out)) for split in ("train", "eval") for path in (out / split).rglob("*.parquet")}
    assert on_disk == listed
    assert not [path for path in out.rglob(".*") if not path.name.endswith(".crc")]
    assert sorted(path.name for path in (out / "_state").iterdir()) == [manifest["state"].split("/")[-1]]


def test_a_run_started_during_another_fails_at_once_and_the_dataset_holds_one_append(full_run, spark, tmp_path):
    config = dataset_copy(full_run, tmp_path / "features")
    reference = dataset_copy(full_run, tmp_path / "reference")
    out = Path(config.out)
    log = tmp_path / "first.log"
    with log.open("w") as stream:
        first = subprocess.Popen(features_command(config), stdout=subprocess.DEVNULL, stderr=stream,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob(".staging-b000001-*")):
            assert first.poll() is None, "the first run ended before it started appending:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never started appending"
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match="another incremental feature job is running on"):
            run_incremental(spark, config)
        assert first.wait(timeout=400) == 0, log.read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    after_first = (out / MANIFEST_NAME).read_text()
    run_incremental(spark, config)  # the other run, once the first is done: nothing new to read
    assert (out / MANIFEST_NAME).read_text() == after_first

    run_incremental(spark, reference)
    assert [entry["index"] for entry in read_manifest(out)["batches"]] == [0, 1]
    assert stable_manifest(out) == stable_manifest(Path(reference.out))
    assert split_rows(out) == split_rows(Path(reference.out))
    assert_consistent(out)


def test_a_run_under_a_held_lock_exits_5_and_retrain_reports_another_run(full_run, tmp_path, caplog):
    config = dataset_copy(full_run, tmp_path / "features")
    out = Path(config.out)
    before = (out / MANIFEST_NAME).read_text()
    with held_lock(out / LOCK_FILE):
        result = subprocess.run(features_command(config), capture_output=True, text=True, timeout=400)
        codes = {}
        for spark_submit in (False, True):
            cycle = RetrainConfig(dir=str(tmp_path / f"retrain-{spark_submit}"),
                                          initial_run=str(tmp_path / "no-initial-run"), features=config,
                                          spark_submit=spark_submit)
            codes[spark_submit] = retrain.run_once(cycle)
    assert result.returncode == 5, result.stderr[-3000:]
    assert "another incremental feature job is running on" in result.stderr
    assert codes == {False: retrain.LOCKED, True: retrain.LOCKED}
    refusals = [record.getMessage() for record in caplog.records if record.name == retrain.__name__]
    assert len(refusals) == 2 and all("another incremental feature job is running on" in text for text in refusals)
    assert (out / MANIFEST_NAME).read_text() == before
    assert not list(out.glob(".staging-*")) and not (out / "_state").exists()
