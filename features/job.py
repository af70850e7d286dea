"""The Spark feature job: raw events → training windows, quarantine and manifest.

``spark-submit features/job.py --config conf/features.yaml [--raw RAW] [--out OUT] [key=value ...]``
on any master (``sirenfeed features`` is the local wrapper). This module is the entry point only:
the full job is :mod:`features.full`, the incremental one :mod:`features.incremental`, their shared
Hadoop I/O :mod:`features.hadoop`, and the transformations :mod:`features.transforms`.

What it writes, and how a failed run leaves the previous output intact: :mod:`features.full`.
"""

from __future__ import annotations

import logging
import sys

from common.concurrency import EXIT_LOCKED, Locked
from common.config import ConfigError
from common.logs import configure_logging
from features.full import run
from features.hadoop import FeatureJobError
from features.incremental import run_incremental
from features.schema import SchemaError
from features.settings import parse_job_arguments
from features.spark import build_session

# Named rather than __name__: spark-submit runs this file as __main__.
logger = logging.getLogger("features.job")


def main(argv: list[str]) -> int:
    configure_logging()
    try:
        config = parse_job_arguments("features.job", __doc__.splitlines()[0], argv)
    except ConfigError as error:
        print(f"features.job: {error}", file=sys.stderr)
        return 2
    spark = build_session(config.spark)
    try:
        if config.incremental.enabled:
            run_incremental(spark, config)
        else:
            run(spark, config)
    except (FeatureJobError, SchemaError) as error:  # SchemaError: an incremental run's other schema
        logger.error("%s", error)
        return 1
    except Locked as error:
        logger.error("%s", error)
        return EXIT_LOCKED
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
