"""The synthetic log generator: the feed world (layout, contract, dirty data, ground truth, planted
effects) and the generic world of every other schema."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError, load_config, to_dict
from common.repo import REPO_ROOT
from features.dataset import SUCCESS_NAME, read_manifest
from features.schema import ContractConfig, load_schema
from features.spec import label_values, threshold
from features.synth import (
    BAD_EVENT_REASONS, FEED_SCHEMA, MECHANISM_COLUMNS, TRUTH_COLUMNS, TRUTH_DIR, GenerativeProcess,
    SynthConfig, main, write_synthetic_logs,
)
from features.synth_schema import UnsupportedSchemaError
from features.validation import check_record

DIRTY = ["users=60", "days=4", "seed=11", "users_per_chunk=25", "bad_fraction=0.03",
         "duplicate_fraction=0.02"]
CLEAN_SAMPLE = ["users=400", "days=14", "seed=5", "bad_fraction=0", "duplicate_fraction=0"]
NO_AUTHOR_RECENCY = ["process.author_recency_logit=0"]
NO_TEMPORAL_EFFECTS = ["process.topic_interest_logit=0", "process.weekend_logit=0",
                       *NO_AUTHOR_RECENCY] + [
    f"process.content_types.{name}.tod_logit=0" for name in ("video", "image", "text", "link")]
DATE = ds.partitioning(pa.schema([("date", pa.string())]), flavor="hive")


def synth(*overrides: str) -> SynthConfig:
    return load_config(SynthConfig, None, list(overrides))


def read_raw(root: Path) -> pd.DataFrame:
    return ds.dataset(root, format="parquet", partitioning=DATE).to_table().to_pandas()


def read_truth(root: Path) -> pd.DataFrame:
    return ds.dataset(root / TRUTH_DIR, format="parquet", partitioning=DATE).to_table().to_pandas()


def file_digests(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def dirty(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    root = tmp_path_factory.mktemp("dirty") / "raw"
    manifest = write_synthetic_logs(synth(*DIRTY), root)
    raw = read_raw(root)
    raw["reason"] = [check_record(record, FEED_SCHEMA, ContractConfig())
                     for record in raw.drop(columns="date").to_dict("records")]
    return root, manifest, raw


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> pd.DataFrame:
    root = tmp_path_factory.mktemp("sample") / "raw"
    write_synthetic_logs(synth(*CLEAN_SAMPLE), root)
    truth = read_truth(root)[["event_id", *TRUTH_COLUMNS, *MECHANISM_COLUMNS]]
    return with_history(read_raw(root).merge(truth))


@pytest.fixture(scope="module")
def null_sample(tmp_path_factory) -> pd.DataFrame:
    """The same world with the time-dependent effects switched off: the statistics must vanish."""
    root = tmp_path_factory.mktemp("null") / "raw"
    write_synthetic_logs(synth(*CLEAN_SAMPLE, *NO_TEMPORAL_EFFECTS), root)
    return with_history(read_raw(root))


@pytest.fixture(scope="module")
def no_author_recency_sample(tmp_path_factory) -> pd.DataFrame:
    """The same world with only the same-author recency effect switched off."""
    root = tmp_path_factory.mktemp("no_author_recency") / "raw"
    write_synthetic_logs(synth(*CLEAN_SAMPLE, *NO_AUTHOR_RECENCY), root)
    return with_history(read_raw(root))


def with_history(frame: pd.DataFrame) -> pd.DataFrame:
    """Adds labels, and per event the wall-clock hours and the number of the user's impressions
    since the user's previous contribution on the same topic (NaN before the first), and the time
    and dwell of the user's previous engagement (click or contribution) on the same author."""
    frame = frame.sort_values(["user_id", "event_ts"], kind="stable").reset_index(drop=True)
    frame["contribution"] = frame.like | frame.comment | frame.share
    frame["position"] = frame.groupby("user_id").cumcount()
    by_topic = [frame.user_id, frame.topic]
    for column, source in (("last_ts", "event_ts"), ("last_position", "position")):
        at_contribution = frame[source].where(frame.contribution)
        frame[column] = at_contribution.groupby(by_topic).shift(1).groupby(by_topic).ffill()
    frame["hours_since"] = (frame.event_ts - frame.last_ts) / 3.6e6
    frame["impressions_since"] = frame.position - frame.last_position
    by_author = [frame.user_id, frame.author_id]
    for column, source in (("author_last_ts", "event_ts"), ("author_last_dwell_ms", "dwell_ms")):
        at_engagement = frame[source].where(frame.contribution | frame.click)
        frame[column] = at_engagement.groupby(by_author).shift(1).groupby(by_author).ffill()
    frame["author_gap_min"] = (frame.event_ts - frame.author_last_ts) / 6e4
    frame["hour"] = (frame.event_ts // 3_600_000) % 24
    frame["weekend"] = (frame.event_ts // 86_400_000 + 3) % 7 >= 5
    return frame


def log_odds(labels: pd.Series) -> float:
    rate = labels.mean()
    return float(np.log(rate / (1.0 - rate)))


# --- layout, determinism, atomicity ----------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    config = synth("users=30", "days=2", "seed=9", "users_per_chunk=12", "bad_fraction=0.01")
    first = write_synthetic_logs(config, tmp_path / "a")
    second = write_synthetic_logs(config, tmp_path / "b")
    digests = file_digests(tmp_path / "a")
    assert first == second
    assert digests == file_digests(tmp_path / "b")
    assert write_synthetic_logs(config, tmp_path / "a") == first  # a re-run replaces in place
    assert file_digests(tmp_path / "a") == digests
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a", "b"]  # no staging left

    write_synthetic_logs(synth("users=30", "days=2", "seed=10"), tmp_path / "c")
    same, other = read_raw(tmp_path / "a"), read_raw(tmp_path / "c")
    assert not set(zip(same.user_id, same.event_ts)) & set(zip(other.user_id, other.event_ts))


def test_files_have_the_raw_schema_and_the_date_of_their_events(dirty):
    root, manifest, raw = dirty
    files = sorted(root.glob("date=*/part-*.parquet"))
    assert {path.name for path in files} == {"part-00000.parquet", "part-00001.parquet",
                                             "part-00002.parquet"}  # 60 users in chunks of 25
    for path in files:
        assert pq.read_schema(path).equals(FEED_SCHEMA.raw_arrow_schema)
    ts_faults = raw.reason.isin(
        [BAD_EVENT_REASONS["future_event_ts"], BAD_EVENT_REASONS["pre_epoch_event_ts"]])
    assert ts_faults.sum() > 0
    days = pd.to_datetime(raw.event_ts[~ts_faults], unit="ms", utc=True).dt.strftime("%Y-%m-%d")
    assert (days == raw.date[~ts_faults]).all()
    assert sorted(raw.date.unique()) == list(manifest["dates"]) == [
        "2026-06-01", "2026-06-02", "2026-06-03", "2026-06-04"]
    config = synth(*DIRTY)
    for path in files:  # sorted by (user, time) within a file, faults aside
        events = pq.read_table(path, columns=["user_id", "event_ts"]).to_pandas()
        events = events[(events.user_id != "")
                        & events.event_ts.between(config.start_ms, config.end_ms - 1)]
        assert events.equals(events.sort_values(["user_id", "event_ts"], kind="stable"))


def test_clean_events_pass_the_contract_and_each_fault_fails_with_its_reason(dirty):
    _, manifest, raw = dirty
    reasons = collections.Counter(raw.reason)
    assert reasons.pop(None) == manifest["valid_events"]
    assert reasons == {BAD_EVENT_REASONS[kind]: count
                       for kind, count in manifest["bad_events"].items() if count}
    assert min(manifest["bad_events"].values()) > 0
    assert sum(reasons.values()) == manifest["bad_events_total"]


def test_duplicates_are_identical_clean_rows_and_counted(dirty):
    _, manifest, raw = dirty
    copies = raw.event_id.value_counts()
    assert copies.max() == 2
    duplicated = raw[raw.event_id.isin(copies.index[copies == 2])]
    assert len(duplicated) == 2 * manifest["duplicates"] > 0
    pairs = duplicated.groupby("event_id").nunique(dropna=False)
    assert (pairs == 1).all().all()
    assert duplicated.reason.isna().all()


def test_manifest_counts_equal_the_data(dirty):
    root, manifest, raw = dirty
    assert read_manifest(root) == manifest
    assert manifest["events"] == len(raw)
    assert manifest["unique_valid_events"] == manifest["valid_events"] - manifest["duplicates"]
    assert manifest["valid_events"] == len(raw) - manifest["bad_events_total"]
    assert manifest["dates"] == raw.groupby("date").size().to_dict()
    assert (manifest["users"], manifest["days"], manifest["seed"], manifest["start_date"]) == (
        60, 4, 11, "2026-06-01")
    assert manifest["active_users"] == raw.user_id[raw.user_id != ""].nunique()
    assert manifest["watermark_ms"] == raw.event_ts[raw.reason.isna()].max()
    assert manifest["config"]["process"]["topics"] == 40


def test_truth_aligns_one_to_one_with_event_ids(dirty):
    root, _, raw = dirty
    truth = read_truth(root)
    assert truth.event_id.is_unique
    assert set(truth.event_id) == set(raw.event_id)
    placed = raw.drop_duplicates("event_id").set_index("event_id").date
    assert (truth.set_index("event_id").date == placed.loc[truth.event_id]).all()
    for column in TRUTH_COLUMNS:
        assert truth[column].dtype == np.float64
        assert ((truth[column] > 0) & (truth[column] < 1)).all(), column
    assert (truth.p_like < truth.p_contribution).all()
    for column in MECHANISM_COLUMNS:
        assert truth[column].dtype == np.float64 and np.isfinite(truth[column]).all(), column
    assert (truth.relational_logit >= 0).all() and (truth.relational_logit > 0).any()
    assert (truth.absolute_time_logit != 0).all()


# --- the generative process ----------------------------------------------------------------


def test_base_rates_are_plausible_and_truth_is_calibrated(sample):
    long_dwell = FEED_SCHEMA.config.labels["long_dwell"]
    dwell_threshold = sample.content_type.map(lambda name: threshold(long_dwell, name))
    labels = {"p_contribution": sample.contribution, "p_like": sample.like,
              "p_long_dwell": sample.dwell_ms >= dwell_threshold}
    plausible = {"p_contribution": (0.05, 0.12), "p_like": (0.04, 0.08),
                 "p_long_dwell": (0.15, 0.30)}
    for column, label in labels.items():
        low, high = plausible[column]
        assert low < label.mean() < high, column
        probability = sample[column]
        error = np.sqrt((probability * (1 - probability)).sum()) / len(sample)
        assert abs(label.mean() - probability.mean()) < 4 * error, column
        # The truth is informative: its log loss beats the base rate's (normalized entropy < 1).
        rate = label.mean()
        entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
        log_loss = -np.where(label, np.log(probability), np.log(1 - probability)).mean()
        assert log_loss / entropy < 0.97, column


def topic_interest_log_odds_ratio(frame: pd.DataFrame) -> float:
    """Mantel–Haenszel log odds ratio of a contribution shortly (< 1 h) versus long (> 12 h) after the
    user's last contribution on the topic, within strata of the impressions in between."""
    seen = frame[frame.impressions_since.between(1, 40)]
    seen = seen[(seen.hours_since < 1) | (seen.hours_since > 12)]
    numerator = denominator = 0.0
    for _, stratum in seen.groupby(pd.cut(seen.impressions_since, [0, 2, 4, 8, 16, 40]),
                                 observed=True):
        near = stratum.hours_since < 1
        a, b = (near & stratum.contribution).sum(), (near & ~stratum.contribution).sum()
        c, d = (~near & stratum.contribution).sum(), (~near & ~stratum.contribution).sum()
        numerator += a * d / len(stratum) if len(stratum) else 0.0
        denominator += b * c / len(stratum) if len(stratum) else 0.0
    return float(np.log(numerator / denominator))


def test_topic_interest_decays_with_wall_clock_time_not_impressions(sample, null_sample):
    planted = topic_interest_log_odds_ratio(sample)
    control = topic_interest_log_odds_ratio(null_sample)
    assert planted > 0.8
    assert abs(control) < 0.4
    assert planted - control > 0.7


def observable_author_engagement(frame: pd.DataFrame) -> pd.Series:
    """Whether the user's newest earlier engagement on the same author had been observable (its
    time + dwell + the logging delay) by the event's time."""
    delay_ms = 1000.0 * GenerativeProcess().author_recency_delay_s
    return frame.event_ts - frame.author_last_ts >= frame.author_last_dwell_ms + delay_ms


def test_truth_holds_the_same_author_recency_term_recomputed_from_the_logs(sample):
    process = GenerativeProcess()
    expected = np.where(observable_author_engagement(sample), process.author_recency_logit
                        * np.exp(-sample.author_gap_min / process.author_recency_tau_min), 0.0)
    np.testing.assert_allclose(sample.relational_logit, expected, rtol=1e-9, atol=1e-12)
    active = sample.relational_logit > 0.1
    assert 0.02 < active.mean() < 0.3
    # Gaps run from a minute within a session to an hour across sessions, so the decay with
    # wall-clock time, not only the presence of the earlier engagement, shapes the effect.
    gap_s = sample.author_gap_min[active] * 60
    assert gap_s.min() >= GenerativeProcess().author_recency_delay_s
    assert gap_s.median() > 120 and (gap_s > 600).mean() > 0.2


def author_recency_log_odds_ratio(frame: pd.DataFrame) -> float:
    """Log odds ratio of a contribution within 20 minutes after an observable engagement on the
    same author versus more than 6 hours after one."""
    seen = frame[observable_author_engagement(frame)]
    near = seen.author_gap_min < 20
    far = seen.author_gap_min > 360
    return log_odds(seen.contribution[near]) - log_odds(seen.contribution[far])


def test_a_recent_same_author_engagement_lifts_engagement(sample, no_author_recency_sample):
    """The planted effect shows in the labels: against the same world without it (where the gap
    still carries topic interest and users' and authors' engagement levels), engagement shortly
    after an observable same-author engagement is clearly higher."""
    planted = author_recency_log_odds_ratio(sample)
    control = author_recency_log_odds_ratio(no_author_recency_sample)
    assert planted - control > 0.5
    assert (sample.contribution[sample.relational_logit > 0.5].mean()
            > 1.5 * sample.contribution[sample.relational_logit == 0].mean())


def content_time_interaction(frame: pd.DataFrame) -> float:
    """How much more video gains from evening (18–24 h) over morning (6–12 h) than text does."""
    def gain(content_type: str) -> float:
        rows = frame[frame.content_type == content_type]
        return (log_odds(rows.contribution[rows.hour >= 18])
                - log_odds(rows.contribution[rows.hour.between(6, 11)]))
    return gain("video") - gain("text")


def test_engagement_depends_on_content_type_by_time_of_day(sample, null_sample):
    assert content_time_interaction(sample) > 1.5
    assert abs(content_time_interaction(null_sample)) < 0.5


def test_weekends_differ(sample, null_sample):
    def weekend_effect(frame: pd.DataFrame) -> float:
        return (log_odds(frame.contribution[frame.weekend])
                - log_odds(frame.contribution[~frame.weekend]))
    assert weekend_effect(sample) > 0.3
    assert abs(weekend_effect(null_sample)) < 0.15
    per_day = sample.groupby("date").agg(events=("event_id", "size"), weekend=("weekend", "first"))
    assert per_day.events[per_day.weekend].mean() > 1.1 * per_day.events[~per_day.weekend].mean()


def test_sessions_make_gaps_from_seconds_to_days(sample):
    gaps_s = sample.groupby("user_id").event_ts.diff().dropna() / 1000.0
    assert (gaps_s >= 2.0).mean() > 0.99  # impression_gap_min_s, unless two sessions overlap
    assert (gaps_s < 60).mean() > 0.5  # mostly within a session
    assert (gaps_s > 3600).mean() > 0.05  # between sessions
    assert gaps_s.max() > 86_400


# --- configuration and the command ---------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("users=-1", "'users'"),
    ("days=0", "'days'"),
    ("start_date=2026-13-01", "'start_date'"),
    ("start_date=2999-01-01", "'start_date'"),
    ("bad_fraction=1.5", "'bad_fraction'"),
    ("process.content_types.video.p_like=2", "'process.content_types.video.p_like'"),
    ("process.topic_interest_tau_h=0", "'process.topic_interest_tau_h'"),
    ("process.author_recency_tau_min=0", "'process.author_recency_tau_min'"),
    ("process.author_recency_delay_s=-1", "'process.author_recency_delay_s'"),
    ("process.no_such_key=1", "process.no_such_key"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        synth(override)


def test_command_writes_the_dataset_and_rejects_bad_config(tmp_path, capsys):
    out = tmp_path / "raw"
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--users", "-1"])
    assert exit_info.value.code == 2
    assert "'users'" in capsys.readouterr().err
    assert not out.exists()

    assert main(["--out", str(out), "--users", "20", "--days", "2", "--seed", "4",
                 "--config", str(REPO_ROOT / "conf" / "synth.yaml"), "users_per_chunk=7"]) == 0
    manifest = read_manifest(out)
    assert (manifest["users"], manifest["days"], manifest["seed"]) == (20, 2, 4)
    assert manifest["config"]["users_per_chunk"] == 7
    assert f"events         {manifest['events']}" in capsys.readouterr().out


def test_yaml_mirrors_the_defaults():
    assert to_dict(load_config(SynthConfig, REPO_ROOT / "conf" / "synth.yaml")) == to_dict(SynthConfig())


def test_refuses_to_replace_a_foreign_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        write_synthetic_logs(synth("users=5", "days=1"), tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert [path.name for path in tmp_path.iterdir()] == ["keep.txt"]


def test_killed_run_leaves_the_previous_dataset_untouched(tmp_path):
    out = tmp_path / "raw"
    previous = write_synthetic_logs(synth("users=10", "days=1", "seed=1"), out)
    digests = file_digests(out)
    command = [sys.executable, "-m", "features.synth", "--out", str(out), "--users", "200000",
               "--days", "14", "users_per_chunk=500"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".raw.staging-*/date=*/part-*.parquet")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert read_manifest(out) == previous
    assert file_digests(out) == digests
    staging = [path for path in tmp_path.iterdir() if path != out]
    assert staging and not any((path / SUCCESS_NAME).exists() for path in staging)


# --- the generic world of every other schema ------------------------------------------------

WATCH = ["schema=watch", "users=60", "days=3", "seed=4", "users_per_chunk=25", "bad_fraction=0.03",
         "duplicate_fraction=0.02"]


@pytest.fixture(scope="module")
def watch(tmp_path_factory) -> tuple[Path, dict, pd.DataFrame]:
    root = tmp_path_factory.mktemp("watch") / "raw"
    manifest = write_synthetic_logs(synth(*WATCH), root)
    raw = read_raw(root)
    schema = load_schema("watch")
    raw["reason"] = [check_record(record, schema, ContractConfig())
                     for record in raw.drop(columns="date").to_dict("records")]
    return root, manifest, raw


def test_watch_logs_pass_the_watch_schema_but_for_the_injected_faults(watch):
    root, manifest, raw = watch
    schema = load_schema("watch")
    for path in sorted(root.glob("date=*/part-*.parquet")):
        assert pq.read_schema(path).equals(schema.raw_arrow_schema)
    reasons = collections.Counter(raw.reason)
    assert reasons.pop(None) == manifest["valid_events"] == len(raw) - manifest["bad_events_total"]
    assert reasons == {manifest["bad_event_reasons"][kind]: count
                       for kind, count in manifest["bad_events"].items() if count}
    assert {"not_allowed:format", "out_of_range:tz_offset_min", "ts_before_epoch", "ts_in_future",
            "empty:viewer"} <= set(reasons)
    assert manifest["schema"]["name"] == "watch" and manifest["config"]["schema"] == "watch"
    valid = raw[raw.reason.isna()]
    # Times in seconds, dated by their UTC day; a user keeps one whole-hour offset within the range.
    days = pd.to_datetime(valid.ts, unit="s", utc=True).dt.strftime("%Y-%m-%d")
    assert (days == valid.date).all()
    offsets = valid.groupby("viewer").tz_offset_min.nunique()
    assert (offsets == 1).all() and (valid.tz_offset_min % 60 == 0).all()
    assert valid.tz_offset_min.between(-720, 840).all() and valid.tz_offset_min.nunique() > 5
    assert set(valid.format) == {"short", "long", "live"}
    # Vocabularies well below the tables, shared by the fields of one table.
    assert 100 < valid.post_id.nunique() < 50021 // 5
    assert set(valid.origin_post_id) & set(valid.post_id)
    assert (valid.video_s > 0).all() and (valid.watch_ms > 0).mean() > 0.99
    copies = raw.impression_id.value_counts()
    assert (copies == 2).sum() == manifest["duplicates"] > 0


def test_watch_truth_is_calibrated_and_informative(watch):
    root, _, raw = watch
    schema = load_schema("watch")
    truth = read_truth(root).drop(columns="date")
    valid = raw[raw.reason.isna()].drop_duplicates("impression_id")
    events = valid.merge(truth, left_on="impression_id", right_on="event_id")
    assert len(events) == len(valid) and set(truth.event_id) == set(raw.impression_id)
    for task in schema.label_columns:
        label = label_values(schema.config.labels[task], events.to_dict("records"))
        probability = events[f"p_{task}"].to_numpy()
        error = np.sqrt((probability * (1 - probability)).sum()) / len(events)
        assert abs(label.mean() - probability.mean()) < 4 * error, task
        rate = label.mean()
        entropy = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
        clipped = np.clip(probability, 1e-12, 1 - 1e-12)
        log_loss = -np.where(label == 1, np.log(clipped), np.log(1 - clipped)).mean()
        assert log_loss / entropy < 0.9, task  # the planted signal: affinity, hour, inputs


def test_other_schemas_are_deterministic_given_the_seed(tmp_path):
    config = synth("schema=movielens", "users=20", "days=2", "seed=9", "users_per_chunk=8",
                   "bad_fraction=0.02")
    first = write_synthetic_logs(config, tmp_path / "a")
    assert write_synthetic_logs(config, tmp_path / "b") == first
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "b")
    write_synthetic_logs(synth("schema=movielens", "users=20", "days=2", "seed=10"), tmp_path / "c")
    assert file_digests(tmp_path / "c") != file_digests(tmp_path / "a")
    raw = read_raw(tmp_path / "a")
    assert (~raw.rating.between(1, 5)).sum() == first["bad_events"]["out_of_range_rating"]


def test_a_schema_that_cannot_be_generated_is_refused_before_anything_is_written(tmp_path):
    values = load_schema("watch").to_dict()
    values["fields"]["impression_id"]["values"] = ["a", "b"]
    values["labels"]["watched"]["at_least"] = 10.0**12  # beyond any int32 watch_ms
    values["labels"]["watched"]["thresholds"] = {}
    values["fields"]["format"]["values"] = ["short", "long"]
    values["labels"]["live"] = {"field": "format", "equals": "live"}
    values["tasks"]["live"] = 1.0
    path = tmp_path / "odd.yaml"
    path.write_text(json.dumps(values))
    out = tmp_path / "raw"
    with pytest.raises(UnsupportedSchemaError) as error:
        write_synthetic_logs(synth(f"schema={path}", "users=5", "days=1"), out)
    message = str(error.value)
    assert "fields.impression_id" in message and "labels.watched" in message
    assert "labels.live" in message and "'live'" in message
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["odd.yaml"]


def test_command_writes_another_schema(tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["--out", str(out), "--users", "8", "--days", "1", "schema=watch"]) == 0
    manifest = read_manifest(out)
    assert manifest["schema"]["name"] == "watch" and manifest["users"] == 8
    assert f"events         {manifest['events']}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "other"), "schema=no_such_schema"])
    assert "'schema'" in capsys.readouterr().err
