"""The incremental feature job: append the raw events not read yet as a new batch of windows.

``sirenfeed features --incremental --raw RAW --out FEATURES_DIR`` (or ``features/job.py --incremental``
under ``spark-submit``) runs on a dataset a full run created and keeps its layout. Each run is one
*batch* ``b<k>`` (``k`` counts up from 0, the full run)::

    train/date=D/b000003-part-*.parquet   eval/date=D/b000003-part-*.parquet
    quarantine/b000003-part-*.parquet      (invalid and too-late events, with their ``reason``)
    _state/b000003/                        the state the next run continues from:
        users/   each user's last C−1 events (canonical events, every schema field): the next
                 windows' context
        items/   each value of the item-age field with its first impression time (``log_item_age``
                 keeps counting from it); absent when the schema has no item age
        seen/    ids of the events within the allowed lateness of the watermark (re-deliveries)
        consumed.json                      every raw file read so far
    _MANIFEST.json                         ``batches`` (one entry per batch: counts, event-time
                                           range, its files), ``newest_batch``, ``state``,
                                           ``watermark_ms`` (latest event time of all batches)

What a batch reads: the raw files (synthetic log or ingest landing zone) not listed in
``consumed.json``, wherever they are. That is the partitions newer than the watermark, plus any file
the ingest added to an older hour: a late event is never skipped for living in an old partition.
Every accepted event bears its label exactly once, in the batch that first read it. An event
already seen (its id is in ``seen``) counts as a duplicate; one older than the watermark by less
than ``incremental.allowed_lateness_s`` is added and counted as late; an older one is quarantined
as ``too_late`` and counted. Windows of a user's new events take its stored events as context
(``loss_mask`` 0, placed before the new ones, so a late event follows the history it arrived
after). The stored events are whole canonical events, the ``known_after`` duration included, so
the availability rule of the previous actions (``prev_actions_known``,
:func:`features.transforms.token_features`) holds across batches as in a full run; a late event
sees no actions that were unknown at its own time, neither its row predecessor's nor, through the
context it attends to, any earlier ones. The newest
``incremental.holdout_s`` seconds of the batch (default: all of it) are its ``eval`` part, the
freshest held-out slice; the trainer trains on it in the next cycle.

A batch is computed with the spec the dataset records (its schema with the standardize statistics
the full run fitted), never re-fitted: every batch's values mean the same. A run configured with
another schema (compared without fitted statistics), context length or stride fails before reading
anything, naming the difference.

Publishing a batch: everything is written into a hidden staging directory; then the state
directory and the data files move into place under hidden names (``.b<k>-…``, invisible to
readers), the top-level manifest is replaced (the commit point) and the files are renamed to their
visible names. A run first finishes or removes what a crashed run left: hidden files of a committed
batch are made visible, those of an uncommitted one and unreferenced state are deleted. A full run
recorded no state; the first incremental run builds it from the full run's input files.

One run at a time: a run holds the dataset's lock, an ``flock`` on ``FEATURES_DIR/_LOCK``
(:func:`common.concurrency.exclusive_lock`), from before its recovery to after its commit, so no
run cleans up what a live one is writing. A second run fails at once with
:class:`common.concurrency.Locked`, naming the holder (``features/job.py`` and ``sirenfeed
features`` exit 5; ``sirenfeed retrain`` exits 5 and resumes the cycle next time). The lock lives
where the job's *driver* runs: ``FEATURES_DIR`` must be a local or NFSv4-style filesystem that
honours ``flock`` on that host (with ``--deploy-mode cluster``, one the driver's node shares with
the other writers). On ``hdfs://``, ``s3a://`` and the like no lock is taken (a warning says so):
there, run one incremental job per dataset at a time (``sirenfeed retrain``'s own lock does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from common.concurrency import exclusive_lock
from common.files import atomic_write_text, local_path, visible_files
from common.logs import utc_text
from features.batches import BATCH_NAME, batch_name, first_batch
from features.dataset import MANIFEST_NAME, manifest_json
from features.full import split_entry, split_rows, write_rows
from features.hadoop import DATASET_KIND, QUARANTINE_DIR, FeatureJobError, HadoopFiles, stage
from features.schema import EVENT_ID, EVENT_TS, USER_ID, EventSchema, require_same_schema
from features.settings import FeaturesConfig
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from features.transforms import (
    EVAL, ITEM_FIRST_TS, REASON_COLUMN, TRAIN, cut_windows, deduplicate, split_statistics,
    token_features, valid_events, validate,
)
from features.validation import now_ms

logger = logging.getLogger(__name__)

STATE_DIR = "_state"
LOCK_NAME = "_LOCK"
STAGING_PREFIX = ".staging-"
USERS, ITEMS, SEEN, CONSUMED = "users", "items", "seen", "consumed.json"
REASON_TOO_LATE = "too_late"
HISTORY_COLUMN = "_history"
SEEN_DDL = f"{EVENT_ID} STRING, {EVENT_TS} BIGINT"
SPLITS = (TRAIN, EVAL)


class DatasetFiles(HadoopFiles):
    """The feature dataset's filesystem, with the listing and replacing an append needs."""

    def qualify(self, uri: str) -> str:
        return str(self._fs.makeQualified(self._path(uri)))

    def list_parquet(self, uri: str, hidden: bool = False) -> list[str]:
        """Qualified ``*.parquet`` files below ``uri``, skipping ``_``-prefixed path components and,
        unless ``hidden``, ``.``-prefixed ones too."""
        if not self.exists(uri):
            return []
        root = self.qualify(uri).rstrip("/")
        skip = ("_",) if hidden else ("_", ".")
        found, files = [], self._fs.listFiles(self._path(root), True)
        while files.hasNext():
            path = str(files.next().getPath())
            parts = path[len(root) + 1:].split("/")
            if path.endswith(".parquet") and not any(part.startswith(skip) for part in parts):
                found.append(path)
        return sorted(found)

    def children(self, uri: str) -> list[str]:
        if not self.exists(uri):
            return []
        return sorted(str(status.getPath()) for status in self._fs.listStatus(self._path(uri)))

    def replace_text(self, uri: str, text: str) -> None:
        """Replace a small file atomically (local paths) or as nearly so as the filesystem allows."""
        if uri.startswith("file:"):
            target = local_path(re.sub(r"^file:/+", "/", uri))
            atomic_write_text(target, text)
            # Hadoop's local filesystem would check the new text against the old file's checksum.
            (target.parent / f".{target.name}.crc").unlink(missing_ok=True)
            return
        temporary = self.sibling(uri, "new")
        self.write_text(temporary, text)
        if self.exists(uri):
            self.delete(uri)
        self.rename(temporary, uri)


