"""The batch validator (:func:`features.validation.check_messages`) gives every message exactly the
verdict of :func:`features.validation.check_message`: the same reason, or the same canonical record
(values of the same types), for every shipped schema, over a corpus of good and bad messages."""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import pytest

from features.schema import INT32_MAX, INT64_MAX, ContractConfig, EventSchema, load_schema, shipped_schemas
from features.synth import SynthConfig, write_synthetic_logs
from features.validation import MessageValidator, check_message, check_messages, time_window
from ingest.producer import event_messages, raw_dates, read_day

NOW_MS = 1_790_000_000_000
CONTRACT = ContractConfig(now_ms=NOW_MS, max_string_len=12, max_message_bytes=2048)


def bounded_watch() -> EventSchema:
    """The watch schema with a float64 field bounded on both sides."""
    values = load_schema("watch").to_dict()
    values["name"] = "watch_bounded"
    values["fields"]["video_s"].update(min=0.5, max=36_000.0)
    return load_schema(values)


SCHEMAS = {name: load_schema(name) for name in shipped_schemas()} | {"watch_bounded": bounded_watch()}


def contract_of(schema: EventSchema) -> ContractConfig:
    longest = max((len(value) for field in schema.fields for value in field.values), default=0)
    return ContractConfig(now_ms=NOW_MS, max_string_len=max(CONTRACT.max_string_len, longest),
                          max_message_bytes=CONTRACT.max_message_bytes)


def valid_record(schema: EventSchema, contract: ContractConfig) -> dict[str, Any]:
    first, last = time_window(schema, contract, NOW_MS)
    record: dict[str, Any] = {}
    for field in schema.fields:
        if field.name == schema.time_field:
            record[field.name] = (first + last) // 2
        elif field.kind == "string":
            record[field.name] = field.values[-1] if field.values else "ok"
        elif field.kind == "bool":
            record[field.name] = True
        elif field.kind == "float64":
            record[field.name] = min(max(1.5, field.lower), field.upper)
        else:
            record[field.name] = int(min(max(7, field.lower), field.upper))
    return record


def variants(schema: EventSchema, contract: ContractConfig, field_name: str) -> list[Any]:
    """Values of every JSON type and at every edge the rules have, for one field."""
    field = schema.field(field_name)
    longest = contract.max_string_len
    values: list[Any] = [None, True, False, 0, 1, -1, 1.0, 1.5, -0.0, "", "x", "ü" * longest,
                         "ü" * (longest + 1), [], {}, [1], {"a": 1}, 2**63, -(2**63) - 1, 2**64, 2**53 + 1,
                         INT32_MAX, INT32_MAX + 1, INT64_MAX, 1e308]
    values += list(field.values) + [value.swapcase() for value in field.values] + [
        value + "_" for value in field.values]
    if field.kind in ("int32", "int64", "float64"):
        for bound in (field.lower, field.upper):
            if math.isfinite(bound):
                values += [bound, bound - 1, bound + 1, bound - 0.25, bound + 0.25, int(bound), float(bound)]
    if field.name == schema.time_field:
        first, last = time_window(schema, contract, NOW_MS)
        values += [first, first - 1, last, last + 1, float(first), str(first)]
    return values


