"""The event schema: one YAML file declares a log's raw fields and every feature, label and task
built from them (docs/your-logs.md; the shipped schemas are ``conf/schemas/*.yaml``).

A schema file is a typed structured config (:class:`SchemaConfig`), validated at load time with
errors naming the key, before any work starts. :class:`EventSchema` wraps a loaded one and derives
everything else from it: the raw contract (fields, types, validation rules; ``features.validation``
interprets them once per record and once per Spark column), the canonical event columns the jobs
work on, and the training-row layout (id, continuous, cyclical, action and label columns). No other
module names a raw field or a label.

Canonical events. After validation an event's three role fields are renamed ``event_id``,
``user_id`` and ``event_ts`` (converted to epoch milliseconds from the schema's time unit); every
other field keeps its name. The jobs, the incremental state and the serving path work on canonical
events, so a schema whose fields already have those names (``feed``) is processed exactly as named.

A rejected event is never dropped: it carries the first failing reason, one of :data:`REASONS`
(with the field name appended where the reason is about a field).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import zipfile
import zipimport
import dataclasses
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import pyarrow as pa
import yaml
from omegaconf import OmegaConf

from common.config import ConfigError, load_config, require, to_dict

SCHEMA_VERSION = 1
"""Version of the JSON event format; a message may carry ``schema_version`` (absent means 1)."""
SUPPORTED_SCHEMA_VERSIONS = (1,)
SCHEMAS_DIR = Path(__file__).resolve().parents[1] / "conf" / "schemas"
"""Where the shipped schemas live; ``spec.schema=NAME`` reads ``NAME.yaml`` from here."""
DEFAULT_SCHEMA = "feed"

Kind = Literal["string", "int64", "int32", "bool", "float64"]
KINDS: tuple[str, ...] = ("string", "int64", "int32", "bool", "float64")
NUMERIC_KINDS = ("int64", "int32", "float64")
INTEGER_KINDS = ("int64", "int32")
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
TIME_UNITS_MS = {"ms": 1, "s": 1000}
OFFSET_UNITS_S = {"s": 1, "min": 60}
TRANSFORM_OPS = ("clip", "divide", "log1p", "standardize")
DEFAULT_PERIODS = {"day": 86_400.0, "week": 604_800.0}

EVENT_ID, USER_ID, EVENT_TS = "event_id", "user_id", "event_ts"
"""Canonical names of the role fields (epoch milliseconds for ``event_ts``)."""

# Derived token columns that are not fields.
TS_COLUMN = "ts"
LOG_GAP_COLUMN = "log_gap"
LOG_ITEM_AGE_COLUMN = "log_item_age"
PREV_ACTIONS_KNOWN_COLUMN = "prev_actions_known"
LOSS_MASK_COLUMN = "loss_mask"
ROW_COLUMNS: tuple[str, ...] = ("user_key", "length")
PARTITION_COLUMN = "date"
RESERVED_COLUMNS = frozenset({TS_COLUMN, LOG_GAP_COLUMN, LOG_ITEM_AGE_COLUMN, PREV_ACTIONS_KNOWN_COLUMN,
                              LOSS_MASK_COLUMN, PARTITION_COLUMN, *ROW_COLUMNS, "schema_version",
                              "reason", "split", "window", "position"})
"""Names no field, categorical, numeric, action or label may take."""

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
REASON_NOT_ALLOWED = "not_allowed"
REASON_TS_BEFORE_EPOCH = "ts_before_epoch"
REASON_TS_IN_FUTURE = "ts_in_future"
REASONS: tuple[str, ...] = (
    REASON_NOT_JSON, REASON_NOT_AN_OBJECT, REASON_OVERSIZE, REASON_UNKNOWN_SCHEMA_VERSION,
    REASON_MISSING, REASON_BAD_TYPE, REASON_EMPTY, REASON_TOO_LONG, REASON_OUT_OF_RANGE,
    REASON_NOT_ALLOWED, REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE,
)


class SchemaError(ConfigError):
    """A schema file that cannot be used, or a dataset, checkpoint or export of another schema."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise SchemaError(f"config key '{key}': {message}")


# --- the schema file ----------------------------------------------------------------------------

