"""The long-lived incremental feature job of the continuous pipeline: one Spark application for
every incremental run.

    spark-submit … features/resident.py --config FEATURES.yaml --inbox INBOX

``sirenfeed train --continuous`` (:mod:`lifecycle.resident`) submits this once, the same way
``sirenfeed features`` submits :mod:`features.job`, and sends it one request per cycle
(:class:`common.resident.Inbox`). Each request runs :func:`features.incremental.run_incremental`
on the application's one session: the same job, the same lock and the same exactly-once append as
a fresh submission, without the JVM start and the session's warm-up. The answer is
``{"newest_batch": K, "new_batch": whether this run made it}``, ``{"locked": message}`` when another incremental job holds the dataset's
lock (the application stays up), or ``{"error": message}`` for a job error about the data (a
:class:`~features.hadoop.FeatureJobError` or :class:`~features.schema.SchemaError`; it stays up too).

Any other failure ends the application with exit code 1: a session that failed mid-job is not
trusted with the next one, and the owner starts a new application. Between requests the driver asks
its JVM every :data:`HEALTH_S` seconds whether it is there, so a killed JVM ends the driver too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

from pyspark.sql import SparkSession

from common.concurrency import Locked
from common.config import load_config
from common.logs import configure_logging
from common.resident import Inbox
from features.dataset import MANIFEST_NAME
from features.hadoop import FeatureJobError
from features.incremental import DatasetFiles, run_incremental
from features.schema import SchemaError
from features.settings import FeaturesConfig
from features.spark import build_session

# Named rather than __name__: spark-submit runs this file as __main__.
logger = logging.getLogger("features.resident")

RESIDENT_JOB = Path(__file__).resolve()
HEALTH_S = 2.0
"""Seconds between two checks of the idle driver that its JVM is there."""


def newest_batch(spark: SparkSession, config: FeaturesConfig) -> int:
    """The index of the dataset's newest batch (0: the full run's alone)."""
    out = DatasetFiles(spark, config.out)
    return json.loads(out.read_text(f"{out.root}/{MANIFEST_NAME}")).get("newest_batch", 0)


class JvmHealth:
    """The idle check of :meth:`common.resident.Inbox.requests`: raises once the JVM is gone."""

    def __init__(self, spark: SparkSession):
        self._tracker = spark.sparkContext.statusTracker()
        self._checked = time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self._checked >= HEALTH_S:
            self._tracker.getActiveJobsIds()  # a py4j call: raises when the JVM is gone
            self._checked = time.monotonic()


def main(argv: list[str]) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="features/resident.py", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the resolved feature job config")
    parser.add_argument("--inbox", required=True, help="the request folder its owner writes to")
    args = parser.parse_args(argv)
    config = load_config(FeaturesConfig, Path(args.config), [])
    spark = build_session(config.spark)
    inbox = Inbox(Path(args.inbox))
    logger.info("resident feature job up; waiting for requests in %s", inbox.folder)
    try:
        for _ in inbox.requests(idle=JvmHealth(spark)):
            started = time.monotonic()
            try:
                before = newest_batch(spark, config)
                manifest = run_incremental(spark, config)
            except Locked as error:
                inbox.answer({"locked": str(error)})
                continue
            except (FeatureJobError, SchemaError) as error:
                logger.error("%s", error)
                inbox.answer({"error": str(error)})
                continue
            inbox.answer({"newest_batch": manifest.get("newest_batch", 0),
                          "new_batch": manifest.get("newest_batch", 0) != before,
                          "seconds": round(time.monotonic() - started, 3)})
    except Exception:
        logger.exception("the resident feature job failed; its owner starts a new one")
        return 1
    finally:
        with contextlib.suppress(Exception):  # a JVM that is gone cannot be stopped
            spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
