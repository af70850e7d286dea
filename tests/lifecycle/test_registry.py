"""The registry of published models without Spark or training: a verified copy is published under
its name, ``latest`` moves atomically, a corrupt served model falls back to the previous good one,
old models are pruned (never the served one), and the publish log records each decision once."""

from __future__ import annotations

import json
import os

import pytest
import torch

from common.config import load_config
from lifecycle.registry import (
    PUBLISH_LOG, TRAINED_FILE, append_log, current, publish, published, read_log, trained_record,
)
from trainer.config import TrainConfig
from trainer.export import LATEST, MODEL_FILE, ExportError, export_model, verify_export
from trainer.model import GenerativeRanker

T_REF = 1_714_521_600


@pytest.fixture
def export(tmp_path, tiny_spec, tiny_model_overrides):
    """One freshly initialised tiny model, exported."""
    config = load_config(TrainConfig, overrides=["features=/data/features", f"run={tmp_path / 'run'}",
                                                 *tiny_model_overrides])
    torch.manual_seed(0)
    return export_model(GenerativeRanker(config.model, tiny_spec, T_REF), config, tiny_spec, config.run, "a", 1)


def test_publish_serves_a_verified_copy_with_its_training_record(export, tmp_path):
    registry = tmp_path / "registry"
    target = publish(export, registry, "c000001", {"batch": 3, "max_event_ms": 42}, keep=3)
    assert target == registry / "c000001" and os.readlink(registry / LATEST) == "c000001"
    assert current(registry) == target.resolve()
    verify_export(target)
    record = trained_record(target)
    assert record["batch"] == 3 and record["max_event_ms"] == 42 and record["published_at"] > 0
    assert (target / MODEL_FILE).read_bytes() == (export / MODEL_FILE).read_bytes()
    assert sorted(path.name for path in registry.iterdir()) == ["c000001", LATEST], "staging left behind"


def test_publishing_again_under_the_same_name_is_a_no_op(export, tmp_path):
    registry = tmp_path / "registry"
    first = publish(export, registry, "c000001", {"batch": 1}, keep=3)
    published_at = trained_record(first)["published_at"]
    assert publish(export, registry, "c000001", {"batch": 1}, keep=3) == first
    assert trained_record(first)["published_at"] == published_at


def test_a_broken_leftover_of_the_same_name_is_replaced_whole(export, tmp_path):
    registry = tmp_path / "registry"
    (registry / "c000001").mkdir(parents=True)
    (registry / "c000001" / "half-copied.bin").write_bytes(b"\0")
    target = publish(export, registry, "c000001", {"batch": 1}, keep=3)
    verify_export(target)
    assert not (target / "half-copied.bin").exists()


def test_an_export_that_does_not_verify_is_never_published(export, tmp_path):
    (export / MODEL_FILE).write_bytes(b"corrupt")
    registry = tmp_path / "registry"
    with pytest.raises(ExportError, match="corrupt"):
        publish(export, registry, "c000001", {"batch": 1}, keep=3)
    assert published(registry) == [] and current(registry) is None


def test_a_corrupt_served_model_falls_back_to_the_previous_good_one(export, tmp_path):
    registry = tmp_path / "registry"
    publish(export, registry, "c000001", {"batch": 1}, keep=3)
    newest = publish(export, registry, "c000002", {"batch": 2}, keep=3)
    (newest / MODEL_FILE).write_bytes(b"corrupt")
    assert current(registry) == (registry / "c000001").resolve()
    assert os.readlink(registry / LATEST) == "c000001", "latest was not pointed back at the good model"


def test_only_the_newest_models_are_kept_and_never_the_served_one_is_pruned(export, tmp_path):
    registry = tmp_path / "registry"
    for number in range(1, 5):
        publish(export, registry, f"c{number:06d}", {"batch": number}, keep=2)
    assert [path.name for path in published(registry)] == ["c000003", "c000004"]
    (registry / "c000004" / MODEL_FILE).write_bytes(b"corrupt")
    assert current(registry).name == "c000003"
    publish(export, registry, "c000005", {"batch": 5}, keep=1)
    assert [path.name for path in published(registry)] == ["c000005"]


def test_the_publish_log_records_each_cycle_once_and_survives_a_torn_line(tmp_path):
    registry = tmp_path / "registry"
    assert append_log(registry, {"cycle": "c000001", "published": True, "metric": float("nan")})
    assert not append_log(registry, {"cycle": "c000001", "published": False}), "a re-run appended twice"
    with (registry / PUBLISH_LOG).open("a") as stream:
        stream.write('{"cycle": "c000002", "publ')  # a crash mid-write
    assert append_log(registry, {"cycle": "c000003", "published": False})
    assert [record["cycle"] for record in read_log(registry)] == ["c000001", "c000003"]
    assert read_log(registry)[0]["metric"] is None
    assert json.loads((registry / PUBLISH_LOG).read_text().splitlines()[0])["published"] is True
    assert not (registry / TRAINED_FILE).exists()
