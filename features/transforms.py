"""The feature job's transformations: pure DataFrame → DataFrame functions, no I/O.

raw rows ─ validate ─┬─ quarantine (rows with a ``reason``)
                     └─ valid_events ─ deduplicate ─ token_features ─ cut_windows ─ training rows

Every value is a Spark column expression (no Python UDF) and computes what its Python definition in
:mod:`features.spec` computes; parity tests hold them equal.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

from pyspark.sql import Column, DataFrame, Window, WindowSpec
from pyspark.sql import functions as F

from features.schema import ACTION_FIELDS, FIELD_NAMES, FIELDS, ContractConfig
from features.spec import (
    HASH_HEX_DIGITS, HASH_SEPARATOR, ID_COLUMNS, LABEL_COLUMNS, LOSS_MASK_COLUMN, PARTITION_COLUMN,
    PREV_ACTIONS_KNOWN_COLUMN, SECONDS_PER_DAY, SECONDS_PER_WEEK, TOKEN_COLUMNS,
    TOKEN_FLOAT_COLUMNS, TS_COLUMN, FeatureSpec,
)
from features.validation import spark_reason, spark_value

REASON_COLUMN = "reason"
SPLIT_COLUMN = "split"
WINDOW_COLUMN = "window"
"""Index of a window among the windows of its user and split, in time order."""
TRAIN, EVAL = "train", "eval"
MILLIS_PER_DAY = SECONDS_PER_DAY * 1000

_TOKEN_TYPES = {TS_COLUMN: "bigint", **{name: "bigint" for name in ID_COLUMNS},
                **{name: "float" for name in TOKEN_FLOAT_COLUMNS}}


# --- validation and deduplication -------------------------------------------------------------

def validate(raw: DataFrame, contract: ContractConfig, processing_ms: int) -> DataFrame:
    """Every raw row with a ``reason`` column: the first rule it breaks, null for a valid event."""
    return raw.withColumn(REASON_COLUMN, spark_reason(raw.schema, contract, processing_ms))


def valid_events(validated: DataFrame) -> DataFrame:
    """The valid rows as exactly the contract's columns and types (extra columns dropped)."""
    types = {column.name: column.dataType for column in validated.schema.fields}
    return validated.where(F.col(REASON_COLUMN).isNull()).select(
        *[spark_value(field, types.get(field.name)).alias(field.name) for field in FIELDS])


def deduplicate(events: DataFrame) -> DataFrame:
    """One event per ``event_id``: the first by ``event_ts``, ties broken by the other columns in
    contract order. That is a total order on valid events (no nulls), so a re-run keeps the same copy.
    The minimum of a struct aggregates partially before the shuffle: one copy per id and input
    partition crosses it."""
    order = ["event_ts"] + [name for name in FIELD_NAMES if name not in ("event_id", "event_ts")]
    first = events.groupBy("event_id").agg(F.min(F.struct(*order)).alias("first"))
    return first.select(*[F.col(name) if name == "event_id" else F.col("first")[name].alias(name)
                          for name in FIELD_NAMES])


# --- per-event features -----------------------------------------------------------------------

def spark_hash60(column_name: str, value: Column) -> Column:
    """:func:`features.spec.hash60`: the first 60 bits of ``md5(column_name + "\\x1f" + value)``."""
    digest = F.md5(F.concat(F.lit(column_name + HASH_SEPARATOR), value))
    return F.conv(F.substring(digest, 1, HASH_HEX_DIGITS), 16, 10).cast("bigint")


def spark_hash_id(column_name: str, value: Column, buckets: int) -> Column:
    """:func:`features.spec.hash_id`: an id in ``[1, buckets)``, 0 being padding."""
    return (F.lit(1) + spark_hash60(column_name, value) % F.lit(buckets - 1)).cast("bigint")


def long_dwell_threshold(spec: FeatureSpec, content_type: Column) -> Column:
    """:func:`features.spec.long_dwell_threshold` as a column."""
    threshold = F.lit(spec.default_long_dwell_ms)
    for name, value in sorted(spec.long_dwell_ms.items(), reverse=True):
        threshold = F.when(content_type == F.lit(name), F.lit(value)).otherwise(threshold)
    return threshold


