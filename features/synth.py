"""Synthetic logs in the raw event contract, with the ground truth that generated them.

``sirenfeed synth --out RAW_DIR --users N --days D --seed S [schema=NAME]`` (or
:func:`write_synthetic_logs`) writes the logs of an event schema (``schema``, default ``feed``). The
feed schema gets the feed world below; any other schema gets the generic world of
:mod:`features.synth_schema`, which writes the same layout from the schema file alone (its fields,
its ``p_<task>`` truth and its own kinds of bad events) and refuses, before writing anything, a
schema that declares what it cannot generate. For the feed it writes

* ``RAW_DIR/date=YYYY-MM-DD/part-NNNNN.parquet``: raw events with exactly the columns of the feed
  schema's ``raw_arrow_schema``, one file per date per chunk of users (NNNNN is the
  chunk), sorted by (user, time). The partition is the UTC date of the event's true time, which the
  two timestamp faults below keep.
* ``RAW_DIR/_truth/date=YYYY-MM-DD/part-NNNNN.parquet``: ``event_id``, the probabilities
  ``p_contribution``, ``p_like``, ``p_long_dwell`` (float64) each event was drawn with, and the terms
  of its engagement logit η by mechanism (``relational_logit``, ``topic_interest_logit``,
  ``absolute_time_logit``, see *Ground truth* below), one row per distinct ``event_id``, so a
  benchmark can compute the Bayes-optimal NE, overall and on the events a mechanism moves.
* ``_MANIFEST.json`` and ``_SUCCESS`` (:func:`features.dataset.write_manifest`): counts (events,
  valid events, injected bad events by kind, injected duplicates, users, days, events per date),
  the watermark (largest ``event_ts`` of a valid event), the seed, the whole config and the whole
  event schema.

Everything is written into a hidden sibling directory that replaces ``RAW_DIR`` in one rename only
once it is complete, so a crash never leaves a ``RAW_DIR`` with ``_SUCCESS`` and partial data. The
output is a function of the config alone (``users_per_chunk`` included: chunks own their random
streams); the same config gives byte-identical files.

Identifiers: users ``u000123``, items ``i0001234`` (numbered in creation order), authors ``a000123``,
topics ``topic_07``; ``event_id = "{seed}-{user_id}-{k}"`` with k the event's index in its user's
time-ordered sequence.

The generative process (all times UTC; every name below is a key of :class:`GenerativeProcess`)
-------------------------------------------------------------------------------------------------

*Catalogue* (shared by all users; its own random stream). ``authors`` authors with popularity
``∝ rank^-author_zipf``, each with a home topic (one of ``topics``), a home content type (drawn with
the ``content_types.*.weight`` mix) and a quality ``N(0, author_quality_std²)``. ``items_per_day ×
days`` items are created uniformly over the logged period plus ``catalogue_items`` older ones
uniformly over the ``catalogue_days`` before it. An item keeps its author's topic with probability
``author_topic_loyalty`` (else a uniform topic) and its author's type with probability
``author_type_loyalty`` (else the mix); its quality is the author's plus ``N(0, item_quality_std²)``.

*Users.* Each user ``u`` has an activity level ``r_u`` (sessions per day, log-normal with mean
``sessions_per_day`` and log-std ``activity_log_std``), a daily peak hour ``h_u ~ N(peak_hour_mean,
peak_hour_std²) mod 24``, a weekend activity multiplier ``w_u = exp(N(weekend_activity_log_mean,
weekend_activity_log_std²))``, topic preferences ``π_u ~ Dirichlet(topic_concentration)`` and an
engagement bias ``b_u ~ N(0, user_bias_std²)``.

*Sessions* arrive as an inhomogeneous Poisson process (simulated by thinning) with intensity

    λ_u(t) = r_u · exp(κ·(cos(2π(hour(t) − h_u)/24) − 1)) / (I0(κ)·e^−κ) · m_u(t),   κ = daily_rhythm,
    m_u(t) = w_u on Saturday and Sunday, else 1, divided by (5 + 2·w_u)/7,

so a user averages ``r_u`` sessions a day and gaps between sessions range from minutes (around the
peak) to days. A session has ``Geometric(1/impressions_per_session)`` impressions, the first at the
session start and each next one ``impression_gap_min_s + Exp(impression_gap_mean_s)`` seconds later,
and one surface drawn with the ``surfaces.*.weight`` mix. Impressions past the period end are cut.

*Which item.* An impression's topic is drawn from ``π_u`` (uniformly with probability
``topic_explore_prob``). Its item is the newest item of that topic created at least an age ``a``
before the impression: with probability ``fresh_share`` ``a`` is exponential with mean
``fresh_age_mean_h`` hours (items are shown mostly while fresh), otherwise uniform over the whole
catalogue's age range (the topic's oldest item when none is old enough).

*Engagement.* ``contribution`` (like OR comment OR share) is drawn with ``p = σ(η)``,

    η = base_logit + surfaces[s].logit + b_u + quality_i
        + content_types[c].tod_logit · cos(2π(hour − content_types[c].tod_peak_hour)/24)
        + weekend_logit · [Saturday or Sunday]
        + freshness_logit · exp(−age_i / freshness_tau_h)
        + topic_interest_logit · exp(−Δt / topic_interest_tau_h)
        + author_recency_logit · exp(−Δa / author_recency_tau_min) · [Δa ≥ dwell_a + author_recency_delay_s],

where ``Δt`` is the wall-clock time since the user's last contribution on an item of the same topic
(∞ before the first), and ``Δa`` the time since the user's last engagement (click or contribution)
on an item of the same author, ``dwell_a`` that engagement's dwell (the newest one only: while it
is not yet observable the term is 0). Both decay with time and not
with the number of impressions in between, so a model that sees timestamps can exploit them and a
purely ordinal one cannot fully. The same-author term is the planted *relational* effect: it
depends only on the gap between the candidate and an earlier event, which a rotation of attention
scores can express (q_i·k_i, the token with itself, is unrotated, so no rotation can move a token's
prediction by its own time). It counts only once the earlier engagement was observable, its dwell
over and ``author_recency_delay_s`` (at least the feature job's logging delay) passed, so it is
learnable from the earlier token's actions, its author id and the gap; with the defaults the gaps of
the events it lifts run from half a minute within a session (median ≈ 3 minutes) to an hour across
sessions. The loop that carries the last-contribution time per (user, topic) and the last
engagement per (user, author) runs over the impression index, one vectorised step per position in
the users' time-ordered sequences, and draws each step's contribution, click and dwell.

*Actions.* Given a contribution, like/comment/share are independent draws with
``content_types[c].p_like / p_comment / p_share``, and a like when none of them fires, so
``p_like = σ(η) · (p_like + (1 − p_like)(1 − p_comment)(1 − p_share))``. ``click`` is drawn with
``click_given_contribution`` after a contribution and ``σ(η + click_logit_offset)`` otherwise.

*Ground truth by mechanism.* ``relational_logit`` is the same-author term of η (0 when no observable
same-author engagement precedes the event), ``topic_interest_logit`` the topic-interest term, and
``absolute_time_logit`` the terms set by the event's own time: content type × hour of day, weekend
and freshness. The rest of η (base, surface, user bias, item quality) is constant in time.

*Dwell.* ``log dwell_ms ~ N(μ_j, content_types[c].dwell_log_std²)`` with
``μ_j = log(content_types[c].dwell_median_ms) + dwell_logit_slope·(η − base_logit)
+ dwell_contribution_shift·j``, j = contribution (0 or 1); ``dwell_ms`` is its floor. With the
thresholds of the feed schema's ``long_dwell`` label, ``long_dwell = dwell_ms ≥ threshold[c]`` has the
analytic probability ``p_long_dwell = σ(η)·Q(z_1) + (1 − σ(η))·Q(z_0)``, Q the standard normal
tail and ``z_j = (log threshold[c] − μ_j)/dwell_log_std``.

*Sizes of the defaults.* Contribution ≈ 8.6 %, like ≈ 7 %, comment and share ≈ 1.7 % each, click
≈ 35 %, long dwell ≈ 26 %, ≈ 24 impressions per user-day. Time-dependent logit terms: topic interest
up to +1.5, same-author recency up to +1.2 (above 0.1 on ≈ 2.2 % of events, where contribution is
≈ 24 % against ≈ 8 % elsewhere), content type × hour of day ±0.6 to ±1.0, weekend +0.5, freshness
up to +0.8.

*Dirty data* (so the feature job's quarantine and dedup have work). Each event is corrupted with
probability ``bad_fraction``, into one of the kinds of :data:`BAD_EVENT_REASONS` chosen uniformly;
each clean event is emitted twice (same ``event_id``, identical row) with probability
``duplicate_fraction``. The manifest counts both.

*Scale.* Users are simulated and written ``users_per_chunk`` at a time, so memory is bounded by
the chunk, not the run. The catalogue and every chunk draw from their own random stream,
``numpy.random.SeedSequence(seed, spawn_key=(0,))`` and ``(1, chunk)``. The period
``start_date`` + ``days`` must lie between the contract's epoch and now.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from common.config import ConfigError, add_config_arguments, config_from_args, require, to_dict
from common.files import staged_directory
from features.dataset import check_replaceable, write_manifest
from features.schema import (
    DEFAULT_SCHEMA, INT32_MAX, REASON_EMPTY, REASON_MISSING, REASON_OUT_OF_RANGE, REASON_TOO_LONG,
    REASON_TS_BEFORE_EPOCH, REASON_TS_IN_FUTURE, SCHEMA_VERSION, ContractConfig, load_schema,
    schema_path, shipped_schemas,
)
from features.spec import SECONDS_PER_DAY, threshold
from features.synth_common import (
    FUTURE_SHIFT_MS, MS_PER_DAY, PRE_EPOCH_SPREAD_MS, ChunkTables, hour_of_day, normal_tail,
    segment_positions, sigmoid,
)
from features.synth_schema import SchemaProcess, SchemaWorld, SynthRun

log = logging.getLogger(__name__)

FEED_SCHEMA = load_schema("feed")
"""The schema the feed world writes: its fields, and the thresholds of its ``long_dwell`` label."""
DATASET_KIND = "synthetic_raw_events"
"""``dataset`` entry of the manifest; a directory carrying it may be replaced by a re-run."""
TRUTH_DIR = "_truth"
TRUTH_COLUMNS = ("p_contribution", "p_like", "p_long_dwell")
"""The probabilities each event's labels were drawn with."""
MECHANISM_COLUMNS = ("relational_logit", "topic_interest_logit", "absolute_time_logit")
"""Terms of each event's engagement logit η, by mechanism (module docstring, *Ground truth*)."""

