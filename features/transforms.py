"""The feature job's transformations: pure DataFrame → DataFrame functions, no I/O.

raw rows ─ validate ─┬─ quarantine (rows with a ``reason``)
                     └─ valid_events ─ deduplicate ─┬─ token_features ─ cut_windows ─ training rows
                                                    └─ standardize_partials (full job, when the
                                                       schema still needs its statistics)

Everything is generic over the event schema (:mod:`features.schema`): canonical events carry the
role fields as ``event_id``, ``user_id`` and ``event_ts`` (ms) and the other fields under their own
names. Every value is a Spark column expression (no Python UDF) and computes what its Python
definition in :mod:`features.spec` computes, in the same operation order and precision; parity tests
hold them equal for every shipped schema.

Performance (bench/feature_job.py, read off ``explain("formatted")`` and the event log): whole
events cross two shuffles, by ``event_id`` (deduplication, one sort) and by ``user_id`` (one sort
that every per-user window function shares); item first impressions are broadcast, not joined by a
shuffle; each user's tokens are collected once into one sorted timeline (an aggregate that counts the
split sizes too) and every window of both splits is a slice of it: a group per window, fed by an
explode of each token's windows, and window functions over the whole user for the split sizes took
14 % more job time (2 pairs). Each window is padded once as an array of structs and split into its
columns by field access (no lambda per column); the user key is hashed once per row, not per event.
Each token's struct is built before the aggregate, in generated code (inside it Spark would evaluate
it interpretively), and the loss mask is rebuilt from the window's label count; the item id is
hashed in the broadcast first-seen table, once per item value; statistics count without lambdas. The
session's JIT options are in :mod:`features.spark`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from pyspark.sql import Column, DataFrame, Window, WindowSpec
from pyspark.sql import functions as F

from features.schema import (
    EVENT_ID, EVENT_TS, INT64_MAX, INT64_MIN, INTEGER_KINDS, LOG_GAP_COLUMN, LOG_ITEM_AGE_COLUMN,
    USER_ID, ContractConfig, EventSchema, LabelConfig, TransformConfig,
)
from features.spec import (
    HASH_HEX_DIGITS, HASH_SEPARATOR, LOSS_MASK_COLUMN, PARTITION_COLUMN, PREV_ACTIONS_KNOWN_COLUMN,
    SECONDS_PER_DAY, TS_COLUMN, FeatureSpec,
)
from features.validation import spark_reason, spark_value

REASON_COLUMN = "reason"
SPLIT_COLUMN = "split"
WINDOW_COLUMN = "window"
"""Index of a window among the windows of its user and split, in time order."""
TRAIN, EVAL = "train", "eval"
MILLIS_PER_DAY = SECONDS_PER_DAY * 1000
ITEM_FIRST_TS = "item_first_ts"
"""Column of the first impression (epoch seconds) of a value of the item-age field."""
ITEM_HASHED_ID = "item_hashed_id"
"""Column of the hashed id of a value of the item-age field, where that field is an id column."""
FIT_BUCKETS = 1024
"""Groups the train events are split into to fit standardize statistics deterministically."""


def token_types(schema: EventSchema) -> dict[str, str]:
    """Spark type of every token column: ``ts`` and the ids bigint, the rest float."""
    return {TS_COLUMN: "bigint", **{name: "bigint" for name in schema.id_columns},
            **{name: "float" for name in schema.token_float_columns}}


# --- validation and deduplication -------------------------------------------------------------

def validate(raw: DataFrame, schema: EventSchema, contract: ContractConfig, processing_ms: int) -> DataFrame:
    """Every raw row with a ``reason`` column: the first rule it breaks, null for a valid event."""
    return raw.withColumn(REASON_COLUMN, spark_reason(raw.schema, schema, contract, processing_ms))


def valid_events(validated: DataFrame, schema: EventSchema) -> DataFrame:
    """The valid rows as canonical events: exactly the schema's fields with their types, the role
    fields renamed, ``event_ts = time field × time_unit_ms`` (extra columns dropped). The product
    cannot overflow: validation bounds the time field by the processing time."""
    types = {column.name: column.dataType for column in validated.schema.fields}
    columns = []
    for field in schema.fields:
        value = spark_value(field, types.get(field.name))
        if field.name == schema.time_field:
            value = value * F.lit(schema.time_unit_ms)
        columns.append(value.alias(schema.canonical_names[field.name]))
    return validated.where(F.col(REASON_COLUMN).isNull()).select(*columns)


def deduplicate(events: DataFrame, schema: EventSchema) -> DataFrame:
    """One canonical event per ``event_id``: the first by ``event_ts``, ties broken by the other
    fields in schema order (``schema.dedup_order``). That is a total order on valid events (no nulls,
    no NaN), so a re-run keeps the same copy.

    One shuffle by id and one sort: the row of an id without a predecessor in that order is its
    first copy. (A minimum of a struct sorts twice, before and after the shuffle, comparing structs
    interpretively; a rank filter, ``row_number() = 1``, makes Spark add a sort before the shuffle
    too. Copies are rare, so a sort before the shuffle saves nothing.)"""
    order = Window.partitionBy(EVENT_ID).orderBy(*schema.dedup_order)
    return (events.withColumn("_predecessor", F.lag(F.lit(1)).over(order))
            .where(F.col("_predecessor").isNull()).select(*schema.canonical_field_names))


# --- per-event features -----------------------------------------------------------------------

def spark_hash60(table: str, value: Column) -> Column:
    """:func:`features.spec.hash60`: the first 60 bits of ``md5(table + "\\x1f" + value)``."""
    digest = F.md5(F.concat(F.lit(table + HASH_SEPARATOR), value))
    # The hex digest is ASCII, so its first bytes are its first characters: a binary substring
    # skips the character counting a string substring does (about a fifth of the hash's CPU).
    leading = F.substring(digest.cast("binary"), 1, HASH_HEX_DIGITS).cast("string")
    return F.conv(leading, 16, 10).cast("bigint")


def spark_hash_id(table: str, value: Column, buckets: int) -> Column:
    """:func:`features.spec.hash_id`: an id in ``[1, buckets)``, 0 being padding."""
    return (F.lit(1) + spark_hash60(table, value) % F.lit(buckets - 1)).cast("bigint")


def spark_transform(value: Column, steps: Sequence[TransformConfig]) -> Column:
    """:func:`features.spec.transform` as a double column, step by step in the same order:
    ``clip`` = ``min(max(x, min), max)``, ``divide`` = ``x / by``, ``log1p``, ``standardize`` =
    ``(x − mean) / std``. The schema guarantees ``log1p`` sees values > −1, where Spark's (null
    below) and numpy's (nan) agree."""
    x = value.cast("double")
    for step in steps:
        if step.op == "clip":
            x = x if step.min is None else F.greatest(x, F.lit(float(step.min)))
            x = x if step.max is None else F.least(x, F.lit(float(step.max)))
        elif step.op == "divide":
            x = x / F.lit(float(step.by))
        elif step.op == "log1p":
            x = F.log1p(x)
        elif step.op == "standardize":
            if step.mean is None or step.std is None:
                raise ValueError("standardize has no statistics yet: the full feature job fits them")
            x = (x - F.lit(float(step.mean))) / F.lit(float(step.std))
        else:
            raise ValueError(f"unknown transform {step.op!r}")
    return x


