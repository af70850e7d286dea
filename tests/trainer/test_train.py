"""Training: config, schedule and DeepSpeed settings; a real 2-rank ``deepspeed`` run that learns,
checkpoints and exports; resume equal to an uninterrupted run; no resume or warm start across event
schemas."""

from __future__ import annotations

import json
import math
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import ConfigError, load_config
from common.repo import REPO_ROOT
from features.spec import FeatureSpec
from trainer.checkpoint import COMPLETE_MARKER, CheckpointError, complete_tags, weights_only_loads
from trainer.config import ScheduleConfig, TrainConfig, deepspeed_config, lr_factor
from trainer.launch import main as train_main
from trainer.launcher import deepspeed_command, launch_env
from trainer.train import check_resumable
from training_fixtures import TINY_SPEC, TINY_WATCH_SPEC, as_next_batch

REQUIRED = ["features=/data/features", "run=/data/run"]



@pytest.mark.parametrize("override, key", [
    ("optim.lr=-1", "optim.lr"),
    ("train.stepz=3", "train.stepz"),
    ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
    ("deepspeed.precision=fp16", "deepspeed.precision"),
    ("schedule.kind=linear", "schedule.kind"),
    ("data.batch_size=0", "data.batch_size"),
    ("schedule.min_lr=0.5", "schedule.min_lr"),
    ("model.n_heads=3", "model"),
    ("embeddings.sharding=by_hash", "embeddings.sharding"),
    ("embeddings.optimizer=lamb", "embeddings.optimizer"),
    ("embeddings.lr=0", "embeddings.lr"),
])
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(TrainConfig, overrides=[*REQUIRED, override])


def test_features_and_run_are_required():
    with pytest.raises(ConfigError, match="features, run"):
        load_config(TrainConfig)


def test_bad_config_fails_before_the_launcher_starts(tmp_path):
    with pytest.raises(ConfigError, match="train.stepz"):
        train_main(["--features", str(tmp_path), "--run", str(tmp_path), "train.stepz=3"])


def test_conf_train_yaml_mirrors_the_defaults():
    from_file = load_config(TrainConfig, REPO_ROOT / "conf" / "train.yaml", REQUIRED)
    assert from_file == load_config(TrainConfig, overrides=REQUIRED)


