"""The whole job in-process on a hand-built landing zone: quarantine, manifest, output layout, Petastorm
readability, idempotent re-runs and atomic replacement."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from py4j.protocol import Py4JJavaError

from features.dataset import MANIFEST_NAME, SUCCESS_NAME, read_manifest
from features.full import run
from features.hadoop import FeatureJobError, read_raw
from feature_support import raw_events
from features.schema import ContractConfig, load_schema
from features.settings import FeaturesConfig
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec, transform
from features.summary import describe

FEED = load_schema("feed")

MONDAY = 1_780_272_000_000
HOUR_MS, DAY_MS = 3_600_000, 86_400_000
NOW_MS = MONDAY + 10 * DAY_MS
C = 5

BAD = {  # field overrides → the reason the event must be quarantined with
    "missing:item_id": {"item_id": None},
    "empty:user_id": {"user_id": ""},
    "too_long:topic": {"topic": "x" * 300},
    "out_of_range:dwell_ms": {"dwell_ms": -5},
    "out_of_range:event_ts": {"event_ts": -1},
    "missing:click": {"click": None},
    "ts_before_epoch": {"event_ts": 1_000_000_000_000},
    "ts_in_future": {"event_ts": NOW_MS + DAY_MS},
    "missing:event_id": {"event_id": None},
    "empty:surface": {"surface": ""},
}
DUPLICATES = 3


@pytest.fixture(scope="module")
def raw(tmp_path_factory, write_landing):
    """Six users over three days (the last one is eval), ten kinds of bad events, three duplicates."""
    good = []
    for user in range(1, 7):
        for i in range(3 + user):
            good.append({"event_id": f"u{user}-{i}", "user_id": f"u{user}", "item_id": f"i{i % 4}",
                         "author_id": "a", "content_type": ["video", "image", "text"][i % 3],
                         "topic": "news", "surface": "feed",
                         "event_ts": MONDAY + (i * 11 + user) * HOUR_MS % (3 * DAY_MS),
                         "dwell_ms": 1_000 * i, "click": i % 2 == 0, "like": i % 3 == 0,
                         "comment": False, "share": i == 4})
    bad = [{**good[0], "event_id": f"bad-{n}", **fields} for n, fields in enumerate(BAD.values())]
    copies = [good[1], good[1], good[2]]
    root = tmp_path_factory.mktemp("landing")
    write_landing(root, good + bad + copies)
    return {"root": root, "good": good, "bad": bad}


def job_config(raw_dir: Path, out: Path, schema: str = "feed") -> FeaturesConfig:
    return FeaturesConfig(raw=str(raw_dir), out=str(out), spec=FeatureSpec(context_len=C, stride=C, schema=schema),
                          contract=ContractConfig(now_ms=NOW_MS), eval_days=1, train_files=2, eval_files=2)


def read_rows(path: Path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda row: (row["date"], row["user_key"], row["ts"]))


@pytest.fixture(scope="module")
def first_run(spark, raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "features"
    manifest = run(spark, job_config(raw["root"], out))
    return {"out": out, "manifest": manifest, "train": read_rows(out / "train"), "eval": read_rows(out / "eval")}


def test_manifest_counts_every_input_event(first_run, raw):
    manifest = read_manifest(first_run["out"])
    assert manifest == first_run["manifest"]
    good = raw["good"]
    assert manifest["dataset"] == "training_windows"
    assert manifest["input_events"] == len(good) + len(BAD) + DUPLICATES
    assert manifest["quarantined_by_reason"] == {reason: 1 for reason in sorted(BAD)}
    assert manifest["quarantined"] == len(BAD)
    assert manifest["duplicates"] == DUPLICATES
    assert manifest["events"] == len(good)
    assert manifest["watermark_ms"] == max(event["event_ts"] for event in good)
    assert manifest["split_ts_ms"] == MONDAY + 2 * DAY_MS
    splits = manifest["splits"]
    assert splits["train"]["events"] == sum(e["event_ts"] < MONDAY + 2 * DAY_MS for e in good)
    assert splits["train"]["events"] + splits["eval"]["events"] == len(good)
    for split in ("train", "eval"):
        assert splits[split]["label_tokens"] == splits[split]["events"]
        assert splits[split]["rows"] == len(first_run[split])
        assert splits[split]["positives"]["contribution"] == sum(
            sum(y * m for y, m in zip(row["contribution"], row["loss_mask"])) for row in first_run[split])
    assert manifest["spec"]["context_len"] == C and manifest["feature_spec_version"] == FEATURE_SPEC_VERSION == "3"
    assert manifest["spec"] == FeatureSpec(context_len=C, stride=C).record()
    assert manifest["schema_fingerprint"] == FEED.fingerprint
    assert manifest["config"]["contract"]["now_ms"] == NOW_MS
    assert [name for name, _ in manifest["columns"]] == [*FEED.training_columns, "date"]
    assert dict(manifest["columns"])["ts"] == "array<bigint>" and dict(manifest["columns"])["length"] == "int"


def test_quarantine_keeps_original_columns_and_reason(first_run, raw):
    table = pq.read_table(first_run["out"] / "quarantine")
    assert set(table.column_names) == {*FEED.field_names, "date", "hour", "reason"}
    rows = table.to_pylist()
    by_reason = {row["reason"]: row for row in rows}
    assert sorted(by_reason) == sorted(BAD)
    for reason, fields in BAD.items():
        for name, value in fields.items():
            assert by_reason[reason][name] == value


def test_layout_and_success_marker(first_run):
    out = first_run["out"]
    assert (out / SUCCESS_NAME).is_file() and (out / MANIFEST_NAME).is_file()
    assert sorted(path.name for path in (out / "train").iterdir()) == ["date=2026-06-01", "date=2026-06-02"]
    assert sorted(path.name for path in (out / "eval").iterdir()) == ["date=2026-06-03"]
    assert list(out.rglob(SUCCESS_NAME)) == [out / SUCCESS_NAME]
    assert [p.name for p in out.parent.iterdir()] == ["features"], "staging left behind"


def test_training_rows_respect_the_column_contract(first_run):
    split_s = (MONDAY + 2 * DAY_MS) // 1000
    for split in ("train", "eval"):
        for row in first_run[split]:
            assert 1 <= row["length"] <= C
            assert all(len(row[name]) == C for name in FEED.token_columns)
            labelled = [ts for ts, mask in zip(row["ts"], row["loss_mask"]) if mask == 1.0]
            assert labelled and all((ts >= split_s) == (split == "eval") for ts in labelled)
            if split == "train":
                assert max(row["ts"]) < split_s


def test_summary_describes_the_dataset(first_run):
    text = describe(first_run["out"])
    splits = first_run["manifest"]["splits"]
    for split in ("train", "eval"):
        entry = splits[split]
        rate = entry["positives"]["contribution"] / entry["label_tokens"]
        assert re.search(rf"{split}\s+{entry['rows']}\s+{entry['events']}\s+{entry['label_tokens']}\s+{rate:.4f}",
                         text), text
    assert all(f"{reason} " in text for reason in BAD)
    assert f"C={C}" in text and f"{DUPLICATES} duplicates" in text and "columns: user_key bigint" in text


# Petastorm's worker leaves the Parquet files it read to the garbage collector.
def test_petastorm_reads_the_output_as_fixed_length_arrays(first_run):
    from petastorm import make_batch_reader

    rows = 0
    with make_batch_reader(f"file://{first_run['out'] / 'train'}", schema_fields=list(FEED.training_columns),
                           reader_pool_type="dummy", num_epochs=1) as reader:
        for batch in reader:
            n = len(batch.user_key)
            rows += n
            assert batch.user_key.dtype == np.int64 and batch.length.dtype == np.int32
            assert batch.ts.shape == (n, C) and batch.ts.dtype == np.int64
            assert batch.item_id.shape == (n, C) and batch.item_id.dtype == np.int64
            assert batch.loss_mask.shape == (n, C) and batch.loss_mask.dtype == np.float32
            assert batch.log_gap.dtype == np.float32
    assert rows == first_run["manifest"]["splits"]["train"]["rows"]


def test_rerun_gives_identical_rows_and_replaces_the_output(spark, raw, first_run, caplog):
    out = first_run["out"]
    (out / "stale-file").write_text("from an earlier run")
    with caplog.at_level(logging.INFO, logger="features"):
        manifest = run(spark, job_config(raw["root"], out))
    assert "cut windows done in" in caplog.text
    assert read_rows(out / "train") == first_run["train"]
    assert read_rows(out / "eval") == first_run["eval"]
    assert not (out / "stale-file").exists()
    manifest.pop("created_at")
    assert manifest == {k: v for k, v in first_run["manifest"].items() if k != "created_at"}
    assert [p.name for p in out.parent.iterdir()] == ["features"]


def test_failed_run_leaves_the_previous_output_intact(spark, raw, first_run, tmp_path, write_landing):
    broken = tmp_path / "broken"
    write_landing(broken, raw["good"][:3])
    corrupt = broken / "date=2026-06-09" / "hour=00"
    corrupt.mkdir(parents=True)
    (corrupt / "part-0.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    out = first_run["out"]
    before = (out / MANIFEST_NAME).read_text()
    with pytest.raises((FeatureJobError, Py4JJavaError)):
        run(spark, job_config(broken, out))
    assert (out / MANIFEST_NAME).read_text() == before
    assert read_rows(out / "train") == first_run["train"]
    assert [p.name for p in out.parent.iterdir()] == ["features"], "staging left behind"


def test_refuses_to_replace_what_it_did_not_write(spark, raw, tmp_path):
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FeatureJobError, match="not a feature dataset"):
        run(spark, job_config(raw["root"], foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(FeatureJobError, match="raw input not found"):
        run(spark, job_config(tmp_path / "nowhere", tmp_path / "out"))


WATCH_BAD = {  # field overrides of a watch event → its reason
    "not_allowed:format": {"format": "reel"},
    "out_of_range:tz_offset_min": {"tz_offset_min": 900},
    "out_of_range:video_s": {"video_s": -1.5},
    "missing:viewer": {"viewer": None},
    "ts_before_epoch": {"ts": 1_500_000_000},
}


@pytest.mark.slow
def test_another_schema_runs_the_same_job_and_records_its_fitted_schema(spark, tmp_path, write_landing):
    """The watch schema end to end: its own reasons, columns and tasks, and the manifest's spec
    carries the standardize statistics fitted on the train split alone."""
    watch = load_schema("watch")
    good = raw_events(watch, users=5, per_user=9, seed=2)
    bad = [{**good[0], "impression_id": f"bad-{n}", **fields} for n, fields in enumerate(WATCH_BAD.values())]
    raw = tmp_path / "raw"
    write_landing(raw, good + bad, watch)
    manifest = run(spark, job_config(raw, tmp_path / "features", schema="watch"))

    assert manifest["quarantined_by_reason"] == {reason: 1 for reason in sorted(WATCH_BAD)}
    unique = {}
    for event in good:  # the job keeps the earliest copy: raw_events adds a later one
        unique.setdefault(event["impression_id"], event)
    assert manifest["events"] == len(unique) and manifest["duplicates"] == len(good) - len(unique)
    assert manifest["watermark_ms"] == max(event["ts"] for event in good) * 1000
    spec = FeatureSpec(**manifest["spec"])
    recorded = spec.event_schema
    assert not recorded.needs_fit and recorded.fingerprint == manifest["schema_fingerprint"]
    assert [name for name, _ in manifest["columns"]] == [*watch.training_columns, "date"]
    assert set(manifest["splits"]["train"]["positives"]) == {"follow", "watched"}

    steps = watch.config.numerics["log_video_s"].transforms
    train = [event for event in unique.values() if event["ts"] * 1000 < manifest["split_ts_ms"]]
    x = transform([event["video_s"] for event in train], steps[:-1])
    ((_, step),) = recorded.standardize_steps()
    assert (step.mean, step.std) == pytest.approx((x.mean(), x.std()), rel=1e-12)
    # The rows hold the numeric standardized with those statistics.
    by_ts = {event["ts"]: event for event in train}
    rows = read_rows(tmp_path / "features" / "train")
    row, position = next((row, position) for row in rows for position, mask in enumerate(row["loss_mask"])
                         if mask == 1.0)
    event = by_ts[row["ts"][position]]
    assert row["log_video_s"][position] == np.float32(transform([event["video_s"]], recorded.config.numerics[
        "log_video_s"].transforms)[0])
    text = describe(tmp_path / "features")
    assert "schema watch" in text and "follow rate" in text and f"standardize log_video_s: mean {step.mean:.6g}" in text


def test_a_small_input_is_read_in_four_tasks_per_core(spark, tmp_path, new_event, write_landing):
    """Without the setting, Spark cuts an input this small into one split per core (2 here): the
    last, short one leaves a core idle while the longest runs."""
    write_landing(tmp_path, [new_event(event_ts=MONDAY + hour * HOUR_MS) for hour in range(24)])
    assert read_raw(spark, str(tmp_path)).rdd.getNumPartitions() == 4 * spark.sparkContext.defaultParallelism


@pytest.mark.parametrize("case", ["one day, so no train rows", "no valid event"])
def test_an_empty_split_is_written_and_counted_empty(spark, tmp_path, new_event, write_landing, case):
    """Each split's statistics are observed while it is written: an empty split (no rows to write)
    still reports its zeros, and the job finishes."""
    events = [new_event(event_ts=MONDAY + hour * HOUR_MS, user_id=f"u{hour % 3}") for hour in range(12)]
    if case == "no valid event":
        events = [dict(event, user_id="") for event in events]
    write_landing(tmp_path / "raw", events)
    manifest = run(spark, job_config(tmp_path / "raw", tmp_path / "features"))
    splits = manifest["splits"]
    assert splits["train"] == {"rows": 0, "events": 0, "tokens": 0, "label_tokens": 0, "positives": {}}
    assert splits["eval"]["rows"] == (0 if case == "no valid event" else 3 * 1)
    assert splits["eval"]["label_tokens"] == splits["eval"]["events"] == (0 if case == "no valid event" else 12)
    assert pq.read_table(tmp_path / "features" / "train").num_rows == 0
