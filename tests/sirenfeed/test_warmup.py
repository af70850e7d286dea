"""The Spark class archive of ``sirenfeed.warmup``: written whole by a real JVM, mapped by the feature
jobs' JVMs (their classes come from it, not from the jars), used only on a local master, and ignored
without a word by a JVM it does not fit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from features.spark import class_archive_options
from sirenfeed.warmup import build_spark_class_archive

pytestmark = pytest.mark.slow

SESSION_WITH_OPTIONS = """
import sys
from features.settings import SparkConfig
from features.spark import build_session
spark = build_session(SparkConfig(master="local[1]", driver_memory="1g", shuffle_partitions=1,
                                  conf={"spark.ui.enabled": "false", "spark.driver.extraJavaOptions": sys.argv[1]}))
spark.range(100).selectExpr("id % 7 AS k").groupBy("k").count().write.parquet(sys.argv[2])
jvm = spark.sparkContext._gateway.proc
spark.stop()
jvm.stdin.close()
sys.exit(jvm.wait())
"""


def run_session(java_options: str, out: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    return subprocess.run([sys.executable, "-c", SESSION_WITH_OPTIONS, java_options, str(out)],
                          env=environment, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("warmup") / "spark-classes.jsa"
    build_spark_class_archive(target)
    return target


def test_the_archive_is_written_whole_and_nothing_partial_is_left(archive):
    assert archive.stat().st_size > 10_000_000
    assert [path.name for path in archive.parent.iterdir()] == [archive.name]


def test_a_local_feature_jvm_loads_spark_classes_from_the_archive(archive, tmp_path):
    log = tmp_path / "class-load.log"
    options = f"{class_archive_options('local[1]', archive)} -Xlog:class+load=info:file={log}"
    finished = run_session(options, tmp_path / "out")
    assert finished.returncode == 0, finished.stderr[-3000:]
    loads = [line for line in log.read_text().splitlines() if "org.apache.spark." in line]
    shared = [line for line in loads if "shared objects file (top)" in line]
    assert len(shared) > 1000, f"{len(shared)} of {len(loads)} Spark classes from the archive"
    assert any("org.apache.spark.sql.execution.datasources.parquet.ParquetFileFormat " in line
               for line in shared)


def test_a_jvm_the_archive_does_not_fit_ignores_it_silently(archive, tmp_path):
    other_class_path = subprocess.run(
        ["java", *class_archive_options("local", archive).split(), "-cp", str(tmp_path), "-version"],
        capture_output=True, text=True, timeout=60)
    assert other_class_path.returncode == 0
    assert "archive" not in other_class_path.stdout + other_class_path.stderr


def test_the_archive_is_for_a_local_master_and_only_when_written(archive, tmp_path):
    assert str(archive) in class_archive_options("local[*]", archive)
    assert class_archive_options("yarn", archive) == ""
    assert class_archive_options("spark://head:7077", archive) == ""
    assert class_archive_options("local[2]", tmp_path / "absent.jsa") == ""