def test_schedule_warms_up_then_decays_to_min_lr():
    schedule = ScheduleConfig(kind="cosine", warmup_steps=4, min_lr=1e-4)
    factors = [lr_factor(schedule, 1e-2, 20, step) for step in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(factors[4:], factors[5:]))
    assert factors[-1] == pytest.approx(1e-2 + (1 - 1e-2) * 0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(schedule, 1e-2, 20, 20) == pytest.approx(1e-2)  # min_lr / lr
    constant = ScheduleConfig(kind="constant", warmup_steps=2)
    assert [lr_factor(constant, 1e-2, 20, step) for step in (0, 1, 2, 19)] == [0.5, 1.0, 1.0, 1.0]


def test_deepspeed_config_comes_from_train_config():
    config = load_config(TrainConfig, overrides=[
        *REQUIRED, "data.batch_size=32", "optim.grad_clip=0.5", "deepspeed.zero_stage=2",
        "deepspeed.precision=bf16", "optim.weight_decay=0.1"])
    ds = deepspeed_config(config, world=4)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"] == {"enabled": True}
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"]["weight_decay"] == 0.1
    assert ds["optimizer"]["params"]["torch_adam"] is True


def test_launcher_command_and_environment(monkeypatch):
    command = deepspeed_command(Path("trainer/train.py"), 2, 29500, "conf/train.yaml", ["seed=3"])
    assert command == [str(Path(sys.prefix) / "bin" / "deepspeed"), "--num_gpus", "2", "--master_port",
                       "29500", "trainer/train.py", "--config", "conf/train.yaml", "seed=3"]
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    env = launch_env({"PYTHONPATH": "/elsewhere", "PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(REPO_ROOT), "/elsewhere"]
    assert env["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")


def test_resume_refuses_a_different_data_order():
    saved = {"steps": 8, "shards": 2, "seed": 0, "batch_size": 32, "shuffle_buffer": 64}
    check_resumable(saved, {**saved, "steps": 0})
    with pytest.raises(CheckpointError, match="data.shards=2, this run has data.shards=4"):
        check_resumable(saved, {**saved, "shards": 4})


def test_only_complete_checkpoints_count(tmp_path):
    for step, complete in ((8, True), (16, True), (24, False)):
        directory = tmp_path / "checkpoints" / f"step{step:08d}"
        directory.mkdir(parents=True)
        if complete:
            (directory / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoints" / "step00000032.tmp").mkdir()
    assert complete_tags(tmp_path) == ["step00000008", "step00000016"]


class _Payload:
    """Unpickling this touches a file: what a malicious checkpoint would do."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return Path.touch, (self.flag,)


def test_checkpoint_loads_never_run_code_from_the_file(tmp_path):
    flag, path = tmp_path / "executed", tmp_path / "model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "extra": _Payload(flag)}, path)
    with weights_only_loads():
        with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):
            torch.load(path, weights_only=False)  # what DeepSpeed's checkpoint engine passes
    assert not flag.exists()
    torch.load(path, weights_only=False)
    assert flag.exists()  # the payload is real: without the guard it runs


def logged_losses(output: str) -> list[float]:
    return [float(value) for value in re.findall(r"step \d+/\d+ loss ([0-9.]+)", output)]


@pytest.mark.slow
def test_two_rank_run_learns_checkpoints_and_exports(trained_run):
    losses = logged_losses(trained_run.output)
    assert len(losses) == 8  # every 4 of 32 steps
    assert losses[-1] < 0.8 * losses[0]
    assert "data-wait" in trained_run.output and "lambda" in trained_run.output

    metrics = json.loads((trained_run.run / "metrics.json").read_text())
    assert metrics["step"] == 32 and metrics["ranks"] == 2
    assert metrics["metrics"]["contribution"]["ne"] < 0.9  # well below the base-rate predictor
    assert metrics["metrics"]["contribution"]["auc"] > 0.8

    # Checkpoints at 8, 16, 24, 32, keeping the newest two; `latest` names the newest.
    assert complete_tags(trained_run.run) == ["step00000024", "step00000032"]
    checkpoints = trained_run.run / "checkpoints"
    assert sorted(path.name for path in checkpoints.iterdir() if path.is_dir()) == [
        "step00000024", "step00000032"]
    assert (checkpoints / "latest").read_text().strip() == "step00000032"
    assert sorted(p.name for p in (checkpoints / "step00000032").glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = torch.load(checkpoints / "step00000032" / "mp_rank_00_model_states.pt", weights_only=True)
    assert state["step"] == 32
    # DeepSpeed holds the dense model only; the id tables are TorchRec's, sharded over both ranks.
    assert not [name for name in state["module"] if "embedding" in name]
    assert "item_id: row_wise (rank 0: rows 0+16 cols 0+32, rank 1: rows 16+15 cols 0+32)" in trained_run.output
    assert sorted(path.name for path in (checkpoints / "step00000032" / "tables").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert state["data"] == {"steps": 32, "shards": 2, "seed": 0, "batch_size": 32, "shuffle_buffer": 64}
    marker = json.loads((checkpoints / "step00000032" / COMPLETE_MARKER).read_text())
    assert FeatureSpec(**marker["spec"]) == TINY_SPEC  # what a resume or warm start checks its data against
    assert state["metrics"]["contribution"]["ne"] == pytest.approx(metrics["metrics"]["contribution"]["ne"])

    export = trained_run.run / "export" / "latest"
    assert export.is_symlink() and export.resolve().name == "step00000032"
    assert (export / "_SUCCESS").is_file()


@pytest.mark.slow
def test_resume_continues_exactly_where_training_stopped(trained_run, launch, tmp_path):
    """Step 24 of the shared run + resume = the uninterrupted 32 steps. The newest checkpoint
    (step 32) is planted with one rank's optimizer shard truncated: that rank cannot load it, so
    both ranks must agree to fall back to step 24."""
    resumed = tmp_path / "resumed"
    source = trained_run.run / "checkpoints"
    shutil.copytree(source / "step00000024", resumed / "checkpoints" / "step00000024")
    shutil.copytree(source / "step00000032", resumed / "checkpoints" / "step00000032")
    shard = resumed / "checkpoints" / "step00000032" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])

    result = launch(trained_run.features, resumed, *trained_run.overrides, "train.resume=true")
    assert "resuming at step 24" in result.output
    assert "unreadable on some rank: falling back" in result.output
    assert len(logged_losses(result.output)) == 2  # steps 28 and 32 only
    assert logged_losses(result.output) == logged_losses(trained_run.output)[-2:]

    straight = torch.load(trained_run.run / "export" / "latest" / "model.pt", weights_only=True)
    again = torch.load(resumed / "export" / "latest" / "model.pt", weights_only=True)
    assert straight.keys() == again.keys()
    for name in straight:
        torch.testing.assert_close(again[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert (json.loads((resumed / "metrics.json").read_text())["metrics"]
            == json.loads((trained_run.run / "metrics.json").read_text())["metrics"])


@pytest.mark.slow
def test_dense_tables_train_inside_the_deepspeed_model(trained_run, launch, tmp_path):
    """``embeddings.sharding=data_parallel`` keeps the earlier design: the tables are parameters of
    the DeepSpeed module (replicated, AdamW), and the export has the same layout as a sharded run's."""
    run = launch(trained_run.features, tmp_path / "dense", *trained_run.overrides, "train.steps=4",
                 "train.eval_every=0", "train.checkpoint_every=0", "embeddings.sharding=data_parallel")
    assert "id tables" not in run.output
    state = torch.load(tmp_path / "dense" / "checkpoints" / "step00000004" / "mp_rank_00_model_states.pt",
                       weights_only=True)
    assert {name for name in state["module"] if name.startswith("id_embeddings.")} == {
        f"id_embeddings.{table}.weight" for table in TINY_SPEC.buckets}
    assert not (tmp_path / "dense" / "checkpoints" / "step00000004" / "tables").exists()
    dense = torch.load(tmp_path / "dense" / "export" / "latest" / "model.pt", weights_only=True)
    sharded = torch.load(trained_run.run / "export" / "latest" / "model.pt", weights_only=True)
    assert {name: tensor.shape for name, tensor in dense.items()} == {
        name: tensor.shape for name, tensor in sharded.items()}


def failed_launch(features: Path, run: Path, *overrides: str) -> str:
    """``sirenfeed train`` on 2 CPU ranks that must fail; returns its output."""
    command = [sys.executable, "-m", "sirenfeed.cli", "train", "--features", str(features), "--run", str(run),
               "--nproc", "2", "--config", str(REPO_ROOT / "conf" / "train.yaml"), *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_no_resume_or_warm_start_continues_a_checkpoint_of_another_schema(trained_run, feature_writer,
                                                                           tmp_path):
    """The feed run's checkpoint on watch features: both a resume and a warm start stop before
    loading anything, naming the schema keys that differ (the features' value first)."""
    watch = as_next_batch(feature_writer(tmp_path / "watch", TINY_WATCH_SPEC))
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run.run / "checkpoints", resumed / "checkpoints")
    output = failed_launch(watch, resumed, *trained_run.overrides, "train.resume=true")
    assert "SchemaError" in output and "step00000032" in output
    assert "has another event schema than expected: name: 'watch' vs 'feed'" in output
    output = failed_launch(watch, tmp_path / "warm", *trained_run.overrides, "schedule.kind=constant",
                           "--resume-from", str(trained_run.run))
    assert "SchemaError" in output and "has another event schema than expected: name: 'watch' vs 'feed'" in output
    assert not (tmp_path / "warm" / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_on_the_watch_schema_trains_its_own_tasks_through_a_shared_table(tiny_watch_features, launch,
                                                                                train_overrides, tiny_watch_spec,
                                                                                tmp_path):
    """Nothing but the dataset changes: 2 ranks train the watch log's two tasks (follow weighted 2),
    its post table sharded once for both columns that read it, learning the planted signal (follow
    by post, watched by origin post: through the shared table), and export the model of its schema."""
    run = launch(tiny_watch_features, tmp_path / "run", *train_overrides).run
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"follow", "watched"}
    for task in metrics:
        assert metrics[task]["auc"] > 0.75, (task, metrics[task])
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    for record in history:
        assert set(record["task_loss"]) == {"follow", "watched"}
        assert record["loss"] == pytest.approx(2 * record["task_loss"]["follow"] + record["task_loss"]["watched"],
                                               rel=1e-6)
    marker = json.loads((run / "checkpoints" / "step00000032" / COMPLETE_MARKER).read_text())
    assert FeatureSpec(**marker["spec"]) == tiny_watch_spec
    exported = torch.load(run / "export" / "latest" / "model.pt", weights_only=True)
    assert {name for name in exported if name.startswith("id_embeddings.")} == {
        f"id_embeddings.{table}.weight" for table in ("post_id", "creator_id", "format", "country")}
    assert exported["heads.weight"].shape == (2, 32)