def run_incremental(spark: SparkSession, config: FeaturesConfig) -> dict[str, Any]:
    """Append the unread raw files of ``config.raw`` to the dataset ``config.out`` as one batch;
    returns the manifest (unchanged when there was nothing new). Holds the dataset's lock
    throughout (:func:`dataset_lock`; :class:`common.concurrency.Locked` if another run does)."""
    with dataset_lock(config.out):
        return _append_batch(spark, config)


def dataset_lock(uri: str) -> contextlib.AbstractContextManager[None]:
    """The exclusive lock of the feature dataset at ``uri`` (``_LOCK`` inside it); none where this
    process cannot ``flock`` it (a remote filesystem) or the dataset does not exist (the run fails)."""
    if "://" in uri and not uri.startswith("file:"):
        logger.warning("%s is not on a local filesystem: no lock is taken; run one incremental job on "
                       "it at a time", uri)
        return contextlib.nullcontext()
    root = local_path(re.sub(r"^file:/+", "/", uri))
    if not root.is_dir():
        return contextlib.nullcontext()
    return exclusive_lock(root / LOCK_NAME, "incremental feature job")


def _append_batch(spark: SparkSession, config: FeaturesConfig) -> dict[str, Any]:
    out = DatasetFiles(spark, config.out)
    manifest_uri = f"{out.root}/{MANIFEST_NAME}"
    if not out.exists(f"{out.root}/_SUCCESS") or not out.exists(manifest_uri):
        raise FeatureJobError(f"{out.root} is not a complete feature dataset: run the full job first")
    manifest = json.loads(out.read_text(manifest_uri))
    if manifest.get("dataset") != DATASET_KIND:
        raise FeatureJobError(f"{out.root} is not a feature dataset")
    spec = dataset_spec(manifest, config, out.root)
    _recover(out, manifest)
    processing_ms = now_ms(config.contract)
    batches = manifest.get("batches") or [_bootstrap_entry(out, manifest)]
    index = batches[-1]["index"] + 1
    name = batch_name(index)
    staging = f"{out.root}/{STAGING_PREFIX}{name}-{uuid.uuid4().hex[:12]}"
    out.mkdirs(staging)
    try:
        state = _load_state(spark, out, manifest, spec.event_schema) if manifest.get("state") else \
            _bootstrap_state(spark, manifest, config, spec.event_schema)
        consumed = set(state["consumed"])
        new_files = [path for path in out.list_parquet(config.raw) if path not in consumed]
        if not new_files:
            logger.info("nothing new under %s: every raw file is in the dataset already", config.raw)
            out.delete(staging)
            return manifest
        logger.info("batch %s: %d new raw files", name, len(new_files))
        entry, new_state = _write_batch(spark, config, spec, manifest, state, new_files, staging, index,
                                        processing_ms)
        _write_state(spark, out, new_state, sorted(consumed | set(new_files)), f"{staging}/{STATE_DIR}")
        _commit(out, manifest, batches, entry, staging, name)
    except BaseException:
        out.delete(staging)
        raise
    logger.info("batch %s: %d events (%d late, %d too late, %d duplicates), watermark %s",
                name, entry["events"], entry["late"], entry["too_late"], entry["duplicates"],
                utc_text(manifest["watermark_ms"]))
    return manifest