def spark_label(label: LabelConfig, schema: EventSchema) -> Column:
    """:func:`features.spec.label_values` as a boolean column of canonical events."""
    if label.any_of:
        return functools.reduce(lambda a, b: a | b, [F.col(name) for name in label.any_of])
    if label.all_of:
        return functools.reduce(lambda a, b: a & b, [F.col(name) for name in label.all_of])
    value, kind = F.col(label.field), schema.field(label.field).kind
    if label.equals is not None:
        if kind == "string":
            return value == F.lit(label.equals)
        if kind == "bool":
            return value == F.lit(label.equals.lower() == "true")
        return value.cast("double") == F.lit(float(label.equals))
    if label.at_least is not None:
        check = _at_least(value, kind, label.at_least)
        if label.by:
            by = F.col(label.by)
            cases = None
            for name, threshold in label.thresholds.items():
                condition, result = by == F.lit(name), _at_least(value, kind, threshold)
                cases = F.when(condition, result) if cases is None else cases.when(condition, result)
            check = check if cases is None else cases.otherwise(check)
        return check
    return value


def _at_least(value: Column, kind: str, threshold: float) -> Column:
    """``value ≥ threshold`` exactly as Python compares an int or a float with a float: an integer
    field against the integer ``⌈threshold⌉`` (no rounding of large values through a double)."""
    if kind not in INTEGER_KINDS:
        return value.cast("double") >= F.lit(float(threshold))
    bound = math.ceil(threshold)
    if bound > INT64_MAX:
        return F.lit(False)
    return F.lit(True) if bound <= INT64_MIN else value >= F.lit(bound)