BAD_EVENT_REASONS: dict[str, str] = {
    "empty_user_id": f"{REASON_EMPTY}:user_id",
    "null_item_id": f"{REASON_MISSING}:item_id",
    "long_topic": f"{REASON_TOO_LONG}:topic",
    "negative_dwell_ms": f"{REASON_OUT_OF_RANGE}:dwell_ms",
    "null_click": f"{REASON_MISSING}:click",
    "future_event_ts": REASON_TS_IN_FUTURE,
    "pre_epoch_event_ts": REASON_TS_BEFORE_EPOCH,
}
"""Injected fault kind → the reason :func:`features.validation.check_record` gives for it."""
BAD_KINDS: tuple[str, ...] = tuple(BAD_EVENT_REASONS)


@dataclass
class ContentTypeParams:
    weight: float
    """Share of this type among authors' home types and re-drawn item types."""
    tod_logit: float
    """Amplitude of this type's time-of-day effect on the engagement logit."""
    tod_peak_hour: float
    """UTC hour at which this type engages best (the effect is −tod_logit 12 hours later)."""
    dwell_median_ms: float
    dwell_log_std: float
    p_like: float
    """P(like | contribution); likewise ``p_comment`` and ``p_share``."""
    p_comment: float
    p_share: float


@dataclass
class SurfaceParams:
    weight: float
    """Share of sessions on this surface."""
    logit: float
    """Engagement logit offset of this surface."""


