"""``IngestConfig``: the typed configuration of every ingest command (broker, produce, ingest).

Loaded through :func:`common.config.load_config`, so unknown keys fail and range errors name their
key. ``conf/ingest.yaml`` is generated from these defaults (``sirenfeed conf``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Optional

from common.config import require
from features.schema import (
    DEFAULT_SCHEMA, ContractConfig, EventSchema, load_schema, schema_path, shipped_schemas,
)

# kafka-python client options a real cluster needs for authentication and encryption; nothing else
# may be passed through, so a typo fails here instead of deep inside the client.
SECURITY_OPTIONS: frozenset[str] = frozenset({
    "security_protocol", "ssl_context", "ssl_check_hostname", "ssl_cafile", "ssl_certfile",
    "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_ciphers", "sasl_mechanism",
    "sasl_plain_username", "sasl_plain_password", "sasl_kerberos_name",
    "sasl_kerberos_service_name", "sasl_kerberos_domain_name", "sasl_oauth_token_provider",
})
COMPRESSION_TYPES = ("none", "gzip", "snappy", "lz4", "zstd")
KAFKA_PYTHON, CONFLUENT_KAFKA = "kafka-python", "confluent-kafka"
CLIENTS = (KAFKA_PYTHON, CONFLUENT_KAFKA)
ACKS = ("0", "1", "all")


@dataclass
class KafkaConfig:
    bootstrap_servers: str = ""
    """``host:port[,host:port]``; empty means the embedded broker, found through its state file
    ``<broker.run_dir>/broker.json``."""
    topic: str = "feed-events"
    dead_letter_topic: str = "feed-events-dead-letter"
    group_id: str = "sirenfeed-ingest"
    partitions: int = 4
    """Partition count the embedded broker creates its topics with."""
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 500
    request_timeout_ms: int = 30000
    client: str = CONFLUENT_KAFKA
    """Client library of the producer and the consumer: confluent-kafka (librdkafka) | kafka-python
    (pure Python, slower per message: docs/ingest.md). The admin client is kafka-python's."""
    security: dict[str, Any] = field(default_factory=dict)
    """kafka-python security options, passed to every client (translated into librdkafka's names for
    confluent-kafka, see ingest/clients.py). A real cluster, e.g.:

        security: {security_protocol: SASL_SSL, sasl_mechanism: SCRAM-SHA-512,
                   sasl_plain_username: ingest, sasl_plain_password: '...',
                   ssl_cafile: /etc/kafka/ca.pem}
    """

    def __post_init__(self) -> None:
        require(bool(self.topic), "kafka.topic", "must not be empty")
        require(bool(self.dead_letter_topic), "kafka.dead_letter_topic", "must not be empty")
        require(self.dead_letter_topic != self.topic, "kafka.dead_letter_topic",
                "must differ from kafka.topic")
        require(bool(self.group_id), "kafka.group_id", "must not be empty")
        require(self.partitions >= 1, "kafka.partitions", "must be >= 1")
        require(self.heartbeat_interval_ms > 0, "kafka.heartbeat_interval_ms", "must be > 0")
        require(self.session_timeout_ms > self.heartbeat_interval_ms, "kafka.session_timeout_ms",
                "must be larger than kafka.heartbeat_interval_ms")
        require(self.request_timeout_ms > 0, "kafka.request_timeout_ms", "must be > 0")
        require(self.client in CLIENTS, "kafka.client", f"must be one of {', '.join(CLIENTS)}")
        for key in self.security:
            require(key in SECURITY_OPTIONS, f"kafka.security.{key}",
                    f"not a kafka-python security option (one of {', '.join(sorted(SECURITY_OPTIONS))})")


@dataclass
class ProducerConfig:
    rate: float = 0.0
    """Target events per second; 0 sends as fast as the broker takes them."""
    linger_ms: int = 5
    batch_size: int = 65536
    compression_type: str = "none"
    """none | gzip | snappy | lz4 | zstd."""
    acks: str = "all"
    """0 | 1 | all."""
    from_date: str = ""
    """First ``date=`` directory to replay (``YYYY-MM-DD``, inclusive); empty means the first."""
    to_date: str = ""
    """Last ``date=`` directory to replay (inclusive); empty means the last."""

    def __post_init__(self) -> None:
        require(self.rate >= 0, "producer.rate", "must be >= 0 (0 = as fast as possible)")
        require(self.linger_ms >= 0, "producer.linger_ms", "must be >= 0")
        require(self.batch_size > 0, "producer.batch_size", "must be > 0")
        require(self.compression_type in COMPRESSION_TYPES, "producer.compression_type",
                f"must be one of {', '.join(COMPRESSION_TYPES)}")
        require(str(self.acks) in ACKS, "producer.acks", f"must be one of {', '.join(ACKS)}")
        for key in ("from_date", "to_date"):
            value = getattr(self, key)
            require(not value or _is_iso_date(value), f"producer.{key}", "must be YYYY-MM-DD or empty")
        require(not (self.from_date and self.to_date) or self.from_date <= self.to_date,
                "producer.from_date", "must not be after producer.to_date")


