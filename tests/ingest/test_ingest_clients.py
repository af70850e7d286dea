"""The two client libraries (``kafka.client``) on the real embedded broker: the same partition for a
key whichever produced it, the whole replay → landing path with kafka-python (the crash and broker
tests run both), the security options librdkafka gets, and the landing tables built column by
column."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pytest
from ingest_support import FAST_BATCHES, Stream, assert_ledger_contiguous, read_topic, valid_event_ids

from common.config import ConfigError, load_config
from features.validation import check_message, check_messages
from ingest.clients import librdkafka_options
from ingest.config import CONFLUENT_KAFKA, KAFKA_PYTHON, IngestConfig
from ingest.demo import bad_messages
from ingest.landing import LandingZone, read_dead_letters, read_landed
from ingest.producer import event_messages, raw_dates, read_day

pytestmark = pytest.mark.slow


def test_a_key_goes_to_the_same_partition_whichever_client_sent_it(broker, tmp_path, raw_messages):
    messages = next(iter(raw_messages.values()))[:400]
    placed = {}
    for client in (KAFKA_PYTHON, CONFLUENT_KAFKA):
        stream = Stream(broker, tmp_path / client, client=client)
        stream.produce(messages)
        records = read_topic(stream.config, stream.config.kafka.topic, len(messages))
        assert len(records) == len(messages)
        placed[client] = {record.key: record.partition for record in records if record.key is not None}
        # A user's events keep their order within the partition.
        assert [r.value for r in records if r.key == messages[0][0]] == [
            value for key, value in messages if key == messages[0][0]]
    assert placed[KAFKA_PYTHON] == placed[CONFLUENT_KAFKA]
    assert len(set(placed[KAFKA_PYTHON].values())) > 1


def test_kafka_python_lands_every_valid_event_once_and_dead_letters_the_rest(broker, tmp_path, raw_messages):
    stream = Stream(broker, tmp_path, client=KAFKA_PYTHON)
    try:
        good = [message for day in raw_messages.values() for message in day]
        schema, contract = stream.config.event_schema, stream.config.contract
        template = next(event for event, _ in (check_message(value, schema, contract) for _, value in good)
                        if event is not None)
        corpus = bad_messages(template, schema, contract) + [("not_json", None)]
        messages = good[:600] + [(b"bad", raw) for _, raw in corpus] + good[600:]
        stream.produce(messages)
        consumer = stream.start_consumer(*FAST_BATCHES, until_idle_s=3)
        assert consumer.wait(timeout_s=120) == 0, consumer.logs()

        expected = valid_event_ids(messages, stream.config)
        assert Counter(read_landed(stream.landing).column("event_id").to_pylist()) == expected
        rejected = Counter(reason for _, reason in (check_message(raw or b"", schema, contract)
                                                    for _, raw in messages) if reason is not None)
        dead = read_dead_letters(stream.landing / "_dead_letter")
        assert Counter(dead.column("reason").to_pylist()) == rejected
        assert consumer.summary()["dead_lettered"] == dict(sorted(rejected.items()))
        assert len(read_topic(stream.config, stream.config.kafka.dead_letter_topic, sum(rejected.values()))) \
            == sum(rejected.values())
        covered = assert_ledger_contiguous(LandingZone(stream.landing, stream.config.kafka.topic).landed_batches())
        assert sum(covered.values()) == len(messages)
    finally:
        stream.stop_all()


def test_security_options_are_translated_for_librdkafka():
    config = load_config(IngestConfig, overrides=[
        "kafka.bootstrap_servers=kafka-1:9093", "kafka.security.security_protocol=SASL_SSL",
        "kafka.security.sasl_mechanism=SCRAM-SHA-512", "kafka.security.sasl_plain_username=ingest",
        "kafka.security.sasl_plain_password=secret", "kafka.security.ssl_cafile=/etc/ca.pem",
        "kafka.security.ssl_check_hostname=false"])
    options = librdkafka_options(config)
    assert {key: value for key, value in options.items() if key != "logger"} == {
        "bootstrap.servers": "kafka-1:9093", "socket.timeout.ms": 30000, "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "ingest", "sasl.password": "secret",
        "ssl.ca.location": "/etc/ca.pem", "ssl.endpoint.identification.algorithm": "none"}
    untranslatable = load_config(IngestConfig, overrides=[
        "kafka.bootstrap_servers=kafka-1:9093", "kafka.security.sasl_kerberos_domain_name=example"])
    with pytest.raises(ConfigError, match="kafka.security.sasl_kerberos_domain_name"):
        librdkafka_options(untranslatable)
    with pytest.raises(ConfigError, match="kafka.client"):
        load_config(IngestConfig, overrides=["kafka.client=librdkafka"])


@pytest.mark.parametrize("schema_name", ["feed", "watch"])
def test_landing_tables_built_by_column_equal_row_conversion(schema_name, raw_dir, watch_raw_dir, tmp_path):
    config = load_config(IngestConfig, overrides=[f"schema={schema_name}", "contract.now_ms=0"])
    schema = config.event_schema
    files = next(iter(raw_dates(raw_dir if schema_name == "feed" else watch_raw_dir).values()))
    values = [value for _, value in event_messages(read_day(files, schema), schema)]
    events, _ = check_messages(values, schema, config.contract)
    if schema_name == "watch":  # an integer in a float64 field is valid, and lands as a float
        events[0]["video_s"] = 7
    zone = LandingZone(tmp_path, "t", schema=schema)
    table = zone._events_table(events)
    assert table.equals(pa.Table.from_pylist(events, schema=schema.raw_arrow_schema))