def _default_content_types() -> dict[str, ContentTypeParams]:
    return {
        "video": ContentTypeParams(0.30, 1.0, 21.0, 6_000.0, 1.0, 0.55, 0.15, 0.25),
        "image": ContentTypeParams(0.30, 0.6, 13.0, 1_600.0, 0.9, 0.70, 0.12, 0.10),
        "text": ContentTypeParams(0.25, 0.9, 8.0, 3_000.0, 1.0, 0.40, 0.40, 0.10),
        "link": ContentTypeParams(0.15, 0.6, 11.0, 3_500.0, 1.1, 0.40, 0.15, 0.35),
    }


def _default_surfaces() -> dict[str, SurfaceParams]:
    return {
        "feed": SurfaceParams(0.60, 0.0),
        "explore": SurfaceParams(0.20, -0.3),
        "notification": SurfaceParams(0.10, 0.5),
        "profile": SurfaceParams(0.10, 0.3),
    }


@dataclass
class GenerativeProcess:
    """Parameters of the generative process; the module docstring gives each one's role."""

    topics: int = 40
    topic_concentration: float = 0.3
    topic_explore_prob: float = 0.1
    authors: int = 2_000
    author_zipf: float = 0.8
    author_topic_loyalty: float = 0.8
    author_type_loyalty: float = 0.7
    author_quality_std: float = 0.3
    item_quality_std: float = 0.4
    items_per_day: int = 3_000
    catalogue_items: int = 20_000
    catalogue_days: float = 180.0
    fresh_share: float = 0.85
    fresh_age_mean_h: float = 18.0
    sessions_per_day: float = 3.0
    activity_log_std: float = 0.8
    peak_hour_mean: float = 20.0
    peak_hour_std: float = 4.0
    daily_rhythm: float = 1.5
    weekend_activity_log_mean: float = 0.25
    weekend_activity_log_std: float = 0.4
    user_bias_std: float = 0.5
    impressions_per_session: float = 8.0
    impression_gap_min_s: float = 2.0
    impression_gap_mean_s: float = 12.0
    surfaces: dict[str, SurfaceParams] = field(default_factory=_default_surfaces)
    content_types: dict[str, ContentTypeParams] = field(default_factory=_default_content_types)
    base_logit: float = -3.5
    weekend_logit: float = 0.5
    freshness_logit: float = 0.8
    freshness_tau_h: float = 12.0
    topic_interest_logit: float = 1.5
    topic_interest_tau_h: float = 3.0
    author_recency_logit: float = 1.2
    author_recency_tau_min: float = 25.0
    author_recency_delay_s: float = 30.0
    click_logit_offset: float = 2.0
    click_given_contribution: float = 0.8
    dwell_logit_slope: float = 0.3
    dwell_contribution_shift: float = 1.0

    def __post_init__(self) -> None:
        for name in ("topics", "authors", "items_per_day"):
            require(getattr(self, name) >= 1, f"process.{name}", "must be >= 1")
        require(self.catalogue_items >= self.topics, "process.catalogue_items",
                "must be >= process.topics (every topic needs an item older than the period)")
        for name in ("topic_concentration", "catalogue_days", "fresh_age_mean_h",
                     "sessions_per_day", "daily_rhythm", "impressions_per_session",
                     "freshness_tau_h", "topic_interest_tau_h", "author_recency_tau_min"):
            require(getattr(self, name) > 0, f"process.{name}", "must be > 0")
        require(self.impressions_per_session >= 1, "process.impressions_per_session", "must be >= 1")
        for name in ("author_zipf", "author_quality_std", "item_quality_std", "activity_log_std",
                     "peak_hour_std", "weekend_activity_log_std", "user_bias_std",
                     "impression_gap_min_s", "impression_gap_mean_s", "author_recency_delay_s"):
            require(getattr(self, name) >= 0, f"process.{name}", "must be >= 0")
        for name in ("topic_explore_prob", "author_topic_loyalty", "author_type_loyalty",
                     "fresh_share", "click_given_contribution"):
            require(0 <= getattr(self, name) <= 1, f"process.{name}", "must be in [0, 1]")
        _check_mix(self.surfaces, "process.surfaces")
        _check_mix(self.content_types, "process.content_types")
        for name, params in self.content_types.items():
            key = f"process.content_types.{name}"
            require(params.dwell_median_ms > 0, f"{key}.dwell_median_ms", "must be > 0")
            require(params.dwell_log_std > 0, f"{key}.dwell_log_std", "must be > 0")
            for action in ("p_like", "p_comment", "p_share"):
                require(0 <= getattr(params, action) <= 1, f"{key}.{action}", "must be in [0, 1]")


def _check_mix(mix: dict[str, Any], key: str) -> None:
    require(len(mix) > 0, key, "must name at least one entry")
    for name, params in mix.items():
        require(bool(name), key, "names must be non-empty")
        require(params.weight >= 0, f"{key}.{name}.weight", "must be >= 0")
    require(sum(params.weight for params in mix.values()) > 0, key, "weights must not all be 0")