def spark_action_available_ms(spec: FeatureSpec) -> Column:
    """:func:`features.spec.action_available_ms`: ``event_ts + dwell_ms + action_log_delay_ms``."""
    dwell = F.greatest(F.col("dwell_ms"), F.lit(0)).cast("bigint")
    return F.col("event_ts") + dwell + F.lit(spec.action_log_delay_ms).cast("bigint")


def spark_prev_actions_known(spec: FeatureSpec, timeline: WindowSpec,
                             as_of_ms: Column | None = None) -> Column:
    """:func:`features.spec.prev_actions_known` as a float column: the previous event in ``timeline``
    had its actions known at ``as_of_ms`` (default: this event's ``event_ts``); 0 for the first."""
    previous_available = F.lag(spark_action_available_ms(spec)).over(timeline)
    as_of = F.col("event_ts") if as_of_ms is None else as_of_ms
    return F.coalesce(previous_available <= as_of, F.lit(False)).cast("float")


def user_row_order(history: str | None = None) -> WindowSpec:
    """A user's events in the order of their training rows: context-only ``history`` events first,
    then by (``event_ts``, ``event_id``); without history, simply time order."""
    is_history = F.col(history) if history else F.lit(False)
    return Window.partitionBy("user_id").orderBy(is_history.desc(), "event_ts", "event_id")


def _cycle(ts: Column, period: int, function: Callable[[Column], Column]) -> Column:
    # Same operation order as features.spec.cyclical, in float64, rounded to float32 at the end.
    return function(F.lit(2.0 * math.pi) * F.pmod(ts, F.lit(period)) / F.lit(float(period)))


def token_features(events: DataFrame, spec: FeatureSpec, item_history: DataFrame | None = None,
                   carry: Sequence[str] = (), history: str | None = None) -> DataFrame:
    """Deduplicated valid events → one row per event with its token columns (hashed ids, times,
    continuous-time and cyclical features, actions, whether the previous actions were known,
    labels), keyed by ``user_id`` and ordered within a user by (``event_ts``, ``event_id``).

    ``item_history`` (``item_id``, ``item_first_ts``: items seen by earlier runs) lets an incremental
    run age items from their first impression ever, not in this batch; ``carry`` names extra input
    columns passed through unchanged.

    ``history`` names the boolean column of an incremental run's context-only events, which
    :func:`cut_windows` places before the new ones. ``prev_actions_known`` refers to the previous
    event in that row order (:func:`user_row_order`), the token whose actions the model shifts in,
    so a late event placed after later context sees none of that context's actions. And a context
    event counts actions as known only as of the earliest new event of its user: every new token
    attends to it, and must not learn through it what was unknown at its own time."""
    ts = F.expr("event_ts div 1000")  # integral division: event_ts >= 0, so this is the floor
    user_timeline = Window.partitionBy("user_id").orderBy("event_ts", "event_id")
    with_ts = events.withColumn(TS_COLUMN, ts)
    item_first_seen = with_ts.groupBy("item_id").agg(F.min(TS_COLUMN).alias("item_first_ts"))
    if item_history is not None:
        item_first_seen = (item_first_seen.unionByName(item_history.select("item_id", "item_first_ts"))
                           .groupBy("item_id").agg(F.min("item_first_ts").alias("item_first_ts")))
    gap = F.col(TS_COLUMN) - F.lag(TS_COLUMN).over(user_timeline)
    age = F.col(TS_COLUMN) - F.col("item_first_ts")
    dwell = F.greatest(F.col("dwell_ms").cast("double"), F.lit(0.0)) / F.lit(1000.0)
    contribution = F.col("like") | F.col("comment") | F.col("share")
    long_dwell = F.col("dwell_ms") >= long_dwell_threshold(spec, F.col("content_type"))
    as_of = None
    if history:
        earliest_new = F.min(F.when(~F.col(history), F.col("event_ts"))).over(Window.partitionBy("user_id"))
        as_of = F.when(F.col(history), F.least(F.col("event_ts"), earliest_new)).otherwise(F.col("event_ts"))
    columns = {
        TS_COLUMN: F.col(TS_COLUMN),
        **{name: spark_hash_id(name, F.col(name), spec.buckets[name]) for name in ID_COLUMNS},
        "log_gap": F.log1p(F.greatest(F.coalesce(gap, F.lit(0)).cast("double"), F.lit(0.0))),
        "log_item_age": F.log1p(F.greatest(age.cast("double"), F.lit(0.0))),
        "tod_sin": _cycle(F.col(TS_COLUMN), SECONDS_PER_DAY, F.sin),
        "tod_cos": _cycle(F.col(TS_COLUMN), SECONDS_PER_DAY, F.cos),
        "dow_sin": _cycle(F.col(TS_COLUMN), SECONDS_PER_WEEK, F.sin),
        "dow_cos": _cycle(F.col(TS_COLUMN), SECONDS_PER_WEEK, F.cos),
        **{name: F.col(name) for name in ACTION_FIELDS},
        "log_dwell": F.log1p(dwell),
        PREV_ACTIONS_KNOWN_COLUMN: spark_prev_actions_known(spec, user_row_order(history), as_of),
        "contribution": contribution,
        "long_dwell": long_dwell,
    }
    assert set(columns) == set(TOKEN_COLUMNS) - {LOSS_MASK_COLUMN}, "a token column lacks a definition"
    return (with_ts.join(item_first_seen, "item_id")
            .select("user_id", "event_id", "event_ts", *carry,
                    spark_hash60("user_id", F.col("user_id")).alias("user_key"),
                    *[value.cast(_TOKEN_TYPES[name]).alias(name) for name, value in columns.items()]))


