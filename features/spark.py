"""The SparkSession of a feature job, built from :class:`features.settings.SparkConfig`."""

from __future__ import annotations

import logging
import os

from pyspark.sql import SparkSession

from features.settings import SparkConfig

logger = logging.getLogger(__name__)


JIT_OPTIONS = "-XX:FreqInlineSize=100 -XX:CompileThresholdScaling=4"
INPUT_TASKS_PER_CORE = 4
MIN_INPUT_PARTITIONS = "spark.sql.files.minPartitionNum"


def session_settings(config: SparkConfig) -> dict[str, str]:
    """Spark settings of a job, ``config.conf`` last so it can override any of them."""
    return {
        "spark.driver.memory": config.driver_memory,
        "spark.sql.shuffle.partitions": str(config.shuffle_partitions),
        # Dates and day boundaries of the data contract are UTC whatever the machine's zone.
        "spark.sql.session.timeZone": "UTC",
        "spark.log.level": config.log_level.upper(),
        # The job logs its stages with counts and durations; Spark's console bar would interleave.
        "spark.ui.showConsoleProgress": "false",
        # The job's cached frames are each built once and read a few times in the same run:
        # compressing them costs more CPU than it saves (they spill to disk when memory is short).
        "spark.sql.inMemoryColumnarStorage.compressed": "false",
        # Arrays of non-null values (every per-token column) are written as 2-level Parquet lists,
        # one repeated leaf, not the 3-level list > element groups: the same values, which every
        # Parquet reader reads alike, for about 5 % less CPU in the full job. The job writes no
        # decimals or maps, the setting's other effects.
        "spark.sql.parquet.writeLegacyFormat": "true",
        # A job's JVM is short-lived and spends about a quarter of its CPU compiling hot code,
        # Spark's generated code included: inlining only methods up to 100 bytecodes (325 by
        # default) cuts that compiling by a quarter and the job's time by about a tenth, and
        # compiling only methods four times as hot as by default saves about 2 % more (near this
        # machine's noise), measured on 2 cores (bench/feature_job.py). conf can replace these options.
        "spark.driver.extraJavaOptions": JIT_OPTIONS,
        "spark.executor.extraJavaOptions": JIT_OPTIONS,
        # A dataset carries one _SUCCESS, the job's own, written last; none in its sub-folders.
        "spark.hadoop.mapreduce.fileoutputcommitter.marksuccessfuljobs": "false",
        **config.conf,
    }


def started_by_spark_submit() -> bool:
    """True inside a driver that ``spark-submit`` launched: its JVM already runs, with the master
    and memory given on the ``spark-submit`` command line (pyspark connects through this variable)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def build_session(config: SparkConfig, app_name: str = "sirenfeed-features") -> SparkSession:
    builder = SparkSession.builder.appName(app_name)
    if not started_by_spark_submit():
        builder = builder.master(config.master)
    for key, value in session_settings(config).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    if MIN_INPUT_PARTITIONS not in config.conf:
        # An input smaller than cores × 128 MB (a synthetic log, an incremental batch) is cut into
        # about one split per core, packed from the largest file down, so a short last split leaves
        # a core idle while the longest runs, in the scan and in every stage over its cached rows.
        # Four per core keep that tail short: 5-15 % less job time over 3 pairs on 2 cores (bench/feature_job.py).
        spark.conf.set(MIN_INPUT_PARTITIONS, str(INPUT_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    logger.info("Spark %s, master %s, %s shuffle partitions", spark.version,
                spark.sparkContext.master, spark.conf.get("spark.sql.shuffle.partitions"))
    return spark
