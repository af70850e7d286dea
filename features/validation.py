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
from typing import Any, Mapping

from features.schema import (
    FIELDS, INT32_MAX, REASON_BAD_TYPE, REASON_EMPTY, REASON_MISSING, REASON_NOT_AN_OBJECT,
    REASON_NOT_JSON, REASON_OUT_OF_RANGE, REASON_OVERSIZE, REASON_TOO_LONG, REASON_TS_BEFORE_EPOCH,
    REASON_TS_IN_FUTURE, REASON_UNKNOWN_SCHEMA_VERSION, SUPPORTED_SCHEMA_VERSIONS, ContractConfig,
    Field,
)


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
