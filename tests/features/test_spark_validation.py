"""The Spark interpreter of an event schema's rules gives the reasons the Python one gives: for the
feed on hand-written corpora, and for every shipped schema (and a variant with a float range) on a
corpus derived from its fields."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pyspark.sql import types as T

from features.schema import (
    INT32_MAX, INT32_MIN, INT64_MAX, INT64_MIN, ContractConfig, EventSchema, Field, load_schema, shipped_schemas,
)
from features.transforms import REASON_COLUMN, valid_events, validate
from features.validation import check_message, check_record, time_window

NOW_MS = 1_790_000_000_000
CONTRACT = ContractConfig(now_ms=NOW_MS, max_string_len=8)
FEED = load_schema("feed")

_SPARK_TYPES = {"string": T.StringType(), "int64": T.LongType(), "int32": T.IntegerType(),
                "bool": T.BooleanType(), "float64": T.DoubleType()}


def bounded_watch() -> EventSchema:
    """The watch schema with a float64 field bounded on both sides, and a string one not allowed
    every value: what the shipped schemas leave out of the corpus."""
    values = load_schema("watch").to_dict()
    values["name"] = "watch_bounded"
    values["fields"]["video_s"].update(min=0.5, max=36_000.0)
    return load_schema(values)


SCHEMAS = {name: load_schema(name) for name in shipped_schemas()} | {"watch_bounded": bounded_watch()}


def row_schema(schema: EventSchema = FEED, **changed: T.DataType | None) -> T.StructType:
    """The schema's raw columns with some retyped, dropped (``None``) or added."""
    fields = [T.StructField(f.name, changed.get(f.name, _SPARK_TYPES[f.kind])) for f in schema.fields
              if changed.get(f.name, _SPARK_TYPES[f.kind]) is not None]
    extra = [T.StructField(name, kind) for name, kind in changed.items()
             if name not in schema.field_names and kind is not None]
    return T.StructType(fields + extra)


def spark_reasons(spark: Any, schema: EventSchema, rows: list[dict[str, Any]], types: T.StructType,
                  contract: ContractConfig = CONTRACT) -> list[Any]:
    frame = spark.createDataFrame([tuple(row.get(f.name) for f in types.fields) for row in rows], types)
    return [row[REASON_COLUMN] for row in validate(frame, schema, contract, NOW_MS).collect()]


def python_reason(schema: EventSchema, row: dict[str, Any], types: T.StructType,
                  contract: ContractConfig = CONTRACT) -> str | None:
    # At rest a null is an absent value; a column missing from the input is absent from every row.
    record = {name: value for name, value in row.items() if value is not None and name in types.fieldNames()}
    return check_record(record, schema, contract, NOW_MS)


def good(**fields: Any) -> dict[str, Any]:
    event = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "author_id": "a1",
             "content_type": "video", "topic": "news", "surface": "feed",
             "event_ts": 1_780_000_000_000, "dwell_ms": 1_500, "click": True, "like": False,
             "comment": False, "share": False}
    event.update(fields)
    return event


