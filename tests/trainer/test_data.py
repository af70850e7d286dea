"""Petastorm input: sharding (disjoint, covering, uneven, fewer row groups than ranks), determinism
and resume position, batch tensors."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from features.spec import ID_COLUMNS, TOKEN_FLOAT_COLUMNS, TRAINING_COLUMNS
from features.dataset import IncompleteDatasetError, read_manifest, write_manifest
from trainer.data import (DataError, TrainStream, count_rows, eval_batches, parquet_files,
                          read_feature_manifest, split_dir, to_tensors, training_steps)

# Petastorm's reader worker never closes the Parquet files it opens (they close when collected).

C = 8  # the tiny dataset's context length (conftest.TINY_SPEC)
RowKey = tuple[int, bytes]


def row_keys(user_key: np.ndarray, ts: np.ndarray) -> list[RowKey]:
    """A row's identity: its user and its token timestamps (unique in the tiny dataset)."""
    return [(int(user), np.ascontiguousarray(times).tobytes()) for user, times in zip(user_key, ts)]


def all_rows(features, split: str) -> list[RowKey]:
    """Ground truth straight from the Parquet files, without Petastorm."""
    keys: list[RowKey] = []
    for path in parquet_files(split_dir(features, split)):
        table = pq.read_table(path, columns=["user_key", "ts"])
        ts = np.array(table.column("ts").to_pylist(), dtype=np.int64)
        keys += row_keys(table.column("user_key").to_numpy(), ts)
    return keys


def eval_rows(features, rank: int, world: int) -> list[RowKey]:
    keys: list[RowKey] = []
    for batch in eval_batches(features, C, 16, rank, world):
        keys += row_keys(batch["user_key"].numpy(), batch["ts"].numpy())
    return keys


def stream_rows(features, rank: int, world: int, batches: int, **options) -> list[RowKey]:
    """``batches`` micro batches of 16 rows of rank ``rank`` (a global batch of 16 × ``world``)."""
    keys: list[RowKey] = []
    with TrainStream(features, C, 16 * world, options.pop("shuffle_buffer", 64), 7, rank, world,
                     **options) as stream:
        for _ in range(batches):
            batch = next(stream)
            keys += row_keys(batch["user_key"].numpy(), batch["ts"].numpy())
    return keys


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


def test_train_streams_are_disjoint_cover_and_never_run_dry(tiny_features):
    rows, groups = count_rows(split_dir(tiny_features, "train"))
    assert groups == 7  # 4 row groups for rank 0, 3 for rank 1
    # 30 batches of 16 is > 3 passes over either shard: both ranks keep going past their epoch end.
    shards = [stream_rows(tiny_features, rank, 2, 30) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 30 * 16
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == set(all_rows(tiny_features, "train"))
    assert len(set(shards[0])) != len(set(shards[1]))


def test_every_rank_agrees_on_the_step_count(tiny_features):
    rows, _ = count_rows(split_dir(tiny_features, "train"))
    assert training_steps(tiny_features, 0, 1.0, 32) == -(-rows // 32)
    assert training_steps(tiny_features, 0, 2.5, 32) == -(-int(2.5 * rows) // 32)
    assert training_steps(tiny_features, 5, 1.0, 32) == 5


def test_fewer_row_groups_than_ranks_falls_back_to_row_striding(single_row_group, caplog):
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        shards = [eval_rows(single_row_group, rank, 2) for rank in range(2)]
    assert "fewer row groups than the 2 ranks" in caplog.text
    assert [len(shard) for shard in shards] == [11, 10]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(all_rows(single_row_group, "eval"))

    train = [stream_rows(single_row_group, rank, 2, 10) for rank in range(2)]
    assert not set(train[0]) & set(train[1])
    assert set(train[0]) | set(train[1]) == set(all_rows(single_row_group, "train"))


def test_stream_is_deterministic_and_resumes_at_the_same_position(tiny_features):
    straight = stream_rows(tiny_features, 1, 2, 24)
    assert stream_rows(tiny_features, 1, 2, 24) == straight
    assert stream_rows(tiny_features, 1, 2, 14, skip_steps=10) == straight[10 * 16:]
    assert stream_rows(tiny_features, 0, 2, 24) != straight
    with TrainStream(tiny_features, C, 32, 64, 7, 1, 2, skip_steps=3) as stream:
        next(stream)
        assert stream.steps == 4


def test_shuffle_buffer_mixes_rows_across_row_groups(tiny_features):
    unshuffled = stream_rows(tiny_features, 0, 2, 8, shuffle_buffer=0)
    shuffled = stream_rows(tiny_features, 0, 2, 8, shuffle_buffer=128)
    assert unshuffled != shuffled
    assert sorted(unshuffled[:128]) != sorted(shuffled[:128])  # not just a reordering within batches


def test_batches_hold_typed_tensors_of_the_context_length(tiny_features):
    batch = next(iter(eval_batches(tiny_features, C, 16, 0, 1)))
    assert set(batch) == set(TRAINING_COLUMNS)
    assert batch["ts"].shape == (16, C) and batch["user_key"].shape == (16,)
    for name in ("ts", "user_key", "length", *ID_COLUMNS):
        assert batch[name].dtype == torch.int64, name
    for name in TOKEN_FLOAT_COLUMNS:
        assert batch[name].dtype == torch.float32, name
    real = torch.arange(C)[None, :] >= C - batch["length"][:, None]
    assert torch.equal(batch["loss_mask"] > 0, real)  # left-padded, as the contract says


def test_wrong_context_length_is_a_clear_error(tiny_features):
    columns = {name: np.zeros((2,) if name in ("user_key", "length") else (2, C), np.int64)
               for name in TRAINING_COLUMNS}
    with pytest.raises(DataError, match=r"column 'ts' has shape \(2, 8\); expected \[rows, 50\]"):
        to_tensors(columns, 50)


def test_missing_split_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="holds no Parquet files"):
        TrainStream(tmp_path, C, 16, 64, 0, 0, 1)
    with pytest.raises(DataError, match="holds no Parquet files"):
        next(eval_batches(tmp_path, C, 16, 0, 1))


def test_manifest_gives_the_spec_and_refuses_other_versions_and_incomplete_datasets(
        tiny_features, tiny_spec, tmp_path):
    manifest, spec = read_feature_manifest(tiny_features)
    assert spec == tiny_spec and manifest["watermark_ms"] > 0
    write_manifest(tmp_path, {**read_manifest(tiny_features), "feature_spec_version": "0"})
    with pytest.raises(DataError, match="feature spec version '0'; this trainer reads version '1'"):
        read_feature_manifest(tmp_path)
    (tmp_path / "_SUCCESS").unlink()
    with pytest.raises(IncompleteDatasetError):
        read_feature_manifest(tmp_path)