def spark_action_available_ms(schema: EventSchema) -> Column:
    """:func:`features.spec.action_available_ms`: ``event_ts + max(duration, 0) + delay_ms``, the
    duration being the schema's ``actions.known_after.duration`` field (0 where it names none)."""
    available = F.col(EVENT_TS)
    if schema.known_after_field:
        available = available + F.greatest(F.col(schema.known_after_field), F.lit(0)).cast("bigint")
    return available + F.lit(schema.action_delay_ms).cast("bigint")


def spark_prev_actions_known(schema: EventSchema, timeline: WindowSpec,
                             as_of_ms: Column | None = None) -> Column:
    """:func:`features.spec.prev_actions_known` as a float column: the previous event in ``timeline``
    had its actions known at ``as_of_ms`` (default: this event's ``event_ts``); 0 for the first."""
    previous_available = F.lag(spark_action_available_ms(schema)).over(timeline)
    as_of = F.col(EVENT_TS) if as_of_ms is None else as_of_ms
    return F.coalesce(previous_available <= as_of, F.lit(False)).cast("float")


def user_row_order(history: str | None = None) -> WindowSpec:
    """A user's events in the order of their training rows: context-only ``history`` events first,
    then by (``event_ts``, ``event_id``); without history, simply time order."""
    if not history:
        # Exactly the time order of the gap features' window, so one sort serves both.
        return Window.partitionBy(USER_ID).orderBy(EVENT_TS, EVENT_ID)
    return Window.partitionBy(USER_ID).orderBy(F.col(history).desc(), EVENT_TS, EVENT_ID)


def _cycle(t: Column, period: float, function: Callable[[Column], Column]) -> Column:
    # Same operation order as features.spec.cyclical, in float64, rounded to float32 at the end. An
    # integral period stays an integer literal: pmod of integers is exact (and what the job always
    # computed); numpy's float64 mod of integers below 2^53 gives the same value.
    modulus = F.lit(int(period)) if float(period).is_integer() else F.lit(float(period))
    return function(F.lit(2.0 * math.pi) * F.pmod(t, modulus) / F.lit(float(period)))