# (rows with their expected reasons, schema): typed columns, then columns of the wrong type or absent.
CORPORA = {
    "contract types": ([
        (good(), None),
        (good(user_id="ü" * 8, topic="🙂" * 8), None),  # length counts characters, not bytes
        (good(event_id=None), "missing:event_id"),
        (good(user_id=""), "empty:user_id"),
        (good(topic="ü" * 9), "too_long:topic"),
        (good(item_id=None, dwell_ms=-1), "missing:item_id"),  # the first failing field wins
        (good(dwell_ms=-1), "out_of_range:dwell_ms"),
        (good(event_ts=-5), "out_of_range:event_ts"),
        (good(click=None), "missing:click"),
        (good(share=None), "missing:share"),
        (good(event_ts=CONTRACT.epoch_ms - 1), "ts_before_epoch"),
        (good(event_ts=CONTRACT.epoch_ms), None),
        (good(event_ts=NOW_MS + CONTRACT.max_future_ms), None),
        (good(event_ts=NOW_MS + CONTRACT.max_future_ms + 1), "ts_in_future"),
        (good(surface="", event_ts=0), "empty:surface"),
    ], row_schema()),
    "string timestamps": ([
        (good(event_ts="1780000000000"), "bad_type:event_ts"),
        (good(event_ts=None), "missing:event_ts"),
        (good(event_ts="x", dwell_ms=-1), "bad_type:event_ts"),
        (good(event_ts=None, schema_version=2), "unknown_schema_version"),
        (good(event_ts=None, schema_version=1), "missing:event_ts"),
    ], row_schema(event_ts=T.StringType(), schema_version=T.LongType())),
    "integer flags": ([
        (good(click=1), "bad_type:click"),
        (good(click=None), "missing:click"),
        (good(click=0, like=None), "bad_type:click"),
    ], row_schema(click=T.IntegerType())),
    "other integer widths": ([
        (good(dwell_ms=3_000_000_000, event_ts=5), "out_of_range:dwell_ms"),
        (good(dwell_ms=2**31 - 1, event_ts=5), "ts_before_epoch"),
        (good(event_ts=-1, dwell_ms=-1), "out_of_range:event_ts"),
        (good(schema_version=1.0, event_ts=5), "ts_before_epoch"),
        (good(schema_version=1.5, event_ts=5), "unknown_schema_version"),
    ], row_schema(dwell_ms=T.LongType(), event_ts=T.IntegerType(), schema_version=T.DoubleType())),
    "fractional dwell": ([
        (good(dwell_ms=1.5), "bad_type:dwell_ms"),
        (good(dwell_ms=1500.0), "bad_type:dwell_ms"),
        (good(dwell_ms=None), "missing:dwell_ms"),
    ], row_schema(dwell_ms=T.DoubleType())),
    "absent and extra columns": ([
        (good(note="anything"), "missing:share"),
        (good(user_id=None), "missing:user_id"),
        (good(schema_version="1"), "unknown_schema_version"),
    ], row_schema(share=None, note=T.StringType(), schema_version=T.StringType())),
}


@pytest.mark.parametrize("corpus", CORPORA)
def test_spark_reasons_equal_python_reasons_and_expectations(spark, corpus):
    cases, types = CORPORA[corpus]
    rows = [row for row, _ in cases]
    expected = [reason for _, reason in cases]
    assert [python_reason(FEED, row, types) for row in rows] == expected
    assert spark_reasons(spark, FEED, rows, types) == expected


def test_corpora_cover_at_least_eight_kinds_of_bad_rows():
    kinds = {reason for cases, _ in CORPORA.values() for _, reason in cases if reason is not None}
    assert len(kinds) >= 8
    assert {reason.split(":")[0] for reason in kinds} >= {
        "missing", "bad_type", "empty", "too_long", "out_of_range", "ts_before_epoch", "ts_in_future",
        "unknown_schema_version"}


# --- a corpus derived from any schema's fields ---------------------------------------------------

def contract_of(schema: EventSchema) -> ContractConfig:
    """:data:`CONTRACT` with room for the longest allowed value of the schema."""
    longest = max((len(value) for field in schema.fields for value in field.values), default=0)
    return ContractConfig(now_ms=NOW_MS, max_string_len=max(CONTRACT.max_string_len, longest))


def valid_record(schema: EventSchema) -> dict[str, Any]:
    """A valid raw record: every field at a value its rules accept, the time in the window."""
    first, last = time_window(schema, contract_of(schema), NOW_MS)
    record = {}
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


