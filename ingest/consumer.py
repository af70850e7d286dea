"""``sirenfeed ingest --out LANDING_DIR [--until-idle SECONDS]``: Kafka → raw Parquet, exactly once.

A member of consumer group ``kafka.group_id`` (run several to split the partitions), through the
client library ``kafka.client`` (:mod:`ingest.clients`). The messages of each poll are validated
together (:class:`features.validation.MessageValidator`, the verdicts of
:func:`~features.validation.check_message`) against the event schema ``schema``; valid events and
dead letters collect in one open batch per partition, published by
:class:`ingest.landing.LandingZone` once it holds ``consumer.max_events`` messages or is
``consumer.max_seconds`` old.

Where to resume is the landing zone's business, not the group's: on every assignment the consumer
seeks each partition to the offset after the last one landed for the topic's current incarnation
(topic id), or to the log start when none has. Offsets are committed to Kafka too, after each batch,
for tooling only. A revoked partition's open batch is published before the partition moves on; a
partition lost to a forced eviction drops it (the new owner reads it again). SIGTERM, SIGINT and
``--until-idle`` publish every open batch before exiting.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from common.config import add_config_arguments, config_from_args
from common.logs import configure_logging
from features.validation import MessageValidator
from ingest.broker import BrokerError
from ingest.clients import (
    ClientError, Consumer, PartitionRecords, Producer, bootstrap_servers, make_admin, make_consumer,
    make_producer,
)
from ingest.config import IngestConfig
from ingest.deadletter import DeadLetter, send_dead_letters
from ingest.landing import NO_TOPIC_ID, Batch, LandingError, LandingZone
from ingest.metrics import IngestMetrics

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The consumer cannot start or go on (a missing topic, an unreachable broker)."""


@dataclass
class PartitionState:
    topic_id: str
    next_offset: int | None
    """Messages below it have landed already and are skipped; ``None`` until the first message."""
    batch: Batch | None = None
    opened_at: float = 0.0


@dataclass
class IngestSummary:
    consumed: int = 0
    landed: int = 0
    dead_lettered: dict[str, int] = field(default_factory=dict)
    files: int = 0
    batches: int = 0
    dropped_batches: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "landed": self.landed,
                "dead_lettered": dict(sorted(self.dead_lettered.items())), "files": self.files,
                "batches": self.batches, "dropped_batches": self.dropped_batches}


