"""The two interpreters of the event contract's rules (:mod:`features.schema`).

:func:`check_message` / :func:`check_record` validate one Kafka message / one decoded record in
Python; :func:`spark_reason` builds the same checks as one Spark column expression. Both return the
first failing reason (``None`` / null for a valid event), checked in the order of
:data:`features.schema.FIELDS`, each field's checks in the order: missing, bad type, empty, too long,
out of range, then the timestamp window.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Mapping

from features.schema import (
    FIELDS, INT32_MAX, REASON_BAD_TYPE, REASON_EMPTY, REASON_MISSING, REASON_NOT_AN_OBJECT,
    REASON_NOT_JSON, REASON_OUT_OF_RANGE, REASON_OVERSIZE, REASON_TOO_LONG, REASON_TS_BEFORE_EPOCH,
    REASON_TS_IN_FUTURE, REASON_UNKNOWN_SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, ContractConfig,
    Field,
)

if TYPE_CHECKING:
    from pyspark.sql import Column
    from pyspark.sql.types import DataType, StructType


def now_ms(contract: ContractConfig) -> int:
    return contract.now_ms or int(time.time() * 1000)


def check_message(raw: bytes, contract: ContractConfig,
                  processing_ms: int | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """Decode and validate one message. Returns ``(event, None)`` or ``(None, reason)``."""
    if len(raw) > contract.max_message_bytes:
        return None, REASON_OVERSIZE
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, REASON_NOT_JSON
    if not isinstance(record, dict):
        return None, REASON_NOT_AN_OBJECT
    reason = check_record(record, contract, processing_ms)
    if reason is not None:
        return None, reason
    return {f.name: record[f.name] for f in FIELDS}, None


def check_record(record: Mapping[str, Any], contract: ContractConfig,
                 processing_ms: int | None = None) -> str | None:
    """First failing reason of a decoded record, or ``None`` when it is a valid event."""
    version = record.get("schema_version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
        return REASON_UNKNOWN_SCHEMA_VERSION
    for field in FIELDS:
        reason = _check_value(field, record.get(field.name), contract)
        if reason is not None:
            return f"{reason}:{field.name}"
    ts = record["event_ts"]
    if ts < contract.epoch_ms:
        return REASON_TS_BEFORE_EPOCH
    limit = (processing_ms if processing_ms is not None else now_ms(contract)) + contract.max_future_ms
    if ts > limit:
        return REASON_TS_IN_FUTURE
    return None


def _check_value(field: Field, value: Any, contract: ContractConfig) -> str | None:
    if value is None:
        return REASON_MISSING
    if field.kind == "string":
        if not isinstance(value, str):
            return REASON_BAD_TYPE
        if not value:
            return REASON_EMPTY
        if len(value) > contract.max_string_len:
            return REASON_TOO_LONG
    elif field.kind == "bool":
        if not isinstance(value, bool):
            return REASON_BAD_TYPE
    else:
        if isinstance(value, bool) or not isinstance(value, int):
            return REASON_BAD_TYPE
        if field.kind == "int32" and not 0 <= value <= INT32_MAX:
            return REASON_OUT_OF_RANGE
        if field.kind == "int64" and not 0 <= value < 2**63:
            return REASON_OUT_OF_RANGE
    return None


# The Spark interpreter. pyspark is imported inside the functions: the Kafka ingest uses this module
# without Spark.
_FIELDS_BY_NAME: dict[str, Field] = {field.name: field for field in FIELDS}
_SPARK_TYPE_NAMES = {"string": "string", "int64": "bigint", "int32": "int", "bool": "boolean"}


def spark_reason(input_schema: StructType, contract: ContractConfig,
                 processing_ms: int | None = None) -> Column:
    """First failing reason of each row of a DataFrame with ``input_schema``; null for a valid event.

    The Spark interpreter of the rules :func:`check_record` applies, with the same reasons in the same
    order. A row at rest is read the way its JSON would be decoded: a null is an absent value, and a
    column whose Spark type is of another family than the contract's (a string ``event_ts``, an
    integer ``click``, a fractional ``dwell_ms``) holds values of the wrong type. Integers of any width
    are integers, so a 64-bit ``dwell_ms`` is range-checked rather than rejected. A contract column
    absent from the input makes every row ``missing:<field>``; extra columns are ignored.
    """
    from pyspark.sql import functions as F

    columns = {column.name: column.dataType for column in input_schema.fields}
    checks = []
    if "schema_version" in columns:
        checks.append(_spark_version_reason(columns["schema_version"]))
    for field in FIELDS:
        checks.append(_spark_field_reason(field, columns.get(field.name), contract))
    ts = spark_value(_FIELDS_BY_NAME["event_ts"], columns.get("event_ts"))
    limit = (processing_ms if processing_ms is not None else now_ms(contract)) + contract.max_future_ms
    checks.append(F.when(ts < F.lit(contract.epoch_ms), F.lit(REASON_TS_BEFORE_EPOCH)))
    checks.append(F.when(ts > F.lit(limit), F.lit(REASON_TS_IN_FUTURE)))
    return F.coalesce(*checks)


def spark_value(field: Field, data_type: DataType | None) -> Column:
    """The column of ``field`` as its contract type; null where it is absent or of another type family.

    Exact for every row :func:`spark_reason` accepts (their integers are in range), so the valid
    events of a DataFrame are ``select(spark_value(f, ...).alias(f.name) for f in FIELDS)``.
    """
    from pyspark.sql import functions as F

    target = _SPARK_TYPE_NAMES[field.kind]
    if data_type is None or not _in_family(field, data_type):
        return F.lit(None).cast(target)
    return F.col(field.name).cast(target)


def _in_family(field: Field, data_type: DataType) -> bool:
    from pyspark.sql import types as T

    if field.kind == "string":
        return isinstance(data_type, T.StringType)
    if field.kind == "bool":
        return isinstance(data_type, T.BooleanType)
    return isinstance(data_type, (T.ByteType, T.ShortType, T.IntegerType, T.LongType))


def _spark_field_reason(field: Field, data_type: DataType | None, contract: ContractConfig) -> Column:
    from pyspark.sql import functions as F

    def reason(name: str) -> Column:
        return F.lit(f"{name}:{field.name}")

    if data_type is None:
        return reason(REASON_MISSING)
    value = F.col(field.name)
    if not _in_family(field, data_type):
        return F.when(value.isNull(), reason(REASON_MISSING)).otherwise(reason(REASON_BAD_TYPE))
    check = F.when(value.isNull(), reason(REASON_MISSING))
    if field.kind == "string":
        check = check.when(value == F.lit(""), reason(REASON_EMPTY))
        check = check.when(F.length(value) > F.lit(contract.max_string_len), reason(REASON_TOO_LONG))
    elif field.kind == "int32":
        check = check.when((value < 0) | (value > F.lit(INT32_MAX)), reason(REASON_OUT_OF_RANGE))
    elif field.kind == "int64":
        check = check.when(value < 0, reason(REASON_OUT_OF_RANGE))
    return check


def _spark_version_reason(data_type: DataType) -> Column:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    version = F.col("schema_version")
    # Python: ``version in (1,)``, true for 1 and 1.0 but never for True or "1".
    if isinstance(data_type, T.NumericType):
        return F.when(version.isNotNull() & ~version.isin(*SUPPORTED_SCHEMA_VERSIONS),
                      F.lit(REASON_UNKNOWN_SCHEMA_VERSION))
    return F.when(version.isNotNull(), F.lit(REASON_UNKNOWN_SCHEMA_VERSION))
