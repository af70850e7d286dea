"""Elastic resume: the global order of training rows never depends on the world size, so a
checkpoint written by W ranks continues on W' ranks at the same global batch. Proved on the data
layer, on resume planning, and with the real launcher: 2 ranks → 1 rank → 2 ranks (ZeRO-1, so the
optimizer state goes through DeepSpeed's universal checkpoint) ends where an uninterrupted run ends."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_config
from common.repo import REPO_ROOT
from features.schema import SchemaError
from trainer.checkpoint import (
    COMPLETE_MARKER, UNIVERSAL, checkpoint_root, plan_resume, saved_checkpoints,
)
from trainer.config import TrainConfig, deepspeed_config
from trainer.data import DataError, TrainStream, check_layout, real_rows, row_fingerprints
from trainer.train import resolved_shards
from training_fixtures import TINY_SPEC, TINY_WATCH_SPEC, checkpoint_weights

SPEC = TINY_SPEC
"""The tiny dataset's spec (training_fixtures)."""
FEED = SPEC.event_schema


def trained_ids(batch) -> list[int]:
    """The ids of a batch's real rows (padding rows, ``length`` 0, fill an epoch's short last step)."""
    real = real_rows(batch).numpy()
    return row_fingerprints(batch["user_key"].numpy()[real], batch["ts"].numpy()[real])


def rank_steps(features, rank: int, world: int, steps: int, shards: int = 0, batch: int = 32,
               skip: int = 0, shuffle_buffer: int = 24, seed: int = 5) -> list[list[int]]:
    with TrainStream(features, SPEC, batch, shuffle_buffer, seed, rank, world, shards,
                     skip_steps=skip) as stream:
        return [trained_ids(next(stream)) for _ in range(steps)]


def global_batches(features, world: int, steps: int, shards: int = 4, batch: int = 32,
                   skip: int = 0) -> list[list[int]]:
    """Global batch ids of ``steps`` steps on ``world`` ranks: each rank's rows, in rank order."""
    per_rank = [rank_steps(features, rank, world, steps, shards, batch, skip) for rank in range(world)]
    return [sum((rows[step] for rows in per_rank), []) for step in range(steps)]


def test_global_batches_are_the_same_on_one_two_and_four_ranks(tiny_features):
    # 232 rows in 7 row groups, 32 rows a step: 8 steps an epoch, the 8th with 8 rows and padding.
    single = global_batches(tiny_features, 1, 12)
    assert global_batches(tiny_features, 2, 12) == single
    assert global_batches(tiny_features, 4, 12) == single
    assert [len(batch) for batch in single] == [32] * 7 + [8] + [32] * 4
    assert all(len(set(batch)) == len(batch) for batch in single)
    assert len(set(sum(single[:8], []))) == 232  # the first epoch: every row once


def test_a_stream_resumes_on_another_world_size_at_the_same_global_batch(tiny_features):
    straight = global_batches(tiny_features, 1, 24)
    assert global_batches(tiny_features, 2, 3, skip=9) == straight[9:12]
    # Step 21 is three epochs into every shard: whole epochs are skipped without reading them.
    assert global_batches(tiny_features, 4, 3, skip=21) == straight[21:24]