def dataset_spec(manifest: dict[str, Any], config: FeaturesConfig, root: str) -> FeatureSpec:
    """The spec the dataset records (with its fitted schema), which every batch is computed with.
    Raises :class:`features.schema.SchemaError` naming the keys where the configured schema differs
    (standardize statistics aside: the configured file may leave them to the fit), and
    :class:`FeatureJobError` for another context length, stride or feature spec version."""
    version = manifest.get("feature_spec_version")
    if version != FEATURE_SPEC_VERSION:
        raise FeatureJobError(f"{root} was built by feature spec version {version}, this job writes "
                              f"{FEATURE_SPEC_VERSION}: re-run the full feature job")
    recorded = FeatureSpec(**manifest["spec"])
    require_same_schema(recorded.event_schema, config.spec.event_schema,
                        f"this run's spec (the dataset {root} holds schema '{recorded.event_schema.name}')")
    for key in ("context_len", "stride"):
        if getattr(recorded, key) != getattr(config.spec, key):
            raise FeatureJobError(f"{root} was built with spec.{key}={getattr(recorded, key)}, this run has "
                                  f"{getattr(config.spec, key)}: an incremental run must use the full run's spec.*")
    return recorded


def pending_raw_files(config: FeaturesConfig) -> dict[str, int] | None:
    """The raw files the next incremental run would read, with their row counts (from the Parquet
    footers), without starting Spark: what a poller checks before paying for a feature job.

    ``None`` when ``raw`` or ``out`` is not on the local filesystem (the job itself must look) or
    the dataset is not complete yet. A file whose footer cannot be read yet counts 0 rows. Mirrors :meth:`DatasetFiles.list_parquet` (``*.parquet``, no
    ``_``/``.``-prefixed path component) and the consumed list of :func:`run_incremental`; a test
    holds the two to the same answer."""
    if any("://" in uri and not uri.startswith("file://") for uri in (config.raw, config.out)):
        return None
    out, raw = local_path(config.out), local_path(config.raw).absolute()
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        consumed = (json.loads((out / manifest["state"] / CONSUMED).read_text()) if manifest.get("state")
                    else manifest.get("input_files", []))
    except (OSError, ValueError, KeyError):
        return None
    seen = {str(local_path(re.sub(r"^file:/*", "/", uri))) for uri in consumed}
    found = {}
    for path in visible_files(raw):
        if path.is_file() and str(path) not in seen:
            try:
                found[str(path)] = pq.ParquetFile(path).metadata.num_rows
            except (OSError, pa.ArrowInvalid):  # still being written by a non-atomic writer
                found[str(path)] = 0
    return found


# --- reading the raw batch and cutting its windows ---------------------------------------------

