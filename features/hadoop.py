"""What the full and the incremental feature jobs share at their edges: filesystem operations through
Hadoop's FileSystem (any filesystem Spark understands), reading the raw events, the job's error and
its timed stages.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any, Iterator

from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.utils import AnalysisException

logger = logging.getLogger(__name__)



DATASET_KIND = "training_windows"


QUARANTINE_DIR = "quarantine"


class FeatureJobError(RuntimeError):
    """The job cannot run on this input (nothing to read, an output it must not replace)."""


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    logger.info("%s ...", name)
    started = time.monotonic()
    yield
    logger.info("%s done in %.1fs", name, time.monotonic() - started)


class HadoopFiles:
    """The few filesystem operations the job needs, on whatever filesystem a URI names."""

    def __init__(self, spark: SparkSession, uri: str) -> None:
        self._jvm = spark.sparkContext._jvm
        path = self._jvm.org.apache.hadoop.fs.Path(uri)
        self._fs = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())
        self.root = str(self._fs.makeQualified(path))

    def _path(self, uri: str) -> Any:
        return self._jvm.org.apache.hadoop.fs.Path(uri)

    def exists(self, uri: str) -> bool:
        return bool(self._fs.exists(self._path(uri)))

    def sibling(self, uri: str, label: str) -> str:
        """A hidden name next to ``uri`` (readers skip ``.``-prefixed paths)."""
        path = self._path(uri)
        return str(self._jvm.org.apache.hadoop.fs.Path(path.getParent(),
                                                       f".{path.getName()}.{label}-{uuid.uuid4().hex[:12]}"))

    def is_empty(self, uri: str) -> bool:
        return len(self._fs.listStatus(self._path(uri))) == 0

    def mkdirs(self, uri: str) -> None:
        self._fs.mkdirs(self._path(uri))

    def rename(self, source: str, target: str) -> None:
        # Hadoop's rename reports failure by returning False, not by raising.
        if not self._fs.rename(self._path(source), self._path(target)):
            raise OSError(f"could not rename {source} to {target}")

    def delete(self, uri: str) -> None:
        self._fs.delete(self._path(uri), True)

    def write_text(self, uri: str, text: str) -> None:
        stream = self._fs.create(self._path(uri), True)
        try:
            stream.write(bytearray(text.encode("utf-8")))
        finally:
            stream.close()

    def read_text(self, uri: str) -> str:
        stream = self._fs.open(self._path(uri))
        try:
            return self._jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
        finally:
            stream.close()


def read_raw(spark: SparkSession, raw: str) -> DataFrame:
    """Raw events from a synthetic log or the ingest landing zone: every Parquet file below ``raw``,
    with Hive partition columns (``date``, ``hour``) as extra columns; ``_``/``.``-prefixed paths are
    skipped by Spark (markers, ground truth, files still being written)."""
    files = HadoopFiles(spark, raw)
    if not files.exists(files.root):
        raise FeatureJobError(f"raw input not found: {raw}")
    try:
        return spark.read.option("pathGlobFilter", "*.parquet").parquet(files.root)
    except (AnalysisException, Py4JJavaError) as error:
        cause = error.java_exception.toString() if isinstance(error, Py4JJavaError) else str(error)
        raise FeatureJobError(f"cannot read raw events from {raw}: {cause}") from None
