"""``sirenfeed features`` through the real ``spark-submit``, on synthetic logs of 50 users × 7 days."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from features.dataset import MANIFEST_NAME, SUCCESS_NAME, read_manifest
from features.spec import FeatureSpec
from features.synth import SynthConfig, write_synthetic_logs

pytestmark = pytest.mark.slow

OPTIONS = ["spark.master=local[2]", "spark.shuffle_partitions=2", "spark.driver_memory=1g",
           "train_files=4", "eval_files=2"]


def features_command(raw, out):
    return [sys.executable, "-m", "sirenfeed.cli", "features", "--raw", str(raw), "--out", str(out), *OPTIONS]


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("submit")
    raw, out = root / "raw", root / "features"
    synth = write_synthetic_logs(SynthConfig(users=50, days=7, seed=5, bad_fraction=0.01,
                                             duplicate_fraction=0.01), raw)
    result = subprocess.run(features_command(raw, out), capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"raw": raw, "out": out, "synth": synth, "result": result}


def test_features_command_writes_splits_manifest_and_quarantine(submitted):
    out, synth = submitted["out"], submitted["synth"]
    manifest = read_manifest(out)
    assert manifest["input_events"] == synth["events"]
    assert manifest["quarantined"] == synth["bad_events_total"] > 0
    assert manifest["duplicates"] == synth["duplicates"] > 0
    assert manifest["events"] == synth["unique_valid_events"]
    assert pq.read_table(out / "quarantine").num_rows == manifest["quarantined"]
    for split in ("train", "eval"):
        dates = sorted(path.name for path in (out / split).iterdir())
        assert dates and all(name.startswith("date=") for name in dates)
        table = pq.read_table(out / split)
        assert table.num_rows == manifest["splits"][split]["rows"] > 0
        assert set(table.column_names) == {*FeatureSpec().event_schema.training_columns, "date"}
    assert len(list((out / "eval").iterdir())) == 1, "one eval day"


def test_features_command_prints_the_summary_and_streams_the_log(submitted):
    result = submitted["result"]
    for text in ("train", "eval", "label tokens", "contribution rate", "quarantined by reason", "C=50",
                 "watermark", "columns: user_key bigint"):
        assert text in result.stdout
    assert "cut windows done in" in result.stderr
    assert "Spark 3." in result.stderr


def test_killed_run_leaves_the_previous_output_readable(submitted, tmp_path):
    out = submitted["out"]
    before = (out / MANIFEST_NAME).read_text()
    # A killed wrapper cannot remove its temporary folder: keep it under the test's own.
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen(features_command(submitted["raw"], out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True, env=environment)
    try:
        deadline = time.monotonic() + 300
        while not list(out.parent.glob(f".{out.name}.staging-*/quarantine/*.parquet")):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "the run never started writing"
            time.sleep(0.05)
    finally:
        # The whole process group: the wrapper, spark-submit's JVM and the job's Python driver.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    assert (out / MANIFEST_NAME).read_text() == before
    assert pq.read_table(out / "train").num_rows == read_manifest(out)["splits"]["train"]["rows"]
    leftovers = list(out.parent.glob(f".{out.name}.staging-*"))
    assert leftovers and not any((path / SUCCESS_NAME).exists() for path in leftovers)


def test_features_command_exit_code_reflects_a_failed_job(tmp_path):
    result = subprocess.run(features_command(tmp_path / "no-such-raw", tmp_path / "features"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "raw input not found" in result.stderr and "the feature job failed" in result.stderr
    assert result.stdout == "" and not (tmp_path / "features").exists()
