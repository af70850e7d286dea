"""The statistical evaluation gate (lifecycle/gate.py) without Spark: decisions from real
accumulators of simulated slices (pass, regression, a noise-level difference, a task without
positives, a tiny slice), tolerances per task of the schema, then the gate on real exports evaluated
on a tiny feature dataset (a slice without positives, a published model that cannot be evaluated, a
broken candidate, models of another event schema)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from common.config import ConfigError, load_config
from common.files import visible_files
from features.schema import load_schema
from lifecycle.config import RetrainConfig
from lifecycle.gate import (
    INCONCLUSIVE, INSUFFICIENT_EVIDENCE, NOT_WORSE, PUBLISH, REFUSE, TOO_LITTLE_EVIDENCE, WORSE,
    GateConfig, decide, gate,
)
from trainer.config import TrainConfig
from trainer.export import MODEL_FILE, export_model
from trainer.metrics import EvalAccumulator, event_log_loss
from trainer.model import GenerativeRanker

T_REF = 1_714_800_000
FEED = load_schema("feed")
TASKS = FEED.label_columns


def sigmoid(logit):
    return 1.0 / (1.0 + np.exp(-logit))


def simulated_slice(seed, users=300, events=20):
    """Per task, the true logit of every event ([users, events]: a user effect plus event noise)
    and labels drawn from it."""
    rng = np.random.default_rng(seed)
    logits = {task: rng.normal(-1.0, 1.0, (users, 1)) + rng.normal(0.0, 0.7, (users, events)) for task in TASKS}
    labels = {task: (rng.random(logit.shape) < sigmoid(logit)).astype(float) for task, logit in logits.items()}
    return rng, logits, labels


def evaluated(predictions, labels):
    """An accumulator as an evaluation fills it: one row per user, every token label-bearing."""
    shape = next(iter(labels.values())).shape
    accumulator = EvalAccumulator(TASKS)
    accumulator.add(predictions, labels, np.ones(shape), np.arange(shape[0]))
    return accumulator


def user_noise(rng, logits, scale):
    """The true probabilities seen through a per-user error in the logit (a model that is off for a
    whole user, as models are)."""
    return {task: sigmoid(logit + rng.normal(0.0, scale, (logit.shape[0], 1))) for task, logit in logits.items()}


def test_a_better_candidate_passes_on_every_task():
    rng, logits, labels = simulated_slice(seed=1)
    published = user_noise(rng, logits, 0.6)
    candidate = {task: sigmoid(logit) for task, logit in logits.items()}
    decision = decide(evaluated(candidate, labels), evaluated(published, labels), GateConfig(), FEED)
    assert decision.outcome == PUBLISH and decision.publish, decision.reason
    assert {task: comparison["verdict"] for task, comparison in decision.tasks.items()} == dict.fromkeys(TASKS, NOT_WORSE)
    assert all(comparison["high"] < 0 for comparison in decision.tasks.values()), "shown to be better, not only not worse"
    assert decision.current["contribution"]["ne"] > decision.candidate["contribution"]["ne"]


def test_a_regression_beyond_the_tolerance_is_refused():
    rng, logits, labels = simulated_slice(seed=2)
    published = {task: sigmoid(logit) for task, logit in logits.items()}
    candidate = {task: sigmoid(logit + 0.5) for task, logit in logits.items()}  # over-predicts everything
    decision = decide(evaluated(candidate, labels), evaluated(published, labels), GateConfig(), FEED)
    assert decision.outcome == REFUSE and not decision.publish, decision.reason
    assert all(comparison["verdict"] == WORSE and comparison["low"] > comparison["tolerance"]
               for comparison in decision.tasks.values())
    assert "worse" in decision.reason


def test_a_noise_level_difference_is_neither_a_regression_nor_a_pass():
    """Candidate and published model are equally good in truth (each off by its own per-user error).
    On this slice the candidate's point estimate is worse than the tolerance, so a point comparison
    refuses it, and so would an interval that treats events as independent; the interval over users
    spans the tolerance: insufficient evidence."""
    rng, logits, labels = simulated_slice(seed=4, users=60, events=100)
    published, candidate = user_noise(rng, logits, 0.5), user_noise(rng, logits, 0.5)
    config = GateConfig()
    decision = decide(evaluated(candidate, labels), evaluated(published, labels), config, FEED)
    assert decision.outcome == INSUFFICIENT_EVIDENCE and not decision.publish, decision.reason
    comparison = decision.tasks["contribution"]
    assert comparison["verdict"] == INCONCLUSIVE
    assert comparison["change"] > config.default_tolerance, "a point comparison would refuse"
    assert comparison["low"] < config.default_tolerance < comparison["high"]
    label = labels["contribution"].ravel()
    published_loss = event_log_loss(published["contribution"].ravel(), label)
    difference = event_log_loss(candidate["contribution"].ravel(), label) - published_loss
    independent_low = (difference.mean() - NormalDist().inv_cdf(0.975) * difference.std() / math.sqrt(label.size))
    assert independent_low / published_loss.mean() > config.default_tolerance, \
        "treating one user's events as independent would call this noise a regression"
    assert {comparison["verdict"] for comparison in decision.tasks.values()} <= {NOT_WORSE, INCONCLUSIVE}


def test_a_task_without_positives_is_too_little_evidence_not_a_broken_candidate():
    rng, logits, labels = simulated_slice(seed=3)
    labels["like"] = np.zeros_like(labels["like"])
    published = user_noise(rng, logits, 0.6)
    candidate = {task: sigmoid(logit) for task, logit in logits.items()}
    decision = decide(evaluated(candidate, labels), evaluated(published, labels), GateConfig(), FEED)
    assert decision.outcome == INSUFFICIENT_EVIDENCE, decision.reason
    assert decision.tasks["like"]["verdict"] == TOO_LITTLE_EVIDENCE and decision.tasks["like"]["positives"] == 0
    assert decision.tasks["contribution"]["verdict"] == NOT_WORSE
    assert "0 positives < gate.min_positives" in decision.reason and "broken" not in decision.reason


def test_a_tiny_slice_is_too_little_evidence_even_for_a_much_worse_candidate():
    rng, logits, labels = simulated_slice(seed=4, users=5, events=4)
    published = {task: sigmoid(logit) for task, logit in logits.items()}
    candidate = {task: sigmoid(logit + 3.0) for task, logit in logits.items()}
    decision = decide(evaluated(candidate, labels), evaluated(published, labels), GateConfig(), FEED)
    assert decision.outcome == INSUFFICIENT_EVIDENCE, decision.reason
    assert all(comparison["verdict"] == TOO_LITTLE_EVIDENCE and comparison["events"] == 20
               for comparison in decision.tasks.values())
    assert "20 events < gate.min_events 1000" in decision.reason


def test_every_task_has_its_own_tolerance_and_keys_are_checked():
    rng, logits, labels = simulated_slice(seed=2)
    published = {task: sigmoid(logit) for task, logit in logits.items()}
    candidate = dict(published, like=sigmoid(logits["like"] + 0.5))
    strict = decide(evaluated(candidate, labels), evaluated(published, labels), GateConfig(), FEED)
    assert strict.outcome == REFUSE and strict.tasks["like"]["verdict"] == WORSE
    assert strict.tasks["contribution"]["verdict"] == NOT_WORSE, "an identical task is not worse"
    lenient = GateConfig(tolerance={"like": 0.5})
    assert lenient.tolerances(FEED) == {"contribution": 0.002, "like": 0.5, "long_dwell": 0.002}
    assert decide(evaluated(candidate, labels), evaluated(published, labels), lenient, FEED).outcome == PUBLISH
    required = ["dir=d", "initial_run=r", "features.raw=i", "features.out=o"]
    gate_config = load_config(RetrainConfig, None, [*required, "gate.tolerance.like=0.01"]).gate
    assert gate_config.tolerances(FEED) == {"contribution": 0.002, "like": 0.01, "long_dwell": 0.002}
    assert load_config(RetrainConfig, None, [*required, "gate.default_tolerance=0.01"]).gate.tolerances(FEED) == \
        dict.fromkeys(TASKS, 0.01)
    with pytest.raises(ConfigError, match="gate.tolerance.clicks.*not a task of schema 'feed'"):
        load_config(RetrainConfig, None, [*required, "gate.tolerance.clicks=0.01"])
    with pytest.raises(ConfigError, match="gate.tolerance.like"):
        load_config(RetrainConfig, None, [*required, "gate.tolerance.like=1.5"])
    with pytest.raises(ConfigError, match="gate.default_tolerance"):
        load_config(RetrainConfig, None, [*required, "gate.default_tolerance=1"])


def test_the_tasks_and_tolerances_are_those_of_the_features_schema():
    """Another schema, other tasks: the watch log's follow and watched are gated, the feed's names
    are no tasks of it (checked when the retrain config loads, before any cycle)."""
    watch = load_schema("watch")
    required = ["dir=d", "initial_run=r", "features.raw=i", "features.out=o", "features.spec.schema=watch"]
    config = load_config(RetrainConfig, None, [*required, "gate.tolerance.follow=0.01"])
    assert config.gate.tolerances(watch) == {"follow": 0.01, "watched": 0.002}
    with pytest.raises(ConfigError, match="gate.tolerance.like.*not a task of schema 'watch'.*follow, watched"):
        load_config(RetrainConfig, None, [*required, "gate.tolerance.like=0.01"])
    with pytest.raises(ConfigError, match="gate.tolerance.like"):
        decide(EvalAccumulator(watch.label_columns), None, GateConfig(tolerance={"like": 0.01}), watch)


# --- the gate on real exports -------------------------------------------------------------------

SMALL_SLICE = GateConfig(min_events=50, min_positives=5)
"""Minimums the tiny eval split (69 windows of 40 users) meets."""


def exported_model(run, spec, model_overrides, seed):
    config = load_config(TrainConfig, overrides=["features=/data/features", f"run={run}", *model_overrides])
    torch.manual_seed(seed)
    model = GenerativeRanker(config.model, spec, T_REF)
    return export_model(model, config, spec, config.run, "a", 1)


@pytest.fixture
def exports(tmp_path, tiny_spec, tiny_model_overrides):
    """Two freshly initialised tiny models, exported."""
    return [exported_model(tmp_path / f"run{seed}", tiny_spec, tiny_model_overrides, seed) for seed in (0, 1)]


def rewrite_export(export, state):
    """``export`` with other weights and checksums that match them (a well-formed export)."""
    from features.dataset import read_manifest, write_manifest
    from trainer.export import sha256

    torch.save(state, export / MODEL_FILE)
    manifest = read_manifest(export)
    manifest["sha256"][MODEL_FILE] = sha256(export / MODEL_FILE)
    write_manifest(export, manifest)
    return export


def without_positives(task, tmp_path, feature_writer, tiny_spec):
    """A copy of the tiny dataset whose eval split has no positive ``task`` label."""
    root = feature_writer(tmp_path / "no-positives", tiny_spec)
    for path in visible_files(root / "eval"):
        table = pq.read_table(path)
        column = table.column(task)
        zeros = pa.array([[0] * len(value) for value in column.to_pylist()], type=column.type)
        pq.write_table(table.set_column(table.schema.get_field_index(task), task, zeros), path)
    return root


def test_a_slice_without_positives_does_not_make_a_healthy_candidate_broken(exports, tmp_path, tiny_features,
                                                                             feature_writer, tiny_spec):
    features = without_positives("contribution", tmp_path, feature_writer, tiny_spec)
    published = exports[1]
    decision = gate(published, published, features, SMALL_SLICE)
    assert decision.outcome == INSUFFICIENT_EVIDENCE, decision.reason
    assert decision.tasks["contribution"]["verdict"] == TOO_LITTLE_EVIDENCE
    assert "broken" not in decision.reason
    assert gate(published, published, tiny_features, SMALL_SLICE).outcome == PUBLISH, "an equal model is not worse"


def test_a_published_model_that_cannot_be_evaluated_does_not_pass_the_candidate_silently(
        exports, tiny_features, caplog):
    candidate, published = exports
    with (published / MODEL_FILE).open("ab") as stream:
        stream.write(b"corruption")
    with caplog.at_level("ERROR", logger="lifecycle.gate"):
        decision = gate(candidate, published, tiny_features, SMALL_SLICE)
    assert decision.outcome == PUBLISH, decision.reason
    assert decision.published_error and "corrupt" in decision.published_error
    assert "cannot be evaluated" in decision.reason and decision.current is None
    assert any("cannot be evaluated" in record.getMessage() for record in caplog.records if record.levelname == "ERROR")
    state = torch.load(candidate / MODEL_FILE, weights_only=True)
    rewrite_export(candidate, {name: value * float("nan") if value.is_floating_point() else value
                               for name, value in state.items()})
    broken = gate(candidate, published, tiny_features, SMALL_SLICE)
    assert broken.outcome == REFUSE and "broken" in broken.reason, "a broken candidate never passes"


def test_models_of_another_schema_are_refused_or_reported_naming_the_difference(exports, tiny_features,
                                                                                tiny_watch_spec, tmp_path,
                                                                                tiny_model_overrides):
    """A candidate trained on the watch log cannot be judged on feed events: it is refused, the
    reason naming the schema keys that differ; a published model of another schema is one that
    cannot be evaluated (kept in the decision), and a healthy candidate is published on its health."""
    watch = exported_model(tmp_path / "watch", tiny_watch_spec, tiny_model_overrides, 0)
    refused = gate(watch, exports[1], tiny_features, SMALL_SLICE)
    assert refused.outcome == REFUSE and "broken" not in refused.reason, refused.reason
    assert "another event schema than expected: name: 'feed' vs 'watch'" in refused.reason
    published_elsewhere = gate(exports[0], watch, tiny_features, SMALL_SLICE)
    assert published_elsewhere.outcome == PUBLISH and published_elsewhere.current is None
    assert "name: 'feed' vs 'watch'" in published_elsewhere.published_error
