"""The raw event contract (docs/design.md, "Data contract"): one impression of one item to one user.

This module is the one home of the event schema and of the rules an event must pass. The rules are
data (:data:`FIELDS` and :class:`ContractConfig`); two interpreters apply them, one per record for the
Kafka ingest (:func:`features.validation.check_record`) and one per column for the Spark job
(:func:`features.validation.spark_reason`), and a parity test runs a corpus of bad events through
both. A rejected event is never dropped: it carries the first failing reason, one of
:data:`REASONS` (with the field name appended where the reason is about a field).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from common.config import require

SCHEMA_VERSION = 1
"""Version of the JSON event format; a message may carry ``schema_version`` (absent means 1)."""
SUPPORTED_SCHEMA_VERSIONS = (1,)

Kind = Literal["string", "int64", "int32", "bool"]


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    categorical: bool = False


FIELDS: tuple[Field, ...] = (
    Field("event_id", "string"),
    Field("user_id", "string"),
    Field("item_id", "string", categorical=True),
    Field("author_id", "string", categorical=True),
    Field("content_type", "string", categorical=True),
    Field("topic", "string", categorical=True),
    Field("surface", "string", categorical=True),
    Field("event_ts", "int64"),
    Field("dwell_ms", "int32"),
    Field("click", "bool"),
    Field("like", "bool"),
    Field("comment", "bool"),
    Field("share", "bool"),
)
FIELD_NAMES: tuple[str, ...] = tuple(field.name for field in FIELDS)
CATEGORICAL_FIELDS: tuple[str, ...] = tuple(field.name for field in FIELDS if field.categorical)
ACTION_FIELDS: tuple[str, ...] = ("click", "like", "comment", "share")

INT32_MAX = 2**31 - 1

# Reasons, in the order they are checked. Field-level reasons are written "<reason>:<field>".
REASON_NOT_JSON = "not_json"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_OVERSIZE = "oversize"
REASON_UNKNOWN_SCHEMA_VERSION = "unknown_schema_version"
REASON_MISSING = "missing"
REASON_BAD_TYPE = "bad_type"
REASON_EMPTY = "empty"
REASON_TOO_LONG = "too_long"
REASON_OUT_OF_RANGE = "out_of_range"
REASON_TS_BEFORE_EPOCH = "ts_before_epoch"
REASON_TS_IN_FUTURE = "ts_in_future"
REASONS: tuple[str, ...] = (
    REASON_NOT_JSON, REASON_NOT_AN_OBJECT, REASON_OVERSIZE, REASON_UNKNOWN_SCHEMA_VERSION,
    REASON_MISSING, REASON_BAD_TYPE, REASON_EMPTY, REASON_TOO_LONG, REASON_OUT_OF_RANGE,
    REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE,
)


@dataclass
class ContractConfig:
    """Limits an event must respect; shared by the Spark job and the Kafka ingest."""

    epoch_ms: int = 1_577_836_800_000
    """Earliest acceptable ``event_ts`` (default 2020-01-01T00:00:00Z)."""
    max_future_ms: int = 3_600_000
    """How far past the processing time an ``event_ts`` may lie (clock skew allowance)."""
    now_ms: int = 0
    """Processing time used for the future check; 0 means the wall clock at validation time."""
    max_string_len: int = 256
    max_message_bytes: int = 8192
    """Largest accepted Kafka message (the raw bytes)."""

    def __post_init__(self) -> None:
        require(self.epoch_ms >= 0, "contract.epoch_ms", "must be >= 0")
        require(self.max_future_ms >= 0, "contract.max_future_ms", "must be >= 0")
        require(self.now_ms >= 0, "contract.now_ms", "must be >= 0 (0 = wall clock)")
        require(self.max_string_len > 0, "contract.max_string_len", "must be > 0")
        require(self.max_message_bytes > 0, "contract.max_message_bytes", "must be > 0")


_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(), "bool": pa.bool_()}

RAW_ARROW_SCHEMA = pa.schema([pa.field(f.name, _ARROW_TYPES[f.kind]) for f in FIELDS])
"""Arrow schema of raw events at rest (Parquet), before the hive ``date`` partition column."""


def spark_ddl() -> str:
    """The contract as a Spark DDL string (``event_id STRING, ...``)."""
    names = {"string": "STRING", "int64": "BIGINT", "int32": "INT", "bool": "BOOLEAN"}
    return ", ".join(f"{f.name} {names[f.kind]}" for f in FIELDS)
