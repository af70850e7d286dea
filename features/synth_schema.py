"""Synthetic logs of any event schema but the feed: ``sirenfeed synth --out RAW_DIR schema=NAME``.

The feed schema has its own, richer world (:mod:`features.synth`); every other schema gets this
generic one, driven by the schema file alone and the ``schema_process`` keys of
:class:`features.synth.SynthConfig` (every name below in ``code`` is one). The output has the feed
world's layout: ``date=YYYY-MM-DD/part-NNNNN.parquet`` with the schema's ``raw_arrow_schema``, sorted
by (user, time) within a file; ``_truth/`` with ``event_id`` and ``p_<task>``, the probability each
task's label was drawn with, one row per distinct event id (its ``event_id`` column holds the values
of the schema's event id field); and the manifest. Chunks of users, random streams, the hidden
staging directory and byte-identical re-runs work as in the feed world.

*What cannot be generated* is refused before anything is written: :class:`SchemaWorld` raises
:class:`UnsupportedSchemaError` listing every field or label concerned and why (:func:`unsupported`):
an event id or user field that lists ``values`` (generated ids are unique names), a time field whose
range excludes the period, an integer field or UTC offset whose range holds no integer, listed
values longer than the contract's ``max_string_len``, a role or offset field used as an outcome, a
duration that cannot be positive, and labels that would be constant (an ``equals`` value the field
cannot take, an ``at_least`` threshold outside the field's range).

*Users and time.* A user has an activity ``r_u`` (sessions per day, log-normal with mean
``sessions_per_day`` and log-std ``activity_log_std``), a local peak hour ``h_u ~ N(peak_hour_mean,
peak_hour_std²)``, a UTC offset (a whole hour drawn uniformly within the offset field's range, UTC
without one), an engagement bias ``b_u ~ N(0, user_bias_std²)`` and a taste vector ``p_u ~
N(0, I)`` of ``affinity_dim`` dimensions. Sessions arrive as a Poisson process with intensity
``r_u · exp(κ(cos(2π(local hour − h_u)/24) − 1)) / (I0(κ)e^−κ)``, κ = ``daily_rhythm``; a session
has ``Geometric(1/events_per_session)`` events, ``event_gap_min_s + Exp(event_gap_mean_s)`` apart.
Times are written in the schema's unit (floored).

*Fields*, by role and type. The event id is ``{seed}-{user}-{k}`` (k: the event's index in its
user's sequence), the user ``u000123``. A string field draws from its ``values`` when it lists them,
else from a vocabulary ``{table}_{index}`` of ``vocabulary_share`` × its table's buckets (at most
``max_vocabulary``; two fields of one table share it) when it is a categorical, else of
``free_vocabulary`` names; values a label compares with (``equals``, ``thresholds``) are part of it.
Popularity is ``∝ rank^-zipf``. A numeric field is a monotone map of a latent normal ``z = m +
numeric_log_std · ε``: ``min + exp(z)`` with a ``min`` only, ``max − exp(−z)`` with a ``max`` only,
``min + (max − min)·σ(z)`` with both, ``numeric_median · z`` with neither, floored for integer types
(``min + ⌊(max − min + 1)σ(z)⌋`` with both) and clipped to the type. A bool is true with
``bool_rate`` unless it is an outcome.

*Outcomes* are the fields labels, actions and ``actions.known_after.duration`` read; everything else
is known at the event's time and drawn first. They depend on the engagement logit

    η = b_u + Σ_c [quality_c(v) + affinity_std/√C · p_u·f_c(v)/√d]
        + tod_logit · cos(2π(local hour − peak(v_r))/24) + input_logit · Σ_inputs ε,

over the C categoricals c of the event with values v (quality ~ N(0, value_quality_std²/C), value
factors f_c(v) ~ N(0, I)), the peak hour of the value v_r of one rhythm field (the first categorical
that lists ``values``, else the one with the smallest vocabulary) and the latent noise of each
numeric input. A bool outcome is true with ``σ(logit(bool_rate) + η)``. A numeric outcome has ``m =
m₀ + outcome_slope · η``; ``m₀`` puts ``P(label) = label_rate`` at η = 0 for the first label that reads
it: ``at_least`` (with the event's threshold of its ``by`` value) sets the scale, a numeric ``equals``
makes it the value with probability ``σ(logit(label_rate) + η)`` and a draw otherwise; a field no
label reads has its median ``numeric_median`` (``duration_median_ms`` for the duration) from its
bound. Given η the outcomes are independent, so each task's probability is exact (``any_of`` =
1 − Π(1 − p), up to the clip to the type's range); a label comparing a string field is 0 or 1.

*Dirty data*, as in the feed world: each event is corrupted with probability ``bad_fraction`` into
one of the kinds of :attr:`SchemaWorld.bad_event_reasons` (those the schema has of: an empty user, a
null string, an over-long free string, a value outside ``values``, a number outside its declared
range, a null bool, a time a century ahead, a time before the contract's epoch), and each clean event
is emitted twice with probability ``duplicate_fraction``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common.config import ConfigError, require
from features.schema import (
    INTEGER_KINDS, NUMERIC_KINDS, REASON_EMPTY, REASON_MISSING, REASON_NOT_ALLOWED, REASON_OUT_OF_RANGE,
    REASON_TOO_LONG, REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE, ContractConfig, EventSchema, Field,
    LabelConfig,
)
from features.spec import SECONDS_PER_DAY, threshold
from features.synth_common import (
    FUTURE_SHIFT_MS, MS_PER_DAY, PRE_EPOCH_SPREAD_MS, ChunkTables, hour_of_day, normal_tail,
    segment_positions, sigmoid,
)

log = logging.getLogger(__name__)

Z_LIMIT = 40.0
"""Latent values are clipped to ±Z_LIMIT, so ``exp(z)`` stays far inside every type's range."""
DEFAULT_OFFSET_HOURS = (-12, 14)
"""The UTC offsets a field without a declared range takes, in whole hours."""


