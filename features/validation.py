"""The two interpreters of an event schema's rules (:mod:`features.schema`).

:func:`check_message` / :func:`check_record` validate one Kafka message / one decoded record in
Python; :func:`spark_reason` builds the same checks as one Spark column expression. Both return the
first failing reason (``None`` / null for a valid event), checked in the order of the schema's
fields, each field's checks in the order: missing, bad type, empty, too long, not allowed (strings),
out of range (numbers), then the timestamp window.

The rules per type:

- ``string``: a string, non-empty, at most ``contract.max_string_len`` characters, one of the
  field's ``values`` where it lists some;
- ``bool``: a boolean;
- ``int32`` / ``int64``: an integer (not a boolean, not a float) in ``[field.lower, field.upper]``,
  the declared range within the type's own;
- ``float64``: an integer or a float (not a boolean) whose float64 value is finite and in
  ``[field.lower, field.upper]``.

The timestamp window: with the time field ``T`` in units of ``u = schema.time_unit_ms``
milliseconds, ``T·u ≥ contract.epoch_ms`` and ``T·u ≤ processing_ms + contract.max_future_ms``.
Both interpreters compare ``T`` with the bounds divided by ``u`` (``T ≥ ⌈epoch/u⌉``,
``T ≤ ⌊limit/u⌋``, the same for integers), so no product ever overflows a 64-bit integer.
"""

from __future__ import annotations

import json
import math
import operator
import time
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from features.schema import (
    INT64_MAX, INT64_MIN, INTEGER_KINDS, REASON_BAD_TYPE, REASON_EMPTY, REASON_MISSING,
    REASON_NOT_ALLOWED, REASON_NOT_AN_OBJECT, REASON_NOT_JSON, REASON_OUT_OF_RANGE, REASON_OVERSIZE,
    REASON_TOO_LONG, REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE, REASON_UNKNOWN_SCHEMA_VERSION,
    SUPPORTED_SCHEMA_VERSIONS, ContractConfig, EventSchema, Field,
)

if TYPE_CHECKING:
    from pyspark.sql import Column
    from pyspark.sql.types import DataType, StructType


def now_ms(contract: ContractConfig) -> int:
    return contract.now_ms or int(time.time() * 1000)