# --- windows ----------------------------------------------------------------------------------

def split_ts_ms(watermark_ms: int, eval_days: int) -> int:
    """00:00 UTC of (the date of the last event − ``eval_days`` + 1): events from then on are eval."""
    return (watermark_ms // MILLIS_PER_DAY - eval_days + 1) * MILLIS_PER_DAY


def cut_windows(tokens: DataFrame, spec: FeatureSpec, split_ms: int,
                history: str | None = None) -> DataFrame:
    """Token rows → training rows (the contract's columns plus ``date``, ``split`` and ``window``).

    Per user, events sorted by (``event_ts``, ``event_id``) have positions 0..n−1; train events
    (before ``split_ms``) are positions ``[0, n_train)`` and eval events ``[n_train, n)``. Each split's
    events are chunked in order into groups of S = ``spec.stride``; group g ends at position
    ``end_g = min(lo + g·S + S − 1, hi)`` (lo..hi the split's positions) and its window is positions
    ``[end_g − C + 1, end_g]``: the group's tokens bear the loss, earlier ones are context. So a train
    window never reaches an eval event, and an eval window may reach back into train events.

    An event at position p belongs to the windows g with ``end_g − C + 1 ≤ p ≤ end_g``: from
    ``g_first = max(0, ⌊(p − lo)/S⌋)`` to ``g_last = G − 1`` if the split's last group ends within
    ``p + C − 1``, else ``⌊(p + C − S − lo)/S⌋``. Exploding those (at most ⌈C/S⌉ + 1 per event and
    split) and collecting each window's tokens keeps every group at most C rows whatever the
    user's history length, so heavy users cause no skew beyond their own sort.

    ``history`` names a boolean column of context-only events (an incremental run's user state):
    they come first in the user's timeline (positions ``[0, n_history)``, in time order), so a late
    event is placed after the history it arrived after, and they never bear a label.
    """
    stride, context = spec.stride, spec.context_len
    is_history = F.col(history) if history else F.lit(False)
    user_timeline = user_row_order(history)
    whole_user = Window.partitionBy("user_id")
    is_train = (F.col("event_ts") < F.lit(split_ms)) & ~is_history
    positioned = tokens.select(
        "*",
        (F.row_number().over(user_timeline) - 1).alias("position"),
        F.sum(is_history.cast("int")).over(whole_user).alias("n_history"),
        F.sum(is_train.cast("int")).over(whole_user).alias("n_train"),
        F.count(F.lit(1)).over(whole_user).alias("n_events"),
    )
    position = F.col("position")
    token_fields = [name for name in TOKEN_COLUMNS if name != LOSS_MASK_COLUMN]

    def memberships(split: str, lo: Column, hi: Column) -> DataFrame:
        """(event, window of ``split`` holding it) rows, with the event's loss mask in that window."""
        own_group = F.floor((position - lo) / F.lit(stride))  # negative for events before the split
        groups = F.floor((hi - lo + F.lit(stride)) / F.lit(stride))
        first = F.greatest(F.lit(0), own_group)
        last = F.when(hi <= position + F.lit(context - 1), groups - F.lit(1)).otherwise(
            F.floor((position + F.lit(context - stride) - lo) / F.lit(stride)))
        exploded = positioned.where((position <= hi) & (first <= last)).select(
            "user_id", "user_key", "position", *token_fields, own_group.alias("own_group"),
            F.lit(split).alias(SPLIT_COLUMN), F.explode(F.sequence(first, last)).alias(WINDOW_COLUMN))
        is_label = F.col("own_group") == F.col(WINDOW_COLUMN)
        return exploded.withColumn(LOSS_MASK_COLUMN, is_label.cast("float")).drop("own_group")

    first_new = F.col("n_history")
    train = memberships(TRAIN, first_new, first_new + F.col("n_train") - F.lit(1))
    evaluation = memberships(EVAL, first_new + F.col("n_train"), F.col("n_events") - F.lit(1))
    windows = (train.unionByName(evaluation)
               .groupBy("user_id", "user_key", SPLIT_COLUMN, WINDOW_COLUMN)
               # Sorting by position (the struct's first field) restores the time order.
               .agg(F.sort_array(F.collect_list(F.struct("position", *TOKEN_COLUMNS))).alias("tokens")))
    last_ts = F.element_at(F.col("tokens"), -1)[TS_COLUMN]
    last_day = F.floor(last_ts / F.lit(SECONDS_PER_DAY)).cast("int")
    return windows.select(
        "user_key",
        F.size("tokens").cast("int").alias("length"),
        *[_left_padded(F.col("tokens"), name, context) for name in TOKEN_COLUMNS],
        F.date_add(F.lit("1970-01-01").cast("date"), last_day).cast("string").alias(PARTITION_COLUMN),
        SPLIT_COLUMN, WINDOW_COLUMN,
    )


def _left_padded(tokens: Column, name: str, context: int) -> Column:
    """One token column as an array of exactly ``context`` elements, zeros in front."""
    zero = F.lit(0).cast(_TOKEN_TYPES[name])
    # coalesce only tells Spark the elements are non-null (they are by construction), so the Parquet
    # lists carry non-null elements; it never fills anything.
    values = F.transform(tokens, lambda token: F.coalesce(token[name], zero))
    return F.concat(F.array_repeat(zero, F.lit(context) - F.size(tokens)), values).alias(name)


def split_statistics(windows: DataFrame) -> DataFrame:
    """Per split: rows, real tokens, label tokens and, per label, the label tokens that are positive."""
    def masked_sum(values: Column) -> Column:
        return F.sum(F.aggregate(values, F.lit(0.0), lambda total, value: total + value))

    mask = F.col(LOSS_MASK_COLUMN)
    return windows.groupBy(SPLIT_COLUMN).agg(
        F.count(F.lit(1)).alias("rows"),
        F.sum("length").alias("tokens"),
        masked_sum(mask).alias("label_tokens"),
        *[masked_sum(F.zip_with(mask, F.col(label), lambda m, y: m * y)).alias(f"positive_{label}")
          for label in LABEL_COLUMNS],
    )