def _write_batch(spark: SparkSession, config: FeaturesConfig, spec: FeatureSpec, manifest: dict[str, Any],
                 state: dict[str, Any], new_files: list[str], staging: str, index: int,
                 processing_ms: int) -> tuple[dict[str, Any], dict[str, DataFrame | None]]:
    """Validate, classify and window the new raw files into ``staging`` with the dataset's ``spec``;
    returns the batch entry and the next state's frames."""
    schema = spec.event_schema
    previous_ms = manifest["watermark_ms"] or 0
    horizon_ms = previous_ms - config.incremental.allowed_lateness_s * 1000
    root = DatasetFiles(spark, config.raw).root
    raw = spark.read.option("basePath", root).parquet(*new_files)
    with stage("validate"):
        validated = validate(raw, schema, config.contract, processing_ms).persist()
        reasons = {row[REASON_COLUMN]: row["count"] for row in validated.groupBy(REASON_COLUMN).count().collect()}
        valid = reasons.pop(None, 0)
    with stage("classify new, late, too late and already seen events"):
        unique = deduplicate(valid_events(validated, schema), schema)
        fresh = unique.join(state[SEEN].select(EVENT_ID), EVENT_ID, "left_anti")
        kind = (F.when(F.col(EVENT_TS) < F.lit(horizon_ms), F.lit(REASON_TOO_LATE))
                .when(F.col(EVENT_TS) <= F.lit(previous_ms), F.lit("late")).otherwise(F.lit("new")))
        classified = fresh.withColumn("_kind", kind).persist()
        kinds = {row["_kind"]: (row["count"], row["max_ts"]) for row in classified.groupBy("_kind").agg(
            F.count(F.lit(1)).alias("count"), F.max(EVENT_TS).alias("max_ts")).collect()}
        counts = {key: kinds.get(key, (0, None))[0] for key in ("new", "late", REASON_TOO_LATE)}
        accepted = classified.where(F.col("_kind") != F.lit(REASON_TOO_LATE)).drop("_kind").persist()
        events = counts["new"] + counts["late"]
        duplicates = valid - events - counts[REASON_TOO_LATE]
    with stage("write quarantine"):
        too_late = (classified.where(F.col("_kind") == F.lit(REASON_TOO_LATE))
                    .withColumnRenamed("_kind", REASON_COLUMN))
        (validated.where(F.col(REASON_COLUMN).isNotNull())
         .unionByName(too_late, allowMissingColumns=True)
         .coalesce(1).write.parquet(f"{staging}/{QUARANTINE_DIR}"))
    watermark = max([previous_ms] + [kinds[kind][1] for kind in ("new", "late") if kind in kinds])
    holdout = config.incremental.holdout_s
    split_ms = watermark - holdout * 1000 + 1 if holdout else 0
    with stage("cut windows with each user's history as context"):
        users = accepted.select(USER_ID).distinct()
        history = state[USERS].join(users, USER_ID, "left_semi").withColumn(HISTORY_COLUMN, F.lit(True))
        timeline = accepted.withColumn(HISTORY_COLUMN, F.lit(False)).unionByName(history)
        tokens = token_features(timeline, spec, item_history=state[ITEMS], carry=[HISTORY_COLUMN],
                                history=HISTORY_COLUMN)
        windows = cut_windows(tokens, spec, split_ms, history=HISTORY_COLUMN).persist()
        statistics = {row["split"]: row.asDict() for row in split_statistics(windows, schema).collect()}
    split_events = {split: 0 for split in SPLITS}
    for row in accepted.groupBy((F.col(EVENT_TS) < F.lit(split_ms)).alias("train")).count().collect():
        split_events[TRAIN if row["train"] else EVAL] += row["count"]
    for split, files in ((TRAIN, config.train_files), (EVAL, config.eval_files)):
        with stage(f"write {split}"):
            write_rows(split_rows(windows, spec, split, files), f"{staging}/{split}")
    splits = {split: split_entry(statistics.get(split, {}), split_events[split]) for split in SPLITS}
    for split, entry in splits.items():
        if entry["label_tokens"] != entry["events"]:
            raise FeatureJobError(f"{split}: {entry['label_tokens']} label tokens for {entry['events']} "
                                  "new events; every event must bear its label exactly once (a bug)")
    new_state = _next_state(state, timeline, accepted, config, schema, watermark)
    validated.unpersist()
    windows.unpersist()
    range_row = accepted.agg(F.min(EVENT_TS).alias("lo"), F.max(EVENT_TS).alias("hi")).first()
    quarantined = {**reasons, **({REASON_TOO_LATE: counts[REASON_TOO_LATE]} if counts[REASON_TOO_LATE] else {})}
    entry = {
        "index": index, "name": batch_name(index),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input_files": new_files, "input_events": valid + sum(reasons.values()), "valid_events": valid,
        "events": events, "late": counts["late"], "too_late": counts[REASON_TOO_LATE],
        "duplicates": duplicates, "quarantined": sum(quarantined.values()),
        "quarantined_by_reason": dict(sorted(quarantined.items())),
        "min_event_ms": range_row["lo"], "max_event_ms": range_row["hi"], "watermark_ms": watermark,
        "split_ts_ms": split_ms, "processing_ms": processing_ms, "splits": splits,
    }
    accepted.unpersist()
    classified.unpersist()
    return entry, new_state