@dataclass
class SchemaProcess:
    """Parameters of the generic world (``schema_process`` of :class:`features.synth.SynthConfig`);
    the module docstring gives each one's role."""

    sessions_per_day: float = 2.0
    activity_log_std: float = 0.8
    peak_hour_mean: float = 20.0
    """Local hour at which users are most active (mean over users)."""
    peak_hour_std: float = 3.0
    daily_rhythm: float = 1.5
    events_per_session: float = 8.0
    event_gap_min_s: float = 2.0
    event_gap_mean_s: float = 20.0
    vocabulary_share: float = 0.1
    """A categorical without ``values`` draws from this share of its table's buckets ..."""
    max_vocabulary: int = 20_000
    """... but from at most this many values."""
    free_vocabulary: int = 100
    """Values of a string field that is neither a role, nor categorical, nor lists ``values``."""
    zipf: float = 1.0
    """Popularity of a field's values ``∝ rank^-zipf``."""
    bool_rate: float = 0.1
    """P(true) of a bool field at η = 0."""
    label_rate: float = 0.3
    """P(label) at η = 0 of an ``at_least`` or numeric ``equals`` label."""
    numeric_median: float = 10.0
    """Median distance from its bound of a numeric field no label sets the scale of."""
    duration_median_ms: float = 10_000.0
    """Likewise for the duration field of ``actions.known_after``."""
    numeric_log_std: float = 1.0
    """Spread of every numeric field on its latent (log or logit) scale."""
    outcome_slope: float = 1.0
    """How far a numeric outcome's latent value moves per unit of η."""
    user_bias_std: float = 0.5
    value_quality_std: float = 0.5
    """Std of the sum over the categoricals of their values' quality terms of η."""
    affinity_std: float = 0.8
    """Std of the sum over the categoricals of the user × value affinity terms of η."""
    affinity_dim: int = 4
    tod_logit: float = 0.8
    """Amplitude of the local hour-of-day × value effect on η."""
    input_logit: float = 0.3
    """Effect on η of each numeric input, per standard deviation of its latent value."""

    def __post_init__(self) -> None:
        for name in ("sessions_per_day", "daily_rhythm", "events_per_session", "vocabulary_share",
                     "numeric_median", "duration_median_ms", "numeric_log_std"):
            require(getattr(self, name) > 0, f"schema_process.{name}", "must be > 0")
        require(self.events_per_session >= 1, "schema_process.events_per_session", "must be >= 1")
        for name in ("max_vocabulary", "free_vocabulary"):
            require(getattr(self, name) >= 2, f"schema_process.{name}", "must be >= 2")
        require(self.affinity_dim >= 1, "schema_process.affinity_dim", "must be >= 1")
        for name in ("activity_log_std", "peak_hour_std", "event_gap_min_s", "event_gap_mean_s", "zipf",
                     "outcome_slope", "user_bias_std", "value_quality_std", "affinity_std",
                     "tod_logit", "input_logit"):
            require(getattr(self, name) >= 0, f"schema_process.{name}", "must be >= 0")
        for name in ("bool_rate", "label_rate"):
            require(0 < getattr(self, name) < 1, f"schema_process.{name}", "must be in (0, 1)")


@dataclass(frozen=True)
class SynthRun:
    """What else of :class:`features.synth.SynthConfig` the generic world reads."""

    users: int
    days: int
    start_ms: int
    seed: int
    bad_fraction: float
    duplicate_fraction: float

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * MS_PER_DAY


class UnsupportedSchemaError(ConfigError):
    """A schema declares what the generic world cannot produce (the message lists it all)."""


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


# ---------------------------------------------------------------------------------------------
# Numeric fields: a monotone map of a latent normal


