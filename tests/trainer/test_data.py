"""Petastorm input: sharding (disjoint, covering, uneven, fewer row groups than ranks), determinism
and resume position, batch tensors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from common.files import visible_files
from features.dataset import IncompleteDatasetError, read_manifest, write_manifest
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec
from trainer.data import (
    DataError, TrainStream, count_rows, epoch_assignment, eval_batches, padding_rows,
    read_feature_manifest, real_rows, row_fingerprints, split_dir, steps_per_epoch, to_tensors,
    training_steps,
)
from trainer.train import LogWindow
from training_fixtures import TINY_SPEC, TINY_WATCH_SPEC, dataset_spec

# Petastorm's reader worker never closes the Parquet files it opens (they close when collected).

SPEC = TINY_SPEC
"""The tiny dataset's spec (training_fixtures)."""
C = SPEC.context_len
SCHEMA = SPEC.event_schema
RowKey = tuple[int, bytes]


def row_keys(user_key: np.ndarray, ts: np.ndarray) -> list[RowKey]:
    """A row's identity: its user and its token timestamps (unique in the tiny dataset)."""
    return [(int(user), np.ascontiguousarray(times).tobytes()) for user, times in zip(user_key, ts)]


def all_rows(features, split: str) -> list[RowKey]:
    """Ground truth straight from the Parquet files, without Petastorm."""
    keys: list[RowKey] = []
    for path in visible_files(split_dir(features, split)):
        table = pq.read_table(path, columns=["user_key", "ts"])
        ts = np.array(table.column("ts").to_pylist(), dtype=np.int64)
        keys += row_keys(table.column("user_key").to_numpy(), ts)
    return keys


def eval_rows(features, rank: int, world: int) -> list[RowKey]:
    keys: list[RowKey] = []
    for batch in eval_batches(features, SPEC, 16, rank, world):
        keys += row_keys(batch["user_key"].numpy(), batch["ts"].numpy())
    return keys


def real_keys(batch) -> list[RowKey]:
    """The row keys of a batch's real rows (padding rows are windows of no tokens)."""
    real = real_rows(batch).numpy()
    return row_keys(batch["user_key"].numpy()[real], batch["ts"].numpy()[real])


def stream_steps(features, rank: int, world: int, batches: int, **options) -> list[list[RowKey]]:
    """The real rows of ``batches`` micro batches of 16 rows of rank ``rank`` (a global batch of
    16 × ``world``), per step."""
    with TrainStream(features, SPEC, 16 * world, options.pop("shuffle_buffer", 64), 7, rank, world,
                     **options) as stream:
        steps = [next(stream) for _ in range(batches)]
    assert {len(batch["length"]) for batch in steps} == {16}, "every micro batch has its full size"
    return [real_keys(batch) for batch in steps]


def stream_rows(features, rank: int, world: int, batches: int, **options) -> list[RowKey]:
    return [row for step in stream_steps(features, rank, world, batches, **options) for row in step]


@pytest.fixture(scope="module")
def single_row_group(tmp_path_factory, feature_writer):
    """Fewer row groups than ranks in both splits."""
    return feature_writer(tmp_path_factory.mktemp("one-group"), train_files=[(0, 40, 40)],
                          eval_files=[(3, 21, 21)], seed=1)


def test_row_keys_identify_rows(tiny_features, tiny_spec):
    assert tiny_spec.context_len == C
    for split in ("train", "eval"):
        keys = all_rows(tiny_features, split)
        assert len(set(keys)) == len(keys) == count_rows(split_dir(tiny_features, split))[0]


def test_eval_shards_are_disjoint_and_cover_the_split_once(tiny_features):
    truth = all_rows(tiny_features, "eval")
    shards = [eval_rows(tiny_features, rank, 2) for rank in range(2)]
    assert len(shards[0]) != len(shards[1])  # uneven row groups, uneven shards
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(truth)
    assert sorted(eval_rows(tiny_features, 0, 1)) == sorted(truth)


@pytest.mark.parametrize("group_rows", [[60, 21], [32] * 6 + [40], [40], [7, 0, 13, 1, 40, 5]],
                         ids=["60+21", "7-groups", "1-group", "ragged"])
