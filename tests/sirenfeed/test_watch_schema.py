"""The second shipped schema end to end: synthetic watch logs → the Spark feature job → 2-rank
training → ``sirenfeed evaluate`` → export → serving, with nothing but ``schema=watch`` changed.

The watch schema differs from the feed in every dimension (field names, time in seconds, a UTC
offset, a standardized numeric, a shared table, its own two tasks), so anything still hard-wired to
the feed breaks here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from common.files import visible_files
from common.repo import REPO_ROOT
from features.dataset import read_manifest
from features.schema import ContractConfig
from features.serving import latest_row, stack_rows
from features.spec import FeatureSpec
from features.validation import check_record
from trainer.data import to_tensors
from trainer.evaluate import METRICS_FILE
from trainer.export import load_exported
from trainer.metrics import binary_metrics
from trainer.report import score_eval_tokens

pytestmark = pytest.mark.slow

WATCH_FEATURES = ("spec.schema=watch", "spec.context_len=8", "spec.stride=4", "spec.buckets.post_id=1009",
                  "spec.buckets.creator_id=101", "eval_days=1", "train_files=4", "eval_files=2")


def sirenfeed(*arguments: str | Path) -> str:
    result = subprocess.run([sys.executable, "-m", "sirenfeed.cli", *map(str, arguments)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"sirenfeed {arguments[0]} failed ({result.returncode}):\n{output[-6000:]}"
    return output


@pytest.fixture(scope="module")
def watch(tmp_path_factory, launch, train_overrides):
    root = tmp_path_factory.mktemp("watch")
    raw, features, run = root / "raw", root / "features", root / "run"
    sirenfeed("synth", "--out", raw, "--users", "60", "--days", "4", "--seed", "5", "schema=watch")
    sirenfeed("features", "--raw", raw, "--out", features, *WATCH_FEATURES)
    trained = launch(features, run, *train_overrides)
    evaluated = sirenfeed("evaluate", "--run", run, "--nproc", "2")
    return {"raw": raw, "features": features, "run": run, "trained": trained, "evaluated": evaluated}


def test_the_dataset_has_the_watch_layout_and_fitted_statistics(watch):
    manifest = read_manifest(watch["features"])
    spec = FeatureSpec(**manifest["spec"])
    schema = spec.event_schema
    assert schema.name == "watch" and not schema.needs_fit
    [(_, step)] = schema.standardize_steps()
    assert np.isfinite(step.mean) and step.std > 0
    assert [name for name, _ in manifest["columns"]][:len(schema.training_columns)] == list(schema.training_columns)
    assert manifest["quarantined"] > 0, "the generator's bad events reach the quarantine"
    assert spec.buckets["post_id"] == 1009 and "origin_post_id" not in spec.buckets


def test_training_and_evaluation_report_both_watch_tasks(watch):
    metrics = json.loads((watch["run"] / METRICS_FILE).read_text())["metrics"]
    assert set(metrics) >= {"follow", "watched"} and not {"contribution", "like", "long_dwell"} & set(metrics)
    for task in ("follow", "watched"):
        assert metrics[task]["count"] > 0 and np.isfinite(metrics[task]["ne"])
    assert "follow" in watch["evaluated"] and "watched" in watch["evaluated"]


def valid_raw_events(raw: Path, schema, processing_ms: int) -> list[dict]:
    contract = ContractConfig()
    records = [record for path in visible_files(raw, ".parquet")
               for record in pq.read_table(path).to_pylist()]
    return [record for record in records if check_record(record, schema, contract, processing_ms) is None]


def test_serving_computes_the_spark_rows_and_the_export_scores_like_the_trainer(watch):
    model, config, spec = load_exported(watch["run"] / "export" / "latest")
    schema = spec.event_schema
    assert schema.name == "watch"
    manifest = read_manifest(watch["features"])
    events = valid_raw_events(watch["raw"], schema, manifest["processing_ms"])
    canonical = [schema.canonical(event) for event in events]
    first_seen: dict[str, int] = {}
    for event in canonical:
        first_seen[event["post_id"]] = min(first_seen.get(event["post_id"], event["event_ts"] // 1000),
                                           event["event_ts"] // 1000)

    eval_rows = [row for path in visible_files(watch["features"] / "eval", ".parquet")
                 for row in pq.read_table(path, columns=list(schema.training_columns)).to_pylist()]
    newest: dict[int, dict] = {}
    for row in eval_rows:
        if row["user_key"] not in newest or row["ts"][-1] > newest[row["user_key"]]["ts"][-1]:
            newest[row["user_key"]] = row
    by_user: dict[str, list[dict]] = {}
    for event in events:
        by_user.setdefault(event["viewer"], []).append(event)
    compared = []
    for viewer, user_events in sorted(by_user.items())[:12]:
        row = latest_row(user_events, spec, first_seen, scored=1, contract=ContractConfig(),
                         processing_ms=manifest["processing_ms"])
        spark = newest.get(int(row["user_key"]))
        if spark is None or spark["ts"][-1] != row["ts"][-1]:
            continue  # the user's newest event is a train event (no eval window ends there)
        for name in schema.training_columns:
            if name == "loss_mask":
                continue
            assert np.array_equal(np.asarray(spark[name], dtype=row[name].dtype), row[name]), (viewer, name)
        compared.append(row)
    assert len(compared) >= 3, "too few users to compare"
    with torch.no_grad():
        logits = model(to_tensors(stack_rows(compared), spec))
    assert set(logits) == {"follow", "watched"}

    # The export, in this process, scores the eval split as the trainer's 2-rank evaluation did.
    trainer_metrics = json.loads((watch["run"] / METRICS_FILE).read_text())["metrics"]
    with torch.no_grad():
        tokens = score_eval_tokens(model, config.features, spec, config.data.eval_batch_size)
    for task in ("follow", "watched"):
        mine = binary_metrics(tokens[f"pred_{task}"], tokens[task], tokens["user_key"])
        assert mine["ne"] == pytest.approx(trainer_metrics[task]["ne"], rel=1e-6, abs=1e-9), task


def test_a_watch_export_refuses_a_feed_dataset(watch, tiny_features):
    result = subprocess.run([sys.executable, "-m", "sirenfeed.cli", "evaluate", "--run", str(watch["run"]),
                             "--features", str(tiny_features)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "another event schema" in result.stderr and "name: 'watch' vs 'feed'" in result.stderr, \
        result.stderr[-3000:]
