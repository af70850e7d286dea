"""The raw landing zone and its exactly-once batch publish.

Layout under ``landing.dir``::

    date=YYYY-MM-DD/hour=HH/part-pPPPP-<first>-<last>-<topic id>.parquet  valid events (raw_arrow_schema)
    _dead_letter/date=YYYY-MM-DD/dead-pPPPP-<first>-<last>-<topic id>.parquet  (DEAD_LETTER_SCHEMA)
    _ingest/<topic>/partition=PPPP/
        .lock                         held while a batch of the partition is published or recovered
        staging/<batch id>/           files of a batch being published, then _BATCH.json (last)
        landed/<topic id>/<first>-<last>.json   one manifest per landed batch: the offsets it covers

A *batch* is the messages ``first..last`` (inclusive offsets) of one partition of one topic
incarnation (its topic id: a memory broker that restarts hands out offsets from 0 again under a new
id). Its valid events land as one file per (date, hour) of event time (UTC), its dead letters as one
file, all carrying the offsets in their names and in Parquet key-value metadata. Events are kept as
the event schema names them (:attr:`features.schema.EventSchema.raw_arrow_schema`), so a landing
zone is raw input of the feature job exactly like the synthetic logs.

Publishing is crash-safe and idempotent. Under the partition lock: finish any batch a crashed writer
left (:meth:`LandingZone.recover`), refuse a batch that overlaps what has landed (a former owner of
the partition that lost it without noticing), write every file into the staging directory (fsync),
write the batch manifest atomically (the commit point), rename each file into place, record the
manifest under ``landed/`` and remove the staging directory. Recovery rolls a staged batch with a
manifest forward (targets that exist are skipped) and deletes one without. A consumer resumes a
partition at :meth:`LandingZone.next_offset`: one past the last landed offset of the current topic
incarnation, so a crash anywhere neither loses nor duplicates an event. Directories and files whose
names start with ``_`` or ``.`` are invisible to Spark and to :func:`read_landed`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import operator
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.files import write_json
from features.schema import DEFAULT_SCHEMA, EventSchema, load_schema
from ingest.deadletter import DEAD_LETTER_SCHEMA, DeadLetter, dead_letter_table

log = logging.getLogger(__name__)

INGEST_DIR = "_ingest"
DEAD_LETTER_DIR = "_dead_letter"
BATCH_MANIFEST = "_BATCH.json"
METADATA_KEY = b"sirenfeed.ingest"
NO_TOPIC_ID = "unknown"
"""Stands for the topic id of a broker that does not report one (Kafka < 2.8)."""
MS_PER_HOUR = 3_600_000
FSYNC_THREADS = 8


class LandingError(RuntimeError):
    """The landing zone is unusable (misconfigured, or holds something it cannot have written)."""


@dataclass
class Batch:
    """Messages ``start_offset..end_offset`` (inclusive) of one partition, split by validity."""

    topic: str
    topic_id: str
    partition: int
    start_offset: int
    end_offset: int
    events: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)

    @property
    def batch_id(self) -> str:
        return f"p{self.partition:04d}-{self.start_offset:012d}-{self.end_offset:012d}-{self.topic_id}"

    @property
    def messages(self) -> int:
        return self.end_offset - self.start_offset + 1


@dataclass(frozen=True)
class Published:
    """What one published batch added to the landing zone."""

    manifest: dict[str, Any]
    files: list[Path]

    @property
    def events(self) -> int:
        return self.manifest["events"]

    @property
    def max_event_ts_ms(self) -> int | None:
        return self.manifest["max_event_ts_ms"]


class LandingZone:
    def __init__(self, root: str | os.PathLike[str], topic: str,
                 dead_letter_root: str | os.PathLike[str] | None = None, writer: str = "",
                 schema: EventSchema | str = DEFAULT_SCHEMA) -> None:
        self.root = Path(root)
        self.topic = topic
        self.schema = load_schema(schema)
        self.dead_letter_root = Path(dead_letter_root) if dead_letter_root else self.root / DEAD_LETTER_DIR
        self.writer = writer or f"{os.uname().nodename}:{os.getpid()}"
        self._fsyncs = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="landing-fsync")
        self.root.mkdir(parents=True, exist_ok=True)
        self.dead_letter_root.mkdir(parents=True, exist_ok=True)
        if self.root.stat().st_dev != self.dead_letter_root.stat().st_dev:
            # A batch is published by renames from one staging directory; they cannot cross devices.
            raise LandingError(f"config key 'landing.dead_letter_dir': {self.dead_letter_root} must be "
                               f"on the same filesystem as landing.dir {self.root}")

    # -- where things are ------------------------------------------------------------------------

    def partition_dir(self, partition: int) -> Path:
        return self.root / INGEST_DIR / self.topic / f"partition={partition:04d}"

    def landed_dir(self, partition: int, topic_id: str) -> Path:
        return self.partition_dir(partition) / "landed" / topic_id

    def staging_dir(self, partition: int) -> Path:
        return self.partition_dir(partition) / "staging"

    def _root_of(self, name: str) -> Path:
        return {"landing": self.root, "dead_letter": self.dead_letter_root}[name]

    # -- reading the ledger ----------------------------------------------------------------------

    def next_offset(self, partition: int, topic_id: str) -> int | None:
        """One past the last landed offset of ``partition`` in incarnation ``topic_id``; ``None`` when
        nothing of it has landed. Call :meth:`recover` first (under :meth:`lock`)."""
        landed = self.landed_dir(partition, topic_id)
        if not landed.is_dir():
            return None
        ends = [int(name.name.split("-")[1].removesuffix(".json")) for name in landed.glob("*-*.json")]
        return max(ends) + 1 if ends else None

    def landed_batches(self) -> list[dict[str, Any]]:
        """Every landed batch manifest of this topic, in (partition, topic id, offset) order."""
        base = self.root / INGEST_DIR / self.topic
        return [json.loads(path.read_text()) for path in sorted(base.glob("partition=*/landed/*/*.json"))]

    # -- publishing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, partition: int) -> Iterator[None]:
        """Exclusive per-partition lock (``flock``): one publisher or recoverer at a time."""
        directory = self.partition_dir(partition)
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def resume_offset(self, partition: int, topic_id: str) -> int | None:
        """:meth:`recover` then :meth:`next_offset`, under the lock: where a new owner starts."""
        with self.lock(partition):
            self.recover(partition)
            return self.next_offset(partition, topic_id)

    def publish(self, batch: Batch, now_ms: int | None = None) -> Published | None:
        """Land ``batch`` exactly once; ``None`` when it overlaps landed offsets (it is then dropped:
        another consumer owned the partition meanwhile and has landed those messages)."""
        with self.lock(batch.partition):
            self.recover(batch.partition)
            landed_next = self.next_offset(batch.partition, batch.topic_id)
            if landed_next is not None and batch.start_offset < landed_next:
                log.warning("dropping batch %s: offsets up to %d of partition %d have landed already",
                            batch.batch_id, landed_next - 1, batch.partition)
                return None
            staged = self.stage(batch, now_ms)
            manifest = self.apply(staged)
        files = [self._root_of(entry["root"]) / entry["target"] for entry in manifest["files"]]
        return Published(manifest, files)

    def stage(self, batch: Batch, now_ms: int | None = None) -> Path:
        """Write the batch's files and then its manifest into a fresh staging directory. Until the
        manifest exists the batch is not there; once it does, it is (:meth:`recover` finishes it)."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        staging = self.staging_dir(batch.partition) / batch.batch_id
        if staging.exists():
            shutil.rmtree(staging)  # left by a crash before its manifest: never visible, never landed
        staging.mkdir(parents=True)
        file_metadata = json.dumps({"topic": batch.topic, "topic_id": batch.topic_id,
                                    "partition": batch.partition, "start_offset": batch.start_offset,
                                    "end_offset": batch.end_offset, "batch_id": batch.batch_id})
        entries = []
        unit, time_field = self.schema.time_unit_ms, self.schema.time_field
        event_ts = [event[time_field] * unit for event in batch.events]
        if batch.events:
            table = self._events_table(batch.events)
            hours = [ts // MS_PER_HOUR for ts in event_ts]
            distinct = sorted(set(hours))
            hour_column = pa.array(hours, pa.int64()) if len(distinct) > 1 else None
            for hour in distinct:
                when = datetime.fromtimestamp(hour * 3600, tz=timezone.utc)
                # Filtering keeps arrival order within the hour.
                part = table if hour_column is None else table.filter(pc.equal(hour_column, hour))
                target = f"date={when:%Y-%m-%d}/hour={when:%H}/part-{batch.batch_id}.parquet"
                entries.append(self._stage_file(staging, len(entries), part, "landing", target, file_metadata))
        if batch.dead_letters:
            day = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
            target = f"date={day:%Y-%m-%d}/dead-{batch.batch_id}.parquet"
            entries.append(self._stage_file(staging, len(entries), dead_letter_table(batch.dead_letters),
                                            "dead_letter", target, file_metadata))
        reasons: dict[str, int] = {}
        for letter in batch.dead_letters:
            reasons[letter.reason] = reasons.get(letter.reason, 0) + 1
        manifest = {
            "batch_id": batch.batch_id, "topic": batch.topic, "topic_id": batch.topic_id,
            "partition": batch.partition, "start_offset": batch.start_offset,
            "end_offset": batch.end_offset, "messages": batch.messages, "events": len(batch.events),
            "dead_letters": len(batch.dead_letters), "dead_letter_reasons": reasons,
            "min_event_ts_ms": min(event_ts, default=None), "max_event_ts_ms": max(event_ts, default=None),
            "files": entries, "writer": self.writer, "published_at_ms": now_ms,
        }
        # The staged files and their directory entries, durable before the manifest names them.
        self._fsync_all([staging / entry["staged"] for entry in entries] + [staging])
        write_json(staging / BATCH_MANIFEST, manifest, indent=1)
        _fsync(staging)
        return staging

    def apply(self, staging: Path) -> dict[str, Any]:
        """Move a staged batch's files into place and record it as landed; idempotent."""
        manifest = json.loads((staging / BATCH_MANIFEST).read_text())
        touched: set[Path] = set()
        for entry in manifest["files"]:
            source = staging / entry["staged"]
            target = self._root_of(entry["root"]) / entry["target"]
            if target.exists():
                source.unlink(missing_ok=True)
                continue
            if not source.exists():
                raise LandingError(f"staged batch {staging} lost {entry['staged']} before it reached "
                                   f"{target}; the landing zone was modified by something else")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
            touched.add(target.parent)
        # Each renamed file's directory, and its parent (which may have gained that directory).
        self._fsync_all(sorted(touched | {directory.parent for directory in touched}))
        landed = self.landed_dir(manifest["partition"], manifest["topic_id"])
        name = f"{manifest['start_offset']:012d}-{manifest['end_offset']:012d}.json"
        write_json(landed / name, manifest, indent=1)
        _fsync(landed)
        shutil.rmtree(staging)
        return manifest

    def recover(self, partition: int) -> int:
        """Finish or discard whatever a crashed publisher left in ``partition``'s staging directory;
        returns how many batches were rolled forward. Call under :meth:`lock`."""
        # Temporary files of an atomic write a crash interrupted; never read, removed for tidiness.
        for leftover in self.partition_dir(partition).glob("landed/*/.*.json.*"):
            leftover.unlink()
        staging_root = self.staging_dir(partition)
        if not staging_root.is_dir():
            return 0
        rolled = 0
        for staged in sorted(staging_root.iterdir()):
            if (staged / BATCH_MANIFEST).is_file():
                self.apply(staged)
                rolled += 1
                log.info("recovered batch %s of partition %d (rolled forward)", staged.name, partition)
            else:
                shutil.rmtree(staged)
                log.info("discarded incomplete staged batch %s of partition %d", staged.name, partition)
        return rolled

    def _events_table(self, events: list[dict[str, Any]]) -> pa.Table:
        """Valid events as a table of the raw Arrow schema, built one column at a time (measured a
        little faster than ``Table.from_pylist`` on pyarrow 14: docs/ingest.md)."""
        schema = self.schema.raw_arrow_schema
        columns = [pa.array(list(map(operator.itemgetter(name), events)), type=schema.field(name).type)
                   for name in schema.names]
        return pa.Table.from_arrays(columns, schema=schema)

    def _fsync_all(self, paths: list[Path]) -> None:
        """fsync every path, all at once, and return when all are durable. The journal commits
        concurrent fsyncs together: eight cost about what one does, where one after the other they
        were a quarter of a consumer's time."""
        list(self._fsyncs.map(_fsync, paths))

    def _stage_file(self, staging: Path, index: int, table: pa.Table, root: str, target: str,
                    file_metadata: str) -> dict[str, Any]:
        name = f"{index:04d}.parquet"
        metadata = {**(table.schema.metadata or {}), METADATA_KEY: file_metadata.encode()}
        pq.write_table(table.replace_schema_metadata(metadata), staging / name)  # fsynced by stage()
        return {"staged": name, "root": root, "target": target, "rows": table.num_rows}


def read_landed(root: str | os.PathLike[str], columns: list[str] | None = None,
                schema: EventSchema | str = DEFAULT_SCHEMA) -> pa.Table:
    """Every landed event under ``root`` (``date=*/hour=*/*.parquet``) of the event schema
    ``schema``, without partition columns."""
    arrow_schema = load_schema(schema).raw_arrow_schema
    paths = sorted(Path(root).glob("date=*/hour=*/*.parquet"))
    tables = [pq.read_table(path, columns=columns, schema=arrow_schema) for path in paths]
    if not tables:
        return arrow_schema.empty_table().select(columns or arrow_schema.names)
    return pa.concat_tables(tables)


def read_dead_letters(root: str | os.PathLike[str]) -> pa.Table:
    """Every dead letter under a dead-letter root (``date=*/*.parquet``)."""
    paths = sorted(Path(root).glob("date=*/*.parquet"))
    tables = [pq.read_table(path, schema=DEAD_LETTER_SCHEMA) for path in paths]
    return pa.concat_tables(tables) if tables else DEAD_LETTER_SCHEMA.empty_table()


def _fsync(path: Path) -> None:
    """fsync a file or a directory."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
