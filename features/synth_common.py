"""What the two synthetic worlds share: the feed world (:mod:`features.synth`) and the generic world
of every other schema (:mod:`features.synth_schema`) hand the writer of ``sirenfeed synth`` one
:class:`ChunkTables` per chunk of users, and use the same time constants and vectorised helpers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.spec import SECONDS_PER_DAY

MS_PER_DAY = SECONDS_PER_DAY * 1000
FUTURE_SHIFT_MS = 100 * 365 * MS_PER_DAY  # a broken client clock, a century ahead
PRE_EPOCH_SPREAD_MS = 365 * MS_PER_DAY


@dataclass
class ChunkTables:
    events: pa.Table
    """Raw events grouped by day, in (user, time) order within a day."""
    truth: pa.Table
    event_days: np.ndarray
    """Day index (from the start date) of each row of ``events``; likewise ``truth_days``."""
    truth_days: np.ndarray
    bad_counts: dict[str, int]
    duplicates: int
    watermark_ms: int
    active_users: int


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def normal_tail(z: np.ndarray) -> np.ndarray:
    """Q(z) = P(N(0, 1) >= z), exact to double precision (numpy has no erfc)."""
    scaled = (np.asarray(z, np.float64) / math.sqrt(2.0)).tolist()
    return 0.5 * np.fromiter(map(math.erfc, scaled), np.float64, len(scaled))


def hour_of_day(ts_ms: np.ndarray) -> np.ndarray:
    return np.mod(ts_ms, MS_PER_DAY) / 3_600_000.0


def segment_positions(counts: np.ndarray) -> np.ndarray:
    """0, 1, …, n−1 for each segment of a flat array made of segments of the given lengths."""
    starts = np.cumsum(counts) - counts
    return np.arange(int(counts.sum())) - np.repeat(starts, counts)
