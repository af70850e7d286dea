"""The full feature job: raw events → training windows, quarantine and manifest, in one pass.

Output (``OUT``)::

    train/date=YYYY-MM-DD/part-*.parquet   eval/date=YYYY-MM-DD/part-*.parquet
    quarantine/part-*.parquet              (invalid rows: their original columns plus ``reason``)
    _MANIFEST.json                         _SUCCESS (last)

The manifest records the spec the rows were computed with (``spec``, whole schema included, and its
``schema_fingerprint``): where the schema standardizes a numeric without given statistics, they are
fitted here, on the train split (:func:`fitted_spec`), and recorded, so incremental batches, the
trainer and the serving path use the same numbers.

Everything is written into a hidden sibling directory through Hadoop's FileSystem (so any filesystem
Spark understands works), which replaces ``OUT`` only once complete: a failed run leaves the previous
output as it was and never a directory with ``_SUCCESS`` and partial data. I/O lives here, at the
edges; the transformations are :mod:`features.transforms`. Run by :mod:`features.job`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from common.config import to_dict
from common.logs import utc_text
from features.dataset import MANIFEST_NAME, SUCCESS_NAME, manifest_json
from features.hadoop import (
    DATASET_KIND, QUARANTINE_DIR, FeatureJobError, HadoopFiles, read_raw, stage,
)
from features.schema import EVENT_TS
from features.settings import FeaturesConfig
from features.spec import FEATURE_SPEC_VERSION, PARTITION_COLUMN, FeatureSpec
from features.transforms import (
    EVAL, MILLIS_PER_DAY, REASON_COLUMN, SPLIT_COLUMN, TRAIN, WINDOW_COLUMN, cut_windows,
    deduplicate, fitted_statistics, split_ts_ms, standardize_partials, token_features, valid_events,
    validate, window_statistics,
)
from features.validation import now_ms

logger = logging.getLogger(__name__)


def run(spark: SparkSession, config: FeaturesConfig) -> dict[str, Any]:
    """Run the job; returns the manifest it wrote."""
    started = time.monotonic()
    processing_ms = now_ms(config.contract)
    out = HadoopFiles(spark, config.out)
    _refuse_foreign_output(out)
    staging = out.sibling(out.root, "staging")
    out.mkdirs(staging)
    try:
        raw = read_raw(spark, config.raw)
        manifest = _write_dataset(spark, config, raw, staging, processing_ms)
        _publish(out, staging)
    except BaseException:
        with contextlib.suppress(Exception):
            out.delete(staging)
        raise
    logger.info("wrote %s in %.1fs: train %d rows, eval %d rows, %d quarantined, %d duplicates",
                out.root, time.monotonic() - started, manifest["splits"][TRAIN]["rows"],
                manifest["splits"][EVAL]["rows"], manifest["quarantined"], manifest["duplicates"])
    return manifest


def _write_dataset(spark: SparkSession, config: FeaturesConfig, raw: DataFrame, staging: str,
                   processing_ms: int) -> dict[str, Any]:
    """Write quarantine, splits, manifest and (last) ``_SUCCESS`` into ``staging``; returns the manifest.

    Each DataFrame that feeds more than one action is persisted and materialised by the first one, so
    no stage is computed twice; its parent is released once it is. The manifest records the spec
    the rows were computed with: the configured one, its standardize statistics fitted
    (:func:`fitted_spec`).
    """
    schema = config.spec.event_schema
    with stage("validate"):
        validated = validate(raw, schema, config.contract, processing_ms).persist()
        counts = {row[REASON_COLUMN]: row["count"] for row in validated.groupBy(REASON_COLUMN).count().collect()}
        valid = counts.pop(None, 0)
        quarantined = dict(sorted(counts.items()))
        logger.info("%d input events: %d valid, %d quarantined %s", valid + sum(quarantined.values()),
                    valid, sum(quarantined.values()), quarantined)
    # One task writes the quarantine (one file), beside deduplication's, so that no core idles; the
    # block waits for it whatever happens, so nothing writes into the staging directory afterwards.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write-quarantine") as writer:
        quarantine_written = writer.submit(_write_quarantine, validated, staging)
        with stage("deduplicate"):
            unique = deduplicate(valid_events(validated, schema), schema).persist()
            events_per_day, watermark = _events_per_day(unique)
            events = sum(events_per_day.values())
            logger.info("%d events after removing %d duplicates; watermark %s", events, valid - events,
                        utc_text(watermark))
        quarantine_written.result()
    validated.unpersist()
    # With no valid event there is no split time, and both splits are empty.
    split_ms = split_ts_ms(watermark, config.eval_days) if watermark is not None else 0
    split_events = {TRAIN: sum(n for day, n in events_per_day.items() if day * MILLIS_PER_DAY < split_ms),
                    EVAL: sum(n for day, n in events_per_day.items() if day * MILLIS_PER_DAY >= split_ms)}
    spec = fitted_spec(config.spec, unique, split_ms)
    with stage("cut windows"):
        windows = cut_windows(token_features(unique, spec), spec, split_ms).persist()
        windows.count()  # cached once here, before both writes read it
        unique.unpersist()
    # Both splits are written at once: each write's small jobs (its range sample, the shuffle's
    # last tasks) and the planning between them leave a core idle that the other write's tasks use.
    # The block waits for both whatever happens, so nothing writes into the staging directory after.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="write-split") as writers:
        writes = {split: writers.submit(_write_split, windows, spec, split, files, staging)
                  for split, files in ((TRAIN, config.train_files), (EVAL, config.eval_files))}
        written = {split: write.result() for split, write in writes.items()}
    windows.unpersist()
    rows = written[TRAIN][0]  # the train rows: their columns go in the manifest
    splits = {split: split_entry(written[split][1], split_events[split]) for split in (TRAIN, EVAL)}
    for split, entry in splits.items():
        logger.info("%s: %d rows, %d events, %d label tokens", split, entry["rows"], entry["events"],
                    entry["label_tokens"])
        if entry["label_tokens"] != entry["events"]:
            raise FeatureJobError(f"{split}: {entry['label_tokens']} label tokens for {entry['events']} "
                                  "events; every event must bear its label exactly once (a bug)")
    manifest = {
        "dataset": DATASET_KIND,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "spec": spec.record(),
        "schema_fingerprint": spec.event_schema.fingerprint,
        "config": to_dict(config),
        "input_events": valid + sum(quarantined.values()),
        "valid_events": valid,
        "duplicates": valid - events,
        "events": events,
        "quarantined": sum(quarantined.values()),
        "quarantined_by_reason": quarantined,
        "processing_ms": processing_ms,
        "watermark_ms": watermark,
        "split_ts_ms": split_ms if watermark is not None else None,
        # What this run read: an incremental run (features.incremental) reads only files not listed.
        "input_files": sorted(raw.inputFiles()),
        "columns": [[field.name, field.dataType.simpleString()] for field in rows.schema],
        "splits": splits,
    }
    staging_files = HadoopFiles(spark, staging)
    staging_files.write_text(f"{staging}/{MANIFEST_NAME}", manifest_json(manifest))
    staging_files.write_text(f"{staging}/{SUCCESS_NAME}", "")
    return manifest


def _write_quarantine(validated: DataFrame, staging: str) -> None:
    """The invalid rows, their original columns and ``reason``: a small minority, so one file keeps
    them easy to inspect."""
    with stage("write quarantine"):
        (validated.where(F.col(REASON_COLUMN).isNotNull()).coalesce(1)
         .write.parquet(f"{staging}/{QUARANTINE_DIR}"))


def _write_split(windows: DataFrame, spec: FeatureSpec, split: str, files: int,
                 staging: str) -> tuple[DataFrame, dict[str, Any]]:
    """Write one split's rows into ``staging``; returns them (their schema goes in the manifest) and
    their :func:`features.transforms.window_statistics`, observed as they were written (after the
    range partitioning, whose sample would count rows again), not by a pass of their own."""
    with stage(f"write {split}"):
        rows, observed = split_rows(windows, spec, split, files), Observation(f"{split} statistics")
        write_rows(rows.observe(observed, *window_statistics(spec.event_schema)), f"{staging}/{split}")
    statistics = observed.get
    return rows, statistics if statistics["rows"] else {}  # an empty split records no positives


def _events_per_day(events: DataFrame) -> tuple[dict[int, int], int | None]:
    """Events per UTC day number, and the watermark (the latest ``event_ts``), in one small action."""
    rows = (events.groupBy(F.floor(F.col(EVENT_TS) / F.lit(MILLIS_PER_DAY)).alias("day"))
            .agg(F.count(F.lit(1)).alias("events"), F.max(EVENT_TS).alias("watermark")).collect())
    return {row["day"]: row["events"] for row in rows}, max((row["watermark"] for row in rows), default=None)


def fitted_spec(spec: FeatureSpec, events: DataFrame, split_ms: int) -> FeatureSpec:
    """``spec`` with the standardize statistics its schema lacks fitted on the train split's
    deduplicated events (``event_ts < split_ms``): the mean and the population standard deviation
    of the value before standardize (:func:`features.transforms.fitted_statistics`). Steps that
    carry their statistics keep them; a schema without such steps is returned as it is."""
    schema = spec.event_schema
    if not schema.needs_fit:
        return spec
    with stage("fit standardize statistics on the train split"):
        statistics = fitted_statistics(schema, standardize_partials(events, schema, split_ms).collect())
        for name, (mean, std) in statistics.items():
            logger.info("standardize %s: mean %.6g, std %.6g", name, mean, std)
    return spec.with_schema(schema.fitted(statistics))


def split_rows(windows: DataFrame, spec: FeatureSpec, split: str, files: int) -> DataFrame:
    """One split's rows, range-partitioned into about ``files`` files (plus one per date boundary a
    file would span), each sorted so that re-runs write the same rows in the same order."""
    order = (PARTITION_COLUMN, "user_key", WINDOW_COLUMN)
    return (windows.where(F.col(SPLIT_COLUMN) == F.lit(split))
            .repartitionByRange(files, *order).sortWithinPartitions(*order)
            .select(*spec.event_schema.training_columns, PARTITION_COLUMN))


def write_rows(rows: DataFrame, uri: str) -> None:
    """Write one split's rows, a folder per ``date``. Without Parquet dictionaries: on these rows
    (hashed ids, floats, padding) trying them cost about a quarter of the write's CPU to make the
    files about 15 % smaller (measured on synthetic logs); the values are the same."""
    rows.write.option("parquet.enable.dictionary", "false").partitionBy(PARTITION_COLUMN).parquet(uri)


def split_entry(statistics: dict[str, Any], events: int) -> dict[str, Any]:
    return {
        "rows": int(statistics.get("rows", 0)),
        "events": events,
        "tokens": int(statistics.get("tokens") or 0),
        "label_tokens": int(statistics.get("label_tokens") or 0),
        "positives": {name[len("positive_"):]: int(value or 0) for name, value in statistics.items()
                      if name.startswith("positive_")},
    }


def _refuse_foreign_output(out: HadoopFiles) -> None:
    """Replace ``out`` only when it is a previous output of this job (or absent or empty)."""
    if not out.exists(out.root) or out.is_empty(out.root):
        return
    if not out.exists(f"{out.root}/{MANIFEST_NAME}"):
        raise FeatureJobError(f"{out.root} exists and is not a feature dataset; refusing to replace it")
    manifest = json.loads(out.read_text(f"{out.root}/{MANIFEST_NAME}"))
    if manifest.get("dataset") != DATASET_KIND:
        raise FeatureJobError(f"{out.root} holds a '{manifest.get('dataset')}' dataset, not feature "
                              "windows; refusing to replace it")


def _publish(out: HadoopFiles, staging: str) -> None:
    """Swap the complete staging directory into place; the previous output is removed only after."""
    if out.exists(out.root):
        previous = out.sibling(out.root, "previous")
        out.rename(out.root, previous)
        out.rename(staging, out.root)
        out.delete(previous)
    else:
        out.rename(staging, out.root)