@dataclass
class FieldConfig:
    """One raw field: its type and the rules a value must pass (else the event is dead-lettered)."""

    type: str = "string"
    """string | int64 | int32 | bool | float64."""
    min: Optional[float] = None
    """Smallest valid value (numeric fields); the type's own range applies too."""
    max: Optional[float] = None
    """Largest valid value (numeric fields)."""
    values: list[str] = dataclasses.field(default_factory=list)
    """The only valid values (string fields); empty = any non-empty string."""


@dataclass
class TimeConfig:
    field: str = ""
    """The int64 field holding the event time."""
    unit: str = "ms"
    """ms | s: the unit of epoch time the field counts in."""


@dataclass
class CategoricalConfig:
    """A string field turned into hashed ids ``1 + hash60(table, value) mod (buckets − 1)``."""

    buckets: int = 0
    """Rows of the field's table, padding id 0 included; 0 when the field shares ``table``."""
    table: str = ""
    """Another categorical whose table (hash space and rows) this field shares; "" = its own."""


@dataclass
class TransformConfig:
    """One step of a numeric value's transform chain, applied in float64 in the order listed."""

    op: str = ""
    """clip | divide | log1p | standardize."""
    min: Optional[float] = None
    """clip: lower bound (none = unbounded)."""
    max: Optional[float] = None
    """clip: upper bound (none = unbounded)."""
    by: Optional[float] = None
    """divide: the divisor."""
    mean: Optional[float] = None
    """standardize: fitted on the train split by the full feature job when left empty."""
    std: Optional[float] = None
    """standardize: as ``mean``."""


@dataclass
class ValueConfig:
    """A float token column computed from one numeric or bool field."""

    field: str = ""
    transforms: list[TransformConfig] = dataclasses.field(default_factory=list)


@dataclass
class UtcOffsetConfig:
    field: str = ""
    """An integer field: the event's offset from UTC (local time = UTC + offset); "" = none."""
    unit: str = "min"
    """s | min."""


@dataclass
class TimeFeaturesConfig:
    gap: bool = True
    """``log_gap = log1p(seconds since the user's previous event)``, 0 for the first."""
    item_age: str = ""
    """A categorical field: ``log_item_age = log1p(seconds since its value's first impression)``;
    "" = no such feature."""
    periods: dict[str, float] = dataclasses.field(default_factory=dict)
    """Cyclical features ``NAME_sin, NAME_cos = sin/cos(2π·T/period)``, period in seconds, T the
    event's epoch seconds (local when ``utc_offset`` is set). A file that leaves the key out gets
    :data:`DEFAULT_PERIODS`."""
    utc_offset: UtcOffsetConfig = dataclasses.field(default_factory=UtcOffsetConfig)


@dataclass
class KnownAfterConfig:
    """When an event's actions become known: ``event_ts + duration + delay_ms``."""

    duration: str = ""
    """An integer field of milliseconds (e.g. a dwell) after which the actions are final; "" = 0."""
    delay_ms: int = 0
    """Logging delay: from the end of the duration until the actions are readable at request time."""


@dataclass
class ActionsConfig:
    columns: dict[str, ValueConfig] = dataclasses.field(default_factory=dict)
    """Token columns of the event's outcome; the model sees token i's only as inputs of later tokens,
    and only once known."""
    known_after: KnownAfterConfig = dataclasses.field(default_factory=KnownAfterConfig)


@dataclass
class LabelConfig:
    """A 0/1 label: exactly one of ``field`` alone (a bool field), ``any_of``, ``all_of``,
    ``field`` + ``equals``, ``field`` + ``at_least`` (optionally ``by`` a field with
    ``thresholds`` per value)."""

    field: str = ""
    any_of: list[str] = dataclasses.field(default_factory=list)
    """Bool fields: 1 if any is true."""
    all_of: list[str] = dataclasses.field(default_factory=list)
    """Bool fields: 1 if all are true."""
    equals: Optional[str] = None
    """1 if ``field`` equals this value (compared as text for a string field, else as a number)."""
    at_least: Optional[float] = None
    """1 if the numeric ``field`` is ≥ this (or the threshold of the event's ``by`` value)."""
    by: str = ""
    """A string field whose value picks the threshold from ``thresholds``."""
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclass
class RotaryInputsConfig:
    periods: list[str] = dataclasses.field(default_factory=list)
    """Cyclical periods (of ``time_features.periods``) in SIREN-RoPE's x_i, after t̃."""
    categoricals: list[str] = dataclasses.field(default_factory=list)
    """Categoricals embedded into x_i with ``model.categorical_input``."""


