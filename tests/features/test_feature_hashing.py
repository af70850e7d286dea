"""Categorical ids: Spark's hash expression equals features.spec.hash_id, value for value, forever."""

from __future__ import annotations

import random

from pyspark.sql import functions as F

from features.spec import hash60, hash_id, user_key
from features.transforms import spark_hash60, spark_hash_id


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