@dataclass(frozen=True)
class Scale:
    """``value(z)``, increasing in z, of a numeric field from its declared bounds (module docstring,
    *Fields*); integer fields have their bounds rounded inwards."""

    field: Field
    low: float | None
    high: float | None
    unit: float
    """``numeric_median``: the spread of a field with neither bound."""

    @classmethod
    def of(cls, field: Field, unit: float) -> Scale:
        low, high = field.min, field.max
        if field.kind in INTEGER_KINDS:
            low = None if low is None else float(math.ceil(low))
            high = None if high is None else float(math.floor(high))
        return cls(field, low, high, unit)

    @property
    def integer(self) -> bool:
        return self.field.kind in INTEGER_KINDS

    def median_z(self, median: float) -> float:
        """The latent value whose value lies ``median`` from the field's bound (mid-range with two)."""
        if self.low is not None and self.high is not None:
            return 0.0
        if self.low is not None:
            return math.log(median)
        return -math.log(median) if self.high is not None else 0.0

    def value(self, z: np.ndarray) -> np.ndarray:
        z = np.clip(z, -Z_LIMIT, Z_LIMIT)
        low, high = self.low, self.high
        if low is not None and high is not None:
            if self.integer:
                count = high - low + 1
                x = low + np.minimum(np.floor(count * sigmoid(z)), count - 1)
            else:
                x = low + (high - low) * sigmoid(z)
        elif low is not None:
            x = low + (np.floor(np.exp(z)) if self.integer else np.exp(z))
        elif high is not None:
            x = high - (np.floor(np.exp(-z)) if self.integer else np.exp(-z))
        else:
            x = np.floor(self.unit * z) if self.integer else self.unit * z
        return np.clip(x, self.field.lower, self.field.upper)

    def z_at_least(self, t: float) -> float:
        """The smallest latent value whose value is ≥ ``t`` (−inf: always, +inf: never)."""
        low, high = self.low, self.high
        if self.integer:
            t = float(math.ceil(t))
        if t > self.field.upper or t <= self.field.lower:  # the clip to the type's range decides
            return math.inf if t > self.field.upper else -math.inf
        if low is not None and high is not None:
            count = high - low + (1 if self.integer else 0)
            share = (t - low) / count
            return -math.inf if share <= 0 else math.inf if share >= 1 else _logit(share)
        if low is not None:
            return -math.inf if t <= low else math.log(t - low)
        if high is not None:
            # Integer: high − ⌊e^−z⌋ ≥ t ⟺ e^−z < high − t + 1.
            room = high - t + (1 if self.integer else 0)
            return math.inf if room <= 0 else -math.log(room)
        return t / self.unit

    def can_reach(self, t: float) -> bool:
        """Whether the label ``value ≥ t`` can be both 0 and 1."""
        return math.isfinite(self.z_at_least(t))

    def can_equal(self, v: float) -> bool:
        inside = self.field.lower <= v <= self.field.upper and (self.low is None or v >= self.low) \
            and (self.high is None or v <= self.high)
        return inside and (not self.integer or v == math.floor(v))


# ---------------------------------------------------------------------------------------------
# What a schema asks for


def _label_fields(label: LabelConfig) -> list[str]:
    return list(label.any_of) + list(label.all_of) + ([label.field] if label.field else [])


def outcome_fields(schema: EventSchema) -> list[str]:
    """Fields drawn given η: what labels (but string comparisons), actions and the duration read."""
    config = schema.config
    names = [name for label in config.labels.values() for name in _label_fields(label)]
    names += [value.field for value in config.actions.columns.values()]
    names += [config.actions.known_after.duration] if config.actions.known_after.duration else []
    return [name for name in dict.fromkeys(names) if schema.field(name).kind != "string"]


def _primary_labels(schema: EventSchema) -> dict[str, LabelConfig]:
    """Numeric field → the first label that reads it (it sets the field's scale)."""
    primary: dict[str, LabelConfig] = {}
    for label in schema.config.labels.values():
        if label.field and schema.field(label.field).kind in NUMERIC_KINDS:
            primary.setdefault(label.field, label)
    return primary


def required_values(schema: EventSchema) -> dict[str, list[str]]:
    """String field → the values labels compare with, which its vocabulary must hold."""
    wanted: dict[str, list[str]] = {}
    for label in schema.config.labels.values():
        if label.equals is not None and schema.field(label.field).kind == "string":
            wanted.setdefault(label.field, []).append(label.equals)
        if label.by:
            wanted.setdefault(label.by, []).extend(label.thresholds)
    return {name: list(dict.fromkeys(values)) for name, values in wanted.items()}


def field_scale(schema: EventSchema, field: Field, process: SchemaProcess) -> Scale:
    """The field's :class:`Scale`; the duration of ``actions.known_after`` is kept >= 0."""
    scale = Scale.of(field, process.numeric_median)
    if field.name == schema.known_after_field and (scale.low is None or scale.low < 0):
        scale = Scale(field, 0.0, scale.high, scale.unit)
    return scale


