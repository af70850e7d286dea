"""The feature spec: the one home of every feature definition shared by Spark and Python.

Training rows (Spark output, read by the trainer through Petastorm) hold one window of one user's
time-ordered events, left-padded to ``context_len`` tokens. Column contract:

======================  ==========  ===============================================================
column                  type        meaning
======================  ==========  ===============================================================
``user_key``            int64       60-bit hash of ``user_id`` (:func:`user_key`), groups rows for GAUC
``length``              int32       number of real (non-padding) tokens in the window
``ts``                  int64[C]    event time, epoch seconds UTC (0 = padding)
``item_id`` …           int64[C]    hashed categorical ids (:data:`ID_COLUMNS`, :func:`hash_id`, 0 = padding)
``log_gap``             float32[C]  ``log1p(seconds since the user's previous event)``, 0 for the first
``log_item_age``        float32[C]  ``log1p(seconds since the item's first impression in the data)``
``tod_sin`` …           float32[C]  ``sin/cos(2π·T/86400)``, ``sin/cos(2π·T/604800)``, T = ts (UTC)
``click`` …             float32[C]  the token's actions (:data:`ACTION_COLUMNS`), model inputs for later tokens
``prev_actions_known``  float32[C]  1 if the previous token's actions were known at this token's event
                                    time (:func:`prev_actions_known`), 0 if not and for the first
``contribution``        float32[C]  labels (:data:`LABEL_COLUMNS`)
``loss_mask``           float32[C]  1 for label-bearing tokens, 0 for context-only tokens and padding
======================  ==========  ===============================================================

plus the hive partition column ``date`` (``YYYY-MM-DD`` of the window's last event), which the
trainer does not read. Spark computes these with column expressions (``features.transforms``); the
Python functions here compute the same values for serving, and a parity test holds them equal.

An event's actions become known at ``event_ts + dwell_ms + action_log_delay_ms`` (its dwell ends,
then logging takes its time). At request time nothing later is known, so a token may use only the
actions known at its own event time: the model masks the previous token's actions where
``prev_actions_known`` is 0 and tells it that they are pending.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from common.config import require

FEATURE_SPEC_VERSION = "2"
"""Readers refuse other versions. 2: ``prev_actions_known`` and ``spec.action_log_delay_ms``."""

SECONDS_PER_DAY = 86_400
SECONDS_PER_WEEK = 604_800

ID_COLUMNS: tuple[str, ...] = ("item_id", "author_id", "content_type", "topic", "surface")
CONTINUOUS_COLUMNS: tuple[str, ...] = ("log_gap", "log_item_age")
CYCLICAL_COLUMNS: tuple[str, ...] = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")
ACTION_COLUMNS: tuple[str, ...] = ("click", "like", "comment", "share", "log_dwell")
PREV_ACTIONS_KNOWN_COLUMN = "prev_actions_known"
LABEL_COLUMNS: tuple[str, ...] = ("contribution", "like", "long_dwell")
TS_COLUMN = "ts"
LOSS_MASK_COLUMN = "loss_mask"
ROW_COLUMNS: tuple[str, ...] = ("user_key", "length")
PARTITION_COLUMN = "date"

TOKEN_FLOAT_COLUMNS: tuple[str, ...] = tuple(dict.fromkeys(
    CONTINUOUS_COLUMNS + CYCLICAL_COLUMNS + ACTION_COLUMNS + (PREV_ACTIONS_KNOWN_COLUMN,) + LABEL_COLUMNS
    + (LOSS_MASK_COLUMN,)))
"""Every float32 per-token column, each once (``like`` is both an action and a label)."""
TOKEN_COLUMNS: tuple[str, ...] = (TS_COLUMN,) + ID_COLUMNS + TOKEN_FLOAT_COLUMNS
TRAINING_COLUMNS: tuple[str, ...] = ROW_COLUMNS + TOKEN_COLUMNS
"""The numeric columns a reader selects (no strings, no partition column)."""

HASH_SEPARATOR = "\x1f"
HASH_HEX_DIGITS = 15  # 60 bits: fits a signed int64 on every platform and in Spark's conv()


@dataclass
class FeatureSpec:
    """What defines the features; recorded in every manifest so readers build matching models."""

    context_len: int = 50
    """C: tokens per training row."""
    stride: int = 50
    """New label-bearing tokens per window; ``stride < context_len`` gives overlapping windows
    whose first ``context_len - stride`` tokens are context."""
    buckets: dict[str, int] = field(default_factory=lambda: {
        "item_id": 200_003, "author_id": 20_011, "content_type": 64, "topic": 1_031, "surface": 64})
    """Hash buckets per categorical column, including the reserved padding id 0."""
    long_dwell_ms: dict[str, int] = field(default_factory=lambda: {
        "video": 15_000, "image": 4_000, "text": 8_000, "link": 10_000})
    """``long_dwell = dwell_ms >= long_dwell_ms[content_type]``."""
    default_long_dwell_ms: int = 10_000
    """Threshold for content types without their own entry."""
    action_log_delay_ms: int = 30_000
    """Time from the end of an event's dwell until its actions are logged and readable at request
    time: an event's actions are known from ``event_ts + dwell_ms + action_log_delay_ms`` on."""

    def __post_init__(self) -> None:
        require(self.context_len >= 2, "spec.context_len", "must be >= 2")
        require(1 <= self.stride <= self.context_len, "spec.stride", "must be in [1, context_len]")
        require(set(self.buckets) == set(ID_COLUMNS), "spec.buckets",
                f"must have exactly the keys {', '.join(ID_COLUMNS)}")
        for name, count in self.buckets.items():
            require(count >= 2, f"spec.buckets.{name}", "must be >= 2 (id 0 is padding)")
        for name, threshold in self.long_dwell_ms.items():
            require(threshold >= 0, f"spec.long_dwell_ms.{name}", "must be >= 0")
        require(self.default_long_dwell_ms >= 0, "spec.default_long_dwell_ms", "must be >= 0")
        require(self.action_log_delay_ms >= 0, "spec.action_log_delay_ms", "must be >= 0")