@dataclass
class SchemaConfig:
    """A log's schema file (``conf/schemas/NAME.yaml``)."""

    name: str = ""
    fields: dict[str, FieldConfig] = dataclasses.field(default_factory=dict)
    """The raw fields in order; each event must hold them all."""
    event_id: str = ""
    """A string field unique per event (duplicates are dropped)."""
    user: str = ""
    """The string field whose timelines the rows are cut from."""
    time: TimeConfig = dataclasses.field(default_factory=TimeConfig)
    categoricals: dict[str, CategoricalConfig] = dataclasses.field(default_factory=dict)
    numerics: dict[str, ValueConfig] = dataclasses.field(default_factory=dict)
    """Continuous token inputs, known at the event's time (not outcomes)."""
    time_features: TimeFeaturesConfig = dataclasses.field(default_factory=TimeFeaturesConfig)
    actions: ActionsConfig = dataclasses.field(default_factory=ActionsConfig)
    labels: dict[str, LabelConfig] = dataclasses.field(default_factory=dict)
    tasks: dict[str, float] = dataclasses.field(default_factory=dict)
    """The labels trained on, with their loss weights (``model.task_weights`` may override)."""
    rotary: RotaryInputsConfig = dataclasses.field(default_factory=RotaryInputsConfig)


# --- loading --------------------------------------------------------------------------------------

def schema_path(name_or_path: str) -> Path:
    """``feed`` → ``conf/schemas/feed.yaml``; anything with a suffix or a slash is a path."""
    if "/" in name_or_path or name_or_path.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    return SCHEMAS_DIR / f"{name_or_path}.yaml"


def shipped_schemas() -> tuple[str, ...]:
    folder = _readable(SCHEMAS_DIR, directory=True)
    return tuple(sorted(path.name[:-len(".yaml")] for path in folder.iterdir()
                        if path.name.endswith(".yaml"))) if folder.is_dir() else ()


def _readable(path: Path, directory: bool = False) -> Path | zipfile.Path:
    """``path`` as something to read: itself, or where this module was imported from a zip (the
    Spark jobs' ``--py-files``, which carries ``conf/schemas/`` too), the same path inside it."""
    loader = globals().get("__loader__")
    if isinstance(loader, zipimport.zipimporter):
        archive = Path(loader.archive)
        if path.is_relative_to(archive):
            return zipfile.Path(archive, str(path.relative_to(archive)) + ("/" if directory else ""))
    return path


def load_schema(source: str | Mapping[str, Any] | "EventSchema" = DEFAULT_SCHEMA) -> "EventSchema":
    """A schema from a shipped name, a file path, or its recorded dict (a manifest's, an export's)."""
    if isinstance(source, EventSchema):
        return source
    if isinstance(source, str):
        path = schema_path(source)
        file = _readable(path)
        if not file.is_file():
            shipped = ", ".join(shipped_schemas())
            raise SchemaError(f"config key 'spec.schema': no schema file {path} (shipped: {shipped})")
        return EventSchema(_load(path, text=file.read_text(encoding="utf-8")))
    try:
        text = json.dumps(source)
    except TypeError:  # not a recorded dict (e.g. a live config): nothing to cache by
        return EventSchema(_load(None, dict(source)))
    return _recorded_schema(text)


@lru_cache(maxsize=32)
def _recorded_schema(text: str) -> "EventSchema":
    """A recorded schema by its JSON text (key order kept: order is layout). Cached because a
    structured config costs a third of a second to build and every manifest, spec and export read
    rebuilds one; an :class:`EventSchema` is never changed once built."""
    return EventSchema(_load(None, json.loads(text)))