@dataclass
class SynthConfig:
    """``sirenfeed synth``: how many users and days, and the process that generates them."""

    users: int = 1_000
    days: int = 14
    """Logged days from ``start_date`` on."""
    seed: int = 0
    """Seeds every random stream: the same config gives byte-identical files."""
    start_date: str = "2026-06-01"
    """First logged day (UTC, ISO ``YYYY-MM-DD``); the period must end before now."""
    users_per_chunk: int = 2_000
    """Users simulated and written together; bounds memory (one file per date per chunk)."""
    bad_fraction: float = 0.0005
    """Probability that an event is corrupted into one of the kinds of ``BAD_EVENT_REASONS``."""
    duplicate_fraction: float = 0.0005
    """Probability that a clean event is emitted twice (same ``event_id``, identical row)."""
    schema: str = DEFAULT_SCHEMA
    """The event schema of the logs, as ``spec.schema``: a shipped schema's name or a schema file's
    path. The feed schema gets the feed world (``process``), any other the generic world of
    features/synth_schema.py (``schema_process``)."""
    process: GenerativeProcess = field(default_factory=GenerativeProcess)
    """The feed world's generative process; the module docstring of features/synth.py gives the role
    of each key."""
    schema_process: SchemaProcess = field(default_factory=SchemaProcess)
    """The generic world's process, for every schema but the feed."""

    def __post_init__(self) -> None:
        path = schema_path(self.schema)
        require(path.is_file(), "schema", f"no schema file {path} (shipped: {', '.join(shipped_schemas())})")
        require(self.users >= 1, "users", "must be >= 1")
        require(self.days >= 1, "days", "must be >= 1")
        require(self.seed >= 0, "seed", "must be >= 0")
        require(self.users_per_chunk >= 1, "users_per_chunk", "must be >= 1")
        require(0 <= self.bad_fraction < 1, "bad_fraction", "must be in [0, 1)")
        require(0 <= self.duplicate_fraction < 1, "duplicate_fraction", "must be in [0, 1)")
        try:
            start = dt.date.fromisoformat(self.start_date)
        except ValueError:
            start = None
        require(start is not None and start.isoformat() == self.start_date, "start_date",
                f"must be an ISO date YYYY-MM-DD, got {self.start_date!r}")
        require(self.start_ms >= ContractConfig().epoch_ms, "start_date",
                "must not be before the event contract's epoch (features.schema.ContractConfig)")
        require(self.end_ms <= _wall_clock_ms(), "start_date",
                f"the period {self.start_date} + {self.days} days ends in the future; its events "
                "would fail the contract's future-timestamp check")

    @property
    def start_ms(self) -> int:
        start = dt.datetime.combine(dt.date.fromisoformat(self.start_date), dt.time(),
                                    tzinfo=dt.timezone.utc)
        return int(start.timestamp()) * 1000

    @property
    def end_ms(self) -> int:
        return self.start_ms + self.days * MS_PER_DAY


def _wall_clock_ms() -> int:
    return int(dt.datetime.now(dt.timezone.utc).timestamp() * 1000)


# ---------------------------------------------------------------------------------------------
# Small vectorised helpers


def is_weekend(ts_ms: np.ndarray) -> np.ndarray:
    # Day 0 of the Unix epoch was a Thursday, so (day + 3) % 7 counts from Monday = 0.
    return (np.floor_divide(ts_ms, MS_PER_DAY) + 3) % 7 >= 5


def _weights(mix: dict[str, Any]) -> np.ndarray:
    weights = np.array([params.weight for params in mix.values()], np.float64)
    return weights / weights.sum()


# ---------------------------------------------------------------------------------------------
# Catalogue


@dataclass
class Catalogue:
    """Items sorted by creation time (the item id is the index); times in seconds from start."""

    created_s: np.ndarray
    topic: np.ndarray
    content_type: np.ndarray
    quality: np.ndarray
    author: np.ndarray
    item_ids: pa.Array
    author_ids: pa.Array
    by_topic: np.ndarray
    """Item indices sorted by (topic, created)."""
    topic_keys: np.ndarray
    """``topic · key_span + created_s`` in ``by_topic`` order, for one global searchsorted."""
    topic_first: np.ndarray
    """Position in ``by_topic`` of each topic's oldest item."""
    key_span: float


def build_catalogue(process: GenerativeProcess, days: int, rng: np.random.Generator) -> Catalogue:
    n_new = process.items_per_day * days
    n_old = process.catalogue_items
    period_s = days * SECONDS_PER_DAY
    history_s = process.catalogue_days * SECONDS_PER_DAY
    type_weights = _weights(process.content_types)

    popularity = np.arange(1, process.authors + 1, dtype=np.float64) ** -process.author_zipf
    author_topic = rng.integers(0, process.topics, process.authors)
    author_type = rng.choice(len(type_weights), process.authors, p=type_weights)
    author_quality = rng.normal(0.0, process.author_quality_std, process.authors)

    n_items = n_new + n_old
    created = np.concatenate([rng.uniform(-history_s, 0.0, n_old), rng.uniform(0.0, period_s, n_new)])
    author = rng.choice(process.authors, n_items, p=popularity / popularity.sum())
    topic = np.where(rng.random(n_items) < process.author_topic_loyalty, author_topic[author],
                     rng.integers(0, process.topics, n_items))
    # Every topic gets an item older than the period, so every impression finds one.
    topic[:process.topics] = np.arange(process.topics)
    content_type = np.where(rng.random(n_items) < process.author_type_loyalty, author_type[author],
                            rng.choice(len(type_weights), n_items, p=type_weights))
    quality = author_quality[author] + rng.normal(0.0, process.item_quality_std, n_items)

    by_time = np.argsort(created, kind="stable")
    created, topic, content_type, quality, author = (
        created[by_time], topic[by_time], content_type[by_time], quality[by_time], author[by_time])
    item_width = max(7, len(str(n_items - 1)))
    author_width = max(6, len(str(process.authors - 1)))
    author_names = np.array([f"a{index:0{author_width}d}" for index in range(process.authors)],
                            dtype=object)

    by_topic = np.lexsort((created, topic))
    key_span = history_s + period_s + 1.0
    topic_keys = topic[by_topic] * key_span + created[by_topic]
    topic_first = np.searchsorted(topic[by_topic], np.arange(process.topics))
    return Catalogue(
        created_s=created, topic=topic, content_type=content_type, quality=quality, author=author,
        item_ids=pa.array([f"i{index:0{item_width}d}" for index in range(n_items)], pa.string()),
        author_ids=pa.array(author_names[author], pa.string()),
        by_topic=by_topic, topic_keys=topic_keys, topic_first=topic_first, key_span=key_span)


def pick_items(catalogue: Catalogue, topic: np.ndarray, t_s: np.ndarray, process: GenerativeProcess,
               rng: np.random.Generator) -> np.ndarray:
    """The newest item of ``topic`` created at least a random age before each impression."""
    n = len(topic)
    oldest_s = -process.catalogue_days * SECONDS_PER_DAY
    fresh_age = rng.exponential(process.fresh_age_mean_h * 3600.0, n)
    any_age = rng.uniform(0.0, 1.0, n) * (t_s - oldest_s)
    age = np.where(rng.random(n) < process.fresh_share, fresh_age, any_age)
    query = topic * catalogue.key_span + (t_s - age)
    position = np.searchsorted(catalogue.topic_keys, query, side="right") - 1
    position = np.maximum(position, catalogue.topic_first[topic])
    return catalogue.by_topic[position]