class Ingestor:
    """One consumer-group member that lands its partitions into a :class:`LandingZone`."""

    def __init__(self, config: IngestConfig, stop: threading.Event | None = None) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.topic = config.kafka.topic
        self.schema = config.event_schema
        self.validator = MessageValidator(self.schema, config.contract)
        self.zone = LandingZone(config.landing.dir, self.topic, config.landing.dead_letter_dir or None,
                                schema=self.schema)
        self.metrics = IngestMetrics()
        self.summary = IngestSummary()
        self.partitions: dict[int, PartitionState] = {}
        self.last_activity: float | None = None
        """Time of the last message or assignment; ``None`` (idle clock stopped) until the group has
        assigned partitions, since joining or rebalancing can take seconds."""
        self._consumer: Consumer | None = None
        self._admin = None
        self._dead_letter_producer: Producer | None = None

    def run(self) -> IngestSummary:
        """Consume until stopped (or idle for ``consumer.until_idle_s``), then publish what is open."""
        with contextlib.ExitStack() as clients:
            self._admin = make_admin(self.config)
            clients.callback(self._admin.close)
            self._require_topic()
            # Not idempotent: its producer id would not survive a memory broker's restart (sends then
            # fail for good), and the dead-letter topic is at least once anyway (docs/ingest.md).
            self._dead_letter_producer = make_producer(self.config, idempotent=False)
            clients.callback(self._dead_letter_producer.close)
            self._consumer = make_consumer(self.config)
            clients.callback(self._consumer.close)
            clients.callback(self._drop_open_batches)  # callbacks run last-in first-out: before close()
            self.metrics.serve(self.config.metrics.host, self.config.metrics.port)
            clients.callback(self.metrics.close)
            log.info("ingesting %s (schema %s) from %s with %s into %s", self.topic, self.schema.name,
                     bootstrap_servers(self.config), self.config.kafka.client, self.zone.root)
            self._consumer.subscribe(_Rebalance(self))
            self._consume()
            for state in list(self.partitions.values()):
                self._publish(state)
        log.info("ingest summary: %s", json.dumps(self.summary.as_dict()))
        return self.summary

    def _consume(self) -> None:
        next_lag_report = time.monotonic()
        with tqdm(desc="ingest", unit="msg", disable=None, mininterval=1.0) as progress:
            while not self.stop.is_set():
                polled = self._consumer.poll(self.config.consumer.poll_ms)
                for records in polled.records:
                    progress.update(self._add(records))
                if polled.out_of_range:
                    self._out_of_range(polled.out_of_range)
                self._publish_due()
                if self.config.report_lag and time.monotonic() >= next_lag_report:
                    self._report_lag()
                    next_lag_report = time.monotonic() + self.config.metrics.lag_interval_s
                if self._idle():
                    log.info("no message for %.1fs: stopping", self.config.consumer.until_idle_s)
                    return

    def _drop_open_batches(self) -> None:
        """After a failure, leave unpublished messages to whoever resumes the partition: publishing
        them from the close() callbacks could fail the same way. (After a clean stop none is open.)"""
        for state in self.partitions.values():
            state.batch = None

    # -- group membership ------------------------------------------------------------------------

    def assign_partitions(self, assigned: list[int]) -> None:
        topic_id = self._topic_id()
        for partition in assigned:
            resume = self.zone.resume_offset(partition, topic_id)
            self._consumer.seek(partition, resume)
            self.partitions[partition] = PartitionState(topic_id, resume)
        self.metrics.assigned_partitions.set(len(self.partitions))
        self.last_activity = time.monotonic()
        log.info("assigned partitions %s (topic id %s)", sorted(assigned), topic_id)

    def release_partitions(self, released: list[int], publish: bool) -> None:
        for partition in released:
            state = self.partitions.pop(partition, None)
            if state is not None and publish:
                # No commit: kafka-python runs this on its IO thread, which the commit would wait for.
                self._publish(state, commit=False)
        self.metrics.assigned_partitions.set(len(self.partitions))
        self.last_activity = None  # a rebalance is under way: not idle, waiting for the group
        if released:
            log.info("%s partitions %s", "revoked" if publish else "lost", sorted(released))

    def _topic_id(self) -> str:
        """The topic's current incarnation, asked of the broker; waits (up to the request timeout) for
        a topic that is missing for a moment, as while a memory broker restarts."""
        deadline = time.monotonic() + self.config.kafka.request_timeout_ms / 1000
        while True:
            described = self._admin.describe_topics([self.topic])[0]
            if described["error_code"] == 0 and described["partitions"]:
                topic_id = described.get("topic_id")
                return str(topic_id).replace("-", "") if topic_id else NO_TOPIC_ID
            if time.monotonic() > deadline:
                raise IngestError(f"topic {self.topic!r} does not exist on {bootstrap_servers(self.config)} "
                                  "(config key 'kafka.topic')")
            time.sleep(0.2)

    def _require_topic(self) -> None:
        described = self._admin.describe_topics([self.topic])[0]
        if described["error_code"] != 0 or not described["partitions"]:
            raise IngestError(f"topic {self.topic!r} does not exist on {bootstrap_servers(self.config)} "
                              "(config key 'kafka.topic')")

    def _out_of_range(self, positions: dict[int, int | None]) -> None:
        """The broker no longer has the offset a partition is at: the topic was re-created (a memory
        broker restarted) or retention removed messages this consumer had not landed."""
        topic_id = self._topic_id()
        for partition, position in positions.items():
            state = self.partitions.get(partition)
            if state is None:
                continue
            if topic_id != state.topic_id:
                self._restart(partition, topic_id, "topic_recreated")
                continue
            self._publish(state)
            # Offsets below the landed mark are still skipped (PartitionState.next_offset).
            self._consumer.seek(partition, None)
            self.metrics.offset_resets.labels("out_of_range").inc()
            log.warning("partition %d: offset %s is out of range on the broker; restarting from the log "
                        "start (messages removed by retention before they landed are lost)",
                        partition, position)

    def _restart(self, partition: int, topic_id: str, cause: str) -> None:
        """Forget what was read but not landed of ``partition``; resume it from the landing zone."""
        resume = self.zone.resume_offset(partition, topic_id)
        self.partitions[partition] = PartitionState(topic_id, resume)
        self._consumer.seek(partition, resume)
        self.metrics.offset_resets.labels(cause).inc()
        log.warning("partition %d restarts at %s of topic id %s (%s)", partition,
                    "the log start" if resume is None else f"offset {resume}", topic_id, cause)

    # -- batching --------------------------------------------------------------------------------

    def _add(self, records: PartitionRecords) -> int:
        """Validate one poll's messages of a partition together and add them to its open batch,
        publishing each batch that fills up."""
        partition = records.partition
        state = self.partitions.get(partition)
        if state is None:
            return 0
        offsets = records.offsets
        # Offsets ascend within a partition: what has landed already is a prefix.
        index = 0 if state.next_offset is None else bisect.bisect_left(offsets, state.next_offset)
        added = 0
        while index < len(offsets):
            if state.batch is None:
                state.batch = Batch(self.topic, state.topic_id, partition, offsets[index], offsets[index])
                state.opened_at = time.monotonic()
            batch = state.batch
            room = self.config.consumer.max_events - len(batch.events) - len(batch.dead_letters)
            stop = min(len(offsets), index + room)
            events, rejected = self.validator.check(records.values[index:stop])
            batch.events.extend(events)
            if rejected:
                dead_lettered_at_ms = int(time.time() * 1000)
                for position, reason in rejected:
                    at = index + position
                    key, timestamp = records.origin(at)
                    batch.dead_letters.append(DeadLetter(
                        raw=records.values[at], key=key, topic=self.topic, partition=partition,
                        offset=offsets[at], kafka_timestamp_ms=timestamp, reason=reason,
                        dead_lettered_at_ms=dead_lettered_at_ms))
            batch.end_offset = offsets[stop - 1]
            state.next_offset = offsets[stop - 1] + 1
            added += stop - index
            index = stop
            if len(batch.events) + len(batch.dead_letters) >= self.config.consumer.max_events:
                self._publish(state)
                if self.partitions.get(partition) is not state:
                    break  # restarted: the rest of these messages will be fetched again
        current = self.partitions.get(partition)
        if current is not None and current.next_offset is not None:
            self.metrics.consumed_offset.labels(str(partition)).set(current.next_offset)
        if added:
            self.metrics.consumed.inc(added)
            self.summary.consumed += added
            self.last_activity = time.monotonic()
        return added

    def _publish_due(self) -> None:
        now = time.monotonic()
        for state in list(self.partitions.values()):
            if state.batch is not None and now - state.opened_at >= self.config.consumer.max_seconds:
                self._publish(state)

    def _publish(self, state: PartitionState, commit: bool = True) -> None:
        batch, state.batch = state.batch, None
        if batch is None:
            return
        started = time.perf_counter()
        owned = self.partitions.get(batch.partition) is state
        topic_id = self._topic_id()
        if topic_id != batch.topic_id:
            # The log these messages were read from is gone (a memory broker restarted, or the topic
            # was deleted and created again), and the last of them may even come from the new log,
            # read at the old positions: none of them can be attributed safely.
            log.warning("dropping batch %s: topic %s now has id %s", batch.batch_id, self.topic, topic_id)
            self._count_dropped("topic_recreated")
            if owned:
                self._restart(batch.partition, topic_id, "topic_recreated")
            return
        if batch.dead_letters:
            send_dead_letters(self._dead_letter_producer, self.config.kafka.dead_letter_topic,
                              batch.dead_letters, timeout_s=self.config.kafka.request_timeout_ms / 1000)
        published = self.zone.publish(batch)
        if published is None:
            self._count_dropped("overlap")
            if owned:
                self._restart(batch.partition, batch.topic_id, "overlap")
            return
        self.metrics.flush_seconds.observe(time.perf_counter() - started)
        self.metrics.batches.labels("published").inc()
        self.metrics.landed.inc(published.events)
        self.metrics.record_landed(published.max_event_ts_ms)
        for entry in published.manifest["files"]:
            self.metrics.files.labels("events" if entry["root"] == "landing" else "dead_letters").inc()
        for reason, count in published.manifest["dead_letter_reasons"].items():
            self.metrics.dead_lettered.labels(reason).inc(count)
            self.summary.dead_lettered[reason] = self.summary.dead_lettered.get(reason, 0) + count
        self.summary.landed += published.events
        self.summary.files += len(published.files)
        self.summary.batches += 1
        if commit:
            self._commit(batch)

    def _count_dropped(self, cause: str) -> None:
        self.summary.dropped_batches += 1
        self.metrics.batches.labels(f"dropped_{cause}").inc()

    def _commit(self, batch: Batch) -> None:
        try:
            self._consumer.commit(batch.partition, batch.end_offset + 1, batch.batch_id)
        except ClientError as error:
            # Advisory only: the landing zone, not this commit, decides where consumption resumes.
            log.warning("could not commit offset %d of partition %d to Kafka: %s",
                        batch.end_offset + 1, batch.partition, error)

    def _report_lag(self) -> None:
        assigned = self._consumer.assignment()
        if not assigned:
            return
        ends = self._consumer.end_offsets(assigned)
        for partition in assigned:
            state = self.partitions.get(partition)
            if state is not None and state.next_offset is not None:
                self.metrics.lag.labels(str(partition)).set(max(0, ends[partition] - state.next_offset))

    def _idle(self) -> bool:
        until_idle = self.config.consumer.until_idle_s
        return (bool(until_idle) and self.last_activity is not None
                and time.monotonic() - self.last_activity >= until_idle)


class _Rebalance:
    """The clients call these from inside ``poll()`` (kafka-python on its IO thread while the main
    thread waits there), so they never run concurrently with the main loop's use of the partition
    states."""

    def __init__(self, ingestor: Ingestor) -> None:
        self.ingestor = ingestor

    def on_revoked(self, partitions: list[int]) -> None:
        self.ingestor.release_partitions(partitions, publish=True)

    def on_lost(self, partitions: list[int]) -> None:
        self.ingestor.release_partitions(partitions, publish=False)

    def on_assigned(self, partitions: list[int]) -> None:
        self.ingestor.assign_partitions(partitions)


def main(argv: list[str]) -> int:
    configure_logging()
    parser = argparse.ArgumentParser(prog="sirenfeed ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", metavar="LANDING_DIR", help="landing zone root (landing.dir)")
    parser.add_argument("--until-idle", type=float, metavar="SECONDS",
                        help="stop after this long without a message (consumer.until_idle_s)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(IngestConfig, args, **{"landing.dir": args.out,
                                                     "consumer.until_idle_s": args.until_idle})
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        summary = Ingestor(config, stop).run()
    except (IngestError, BrokerError, LandingError) as error:
        log.error("%s", error)
        return 2
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