@pytest.mark.parametrize("files", [[(0, 32, 16), (1, 20, 20)], [(0, 40, 40)]], ids=["3-groups", "1-group"])
def test_uneven_row_groups_feed_both_ranks_every_row_once_an_epoch(files, feature_writer, tmp_path):
    """3 row groups of 16, 16 and 20 rows over 2 ranks, or 1 row group over 2: the ranks split rows,
    not row groups, so neither runs dry and every epoch trains each row exactly once."""
    features = feature_writer(tmp_path, train_files=files, eval_files=[(3, 16, 16)], seed=3)
    rows = sum(count for _, count, _ in files)
    epoch = -(-rows // 16)
    ranks = [rank_steps(features, rank, 2, 4 * epoch, batch=16, shuffle_buffer=8, seed=0)
             for rank in range(2)]
    for first in range(0, 4 * epoch, epoch):  # 4 epochs
        trained = [row for steps in ranks for step in steps[first:first + epoch] for row in step]
        assert len(trained) == len(set(trained)) == rows, f"epoch from step {first + 1}"
        assert [sum(map(len, steps[first:first + epoch])) for steps in ranks] == [rows // 2] * 2


def test_world_sizes_that_cannot_split_the_order_fail_naming_the_key(tiny_features):
    with pytest.raises(ConfigError, match="config key 'data.shards'.*cannot be split over 4 ranks"):
        check_layout(32, 2, 4)
    with pytest.raises(ConfigError, match="config key 'data.batch_size'.*multiple of data.shards=3"):
        check_layout(32, 3, 1)
    config = load_config(TrainConfig, overrides=["features=f", "run=r", "data.batch_size=30"])
    with pytest.raises(ConfigError, match="config key 'data.batch_size'.*cannot be split over 4 ranks"):
        deepspeed_config(config, 4)
    with pytest.raises(ConfigError, match="config key 'data.shards'"):
        load_config(TrainConfig, overrides=["features=f", "run=r", "data.batch_size=30", "data.shards=4"])
    saved = {"steps": 8, "shards": 2, "seed": 0, "batch_size": 32, "shuffle_buffer": 64}
    assert resolved_shards(config, 1, saved) == 2
    assert resolved_shards(config, 3, None) == 3
    explicit = dataclasses.replace(config, data=dataclasses.replace(config.data, batch_size=32, shards=4))
    with pytest.raises(ConfigError, match="resume with data.shards=2"):
        resolved_shards(explicit, 1, saved)
    with pytest.raises(DataError, match="fewer than the 300 shards"):
        TrainStream(tiny_features, SPEC, 300, 0, 0, 0, 1, 300)


def fake_checkpoint(run: Path, step: int, world: int, partitioned: bool, spec=SPEC) -> None:
    """The files resume planning looks at: the marker and, for ZeRO, the per-rank optimizer slices."""
    tag = checkpoint_root(run) / f"step{step:08d}"
    tag.mkdir(parents=True)
    data = {"steps": step, "shards": 2, "seed": 0, "batch_size": 16, "shuffle_buffer": 16}
    (tag / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world": world, "data": data,
                                                   "spec": spec.record()}))
    for rank in range(world if partitioned else 0):
        (tag / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")


def test_resume_plans_the_universal_form_only_for_partitioned_state_on_another_world(tmp_path):
    zero1 = tmp_path / "zero1"
    fake_checkpoint(zero1, 4, 2, partitioned=True)
    fake_checkpoint(zero1, 8, 1, partitioned=True)
    on_two = plan_resume(zero1, 2, FEED)
    assert on_two.universal and [c.step for c in on_two.candidates] == [8, 4]
    on_one = plan_resume(zero1, 1, FEED)
    assert not on_one.universal and [c.step for c in on_one.candidates] == [8]  # step 4 needs conversion
    zero0 = tmp_path / "zero0"
    fake_checkpoint(zero0, 4, 2, partitioned=False)
    plan = plan_resume(zero0, 3, FEED)
    assert not plan.universal and plan.newest.world == 2  # the whole optimizer state is in one file


def test_a_checkpoint_marker_of_another_format_is_skipped_not_fatal(tmp_path, caplog):
    fake_checkpoint(tmp_path, 4, 2, partitioned=False)
    foreign = checkpoint_root(tmp_path) / "step00000009"
    foreign.mkdir()
    (foreign / COMPLETE_MARKER).write_text(json.dumps({"step": 9}))  # an older version's marker
    assert [saved.step for saved in saved_checkpoints(tmp_path)] == [4]
    assert plan_resume(tmp_path, 2, FEED).newest.step == 4
    assert "ignoring checkpoint" in caplog.text and "step00000009" in caplog.text


def test_a_checkpoint_of_another_schema_cannot_be_resumed_and_the_error_names_the_difference(tmp_path):
    """Planning reads the schema from the markers, before anything is loaded: a checkpoint trained
    on the watch log stops a resume on feed features naming the differing keys (the dataset's value
    first); another table size is a difference too, the same schema with other statistics is not."""
    fake_checkpoint(tmp_path / "watch", 4, 1, partitioned=False, spec=TINY_WATCH_SPEC)
    with pytest.raises(SchemaError, match=r"checkpoint .*step00000004.*another event schema.*"
                                          r"name: 'feed' vs 'watch'; fields.event_id: missing in the second"):
        plan_resume(tmp_path / "watch", 1, FEED)
    bigger = dataclasses.replace(SPEC, buckets={**SPEC.buckets, "item_id": 61})
    fake_checkpoint(tmp_path / "bigger", 4, 1, partitioned=False, spec=bigger)
    with pytest.raises(SchemaError, match=r"categoricals.item_id.buckets: 31 vs 61"):
        plan_resume(tmp_path / "bigger", 1, FEED)
    watch = TINY_WATCH_SPEC.event_schema
    refit = watch.fitted({"log_video_s": (3.0, 2.0)})
    fake_checkpoint(tmp_path / "refit", 4, 1, partitioned=False,
                    spec=TINY_WATCH_SPEC.with_schema(watch.fitted({"log_video_s": (1.0, 0.5)})))
    assert plan_resume(tmp_path / "refit", 1, refit).newest.step == 4


# The real launcher: 2 ranks → 1 → 2.

STEPS = 12
OVERRIDES = ("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.siren_width=16",
             "data.batch_size=16", "data.shuffle_buffer=16", "data.eval_batch_size=16",
             f"train.steps={STEPS}", "train.log_every=4", "train.checkpoint_every=4",
             "train.keep_checkpoints=3",
             "schedule.warmup_steps=2", "optim.lr=0.02", "deepspeed.zero_stage=1", "distributed.trace=true",
             "distributed.heartbeat_timeout_s=30", "distributed.timeout_s=120")
"""No dropout: its masks are drawn per rank, so they cannot follow the rows to another world size."""


@dataclasses.dataclass(frozen=True)
class Run:
    run: Path
    output: str


def train(features: Path, run: Path, nproc: int, *extra: str) -> Run:
    command = [sys.executable, "-m", "trainer.launch", "--features", str(features), "--run", str(run),
               "--nproc", str(nproc), "--config", str(REPO_ROOT / "conf" / "train.yaml"), *OVERRIDES, *extra]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{output[-6000:]}"
    return Run(run, output)


def resume_from(source: Run, step: int, run: Path, features: Path, nproc: int) -> Run:
    tag = f"step{step:08d}"
    shutil.copytree(checkpoint_root(source.run) / tag, checkpoint_root(run) / tag)
    return train(features, run, nproc, "train.resume=true")


@pytest.fixture(scope="module")
def three_group_features(feature_writer, tmp_path_factory) -> Path:
    """3 row groups for 2 logical shards: shard 0 holds two of them, shard 1 one."""
    return feature_writer(tmp_path_factory.mktemp("three-groups"), train_files=[(0, 32, 16), (1, 20, 20)],
                          eval_files=[(3, 16, 16)], seed=4)


@pytest.fixture(scope="module")
def chain(three_group_features, tmp_path_factory) -> dict[str, Run]:
    root = tmp_path_factory.mktemp("elastic")
    straight = train(three_group_features, root / "straight", 2)
    shrunk = resume_from(straight, 4, root / "two-to-one", three_group_features, 1)
    grown = resume_from(shrunk, 8, root / "one-to-two", three_group_features, 2)
    return {"straight": straight, "2->1": shrunk, "1->2": grown}


def logged_losses(output: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in re.findall(r"step (\d+)/\d+ loss ([0-9.]+)", output)}


def final_weights(run: Run) -> dict[str, torch.Tensor]:
    return torch.load(run.run / "export" / "latest" / "model.pt", weights_only=True)


def flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[name].float().flatten() for name in sorted(weights)])