# ---------------------------------------------------------------------------------------------
# Users, sessions, impressions


@dataclass
class Users:
    rate: np.ndarray
    peak_hour: np.ndarray
    weekend: np.ndarray
    topic_cdf: np.ndarray
    bias: np.ndarray


def draw_users(n: int, process: GenerativeProcess, rng: np.random.Generator) -> Users:
    sigma = process.activity_log_std
    rate = process.sessions_per_day * np.exp(rng.normal(-0.5 * sigma**2, sigma, n))
    peak_hour = np.mod(rng.normal(process.peak_hour_mean, process.peak_hour_std, n), 24.0)
    weekend = np.exp(rng.normal(process.weekend_activity_log_mean,
                                process.weekend_activity_log_std, n))
    preferences = rng.dirichlet(np.full(process.topics, process.topic_concentration), n)
    topic_cdf = np.cumsum(preferences, axis=1)
    topic_cdf[:, -1] = 1.0
    bias = rng.normal(0.0, process.user_bias_std, n)
    return Users(rate, peak_hour, weekend, topic_cdf, bias)


def session_starts(users: Users, days: int, start_ms: int, process: GenerativeProcess,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Inhomogeneous Poisson session times by thinning: ``(user, seconds from start)``, sorted."""
    kappa = process.daily_rhythm
    daily_norm = np.i0(kappa) * np.exp(-kappa)  # mean of exp(κ(cos − 1)) over a day
    weekly_norm = (5.0 + 2.0 * users.weekend) / 7.0
    peak_rate = users.rate / daily_norm * np.maximum(users.weekend, 1.0) / weekly_norm
    candidates = rng.poisson(peak_rate * days)
    user = np.repeat(np.arange(len(candidates)), candidates)
    t_s = rng.uniform(0.0, days * SECONDS_PER_DAY, len(user))
    ts_ms = start_ms + (t_s * 1000.0).astype(np.int64)
    phase = 2.0 * np.pi * (hour_of_day(ts_ms) - users.peak_hour[user]) / 24.0
    intensity = (users.rate[user] * np.exp(kappa * (np.cos(phase) - 1.0)) / daily_norm
                 * np.where(is_weekend(ts_ms), users.weekend[user], 1.0) / weekly_norm[user])
    keep = rng.random(len(user)) * peak_rate[user] < intensity
    user, t_s = user[keep], t_s[keep]
    order = np.lexsort((t_s, user))
    return user[order], t_s[order]


@dataclass
class Impressions:
    """One chunk's impressions, sorted by (user, time)."""

    user: np.ndarray
    ts_ms: np.ndarray
    surface: np.ndarray
    topic: np.ndarray
    item: np.ndarray
    position: np.ndarray
    """Index of the event in its user's sequence (part of the event id)."""
    counts: np.ndarray
    """Events per user of the chunk."""


def draw_impressions(users: Users, catalogue: Catalogue, days: int, start_ms: int,
                     process: GenerativeProcess, rng: np.random.Generator) -> Impressions:
    session_user, session_t = session_starts(users, days, start_ms, process, rng)
    n_sessions = len(session_user)
    length = rng.geometric(1.0 / process.impressions_per_session, n_sessions)
    surface_of_session = rng.choice(len(process.surfaces), n_sessions, p=_weights(process.surfaces))

    user = np.repeat(session_user, length)
    gaps = process.impression_gap_min_s + rng.exponential(process.impression_gap_mean_s, len(user))
    gaps[np.cumsum(length) - length] = 0.0  # the first impression opens the session
    offset = np.cumsum(gaps)
    offset -= np.repeat(offset[np.cumsum(length) - length], length)
    t_s = np.repeat(session_t, length) + offset
    surface = np.repeat(surface_of_session, length)

    inside = t_s < days * SECONDS_PER_DAY
    user, t_s, surface = user[inside], t_s[inside], surface[inside]
    ts_ms = start_ms + (t_s * 1000.0).astype(np.int64)
    order = np.lexsort((ts_ms, user))  # sessions of one user may overlap
    user, ts_ms, surface = user[order], ts_ms[order], surface[order]

    n = len(user)
    topic = np.where(rng.random(n) < process.topic_explore_prob,
                     rng.integers(0, process.topics, n), preferred_topics(users, user, rng))
    item = pick_items(catalogue, topic, (ts_ms - start_ms) / 1000.0, process, rng)
    counts = np.bincount(user, minlength=len(users.bias))
    return Impressions(user, ts_ms, surface, topic, item, segment_positions(counts), counts)


def preferred_topics(users: Users, user: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Inverse-CDF draws from each impression's user's topic preferences, in one searchsorted:
    shifting user u's CDF row by u keeps the flattened rows sorted."""
    n_users, n_topics = users.topic_cdf.shape
    shifted = (np.arange(n_users)[:, None] + users.topic_cdf).ravel()
    flat = np.searchsorted(shifted, user + rng.random(len(user)), side="right")
    return np.minimum(flat - user * n_topics, n_topics - 1)


# ---------------------------------------------------------------------------------------------
# Engagement


def absolute_time_logit(events: Impressions, catalogue: Catalogue, start_ms: int,
                        process: GenerativeProcess) -> np.ndarray:
    """The terms of η set by the impression's own time: content type × hour, weekend, freshness."""
    types = list(process.content_types.values())
    tod_logit = np.array([params.tod_logit for params in types])
    tod_peak = np.array([params.tod_peak_hour for params in types])
    content_type = catalogue.content_type[events.item]
    age_s = (events.ts_ms - start_ms) / 1000.0 - catalogue.created_s[events.item]
    phase = 2.0 * np.pi * (hour_of_day(events.ts_ms) - tod_peak[content_type]) / 24.0
    return (tod_logit[content_type] * np.cos(phase)
            + process.weekend_logit * is_weekend(events.ts_ms)
            + process.freshness_logit * np.exp(-age_s / (process.freshness_tau_h * 3600.0)))


def static_logit(events: Impressions, users: Users, catalogue: Catalogue,
                 process: GenerativeProcess, absolute_time: np.ndarray) -> np.ndarray:
    """Every term of η except those relative to the user's earlier engagements."""
    surface_logit = np.array([params.logit for params in process.surfaces.values()])
    return (process.base_logit + surface_logit[events.surface] + users.bias[events.user]
            + catalogue.quality[events.item] + absolute_time)


@dataclass
class DwellModel:
    """``log dwell_ms ~ N(μ_j, log_std²)`` per event, ``μ_j = log_median + slope·(η − base_logit)
    + shift·j`` with j the contribution (module docstring, *Dwell*)."""

    log_median: np.ndarray
    log_std: np.ndarray
    slope: float
    base_logit: float
    shift: float

    @classmethod
    def of(cls, content_type: np.ndarray, process: GenerativeProcess) -> DwellModel:
        types = list(process.content_types.values())
        median = np.array([params.dwell_median_ms for params in types])[content_type]
        log_std = np.array([params.dwell_log_std for params in types])[content_type]
        return cls(np.log(median), log_std, process.dwell_logit_slope, process.base_logit,
                   process.dwell_contribution_shift)

    def location(self, eta: np.ndarray, index: np.ndarray | slice = slice(None)) -> np.ndarray:
        """μ_0 of the events at ``index``."""
        return self.log_median[index] + self.slope * (eta - self.base_logit)

    def draw(self, eta: np.ndarray, contribution: np.ndarray, noise: np.ndarray,
             index: np.ndarray) -> np.ndarray:
        """``dwell_ms`` of the events at ``index`` from their standard normal ``noise``."""
        log_dwell = (self.location(eta, index) + self.shift * contribution
                     + self.log_std[index] * noise)
        return np.floor(np.exp(np.minimum(log_dwell, math.log(INT32_MAX)))).astype(np.int32)


@dataclass
class Engagement:
    topic_interest: np.ndarray
    """The topic interest term of η per event."""
    author_recency: np.ndarray
    """The same-author recency term of η per event."""
    contribution: np.ndarray
    click: np.ndarray
    dwell_ms: np.ndarray


def draw_engagement(events: Impressions, static: np.ndarray, author: np.ndarray,
                    dwell: DwellModel, process: GenerativeProcess,
                    rng: np.random.Generator) -> Engagement:
    """Draw contributions and dwells in time order, with the terms of η that depend on them.

    One step per position k in the users' sequences, over the users that have a k-th event: users
    are visited by decreasing event count so they form a prefix ``[:active]`` at every step. The
    same-author state lives per (user, author) pair that occurs in the chunk, so memory follows the
    events, not users × authors.
    """
    counts = events.counts
    n_users = len(counts)
    order = np.argsort(-counts, kind="stable")
    first = (np.cumsum(counts) - counts)[order]
    active_at = np.searchsorted(np.sort(counts), np.arange(counts.max(initial=0)), side="right")
    active_at = n_users - active_at
    t_s = events.ts_ms / 1000.0
    topic_tau_s = process.topic_interest_tau_h * 3600.0
    author_tau_s = process.author_recency_tau_min * 60.0
    _, pair = np.unique(events.user.astype(np.int64) * process.authors + author, return_inverse=True)
    n = len(static)
    last_topic_contribution = np.full((n_users, process.topics), -np.inf)
    last_author_engagement = np.full(int(pair.max(initial=-1)) + 1, -np.inf)
    author_engagement_observable = np.full_like(last_author_engagement, np.inf)
    uniform = rng.random(n)
    click_uniform = rng.random(n)
    dwell_noise = rng.standard_normal(n)
    topic_interest = np.zeros(n)
    author_recency = np.zeros(n)
    contribution = np.zeros(n, dtype=bool)
    click = np.zeros(n, dtype=bool)
    dwell_ms = np.zeros(n, dtype=np.int32)
    for k, active in enumerate(active_at):
        rows = order[:active]
        index = first[:active] + k
        topic, user_author, now = events.topic[index], pair[index], t_s[index]
        step_interest = process.topic_interest_logit * np.exp(
            (last_topic_contribution[rows, topic] - now) / topic_tau_s)
        # Only an engagement the user's history could already show at ``now`` (its dwell over and
        # logged) counts, so the effect is learnable from the earlier token's actions and the gap.
        step_recency = np.where(
            now >= author_engagement_observable[user_author],
            process.author_recency_logit
            * np.exp((last_author_engagement[user_author] - now) / author_tau_s), 0.0)
        eta = static[index] + step_interest + step_recency
        engaged = uniform[index] < sigmoid(eta)
        clicked = click_uniform[index] < np.where(
            engaged, process.click_given_contribution, sigmoid(eta + process.click_logit_offset))
        step_dwell = dwell.draw(eta, engaged, dwell_noise[index], index)
        last_topic_contribution[rows[engaged], topic[engaged]] = now[engaged]
        trigger = engaged | clicked
        last_author_engagement[user_author[trigger]] = now[trigger]
        author_engagement_observable[user_author[trigger]] = (
            now[trigger] + step_dwell[trigger] / 1000.0 + process.author_recency_delay_s)
        topic_interest[index] = step_interest
        author_recency[index] = step_recency
        contribution[index] = engaged
        click[index] = clicked
        dwell_ms[index] = step_dwell
    return Engagement(topic_interest, author_recency, contribution, click, dwell_ms)


@dataclass
class Outcomes:
    contribution: np.ndarray
    like: np.ndarray
    comment: np.ndarray
    share: np.ndarray
    click: np.ndarray
    dwell_ms: np.ndarray
    p_contribution: np.ndarray
    p_like: np.ndarray
    p_long_dwell: np.ndarray


def draw_outcomes(eta: np.ndarray, engagement: Engagement, content_type: np.ndarray,
                  dwell: DwellModel, process: GenerativeProcess,
                  rng: np.random.Generator) -> Outcomes:
    """The actions given each contribution, and the probabilities every label was drawn with."""
    types = list(process.content_types.values())
    q_like, q_comment, q_share = (np.array([getattr(params, name) for params in types])[content_type]
                                  for name in ("p_like", "p_comment", "p_share"))
    contribution = engagement.contribution
    n = len(eta)
    comment = contribution & (rng.random(n) < q_comment)
    share = contribution & (rng.random(n) < q_share)
    like = contribution & ((rng.random(n) < q_like) | ~(comment | share))
    p_contribution = sigmoid(eta)
    p_like = p_contribution * (q_like + (1.0 - q_like) * (1.0 - q_comment) * (1.0 - q_share))

    # floor(D) >= threshold  <=>  D >= threshold for an integer threshold, so P is the log-normal tail.
    long_dwell = FEED_SCHEMA.config.labels["long_dwell"]
    dwell_threshold = np.array([threshold(long_dwell, name) for name in process.content_types],
                               np.float64)[content_type]
    log_threshold = np.log(np.maximum(dwell_threshold, 1.0))
    location = dwell.location(eta)
    tail_engaged = normal_tail((log_threshold - location - dwell.shift) / dwell.log_std)
    tail_other = normal_tail((log_threshold - location) / dwell.log_std)
    p_long = p_contribution * tail_engaged + (1.0 - p_contribution) * tail_other
    p_long_dwell = np.where(dwell_threshold > 0, p_long, 1.0)
    return Outcomes(contribution, like, comment, share, engagement.click, engagement.dwell_ms,
                    p_contribution, p_like, p_long_dwell)


# ---------------------------------------------------------------------------------------------
# One chunk of users → Arrow tables


def simulate_chunk(config: SynthConfig, catalogue: Catalogue, first_user: int, n_users: int,
                   rng: np.random.Generator) -> ChunkTables:
    process = config.process
    start_ms = config.start_ms
    users = draw_users(n_users, process, rng)
    events = draw_impressions(users, catalogue, config.days, start_ms, process, rng)
    content_type = catalogue.content_type[events.item]
    absolute_time = absolute_time_logit(events, catalogue, start_ms, process)
    static = static_logit(events, users, catalogue, process, absolute_time)
    dwell = DwellModel.of(content_type, process)
    engagement = draw_engagement(events, static, catalogue.author[events.item], dwell, process, rng)
    eta = static + engagement.topic_interest + engagement.author_recency
    outcomes = draw_outcomes(eta, engagement, content_type, dwell, process, rng)
    mechanisms = {"relational_logit": engagement.author_recency,
                  "topic_interest_logit": engagement.topic_interest,
                  "absolute_time_logit": absolute_time}
    return _tables(config, catalogue, first_user, n_users, events, content_type, outcomes,
                   mechanisms, rng)


def _tables(config: SynthConfig, catalogue: Catalogue, first_user: int, n_users: int,
            events: Impressions, content_type: np.ndarray, outcomes: Outcomes,
            mechanisms: dict[str, np.ndarray], rng: np.random.Generator) -> ChunkTables:
    n = len(events.user)
    faulty = rng.random(n) < config.bad_fraction
    kind = np.where(faulty, rng.integers(0, len(BAD_KINDS), n), -1)
    fault = {name: kind == index for index, name in enumerate(BAD_KINDS)}
    duplicated = ~faulty & (rng.random(n) < config.duplicate_fraction)

    contract = ContractConfig()
    event_ts = events.ts_ms.copy()
    event_ts[fault["future_event_ts"]] += FUTURE_SHIFT_MS
    pre_epoch = fault["pre_epoch_event_ts"]
    event_ts[pre_epoch] = np.maximum(
        contract.epoch_ms - rng.integers(1, PRE_EPOCH_SPREAD_MS, int(pre_epoch.sum())), 0)
    dwell_ms = np.where(fault["negative_dwell_ms"], -1 - outcomes.dwell_ms, outcomes.dwell_ms)

    user_width = max(6, len(str(config.users - 1)))
    names = [f"u{first_user + index:0{user_width}d}" for index in range(n_users)]
    id_prefixes = pa.array([f"{config.seed}-{name}-" for name in names], pa.string())
    user_names = pa.array(names + [""], pa.string())  # the extra "" is the empty-user fault
    topic_width = len(str(config.process.topics - 1))
    topic_names = [f"topic_{index:0{topic_width}d}" for index in range(config.process.topics)]
    oversize = [name + "-" + "x" * contract.max_string_len for name in topic_names]
    topic_names_arrow = pa.array(topic_names + oversize, pa.string())
    type_names = pa.array(list(config.process.content_types), pa.string())
    surface_names = pa.array(list(config.process.surfaces), pa.string())
    user_index = np.where(fault["empty_user_id"], n_users, events.user)
    topic_index = events.topic + config.process.topics * fault["long_topic"]

    def event_ids(order: np.ndarray) -> pa.Array:
        return pc.binary_join_element_wise(id_prefixes.take(pa.array(events.user[order])),
                                           pa.array(events.position[order]).cast(pa.string()), "")

    # Strings are gathered straight into output order from small dictionaries: far cheaper than
    # building them in simulation order and permuting the table.
    day = (events.ts_ms - config.start_ms) // MS_PER_DAY
    rows = np.repeat(np.arange(n), 1 + duplicated)  # a duplicate sits right after its original
    order = rows[np.argsort(day[rows], kind="stable")]
    columns = {
        "event_id": event_ids(order),
        "user_id": user_names.take(pa.array(user_index[order])),
        "item_id": catalogue.item_ids.take(
            pa.array(events.item[order], mask=fault["null_item_id"][order])),
        "author_id": catalogue.author_ids.take(pa.array(events.item[order])),
        "content_type": type_names.take(pa.array(content_type[order])),
        "topic": topic_names_arrow.take(pa.array(topic_index[order])),
        "surface": surface_names.take(pa.array(events.surface[order])),
        "event_ts": pa.array(event_ts[order], pa.int64()),
        "dwell_ms": pa.array(dwell_ms[order], pa.int32()),
        "click": pa.array(outcomes.click[order], pa.bool_(), mask=fault["null_click"][order]),
        "like": pa.array(outcomes.like[order], pa.bool_()),
        "comment": pa.array(outcomes.comment[order], pa.bool_()),
        "share": pa.array(outcomes.share[order], pa.bool_()),
    }
    raw_schema = FEED_SCHEMA.raw_arrow_schema
    table = pa.Table.from_arrays([columns[name] for name in raw_schema.names], schema=raw_schema)
    truth_order = np.argsort(day, kind="stable")
    truth = pa.table({"event_id": event_ids(truth_order),
                      **{name: getattr(outcomes, name)[truth_order] for name in TRUTH_COLUMNS},
                      **{name: mechanisms[name][truth_order] for name in MECHANISM_COLUMNS}})
    return ChunkTables(
        events=table, truth=truth, event_days=day[order], truth_days=day[truth_order],
        bad_counts={name: int(mask.sum()) for name, mask in fault.items()},
        duplicates=int(duplicated.sum()),
        watermark_ms=int(events.ts_ms[~faulty].max(initial=0)),
        active_users=int((events.counts > 0).sum()))


# ---------------------------------------------------------------------------------------------
# Writing


def day_name(config: SynthConfig, day: int) -> str:
    return (dt.date.fromisoformat(config.start_date) + dt.timedelta(days=int(day))).isoformat()


def _write_by_day(table: pa.Table, days: np.ndarray, root: Path, config: SynthConfig,
                  chunk: int) -> dict[str, int]:
    rows: dict[str, int] = {}
    bounds = np.searchsorted(days, np.arange(config.days + 1))
    for day in range(config.days):
        lo, hi = int(bounds[day]), int(bounds[day + 1])
        if hi == lo:
            continue
        name = day_name(config, day)
        directory = root / f"date={name}"
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(lo, hi - lo), directory / f"part-{chunk:05d}.parquet")
        rows[name] = hi - lo
    return rows


def _chunk_rng(seed: int, chunk: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, chunk)))


