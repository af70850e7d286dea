"""``sirenfeed compare``: real 2-rank runs of two variants × two seeds, the statistics, resumability,
config errors and the Bayes-optimal floor."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from common.config import ConfigError, load_config
from features.dataset import write_manifest
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from features.synth import SynthConfig, write_synthetic_logs
from trainer.compare import (
    COMPARE_JSON, COMPARE_MD, RESULT_FILE, TRAIN_LOG, CompareConfig, EvalPredictions, EvalTruth,
    bayes_floor, eval_predictions, format_slice_markdown, main, paired, relational_slice, run_dir,
    slice_metrics, summarize,
)
from trainer.config import TrainConfig
from trainer.metrics import binary_metrics

VARIANTS = ("ordinal", "siren")
SEEDS = (0, 1)


@pytest.fixture(scope="module")
def comparison(tiny_features, tiny_model_overrides, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    budget = [*tiny_model_overrides, "data.batch_size=16", "data.shuffle_buffer=64", "data.eval_batch_size=64",
              "train.steps=4", "train.log_every=2", "train.checkpoint_every=0", "schedule.warmup_steps=1",
              "optim.lr=0.02"]
    argv = ["--features", str(tiny_features), "--out", str(out), "--variants", ",".join(VARIANTS),
            "--seeds", str(len(SEEDS)), f"train_overrides=[{','.join(budget)}]"]
    assert main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_every_run_is_trained_with_its_variant_and_seed(comparison):
    out, _ = comparison
    for variant in VARIANTS:
        for seed in SEEDS:
            result = json.loads((run_dir(out, variant, seed) / RESULT_FILE).read_text())
            assert (result["variant"], result["seed"], result["step"]) == (variant, seed, 4)
            assert f"model.rotary={'siren' if variant == 'siren' else 'ordinal'}" in result["overrides"]
            trained_with = load_config(TrainConfig, run_dir(out, variant, seed) / "launch" / "train.yaml")
            assert (trained_with.seed, trained_with.data.seed) == (seed, seed)
            assert trained_with.model.rotary == ("siren" if variant == "siren" else "ordinal")
            assert (run_dir(out, variant, seed) / "history.jsonl").is_file()
    # Different seeds give different models; the same seed pairs the variants on the same data.
    ne = {(v, s): json.loads((run_dir(out, v, s) / RESULT_FILE).read_text())["metrics"]["like"]["ne"]
          for v in VARIANTS for s in SEEDS}
    assert ne[("ordinal", 0)] != ne[("ordinal", 1)]


@pytest.mark.slow
def test_table_holds_mean_std_and_paired_differences(comparison):
    out, _ = comparison
    record = json.loads((out / COMPARE_JSON).read_text())
    runs = {v: {int(s): m for s, m in by_seed.items()} for v, by_seed in record["runs"].items()}
    for task in ("contribution", "like", "long_dwell"):
        ordinal = [runs["ordinal"][s][task]["ne"] for s in SEEDS]
        siren = [runs["siren"][s][task]["ne"] for s in SEEDS]
        entry = record["summary"]["siren"][task]
        assert entry["ne"]["mean"] == pytest.approx(np.mean(siren))
        assert entry["ne"]["std"] == pytest.approx(np.std(siren, ddof=1))
        differences = np.subtract(siren, ordinal)
        versus = entry["vs_baseline"]["ne"]
        assert versus["mean"] == pytest.approx(differences.mean())
        assert versus["se"] == pytest.approx(differences.std(ddof=1) / math.sqrt(2))
        assert versus["exceeds_2se"] == (abs(differences.mean()) > 2 * versus["se"])
        assert "vs_baseline" not in record["summary"]["ordinal"][task]
    table = (out / COMPARE_MD).read_text()
    assert "| ordinal | 2 |" in table and "| siren | 2 |" in table and "ΔNE vs ordinal" in table


@pytest.mark.slow
def test_rerun_trains_nothing(comparison):
    out, argv = comparison
    logs = {path: path.stat().st_mtime_ns for path in out.rglob(TRAIN_LOG)}
    results = {path: path.read_bytes() for path in out.rglob(RESULT_FILE)}
    assert len(logs) == len(results) == len(VARIANTS) * len(SEEDS)
    before = (out / COMPARE_JSON).read_text()
    assert main(argv) == 0
    assert {path: path.stat().st_mtime_ns for path in out.rglob(TRAIN_LOG)} == logs
    assert {path: path.read_bytes() for path in out.rglob(RESULT_FILE)} == results
    assert json.loads((out / COMPARE_JSON).read_text())["runs"] == json.loads(before)["runs"]


def test_paired_statistics():
    stats = paired([-0.010, -0.012, -0.011])
    assert stats["mean"] == pytest.approx(-0.011) and stats["se"] == pytest.approx(0.001 / math.sqrt(3))
    assert stats["exceeds_2se"]
    assert not paired([-0.01, 0.012, -0.001])["exceeds_2se"]
    assert not paired([-0.01])["exceeds_2se"]  # one seed: no standard error, never significant


def test_summary_pairs_by_seed():
    def metrics(ne):
        return {task: {"ne": ne, "auc": 0.6, "gauc": 0.6, "ece": 0.01} for task in ("contribution", "like", "long_dwell")}
    results = {"ordinal": {0: metrics(1.0), 1: metrics(0.9)}, "siren": {0: metrics(0.99), 1: metrics(0.89)}}
    summary = summarize(results, "ordinal", ("contribution", "like", "long_dwell"))
    # The seed-to-seed spread (0.1) is large, the paired difference (−0.01 each seed) is consistent.
    assert summary["siren"]["like"]["vs_baseline"]["ne"]["mean"] == pytest.approx(-0.01)
    assert summary["siren"]["like"]["vs_baseline"]["ne"]["se"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("override, key", [
    ("variants=[ordinal,warp]", "variants"),
    ("baseline=siren", "baseline"),
    ("seeds=0", "seeds"),
    ("train_overrides=[model.rotary=none]", "train_overrides"),
    ("train_overrides=[seed=3]", "train_overrides"),
])
def test_bad_config_fails_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(CompareConfig, overrides=["features=f", "out=o", "variants=[ordinal,to_rope]", override])


def test_a_bad_training_override_fails_before_any_run(tiny_features, tmp_path):
    argv = ["--features", str(tiny_features), "--out", str(tmp_path / "out"), "--variants", "ordinal",
            "train_overrides=[optim.lr=-1]"]
    with pytest.raises(ConfigError, match="optim.lr"):
        main(argv)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("schema, event_id, time, unit_ms, task", [
    ("feed", "event_id", "event_ts", 1, "like"), ("watch", "impression_id", "ts", 1000, "follow")])
def test_bayes_floor_scores_exactly_the_eval_events_with_the_truth(tmp_path, schema, event_id, time, unit_ms,
                                                                  task):
    """The floor of the dataset's own tasks (the watch log's as well as the feed's), each duplicated
    eval event once, its label from the raw event."""
    raw = tmp_path / "raw"
    manifest = write_synthetic_logs(load_config(SynthConfig, overrides=[
        "users=30", "days=2", "seed=3", "bad_fraction=0", "duplicate_fraction=0.05", f"schema={schema}"]), raw)
    assert manifest["duplicates"] > 0
    split_ms = manifest["watermark_ms"] // 86_400_000 * 86_400_000  # the last day is eval
    features = tmp_path / "features"
    os.makedirs(features)
    write_manifest(features, {"spec": FeatureSpec(context_len=50, stride=50, schema=schema).record(),
                              "feature_spec_version": FEATURE_SPEC_VERSION, "split_ts_ms": split_ms,
                              "processing_ms": manifest["watermark_ms"] + 1, "config": {"contract": {}}})
    floor = bayes_floor(raw, features)
    assert set(floor) == set(FeatureSpec(schema=schema).event_schema.label_columns)

    events = {e[event_id]: e for e in pq.read_table(raw).to_pylist() if e[time] * unit_ms >= split_ms}
    truth = {row["event_id"]: row for row in pq.read_table(raw / "_truth").to_pylist()}
    ids = sorted(events)
    assert floor[task]["count"] == len(ids) > 0  # each duplicated event counted once
    direct = binary_metrics(np.array([truth[i][f"p_{task}"] for i in ids]),
                            np.array([events[i][task] for i in ids], dtype=float))
    assert floor[task]["ne"] == pytest.approx(direct["ne"], rel=1e-12)
    assert floor[task]["ne"] < 1.0  # the truth beats the base rate


# --- the relational slice ------------------------------------------------------------------------

def hand_made_truth() -> EvalTruth:
    """Eight eval events of two users; events 1, 2 and 5 follow a recent same-author engagement."""
    relational = np.array([0.0, 0.9, 0.4, 0.0, 0.05, 1.1, 0.0, 0.0])
    contribution = np.array([0, 1, 1, 0, 0, 0, 1, 0], dtype=np.float64)
    like = np.array([0, 1, 0, 0, 1, 0, 1, 0], dtype=np.float64)
    long_dwell = np.array([1, 0, 1, 0, 0, 1, 0, 1], dtype=np.float64)
    users = np.array([7, 7, 7, 7, 9, 9, 9, 9], dtype=np.int64)
    keys = [(int(user), 1_000 + index, 3) for index, user in enumerate(users)]
    return EvalTruth(
        keys=keys, users=users,
        labels={"contribution": contribution, "like": like, "long_dwell": long_dwell},
        probability={task: np.clip(0.2 + 0.5 * label, 0.0, 1.0)
                     for task, label in (("contribution", contribution), ("like", like),
                                         ("long_dwell", long_dwell))},
        relational_logit=relational)


def predictions_for(truth: EvalTruth, relational_skill: float, rest_skill: float,
                    order: list[int]) -> EvalPredictions:
    """Tokens of the truth's events in ``order``: predictions nearer the label by a skill per slice."""
    active = truth.relational_logit > 0.1
    skill = np.where(active, relational_skill, rest_skill)
    pred = {task: 0.5 + (label - 0.5) * skill for task, label in truth.labels.items()}
    return EvalPredictions(keys=[truth.keys[i] for i in order], users=truth.users[order],
                           labels={task: label[order] for task, label in truth.labels.items()},
                           pred={task: value[order] for task, value in pred.items()})