def _load(path: Path | None, values: dict[str, Any] | None = None, text: str = "") -> SchemaConfig:
    try:
        if path is not None:
            try:
                values = OmegaConf.to_container(OmegaConf.load(io.StringIO(text)))
            except yaml.YAMLError as error:
                raise ConfigError(f"not valid YAML: {str(error).splitlines()[0]}") from None
            if not isinstance(values, dict):
                raise ConfigError(f"{path} does not hold a mapping of schema keys")
        values = dict(values)
        # A dict default would merge with the file's periods rather than give way to them.
        time_features = dict(values.get("time_features") or {})
        time_features.setdefault("periods", dict(DEFAULT_PERIODS))
        values["time_features"] = time_features
        return load_config(SchemaConfig, values=values)
    except ConfigError as error:
        raise SchemaError(f"schema {path or values.get('name', '')}: {error}") from None


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    min: float | None = None
    max: float | None = None
    values: tuple[str, ...] = ()

    @property
    def lower(self) -> float:
        """The smallest valid value: the declared minimum within the type's range."""
        low = {"int32": INT32_MIN, "int64": INT64_MIN}.get(self.kind, -math.inf)
        return low if self.min is None else max(low, self.min)

    @property
    def upper(self) -> float:
        high = {"int32": INT32_MAX, "int64": INT64_MAX}.get(self.kind, math.inf)
        return high if self.max is None else min(high, self.max)