def unsupported(schema: EventSchema, process: SchemaProcess, start_ms: int, end_ms: int,
                contract: ContractConfig) -> list[str]:
    """Every field and label of ``schema`` this world cannot produce, each with why."""
    config = schema.config
    problems: list[str] = []
    for name in (config.event_id, config.user):
        if schema.field(name).values:
            problems.append(f"fields.{name}: {'a user' if name == config.user else 'an event id'} field "
                            "cannot list values (generated ids are unique names)")
    time_field = schema.field(schema.time_field)
    unit = schema.time_unit_ms
    if time_field.lower * unit > start_ms or time_field.upper * unit < end_ms - 1:
        problems.append(f"fields.{time_field.name}: its range [{time_field.min}, {time_field.max}] "
                        f"excludes the generated period {start_ms // unit}..{(end_ms - 1) // unit}")
    for field in schema.fields:
        scale = field_scale(schema, field, process)
        if scale.integer and scale.low is not None and scale.high is not None and scale.low > scale.high:
            problems.append(f"fields.{field.name}: its range [{field.min}, {field.max}] holds no integer")
        long_values = [value for value in field.values if len(value) > contract.max_string_len]
        if long_values:
            problems.append(f"fields.{field.name}: values longer than contract.max_string_len="
                            f"{contract.max_string_len} would be dead-lettered: {long_values[0][:40]}...")
    special = {config.event_id, config.user, schema.time_field, schema.utc_offset_field} - {""}
    for name in outcome_fields(schema):
        if name in special:
            problems.append(f"fields.{name}: a role or UTC offset field cannot be an outcome (read by a "
                            "label or an action), it is drawn before them")
    duration = config.actions.known_after.duration
    if duration and schema.field(duration).upper < 1:
        problems.append(f"fields.{duration}: the duration of actions.known_after cannot be positive "
                        f"(max {schema.field(duration).max})")
    for name, label in config.labels.items():
        problems += _label_problems(schema, f"labels.{name}", label, process)
    return problems


def _label_problems(schema: EventSchema, key: str, label: LabelConfig, process: SchemaProcess) -> list[str]:
    if label.equals is not None:
        field = schema.field(label.field)
        if field.kind == "string":
            if field.values and label.equals not in field.values:
                return [f"{key}: '{label.equals}' is not one of {field.name}'s values: always 0"]
        elif field.kind == "bool":
            if label.equals.lower() not in ("true", "false"):
                return [f"{key}: a bool field equals 'true' or 'false', not '{label.equals}'"]
        else:
            try:
                value = float(label.equals)
            except ValueError:
                return [f"{key}: '{label.equals}' is not a number, which {field.name} holds: always 0"]
            if not field_scale(schema, field, process).can_equal(value):
                return [f"{key}: {field.name} cannot take the value {label.equals}: always 0"]
    if label.at_least is not None:
        scale = field_scale(schema, schema.field(label.field), process)
        thresholds = {"at_least": label.at_least,
                      **{f"thresholds.{name}": value for name, value in label.thresholds.items()}}
        constant = [f"{name} {value}" for name, value in thresholds.items() if not scale.can_reach(value)]
        if constant:
            return [f"{key}: {label.field} (range [{scale.low}, {scale.high}]) makes the label constant at "
                    + ", ".join(constant)]
    return []


# ---------------------------------------------------------------------------------------------
# The world: vocabularies and value effects, shared by every chunk


@dataclass
class Vocabulary:
    names: pa.Array
    cdf: np.ndarray
    """Cumulative popularity ``∝ rank^-zipf``."""
    quality: np.ndarray
    factors: np.ndarray
    """``values × affinity_dim`` value factors f(v)."""

    def __len__(self) -> int:
        return len(self.names)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return np.minimum(np.searchsorted(self.cdf, rng.random(n), side="right"), len(self) - 1)


@dataclass
class Fault:
    """One kind of injected bad event: which field it breaks and the reason validation gives."""

    kind: str
    field: str
    reason: str


