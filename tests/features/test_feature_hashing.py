"""Categorical ids: Spark's hash expression equals features.spec.hash_id, value for value, forever; the
feed's ids and column order are exactly what the job wrote before schema files."""

from __future__ import annotations

import random

from pyspark.sql import functions as F

from features.schema import load_schema
from features.spec import FeatureSpec, hash60, hash_id, user_key
from features.transforms import cut_windows, deduplicate, spark_hash60, spark_hash_id, token_features

# Computed with the feature code before schema files (commit 2ec6173, features/spec.py: hash_id(column,
# value, spec.buckets[column]) with the default buckets): a change would re-map every trained row.
FEED_IDS = {
    ("item_id", "item-42"): 54_838,
    ("author_id", "author-7"): 4_362,
    ("content_type", "video"): 37,
    ("topic", "news"): 437,
    ("surface", "feed"): 26,
    ("item_id", "ü🙂"): 24_768,
}
FEED_USER_KEYS = {"u1": 911_187_269_344_732_372, "user-123": 984_397_443_861_860_697}
FEED_TRAINING_COLUMNS = [
    "user_key", "length", "ts", "item_id", "author_id", "content_type", "topic", "surface", "log_gap",
    "log_item_age", "tod_sin", "tod_cos", "dow_sin", "dow_cos", "click", "like", "comment", "share",
    "log_dwell", "prev_actions_known", "contribution", "long_dwell", "loss_mask"]
"""features.spec.TRAINING_COLUMNS at that commit."""


def test_hash_golden_values(spark):
    # md5("item_id\x1fitem-42") = 5a41cb5af3515bfb...: pinned, because a change of the hash would
    # silently re-map every trained embedding row.
    assert hash60("item_id", "item-42") == 0x5A41CB5AF3515BF
    assert hash_id("item_id", "item-42", 200_003) == 54_838
    assert user_key("u1") == 0xCA52FFE6926A4D4
    row = spark.createDataFrame([("item-42", "u1")], "item string, user string").select(
        spark_hash_id("item_id", F.col("item"), 200_003).alias("item_id"),
        spark_hash60("user_id", F.col("user")).alias("user_key")).first()
    assert (row["item_id"], row["user_key"]) == (54_838, 0xCA52FFE6926A4D4)


def test_feed_ids_and_columns_are_unchanged_by_the_schema_file(events_frame, new_event):
    spec = FeatureSpec()
    schema = spec.event_schema
    events = [new_event(event_id="a", user_id="u1", **{column: value for column, value in FEED_IDS if value != "ü🙂"}),
              new_event(event_id="b", user_id="user-123", item_id="ü🙂")]
    tokens = {row["event_id"]: row for row in token_features(deduplicate(events_frame(events), schema), spec).collect()}
    for (column, value), expected in FEED_IDS.items():
        row = tokens["b"] if value == "ü🙂" else tokens["a"]
        assert row[column] == expected == hash_id(column, value, spec.buckets[column]), column
    assert [tokens[event]["user_key"] for event in "ab"] == list(FEED_USER_KEYS.values())
    assert {user: user_key(user) for user in FEED_USER_KEYS} == FEED_USER_KEYS
    assert list(schema.training_columns) == FEED_TRAINING_COLUMNS
    windows = cut_windows(token_features(deduplicate(events_frame(events), schema), spec), spec, 0)
    assert windows.columns[:len(FEED_TRAINING_COLUMNS)] == FEED_TRAINING_COLUMNS


def test_a_shared_table_hashes_by_its_table(spark):
    """``origin_post_id`` reads ``post_id``'s table, so the same value is the same row of it."""
    watch = load_schema("watch")
    assert watch.column_tables["origin_post_id"] == "post_id"
    frame = spark.createDataFrame([("p-1",), ("p-2",)], "value string")
    buckets = watch.tables["post_id"]
    rows = frame.select(spark_hash_id(watch.column_tables["origin_post_id"], F.col("value"), buckets).alias("id")).collect()
    assert [row["id"] for row in rows] == [hash_id("post_id", value, buckets) for value in ("p-1", "p-2")]
    assert hash_id("post_id", "p-1", buckets) != hash_id("origin_post_id", "p-1", buckets)


def test_spark_hash_equals_python_hash_on_many_values_including_unicode(spark):
    generator = random.Random(7)
    alphabet = "abcXYZ019 _-/\x1f" + "éüßøñ" + "中文字" + "🙂🚀" + "\u0301"
    values = ["", " ", "item-42", "ü", "🙂", "a\x1fb", "x" * 256]
    values += ["".join(generator.choice(alphabet) for _ in range(generator.randint(1, 40)))
               for _ in range(300)]
    frame = spark.createDataFrame([(value,) for value in values], "value string")
    rows = frame.select(
        "value",
        spark_hash60("item_id", F.col("value")).alias("hash60"),
        spark_hash_id("item_id", F.col("value"), 200_003).alias("item_id"),
        spark_hash_id("surface", F.col("value"), 64).alias("surface"),
        spark_hash60("user_id", F.col("value")).alias("user_key"),
    ).collect()
    assert len(rows) == len(values)
    for row in rows:
        assert row["hash60"] == hash60("item_id", row["value"])
        assert row["item_id"] == hash_id("item_id", row["value"], 200_003)
        assert 1 <= row["surface"] < 64 and row["surface"] == hash_id("surface", row["value"], 64)
        assert row["user_key"] == user_key(row["value"])
