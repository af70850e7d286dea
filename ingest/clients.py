"""Kafka clients built from :class:`ingest.config.IngestConfig`, in one place, behind one interface.

``kafka.client`` picks the library of the producer and the consumer: ``kafka-python`` (pure
Python) or ``confluent-kafka`` (librdkafka, an optional dependency; several times faster per
message, docs/ingest.md). The admin client (topic ids, topic checks) is kafka-python's either way.
Every client gets the same bootstrap address (the configured cluster, or the embedded broker's
state file) and the same security options (``kafka.security``, in kafka-python's names, translated
for librdkafka), so a real cluster needs one config change only.

The interface is what the ingest needs and no more: :class:`Producer` (send, flush, close) and
:class:`Consumer` (subscribe with a :class:`RebalanceListener`, poll into :class:`PartitionRecords`
columns, seek, commit, close). Partitions are plain numbers of the one subscribed topic.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from common.config import require
from ingest.broker import read_state
from ingest.config import CONFLUENT_KAFKA, KAFKA_PYTHON, IngestConfig

log = logging.getLogger(__name__)

# kafka-python security option → librdkafka property; options absent here have no librdkafka form.
_LIBRDKAFKA_SECURITY = {
    "security_protocol": "security.protocol", "ssl_cafile": "ssl.ca.location",
    "ssl_certfile": "ssl.certificate.location", "ssl_keyfile": "ssl.key.location",
    "ssl_password": "ssl.key.password", "ssl_crlfile": "ssl.crl.location",
    "ssl_ciphers": "ssl.cipher.suites", "sasl_mechanism": "sasl.mechanism",
    "sasl_plain_username": "sasl.username", "sasl_plain_password": "sasl.password",
    "sasl_kerberos_service_name": "sasl.kerberos.service.name",
}
_PARTITION_CACHE_SIZE = 1 << 20
"""Keys whose partition a kafka-python producer remembers (about 100 MB at most)."""


class ClientError(RuntimeError):
    """A client call failed (a commit, a delivery, a flush that timed out)."""


def bootstrap_servers(config: IngestConfig) -> str:
    if config.kafka.bootstrap_servers:
        return config.kafka.bootstrap_servers
    return read_state(config.broker.run_dir)["address"]


def common_options(config: IngestConfig) -> dict[str, Any]:
    """kafka-python options every client shares."""
    return {"bootstrap_servers": bootstrap_servers(config),
            "request_timeout_ms": config.kafka.request_timeout_ms,
            **config.kafka.security}


def librdkafka_options(config: IngestConfig) -> dict[str, Any]:
    """librdkafka properties every confluent-kafka client shares."""
    options: dict[str, Any] = {"bootstrap.servers": bootstrap_servers(config),
                               "socket.timeout.ms": config.kafka.request_timeout_ms,
                               # Its log lines go through Python logging, not straight to stderr.
                               "logger": logging.getLogger("ingest.librdkafka")}
    for key, value in config.kafka.security.items():
        if key == "ssl_check_hostname":  # a bool in kafka-python, an algorithm's name in librdkafka
            options["ssl.endpoint.identification.algorithm"] = "https" if value else "none"
            continue
        require(key in _LIBRDKAFKA_SECURITY, f"kafka.security.{key}",
                f"has no librdkafka equivalent; use kafka.client={KAFKA_PYTHON} for it")
        options[_LIBRDKAFKA_SECURITY[key]] = value
    return options


# -- producing -------------------------------------------------------------------------------------

class Producer(abc.ABC):
    """Sends messages asynchronously; :meth:`flush` waits for them and reports what failed."""

    @abc.abstractmethod
    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None: ...

    @abc.abstractmethod
    def flush(self, timeout_s: float | None = None) -> list[BaseException]:
        """Wait until every message sent so far is acknowledged or failed; returns the failures since
        the last flush. Raises :class:`ClientError` when ``timeout_s`` passes first."""

    @abc.abstractmethod
    def close(self) -> None: ...


def make_producer(config: IngestConfig, idempotent: bool = True) -> Producer:
    """A producer of ``kafka.client``. Idempotent (no reordering or duplicates on retries) unless
    told otherwise."""
    if config.kafka.client == CONFLUENT_KAFKA:
        return _ConfluentProducer(config, idempotent)
    return _KafkaPythonProducer(config, idempotent)


class _KafkaPythonProducer(Producer):
    def __init__(self, config: IngestConfig, idempotent: bool) -> None:
        from kafka import KafkaProducer

        options = {"linger_ms": config.producer.linger_ms, "batch_size": config.producer.batch_size,
                   "compression_type": None if config.producer.compression_type == "none"
                   else config.producer.compression_type,
                   "acks": "all" if config.producer.acks == "all" else int(config.producer.acks),
                   "allow_auto_create_topics": False, "enable_idempotence": idempotent}
        self._producer = KafkaProducer(**{**common_options(config), **options})
        self._failures: list[BaseException] = []
        self._partitions: dict[str, tuple[int, dict[bytes, int]]] = {}

    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        partition = None if key is None else self._partition(topic, key)
        future = self._producer.send(topic, value=value, key=key, headers=headers, partition=partition)
        future.add_errback(self._failures.append)

    def _partition(self, topic: str, key: bytes) -> int:
        """kafka-python's default partition of ``key`` (the Java client's murmur2), remembered: its
        pure-Python hash was a tenth of the time of a send, and a user sends many events. A new key
        rereads the partition count, so the cache is dropped when partitions are added."""
        from kafka.partitioner.default import murmur2

        count, known = self._partitions.get(topic, (0, {}))
        partition = known.get(key)
        if partition is not None:
            return partition
        partitions = sorted(self._producer.partitions_for(topic))
        if len(partitions) != count or len(known) >= _PARTITION_CACHE_SIZE:
            known = {}
            self._partitions[topic] = (len(partitions), known)
        partition = known[key] = partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)]
        return partition

    def flush(self, timeout_s: float | None = None) -> list[BaseException]:
        from kafka.errors import KafkaTimeoutError

        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaTimeoutError as error:
            raise ClientError(f"messages not acknowledged within {timeout_s}s: {error}") from error
        failures, self._failures = self._failures, []
        return failures

    def close(self) -> None:
        self._producer.close()


class _ConfluentProducer(Producer):
    def __init__(self, config: IngestConfig, idempotent: bool) -> None:
        from confluent_kafka import Producer as RdProducer

        options = {**librdkafka_options(config),
                   "linger.ms": config.producer.linger_ms, "batch.size": config.producer.batch_size,
                   "compression.type": config.producer.compression_type,
                   "acks": "all" if config.producer.acks == "all" else int(config.producer.acks),
                   "enable.idempotence": idempotent,
                   # kafka-python's and the Java client's partitioner: a user's events go to the same
                   # partition whichever client sent them (librdkafka's own default is CRC32).
                   "partitioner": "murmur2_random",
                   "request.timeout.ms": config.kafka.request_timeout_ms}
        self._producer = RdProducer(options)
        self._failures: list[BaseException] = []

    def _delivered(self, error, _message) -> None:
        if error is not None:
            self._failures.append(ClientError(str(error)))

    def send(self, topic: str, value: bytes | None, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key, headers=headers, on_delivery=self._delivered)
                break
            except BufferError:  # the local queue is full: wait for the broker to take some
                self._producer.poll(0.05)
        self._producer.poll(0)  # serves delivery callbacks; does not wait

    def flush(self, timeout_s: float | None = None) -> list[BaseException]:
        left = self._producer.flush(-1 if timeout_s is None else timeout_s)
        if left:
            raise ClientError(f"{left} messages not acknowledged within {timeout_s}s")
        failures, self._failures = self._failures, []
        return failures

    def close(self) -> None:
        self._producer.flush()


# -- consuming -------------------------------------------------------------------------------------

@dataclass
class PartitionRecords:
    """The messages of one partition that one poll returned, in offset order: the offsets and values
    as lists; key and timestamp read on demand (:meth:`origin`), as only dead letters need them."""

    partition: int
    origin_of: Callable[[Any], tuple[bytes | None, int | None]]
    offsets: list[int] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    """A null value (a tombstone) as ``b""``."""
    messages: list[Any] = field(default_factory=list)
    """The client's own message objects."""

    def origin(self, index: int) -> tuple[bytes | None, int | None]:
        """Key and Kafka timestamp (epoch ms, ``None`` if the message has none) of message ``index``."""
        return self.origin_of(self.messages[index])


