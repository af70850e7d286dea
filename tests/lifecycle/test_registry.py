"""The registry of published models without Spark or training: a verified copy is published under
its name, ``latest`` moves atomically, a corrupt served model falls back to the previous good one,
old models are pruned (never the served one), and the publish log records each decision once.
Delta publishing: a chain of deltas loads bit for bit as the full exports it stands for, is small
when few rows change, is bounded by ``full_every``, names a missing or corrupt ancestor, and
pruning keeps every ancestor a kept model needs."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from common.config import ConfigError, load_config
from features.settings import FeaturesConfig
from features.spec import FeatureSpec
from lifecycle.config import PublishConfig, RetrainConfig
from lifecycle.cycle import Retrainer
from lifecycle.registry import (
    PUBLISH_LOG, TRAINED_FILE, append_log, current, publish, published, read_log, trained_record,
)
from trainer.config import TrainConfig
from trainer.export import (
    DELTA_FILE, LATEST, MODEL_FILE, ExportError, ancestry, export_model, load_exported, load_state,
    verify_export,
)
from trainer.model import GenerativeRanker

T_REF = 1_714_521_600
ITEM_TABLE = "id_embeddings.item_id.weight"


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


# --- delta publishing ----------------------------------------------------------------------


class Training:
    """A tiny model whose every step changes all dense weights and a few table rows, as a cycle of
    continual training does, exported after each step as a run would."""

    def __init__(self, root: Path, spec: FeatureSpec, overrides: tuple[str, ...]):
        self.config = load_config(TrainConfig, overrides=["features=/data/features", f"run={root}", *overrides])
        self.spec = spec
        torch.manual_seed(0)
        self.model = GenerativeRanker(self.config.model, spec, T_REF)
        self.generator = torch.Generator().manual_seed(1)
        self.steps = 0

    def export(self) -> Path:
        return export_model(self.model, self.config, self.spec, self.config.run, f"s{self.steps}", self.steps)

    def step(self, rows: int) -> None:
        """Change ``rows`` distinct item rows (never the first 10) and one author row."""
        self.steps += 1
        with torch.no_grad():
            for name, parameter in self.model.named_parameters():
                if not name.startswith("id_embeddings."):
                    parameter.add_(0.01)
            items = self.model.id_embeddings["item_id"].weight
            items[10 + torch.randperm(len(items) - 10, generator=self.generator)[:rows]] += 0.5
            self.model.id_embeddings["author_id"].weight[1 + self.steps % 3] -= 0.25


@pytest.fixture
def training(tmp_path, tiny_spec, tiny_model_overrides) -> Callable[..., Training]:
    """Training runs: ``training(name, item_rows=..., *overrides)``, on the tiny spec with more items."""

    def start(name: str = "run", item_rows: int = 2003, *overrides: str) -> Training:
        spec = dataclasses.replace(tiny_spec, buckets={**tiny_spec.buckets, "item_id": item_rows})
        return Training(tmp_path / name, spec, (*tiny_model_overrides, *overrides))

    return start


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype and actual[key].shape == tensor.shape, key
        assert torch.equal(bits(actual[key]), bits(tensor)), key


def kinds(registry: Path) -> list[str]:
    return [trained_record(path)["publication"]["kind"] for path in published(registry)]


def test_a_chain_of_deltas_loads_bit_for_bit_as_the_full_exports(training, tmp_path):
    registry, run = tmp_path / "registry", training()
    exports = [run.export()]
    publish(exports[0], registry, "c000001", {"batch": 1}, keep=10, full_every=4)
    for number in range(2, 5):
        run.step(rows=20)
        with torch.no_grad():
            items = run.model.id_embeddings["item_id"].weight
            if number == 3:
                items[0] = -0.0  # equal to the parent's 0.0 as a number, not as bits
                items[5, 3] = float("nan")  # unchanged in c000004, though not equal to itself as a number
        exports.append(run.export())
        publish(exports[-1], registry, f"c{number:06d}", {"batch": number}, keep=10, full_every=4)
    assert kinds(registry) == ["full", "delta", "delta", "delta"]
    changed = [trained_record(path)["publication"].get("changed_rows") for path in published(registry)]
    assert [rows[ITEM_TABLE] for rows in changed[1:]] == [20, 22, 20], "rows compared as bits"
    for model, export in zip(published(registry), exports):
        assert_bit_identical(load_state(model), torch.load(export / MODEL_FILE, weights_only=True))
        assert_bit_identical(load_exported(model)[0].state_dict(), load_exported(export)[0].state_dict())
    newest = registry / "c000004"
    assert not (newest / MODEL_FILE).exists() and (newest / DELTA_FILE).is_file()
    assert verify_export(newest)["delta"]["parent"] == "c000003"
    assert current(registry) == newest.resolve()
    assert_bit_identical(load_exported(registry / LATEST)[0].state_dict(),
                         load_exported(exports[-1])[0].state_dict())
    with pytest.raises(ExportError, match="is a delta"):
        publish(newest, tmp_path / "elsewhere", "c000001", {"batch": 1}, keep=3)


def test_a_delta_is_small_when_few_rows_change(training, tmp_path):
    """1% of the rows of a table of 20,000 (most of the model's bytes) change, and every dense weight."""
    registry, run = tmp_path / "registry", training("run", 20011)
    first = publish(run.export(), registry, "c000001", {"batch": 1}, keep=3, full_every=4)
    run.step(rows=200)
    export = run.export()
    delta = publish(export, registry, "c000002", {"batch": 2}, keep=3, full_every=4)
    publication = trained_record(delta)["publication"]
    full_bytes = (export / MODEL_FILE).stat().st_size
    assert publication["kind"] == "delta" and publication["changed_rows"][ITEM_TABLE] == 200
    assert publication["bytes"] == (delta / DELTA_FILE).stat().st_size and publication["full_bytes"] == full_bytes
    assert publication["bytes"] <= 0.05 * full_bytes, publication
    assert trained_record(first)["publication"]["bytes"] == full_bytes


@pytest.mark.parametrize("full_every", [1, 3])
def test_full_every_bounds_the_chain(training, tmp_path, full_every):
    registry, run = tmp_path / "registry", training()
    for number in range(1, 8):
        run.step(rows=5)
        publish(run.export(), registry, f"c{number:06d}", {"batch": number}, keep=10, full_every=full_every)
    expected = ["full"] * 7 if full_every == 1 else ["full", "delta", "delta"] * 2 + ["full"]
    assert kinds(registry) == expected
    assert max(len(ancestry(path)) for path in published(registry)) == full_every
    assert [trained_record(path)["publication"]["chain_length"] for path in published(registry)] == [
        index % full_every for index in range(7)]


def test_a_changed_layout_is_published_whole(training, tmp_path):
    registry = tmp_path / "registry"
    publish(training("a", 2003).export(), registry, "c000001", {"batch": 1}, keep=10, full_every=4)
    publish(training("b", 2011).export(), registry, "c000002", {"batch": 2}, keep=10, full_every=4)
    publish(training("c", 2011, "model.rotary=ordinal").export(), registry, "c000003", {"batch": 3}, keep=10,
            full_every=4)
    assert kinds(registry) == ["full", "full", "full"]
    reasons = [trained_record(path)["publication"]["reason"] for path in published(registry)]
    assert "no served model" in reasons[0]
    assert ITEM_TABLE in reasons[1] and "(2011, 32)" in reasons[1] and "(2003, 32)" in reasons[1]
    assert "keys differ" in reasons[2]


@pytest.fixture
def chain(training, tmp_path) -> Path:
    """A registry of c000001 (full) and its deltas c000002 and c000003."""
    registry, run = tmp_path / "registry", training()
    for number in range(1, 4):
        run.step(rows=10)
        publish(run.export(), registry, f"c{number:06d}", {"batch": number}, keep=10, full_every=4)
    assert kinds(registry) == ["full", "delta", "delta"]
    return registry


def test_a_missing_or_corrupt_ancestor_is_named(chain, training):
    newest = chain / "c000003"
    delta = chain / "c000002" / DELTA_FILE
    saved = delta.read_bytes()
    delta.write_bytes(saved[:-1] + bytes([saved[-1] ^ 0xFF]))
    with pytest.raises(ExportError, match="ancestor .*c000002.* is not a valid export: .*corrupt"):
        load_exported(newest)
    delta.write_bytes(saved)
    load_exported(newest)

    base = chain / "c000001"
    shutil.move(base, chain / ".c000001.aside")
    with pytest.raises(ExportError, match="ancestor .*c000001 .*is missing"):
        verify_export(newest)
    # Another valid model under the base's name is not the one the deltas were made against.
    shutil.copytree(training("other").export(), base)
    with pytest.raises(ExportError, match="ancestor .*c000001 is not the model c000002 was published against"):
        load_exported(newest)


def test_the_served_model_falls_back_past_a_broken_chain(chain, training):
    (chain / "c000002" / DELTA_FILE).write_bytes(b"corrupt")
    assert current(chain) == (chain / "c000001").resolve(), "c000003 needs the corrupt c000002"
    assert os.readlink(chain / LATEST) == "c000001"
    run = training("next")
    run.step(rows=3)
    target = publish(run.export(), chain, "c000004", {"batch": 4}, keep=10, full_every=4)
    assert trained_record(target)["publication"]["parent"] == "c000001", "a delta is made on the served model"
    assert_bit_identical(load_exported(target)[0].state_dict(), load_exported(run.export())[0].state_dict())


def test_pruning_keeps_every_ancestor_a_kept_model_needs(training, tmp_path):
    registry, run = tmp_path / "registry", training()
    names = []
    for number in range(1, 7):
        run.step(rows=5)
        publish(run.export(), registry, f"c{number:06d}", {"batch": number}, keep=2, full_every=4)
        names.append([path.name for path in published(registry)])
    assert names[3] == ["c000001", "c000002", "c000003", "c000004"], "c000003 and c000004 need c000001-2"
    assert names[4] == ["c000001", "c000002", "c000003", "c000004", "c000005"], "c000004 needs c000001-3"
    assert names[5] == ["c000005", "c000006"], "the full c000005 needs nothing older"
    assert kinds(registry) == ["full", "delta"]
    for path in published(registry):
        load_exported(path)


def test_the_cycle_publishes_with_publish_full_every(training, tmp_path):
    with pytest.raises(ConfigError, match="publish.full_every"):
        PublishConfig(full_every=0)
    features = load_config(FeaturesConfig, None, [], {"raw": tmp_path / "raw", "out": tmp_path / "features"})
    config = RetrainConfig(dir=str(tmp_path / "retrain"), initial_run=str(tmp_path / "initial"), features=features,
                           publish=PublishConfig(full_every=2))
    retrainer = Retrainer(config)
    decision = {"publish": True, "outcome": "publish", "reason": "", "tasks": {}, "published_error": None,
                "candidate": None, "current": None}
    run = training()
    for number in range(1, 4):
        run.step(rows=5)
        journal = {"cycle": f"c{number:06d}", "run": str(run.export().parent.parent), "decision": decision,
                   "batch": number, "watermark_ms": 1, "max_event_ms": 1, "since_batch": 0}
        retrainer.step_publish(tmp_path, journal)
    assert kinds(retrainer.registry) == ["full", "delta", "full"]
    assert [record["publication"]["kind"] for record in read_log(retrainer.registry)] == ["full", "delta", "full"]
