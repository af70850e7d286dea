"""Incremental retraining end to end on tiny data: a batch run, then a cycle through the real
``deepspeed`` launcher that crashes after every step in turn and is completed by the next
invocation (training exactly once), then "nothing new", the lock, the gate refusing a worse
candidate, the fallbacks from a corrupt checkpoint and a corrupt published export, and a refused
candidate that the next cycle does not train on; the registry's gauges without Spark."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from retrain_support import RAW_ARROW_SCHEMA, TINY, date_of, day_events, start_lineage, write_day

from common.config import load_config
from common.repo import REPO_ROOT
from features.dataset import read_manifest, write_manifest
from features.incremental import pending_raw_files
from lifecycle import cycle as retrain
from lifecycle import poller
from lifecycle import retrain as retrain_command
from lifecycle.config import ContinuousConfig, RetrainConfig
from lifecycle.cycle import (
    LOCKED, NOT_PUBLISHED, NOTHING_NEW, PUBLISHED, STEPS, Retrainer, exclusive_lock,
)
from lifecycle.gate import GateConfig, gate
from lifecycle.registry import append_log, current, publish, read_log
from lifecycle.telemetry import FreshnessTelemetry
from trainer.export import EXPORT_FILES, MODEL_FILE, sha256, verify_export
from trainer.train import HISTORY_FILE


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return start_lineage(tmp_path_factory.mktemp("retrain"), "spark_submit=false", "train_overrides=[" + ",".join(
        TINY + ["schedule.kind=constant", "train.steps=6"]) + "]")


@pytest.fixture(scope="module")
def completed_cycle(setup):
    """One cycle that crashes after each step in turn; the last invocation completes it."""
    launches = []
    real_launcher = retrain.run_with_config

    def counting_launcher(*args, **kwargs):
        launches.append(args)
        return real_launcher(*args, **kwargs)

    codes = []
    patch = pytest.MonkeyPatch()
    patch.setattr(retrain, "run_with_config", counting_launcher)
    real_mark_done = Retrainer.mark_done
    try:
        for crash_after in STEPS:
            def crashing(self, folder, journal, step, _crash=crash_after, **facts):
                real_mark_done(self, folder, journal, step, **facts)
                if step == _crash:
                    raise RuntimeError(f"simulated crash after {step}")
            patch.setattr(Retrainer, "mark_done", crashing)
            codes.append(retrain.run_once(setup["config"]))
        patch.setattr(Retrainer, "mark_done", real_mark_done)
        codes.append(retrain.run_once(setup["config"]))
    finally:
        patch.undo()
    return {**setup, "codes": codes, "launches": launches}


@pytest.mark.slow
def test_a_cycle_crashing_after_every_step_completes_once_and_publishes(completed_cycle):
    root = Path(completed_cycle["config"].dir)
    assert completed_cycle["codes"] == [retrain.FAILED] * len(STEPS) + [PUBLISHED]
    assert len(completed_cycle["launches"]) == 1, "a completed training must not be redone"
    journal = json.loads((root / "cycles" / "c000001" / "state.json").read_text())
    assert journal["outcome"] == "published" and journal["done"] == list(STEPS)
    assert (journal["since_batch"], journal["batch"]) == (0, 1)
    assert not (root / "cycles" / "c000002").exists(), "the crashed cycle is resumed, not restarted"
    log = read_log(root / "registry")
    assert [(record["cycle"], record["published"]) for record in log] == [("c000001", True)]
    assert log[0]["event_to_published_s"] > 0 and log[0]["candidate"]["contribution"]["ne"] > 0
    served = current(root / "registry")
    verify_export(served)
    trained = json.loads((served / "_TRAINED.json").read_text())
    assert trained["max_event_ms"] == max(event["event_ts"] for event in day_events(1))
    lineage = json.loads((root / "lineage.json").read_text())
    assert [entry["batch"] for entry in lineage] == [0, 1]
    assert read_manifest(completed_cycle["features"])["newest_batch"] == 1


@pytest.mark.slow
def test_nothing_new_and_the_lock(completed_cycle, capsys):
    """Exit codes 4 and 5; the gauges file reports the cycle that ran, not the refused invocation."""
    config = completed_cycle["config"]
    command = ["--config", str(REPO_ROOT / "conf" / "retrain.yaml"), *completed_cycle["overrides"]]
    assert retrain_command.main(command) == NOTHING_NEW
    textfile = Path(config.dir) / "sirenfeed_retrain.prom"
    reported = textfile.read_text()
    with exclusive_lock(Path(config.dir) / "lock"):
        code = retrain_command.main(command)
    assert code == LOCKED
    assert "another cycle is running" in capsys.readouterr().out
    assert textfile.read_text() == reported
    gauges = prometheus_values(textfile)
    assert gauges["sirenfeed_retrain_last_exit_code"] == NOTHING_NEW
    assert gauges["sirenfeed_published_max_event_timestamp_seconds"] == max(
        event["event_ts"] for event in day_events(1)) / 1000
    assert gauges["sirenfeed_published_event_to_published_seconds"] > 0


def prometheus_values(path: Path) -> dict[str, float]:
    """``name → value`` of the unlabelled samples in a Prometheus text file."""
    return {name: float(value) for name, value in
            (line.split() for line in path.read_text().splitlines() if line and not line.startswith("#"))}


DAY_SLICE = GateConfig(min_events=20, min_positives=3)
"""Evidence minimums a test day (72 events of 12 users) meets."""


@pytest.mark.slow
def test_the_gate_refuses_a_worse_or_broken_candidate(completed_cycle, tmp_path):
    root = Path(completed_cycle["config"].dir)
    served = current(root / "registry")
    view = root / "cycles" / "c000001" / "view"
    for name, sabotage in (("worse", lambda t: t * 40.0), ("broken", lambda t: t * float("nan"))):
        candidate = tmp_path / name
        candidate.mkdir()
        for path in served.iterdir():
            (candidate / path.name).write_bytes(path.read_bytes())
        state = torch.load(candidate / MODEL_FILE, weights_only=True)
        torch.save({key: sabotage(value) if value.is_floating_point() else value
                    for key, value in state.items()}, candidate / MODEL_FILE)
        manifest = json.loads((candidate / "_MANIFEST.json").read_text())
        manifest["sha256"][MODEL_FILE] = sha256(candidate / MODEL_FILE)
        write_manifest(candidate, manifest)
        decision = gate(candidate, served, view, DAY_SLICE)
        assert decision.outcome == "refuse", decision.reason
        assert ("broken" if name == "broken" else "worse") in decision.reason
    assert gate(served, served, view, DAY_SLICE).publish, "an equal model is not worse"
    assert gate(served, served, view, GateConfig()).outcome == "insufficient_evidence", "72 events, 12 users"


@pytest.mark.slow
def test_corrupt_checkpoint_and_export_fall_back_to_the_previous_good_one(completed_cycle):
    config = completed_cycle["config"]
    retrainer = Retrainer(config)
    head = retrainer.lineage()[-1]
    assert retrainer.warm_start_source()["cycle"] == head["cycle"]
    registry = Path(config.dir) / "registry"
    good = current(registry)
    newer = publish(good, registry, "c999999", {"max_event_ms": 1}, keep=3)
    assert current(registry) == newer
    with (newer / MODEL_FILE).open("ab") as stream:
        stream.write(b"corruption")
    assert current(registry) == good and (registry / "latest").resolve() == good
    victim = next(path for path in sorted((Path(head["run"]) / "checkpoints" / head["tag"]).rglob("*.pt")))
    victim.write_bytes(victim.read_bytes()[:-16])
    assert retrainer.warm_start_source()["cycle"] is None, "falls back to the initial run's checkpoint"


@pytest.mark.slow
def test_continuous_mode_trains_when_enough_new_events_wait(setup, tmp_path):
    """``sirenfeed train --continuous``: nothing runs while too few new events wait (``every_s`` is
    far off); a cycle starts as soon as ``every_events`` are there, and publishes."""
    day = day_events(3)
    waiting = sum(pending_raw_files(setup["config"].features).values())  # day 2, unless a cycle took it
    config = dataclasses.replace(
        setup["config"], dir=str(tmp_path / "continuous"),
        train_overrides=[*setup["config"].train_overrides, "optim.lr=0.003"],  # the batch run's is 0.01
        continuous=ContinuousConfig(poll_s=0.2, every_s=3600, every_events=waiting + len(day)))
    landing = Path(config.features.raw) / f"date={date_of(3)}" / "hour=00"
    landing.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(day[:5], schema=RAW_ARROW_SCHEMA), landing / "part-0.parquet")
    stop = threading.Event()
    loop = threading.Thread(target=poller.run_continuous, args=(config, stop), daemon=True)
    loop.start()
    registry = tmp_path / "continuous" / "registry"
    try:
        time.sleep(2.0)  # ten polls
        assert not (tmp_path / "continuous" / "cycles").exists(), "a cycle started below both thresholds"
        # Written in place, not renamed into place: the poller may see it half-written.
        pq.write_table(pa.Table.from_pylist(day[5:], schema=RAW_ARROW_SCHEMA), landing / "part-1.parquet")
        deadline = time.monotonic() + 600
        while not read_log(registry) and loop.is_alive() and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        stop.set()
        loop.join(timeout=300)
    assert not loop.is_alive(), "the loop did not stop after the cycle"
    assert [record["published"] for record in read_log(registry)] == [True]
    journal = json.loads((tmp_path / "continuous" / "cycles" / "c000001" / "state.json").read_text())
    assert journal["since_batch"] == 0 and set(journal["seconds"]) == set(STEPS) == set(journal["ended_at"])
    # spark_submit=false: the features step runs on the loop's own session; the ranks stay up.
    assert journal["features_worker"] == "in-process" and journal["trainer_worker"] == "resident"
    history = [json.loads(line) for line in (Path(journal["run"]) / HISTORY_FILE).read_text().splitlines()]
    assert history and {record["lr"] for record in history} == {0.003}, "the segment ignored its optim.lr"
    assert prometheus_values(tmp_path / "continuous" / "sirenfeed_retrain.prom")[
        "sirenfeed_retrain_last_exit_code"] == PUBLISHED
    assert pending_raw_files(config.features) == {}


def test_continuous_mode_is_reached_through_sirenfeed_train(tmp_path, capsys):
    from sirenfeed.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--continuous", "--help"])
    assert exit_info.value.code == 0 and "continuous.every_s" in capsys.readouterr().out
    code = cli_main(["train", "--continuous", "--config", str(REPO_ROOT / "conf" / "retrain.yaml"),
                     f"dir={tmp_path / 'retrain'}", f"initial_run={tmp_path / 'run'}",
                     f"features.raw={tmp_path / 'landing'}", f"features.out={tmp_path / 'features'}",
                     "continuous.every_s=-1"])
    assert code == 2 and "continuous.every_s" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three cycles
def test_a_refused_candidate_is_never_the_base_of_a_later_cycle(setup, tmp_path):
    """Three cycles on a retraining directory of their own: a healthy one publishes; one whose
    learning rate diverges is refused; the next warm-starts from the published model (not from the
    refused candidate), trains on the refused cycle's batch as well, and publishes. The gate is
    lenient here (this is about the lineage): a diverged model is far beyond any tolerance."""
    lenient = GateConfig(default_tolerance=0.5, min_events=20, min_positives=3)
    healthy = dataclasses.replace(setup["config"], dir=str(tmp_path / "lineage"), gate=lenient)
    diverging = dataclasses.replace(healthy, train_overrides=[*healthy.train_overrides, "optim.lr=50"])
    root, gauges = tmp_path / "lineage", FreshnessTelemetry(tmp_path / "lineage" / "registry")
    codes, refusals = [], []
    for day, config in ((4, healthy), (5, diverging), (6, healthy)):
        write_day(Path(healthy.features.raw), day)
        codes.append(retrain.run_once(config))
        refusals.append(gauges.consecutive_refusals())
    journals = [json.loads((root / "cycles" / f"c{number:06d}" / "state.json").read_text()) for number in (1, 2, 3)]
    assert codes == [PUBLISHED, NOT_PUBLISHED, PUBLISHED], [journal["decision"]["reason"] for journal in journals]
    assert "worse" in journals[1]["decision"]["reason"]
    assert journals[2]["source"] == journals[0]["run"], "the healthy cycle trained on top of the refused candidate"
    assert journals[2]["since_batch"] == journals[0]["batch"] < journals[1]["batch"] < journals[2]["batch"]
    assert current(root / "registry").name == "c000003"
    lineage = json.loads((root / "lineage.json").read_text())
    assert [(entry["cycle"], entry.get("accepted")) for entry in lineage] == [
        (None, None), ("c000001", True), ("c000002", False), ("c000003", True)]
    assert refusals == [0, 1, 0]
    assert 0 <= time.time() - gauges.published_seconds() < 600


def fake_export(folder: Path) -> Path:
    """A well-formed export as far as the registry checks (complete, checksums match)."""
    folder.mkdir(parents=True)
    for name in EXPORT_FILES:
        (folder / name).write_text(f"{name} of {folder.name}\n")
    write_manifest(folder, {"sha256": {name: sha256(folder / name) for name in EXPORT_FILES}})
    return folder


def test_registry_gauges_count_refusals_since_the_last_publish(tmp_path):
    registry = tmp_path / "registry"
    gauges = FreshnessTelemetry(registry)
    assert gauges.consecutive_refusals() == 0 and np.isnan(gauges.published_seconds())
    before = time.time()
    publish(fake_export(tmp_path / "a"), registry, "c000001", {"max_event_ms": 1}, keep=3)
    decisions = [("c000001", True, "publish", None), ("c000002", False, "refuse", None),
                 ("c000003", False, "insufficient_evidence", None), ("c000004", False, "refuse", None)]
    for cycle, published, outcome, error in decisions:
        append_log(registry, {"cycle": cycle, "published": published, "outcome": outcome, "published_error": error})
    assert gauges.consecutive_refusals() == 2, "insufficient evidence neither counts nor resets"
    assert gauges.published_unevaluable() == 0
    assert before <= gauges.published_seconds() <= time.time()
    textfile = tmp_path / "gauges.prom"
    gauges.write_textfile(textfile)
    values = prometheus_values(textfile)
    assert values["sirenfeed_retrain_consecutive_refusals"] == 2
    assert values["sirenfeed_published_age_seconds"] >= 0
    publish(fake_export(tmp_path / "b"), registry, "c000005", {"max_event_ms": 2}, keep=3)
    append_log(registry, {"cycle": "c000005", "published": True, "outcome": "publish",
                          "published_error": "the served model has non-finite weights"})
    assert gauges.consecutive_refusals() == 0 and gauges.published_unevaluable() == 1


def test_a_batch_newer_than_the_last_decided_one_is_due_and_caught_up_needs_every_file_decided(tmp_path):
    """What the continuous loop reads on every poll, without Spark: a feature batch newer than the
    lineage's last (one the resident feature job prefetched) is untrained; the pipeline has caught
    up once no raw file is unread, no batch untrained and no cycle unfinished."""
    raw, features = tmp_path / "landing", tmp_path / "features"
    config = load_config(RetrainConfig, REPO_ROOT / "conf" / "retrain.yaml", [
        f"dir={tmp_path / 'retrain'}", f"initial_run={tmp_path / 'initial'}", f"features.raw={raw}",
        f"features.out={features}"])
    retrainer = Retrainer(config)
    assert not retrainer.untrained_batch() and not retrainer.caught_up(), "no dataset yet: cannot tell"
    consumed = features / "_state" / "b000002" / "consumed.json"
    consumed.parent.mkdir(parents=True)
    consumed.write_text("[]")
    write_manifest(features, {"newest_batch": 2, "state": "_state/b000002"})
    lineage = Path(config.dir) / "lineage.json"
    lineage.parent.mkdir(parents=True)
    lineage.write_text(json.dumps([{"cycle": None, "batch": 0}, {"cycle": "c000001", "batch": 1}]))
    assert retrainer.untrained_batch() and not retrainer.caught_up()
    lineage.write_text(json.dumps([{"cycle": None, "batch": 0}, {"cycle": "c000002", "batch": 2}]))
    assert not retrainer.untrained_batch() and retrainer.caught_up()
    write_day(raw, 4)
    assert not retrainer.caught_up(), "a landed file no batch has read"