@pytest.mark.parametrize("shards", [1, 2, 3, 4, 8])
def test_row_assignment_gives_every_row_to_one_shard_and_balances_rows(group_rows, shards):
    for epoch in range(3):
        assignment = epoch_assignment(group_rows, shards, seed=7, epoch=epoch)
        assert assignment == epoch_assignment(group_rows, shards, seed=7, epoch=epoch)
        owned = [[(piece.group, row) for piece in pieces for row in range(piece.start, piece.stop)]
                 for pieces in assignment]
        every_row = sorted((group, row) for group, rows in enumerate(group_rows) for row in range(rows))
        assert sorted(row for shard in owned for row in shard) == every_row, f"epoch {epoch}"
        sizes = [len(shard) for shard in owned]
        assert max(sizes) - min(sizes) <= 1, sizes
        assert all(piece.start < piece.stop for pieces in assignment for piece in pieces)
    if len(group_rows) > 1:
        orders = {tuple(piece.group for pieces in epoch_assignment(group_rows, shards, 7, epoch)
                        for piece in pieces) for epoch in range(3)}
        assert len(orders) > 1, "each epoch lays the row groups out in its own order"


def test_train_streams_are_disjoint_cover_and_never_run_dry(tiny_features):
    rows, groups = count_rows(split_dir(tiny_features, "train"))
    assert (rows, groups) == (232, 7)  # 8 steps of 32 an epoch, the last one 24 rows short
    # 30 steps are more than 3 epochs: both ranks keep going past every epoch's end.
    ranks = [stream_steps(tiny_features, rank, 2, 30) for rank in range(2)]
    for step, (mine, theirs) in enumerate(zip(*ranks)):
        assert not set(mine) & set(theirs), f"step {step + 1}: a row trained twice"
    for epoch in range(3):
        trained = [row for steps in ranks for step in steps[epoch * 8:(epoch + 1) * 8] for row in step]
        assert sorted(trained) == sorted(all_rows(tiny_features, "train")), f"epoch {epoch}"
        assert [sum(map(len, steps[epoch * 8:(epoch + 1) * 8])) for steps in ranks] == [116, 116]