def test_slice_metrics_split_the_eval_events_by_the_relational_truth():
    truth = hand_made_truth()
    active = truth.relational_logit > 0.1
    slices = slice_metrics(truth.probability, truth.labels, truth.users, active)
    assert slices["relational"]["like"]["count"] == 3 and slices["rest"]["like"]["count"] == 5
    for name, mask in (("relational", active), ("rest", ~active)):
        for task in ("contribution", "like", "long_dwell"):
            direct = binary_metrics(truth.probability[task][mask], truth.labels[task][mask], truth.users[mask])
            assert slices[name][task]["ne"] == pytest.approx(direct["ne"], rel=1e-12)


def test_relational_slice_pairs_variants_by_seed_on_matched_tokens():
    truth = hand_made_truth()
    shuffled = [5, 2, 7, 0, 1, 6, 3, 4]  # tokens come in file order, not in the truth's order
    predictions = {
        "ordinal": {0: predictions_for(truth, 0.2, 0.4, shuffled), 1: predictions_for(truth, 0.3, 0.5, shuffled)},
        # siren gains on the relational events only: the contrast to the rest is the evidence.
        "siren": {0: predictions_for(truth, 0.5, 0.4, shuffled), 1: predictions_for(truth, 0.6, 0.5, shuffled)},
    }
    record = relational_slice(truth, predictions, "ordinal", threshold=0.1)
    assert record["events"] == {"relational": 3, "rest": 5}
    assert record["bayes_floor"]["relational"]["like"]["count"] == 3
    for seed in (0, 1):
        runs = record["runs"]["siren"][seed]
        order = np.argsort(shuffled)
        active = truth.relational_logit > 0.1
        siren = predictions["siren"][seed]
        direct = binary_metrics(siren.pred["like"][order][active], truth.labels["like"][active])
        assert runs["relational"]["like"]["ne"] == pytest.approx(direct["ne"], rel=1e-12)
    relational = record["summary"]["relational"]["siren"]["like"]["vs_baseline"]["ne_relative_pct"]
    rest = record["summary"]["rest"]["siren"]["like"]["vs_baseline"]["ne_relative_pct"]
    assert relational["mean"] < -1.0 and rest["mean"] == pytest.approx(0.0, abs=1e-9)
    contrast = record["contrast"]["siren"]["like"]
    assert contrast["mean"] == pytest.approx(relational["mean"] - rest["mean"])
    assert "ordinal" not in record["contrast"]
    table = format_slice_markdown(record, "ordinal")
    assert "relational_logit > 0.1" in table and "| siren |" in table and "| bayes (truth) |" in table


def test_tokens_without_ground_truth_are_refused():
    truth = hand_made_truth()
    stray = predictions_for(truth, 0.5, 0.5, list(range(8)))
    stray.keys[3] = (7, 99_999, 3)
    with pytest.raises(ValueError, match="no ground truth"):
        relational_slice(truth, {"ordinal": {0: stray}}, "ordinal", threshold=0.1)


@pytest.mark.slow
def test_predictions_reproduce_the_trainers_evaluation(comparison, tiny_features):
    """The slice scores each run's exported model on the eval tokens again: overall, the same
    metrics as the trainer's exact evaluation."""
    out, _ = comparison
    run = run_dir(out, "siren", 0)
    predictions = eval_predictions(run, tiny_features)
    metrics = json.loads((run / RESULT_FILE).read_text())["metrics"]
    for task in ("contribution", "like", "long_dwell"):
        again = binary_metrics(predictions.pred[task], predictions.labels[task], predictions.users)
        assert again["count"] == metrics[task]["count"]
        assert again["ne"] == pytest.approx(metrics[task]["ne"], rel=1e-5)
