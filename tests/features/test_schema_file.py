"""The schema file: both shipped schemas load, the feed schema keeps today's layout, and a bad schema
fails at load time naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from common.repo import REPO_ROOT
from features.schema import (
    SCHEMAS_DIR, EventSchema, SchemaError, load_schema, require_same_schema, schema_differences,
    shipped_schemas,
)
from features.spec import FeatureSpec

FEED_TRAINING_COLUMNS = (
    "user_key", "length", "ts", "item_id", "author_id", "content_type", "topic", "surface", "log_gap",
    "log_item_age", "tod_sin", "tod_cos", "dow_sin", "dow_cos", "click", "like", "comment", "share",
    "log_dwell", "prev_actions_known", "contribution", "long_dwell", "loss_mask")
"""The feed's training-row columns, in order, as the feature job wrote them before schema files."""


def feed_values() -> dict:
    return yaml.safe_load((SCHEMAS_DIR / "feed.yaml").read_text())


def test_shipped_schemas_load():
    assert {"feed", "watch"} <= set(shipped_schemas())
    for name in shipped_schemas():
        schema = load_schema(name)
        assert isinstance(schema, EventSchema) and schema.name == name
        assert schema.label_columns == tuple(schema.config.tasks)


def test_feed_schema_keeps_the_layout():
    schema = load_schema("feed")
    assert schema.training_columns == FEED_TRAINING_COLUMNS
    assert schema.tables == {"item_id": 200_003, "author_id": 20_011, "content_type": 64, "topic": 1_031,
                             "surface": 64}
    assert schema.canonical_field_names == schema.field_names
    assert FeatureSpec().event_schema.fingerprint == schema.fingerprint


def test_watch_schema_differs_in_every_dimension():
    feed, watch = load_schema("feed"), load_schema("watch")
    assert watch.time_unit_ms == 1000 and watch.utc_offset_field == "tz_offset_min"
    assert set(watch.label_columns).isdisjoint(feed.label_columns)
    assert set(watch.id_columns).isdisjoint(feed.id_columns)
    assert watch.column_tables["origin_post_id"] == "post_id" and "origin_post_id" not in watch.tables
    assert watch.needs_fit and not feed.needs_fit
    assert watch.canonical_names == {**{name: name for name in watch.field_names},
                                     "impression_id": "event_id", "viewer": "user_id", "ts": "event_ts"}
    assert watch.canonical({name: 1 for name in watch.field_names})["event_ts"] == 1000


def test_recorded_schema_rebuilds_the_same_spec():
    spec = FeatureSpec(schema="watch", buckets={"post_id": 101})
    rebuilt = FeatureSpec(**spec.record())
    assert rebuilt == spec and rebuilt.buckets["post_id"] == 101
    assert rebuilt.event_schema.fingerprint == spec.event_schema.fingerprint


def test_bucket_overrides_name_their_table():
    with pytest.raises(SchemaError, match=r"spec\.buckets\.origin_post_id"):
        FeatureSpec(schema="watch", buckets={"origin_post_id": 11})


def change(values: dict, path: str, value) -> dict:
    changed = copy.deepcopy(values)
    *parents, leaf = path.split(".")
    node = changed
    for parent in parents:
        node = node[parent]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return changed


DELETE = object()