def _next_state(state: dict[str, Any], timeline: DataFrame, accepted: DataFrame,
                config: FeaturesConfig, schema: EventSchema, watermark: int) -> dict[str, DataFrame | None]:
    """Users: the last C−1 events of every user this batch touched (in the windows' order), the
    stored ones of the others; items: the earliest first impression per value of the item-age field
    (none without one); seen: ids inside the lateness."""
    fields = schema.canonical_field_names
    newest_first = Window.partitionBy(USER_ID).orderBy(
        F.col(HISTORY_COLUMN).asc(), F.col(EVENT_TS).desc(), F.col(EVENT_ID).desc())
    recent = (timeline.withColumn("_rank", F.row_number().over(newest_first))
              .where(F.col("_rank") < F.lit(config.spec.context_len)).select(*fields))
    untouched = state[USERS].join(accepted.select(USER_ID).distinct(), USER_ID, "left_anti")
    items = None
    if schema.item_age_field:
        item = schema.item_age_field
        first_seen = accepted.groupBy(item).agg(F.min(F.expr(f"{EVENT_TS} div 1000")).alias(ITEM_FIRST_TS))
        items = (state[ITEMS].unionByName(first_seen).groupBy(item)
                 .agg(F.min(ITEM_FIRST_TS).alias(ITEM_FIRST_TS)))
    horizon_ms = watermark - config.incremental.allowed_lateness_s * 1000
    seen = (state[SEEN].unionByName(accepted.select(EVENT_ID, EVENT_TS))
            .where(F.col(EVENT_TS) >= F.lit(horizon_ms)))
    return {USERS: recent.unionByName(untouched.select(*fields)), ITEMS: items, SEEN: seen}


# --- state -------------------------------------------------------------------------------------

def _items_ddl(schema: EventSchema) -> str:
    return f"{schema.item_age_field} STRING, {ITEM_FIRST_TS} BIGINT"


def _load_state(spark: SparkSession, out: DatasetFiles, manifest: dict[str, Any],
                schema: EventSchema) -> dict[str, Any]:
    root = f"{out.root}/{manifest['state']}"
    items = spark.read.schema(_items_ddl(schema)).parquet(f"{root}/{ITEMS}") if schema.item_age_field else None
    return {USERS: spark.read.schema(schema.canonical_ddl()).parquet(f"{root}/{USERS}"), ITEMS: items,
            SEEN: spark.read.schema(SEEN_DDL).parquet(f"{root}/{SEEN}"),
            "consumed": json.loads(out.read_text(f"{root}/{CONSUMED}"))}


def _bootstrap_state(spark: SparkSession, manifest: dict[str, Any], config: FeaturesConfig,
                     schema: EventSchema) -> dict[str, Any]:
    """The state after the full run, rebuilt from the raw files it read (once per dataset)."""
    files = manifest.get("input_files")
    if not files:
        raise FeatureJobError("the dataset's manifest does not list the full run's input files: re-run "
                              "the full feature job before the first incremental run")
    logger.info("building the incremental state from the full run's %d input files", len(files))
    raw_files = DatasetFiles(spark, config.raw)
    qualified = [raw_files.qualify(path) for path in files]
    raw = spark.read.option("basePath", raw_files.root).parquet(*qualified)
    validated = validate(raw, schema, config.contract, manifest["processing_ms"])
    events = deduplicate(valid_events(validated, schema), schema)
    nothing = {USERS: spark.createDataFrame([], schema.canonical_ddl()),
               ITEMS: spark.createDataFrame([], _items_ddl(schema)) if schema.item_age_field else None,
               SEEN: spark.createDataFrame([], SEEN_DDL)}
    timeline = events.withColumn(HISTORY_COLUMN, F.lit(False))
    state = _next_state(nothing, timeline, events, config, schema, manifest["watermark_ms"] or 0)
    return {**state, "consumed": qualified}


def _write_state(spark: SparkSession, out: DatasetFiles, state: dict[str, Any], consumed: list[str],
                 target: str) -> None:
    with stage("write state"):
        for key in (USERS, ITEMS, SEEN):
            if state[key] is not None:
                state[key].write.parquet(f"{target}/{key}")
        out.write_text(f"{target}/{CONSUMED}", json.dumps(consumed, indent=0) + "\n")


# --- publishing --------------------------------------------------------------------------------