class SchemaWorld:
    """The generic world of one schema; :meth:`simulate_chunk` draws a chunk of users."""

    def __init__(self, schema: EventSchema, process: SchemaProcess, run: SynthRun,
                 rng: np.random.Generator) -> None:
        """Draws the shared parts from ``rng`` (the catalogue stream of the feed world)."""
        self.schema, self.process, self.run = schema, process, run
        self.contract = ContractConfig()
        problems = unsupported(schema, process, run.start_ms, run.end_ms, self.contract)
        if problems:
            raise UnsupportedSchemaError(f"schema '{schema.name}' cannot be generated "
                                         "(features/synth_schema.py):\n  " + "\n  ".join(problems))
        schema_config = schema.config
        self.roles = (schema_config.event_id, schema_config.user, schema.time_field)
        self.outcomes = outcome_fields(schema)
        self.primary = _primary_labels(schema)
        self.scales = {f.name: field_scale(schema, f, process) for f in schema.fields
                       if f.kind in NUMERIC_KINDS}
        self.inputs = [f.name for f in schema.fields if f.kind in NUMERIC_KINDS
                       and f.name not in self.outcomes and f.name not in self.roles
                       and f.name != schema.utc_offset_field]
        self.vocabulary_of = {f.name: self._vocabulary_key(f) for f in schema.fields
                              if f.kind == "string" and f.name not in self.roles}
        """String field (not a role) → the key of its vocabulary in :attr:`vocabularies`."""
        wanted: dict[str, list[str]] = {}
        for name, values in required_values(schema).items():
            wanted.setdefault(self.vocabulary_of[name], []).extend(values)
        self.vocabularies: dict[str, Vocabulary] = {}
        for name, key in self.vocabulary_of.items():
            if key not in self.vocabularies:
                field = schema.field(name)
                self.vocabularies[key] = self._vocabulary(key, field, wanted.get(key, []), rng)
        self.categoricals = list(schema_config.categoricals)
        by_size = sorted(self.categoricals,
                         key=lambda name: len(self.vocabularies[self.vocabulary_of[name]]))
        listed = [name for name in self.categoricals if schema.field(name).values]
        self.rhythm_field = (listed or by_size or [""])[0]
        peaks = len(self.vocabularies[self.vocabulary_of[self.rhythm_field]]) if self.rhythm_field else 1
        self.value_peak_hour = rng.uniform(0.0, 24.0, peaks)
        self.faults = self._faults()
        log.info("generic world of schema %s: %s", schema.name, ", ".join(
            f"{key} {len(vocabulary)} values" for key, vocabulary in self.vocabularies.items()))

    @property
    def bad_event_reasons(self) -> dict[str, str]:
        """Injected fault kind → the reason :func:`features.validation.check_record` gives for it."""
        return {fault.kind: fault.reason for fault in self.faults}

    # -- the shared parts --------------------------------------------------------------------

    def _vocabulary_key(self, field: Field) -> str:
        categorical = self.schema.config.categoricals.get(field.name)
        if field.values or categorical is None:
            return field.name
        return categorical.table or field.name

    def _vocabulary(self, key: str, field: Field, wanted: list[str], rng: np.random.Generator) -> Vocabulary:
        """The values of ``key`` (``field`` is its first field), the ones labels compare with first."""
        process = self.process
        if field.values:
            names = list(field.values)
        else:
            size = process.free_vocabulary
            if key in self.schema.tables:
                share = round(self.schema.tables[key] * process.vocabulary_share)
                size = int(min(process.max_vocabulary, max(2, share)))
            width = len(str(size - 1))
            names = list(dict.fromkeys(wanted + [f"{key}_{i:0{width}d}" for i in range(size)]))
        popularity = np.arange(1, len(names) + 1, dtype=np.float64) ** -process.zipf
        cdf = np.cumsum(popularity / popularity.sum())
        cdf[-1] = 1.0
        spread = 1.0 / math.sqrt(max(1, len(self.schema.config.categoricals)))
        quality = rng.normal(0.0, process.value_quality_std * spread, len(names))
        factors = rng.standard_normal((len(names), process.affinity_dim))
        return Vocabulary(pa.array(names, pa.string()), cdf, quality, factors)

    def _faults(self) -> list[Fault]:
        """One fault per kind the schema has a field for (module docstring, *Dirty data*)."""
        schema, contract = self.schema, self.contract
        user, time_field = schema.config.user, schema.time_field
        others = [f for f in schema.fields if f.name not in self.roles]
        faults = [Fault(f"empty_{user}", user, f"{REASON_EMPTY}:{user}")]
        strings = [f.name for f in others if f.kind == "string"]
        candidates = [  # (kind, reason, the fields it applies to: the first one gets it)
            ("null", REASON_MISSING, strings),
            ("long", REASON_TOO_LONG, [f.name for f in others if f.kind == "string" and not f.values]),
            ("not_allowed", REASON_NOT_ALLOWED, [f.name for f in others if f.values]),
            ("out_of_range", REASON_OUT_OF_RANGE, [f.name for f in others if f.kind in NUMERIC_KINDS
                                                   and self._out_of_range_value(f) is not None]),
            ("null", REASON_MISSING, [f.name for f in others if f.kind == "bool"]),
        ]
        faults += [Fault(f"{kind}_{names[0]}", names[0], f"{reason}:{names[0]}")
                   for kind, reason, names in candidates if names]
        faults.append(Fault(f"future_{time_field}", time_field, REASON_TS_IN_FUTURE))
        if (contract.epoch_ms - 1) // schema.time_unit_ms >= schema.field(time_field).lower:
            faults.append(Fault(f"pre_epoch_{time_field}", time_field, REASON_TS_BEFORE_EPOCH))
        return faults

    def _out_of_range_value(self, field: Field) -> float | None:
        """A value of the field's type outside its declared range (``None``: the type is the range)."""
        step = 1.0
        if field.min is not None and field.lower - step >= Field(field.name, field.kind).lower:
            return math.ceil(field.lower) - step if field.kind in INTEGER_KINDS else field.lower - step
        if field.max is not None and field.upper + step <= Field(field.name, field.kind).upper:
            return math.floor(field.upper) + step if field.kind in INTEGER_KINDS else field.upper + step
        return None

    # -- one chunk ---------------------------------------------------------------------------

    def simulate_chunk(self, first_user: int, n_users: int, rng: np.random.Generator) -> ChunkTables:
        schema, process = self.schema, self.process
        users = _Users.draw(n_users, schema, process, rng)
        user, ts_ms = self._events(users, rng)
        n = len(user)
        counts = np.bincount(user, minlength=n_users)
        position = segment_positions(counts)
        local_ms = ts_ms + users.offset_s[user] * 1000

        # Field → per-event value (vocabulary indices for strings); first what is known at event time.
        values: dict[str, np.ndarray] = {name: self.vocabularies[key].draw(n, rng)
                                         for name, key in self.vocabulary_of.items()}
        eta = users.bias[user].copy()
        spread = process.affinity_std / math.sqrt(max(1, len(self.categoricals)) * process.affinity_dim)
        for name in self.categoricals:
            vocabulary, index = self.vocabularies[self.vocabulary_of[name]], values[name]
            eta += vocabulary.quality[index] + spread * np.einsum(
                "ij,ij->i", users.taste[user], vocabulary.factors[index])
        peak = self.value_peak_hour[values[self.rhythm_field] if self.rhythm_field else 0]
        eta += process.tod_logit * np.cos(2.0 * np.pi * (hour_of_day(local_ms) - peak) / 24.0)
        for name in self.inputs:
            noise = rng.standard_normal(n)
            scale = self.scales[name]
            values[name] = scale.value(scale.median_z(process.numeric_median)
                                       + process.numeric_log_std * noise)
            eta += process.input_logit * noise
        for field in schema.fields:
            if field.kind == "bool" and field.name not in self.outcomes:
                values[field.name] = rng.random(n) < process.bool_rate
        if schema.utc_offset_field:
            values[schema.utc_offset_field] = users.offset_units[user]

        # Then the outcomes, given η. ``probability``: bool outcome → P(true), numeric outcome → its
        # latent mean m; ``hits``: numeric outcome of an ``equals`` label → P(it is the label's value).
        probability: dict[str, np.ndarray] = {}
        hits: dict[str, np.ndarray] = {}
        for name in self.outcomes:
            field = schema.field(name)
            if field.kind == "bool":
                probability[name] = sigmoid(_logit(process.bool_rate) + eta)
                values[name] = rng.random(n) < probability[name]
            else:
                values[name], probability[name], hit = self._numeric_outcome(name, eta, values, rng)
                if hit is not None:
                    hits[name] = hit
        labels = schema.config.labels
        truth = {f"p_{task}": self._label_probability(labels[task], values, probability, hits)
                 for task in schema.label_columns}
        return self._tables(first_user, n_users, user, ts_ms, position, counts, values, truth, rng)

    def _events(self, users: _Users, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Every event's user and time (epoch ms), sorted by (user, time)."""
        process, days, start_ms = self.process, self.run.days, self.run.start_ms
        kappa = process.daily_rhythm
        daily_norm = np.i0(kappa) * np.exp(-kappa)  # mean of exp(κ(cos − 1)) over a day
        peak_rate = users.rate / daily_norm
        candidates = rng.poisson(peak_rate * days)
        session_user = np.repeat(np.arange(len(candidates)), candidates)
        t_s = rng.uniform(0.0, days * SECONDS_PER_DAY, len(session_user))
        local_ms = start_ms + (t_s * 1000.0).astype(np.int64) + users.offset_s[session_user] * 1000
        phase = 2.0 * np.pi * (hour_of_day(local_ms) - users.peak_hour[session_user]) / 24.0
        keep = rng.random(len(session_user)) < np.exp(kappa * (np.cos(phase) - 1.0))
        session_user, session_t = session_user[keep], t_s[keep]

        length = rng.geometric(1.0 / process.events_per_session, len(session_user))
        user = np.repeat(session_user, length)
        gaps = process.event_gap_min_s + rng.exponential(process.event_gap_mean_s, len(user))
        first = np.cumsum(length) - length
        gaps[first] = 0.0  # the first event opens the session
        offset = np.cumsum(gaps)
        offset -= np.repeat(offset[first], length)
        t_s = np.repeat(session_t, length) + offset
        inside = t_s < days * SECONDS_PER_DAY
        user, ts_ms = user[inside], start_ms + (t_s[inside] * 1000.0).astype(np.int64)
        order = np.lexsort((ts_ms, user))  # sessions of one user may overlap
        return user[order], ts_ms[order]

    def _numeric_outcome(self, name: str, eta: np.ndarray, values: dict[str, np.ndarray],
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(values, latent mean m, P(equals value) or None)`` of a numeric outcome field."""
        process, scale = self.process, self.scales[name]
        label = self.primary.get(name)
        n = len(eta)
        hit = None
        if label is not None and label.at_least is not None:
            z_rate = NormalDist().inv_cdf(1.0 - process.label_rate)
            if label.by:
                names = self.vocabularies[self.vocabulary_of[label.by]].names.to_pylist()
                z_by = np.array([scale.z_at_least(threshold(label, value)) for value in names])
                base = z_by[values[label.by]] - process.numeric_log_std * z_rate
            else:
                base = np.full(n, scale.z_at_least(label.at_least) - process.numeric_log_std * z_rate)
        else:
            median = (process.duration_median_ms if name == self.schema.known_after_field
                      else process.numeric_median)
            base = np.full(n, scale.median_z(median))
        mean = base + process.outcome_slope * eta
        drawn = scale.value(mean + process.numeric_log_std * rng.standard_normal(n))
        if label is not None and label.equals is not None:
            hit = sigmoid(_logit(process.label_rate) + eta)
            drawn = np.where(rng.random(n) < hit, float(label.equals), drawn)
        return drawn, mean, hit

    def _p_at_least(self, name: str, t: np.ndarray, mean: np.ndarray, hit: np.ndarray | None) -> np.ndarray:
        scale = self.scales[name]
        distinct, inverse = np.unique(t, return_inverse=True)  # thresholds take a few values
        z = np.array([scale.z_at_least(value) for value in distinct.tolist()], np.float64)[inverse]
        p = normal_tail((z - mean) / self.process.numeric_log_std)
        if hit is not None:
            value = float(self.primary[name].equals)
            p = hit * (value >= t) + (1.0 - hit) * p
        return p

    def _label_probability(self, label: LabelConfig, values: dict[str, np.ndarray],
                           probability: dict[str, np.ndarray], hits: dict[str, np.ndarray]) -> np.ndarray:
        """P(label = 1) per event given what was drawn before the outcomes."""
        if label.any_of:
            return 1.0 - np.prod([1.0 - probability[name] for name in dict.fromkeys(label.any_of)], axis=0)
        if label.all_of:
            return np.prod([probability[name] for name in dict.fromkeys(label.all_of)], axis=0)
        field = self.schema.field(label.field)
        if field.kind == "string":
            vocabulary = self.vocabularies[self.vocabulary_of[field.name]]
            names = np.array(vocabulary.names.to_pylist(), dtype=object)
            return (names[values[field.name]] == label.equals).astype(np.float64)
        if field.kind == "bool":
            p = probability[field.name]
            return 1.0 - p if label.equals is not None and label.equals.lower() == "false" else p
        mean, hit = probability[field.name], hits.get(field.name)
        if label.at_least is not None:
            if label.by:
                names = self.vocabularies[self.vocabulary_of[label.by]].names.to_pylist()
                t = np.array([threshold(label, value) for value in names])[values[label.by]]
            else:
                t = np.full(len(mean), float(label.at_least))
            return self._p_at_least(field.name, t, mean, hit)
        value = float(label.equals)
        p = np.zeros(len(mean))
        if field.kind in INTEGER_KINDS:  # the draw's own mass at the value
            p = (self._p_at_least(field.name, np.full(len(mean), value), mean, None)
                 - self._p_at_least(field.name, np.full(len(mean), value + 1), mean, None))
        if hit is not None:  # the field is the primary label's value with probability hit
            p = hit * (value == float(self.primary[field.name].equals)) + (1.0 - hit) * p
        return p

    # -- Arrow tables ------------------------------------------------------------------------

    def _tables(self, first_user: int, n_users: int, user: np.ndarray, ts_ms: np.ndarray,
                position: np.ndarray, counts: np.ndarray, values: dict[str, np.ndarray],
                truth: dict[str, np.ndarray], rng: np.random.Generator) -> ChunkTables:
        schema, run, contract = self.schema, self.run, self.contract
        n = len(user)
        faulty = rng.random(n) < run.bad_fraction
        kind = np.where(faulty, rng.integers(0, len(self.faults), n), -1)
        fault = {f.kind: kind == index for index, f in enumerate(self.faults)}
        duplicated = ~faulty & (rng.random(n) < run.duplicate_fraction)
        day = (ts_ms - run.start_ms) // MS_PER_DAY
        rows = np.repeat(np.arange(n), 1 + duplicated)  # a duplicate sits right after its original
        order = rows[np.argsort(day[rows], kind="stable")]

        user_width = max(6, len(str(run.users - 1)))
        names = [f"u{first_user + index:0{user_width}d}" for index in range(n_users)]
        id_prefixes = pa.array([f"{run.seed}-{name}-" for name in names], pa.string())

        def event_ids(selection: np.ndarray) -> pa.Array:
            return pc.binary_join_element_wise(id_prefixes.take(pa.array(user[selection])),
                                               pa.array(position[selection]).cast(pa.string()), "")

        user_field, time_field = schema.config.user, schema.time_field
        user_index = np.where(fault[f"empty_{user_field}"], n_users, user)
        columns = {schema.config.event_id: event_ids(order),
                   # The extra "" is the empty-user fault.
                   user_field: pa.array(names + [""], pa.string()).take(pa.array(user_index[order]))}
        unit = schema.time_unit_ms
        ts = np.where(fault[f"future_{time_field}"], ts_ms // unit + FUTURE_SHIFT_MS // unit, ts_ms // unit)
        if f"pre_epoch_{time_field}" in fault:
            earlier = (contract.epoch_ms - 1) // unit - rng.integers(0, PRE_EPOCH_SPREAD_MS // unit, n)
            ts = np.where(fault[f"pre_epoch_{time_field}"],
                          np.maximum(earlier, int(schema.field(time_field).lower)), ts)
        columns[time_field] = pa.array(ts[order], pa.int64())
        for field in schema.fields:
            if field.name not in self.roles:
                masks = {f.kind: fault[f.kind][order] for f in self.faults if f.field == field.name}
                columns[field.name] = self._column(field, values[field.name][order], masks)
        table = pa.Table.from_arrays([columns[name] for name in schema.field_names],
                                     schema=schema.raw_arrow_schema)
        truth_order = np.argsort(day, kind="stable")
        truth_table = pa.table({"event_id": event_ids(truth_order),
                                **{name: p[truth_order] for name, p in truth.items()}})
        return ChunkTables(
            events=table, truth=truth_table, event_days=day[order], truth_days=day[truth_order],
            bad_counts={kind: int(mask.sum()) for kind, mask in fault.items()},
            duplicates=int(duplicated.sum()),
            watermark_ms=int((ts_ms // unit * unit)[~faulty].max(initial=0)),
            active_users=int((counts > 0).sum()))

    def _column(self, field: Field, value: np.ndarray, faults: dict[str, np.ndarray]) -> pa.Array:
        """One non-role field from its values in output order, with the faults of the field (kind →
        mask, in output order) applied."""
        name = field.name
        null = faults.get(f"null_{name}")
        if field.kind == "string":
            vocabulary = self.vocabularies[self.vocabulary_of[name]]
            names, index = vocabulary.names, value
            if f"long_{name}" in faults:
                oversize = [text + "-" + "x" * self.contract.max_string_len for text in names.to_pylist()]
                names = pa.concat_arrays([names, pa.array(oversize, pa.string())])
                index = index + len(vocabulary) * faults[f"long_{name}"]
            if f"not_allowed_{name}" in faults:
                names = pa.concat_arrays([names, pa.array([not_allowed_value(field.values)], pa.string())])
                index = np.where(faults[f"not_allowed_{name}"], len(names) - 1, index)
            return names.take(pa.array(index, mask=null))
        if field.kind == "bool":
            return pa.array(value, pa.bool_(), mask=null)
        if f"out_of_range_{name}" in faults:
            value = np.where(faults[f"out_of_range_{name}"], self._out_of_range_value(field), value)
        arrow_type = self.schema.raw_arrow_schema.field(name).type
        return pa.array(value.astype(arrow_type.to_pandas_dtype()), arrow_type)


def not_allowed_value(values: tuple[str, ...]) -> str:
    """A string that is not one of ``values``."""
    candidate = f"not-{values[0]}"
    while candidate in values:
        candidate = f"not-{candidate}"
    return candidate


@dataclass
class _Users:
    rate: np.ndarray
    peak_hour: np.ndarray
    """Local hour of most activity."""
    bias: np.ndarray
    taste: np.ndarray
    offset_units: np.ndarray
    """UTC offset in the offset field's unit (0 without one)."""
    offset_s: np.ndarray

    @classmethod
    def draw(cls, n: int, schema: EventSchema, process: SchemaProcess, rng: np.random.Generator) -> _Users:
        sigma = process.activity_log_std
        rate = process.sessions_per_day * np.exp(rng.normal(-0.5 * sigma**2, sigma, n))
        peak_hour = np.mod(rng.normal(process.peak_hour_mean, process.peak_hour_std, n), 24.0)
        bias = rng.normal(0.0, process.user_bias_std, n)
        taste = rng.standard_normal((n, process.affinity_dim))
        offset_units = np.zeros(n, dtype=np.int64)
        if schema.utc_offset_field:
            offset_units = rng.choice(utc_offsets(schema), n)
        return cls(rate, peak_hour, bias, taste, offset_units, offset_units * schema.utc_offset_unit_s)


def utc_offsets(schema: EventSchema) -> np.ndarray:
    """The offsets (in the field's unit) users take: whole hours within the field's range, or every
    integer of the range when it holds no whole hour."""
    field, unit_s = schema.field(schema.utc_offset_field), schema.utc_offset_unit_s
    low = math.ceil(field.min) if field.min is not None else DEFAULT_OFFSET_HOURS[0] * 3600 // unit_s
    high = math.floor(field.max) if field.max is not None else DEFAULT_OFFSET_HOURS[1] * 3600 // unit_s
    low, high = max(low, int(field.lower)), min(high, int(field.upper))
    hours = np.arange(math.ceil(low * unit_s / 3600), math.floor(high * unit_s / 3600) + 1) * 3600 // unit_s
    return hours if hours.size else np.arange(low, high + 1)