@pytest.mark.parametrize("path, value, key", [
    ("fields.dwell_ms.type", "integer", "fields.dwell_ms.type"),
    ("event_id", "", "event_id"),
    ("event_id", "impression", "event_id"),
    ("fields.event_id", DELETE, "event_id"),
    ("user", "dwell_ms", "user"),
    ("time.field", "user_id", "time.field"),
    ("time.unit", "hours", "time.unit"),
    ("labels.like.field", "liked", "labels.like.field"),
    ("labels.contribution.any_of", ["like", "repost"], "labels.contribution.any_of.1"),
    ("labels.long_dwell.by", "country", "labels.long_dwell.by"),
    ("time_features.periods.tod", 0, "time_features.periods.tod"),
    ("time_features.periods.dow", -604800, "time_features.periods.dow"),
    ("time_features.item_age", "item", "time_features.item_age"),
    ("categoricals.topic.buckets", 1, "categoricals.topic.buckets"),
    ("categoricals.dwell_ms", {"buckets": 10}, "categoricals.dwell_ms"),
    ("categoricals.author_id", {"table": "surface_id"}, "categoricals.author_id.table"),
    ("tasks.ctr", 1.0, "tasks.ctr"),
    ("tasks", {}, "tasks"),
    ("actions.columns.log_dwell.transforms", [{"op": "sqrt"}], "actions.columns.log_dwell.transforms.0.op"),
    ("actions.columns.log_dwell.transforms", [{"op": "divide"}], "actions.columns.log_dwell.transforms.0.by"),
    ("actions.known_after.duration", "topic", "actions.known_after.duration"),
    ("actions.known_after.delay_ms", -1, "actions.known_after.delay_ms"),
    ("rotary.periods", ["hour"], "rotary.periods"),
    ("rotary.categoricals", ["item"], "rotary.categoricals"),
    ("numerics", {"dwell": {"field": "topic"}}, "numerics.dwell.field"),
    ("numerics", {"ts": {"field": "dwell_ms"}}, "numerics.ts"),
    ("fields.colour", {"type": "string", "min": 1}, "fields.colour.min"),
    ("surprise", 1, "surprise"),
    ("numerics", {"gap": {"field": "dwell_ms", "transforms": [{"op": "divide", "by": -1}, {"op": "log1p"}]}},
     "numerics.gap.transforms.1"),
    ("labels.like", {"field": "dwell_ms", "equals": "long"}, "labels.like.equals"),
    ("labels.like", {"field": "like", "equals": "yes"}, "labels.like.equals"),
])
def test_a_bad_schema_names_the_key(path, value, key):
    with pytest.raises(SchemaError, match=f"'{key}'"):
        load_schema(change(feed_values(), path, value))


def test_a_bad_schema_file_fails_before_any_work(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(change(feed_values(), "time_features.periods.tod", 0)))
    with pytest.raises(SchemaError, match=r"time_features\.periods\.tod"):
        FeatureSpec(schema=str(path))
    path.write_text("fields: [unclosed\n")
    with pytest.raises(SchemaError, match="mine.yaml"):
        FeatureSpec(schema=str(path))
    with pytest.raises(SchemaError, match="shipped: .*feed"):
        FeatureSpec(schema="no_such_schema")


def test_the_fingerprint_follows_the_order_of_the_columns():
    values = feed_values()
    swapped = dict(values, categoricals=dict(reversed(list(values["categoricals"].items()))))
    assert load_schema(swapped).id_columns == tuple(reversed(load_schema(values).id_columns))
    assert load_schema(swapped).fingerprint != load_schema(values).fingerprint


def test_differences_name_the_keys():
    feed = load_schema("feed")
    assert schema_differences(feed, feed.to_dict()) == []
    resized = change(feed.to_dict(), "categoricals.topic.buckets", 7)
    renamed = change(feed.to_dict(), "tasks", {"contribution": 1.0, "like": 2.0, "long_dwell": 1.0})
    assert schema_differences(feed, resized) == ["categoricals.topic.buckets: 1031 vs 7"]
    assert schema_differences(feed, renamed) == ["tasks.like: 1.0 vs 2.0"]
    with pytest.raises(SchemaError, match="tasks.like"):
        require_same_schema(feed, renamed, "the dataset")
    reordered = feed.to_dict()
    reordered["tasks"] = {"like": 1.0, "contribution": 1.0, "long_dwell": 1.0}
    assert schema_differences(feed, reordered) == ["tasks: order contribution, like, long_dwell vs like, "
                                                  "contribution, long_dwell"]
    watch = load_schema("watch")
    fitted = watch.fitted({"log_video_s": (1.5, 0.5)})
    assert schema_differences(watch, fitted) == []
    assert schema_differences(watch, fitted, ignore_fitted=False)


@pytest.mark.parametrize("command", [["features", "--raw", "RAW", "--out", "OUT"], ["synth", "--out", "OUT"]])
def test_a_command_given_a_bad_schema_stops_before_any_work(command, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(change(feed_values(), "labels.like.field", "liked")))
    arguments = [part.replace("RAW", str(tmp_path / "raw")).replace("OUT", str(tmp_path / "out")) for part in command]
    (tmp_path / "raw").mkdir()
    key = "spec.schema" if command[0] == "features" else "schema"
    result = subprocess.run([sys.executable, "-m", "sirenfeed.cli", *arguments, f"{key}={path}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "labels.like.field" in result.stderr and "liked" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
