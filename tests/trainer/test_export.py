"""Export: round trip with weights-only loading, checksums, the ``latest`` pointer, the event schema
it records and the refusal of another; and ``sirenfeed evaluate`` on an export, in one process and
on 2 ranks."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from common.config import load_config
from features.schema import SchemaError
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import DataError, eval_batches
from trainer.evaluate import main as evaluate_main
from trainer.export import EXPORT_FILES, ExportError, export_model, load_exported
from trainer.model import GenerativeRanker, synthetic_batch
from training_fixtures import as_next_batch


@pytest.fixture
def exported(tmp_path, tiny_spec, tiny_model_overrides):
    """A freshly initialised tiny model exported twice (tags a, b) into ``tmp_path/run``."""
    config = load_config(TrainConfig, overrides=[
        "features=/data/features", f"run={tmp_path / 'run'}", *tiny_model_overrides])
    torch.manual_seed(0)
    model = GenerativeRanker(config.model, tiny_spec, 1_714_800_000)
    export_model(model, config, tiny_spec, config.run, "a", 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01)
    export_model(model, config, tiny_spec, config.run, "b", 2)
    return model.eval(), config, tmp_path / "run" / "export"


def test_round_trip_gives_identical_logits(exported, tiny_spec):
    model, config, root = exported
    loaded, loaded_config, spec = load_exported(root / "latest")
    assert loaded_config == config and spec == tiny_spec
    batch = synthetic_batch(tiny_spec, 4, seed=3)
    with torch.no_grad():
        expected, actual = model(batch), loaded(batch)
    for task in expected:
        assert torch.equal(expected[task], actual[task]), task
    record = json.loads((root / "b" / "feature_spec.json").read_text())
    assert record["version"] == FEATURE_SPEC_VERSION and record["t_ref_seconds"] == 1_714_800_000
    assert record["spec"] == tiny_spec.record() and FeatureSpec(**record["spec"]) == tiny_spec
    assert record["schema_fingerprint"] == tiny_spec.event_schema.fingerprint


def test_an_export_of_another_schema_is_refused_naming_the_difference(exported, tiny_spec, tiny_watch_spec):
    _, _, root = exported
    model, _, spec = load_exported(root / "latest", expected_schema=tiny_spec.event_schema)
    assert spec == tiny_spec
    with pytest.raises(SchemaError, match=r"the export .*another event schema than expected: name: 'watch' vs 'feed'"):
        load_exported(root / "latest", expected_schema=tiny_watch_spec.event_schema)
    bigger = dataclasses.replace(tiny_spec, buckets={**tiny_spec.buckets, "topic": 13})
    with pytest.raises(SchemaError, match=r"categoricals.topic.buckets: 13 vs 7"):
        load_exported(root / "latest", expected_schema=bigger.event_schema)


def test_a_watch_model_exports_and_loads_with_its_schema(tmp_path, tiny_watch_spec, tiny_model_overrides):
    config = load_config(TrainConfig, overrides=[
        "features=/data/features", f"run={tmp_path / 'run'}", *tiny_model_overrides, "model.categorical_input=true"])
    model = GenerativeRanker(config.model, tiny_watch_spec, 1_714_800_000).eval()
    target = export_model(model, config, tiny_watch_spec, config.run, "a", 1)
    loaded, _, spec = load_exported(target, expected_schema=tiny_watch_spec.event_schema)
    assert spec == tiny_watch_spec and spec.event_schema.name == "watch"
    assert set(loaded.id_embeddings) == {"post_id", "creator_id", "format", "country"}
    batch = synthetic_batch(tiny_watch_spec, 4, seed=3)
    with torch.no_grad():
        expected, actual = model(batch), loaded(batch)
    assert set(actual) == {"follow", "watched"}
    for task in expected:
        assert torch.equal(expected[task], actual[task]), task


def test_the_export_records_the_anchor_the_weights_use(tmp_path, tiny_spec, tiny_model_overrides):
    """One source of truth for T_ref: the model's buffer (here moved away from the anchor it was
    built with, as a checkpoint load does), not what the caller believes."""
    config = load_config(TrainConfig, overrides=[
        "features=/data/features", f"run={tmp_path / 'run'}", *tiny_model_overrides])
    model = GenerativeRanker(config.model, tiny_spec, 1_714_800_000).eval()
    model.set_time_reference(1_700_000_000)
    target = export_model(model, config, tiny_spec, config.run, "a", 1)
    assert json.loads((target / "feature_spec.json").read_text())["t_ref_seconds"] == 1_700_000_000
    loaded, _, _ = load_exported(target)
    assert loaded.time_reference() == 1_700_000_000
    batch = synthetic_batch(tiny_spec, 4, seed=3, start_seconds=1_700_000_000)
    with torch.no_grad():
        expected, actual = model(batch), loaded(batch)
    for task in expected:
        assert torch.equal(expected[task], actual[task]), task


def test_a_model_without_time_features_records_no_anchor(tmp_path, tiny_spec, tiny_model_overrides):
    config = load_config(TrainConfig, overrides=[
        "features=/data/features", f"run={tmp_path / 'run'}", *tiny_model_overrides, "model.rotary=ordinal"])
    target = export_model(GenerativeRanker(config.model, tiny_spec, 1_714_800_000), config, tiny_spec,
                          config.run, "a", 1)
    assert json.loads((target / "feature_spec.json").read_text())["t_ref_seconds"] is None
    assert load_exported(target)[0].time_reference() is None


def test_latest_moves_only_to_a_complete_export(exported):
    _, _, root = exported
    assert (root / "latest").is_symlink() and (root / "latest").resolve() == (root / "b").resolve()
    assert sorted(path.name for path in root.iterdir()) == ["a", "b", "latest"]  # no temporaries left
    first, _, _ = load_exported(root / "a")
    second, _, _ = load_exported(root / "latest")
    assert not torch.equal(first.heads.weight, second.heads.weight)
    state = torch.load(root / "b" / "model.pt", weights_only=True)
    assert all(isinstance(tensor, torch.Tensor) for tensor in state.values())
    assert set(json.loads((root / "b" / "_MANIFEST.json").read_text())["sha256"]) == set(EXPORT_FILES)


def test_exporting_a_complete_tag_again_keeps_it_and_moves_latest(exported, tiny_spec):
    model, config, root = exported
    before = (root / "a" / "model.pt").read_bytes()
    export_model(model, config, tiny_spec, config.run, "a", 1)
    assert (root / "latest").resolve() == (root / "a").resolve()
    assert (root / "a" / "model.pt").read_bytes() == before  # not the modified weights of "b"


def test_corrupt_file_is_detected(exported):
    _, _, root = exported
    model_file = root / "b" / "model.pt"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.pt is corrupt"):
        load_exported(root / "latest")


def test_incomplete_export_is_detected(exported):
    _, _, root = exported
    (root / "a" / "config.yaml").unlink()
    with pytest.raises(ExportError, match="config.yaml is missing"):
        load_exported(root / "a")
    (root / "b" / "_SUCCESS").unlink()
    with pytest.raises(ExportError, match="not a complete export"):
        load_exported(root / "b")


def test_evaluate_refuses_features_of_another_spec(exported, feature_writer, tiny_spec, tmp_path):
    _, config, _ = exported
    other = feature_writer(tmp_path / "other", dataclasses.replace(tiny_spec, context_len=6, stride=6))
    with pytest.raises(DataError, match="another feature spec"):
        evaluate_main(["--run", config.run, "--features", str(other)])


def test_evaluate_refuses_features_of_another_schema_naming_the_difference(exported, tiny_watch_features):
    _, config, _ = exported
    with pytest.raises(SchemaError, match=r"the feature dataset .* has another event schema than expected: "
                                          r"name: 'feed' vs 'watch'"):
        evaluate_main(["--run", config.run, "--features", str(tiny_watch_features)])


@pytest.mark.slow
def test_export_of_a_run_matches_its_final_checkpoint(trained_run, tiny_features, checkpoint_state, tmp_path):
    """The export's tables are the sharded tables gathered whole, its dense weights DeepSpeed's."""
    exported_model, config, spec = load_exported(trained_run.run / "export" / "latest")
    trained = GenerativeRanker(config.model, spec, 0)
    trained.load_state_dict(checkpoint_state(trained_run.run / "checkpoints" / "step00000032", tmp_path))
    trained.eval()
    batch = next(eval_batches(tiny_features, spec, 32, 0, 1))
    with torch.no_grad():
        expected, actual = trained(batch), exported_model(batch)
    for task in expected:
        assert torch.equal(expected[task], actual[task]), task


@pytest.mark.slow
def test_a_warm_start_exports_the_anchor_of_its_checkpoint(trained_run, feature_writer, launch,
                                                           train_overrides, checkpoint_state, tmp_path):
    """A warm start on data with a later watermark keeps its checkpoint's T_ref in the weights; the
    export records that anchor (not the new data's), and the exported model scores like the
    segment's final checkpoint."""
    fresh = as_next_batch(feature_writer(tmp_path / "fresh", train_files=[(9, 64, 32)],
                                         eval_files=[(10, 32, 32)], seed=4))
    source = checkpoint.checkpoint_root(trained_run.run) / checkpoint.complete_tags(trained_run.run)[-1]
    anchor = torch.load(source / "mp_rank_00_model_states.pt", weights_only=True)[
        "module"]["rotary.time_features.t_ref_seconds"].item()
    fresh_watermark = json.loads((fresh / "_MANIFEST.json").read_text())["watermark_ms"] // 1000
    assert fresh_watermark != anchor
    run = tmp_path / "warm"
    launch(fresh, run, *train_overrides, "train.steps=2", "schedule.kind=constant",
           "schedule.warmup_steps=0", "train.eval_every=0", "train.checkpoint_every=0",
           "--resume-from", str(trained_run.run))
    record = json.loads((run / "export" / "latest" / "feature_spec.json").read_text())
    assert record["t_ref_seconds"] == anchor
    exported_model, config, spec = load_exported(run / "export" / "latest")
    assert exported_model.time_reference() == anchor
    final = checkpoint.checkpoint_root(run) / checkpoint.complete_tags(run)[-1]
    trained = GenerativeRanker(config.model, spec, fresh_watermark)
    trained.load_state_dict(checkpoint_state(final, tmp_path))
    trained.eval()
    batch = next(eval_batches(fresh, spec, 32, 0, 1))
    with torch.no_grad():
        expected, actual = trained(batch), exported_model(batch)
    for task in expected:
        assert torch.equal(expected[task], actual[task]), task


@pytest.mark.slow
def test_evaluate_gives_the_same_metrics_on_one_and_two_ranks(trained_run, tmp_path, capsys):
    run = tmp_path / "evaluated"
    shutil.copytree(trained_run.run / "export", run / "export", symlinks=True)
    training = json.loads((trained_run.run / "metrics.json").read_text())["metrics"]

    assert evaluate_main(["--run", str(run), "--features", str(trained_run.features)]) == 0
    assert "contribution" in capsys.readouterr().out
    one_rank = json.loads((run / "metrics.json").read_text())
    assert one_rank["ranks"] == 1
    assert evaluate_main(["--run", str(run), "--nproc", "2"]) == 0  # features: the run's own
    two_ranks = json.loads((run / "metrics.json").read_text())
    assert two_ranks["ranks"] == 2 and two_ranks["features"] == str(trained_run.features)

    # The export's evaluation equals the trainer's own (2-rank, DeepSpeed engine) final evaluation.
    for reference in (training, two_ranks["metrics"]):
        for task, values in one_rank["metrics"].items():
            assert values["count"] == reference[task]["count"] > 0
            for name, value in values.items():
                assert value == pytest.approx(reference[task][name], rel=1e-9, abs=1e-12), (task, name)