@dataclass
class ConsumerConfig:
    max_events: int = 5000
    """A partition's open batch is published once it holds this many messages ..."""
    max_seconds: float = 2.0
    """... or once its first message is this old."""
    poll_ms: int = 200
    max_poll_records: int = 2000
    until_idle_s: float = 0.0
    """Stop after this long without a message (and flush); 0 runs until SIGTERM/SIGINT."""

    def __post_init__(self) -> None:
        require(self.max_events >= 1, "consumer.max_events", "must be >= 1")
        require(self.max_seconds > 0, "consumer.max_seconds", "must be > 0")
        require(self.poll_ms > 0, "consumer.poll_ms", "must be > 0")
        require(self.max_poll_records >= 1, "consumer.max_poll_records", "must be >= 1")
        require(self.until_idle_s >= 0, "consumer.until_idle_s", "must be >= 0 (0 = run until stopped)")


@dataclass
class LandingConfig:
    dir: str = "out/landing"
    """Root of the raw landing zone: ``date=YYYY-MM-DD/hour=HH/part-*.parquet``."""
    dead_letter_dir: str = ""
    """Dead-letter Parquet root; empty means ``<dir>/_dead_letter``. Must share ``dir``'s filesystem."""

    def __post_init__(self) -> None:
        require(bool(self.dir), "landing.dir", "must not be empty")


@dataclass
class MetricsConfig:
    port: int = 0
    """Prometheus endpoint port; 0 serves no endpoint."""
    host: str = "127.0.0.1"
    report_lag: Optional[bool] = None
    """Export consumer lag from the broker's end offsets. Null means: on for a real cluster, off for
    the embedded broker, whose end offsets are wrong (docs/ingest.md)."""
    lag_interval_s: float = 10.0

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "metrics.port", "must be in [0, 65535] (0 = off)")
        require(bool(self.host), "metrics.host", "must not be empty")
        require(self.lag_interval_s > 0, "metrics.lag_interval_s", "must be > 0")


@dataclass
class BrokerConfig:
    port: int = 0
    """Port of the embedded broker on 127.0.0.1; 0 picks a free one."""
    run_dir: str = "out/broker"
    """Where ``sirenfeed broker`` writes ``broker.json`` (its address) and ``broker.log``."""
    topics: list[str] = field(default_factory=list)
    """Topics created on every start; empty means ``kafka.topic`` and ``kafka.dead_letter_topic``."""
    startup_timeout_s: float = 15.0

    def __post_init__(self) -> None:
        require(0 <= self.port <= 65535, "broker.port", "must be in [0, 65535] (0 = a free port)")
        require(bool(self.run_dir), "broker.run_dir", "must not be empty")
        require(all(self.topics), "broker.topics", "topic names must not be empty")
        require(self.startup_timeout_s > 0, "broker.startup_timeout_s", "must be > 0")


@dataclass
class IngestConfig:
    """``sirenfeed broker | produce | ingest``."""

    schema: str = DEFAULT_SCHEMA
    """The event schema of the topic's messages, as ``spec.schema``: a shipped schema's name
    (``conf/schemas/NAME.yaml``) or a schema file's path. The producer checks the raw files against
    it and keys messages by its user field; the consumer validates with it and lands its fields."""
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    producer: ProducerConfig = field(default_factory=ProducerConfig)
    consumer: ConsumerConfig = field(default_factory=ConsumerConfig)
    landing: LandingConfig = field(default_factory=LandingConfig)
    contract: ContractConfig = field(default_factory=ContractConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    """The embedded broker (``sirenfeed broker``)."""

    def __post_init__(self) -> None:
        path = schema_path(self.schema)
        require(path.is_file(), "schema", f"no schema file {path} (shipped: {', '.join(shipped_schemas())})")

    @property
    def event_schema(self) -> EventSchema:
        """The loaded schema (read from its file on each access: callers keep it)."""
        return load_schema(self.schema)

    @property
    def uses_embedded_broker(self) -> bool:
        return not self.kafka.bootstrap_servers

    @property
    def report_lag(self) -> bool:
        if self.metrics.report_lag is None:
            return not self.uses_embedded_broker
        return self.metrics.report_lag

    @property
    def broker_topics(self) -> list[str]:
        return list(self.broker.topics) or [self.kafka.topic, self.kafka.dead_letter_topic]


def _is_iso_date(text: str) -> bool:
    try:
        return dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False