class EventSchema:
    """A validated schema and everything derived from it. Equal schemas have equal :attr:`fingerprint`."""

    def __init__(self, config: SchemaConfig):
        self.config = config
        try:
            _validate(config)
        except SchemaError:
            raise
        except ConfigError as error:
            raise SchemaError(f"schema '{config.name}': {error}") from None

    # The raw contract.
    @cached_property
    def name(self) -> str:
        return self.config.name

    @cached_property
    def fields(self) -> tuple[Field, ...]:
        return tuple(Field(name, spec.type, spec.min, spec.max, tuple(spec.values))
                     for name, spec in self.config.fields.items())

    @cached_property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> Field:
        return self.fields[self.field_names.index(name)]

    @cached_property
    def time_field(self) -> str:
        return self.config.time.field

    @cached_property
    def time_unit_ms(self) -> int:
        """Milliseconds per unit of the time field."""
        return TIME_UNITS_MS[self.config.time.unit]

    @cached_property
    def raw_arrow_schema(self) -> pa.Schema:
        """Arrow schema of raw events at rest (Parquet), before the hive ``date`` partition column."""
        return pa.schema([pa.field(f.name, _ARROW_TYPES[f.kind]) for f in self.fields])

    # Canonical events.
    @cached_property
    def canonical_names(self) -> dict[str, str]:
        """Raw field name → canonical name (the role fields renamed, the rest unchanged)."""
        roles = {self.config.event_id: EVENT_ID, self.config.user: USER_ID, self.time_field: EVENT_TS}
        return {name: roles.get(name, name) for name in self.field_names}

    @cached_property
    def canonical_fields(self) -> tuple[Field, ...]:
        return tuple(Field(self.canonical_names[f.name], f.kind, f.min, f.max, f.values) for f in self.fields)

    @cached_property
    def canonical_field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.canonical_fields)

    def canonical_ddl(self) -> str:
        """Canonical events as a Spark DDL string (``event_id STRING, ...``)."""
        return ", ".join(f"{f.name} {_SPARK_DDL_TYPES[f.kind]}" for f in self.canonical_fields)

    def canonical(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """One valid raw record as a canonical event (``event_ts`` in epoch milliseconds)."""
        event = {self.canonical_names[name]: record[name] for name in self.field_names}
        event[EVENT_TS] = int(event[EVENT_TS]) * self.time_unit_ms
        return event

    def canonical_field(self, raw_name: str) -> str:
        return self.canonical_names[raw_name]

    @cached_property
    def dedup_order(self) -> tuple[str, ...]:
        """Canonical columns that order copies of one ``event_id``: the first by time, ties by the
        other fields in schema order (a total order on valid events)."""
        return (EVENT_TS,) + tuple(n for n in self.canonical_field_names if n not in (EVENT_ID, EVENT_TS))

    # Features.
    @cached_property
    def tables(self) -> dict[str, int]:
        """Embedding table → rows (the shared tables once, under the name of the owning categorical)."""
        return {name: c.buckets for name, c in self.config.categoricals.items() if not c.table}

    @cached_property
    def id_columns(self) -> tuple[str, ...]:
        return tuple(self.config.categoricals)

    @cached_property
    def column_tables(self) -> dict[str, str]:
        """Id column → the table it reads (and hashes by)."""
        return {name: c.table or name for name, c in self.config.categoricals.items()}

    @cached_property
    def item_age_field(self) -> str:
        """Canonical name of the categorical whose first impression ages a token ("" = none)."""
        return self.config.time_features.item_age

    @cached_property
    def continuous_columns(self) -> tuple[str, ...]:
        time = self.config.time_features
        return ((LOG_GAP_COLUMN,) if time.gap else ()) + ((LOG_ITEM_AGE_COLUMN,) if time.item_age else ()) \
            + tuple(self.config.numerics)

    @cached_property
    def periods(self) -> dict[str, float]:
        return dict(self.config.time_features.periods)

    @cached_property
    def cyclical_columns(self) -> tuple[str, ...]:
        return tuple(f"{name}_{part}" for name in self.periods for part in ("sin", "cos"))

    @cached_property
    def utc_offset_field(self) -> str:
        return self.config.time_features.utc_offset.field

    @cached_property
    def utc_offset_unit_s(self) -> int:
        return OFFSET_UNITS_S[self.config.time_features.utc_offset.unit]

    @cached_property
    def action_columns(self) -> tuple[str, ...]:
        return tuple(self.config.actions.columns)

    @cached_property
    def known_after_field(self) -> str:
        return self.config.actions.known_after.duration

    @cached_property
    def action_delay_ms(self) -> int:
        return self.config.actions.known_after.delay_ms

    @cached_property
    def label_columns(self) -> tuple[str, ...]:
        """The tasks, in the schema's order (one logit head and one label column each)."""
        return tuple(self.config.tasks)

    @cached_property
    def task_weights(self) -> dict[str, float]:
        return dict(self.config.tasks)

    @cached_property
    def rotary_cyclical_columns(self) -> tuple[str, ...]:
        """The cyclical columns of SIREN-RoPE's x_i, after t̃."""
        return tuple(f"{name}_{part}" for name in self.config.rotary.periods for part in ("sin", "cos"))

    @cached_property
    def rotary_categoricals(self) -> tuple[str, ...]:
        return tuple(self.config.rotary.categoricals)

    @cached_property
    def token_float_columns(self) -> tuple[str, ...]:
        """Every float32 per-token column, each once (an action and a label may be one column)."""
        return tuple(dict.fromkeys(
            self.continuous_columns + self.cyclical_columns + self.action_columns
            + (PREV_ACTIONS_KNOWN_COLUMN,) + self.label_columns + (LOSS_MASK_COLUMN,)))

    @cached_property
    def token_columns(self) -> tuple[str, ...]:
        return (TS_COLUMN,) + self.id_columns + self.token_float_columns

    @cached_property
    def training_columns(self) -> tuple[str, ...]:
        """The numeric columns a reader selects (no strings, no partition column)."""
        return ROW_COLUMNS + self.token_columns

    def standardize_steps(self) -> list[tuple[str, TransformConfig]]:
        """(numeric column, its standardize step) for every numeric that standardizes."""
        return [(name, step) for name, value in self.config.numerics.items()
                for step in value.transforms if step.op == "standardize"]

    @cached_property
    def needs_fit(self) -> bool:
        """Whether a standardize step still lacks its statistics (the full job fits them)."""
        return any(step.mean is None or step.std is None for _, step in self.standardize_steps())

    def fitted(self, statistics: Mapping[str, tuple[float, float]]) -> "EventSchema":
        """This schema with the standardize steps of ``statistics``'s columns set to (mean, std)."""
        values = self.to_dict()
        for name, (mean, std) in statistics.items():
            for step in values["numerics"][name]["transforms"]:
                if step["op"] == "standardize":
                    step["mean"], step["std"] = float(mean), float(std)
        return load_schema(values)

    # Records and comparison.
    def to_dict(self) -> dict[str, Any]:
        return to_dict(self.config)

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the schema's JSON (16 hex digits). Keys stay in their order: the order of the
        fields, tables and columns is part of the schema (the training columns follow it)."""
        text = json.dumps(self.to_dict(), separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def with_buckets(self, buckets: Mapping[str, int]) -> "EventSchema":
        """This schema with some tables resized (``spec.buckets``); unknown tables are errors."""
        if not buckets:
            return self
        values = self.to_dict()
        for table, rows in buckets.items():
            _require(table in self.tables, f"spec.buckets.{table}",
                    f"not a table of schema '{self.name}'; its tables are {', '.join(self.tables)}")
            values["categoricals"][table]["buckets"] = int(rows)
        return load_schema(values)


def schema_differences(expected: EventSchema | Mapping[str, Any], found: EventSchema | Mapping[str, Any],
                       ignore_fitted: bool = True) -> list[str]:
    """Where two schemas differ, as ``key: expected vs found`` lines (empty when they agree).

    ``ignore_fitted`` leaves out standardize statistics: a re-fit changes them without changing what
    a model's inputs mean."""
    def plain(schema: EventSchema | Mapping[str, Any]) -> dict[str, Any]:
        return schema.to_dict() if isinstance(schema, EventSchema) else load_schema(schema).to_dict()

    differences: list[str] = []

    def walk(a: Any, b: Any, key: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for name in list(a) + [name for name in b if name not in a]:
                if ignore_fitted and name in ("mean", "std"):
                    continue
                if name not in a or name not in b:
                    side = "missing in the second" if name not in b else "missing in the first"
                    differences.append(f"{key}{name}: {side}")
                else:
                    walk(a[name], b[name], f"{key}{name}.")
            shared = [name for name in a if name in b]
            # Order is layout: the fields', tables', columns' and tasks' order is the rows' and the model's.
            if shared != [name for name in b if name in a]:
                differences.append(f"{key.rstrip('.') or 'schema'}: order {', '.join(shared)} vs "
                                   f"{', '.join(name for name in b if name in a)}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for index, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{key}{index}.")
        elif a != b:
            differences.append(f"{key.rstrip('.')}: {a!r} vs {b!r}")

    walk(plain(expected), plain(found), "")
    return differences


def require_same_schema(expected: EventSchema | Mapping[str, Any], found: EventSchema | Mapping[str, Any],
                        what: str) -> None:
    """Raise :class:`SchemaError` naming the differences when ``found`` is not ``expected``'s schema."""
    differences = schema_differences(expected, found)
    if differences:
        shown = "; ".join(differences[:8]) + (f"; and {len(differences) - 8} more" if len(differences) > 8 else "")
        raise SchemaError(f"{what} has another event schema than expected: {shown}")


# --- validation of a schema file ------------------------------------------------------------------

def _validate(config: SchemaConfig) -> None:
    fields = config.fields
    require(bool(config.name.strip()), "name", "must not be empty")
    require(bool(fields), "fields", "must declare at least the event id, user and time fields")
    for name, spec in fields.items():
        key = f"fields.{name}"
        require(spec.type in KINDS, f"{key}.type", f"must be one of {', '.join(KINDS)}, got '{spec.type}'")
        if name not in (config.event_id, config.user, config.time.field):
            require(name not in RESERVED_COLUMNS, key, "is a reserved column name")
        if spec.type not in NUMERIC_KINDS:
            require(spec.min is None and spec.max is None, f"{key}.min", "only numeric fields have a range")
        if spec.min is not None and spec.max is not None:
            require(spec.min <= spec.max, f"{key}.max", "must be >= min")
        require(not spec.values or spec.type == "string", f"{key}.values", "only string fields list values")

    def field_of(key: str, name: str, kinds: tuple[str, ...], what: str) -> None:
        require(bool(name), key, f"must name {what}")
        require(name in fields, key, f"names no field: '{name}' (the fields are {', '.join(fields)})")
        require(fields[name].type in kinds, key,
                f"field '{name}' is {fields[name].type}; {what} must be {' or '.join(kinds)}")

    field_of("event_id", config.event_id, ("string",), "a string field")
    field_of("user", config.user, ("string",), "a string field")
    field_of("time.field", config.time.field, ("int64",), "an int64 field")
    require(len({config.event_id, config.user, config.time.field}) == 3, "user",
            "event_id, user and time.field must be three different fields")
    require(config.time.unit in TIME_UNITS_MS, "time.unit", f"must be one of {', '.join(TIME_UNITS_MS)}")
    for name in fields:
        if name not in (config.event_id, config.user, config.time.field):
            require(name not in (EVENT_ID, USER_ID, EVENT_TS), f"fields.{name}",
                    f"'{name}' is the canonical name of a role field; only the field in that role may take it")

    roles = (config.event_id, config.user, config.time.field)
    for name, categorical in config.categoricals.items():
        key = f"categoricals.{name}"
        field_of(key, name, ("string",), "a string field")
        require(name not in roles, key, "a role field cannot be a categorical")
        if categorical.table and categorical.table != name:
            owner = config.categoricals.get(categorical.table)
            require(owner is not None and not owner.table, f"{key}.table",
                    f"must name a categorical with its own table, got '{categorical.table}'")
            require(categorical.buckets == 0, f"{key}.buckets", "a field that shares a table takes its buckets")
        else:
            require(categorical.buckets >= 2, f"{key}.buckets", "must be >= 2 (id 0 is padding)")

    def value_of(key: str, value: ValueConfig) -> None:
        field_of(f"{key}.field", value.field, NUMERIC_KINDS + ("bool",), "a numeric or bool field")
        for index, step in enumerate(value.transforms):
            step_key = f"{key}.transforms.{index}"
            require(step.op in TRANSFORM_OPS, f"{step_key}.op",
                    f"must be one of {', '.join(TRANSFORM_OPS)}, got '{step.op}'")
            if step.op == "divide":
                require(step.by is not None and step.by != 0, f"{step_key}.by", "divide needs a non-zero 'by'")
            if step.op == "clip":
                require(step.min is not None or step.max is not None, f"{step_key}.min", "clip needs min or max")
            if step.op == "standardize":
                require(index == len(value.transforms) - 1, step_key, "standardize must be the last step")
                require((step.mean is None) == (step.std is None), f"{step_key}.std", "give both mean and std, or neither")
                require(step.std is None or step.std > 0, f"{step_key}.std", "must be > 0")
        _require_log1p_domain(key, value, fields[value.field])

    for name, value in config.numerics.items():
        value_of(f"numerics.{name}", value)
    time = config.time_features
    for name, period in time.periods.items():
        require(period > 0, f"time_features.periods.{name}", f"must be > 0 seconds, got {period}")
    if time.item_age:
        require(time.item_age in config.categoricals, "time_features.item_age",
                f"must name a categorical, got '{time.item_age}'")
    if time.utc_offset.field:
        field_of("time_features.utc_offset.field", time.utc_offset.field, INTEGER_KINDS, "an integer field")
        require(time.utc_offset.unit in OFFSET_UNITS_S, "time_features.utc_offset.unit",
                f"must be one of {', '.join(OFFSET_UNITS_S)}")

    for name, value in config.actions.columns.items():
        value_of(f"actions.columns.{name}", value)
        require(not any(step.op == "standardize" for step in value.transforms),
                f"actions.columns.{name}.transforms", "actions cannot standardize (fit only numerics)")
    known = config.actions.known_after
    if known.duration:
        field_of("actions.known_after.duration", known.duration, INTEGER_KINDS, "an integer field (milliseconds)")
    require(known.delay_ms >= 0, "actions.known_after.delay_ms", "must be >= 0")

    for name, label in config.labels.items():
        _validate_label(f"labels.{name}", label, field_of, fields)
    require(bool(config.tasks), "tasks", "must name at least one label to train on")
    for task, weight in config.tasks.items():
        require(task in config.labels, f"tasks.{task}",
                f"names no label (the labels are {', '.join(config.labels) or 'none'})")
        require(weight >= 0, f"tasks.{task}", "weights must be >= 0")
    require(sum(config.tasks.values()) > 0, "tasks", "weights must not all be 0")
    for name in config.labels:
        require(name in config.tasks, f"labels.{name}", "is not a task: add it to tasks or remove it")

    for period in config.rotary.periods:
        require(period in time.periods, "rotary.periods", f"'{period}' is not one of time_features.periods")
    for name in config.rotary.categoricals:
        require(name in config.categoricals, "rotary.categoricals", f"'{name}' is not a categorical")

    # One name per token column; a label may share its column with an identical action.
    owners: dict[str, str] = {}
    columns = ([(n, "categoricals") for n in config.categoricals]
               + [(n, "numerics") for n in config.numerics]
               + [(f"{p}_{part}", "time_features.periods") for p in time.periods for part in ("sin", "cos")]
               + [(n, "actions.columns") for n in config.actions.columns])
    for column, section in columns:
        require(column not in RESERVED_COLUMNS, f"{section}.{column}", "is a reserved column name")
        require(column not in owners, f"{section}.{column}", f"the column '{column}' is already a {owners.get(column)}")
        owners[column] = section
    for name, label in config.labels.items():
        require(name not in RESERVED_COLUMNS, f"labels.{name}", "is a reserved column name")
        if name in owners:
            action = config.actions.columns.get(name)
            same = (action is not None and not action.transforms and action.field == label.field
                    and _label_kind(label) == "field")
            require(same, f"labels.{name}",
                    f"the column '{name}' is already a {owners[name]} (only an action of the same bool "
                    "field may share a label's name)")


def _label_kind(label: LabelConfig) -> str:
    kinds = [kind for kind, given in (("any_of", bool(label.any_of)), ("all_of", bool(label.all_of)),
                                      ("equals", label.equals is not None),
                                      ("at_least", label.at_least is not None)) if given]
    return kinds[0] if len(kinds) == 1 else "field" if not kinds else "several"


def _validate_label(key: str, label: LabelConfig, field_of: Any, fields: Mapping[str, FieldConfig]) -> None:
    kind = _label_kind(label)
    require(kind != "several", key, "give exactly one of any_of, all_of, equals, at_least (or field alone)")
    if kind in ("any_of", "all_of"):
        require(not label.field, f"{key}.field", f"{kind} takes its fields in the list")
        for index, name in enumerate(getattr(label, kind)):
            field_of(f"{key}.{kind}.{index}", name, ("bool",), "a bool field")
    elif kind == "field":
        field_of(f"{key}.field", label.field, ("bool",), "a bool field (or add equals / at_least)")
    elif kind == "equals":
        field_of(f"{key}.field", label.field, KINDS, "a field")
        # Compared as the field's type (features.spec.label_values): the text must read as one.
        kind_of_field = fields[label.field].type
        if kind_of_field == "bool":
            require(label.equals.lower() in ("true", "false"), f"{key}.equals",
                    f"field '{label.field}' is bool: give true or false, got '{label.equals}'")
        elif kind_of_field in NUMERIC_KINDS:
            require(_is_number(label.equals), f"{key}.equals",
                    f"field '{label.field}' is {kind_of_field}: give a number, got '{label.equals}'")
    else:
        field_of(f"{key}.field", label.field, NUMERIC_KINDS, "a numeric field")
    if label.by or label.thresholds:
        require(kind == "at_least", f"{key}.by", "by and thresholds go with at_least")
        field_of(f"{key}.by", label.by, ("string",), "a string field")


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _require_log1p_domain(key: str, value: ValueConfig, field: FieldConfig) -> None:
    """Every ``log1p`` step must see values > −1, judged from the field's range through the steps
    before it: ``log1p`` is undefined below (Spark gives null where numpy gives nan, so the Spark
    and Python paths would part)."""
    if field.type == "bool":
        low, high = 0.0, 1.0
    else:
        bounds = Field("", field.type, field.min, field.max)
        low, high = float(bounds.lower), float(bounds.upper)
    for index, step in enumerate(value.transforms):
        if step.op == "clip":
            if step.min is not None:
                low, high = max(low, step.min), max(high, step.min)
            if step.max is not None:
                low, high = min(low, step.max), min(high, step.max)
        elif step.op == "divide":
            low, high = sorted((low / step.by, high / step.by))
        elif step.op == "log1p":
            require(low > -1, f"{key}.transforms.{index}",
                    f"log1p needs values > -1, but field '{value.field}' reaches {low:g} here: clip "
                    "first (clip min 0) or declare the field's min")
            low, high = math.log1p(low), math.log1p(high)


_ARROW_TYPES = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(), "bool": pa.bool_(),
                "float64": pa.float64()}
_SPARK_DDL_TYPES = {"string": "STRING", "int64": "BIGINT", "int32": "INT", "bool": "BOOLEAN",
                    "float64": "DOUBLE"}


@dataclass
class ContractConfig:
    """Limits an event must respect; shared by the Spark job and the Kafka ingest."""

    epoch_ms: int = 1_577_836_800_000
    """Earliest acceptable event time, epoch ms (default 2020-01-01T00:00:00Z)."""
    max_future_ms: int = 3_600_000
    """How far past the processing time an event time may lie (clock skew allowance)."""
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