def corpus(schema: EventSchema, contract: ContractConfig) -> list[bytes]:
    base = valid_record(schema, contract)
    records: list[dict[str, Any]] = [base, {**base, "extra": [1, 2]}]
    for field in schema.fields:
        records += [{**base, field.name: value} for value in variants(schema, contract, field.name)]
        records.append({key: value for key, value in base.items() if key != field.name})
    for version in (1, 1.0, 2, 0, True, "1", None, 1.5):
        records.append({**base, "schema_version": version})
    first, last = schema.fields[0].name, schema.fields[-1].name
    records.append({**base, first: None, last: None})
    messages = [json.dumps(record).encode() for record in records]
    text = json.dumps(base)
    messages += [
        b"", b"{", b"}", b"[]", b"[1]", b'"a"', b"1", b"null", b"true", b"{}", b"\xff\xfe", b"{\xff}",
        text.encode() + b" ", b" " + text.encode(), text.encode() + b"x", text.encode() + b"{}",
        b"\xef\xbb\xbf" + text.encode(),  # a UTF-8 byte order mark
        text.encode("utf-16"), text.encode("utf-16-le"), text.encode("utf-32"),  # json.loads reads these
        text.replace('"ok"', '"\\ud800"').encode(),  # a lone surrogate, escaped
        text.replace('"ok"', '"o\\u006b"').encode(),
        text.replace('"ok"', '"\xed\xa0\x80"').encode("utf-8", "surrogateescape"),  # an encoded surrogate
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the parser recurses (and oversize)
        b'{"a":' * 600 + b"1" + b"}" * 600,
        b" " * (contract.max_message_bytes + 1),
        (text[:-1] + ', "pad": "' + "p" * contract.max_message_bytes + '"}').encode(),  # oversize
    ]
    for field in schema.fields:
        for literal in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "10" * 200, "1E2", "-0", "0.0"):
            messages.append(text.replace(f'"{field.name}": {json.dumps(base[field.name])}',
                                         f'"{field.name}": {literal}').encode())
        # A duplicate key: the last one counts.
        messages.append((text[:-1] + f', "{field.name}": null}}').encode())
    return messages


def typed(event: dict[str, Any] | None) -> Any:
    """An event with each value's type, so that 1, 1.0 and True are told apart."""
    return None if event is None else [(name, type(value), value) for name, value in event.items()]


def assert_same_verdicts(messages: list[bytes], schema: EventSchema, contract: ContractConfig) -> None:
    expected = [check_message(raw, schema, contract, NOW_MS) for raw in messages]
    events, rejected = check_messages(messages, schema, contract, NOW_MS)
    assert rejected == [(index, reason) for index, (_, reason) in enumerate(expected) if reason is not None]
    assert [typed(event) for event in events] == [typed(event) for event, reason in expected if reason is None]


@pytest.mark.parametrize("name", SCHEMAS)
def test_batch_verdicts_equal_per_message_verdicts(name):
    schema = SCHEMAS[name]
    contract = contract_of(schema)
    messages = corpus(schema, contract)
    assert_same_verdicts(messages, schema, contract)
    reasons = {reason.split(":")[0] for _, reason in check_messages(messages, schema, contract, NOW_MS)[1]}
    assert reasons >= {"not_json", "not_an_object", "oversize", "unknown_schema_version", "missing", "bad_type",
                       "empty", "too_long", "out_of_range", "ts_before_epoch", "ts_in_future"}
    if any(field.values for field in schema.fields):
        assert "not_allowed" in reasons
    valid = check_messages(messages, schema, contract, NOW_MS)[0]
    assert len(valid) >= 10  # the edges that are valid, through both the quick and the exact path


@pytest.mark.parametrize("name", shipped_schemas())
def test_synthetic_logs_with_faults_get_the_same_verdicts(name, tmp_path):
    """What the replay producer sends of synthetic logs with contract violations, judged at the wall
    clock as the consumer does (the clock fixed for both)."""
    start = (dt.date.today() - dt.timedelta(days=2)).isoformat()
    write_synthetic_logs(SynthConfig(schema=name, users=20, days=1, seed=5, start_date=start,
                                     bad_fraction=0.05, duplicate_fraction=0.02), tmp_path / "raw")
    schema = load_schema(name)
    messages = [value for files in raw_dates(tmp_path / "raw").values()
                for _, value in event_messages(read_day(files, schema), schema)]
    assert_same_verdicts(messages, schema, ContractConfig(now_ms=NOW_MS))
    assert check_messages(messages, schema, ContractConfig(now_ms=NOW_MS), NOW_MS)[1]


def test_one_processing_time_for_a_whole_batch():
    schema = SCHEMAS["feed"]
    record = valid_record(schema, CONTRACT)
    limit = NOW_MS + CONTRACT.max_future_ms
    messages = [json.dumps({**record, schema.time_field: limit + delta}).encode() for delta in (0, 1)]
    events, rejected = MessageValidator(schema, ContractConfig(max_string_len=12)).check(messages, NOW_MS)
    assert len(events) == 1 and rejected == [(1, "ts_in_future")]