def bad_values(schema: EventSchema, field: Field) -> list[tuple[Any, str]]:
    """(value, reason) of values a typed column can hold that break one rule of ``field``."""
    cases: list[tuple[Any, str]] = [(None, "missing")]
    longest = contract_of(schema).max_string_len
    if field.kind == "string":
        cases += [("", "empty"), ("ü" * (longest + 1), "too_long")]
        if field.values:
            # Values compare exactly (case and all); a long value that is not allowed is too long.
            near = next(value for value in (field.values[0].swapcase(), field.values[0] + "_")
                        if value not in field.values)
            cases += [("nope", "not_allowed"), (near, "not_allowed"),
                      (field.values[0] + "z" * longest, "too_long")]
    elif field.kind == "float64":
        cases += [(math.nan, "bad_type"), (math.inf, "bad_type"), (-math.inf, "bad_type")]
        if field.lower > -math.inf:
            cases += [(field.lower - 0.25, "out_of_range"), (field.lower, None)]
        if field.upper < math.inf:
            cases += [(field.upper + 0.25, "out_of_range"), (field.upper, None)]
    elif field.kind in ("int32", "int64"):
        low, high = int(math.ceil(field.lower)), int(math.floor(field.upper))
        type_low, type_high = (INT32_MIN, INT32_MAX) if field.kind == "int32" else (INT64_MIN, INT64_MAX)
        # The time field's own range lies outside the contract's window: its bounds are tested there.
        at_bounds = field.name != schema.time_field
        if low > type_low:
            cases += [(low - 1, "out_of_range")] + [(low, None)] * at_bounds
        if high < type_high:
            cases += [(high + 1, "out_of_range")] + [(high, None)] * at_bounds
    return [(value, None if reason is None else f"{reason}:{field.name}") for value, reason in cases]


def derived_corpus(schema: EventSchema) -> list[tuple[dict[str, Any], str | None]]:
    base = valid_record(schema)
    cases: list[tuple[dict[str, Any], str | None]] = [(base, None)]
    for field in schema.fields:
        cases += [({**base, field.name: value}, reason) for value, reason in bad_values(schema, field)]
    first, last = time_window(schema, contract_of(schema), NOW_MS)
    time = schema.time_field
    cases += [({**base, time: first}, None), ({**base, time: first - 1}, "ts_before_epoch"),
              ({**base, time: last}, None), ({**base, time: last + 1}, "ts_in_future")]
    # Two broken fields: the first in schema order wins.
    first_field, last_field = schema.fields[0], schema.fields[-1]
    cases.append(({**base, first_field.name: None, last_field.name: None}, f"missing:{first_field.name}"))
    return cases


def retyped_corpora(schema: EventSchema) -> list[tuple[list[tuple[dict[str, Any], str | None]], T.StructType]]:
    """One corpus per field whose column is of another type family: a string or an integer field's
    values are all of the wrong type (even whole doubles), a bool as integers too; a float64 field
    takes 64-bit integers (valid, and range-checked) but not strings."""
    base = valid_record(schema)
    corpora = []
    for field in schema.fields:
        name = field.name
        if field.kind == "string":
            kinds = {T.LongType(): [(5, f"bad_type:{name}"), (None, f"missing:{name}")]}
        elif field.kind == "bool":
            kinds = {T.IntegerType(): [(1, f"bad_type:{name}"), (0, f"bad_type:{name}")]}
        elif field.kind in ("int32", "int64"):
            kinds = {T.DoubleType(): [(float(base[name]), f"bad_type:{name}"), (1.5, f"bad_type:{name}")]}
        else:
            integers = [(int(math.ceil(max(field.lower, 0))), None), (None, f"missing:{name}")]
            if field.lower > -math.inf:
                integers.append((int(math.floor(field.lower)) - 1, f"out_of_range:{name}"))
            kinds = {T.LongType(): integers, T.StringType(): [("1.5", f"bad_type:{name}")]}
        for kind, values in kinds.items():
            corpora.append(([({**base, name: value}, reason) for value, reason in values],
                            row_schema(schema, **{name: kind})))
    return corpora


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_schema_gets_the_same_reasons_from_both_interpreters(spark, name):
    schema = SCHEMAS[name]
    corpora = [(derived_corpus(schema), row_schema(schema)), *retyped_corpora(schema)]
    contract = contract_of(schema)
    for cases, types in corpora:
        rows = [row for row, _ in cases]
        expected = [reason for _, reason in cases]
        assert [python_reason(schema, row, types, contract) for row in rows] == expected, types.simpleString()
        assert spark_reasons(spark, schema, rows, types, contract) == expected, types.simpleString()
    kinds = {reason.split(":")[0] for cases, _ in corpora for _, reason in cases if reason}
    assert kinds >= {"missing", "bad_type", "empty", "too_long", "out_of_range", "ts_before_epoch", "ts_in_future"}
    if any(field.values for field in schema.fields):
        assert "not_allowed" in kinds