def token_features(events: DataFrame, spec: FeatureSpec, item_history: DataFrame | None = None,
                   carry: Sequence[str] = (), history: str | None = None) -> DataFrame:
    """Deduplicated canonical events → one row per event with its token columns (hashed ids, times,
    continuous-time features, numerics, cyclical features, actions, whether the previous actions
    were known, labels; ``spec.event_schema.token_columns`` but ``loss_mask``), keyed by ``user_id``
    and ordered within a user by (``event_ts``, ``event_id``); :func:`features.spec.token_values`
    is the Python definition.

    ``item_history`` (the item-age field and ``item_first_ts``: values seen by earlier runs) lets an
    incremental run age items from their first impression ever, not in this batch; ``carry`` names
    extra input columns passed through unchanged.

    ``history`` names the boolean column of an incremental run's context-only events, which
    :func:`cut_windows` places before the new ones. ``prev_actions_known`` refers to the previous
    event in that row order (:func:`user_row_order`), the token whose actions the model shifts in,
    so a late event placed after later context sees none of that context's actions. And a context
    event counts actions as known only as of the earliest new event of its user: every new token
    attends to it, and must not learn through it what was unknown at its own time."""
    schema = spec.event_schema
    config = schema.config
    ts = F.expr(f"{EVENT_TS} div 1000")  # integral division: event_ts >= 0, so this is the floor
    user_timeline = Window.partitionBy(USER_ID).orderBy(EVENT_TS, EVENT_ID)
    with_ts = events.withColumn(TS_COLUMN, ts)
    columns: dict[str, Column] = {TS_COLUMN: F.col(TS_COLUMN)}

    def hashed_id(name: str) -> Column:
        table = schema.column_tables[name]
        return spark_hash_id(table, F.col(name), spec.buckets[table])

    for name in schema.id_columns:
        columns[name] = hashed_id(name)
    if config.time_features.gap:
        gap = F.col(TS_COLUMN) - F.lag(TS_COLUMN).over(user_timeline)
        columns[LOG_GAP_COLUMN] = F.log1p(F.greatest(F.coalesce(gap, F.lit(0)).cast("double"), F.lit(0.0)))
    if schema.item_age_field:
        item = schema.item_age_field
        first_seen = with_ts.groupBy(item).agg(F.min(TS_COLUMN).alias(ITEM_FIRST_TS))
        if item_history is not None:
            first_seen = (first_seen.unionByName(item_history.select(item, ITEM_FIRST_TS))
                          .groupBy(item).agg(F.min(ITEM_FIRST_TS).alias(ITEM_FIRST_TS)))
        if item in schema.id_columns:
            # Hashed once per item value, not once per event.
            first_seen = first_seen.withColumn(ITEM_HASHED_ID, hashed_id(item))
            columns[item] = F.col(ITEM_HASHED_ID)
        # One row per item value, far fewer than events: broadcast, so the events stay where they
        # are; a sort-merge join (what the size estimate picks on large inputs) would shuffle and
        # sort every event by item before the shuffle by user.
        with_ts = with_ts.join(F.broadcast(first_seen), item)
        age = F.col(TS_COLUMN) - F.col(ITEM_FIRST_TS)
        columns[LOG_ITEM_AGE_COLUMN] = F.log1p(F.greatest(age.cast("double"), F.lit(0.0)))
    for name, value in config.numerics.items():
        columns[name] = spark_transform(F.col(value.field), value.transforms)
    local = F.col(TS_COLUMN)
    if schema.utc_offset_field:
        local = local + F.col(schema.utc_offset_field).cast("bigint") * F.lit(schema.utc_offset_unit_s)
    for name, period in schema.periods.items():
        columns[f"{name}_sin"] = _cycle(local, period, F.sin)
        columns[f"{name}_cos"] = _cycle(local, period, F.cos)
    for name, value in config.actions.columns.items():
        columns[name] = spark_transform(F.col(value.field), value.transforms)
    as_of = None
    if history:
        earliest_new = F.min(F.when(~F.col(history), F.col(EVENT_TS))).over(Window.partitionBy(USER_ID))
        as_of = F.when(F.col(history), F.least(F.col(EVENT_TS), earliest_new)).otherwise(F.col(EVENT_TS))
    columns[PREV_ACTIONS_KNOWN_COLUMN] = spark_prev_actions_known(schema, user_row_order(history), as_of)
    for name in schema.label_columns:
        # A label named like an action is that action's bool column (the schema checks it).
        columns.setdefault(name, spark_label(config.labels[name], schema))
    types = token_types(schema)
    return with_ts.select(EVENT_ID, USER_ID, EVENT_TS, *carry,
                          spark_hash60("user_id", F.col(USER_ID)).alias("user_key"),
                          *[columns[name].cast(types[name]).alias(name) for name in schema.token_columns
                            if name != LOSS_MASK_COLUMN])


# --- standardize statistics -------------------------------------------------------------------

def columns_to_fit(schema: EventSchema) -> list[str]:
    """The numerics whose standardize step still lacks its statistics."""
    return [name for name, step in schema.standardize_steps() if step.mean is None or step.std is None]


def standardize_partials(events: DataFrame, schema: EventSchema, split_ms: int) -> DataFrame:
    """Partial statistics of the value before standardize (``x``, the field through the steps before
    it) of every numeric of :func:`columns_to_fit`, over the train split's events
    (``event_ts < split_ms``): per column and group ``b`` of events (``FIT_BUCKETS`` groups by a hash
    of ``event_id``), ``n_b``, ``s_b = Σ x`` and ``m2_b = Σ (x − s_b/n_b)²``, each summed over the
    group's values in sorted order. So the sums never depend on partitioning or task order and a
    re-run fits the same bits; :func:`fitted_statistics` combines the groups."""
    train = events.where(F.col(EVENT_TS) < F.lit(split_ms))
    bucket = F.pmod(F.xxhash64(F.col(EVENT_ID)), F.lit(FIT_BUCKETS))
    numerics = schema.config.numerics
    parts = []
    for name in columns_to_fit(schema):
        value = numerics[name]
        x = spark_transform(F.col(value.field), value.transforms[:-1])
        grouped = (train.select(bucket.alias("bucket"), x.alias("x")).groupBy("bucket")
                   .agg(F.array_sort(F.collect_list("x")).alias("values")))
        sums = grouped.select(F.lit(name).alias("column"), "bucket", "values",
                              F.size("values").cast("bigint").alias("n"),
                              F.aggregate("values", F.lit(0.0), lambda total, v: total + v).alias("total"))
        parts.append(sums.select(
            "column", "bucket", "n", "total",
            F.aggregate("values", F.lit(0.0), lambda total, v: total + (v - F.col("total") / F.col("n"))
                        * (v - F.col("total") / F.col("n"))).alias("m2")))
    return functools.reduce(DataFrame.unionByName, parts)