def _bootstrap_entry(out: DatasetFiles, manifest: dict[str, Any]) -> dict[str, Any]:
    files = {split: [path[len(out.root) + 1:] for path in out.list_parquet(f"{out.root}/{split}")]
             for split in SPLITS}
    return first_batch(manifest, files)


def _commit(out: DatasetFiles, manifest: dict[str, Any], batches: list[dict[str, Any]],
            entry: dict[str, Any], staging: str, name: str) -> None:
    """Move the batch in under hidden names, replace the manifest (commit), then unhide."""
    moves: list[tuple[str, str]] = []
    entry["files"] = {}
    for split in SPLITS:
        entry["files"][split] = []
        for path in out.list_parquet(f"{staging}/{split}"):
            relative = path[len(out.qualify(staging)) + 1:]
            folder, file_name = relative.rsplit("/", 1)
            entry["files"][split].append(f"{folder}/{name}-{file_name}")
            moves.append((path, f"{out.root}/{folder}/.{name}-{file_name}"))
    for path in out.list_parquet(f"{staging}/{QUARANTINE_DIR}"):
        moves.append((path, f"{out.root}/{QUARANTINE_DIR}/.{name}-{path.rsplit('/', 1)[1]}"))
    out.mkdirs(f"{out.root}/{STATE_DIR}")
    out.rename(f"{staging}/{STATE_DIR}", f"{out.root}/{STATE_DIR}/{name}")
    for source, target in moves:
        out.mkdirs(target.rsplit("/", 1)[0])
        out.rename(source, target)
    previous_state = manifest.get("state")
    _merge_counts(manifest, entry)
    manifest.update(batches=[*batches, entry], newest_batch=entry["index"],
                    state=f"{STATE_DIR}/{name}",
                    watermark_ms=max(manifest["watermark_ms"] or 0, entry["watermark_ms"]),
                    updated_at=entry["created_at"])
    out.replace_text(f"{out.root}/{MANIFEST_NAME}", manifest_json(manifest))
    _unhide(out, manifest)
    if previous_state:
        out.delete(f"{out.root}/{previous_state}")
    out.delete(staging)


def _merge_counts(manifest: dict[str, Any], entry: dict[str, Any]) -> None:
    """Dataset totals (what ``sirenfeed features`` summarises) include every batch."""
    for key in ("input_events", "valid_events", "events", "duplicates", "quarantined"):
        manifest[key] = (manifest.get(key) or 0) + (entry.get(key) or 0)
    reasons = manifest.setdefault("quarantined_by_reason", {})
    for reason, count in entry["quarantined_by_reason"].items():
        reasons[reason] = reasons.get(reason, 0) + count
    for split in SPLITS:
        total, part = manifest["splits"][split], entry["splits"][split]
        for key in ("rows", "events", "tokens", "label_tokens"):
            total[key] = total.get(key, 0) + part[key]
        for label, count in part["positives"].items():
            total["positives"][label] = total["positives"].get(label, 0) + count


def _unhide(out: DatasetFiles, manifest: dict[str, Any]) -> None:
    """Give the committed batches' hidden files their visible names."""
    committed = {entry["name"] for entry in manifest.get("batches", [])}
    for folder in (f"{out.root}/{split}" for split in (*SPLITS, QUARANTINE_DIR)):
        for path in out.list_parquet(folder, hidden=True):
            directory, file_name = path.rsplit("/", 1)
            if file_name.startswith(".") and file_name[1:8] in committed:
                out.rename(path, f"{directory}/{file_name[1:]}")


def _recover(out: DatasetFiles, manifest: dict[str, Any]) -> None:
    """Finish a crashed run's commit or undo what it left before committing."""
    _unhide(out, manifest)
    committed = {entry["name"] for entry in manifest.get("batches", [])}
    for folder in (f"{out.root}/{split}" for split in (*SPLITS, QUARANTINE_DIR)):
        for path in out.list_parquet(folder, hidden=True):
            file_name = path.rsplit("/", 1)[1]
            if file_name.startswith(".") and BATCH_NAME.fullmatch(file_name[1:8]) and \
                    file_name[1:8] not in committed:
                logger.warning("removing %s, left by a run that crashed before committing", path)
                out.delete(path)
    referenced = manifest.get("state")
    for path in out.children(f"{out.root}/{STATE_DIR}"):
        if referenced is None or not path.endswith("/" + referenced):
            out.delete(path)
    for path in out.children(out.root):
        if path.rsplit("/", 1)[1].startswith(STAGING_PREFIX):
            out.delete(path)
