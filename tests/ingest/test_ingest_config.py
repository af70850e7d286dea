"""``IngestConfig``: conf/ingest.yaml mirrors the defaults; bad values fail naming their key."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config, to_dict
from common.repo import REPO_ROOT
from ingest.config import IngestConfig


def test_the_yaml_file_mirrors_the_defaults():
    from_file = load_config(IngestConfig, REPO_ROOT / "conf" / "ingest.yaml")
    assert to_dict(from_file) == to_dict(load_config(IngestConfig))


@pytest.mark.parametrize("override, key", [
    ("kafka.partitions=0", "kafka.partitions"),
    ("kafka.dead_letter_topic=feed-events", "kafka.dead_letter_topic"),
    ("kafka.session_timeout_ms=100", "kafka.session_timeout_ms"),
    ("kafka.security.sasl_pasword=x", "kafka.security.sasl_pasword"),
    ("producer.compression_type=brotli", "producer.compression_type"),
    ("producer.acks=2", "producer.acks"),
    ("producer.from_date=2026-13-01", "producer.from_date"),
    ("consumer.max_seconds=0", "consumer.max_seconds"),
    ("metrics.port=70000", "metrics.port"),
    ("kafka.no_such_key=1", "kafka.no_such_key"),
])
def test_a_bad_value_fails_naming_its_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(IngestConfig, overrides=[override])


def test_security_options_pass_through_and_lag_follows_the_broker_kind():
    embedded = load_config(IngestConfig)
    assert embedded.uses_embedded_broker and not embedded.report_lag
    cluster = load_config(IngestConfig, overrides=[
        "kafka.bootstrap_servers=kafka-1:9093,kafka-2:9093", "kafka.security.security_protocol=SASL_SSL",
        "kafka.security.sasl_mechanism=PLAIN"])
    assert cluster.report_lag and cluster.kafka.security == {"security_protocol": "SASL_SSL",
                                                             "sasl_mechanism": "PLAIN"}
    assert not load_config(IngestConfig, overrides=["kafka.bootstrap_servers=k:9092",
                                                    "metrics.report_lag=false"]).report_lag
    assert load_config(IngestConfig).broker_topics == ["feed-events", "feed-events-dead-letter"]
