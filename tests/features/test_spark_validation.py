"""The Spark interpreter of the event contract gives the reasons the Python one gives."""

from __future__ import annotations

from typing import Any

import pytest
from pyspark.sql import types as T

from features.schema import FIELDS, ContractConfig
from features.transforms import REASON_COLUMN, valid_events, validate
from features.validation import check_record

NOW_MS = 1_790_000_000_000
CONTRACT = ContractConfig(now_ms=NOW_MS, max_string_len=8)

_SPARK_TYPES = {"string": T.StringType(), "int64": T.LongType(), "int32": T.IntegerType(),
                "bool": T.BooleanType()}


def schema(**changed: T.DataType | None) -> T.StructType:
    """The contract's schema with some columns retyped, dropped (``None``) or added."""
    fields = [T.StructField(f.name, changed.get(f.name, _SPARK_TYPES[f.kind])) for f in FIELDS
              if changed.get(f.name, _SPARK_TYPES[f.kind]) is not None]
    extra = [T.StructField(name, kind) for name, kind in changed.items()
             if name not in {f.name for f in FIELDS} and kind is not None]
    return T.StructType(fields + extra)


def spark_reasons(spark: Any, rows: list[dict[str, Any]], row_schema: T.StructType) -> list[Any]:
    frame = spark.createDataFrame([tuple(row.get(f.name) for f in row_schema.fields) for row in rows],
                                  row_schema)
    return [row[REASON_COLUMN] for row in validate(frame, CONTRACT, NOW_MS).collect()]


def python_reason(row: dict[str, Any], row_schema: T.StructType) -> str | None:
    # At rest a null is an absent value; a column missing from the input is absent from every row.
    record = {name: value for name, value in row.items()
              if value is not None and name in row_schema.fieldNames()}
    return check_record(record, CONTRACT, NOW_MS)


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
    ], schema()),
    "string timestamps": ([
        (good(event_ts="1780000000000"), "bad_type:event_ts"),
        (good(event_ts=None), "missing:event_ts"),
        (good(event_ts="x", dwell_ms=-1), "bad_type:event_ts"),
        (good(event_ts=None, schema_version=2), "unknown_schema_version"),
        (good(event_ts=None, schema_version=1), "missing:event_ts"),
    ], schema(event_ts=T.StringType(), schema_version=T.LongType())),
    "integer flags": ([
        (good(click=1), "bad_type:click"),
        (good(click=None), "missing:click"),
        (good(click=0, like=None), "bad_type:click"),
    ], schema(click=T.IntegerType())),
    "other integer widths": ([
        (good(dwell_ms=3_000_000_000, event_ts=5), "out_of_range:dwell_ms"),
        (good(dwell_ms=2**31 - 1, event_ts=5), "ts_before_epoch"),
        (good(event_ts=-1, dwell_ms=-1), "out_of_range:event_ts"),
        (good(schema_version=1.0, event_ts=5), "ts_before_epoch"),
        (good(schema_version=1.5, event_ts=5), "unknown_schema_version"),
    ], schema(dwell_ms=T.LongType(), event_ts=T.IntegerType(), schema_version=T.DoubleType())),
    "fractional dwell": ([
        (good(dwell_ms=1.5), "bad_type:dwell_ms"),
        (good(dwell_ms=1500.0), "bad_type:dwell_ms"),
        (good(dwell_ms=None), "missing:dwell_ms"),
    ], schema(dwell_ms=T.DoubleType())),
    "absent and extra columns": ([
        (good(note="anything"), "missing:share"),
        (good(user_id=None), "missing:user_id"),
        (good(schema_version="1"), "unknown_schema_version"),
    ], schema(share=None, note=T.StringType(), schema_version=T.StringType())),
}


@pytest.mark.parametrize("corpus", CORPORA)
def test_spark_reasons_equal_python_reasons_and_expectations(spark, corpus):
    cases, row_schema = CORPORA[corpus]
    rows = [row for row, _ in cases]
    expected = [reason for _, reason in cases]
    assert [python_reason(row, row_schema) for row in rows] == expected
    assert spark_reasons(spark, rows, row_schema) == expected


def test_corpora_cover_at_least_eight_kinds_of_bad_rows():
    kinds = {reason for cases, _ in CORPORA.values() for _, reason in cases if reason is not None}
    assert len(kinds) >= 8
    assert {reason.split(":")[0] for reason in kinds} >= {
        "missing", "bad_type", "empty", "too_long", "out_of_range", "ts_before_epoch", "ts_in_future",
        "unknown_schema_version"}


def test_valid_events_have_exactly_the_contract_columns_and_types(spark):
    row_schema = schema(dwell_ms=T.LongType(), event_ts=T.IntegerType(), note=T.StringType())
    frame = spark.createDataFrame([tuple(good(event_ts=1_600_000_000, note="x").get(name)
                                         for name in row_schema.fieldNames())], row_schema)
    events = valid_events(validate(frame, ContractConfig(now_ms=NOW_MS, epoch_ms=0), NOW_MS))
    assert [(f.name, f.dataType) for f in events.schema] == [
        (f.name, _SPARK_TYPES[f.kind]) for f in FIELDS]
    assert events.collect()[0].asDict() == good(event_ts=1_600_000_000)