@dataclass
class Polled:
    records: list[PartitionRecords]
    out_of_range: dict[int, int | None]
    """Partitions whose position the broker no longer has (→ that position), to handle after
    ``records``, which are never lost to such an error."""


class RebalanceListener(Protocol):
    """Called from inside :meth:`Consumer.poll`, on the polling thread's behalf."""

    def on_assigned(self, partitions: list[int]) -> None: ...

    def on_revoked(self, partitions: list[int]) -> None: ...

    def on_lost(self, partitions: list[int]) -> None: ...


class Consumer(abc.ABC):
    """A group member on one topic. It never commits on its own and never resets a position it
    cannot fetch: it reports it (:attr:`Polled.out_of_range`)."""

    def __init__(self, topic: str) -> None:
        self.topic = topic

    @abc.abstractmethod
    def subscribe(self, listener: RebalanceListener) -> None: ...

    @abc.abstractmethod
    def poll(self, timeout_ms: int) -> Polled: ...

    @abc.abstractmethod
    def seek(self, partition: int, offset: int | None) -> None:
        """Fetch ``partition`` from ``offset`` next; ``None`` = the log start."""

    @abc.abstractmethod
    def commit(self, partition: int, offset: int, metadata: str) -> None:
        """Commit ``offset`` (the next to read) with ``metadata``; raises :class:`ClientError`."""

    @abc.abstractmethod
    def assignment(self) -> list[int]: ...

    @abc.abstractmethod
    def end_offsets(self, partitions: list[int]) -> dict[int, int]: ...

    @abc.abstractmethod
    def close(self) -> None: ...