def fitted_statistics(schema: EventSchema, partials: Iterable[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """(mean, population std) per column from the rows of :func:`standardize_partials`, combined in
    group order (exact sums by ``math.fsum``)::

        N = Σ_b n_b      mean = Σ_b s_b / N
        M2 = Σ_b [m2_b + n_b · (s_b/n_b − mean)²]      std = √(M2 / N)

    A column without train values gets mean 0; a std of 0 (a constant, or no values) becomes 1, so
    standardize only centres it."""
    rows: dict[str, list[Mapping[str, Any]]] = {name: [] for name in columns_to_fit(schema)}
    for row in partials:
        rows[row["column"]].append(row)
    statistics = {}
    for name, groups in rows.items():
        groups = sorted(groups, key=lambda row: row["bucket"])
        count = sum(row["n"] for row in groups)
        mean = math.fsum(row["total"] for row in groups) / count if count else 0.0
        m2 = math.fsum(row["m2"] + row["n"] * (row["total"] / row["n"] - mean) ** 2 for row in groups)
        std = math.sqrt(m2 / count) if count else 0.0
        statistics[name] = (mean, std if std > 0 else 1.0)
    return statistics


# --- windows ----------------------------------------------------------------------------------

def split_ts_ms(watermark_ms: int, eval_days: int) -> int:
    """00:00 UTC of (the date of the last event − ``eval_days`` + 1): events from then on are eval."""
    return (watermark_ms // MILLIS_PER_DAY - eval_days + 1) * MILLIS_PER_DAY


def cut_windows(tokens: DataFrame, spec: FeatureSpec, split_ms: int,
                history: str | None = None) -> DataFrame:
    """Token rows → training rows (the schema's training columns plus ``date``, ``split`` and
    ``window``).

    Per user, events sorted by (``event_ts``, ``event_id``) have positions 0..n−1; train events
    (before ``split_ms``) are positions ``[0, n_train)`` and eval events ``[n_train, n)``. Each split's
    events are chunked in order into groups of S = ``spec.stride``; group g ends at position
    ``end_g = min(lo + g·S + S − 1, hi)`` (lo..hi the split's positions) and its window is positions
    ``[end_g − C + 1, end_g]``: the group's tokens bear the loss, earlier ones are context. So a train
    window never reaches an eval event, and an eval window may reach back into train events.

    Each user's tokens are collected once into one timeline, sorted by position, with its split sizes
    counted in the same aggregate; every window is then a slice of it, ``[max(0, end_g − C + 1),
    end_g]``, cut by one lambda per window (not per token), and its label count is ``end_g − (lo +
    g·S) + 1``. One group per user: no token is copied into a group per window, and no window function
    over the whole user buffers its rows for the split sizes. A user's whole history is one row in
    memory, which Spark caps at 2 GB: about ten million events at the feed schema's ~180 bytes a token.

    ``history`` names a boolean column of context-only events (an incremental run's user state):
    they come first in the user's timeline (positions ``[0, n_history)``, in time order), so a late
    event is placed after the history it arrived after, and they never bear a label.
    """
    stride, context = spec.stride, spec.context_len
    token_columns = spec.event_schema.token_columns
    types = token_types(spec.event_schema)
    is_history = F.col(history) if history else F.lit(False)
    is_train = (F.col(EVENT_TS) < F.lit(split_ms)) & ~is_history

    def non_null(value: Column, data_type: str) -> Column:
        # Non-null by construction: coalesce only tells Spark so (its division is nullable), so that
        # the Parquet lists and their elements are non-null. It never fills anything.
        return F.coalesce(value, F.lit(0).cast(data_type))

    # The loss mask depends on the window, so it is not a token field: a window's label tokens are
    # its last ones (its own group; the earlier ones are context), so it is rebuilt from their count.
    fields = [name for name in token_columns if name != LOSS_MASK_COLUMN]
    # Each token is one struct built here, in generated code: built inside the aggregate, Spark would
    # evaluate it interpretively, boxing every field of every token.
    token = F.struct((F.row_number().over(user_row_order(history)) - 1).alias("position"),
                     *[non_null(F.col(name), types[name]).alias(name) for name in fields])
    # One timeline per user, its split sizes counted in the same aggregate. Sorting by position (the
    # struct's first field) restores the row order.
    timelines = (tokens.select(USER_ID, token.alias("token"), is_history.alias("is_history"),
                               is_train.alias("is_train"))
                 .groupBy(USER_ID)
                 .agg(F.sort_array(F.collect_list("token")).alias("timeline"),
                      F.count(F.when(F.col("is_history"), F.lit(1))).alias("n_history"),
                      F.count(F.when(F.col("is_train"), F.lit(1))).alias("n_train"),
                      F.count(F.lit(1)).alias("n_events")))
    n_history, n_train, n_events = F.col("n_history"), F.col("n_train"), F.col("n_events")
    train_windows = F.floor((n_train + F.lit(stride - 1)) / F.lit(stride))
    eval_windows = F.floor((n_events - n_history - n_train + F.lit(stride - 1)) / F.lit(stride))

    def window(number: Column) -> Column:
        """The ``number``-th window of the user, train's first: its split, index, tokens and label count."""
        is_train_window = number < train_windows
        group = F.when(is_train_window, number).otherwise(number - train_windows)
        lo = F.when(is_train_window, n_history).otherwise(n_history + n_train)
        hi = F.when(is_train_window, n_history + n_train).otherwise(n_events) - F.lit(1)
        group_start = lo + group * F.lit(stride)
        end = F.least(group_start + F.lit(stride - 1), hi)
        start = F.greatest(end - F.lit(context - 1), F.lit(0))
        return F.struct(F.when(is_train_window, F.lit(TRAIN)).otherwise(F.lit(EVAL)).alias(SPLIT_COLUMN),
                        group.alias(WINDOW_COLUMN),
                        F.slice("timeline", (start + F.lit(1)).cast("int"), (end - start + F.lit(1)).cast("int"))
                        .alias("tokens"),
                        non_null((end - group_start + F.lit(1)).cast("int"), "int").alias("label_tokens"))

    # A lambda per window, not per token: each window is a slice of its user's timeline.
    numbers = F.sequence(F.lit(0).cast("bigint"), train_windows + eval_windows - F.lit(1))
    windows = (timelines.select(USER_ID, F.explode(F.when(train_windows + eval_windows > F.lit(0),
                                                          F.transform(numbers, window))).alias("cut"))
               .select(USER_ID, "cut.*"))
    # Padded once as an array of structs, then one array per field: no lambda per token column.
    zero = F.struct(F.lit(0).alias("position"), *[F.lit(0).cast(types[name]).alias(name) for name in fields])
    padded = F.concat(F.array_repeat(zero, F.lit(context) - F.size("tokens")), F.col("tokens"))
    labelled = F.col("label_tokens")
    loss_mask = F.concat(F.array_repeat(F.lit(0).cast(types[LOSS_MASK_COLUMN]), F.lit(context) - labelled),
                         F.array_repeat(F.lit(1).cast(types[LOSS_MASK_COLUMN]), labelled))
    last_day = F.floor(F.element_at(F.col("tokens"), -1)[TS_COLUMN] / F.lit(SECONDS_PER_DAY)).cast("int")
    return windows.select(
        spark_hash60("user_id", F.col(USER_ID)).alias("user_key"),  # once per row, not per event
        F.size("tokens").cast("int").alias("length"),
        *[(loss_mask if name == LOSS_MASK_COLUMN else padded[name]).alias(name) for name in token_columns],
        F.date_add(F.lit("1970-01-01").cast("date"), last_day).cast("string").alias(PARTITION_COLUMN),
        SPLIT_COLUMN, WINDOW_COLUMN,
    )


def window_statistics(schema: EventSchema) -> list[Column]:
    """Aggregates over training rows: rows, real tokens, label tokens and, per task label, the label
    tokens that are positive (``positive_LABEL``)."""
    # Masks and labels are float 0/1, and a window's label tokens are its last ones: counting the
    # non-zero elements of an array's tail needs no lambda (Spark runs those interpretively).
    def ones(values: Column) -> Column:
        return F.size(F.array_remove(values, 0.0))

    mask = F.col(LOSS_MASK_COLUMN)
    labelled = ones(mask)
    first_labelled = F.size(mask) - labelled + F.lit(1)
    return [
        F.count(F.lit(1)).alias("rows"),
        F.sum("length").alias("tokens"),
        F.sum(labelled).alias("label_tokens"),
        *[F.sum(ones(F.slice(F.col(label), first_labelled, labelled))).alias(f"positive_{label}")
          for label in schema.label_columns],
    ]


def split_statistics(windows: DataFrame, schema: EventSchema) -> DataFrame:
    """:func:`window_statistics` per split."""
    return windows.groupBy(SPLIT_COLUMN).agg(*window_statistics(schema))