def trained_rows(run: Run) -> dict[int, list[int]]:
    """Global batch per step, from every rank's trace (rank order)."""
    rows: dict[int, list[int]] = {}
    for path in sorted((run.run / "trace").glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            rows.setdefault(record["step"], []).extend(record["rows"])
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name, start, world", [("2->1", 4, 1), ("1->2", 8, 2)])
def test_resume_on_another_world_size_ends_where_the_uninterrupted_run_ends(chain, name, start, world):
    straight, resumed = chain["straight"], chain[name]
    was = 2 if world == 1 else 1
    assert (f"was written by {was} ranks with a partitioned optimizer; resuming on {world} ranks through "
            f"its universal form") in resumed.output
    assert f"resuming at step {start} from step{start:08d}" in resumed.output
    assert (checkpoint_root(resumed.run) / f"step{start:08d}" / UNIVERSAL / COMPLETE_MARKER).is_file()

    # The same global batches from the next step on: nothing trained twice, nothing skipped.
    after = {step: rows for step, rows in trained_rows(straight).items() if step > start}
    assert trained_rows(resumed) == after

    expected = logged_losses(straight.output)
    assert logged_losses(resumed.output) == pytest.approx(
        {step: loss for step, loss in expected.items() if step > start}, abs=2e-4)

    # The same trajectory up to float summation order (one pass of 16 rows or two of 8). Adam
    # divides each gradient by its own scale, so the few parameters whose gradient nearly cancels
    # (the rotary branches' output biases) turn that rounding into visible differences; the
    # distance over all weights stays three orders of magnitude below what 4 steps move them.
    ends, again = flat(final_weights(straight)), flat(final_weights(resumed))
    begin = flat(checkpoint_weights(checkpoint_root(straight.run) / "step00000004", resumed.run))
    assert (ends - again).norm() < 1e-3 * (ends - begin).norm()
    assert ((ends - again).abs() > 1e-5).float().mean() < 0.01
    metrics = [json.loads((run.run / "metrics.json").read_text())["metrics"] for run in (straight, resumed)]
    for task, values in metrics[0].items():
        assert metrics[1][task]["ne"] == pytest.approx(values["ne"], abs=1e-5), task


@pytest.mark.slow
def test_checkpoints_of_a_resumed_run_record_its_own_world_size(chain):
    markers = {tag.name: json.loads((tag / COMPLETE_MARKER).read_text())
               for tag in sorted(checkpoint_root(chain["2->1"].run).glob("step*"))}
    assert {name: marker["world"] for name, marker in markers.items()} == {
        "step00000004": 2, "step00000008": 1, "step00000012": 1}
    assert np.unique([marker["data"]["shards"] for marker in markers.values()]).tolist() == [2]