def _catalogue_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


SimulateChunk = Callable[[int, int, np.random.Generator], ChunkTables]
"""``(first user, users, the chunk's random stream) → the chunk's tables``."""


def _generate_into(root: Path, config: SynthConfig, simulate: SimulateChunk,
                   bad_kinds: Iterable[str]) -> dict[str, Any]:
    """Write the events and truth ``simulate`` draws, chunk by chunk, under ``root`` (no manifest);
    returns the manifest's counts."""
    dates: dict[str, int] = {}
    bad = dict.fromkeys(bad_kinds, 0)
    duplicates = active_users = watermark_ms = 0
    chunks = range(0, config.users, config.users_per_chunk)
    for chunk, first_user in enumerate(tqdm(chunks, desc="synth", unit="chunk")):
        n_users = min(config.users_per_chunk, config.users - first_user)
        tables = simulate(first_user, n_users, _chunk_rng(config.seed, chunk))
        for name, count in _write_by_day(tables.events, tables.event_days, root, config, chunk).items():
            dates[name] = dates.get(name, 0) + count
        _write_by_day(tables.truth, tables.truth_days, root / TRUTH_DIR, config, chunk)
        for name, count in tables.bad_counts.items():
            bad[name] += count
        duplicates += tables.duplicates
        active_users += tables.active_users
        watermark_ms = max(watermark_ms, tables.watermark_ms)
    events = sum(dates.values())
    bad_total = sum(bad.values())
    return {
        "events": events,
        "valid_events": events - bad_total,
        "unique_valid_events": events - bad_total - duplicates,
        "bad_events": bad,
        "bad_events_total": bad_total,
        "duplicates": duplicates,
        "users": config.users,
        "active_users": active_users,
        "days": config.days,
        "dates": dict(sorted(dates.items())),
        "watermark_ms": watermark_ms,
    }


