"""kafka-python clients built from :class:`ingest.config.IngestConfig`, in one place.

Every client gets the same bootstrap address (the configured cluster, or the embedded broker's state
file) and the same pass-through security options, so a real cluster needs one config change only.
"""

from __future__ import annotations

from typing import Any

from ingest.broker import read_state
from ingest.config import IngestConfig


def bootstrap_servers(config: IngestConfig) -> str:
    if config.kafka.bootstrap_servers:
        return config.kafka.bootstrap_servers
    return read_state(config.broker.run_dir)["address"]


def common_options(config: IngestConfig) -> dict[str, Any]:
    return {"bootstrap_servers": bootstrap_servers(config),
            "request_timeout_ms": config.kafka.request_timeout_ms,
            **config.kafka.security}


def make_producer(config: IngestConfig, **overrides: Any):
    from kafka import KafkaProducer

    options = {"linger_ms": config.producer.linger_ms, "batch_size": config.producer.batch_size,
               "compression_type": None if config.producer.compression_type == "none"
               else config.producer.compression_type,
               "acks": "all" if config.producer.acks == "all" else int(config.producer.acks),
               "allow_auto_create_topics": False}
    return KafkaProducer(**{**common_options(config), **options, **overrides})


def make_consumer(config: IngestConfig, **overrides: Any):
    from kafka import KafkaConsumer

    options = {"group_id": config.kafka.group_id, "enable_auto_commit": False,
               # The landing zone, not the group's committed offsets, says where to resume: every
               # assigned partition is seeked explicitly, and a fetch out of range must surface.
               "auto_offset_reset": "none",
               "session_timeout_ms": config.kafka.session_timeout_ms,
               "heartbeat_interval_ms": config.kafka.heartbeat_interval_ms,
               "max_poll_records": config.consumer.max_poll_records,
               "allow_auto_create_topics": False}
    return KafkaConsumer(**{**common_options(config), **options, **overrides})


def make_admin(config: IngestConfig):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(**common_options(config))