def hash60(column: str, value: str) -> int:
    """The project's stable hash: the first 60 bits of ``md5(column + "\\x1f" + value)``.

    MD5 is a standard digest (Spark's ``md5`` and Python's ``hashlib`` agree byte for byte, and
    neither changes across versions), so the same string maps to the same id in every run, Spark
    version and the Python serving path.
    """
    digest = hashlib.md5(f"{column}{HASH_SEPARATOR}{value}".encode("utf-8")).hexdigest()
    return int(digest[:HASH_HEX_DIGITS], 16)


def hash_id(column: str, value: str, buckets: int) -> int:
    """Categorical id in ``[1, buckets)``; 0 is reserved for padding."""
    return 1 + hash60(column, value) % (buckets - 1)


def user_key(user_id: str) -> int:
    return hash60("user_id", user_id)


def long_dwell_threshold(spec: FeatureSpec, content_type: str) -> int:
    return spec.long_dwell_ms.get(content_type, spec.default_long_dwell_ms)


def log_gap(ts_seconds: np.ndarray) -> np.ndarray:
    """``log1p`` of seconds since the previous event of a user's time-ordered events (0 for the first)."""
    ts = np.asarray(ts_seconds, dtype=np.float64)
    gaps = np.diff(ts, prepend=ts[:1]) if ts.size else ts
    return np.log1p(np.maximum(gaps, 0.0)).astype(np.float32)


def log_item_age(ts_seconds: np.ndarray, item_first_seen_seconds: np.ndarray) -> np.ndarray:
    age = np.asarray(ts_seconds, dtype=np.float64) - np.asarray(item_first_seen_seconds, np.float64)
    return np.log1p(np.maximum(age, 0.0)).astype(np.float32)


def cyclical(ts_seconds: np.ndarray) -> dict[str, np.ndarray]:
    """sin/cos of time of day and of time of week (UTC epoch phase: the week starts Thursday 00:00)."""
    ts = np.asarray(ts_seconds, dtype=np.float64)
    day = 2.0 * np.pi * np.mod(ts, SECONDS_PER_DAY) / SECONDS_PER_DAY
    week = 2.0 * np.pi * np.mod(ts, SECONDS_PER_WEEK) / SECONDS_PER_WEEK
    return {"tod_sin": np.sin(day).astype(np.float32), "tod_cos": np.cos(day).astype(np.float32),
            "dow_sin": np.sin(week).astype(np.float32), "dow_cos": np.cos(week).astype(np.float32)}


def log_dwell(dwell_ms: np.ndarray) -> np.ndarray:
    return np.log1p(np.maximum(np.asarray(dwell_ms, np.float64), 0.0) / 1000.0).astype(np.float32)


def action_available_ms(event_ts_ms: np.ndarray, dwell_ms: np.ndarray, delay_ms: int) -> np.ndarray:
    """When an event's actions become known: ``event_ts + dwell_ms + delay_ms`` (epoch ms, int64)."""
    dwell = np.maximum(np.asarray(dwell_ms, dtype=np.int64), 0)
    return np.asarray(event_ts_ms, dtype=np.int64) + dwell + np.int64(delay_ms)


def prev_actions_known(event_ts_ms: np.ndarray, dwell_ms: np.ndarray, delay_ms: int,
                       as_of_ms: np.ndarray | None = None) -> np.ndarray:
    """For one user's events in timeline order: ``known_i = 1`` where the previous event's actions
    were known at event i, ``available_{i−1} ≤ as_of_i`` (:func:`action_available_ms`), else 0; 0 for
    the first event, which has no previous one.

    ``as_of_i`` is event i's own time unless given: the incremental job judges its stored context
    events as of its new events' earliest time, so a late event placed after later context never
    sees actions through them (``features.incremental``)."""
    event_ts = np.asarray(event_ts_ms, dtype=np.int64)
    as_of = event_ts if as_of_ms is None else np.asarray(as_of_ms, dtype=np.int64)
    available = action_available_ms(event_ts, dwell_ms, delay_ms)
    known = np.zeros(event_ts.shape, dtype=np.float32)
    known[1:] = available[:-1] <= as_of[1:]
    return known