def test_the_corpora_reach_not_allowed_float_and_declared_ranges():
    reasons = {reason for name in ("watch", "watch_bounded") for _, reason in derived_corpus(SCHEMAS[name]) if reason}
    assert {"not_allowed:format", "out_of_range:tz_offset_min", "bad_type:video_s",
            "out_of_range:video_s"} <= reasons
    bounded = [row["video_s"] for row, reason in derived_corpus(SCHEMAS["watch_bounded"])
               if reason == "out_of_range:video_s"]
    assert bounded == [0.25, 36_000.25]


def test_messages_are_json_of_the_raw_fields():
    watch = SCHEMAS["watch"]
    record = valid_record(watch)
    event, reason = check_message(json.dumps({**record, "note": 1}).encode(), watch, CONTRACT, NOW_MS)
    assert reason is None and event == record and list(event) == list(watch.field_names)
    assert check_message(json.dumps({**record, "video_s": 7}).encode(), watch, CONTRACT, NOW_MS)[1] is None
    for value, expected in ((True, "bad_type:video_s"), ("1.5", "bad_type:video_s"), (10**400, "bad_type:video_s"),
                            (-0.5, "out_of_range:video_s"), (7.0, None)):
        assert check_record({**record, "video_s": value}, watch, CONTRACT, NOW_MS) == expected
    assert check_message(json.dumps({**record, "video_s": math.nan}).encode(), watch, CONTRACT, NOW_MS) == (
        None, "bad_type:video_s")
    # The time is in seconds: the window's bounds are the contract's milliseconds divided by 1000.
    seconds = watch.time_field
    assert check_record({**record, seconds: CONTRACT.epoch_ms // 1000}, watch, CONTRACT, NOW_MS) is None
    assert check_record({**record, seconds: CONTRACT.epoch_ms // 1000 - 1}, watch, CONTRACT, NOW_MS) == "ts_before_epoch"
    assert check_record({**record, seconds: (NOW_MS + CONTRACT.max_future_ms) // 1000 + 1}, watch, CONTRACT,
                        NOW_MS) == "ts_in_future"
    assert check_message(b"[1]", watch, CONTRACT)[1] == "not_an_object"


def test_valid_events_are_canonical_events(spark):
    types = row_schema(FEED, dwell_ms=T.LongType(), event_ts=T.IntegerType(), note=T.StringType())
    frame = spark.createDataFrame([tuple(good(event_ts=1_600_000_000, note="x").get(name)
                                         for name in types.fieldNames())], types)
    events = valid_events(validate(frame, FEED, ContractConfig(now_ms=NOW_MS, epoch_ms=0), NOW_MS), FEED)
    assert [(f.name, f.dataType) for f in events.schema] == [(f.name, _SPARK_TYPES[f.kind]) for f in FEED.fields]
    assert events.collect()[0].asDict() == good(event_ts=1_600_000_000)

    watch = SCHEMAS["watch"]
    record = valid_record(watch)
    types = row_schema(watch, video_s=T.IntegerType())
    frame = spark.createDataFrame([tuple({**record, "video_s": 12}.get(name) for name in types.fieldNames())], types)
    events = valid_events(validate(frame, watch, CONTRACT, NOW_MS), watch)
    assert [(f.name, f.dataType) for f in events.schema] == [
        (f.name, _SPARK_TYPES[f.kind]) for f in watch.canonical_fields]
    assert events.columns[:3] == ["event_id", "user_id", "event_ts"]
    assert events.collect()[0].asDict() == watch.canonical({**record, "video_s": 12.0})
    assert events.collect()[0]["event_ts"] == record["ts"] * 1000