def test_every_rank_agrees_on_the_step_count(tiny_features):
    rows, _ = count_rows(split_dir(tiny_features, "train"))
    assert steps_per_epoch(rows, 32) == -(-rows // 32) == 8
    assert training_steps(tiny_features, 0, 1.0, 32) == 8
    assert training_steps(tiny_features, 0, 2.0, 32) == 16  # whole epochs, not 2 × 232 / 32 = 14.5
    assert training_steps(tiny_features, 0, 2.5, 32) == 20
    assert training_steps(tiny_features, 0, 0.375, 32) == 3
    assert training_steps(tiny_features, 5, 1.0, 32) == 5


def test_fewer_row_groups_than_ranks_falls_back_to_row_striding(single_row_group, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        shards = [eval_rows(single_row_group, rank, 2) for rank in range(2)]
    assert "fewer row groups than the 2 ranks" in caplog.text
    assert [len(shard) for shard in shards] == [11, 10]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_rows(single_row_group, "eval"))


def test_one_row_group_is_split_by_rows_between_training_ranks(single_row_group):
    # 40 rows, global batch 32: 2 steps an epoch, each rank 20 rows (16, then 4 and 12 padding).
    ranks = [stream_steps(single_row_group, rank, 2, 10) for rank in range(2)]
    assert [[len(step) for step in steps] for steps in ranks] == [[16, 4] * 5] * 2
    for epoch in range(5):
        trained = [row for steps in ranks for row in steps[2 * epoch] + steps[2 * epoch + 1]]
        assert sorted(trained) == sorted(all_rows(single_row_group, "train"))


UNEVEN_FILES = [(0, 60, 60), (1, 21, 21)]
"""Two row groups of 60 and 21 rows: 81 rows, so a global batch of 16 leaves 1 row for the 6th step."""
UNEVEN_BATCH = 16


@pytest.fixture(scope="module")
def uneven_features(tmp_path_factory, feature_writer):
    return feature_writer(tmp_path_factory.mktemp("uneven"), train_files=UNEVEN_FILES,
                          eval_files=[(3, 16, 16)], seed=5)


def epoch_of_ranks(features, world: int, epochs: int, shards: int = 0) -> list[list[list[RowKey]]]:
    """Per rank, per step, the real rows of ``epochs`` epochs of micro batches (steps from the footers)."""
    steps = epochs * -(-sum(rows for _, rows, _ in UNEVEN_FILES) // UNEVEN_BATCH)
    per_rank = []
    for rank in range(world):
        with TrainStream(features, SPEC, UNEVEN_BATCH, 24, 3, rank, world, shards) as stream:
            batches = [next(stream) for _ in range(steps)]
        assert {len(batch["length"]) for batch in batches} == {UNEVEN_BATCH // world}, "micro batch size"
        per_rank.append([real_keys(batch) for batch in batches])
    return per_rank


@pytest.mark.parametrize("world", [1, 2, 4])
def test_an_epoch_trains_every_row_exactly_once_on_any_world_size(uneven_features, world):
    """Uneven row groups (60 and 21 rows): every epoch's steps hold each row exactly once, on every
    world size, and every rank runs the same number of steps."""
    truth = sorted(all_rows(uneven_features, "train"))
    per_rank = epoch_of_ranks(uneven_features, world, epochs=2)
    steps = len(per_rank[0]) // 2
    for epoch in range(2):
        trained = [row for rows in per_rank for step in rows[epoch * steps:(epoch + 1) * steps]
                   for row in step]
        assert sorted(trained) == truth, f"epoch {epoch}: {len(trained)} rows, {len(set(trained))} distinct"


def global_steps(per_rank: list[list[list[RowKey]]]) -> list[list[RowKey]]:
    return [[row for rows in per_rank for row in rows[step]] for step in range(len(per_rank[0]))]


def test_global_batches_with_a_padded_last_step_do_not_depend_on_the_world_size(uneven_features):
    single = global_steps(epoch_of_ranks(uneven_features, 1, epochs=2, shards=4))
    assert [len(step) for step in single] == ([16] * 5 + [1]) * 2
    for world in (2, 4):
        assert global_steps(epoch_of_ranks(uneven_features, world, epochs=2, shards=4)) == single, world


def test_a_stream_resumes_at_any_step_of_a_padded_epoch(uneven_features):
    def steps_from(skip: int) -> list[list[RowKey]]:
        with TrainStream(uneven_features, SPEC, UNEVEN_BATCH, 24, 3, 1, 2, skip_steps=skip) as stream:
            return [real_keys(next(stream)) for _ in range(13 - skip)]

    straight = steps_from(0)
    for skip in (4, 5, 6, 11, 12):  # into the padded 6th step, the next epoch, the epoch after
        assert steps_from(skip) == straight[skip:], skip


def test_padding_rows_fill_only_the_last_step_and_count_for_nothing(uneven_features):
    # 4 shards of 20, 20, 20 and 21 rows, 4 a step: shard 0 has nothing left for the 6th step.
    with TrainStream(uneven_features, SPEC, UNEVEN_BATCH, 24, 3, 0, 4) as stream:
        batches = [next(stream) for _ in range(6)]
    assert [int(real_rows(batch).sum()) for batch in batches] == [4, 4, 4, 4, 4, 0]
    padded = batches[-1]
    assert padded["length"].eq(0).all() and padded["loss_mask"].eq(0).all()
    assert padded["user_key"].shape == (4,) and padded["ts"].shape == (4, C)

    zero = torch.zeros(())
    windows = []
    for batch in (batches[0], padded):
        window = LogWindow(torch.device("cpu"), SCHEMA.label_columns)
        window.add(zero, {task: zero for task in SCHEMA.label_columns}, batch, 0.0)
        windows.append(window)
    assert [int(window.rows) for window in windows] == [4, 0]  # samples/s counts real rows only
    assert float(windows[1].sums[1]) == 0.0  # no label-bearing token: no weight in the token share
    assert set(padding_rows(2, SPEC)) == set(SCHEMA.training_columns)


@pytest.mark.slow
def test_two_ranks_train_every_row_once_per_epoch_in_equal_steps(uneven_features, launch,
                                                                 tiny_model_overrides, tmp_path):
    """The real launcher, 2 ranks, 2 epochs over the uneven split: each epoch's trace is the dataset."""
    run = launch(uneven_features, tmp_path / "run", *tiny_model_overrides,
                 f"data.batch_size={UNEVEN_BATCH}", "data.shuffle_buffer=24", "data.eval_batch_size=16",
                 "train.epochs=2", "train.log_every=3", "train.checkpoint_every=0",
                 "schedule.warmup_steps=2", "distributed.trace=true").run
    traces = [[json.loads(line)
               for line in (run / "trace" / f"rank{rank:05d}.jsonl").read_text().splitlines()]
              for rank in range(2)]
    steps = -(-sum(rows for _, rows, _ in UNEVEN_FILES) // UNEVEN_BATCH)
    assert [record["step"] for record in traces[0]] == [record["step"] for record in traces[1]]
    truth = sorted(fingerprint for path in visible_files(split_dir(uneven_features, "train"))
                   for fingerprint in fingerprints(pq.read_table(path, columns=["user_key", "ts"])))
    for epoch in range(2):
        trained = [row for trace in traces for record in trace[epoch * steps:(epoch + 1) * steps]
                   for row in record["rows"]]
        assert sorted(trained) == truth, f"epoch {epoch}: {len(trained)} rows, {len(set(trained))} distinct"
    assert [record["step"] for record in traces[0]] == list(range(1, 2 * steps + 1))


def fingerprints(table) -> list[int]:
    return row_fingerprints(table.column("user_key").to_numpy(),
                            np.array(table.column("ts").to_pylist(), dtype=np.int64))


def test_stream_is_deterministic_and_resumes_at_the_same_position(tiny_features):
    straight = stream_steps(tiny_features, 1, 2, 24)
    assert stream_steps(tiny_features, 1, 2, 24) == straight
    assert stream_steps(tiny_features, 1, 2, 14, skip_steps=10) == straight[10:]
    assert stream_steps(tiny_features, 0, 2, 24) != straight
    with TrainStream(tiny_features, SPEC, 32, 64, 7, 1, 2, skip_steps=3) as stream:
        next(stream)
        assert stream.steps == 4


def test_shuffle_buffer_mixes_rows_across_row_groups(tiny_features):
    unshuffled = stream_rows(tiny_features, 0, 2, 8, shuffle_buffer=0)
    shuffled = stream_rows(tiny_features, 0, 2, 8, shuffle_buffer=128)
    assert unshuffled != shuffled
    assert sorted(unshuffled[:64]) != sorted(shuffled[:64])  # not just a reordering within batches


def test_batches_hold_typed_tensors_of_the_context_length(tiny_features):
    batch = next(iter(eval_batches(tiny_features, SPEC, 16, 0, 1)))
    assert set(batch) == set(SCHEMA.training_columns)
    assert batch["ts"].shape == (16, C) and batch["user_key"].shape == (16,)
    for name in ("ts", "user_key", "length", *SCHEMA.id_columns):
        assert batch[name].dtype == torch.int64, name
    for name in SCHEMA.token_float_columns:
        assert batch[name].dtype == torch.float32, name
    real = torch.arange(C)[None, :] >= C - batch["length"][:, None]
    assert torch.equal(batch["loss_mask"] > 0, real)  # left-padded, as the contract says


def test_wrong_context_length_is_a_clear_error(tiny_features):
    columns = {name: np.zeros((2,) if name in ("user_key", "length") else (2, C), np.int64)
               for name in SCHEMA.training_columns}
    with pytest.raises(DataError, match=r"column 'ts' has shape \(2, 8\); expected \[rows, 50\]"):
        to_tensors(columns, FeatureSpec(context_len=50, stride=50, buckets=SPEC.buckets))


def test_missing_split_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        TrainStream(tmp_path, SPEC, 16, 64, 0, 0, 1)
    with pytest.raises(DataError, match="holds no Parquet files"):
        next(eval_batches(tmp_path, SPEC, 16, 0, 1))


def test_manifest_gives_the_spec_and_refuses_other_versions_and_incomplete_datasets(
        tiny_features, tiny_spec, tmp_path):
    manifest, spec = read_feature_manifest(tiny_features)
    assert spec == tiny_spec and manifest["watermark_ms"] > 0
    write_manifest(tmp_path, {**read_manifest(tiny_features), "feature_spec_version": "0"})
    with pytest.raises(DataError, match=f"feature spec version '0'; this trainer reads version "
                                        f"'{FEATURE_SPEC_VERSION}'"):
        read_feature_manifest(tmp_path)
    (tmp_path / "_SUCCESS").unlink()
    with pytest.raises(IncompleteDatasetError):
        read_feature_manifest(tmp_path)


def test_a_dataset_of_another_schema_is_read_by_its_own_columns(tiny_watch_features):
    """The manifest's schema says what the rows hold: the watch log's tables, numerics and tasks,
    read with their own dtypes, and nothing of the feed's."""
    manifest, spec = read_feature_manifest(tiny_watch_features)
    schema = spec.event_schema
    assert spec == dataset_spec(TINY_WATCH_SPEC) and schema.name == "watch" and not schema.needs_fit
    batch = next(iter(eval_batches(tiny_watch_features, spec, 16, 0, 1)))
    assert set(batch) == set(schema.training_columns)
    assert {"post_id", "origin_post_id", "log_video_s", "follow", "watched", "day_sin"} <= set(batch)
    assert not {"item_id", "like", "long_dwell", "tod_sin"} & set(batch)
    for name in schema.id_columns:
        assert batch[name].dtype == torch.int64 and int(batch[name].max()) < spec.buckets[schema.column_tables[name]]
    for name in schema.token_float_columns:
        assert batch[name].dtype == torch.float32, name
    with TrainStream(tiny_watch_features, spec, 16, 0, 0, 0, 1) as stream:
        assert set(next(stream)) == set(schema.training_columns)
