"""The sharded id tables (trainer.embeddings) on real gloo ranks: the same initial rows and the same
update on 1 or 2 ranks whatever the plan, a checkpoint written by 2 ranks read back by 1, the
serving model's logits equal to the sharded model's, a table shared by two columns (the watch
schema), and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch

from embedding_support import (
    adam_on_cpu, joined, run_ranks, save_and_reload, serving_parity, train_steps,
)
from trainer.embeddings import initial_rows, lookup_input
from trainer.model import real_tokens, synthetic_batch
from training_fixtures import TINY_SPEC, TINY_WATCH_SPEC

pytestmark = pytest.mark.slow


def test_initial_rows_do_not_depend_on_how_they_are_asked_for():
    whole = initial_rows(3, "item_id", 0, 200_000, 4)
    assert torch.equal(whole[0], torch.zeros(4))  # padding
    assert torch.equal(initial_rows(3, "item_id", 65_530, 20, 4), whole[65_530:65_550])  # across a block
    assert not torch.equal(initial_rows(3, "author_id", 0, 10, 4), whole[:10])
    assert not torch.equal(initial_rows(4, "item_id", 0, 10, 4), whole[:10])
    assert whole[1:].std().item() == pytest.approx(0.02, rel=0.01)


def test_only_real_tokens_are_looked_up():
    batch = synthetic_batch(TINY_SPEC, 3, seed=0)
    batch["length"] = torch.tensor([2, 0, 8], dtype=torch.int32)
    ids = lookup_input(batch, ("item_id", "topic"), real_tokens(batch["length"], TINY_SPEC.context_len))
    assert ids.lengths().tolist() == [2, 0, 8, 2, 0, 8]
    item = ids["item_id"].values()
    assert torch.equal(item, torch.cat([batch["item_id"][0, -2:], batch["item_id"][2]]))


@pytest.mark.parametrize("sharding, optimizer", [("table_wise", "rowwise_adagrad"),
                                                 ("row_wise", "rowwise_adagrad"),
                                                 ("column_wise", "sgd")])
def test_two_ranks_start_and_update_like_one(sharding, optimizer, tmp_path):
    """Row-wise Adagrad's accumulator is per row of a shard, so column-wise shards are another
    optimizer than whole rows; SGD has no such state and must agree for column-wise too."""
    one = run_ranks(train_steps, 1, tmp_path / "one", sharding="table_wise", optimizer=optimizer, steps=3)[0]
    two = run_ranks(train_steps, 2, tmp_path / "two", sharding=sharding, optimizer=optimizer, steps=3)[0]
    for column in one["initial"]:
        assert torch.equal(two["initial"][column], one["initial"][column]), column
        assert torch.equal(one["initial"][column][0], torch.zeros(16)), column
        moved = (one["trained"][column] - one["initial"][column]).abs().max()
        assert moved > 1e-3, f"{column} did not train"
        torch.testing.assert_close(two["trained"][column], one["trained"][column], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("written, read", [("row_wise", "table_wise"), ("table_wise", "row_wise")])
def test_a_checkpoint_of_two_ranks_loads_on_one_with_its_optimizer_state(written, read, tmp_path):
    saved = run_ranks(save_and_reload, 2, tmp_path / "save", sharding=written, path=str(tmp_path / "ck"),
                      save=True)
    world = 1 if read == "table_wise" else 2
    loaded = run_ranks(save_and_reload, world, tmp_path / "load", sharding=read, path=str(tmp_path / "ck"),
                       save=False)
    assert set(loaded[0]["tables"]) == set(saved[0]["tables"])
    for column, rows in saved[0]["tables"].items():
        assert torch.equal(loaded[0]["tables"][column], rows), column
    moments, reloaded = joined(saved), joined(loaded)
    assert reloaded.keys() == moments.keys() and len(moments) == len(saved[0]["tables"])
    for name, moment in moments.items():
        assert moment.abs().sum() > 0, name
        assert torch.equal(reloaded[name], moment), name


def test_column_shards_cannot_resume_as_whole_rows_and_the_error_says_why(tmp_path):
    run_ranks(save_and_reload, 2, tmp_path / "save", sharding="column_wise", path=str(tmp_path / "ck"), save=True)
    loaded = run_ranks(save_and_reload, 1, tmp_path / "load", sharding="table_wise", path=str(tmp_path / "ck"),
                       save=False)[0]
    assert "was saved with shape" in loaded["error"] and "embeddings.sharding" in loaded["error"]


@pytest.mark.parametrize("world, sharding, schema", [(1, "table_wise", "feed"), (2, "row_wise", "feed"),
                                                    (2, "column_wise", "feed"), (2, "row_wise", "watch")])
def test_the_served_model_scores_exactly_what_the_sharded_model_scores(world, sharding, schema, tmp_path):
    result = run_ranks(serving_parity, world, tmp_path, sharding=sharding, schema=schema)[0]
    assert result["finite_loss"]
    for task, logits in result["sharded"].items():
        assert torch.equal(result["whole"][task], logits), task


def test_a_shared_table_is_one_table_read_by_both_columns_on_one_or_two_ranks(tmp_path):
    """The watch schema's ``origin_post_id`` reads ``post_id``'s rows: one TorchRec table of two
    feature names, initialised, planned and updated as one table (by both columns' lookups), the
    same on 1 and 2 ranks."""
    one = run_ranks(train_steps, 1, tmp_path / "one", sharding="table_wise", optimizer="rowwise_adagrad",
                    steps=2, schema="watch")[0]
    two = run_ranks(train_steps, 2, tmp_path / "two", sharding="row_wise", optimizer="rowwise_adagrad",
                    steps=2, schema="watch")[0]
    assert one["features"] == {"post_id": ("post_id", "origin_post_id"), "creator_id": ("creator_id",),
                               "format": ("format",), "country": ("country",)}
    assert set(one["trained"]) == {"post_id", "creator_id", "format", "country"}
    assert one["trained"]["post_id"].shape == (31, 16)
    assert torch.equal(one["initial"]["post_id"], initial_rows(7, "post_id", 0, 31, 16))
    for table in one["initial"]:
        assert torch.equal(two["initial"][table], one["initial"][table]), table
        torch.testing.assert_close(two["trained"][table], one["trained"][table], atol=1e-6, rtol=1e-5)
    # Rows only origin_post_id looked up were trained too (train_steps' batch), rows nobody read not.
    batch = synthetic_batch(TINY_WATCH_SPEC, 8, seed=1)
    real = real_tokens(batch["length"], TINY_WATCH_SPEC.context_len)
    by_post, by_origin = (set(batch[column][real].tolist()) for column in ("post_id", "origin_post_id"))
    moved = (one["trained"]["post_id"] - one["initial"]["post_id"]).abs().amax(dim=1) > 0
    assert by_origin - by_post and all(moved[row] for row in by_origin - by_post)
    assert not any(moved[row] for row in set(range(31)) - by_post - by_origin)


def test_adam_on_cpu_ranks_fails_naming_the_key(tmp_path):
    error = run_ranks(adam_on_cpu, 1, tmp_path)[0]["error"]
    assert error is not None and "embeddings.optimizer" in error and "GPU" in error