def write_synthetic_logs(config: SynthConfig, out: str | Path) -> dict[str, Any]:
    """Generate the logs of ``config`` into ``out``, replacing it atomically; returns the manifest."""
    target = Path(out)
    check_replaceable(target, DATASET_KIND, "synthetic logs")
    schema = load_schema(config.schema)
    if schema.fingerprint == FEED_SCHEMA.fingerprint:
        catalogue = build_catalogue(config.process, config.days, _catalogue_rng(config.seed))

        def simulate(first_user: int, n_users: int, rng: np.random.Generator) -> ChunkTables:
            return simulate_chunk(config, catalogue, first_user, n_users, rng)

        bad_event_reasons = BAD_EVENT_REASONS
    else:
        # Refuses a schema it cannot generate (UnsupportedSchemaError) before anything is written.
        run = SynthRun(config.users, config.days, config.start_ms, config.seed, config.bad_fraction,
                       config.duplicate_fraction)
        world = SchemaWorld(schema, config.schema_process, run, _catalogue_rng(config.seed))
        simulate, bad_event_reasons = world.simulate_chunk, world.bad_event_reasons
    with staged_directory(target) as staging:
        counts = _generate_into(staging, config, simulate, bad_event_reasons)
        manifest = {
            "dataset": DATASET_KIND,
            "schema_version": SCHEMA_VERSION,
            "schema": schema.to_dict(),
            "seed": config.seed,
            "start_date": config.start_date,
            "end_date": day_name(config, config.days),
            "truth_dir": TRUTH_DIR,
            "bad_event_reasons": bad_event_reasons,
            **counts,
            "config": to_dict(config),
        }
        write_manifest(staging, manifest)
    log.info("wrote %d %s events (%d bad, %d duplicates) of %d users over %d days to %s",
             manifest["events"], schema.name, manifest["bad_events_total"], manifest["duplicates"],
             config.users, config.days, target)
    return manifest


# ---------------------------------------------------------------------------------------------
# Command


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed synth", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="RAW_DIR", help="output directory")
    parser.add_argument("--users", type=int, help="number of users (config key users)")
    parser.add_argument("--days", type=int, help="number of days (config key days)")
    parser.add_argument("--seed", type=int, help="random seed (config key seed)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(SynthConfig, args, users=args.users, days=args.days,
                                  seed=args.seed)
    except ConfigError as error:
        parser.error(str(error))
    manifest = write_synthetic_logs(config, args.out)
    rows = [("events", manifest["events"]), ("valid events", manifest["valid_events"]),
            ("bad events", manifest["bad_events_total"]), ("duplicates", manifest["duplicates"]),
            ("users", manifest["users"]), ("days", manifest["days"]),
            ("watermark", dt.datetime.fromtimestamp(manifest["watermark_ms"] / 1000,
                                                    dt.timezone.utc).isoformat())]
    print("\n".join(f"{name:<14} {value}" for name, value in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