def time_window(schema: EventSchema, contract: ContractConfig, processing_ms: int | None) -> tuple[int, int]:
    """The first and last valid value of the time field, in its own unit: ``⌈epoch_ms/u⌉`` and
    ``⌊(processing_ms + max_future_ms)/u⌋``."""
    unit = schema.time_unit_ms
    limit = (processing_ms if processing_ms is not None else now_ms(contract)) + contract.max_future_ms
    return -(-contract.epoch_ms // unit), limit // unit


def integer_bounds(field: Field) -> tuple[int, int]:
    """``[field.lower, field.upper]`` as integers: ``value ≥ lower ⇔ value ≥ ⌈lower⌉`` for an integer."""
    return math.ceil(field.lower), math.floor(field.upper)


def check_message(raw: bytes, schema: EventSchema, contract: ContractConfig,
                  processing_ms: int | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """Decode and validate one message. Returns ``(event, None)``, the event being the record's
    schema fields under their raw names (extra keys dropped), or ``(None, reason)``."""
    if len(raw) > contract.max_message_bytes:
        return None, REASON_OVERSIZE
    try:
        record = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None, REASON_NOT_JSON
    if not isinstance(record, dict):
        return None, REASON_NOT_AN_OBJECT
    reason = check_record(record, schema, contract, processing_ms)
    if reason is not None:
        return None, reason
    return {name: record[name] for name in schema.field_names}, None


def check_record(record: Mapping[str, Any], schema: EventSchema, contract: ContractConfig,
                 processing_ms: int | None = None) -> str | None:
    """First failing reason of a decoded raw record, or ``None`` when it is a valid event."""
    version = record.get("schema_version", 1)
    if isinstance(version, bool) or version not in SUPPORTED_SCHEMA_VERSIONS:
        return REASON_UNKNOWN_SCHEMA_VERSION
    for field in schema.fields:
        reason = _check_value(field, record.get(field.name), contract)
        if reason is not None:
            return f"{reason}:{field.name}"
    first, last = time_window(schema, contract, processing_ms)
    ts = record[schema.time_field]
    if ts < first:
        return REASON_TS_BEFORE_EPOCH
    if ts > last:
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
        if field.values and value not in field.values:
            return REASON_NOT_ALLOWED
    elif field.kind == "bool":
        if not isinstance(value, bool):
            return REASON_BAD_TYPE
    elif field.kind in INTEGER_KINDS:
        if isinstance(value, bool) or not isinstance(value, int):
            return REASON_BAD_TYPE
        low, high = integer_bounds(field)
        if not low <= value <= high:
            return REASON_OUT_OF_RANGE
    else:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return REASON_BAD_TYPE
        try:
            number = float(value)  # what a float64 column holds; Spark casts other numbers alike
        except OverflowError:  # an integer beyond every float64
            return REASON_BAD_TYPE
        if not math.isfinite(number):
            return REASON_BAD_TYPE
        if not field.lower <= number <= field.upper:
            return REASON_OUT_OF_RANGE
    return None



class MessageValidator:
    """:func:`check_message` for many messages at once, with exactly its verdicts.

    A record that passes a conservative check of every rule (exact JSON types, bounds, the time
    window) is valid; any other goes through :func:`check_record` for its reason, so a reason is
    always the one :func:`check_message` gives, and the quick check only has to be right about what
    it accepts. The quick check exists because a consumer judges tens of thousands of messages a
    second, and :func:`check_record`'s per-field calls dominated its time: it takes all the fields
    in one ``itemgetter`` call and compares their types in one tuple comparison.
    """

    def __init__(self, schema: EventSchema, contract: ContractConfig) -> None:
        self.schema = schema
        self.contract = contract
        # Every schema has at least three fields, two of them strings (the event id and the user),
        # so each itemgetter below returns a tuple.
        names = schema.field_names
        self._names = names
        self._values = operator.itemgetter(*names)
        # Decoded JSON holds exact str/int/float/bool objects, so the type tuple also tells booleans
        # from integers, as the rules do. A float64 field holding an integer takes the exact path.
        self._types = tuple(_JSON_TYPES[field.kind] for field in schema.fields)
        self._time = names.index(schema.time_field)
        fields = schema.fields
        self._strings = operator.itemgetter(*(i for i, f in enumerate(fields) if f.kind == "string"))
        self._enums = [(i, frozenset(f.values)) for i, f in enumerate(fields) if f.kind == "string" and f.values]
        # Python integers are unbounded: the type's own range is checked too (integer_bounds has it).
        self._ints = [(i, *integer_bounds(f)) for i, f in enumerate(fields) if f.kind in INTEGER_KINDS]
        self._floats = [(i, f.lower, f.upper) for i, f in enumerate(fields) if f.kind == "float64"]

    def check(self, values: Sequence[bytes], processing_ms: int | None = None
              ) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
        """The valid events of ``values`` in order (as :func:`check_message` returns them) and
        ``(index, reason)`` of every rejected message. One processing time holds for the whole call."""
        contract, schema = self.contract, self.schema
        processing = processing_ms if processing_ms is not None else now_ms(contract)
        first, last = time_window(schema, contract, processing)
        max_bytes, names, quick = contract.max_message_bytes, self._names, self._quick
        events: list[dict[str, Any]] = []
        rejected: list[tuple[int, str]] = []
        for index, raw in enumerate(values):
            if len(raw) > max_bytes:
                rejected.append((index, REASON_OVERSIZE))
                continue
            try:
                record = _loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                rejected.append((index, REASON_NOT_JSON))
                continue
            if not isinstance(record, dict):
                rejected.append((index, REASON_NOT_AN_OBJECT))
                continue
            fields = quick(record, first, last)
            if fields is None:
                reason = check_record(record, schema, contract, processing)
                if reason is not None:
                    rejected.append((index, reason))
                    continue
                fields = self._values(record)
            events.append(dict(zip(names, fields)))
        return events, rejected

    def _quick(self, record: dict[str, Any], first: int, last: int) -> tuple[Any, ...] | None:
        """The record's fields in schema order if :func:`check_record` surely accepts it (the time in
        ``[first, last]``); ``None`` when it may not."""
        version = record.get("schema_version", 1)
        if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:
            return None
        try:
            fields = self._values(record)
        except KeyError:
            return None
        if tuple(map(type, fields)) != self._types:
            return None
        lengths = tuple(map(len, self._strings(fields)))
        if min(lengths) == 0 or max(lengths) > self.contract.max_string_len:
            return None
        for index, allowed in self._enums:
            if fields[index] not in allowed:
                return None
        for index, low, high in self._ints:
            if not low <= fields[index] <= high:
                return None
        for index, low, high in self._floats:
            if not (low <= fields[index] <= high and -math.inf < fields[index] < math.inf):
                return None
        if not first <= fields[self._time] <= last:
            return None
        return fields


_JSON_TYPES = {"string": str, "bool": bool, "int32": int, "int64": int, "float64": float}
_decode = json.JSONDecoder().decode


def _loads(raw: bytes) -> Any:
    """``json.loads(raw)``, skipping its encoding detection for a message that starts ``{`` and a
    non-NUL byte, which it would decode as UTF-8 (a fifth of the time of decoding a message)."""
    if raw[:1] == b"{" and raw[1:2] != b"\x00":
        return _decode(raw.decode("utf-8", "surrogatepass"))
    return json.loads(raw)


def check_messages(values: Sequence[bytes], schema: EventSchema, contract: ContractConfig,
                   processing_ms: int | None = None) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """:meth:`MessageValidator.check` once; a caller with many batches keeps a validator."""
    return MessageValidator(schema, contract).check(values, processing_ms)

# The Spark interpreter. pyspark is imported inside the functions: the Kafka ingest uses this module
# without Spark.
_SPARK_TYPE_NAMES = {"string": "string", "int64": "bigint", "int32": "int", "bool": "boolean",
                     "float64": "double"}


def spark_reason(input_schema: StructType, schema: EventSchema, contract: ContractConfig,
                 processing_ms: int | None = None) -> Column:
    """First failing reason of each row of a DataFrame with ``input_schema``; null for a valid event.

    The Spark interpreter of the rules :func:`check_record` applies, with the same reasons in the same
    order. A row at rest is read the way its JSON would be decoded: a null is an absent value, and a
    column whose Spark type is of another family than the field's (a string time, an integer bool, a
    fractional integer field) holds values of the wrong type. Integers of any width are integers, so
    a 64-bit ``int32`` field is range-checked rather than rejected; a ``float64`` field takes any
    numeric column. A field absent from the input makes every row ``missing:<field>``; extra columns
    are ignored.
    """
    from pyspark.sql import functions as F

    columns = {column.name: column.dataType for column in input_schema.fields}
    checks = []
    if "schema_version" in columns:
        checks.append(_spark_version_reason(columns["schema_version"]))
    for field in schema.fields:
        checks.append(_spark_field_reason(field, columns.get(field.name), contract))
    ts = spark_value(schema.field(schema.time_field), columns.get(schema.time_field))
    first, last = time_window(schema, contract, processing_ms)
    checks.append(F.when(ts < F.lit(first), F.lit(REASON_TS_BEFORE_EPOCH)))
    checks.append(F.when(ts > F.lit(last), F.lit(REASON_TS_IN_FUTURE)))
    return F.coalesce(*checks)


def spark_value(field: Field, data_type: DataType | None) -> Column:
    """The column of ``field`` as its schema type; null where it is absent or of another type family.

    Exact for every row :func:`spark_reason` accepts (their integers are in range), so the valid
    events of a DataFrame are ``select(spark_value(f, ...).alias(f.name) for f in schema.fields)``.
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
    if field.kind in INTEGER_KINDS:
        return isinstance(data_type, (T.ByteType, T.ShortType, T.IntegerType, T.LongType))
    return isinstance(data_type, T.NumericType)


def _spark_field_reason(field: Field, data_type: DataType | None, contract: ContractConfig) -> Column:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

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
        # A string has no more characters than UTF-8 bytes: the byte count, known without decoding,
        # settles almost every value, and only longer ones have their characters counted.
        limit = F.lit(contract.max_string_len)
        check = check.when((F.octet_length(value) > limit) & (F.length(value) > limit), reason(REASON_TOO_LONG))
        if field.values:
            check = check.when(~value.isin(*field.values), reason(REASON_NOT_ALLOWED))
    elif field.kind in INTEGER_KINDS:
        low, high = integer_bounds(field)
        if low > INT64_MAX or high < INT64_MIN:  # a declared range no 64-bit integer meets
            check = check.otherwise(reason(REASON_OUT_OF_RANGE))
        else:
            # A bound at the 64-bit limit holds for every value of an integer column.
            if low > INT64_MIN:
                check = check.when(value < F.lit(low), reason(REASON_OUT_OF_RANGE))
            if high < INT64_MAX:
                check = check.when(value > F.lit(high), reason(REASON_OUT_OF_RANGE))
    elif field.kind == "float64":
        number = value.cast("double")
        if isinstance(data_type, (T.FloatType, T.DoubleType)):
            infinite = (number == F.lit(math.inf)) | (number == F.lit(-math.inf))
            check = check.when(F.isnan(number) | infinite, reason(REASON_BAD_TYPE))
        if field.lower > -math.inf:
            check = check.when(number < F.lit(float(field.lower)), reason(REASON_OUT_OF_RANGE))
        if field.upper < math.inf:
            check = check.when(number > F.lit(float(field.upper)), reason(REASON_OUT_OF_RANGE))
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