def make_consumer(config: IngestConfig) -> Consumer:
    if config.kafka.client == CONFLUENT_KAFKA:
        return _ConfluentConsumer(config)
    return _KafkaPythonConsumer(config)


class _KafkaPythonConsumer(Consumer):
    def __init__(self, config: IngestConfig) -> None:
        from kafka import KafkaConsumer

        super().__init__(config.kafka.topic)
        options = {"group_id": config.kafka.group_id, "enable_auto_commit": False,
                   # The landing zone, not the group's committed offsets, says where to resume: every
                   # assigned partition is seeked explicitly, and a fetch out of range must surface.
                   "auto_offset_reset": "none",
                   "session_timeout_ms": config.kafka.session_timeout_ms,
                   "heartbeat_interval_ms": config.kafka.heartbeat_interval_ms,
                   "max_poll_records": config.consumer.max_poll_records,
                   "allow_auto_create_topics": False}
        self._consumer = KafkaConsumer(**{**common_options(config), **options})

    def _partition(self, partition: int):
        from kafka import TopicPartition

        return TopicPartition(self.topic, partition)

    def subscribe(self, listener: RebalanceListener) -> None:
        from kafka import ConsumerRebalanceListener

        class Adapter(ConsumerRebalanceListener):
            """kafka-python calls these on its IO thread while the caller waits inside ``poll()``."""

            def on_partitions_revoked(self, revoked):
                listener.on_revoked(sorted(tp.partition for tp in revoked))

            def on_partitions_lost(self, lost):
                listener.on_lost(sorted(tp.partition for tp in lost))

            def on_partitions_assigned(self, assigned):
                listener.on_assigned(sorted(tp.partition for tp in assigned))

        self._consumer.subscribe([self.topic], listener=Adapter())

    def poll(self, timeout_ms: int) -> Polled:
        from kafka.errors import OffsetOutOfRangeError

        try:
            fetched = self._consumer.poll(timeout_ms=timeout_ms)
        except OffsetOutOfRangeError as error:
            # Raised before any record is handed out; those of other partitions stay buffered.
            return Polled([], {tp.partition: offset for tp, offset in error.args[0].items()})
        polled = []
        for topic_partition, messages in fetched.items():
            polled.append(PartitionRecords(
                topic_partition.partition, _kafka_python_origin, [m.offset for m in messages],
                [b"" if m.value is None else m.value for m in messages], messages))
        return Polled(polled, {})

    def seek(self, partition: int, offset: int | None) -> None:
        if offset is None:
            self._consumer.seek_to_beginning(self._partition(partition))
        else:
            self._consumer.seek(self._partition(partition), offset)

    def commit(self, partition: int, offset: int, metadata: str) -> None:
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        try:
            self._consumer.commit({self._partition(partition): OffsetAndMetadata(offset, metadata, -1)})
        except KafkaError as error:
            raise ClientError(str(error)) from error

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        ends = self._consumer.end_offsets([self._partition(p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class _ConfluentConsumer(Consumer):
    def __init__(self, config: IngestConfig) -> None:
        from confluent_kafka import Consumer as RdConsumer

        super().__init__(config.kafka.topic)
        options = {**librdkafka_options(config), "group.id": config.kafka.group_id,
                   "enable.auto.commit": False,
                   # As kafka-python's "none": a position the broker lacks is reported, not reset.
                   "auto.offset.reset": "error",
                   "session.timeout.ms": config.kafka.session_timeout_ms,
                   "heartbeat.interval.ms": config.kafka.heartbeat_interval_ms,
                   "enable.partition.eof": False, "allow.auto.create.topics": False}
        self._consumer = RdConsumer(options)
        self._max_records = config.consumer.max_poll_records
        self._timeout_s = config.kafka.request_timeout_ms / 1000
        self._assigning: dict[int, int | None] | None = None
        """Seeks asked for inside an assignment callback, applied by the assign() that ends it."""

    def _partition(self, partition: int, offset: int | None = None):
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        if offset is None:
            return TopicPartition(self.topic, partition, OFFSET_BEGINNING)
        return TopicPartition(self.topic, partition, offset)

    def subscribe(self, listener: RebalanceListener) -> None:
        def assigned(consumer, partitions) -> None:
            # librdkafka fetches an assigned partition only from where assign() says: the seeks the
            # listener makes are collected and handed to it, none is lost to an unassigned partition.
            self._assigning = {}
            try:
                listener.on_assigned(sorted(tp.partition for tp in partitions))
                starts = self._assigning
            finally:
                self._assigning = None
            consumer.assign([self._partition(tp.partition, starts.get(tp.partition)) for tp in partitions])

        def revoked(consumer, partitions) -> None:
            listener.on_revoked(sorted(tp.partition for tp in partitions))

        def lost(consumer, partitions) -> None:
            listener.on_lost(sorted(tp.partition for tp in partitions))

        self._consumer.subscribe([self.topic], on_assign=assigned, on_revoke=revoked, on_lost=lost)

    def poll(self, timeout_ms: int) -> Polled:
        from confluent_kafka import KafkaError, KafkaException

        by_partition: dict[int, PartitionRecords] = {}
        out_of_range: dict[int, int | None] = {}
        # Wait for one message only, then take what is queued: consume(n, timeout) would wait out the
        # whole timeout for n messages whenever fewer are fetched.
        first = self._consumer.poll(timeout_ms / 1000)
        messages = [] if first is None else [first]
        if first is not None and self._max_records > 1:
            messages += self._consumer.consume(self._max_records - 1, 0)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._AUTO_OFFSET_RESET:
                    out_of_range[message.partition()] = message.offset()
                elif error.fatal():
                    raise KafkaException(error)
                else:  # transient (a broker went away, a request timed out): librdkafka retries
                    log.warning("consumer: %s", error)
                continue
            partition = message.partition()
            records = by_partition.get(partition)
            if records is None:
                records = by_partition[partition] = PartitionRecords(partition, _confluent_origin)
            records.offsets.append(message.offset())
            value = message.value()
            records.values.append(b"" if value is None else value)
            records.messages.append(message)
        return Polled(list(by_partition.values()), out_of_range)

    def seek(self, partition: int, offset: int | None) -> None:
        if self._assigning is not None:
            self._assigning[partition] = offset
        else:
            self._consumer.seek(self._partition(partition, offset))

    def commit(self, partition: int, offset: int, metadata: str) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        try:
            self._consumer.commit(offsets=[TopicPartition(self.topic, partition, offset, metadata=metadata)],
                                  asynchronous=False)
        except KafkaException as error:
            raise ClientError(str(error)) from error

    def assignment(self) -> list[int]:
        return sorted(tp.partition for tp in self._consumer.assignment())

    def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        return {p: self._consumer.get_watermark_offsets(self._partition(p, 0), timeout=self._timeout_s)[1]
                for p in partitions}

    def close(self) -> None:
        self._consumer.close()


def _kafka_python_origin(message) -> tuple[bytes | None, int | None]:
    return message.key, message.timestamp


def _confluent_origin(message) -> tuple[bytes | None, int | None]:
    from confluent_kafka import TIMESTAMP_NOT_AVAILABLE

    kind, timestamp = message.timestamp()
    return message.key(), None if kind == TIMESTAMP_NOT_AVAILABLE else timestamp


def make_admin(config: IngestConfig):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**common_options(config))
