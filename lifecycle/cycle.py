"""``sirenfeed retrain --config conf/retrain.yaml [--every 1h] [key=value ...]``: one incremental
retraining cycle (or one per period), safe to run unattended.

A cycle is a journaled state machine; each step is idempotent and recorded in
``RETRAIN_DIR/cycles/<id>/state.json`` only after it completed (with its duration, under
``seconds``), so a crash anywhere is finished by the next invocation (an unfinished cycle is
resumed before a new one starts):

1. ``drain``: (optional) consume the Kafka topic into the landing zone until idle (``ingest``'s own
   exactly-once publish makes a re-run harmless);
2. ``features``: the incremental feature job appends the unread raw files as a new batch;
3. ``train``: warm start from the newest *accepted* lineage checkpoint (the initial run's, or a
   published candidate's; a refused one never) whose checksums verify (a corrupt one falls back to
   the previous) on the batches after its data watermark, through the ``deepspeed`` launcher into
   ``cycles/<id>/run``; a completed run is kept, a partial one is redone. Nothing new unless a batch
   is newer than every batch a cycle has already trained through;
4. ``gate``: candidate and published model evaluated on the same freshest held-out slice
   (:mod:`lifecycle.gate`: publish, refuse, or insufficient evidence);
5. ``publish``: if the gate passes, ``registry/latest`` moves atomically (previous ``keep_published``
   kept); the decision, both metric sets and the event→published latency go to the publish log;
6. ``advance``: the candidate's checkpoint (with its checksums) joins the lineage, marked accepted
   if it was published. A refused or unproven candidate is never trained on: the next cycle starts
   again from the last accepted checkpoint and trains on every batch since, the refused cycle's too.

An exclusive lock (``RETRAIN_DIR/lock``, released by the OS if the process dies) stops a second
invocation from running a cycle on top of this one; the feature dataset's own lock stops the
features step while another incremental feature job appends (exit 5, resumed next time), and the
launcher and spark-submit die with this process (:mod:`common.concurrency`). Exit codes:
0 published, 3 refused by the gate (worse, or broken), 6 insufficient evidence (not published,
not refused), 4 nothing new, 5 another cycle or feature job holds a lock, 1 failed, 2 bad
configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from common.concurrency import EXIT_LOCKED, Locked, exclusive_lock
from common.config import add_config_arguments, config_from_args, load_config, require
from common.logs import configure_logging
from features.dataset import atomic_write_text
from features.settings import FeaturesConfig
from lifecycle.gate import GateConfig

log = logging.getLogger(__name__)

PUBLISHED, FAILED, NOT_PUBLISHED, NOTHING_NEW, LOCKED, INSUFFICIENT_EVIDENCE = 0, 1, 3, 4, 5, 6
OUTCOMES = {"published": PUBLISHED, "not_published": NOT_PUBLISHED, "nothing_new": NOTHING_NEW,
            "insufficient_evidence": INSUFFICIENT_EVIDENCE}
GATE_OUTCOMES = {"publish": "published", "refuse": "not_published", "insufficient_evidence": "insufficient_evidence"}
"""The cycle's outcome for each of the gate's (:mod:`lifecycle.gate`)."""
STEPS = ("drain", "features", "train", "gate", "publish", "advance")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONTINUAL_TRAIN_OVERRIDES = ("schedule.kind=constant", "optim.lr=0.0001", "train.checkpoint_every=0")
"""On top of ``train_config`` for every warm-start segment by default: a constant learning rate well
below a batch run's peak (``optim.lr`` 1e-3 in conf/train.yaml), which would undo what it learned."""


@dataclass
class DrainConfig:
    enabled: bool = False
    config: str = ""
    """The ingest YAML (``conf/ingest.yaml``); its ``landing.dir`` must be ``features.raw``."""
    overrides: list[str] = field(default_factory=list)
    idle_s: float = 5.0
    """Stop draining once no message arrived for this long."""

    def __post_init__(self) -> None:
        require(self.idle_s > 0, "drain.idle_s", "must be > 0")


@dataclass
class ContinuousConfig:
    """``sirenfeed train --continuous``: when a cycle starts (see :func:`run_continuous`)."""
    poll_s: float = 30.0
    """How often to look for raw files the feature dataset has not read yet."""
    every_s: float = 300.0
    """M: start a cycle once new raw files have waited this long (0: as soon as they land)."""
    every_events: int = 0
    """N: start one at once when this many new events wait, however recent (0: by time only).
    A segment trains on about ``every_events × context_len / stride / data.batch_size`` steps."""

    def __post_init__(self) -> None:
        require(self.poll_s > 0, "continuous.poll_s", "must be > 0")
        require(self.every_s >= 0, "continuous.every_s", "must be >= 0")
        require(self.every_events >= 0, "continuous.every_events", "must be >= 0")


@dataclass
class RetrainConfig:
    dir: str = MISSING
    """Retraining state: lock, cycles/ journals and candidate runs, lineage.json, registry/."""
    initial_run: str = MISSING
    """Run directory of the batch training the lineage starts from (its newest checkpoint)."""
    features: FeaturesConfig = MISSING
    """The feature job (``raw``: the landing zone or raw log; ``out``: the dataset the initial run
    was trained on); ``incremental.enabled`` is forced on."""
    spark_submit: bool = True
    """Run the feature job through ``spark-submit`` (false: in this process)."""
    train_config: str = "conf/train.yaml"
    train_overrides: list[str] = field(default_factory=lambda: list(CONTINUAL_TRAIN_OVERRIDES))
    nproc: int = 2
    gate: GateConfig = field(default_factory=GateConfig)
    keep_published: int = 3
    drain: DrainConfig = field(default_factory=DrainConfig)
    telemetry_port: int = 0
    """With ``--every`` or ``--continuous``: serve the freshness gauges on this port (0 = off)."""
    telemetry_host: str = "127.0.0.1"
    """Address the gauges are served on (``0.0.0.0`` for a Prometheus on another machine)."""
    metrics_textfile: str = ""
    """After every cycle the freshness gauges are written here in the Prometheus text format (for
    node_exporter's textfile collector); "" = ``DIR/sirenfeed_retrain.prom``."""
    continuous: ContinuousConfig = field(default_factory=ContinuousConfig)

    def __post_init__(self) -> None:
        require(bool(self.dir.strip()), "dir", "must not be empty")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(self.keep_published >= 1, "keep_published", "must be >= 1")
        require(0 <= self.telemetry_port <= 65535, "telemetry_port", "must be in [0, 65535]")
        self.features.incremental.enabled = True


def _write_json(path: Path, record: Any) -> None:
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")


def checkpoint_digests(run_dir: Path, tag: str) -> dict[str, str]:
    """sha256 of every file of one checkpoint (the lineage's record of a good checkpoint)."""
    from trainer.checkpoint import checkpoint_root
    from trainer.export import sha256

    root = checkpoint_root(run_dir) / tag
    return {str(path.relative_to(root)): sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


class Retrainer:
    """The cycles of one retraining directory."""

    def __init__(self, config: RetrainConfig):
        self.config = config
        self.root = Path(config.dir)
        self.registry = self.root / "registry"
        self.lineage_file = self.root / "lineage.json"

    # --- journal ---------------------------------------------------------------------------

    def _cycles(self) -> list[Path]:
        folder = self.root / "cycles"
        # A folder without a journal is a cycle that crashed while being opened: it is reopened.
        return sorted(path.parent for path in folder.glob("c[0-9]*/state.json")) if folder.is_dir() else []

    def unfinished(self) -> bool:
        """Whether a crash left a cycle to complete."""
        cycles = self._cycles()
        return bool(cycles) and json.loads((cycles[-1] / "state.json").read_text()).get("outcome") is None

    def open_cycle(self) -> tuple[Path, dict[str, Any]]:
        """The unfinished cycle a crash left, or a new one."""
        cycles = self._cycles()
        if cycles:
            journal = json.loads((cycles[-1] / "state.json").read_text())
            if journal.get("outcome") is None:
                log.info("resuming cycle %s after step %s", journal["cycle"], (journal["done"] or ["start"])[-1])
                return cycles[-1], journal
        number = int(cycles[-1].name[1:]) + 1 if cycles else 1
        folder = self.root / "cycles" / f"c{number:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        journal = {"cycle": folder.name, "started_at": time.time(), "done": [], "outcome": None}
        _write_json(folder / "state.json", journal)
        return folder, journal

    def mark_done(self, folder: Path, journal: dict[str, Any], step: str, **facts: Any) -> None:
        journal.update(facts)
        journal["done"].append(step)
        _write_json(folder / "state.json", journal)

    def finish(self, folder: Path, journal: dict[str, Any], outcome: str) -> int:
        journal.update(outcome=outcome, finished_at=time.time())
        _write_json(folder / "state.json", journal)
        log.info("cycle %s: %s", journal["cycle"], outcome)
        return OUTCOMES[outcome]

    # --- lineage ---------------------------------------------------------------------------

    def lineage(self) -> list[dict[str, Any]]:
        if self.lineage_file.is_file():
            return json.loads(self.lineage_file.read_text())
        return [self._lineage_entry(Path(self.config.initial_run), cycle=None)]

    def _lineage_entry(self, run: Path, cycle: str | None) -> dict[str, Any]:
        from trainer.checkpoint import complete_tags
        from trainer.warm_start import checkpoint_data_watermark

        tags = complete_tags(run)
        if not tags:
            raise RuntimeError(f"{run} holds no complete checkpoint to continue from")
        watermark = checkpoint_data_watermark(run)
        return {"run": str(run.resolve()), "tag": tags[-1], "cycle": cycle, "batch": int(watermark["batch"]),
                "watermark_ms": watermark["watermark_ms"], "sha256": checkpoint_digests(run, tags[-1])}

    def accepted(self, entry: dict[str, Any]) -> bool:
        """Whether a lineage checkpoint may be trained on: the initial run's, or a published
        candidate's (an entry written before entries recorded it: whether the publish log shows
        its cycle published)."""
        if "accepted" in entry:
            return bool(entry["accepted"])
        from lifecycle.registry import read_log

        return entry["cycle"] is None or any(record.get("cycle") == entry["cycle"] and record.get("published")
                                             for record in read_log(self.registry))

    def warm_start_source(self) -> dict[str, Any]:
        """The newest accepted lineage checkpoint whose files still match their checksums."""
        for entry in reversed(self.lineage()):
            if not self.accepted(entry):
                continue
            try:
                if checkpoint_digests(Path(entry["run"]), entry["tag"]) == entry["sha256"]:
                    return entry
            except OSError:
                pass
            log.warning("checkpoint %s/%s is corrupt or incomplete (checksums differ): falling back "
                        "to the previous one", entry["run"], entry["tag"])
        raise RuntimeError("no accepted lineage checkpoint passes its checksums: nothing to continue from")

    # --- steps -----------------------------------------------------------------------------

    def step_drain(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        if not self.config.drain.enabled:
            return {"drained": None}
        from ingest.config import IngestConfig
        from ingest.consumer import Ingestor

        drain = self.config.drain
        ingest = load_config(IngestConfig, drain.config or None,
                             [*drain.overrides, f"consumer.until_idle_s={drain.idle_s}"])
        summary = Ingestor(ingest).run()
        return {"drained": summary.as_dict()}

    def step_features(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        config = self.config.features
        if self.config.spark_submit:
            from features.submit import run_job

            code = run_job(config)
            if code == EXIT_LOCKED:
                raise Locked(f"another incremental feature job is running on {config.out} (its lock is "
                             "held); the cycle resumes at its features step next time")
            if code != 0:
                raise RuntimeError(f"the incremental feature job failed (exit code {code})")
        else:
            from features.incremental import run_incremental
            from features.spark import build_session

            run_incremental(build_session(config.spark), config)
        from trainer.warm_start import batches

        return {"newest_batch": batches(config.out)[-1]["index"]}

    def step_train(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        from trainer.launch import run_deepspeed
        from trainer.warm_start import (
            CONTINUAL_SCRIPT, NothingNew, batches, build_view, checkpoint_data_watermark,
        )

        source = self.warm_start_source()
        view_dir, run = folder / "view", folder / "run"
        decided = self.lineage()[-1]
        try:
            if batches(self.config.features.out)[-1]["index"] <= decided["batch"]:
                raise NothingNew(f"no batch after {decided['batch']}, which cycle {decided['cycle']} trained "
                                 "through already")
            view = build_view(self.config.features.out, source["batch"], view_dir)
        except NothingNew as error:
            log.info("%s", error)
            return {"nothing_new": True}
        facts = {"source": source["run"], "source_cycle": source["cycle"], "since_batch": source["batch"],
                 "batch": view["data_watermark"]["batch"], "watermark_ms": view["watermark_ms"],
                 "max_event_ms": view["max_event_ms"], "run": str(run.resolve())}
        if self._trained(run, facts["batch"]):
            log.info("%s is already trained through batch %d", run, facts["batch"])
            return facts
        shutil.rmtree(run, ignore_errors=True)  # a partial run of a crashed attempt
        train_config = Path(self.config.train_config)
        if not train_config.is_absolute() and not train_config.exists():
            train_config = REPO_ROOT / train_config
        code = run_deepspeed(CONTINUAL_SCRIPT, self.config.nproc, str(train_config), [
            *self.config.train_overrides, f"features={view_dir.resolve()}", f"run={run.resolve()}",
            "--resume-from", source["run"]])
        if code != 0 or not self._trained(run, facts["batch"]):
            raise RuntimeError(f"warm-start training failed (launcher exit code {code})")
        checkpoint_data_watermark(run)
        return facts

    @staticmethod
    def _trained(run: Path, batch: int) -> bool:
        from trainer.export import ExportError, verify_export
        from trainer.warm_start import checkpoint_data_watermark

        try:
            verify_export(run / "export" / "latest")
            return int(checkpoint_data_watermark(run)["batch"]) == batch
        except (ExportError, OSError, RuntimeError):
            return False

    def step_gate(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        from lifecycle.gate import gate
        from lifecycle.registry import current

        served = current(self.registry)
        decision = gate(Path(journal["run"]) / "export" / "latest", served, folder / "view", self.config.gate)
        return {"decision": decision.as_dict(), "compared_with": str(served) if served else None}

    def step_publish(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        from lifecycle.registry import append_log, publish

        decision = journal["decision"]
        published_at = time.time()
        trained = {key: journal[key] for key in ("batch", "watermark_ms", "max_event_ms", "since_batch")}
        trained["cycle"] = journal["cycle"]
        if decision["publish"]:
            publish(Path(journal["run"]) / "export" / "latest", self.registry, journal["cycle"], trained,
                    self.config.keep_published)
        append_log(self.registry, {
            "cycle": journal["cycle"], "published": decision["publish"], "outcome": decision["outcome"],
            "reason": decision["reason"], "tasks": decision["tasks"], "published_error": decision["published_error"],
            "candidate": decision["candidate"], "current": decision["current"],
            "compared_with": journal.get("compared_with"), "trained": trained,
            "decided_at": published_at,
            "event_to_published_s": (published_at - journal["max_event_ms"] / 1000
                                     if decision["publish"] and journal.get("max_event_ms") else None)})
        return {"published": decision["publish"]}

    def step_advance(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        lineage = self.lineage()
        if lineage[-1].get("cycle") != journal["cycle"]:
            entry = self._lineage_entry(Path(journal["run"]), journal["cycle"])
            lineage.append({**entry, "accepted": bool(journal["published"])})
            _write_json(self.lineage_file, lineage)
        return {}

    # --- the cycle -------------------------------------------------------------------------

    def run_cycle(self) -> int:
        with exclusive_lock(self.root / "lock", "retraining cycle"):
            folder, journal = self.open_cycle()
            for step in STEPS:
                if step in journal["done"]:
                    continue
                started = time.monotonic()
                facts = getattr(self, f"step_{step}")(folder, journal)
                seconds = {**journal.get("seconds", {}), step: round(time.monotonic() - started, 3)}
                self.mark_done(folder, journal, step, **facts, seconds=seconds)
                if journal.get("nothing_new"):
                    return self.finish(folder, journal, "nothing_new")
            return self.finish(folder, journal, GATE_OUTCOMES[journal["decision"]["outcome"]])


def parse_period(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``1d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a period like 90s, 15m, 1h or 1d, got {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def run_once(config: RetrainConfig) -> int:
    try:
        return Retrainer(config).run_cycle()
    except Locked as error:
        log.error("%s", error)
        return LOCKED
    except Exception:  # the journal keeps the completed steps; the next invocation resumes
        log.exception("the retraining cycle failed; the next invocation resumes it")
        return FAILED


class CycleTelemetry:
    """The freshness gauges of a retraining directory: served on ``telemetry_port`` by the
    long-running modes, and written to ``metrics_textfile`` after every cycle."""

    def __init__(self, config: RetrainConfig, serve: bool):
        from lifecycle.registry import FreshnessTelemetry
        from trainer.telemetry import start_metrics_server

        self.gauges = FreshnessTelemetry(Path(config.dir) / "registry")
        self.textfile = Path(config.metrics_textfile or Path(config.dir) / "sirenfeed_retrain.prom")
        self.server = (start_metrics_server(config.telemetry_port, config.telemetry_host,
                                            registry=self.gauges.registry) if serve else None)

    def on_cycle(self, code: int) -> None:
        if code == LOCKED:  # the cycle holding the lock reports itself when it ends
            return
        self.gauges.on_cycle(code)
        try:
            self.gauges.write_textfile(self.textfile)
        except OSError as error:  # monitoring must not fail the cycle it reports on
            log.warning("could not write the metrics text file %s: %s", self.textfile, error)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def run_periodically(config: RetrainConfig, period_s: float, stop: threading.Event) -> int:
    """``--every PERIOD``: a cycle every period until ``stop`` is set (SIGTERM/SIGINT)."""
    telemetry = CycleTelemetry(config, serve=True)
    try:
        while not stop.is_set():
            started = time.monotonic()
            code = run_once(config)
            telemetry.on_cycle(code)
            log.info("cycle ended: %s; next in %.0f s", describe_outcome(code), period_s)
            stop.wait(max(0.0, period_s - (time.monotonic() - started)))
    finally:
        telemetry.close()
    return 0


def run_continuous(config: RetrainConfig, stop: threading.Event) -> int:
    """``sirenfeed train --continuous``: train on new data as it lands, until ``stop`` is set.

    Every ``continuous.poll_s`` (after draining Kafka, if ``drain.enabled``) it lists the raw files
    the feature dataset has not read (:func:`features.incremental.pending_raw_files`, no Spark).
    A cycle (features → warm start → gate → publish, the same as ``sirenfeed retrain``) starts
    once they have waited ``continuous.every_s`` or hold ``continuous.every_events`` events; an
    unfinished cycle left by a crash is completed first. Where the files cannot be listed cheaply
    (a remote filesystem) a cycle starts every ``every_s`` and the feature job decides."""
    from features.incremental import pending_raw_files

    retrainer = Retrainer(config)
    cycles = Retrainer(dataclasses.replace(config, drain=DrainConfig()))  # drained by the loop
    telemetry = CycleTelemetry(config, serve=True)
    waiting_since: float | None = None
    try:
        while not stop.is_set():
            try:
                if config.drain.enabled:
                    retrainer.step_drain(Path(config.dir), {})
                pending = pending_raw_files(config.features)
            except Exception:  # e.g. Kafka unreachable: the trainer keeps serving and tries again
                log.exception("polling for new data failed; trying again in %.0f s", config.continuous.poll_s)
                stop.wait(config.continuous.poll_s)
                continue
            now = time.monotonic()
            if pending is None or pending:
                waiting_since = now if waiting_since is None else waiting_since
            events = sum(pending.values()) if pending else 0
            due = waiting_since is not None and (
                now - waiting_since >= config.continuous.every_s
                or 0 < config.continuous.every_events <= events)
            if due or cycles.unfinished():
                if pending:
                    log.info("%d new raw files (%d events) waited %.0f s: starting a cycle",
                             len(pending), events, now - waiting_since)
                code = run_once(cycles.config)
                telemetry.on_cycle(code)
                log.info("cycle ended: %s", describe_outcome(code))
                if code in (PUBLISHED, NOT_PUBLISHED, INSUFFICIENT_EVIDENCE):
                    waiting_since = None
                    continue  # look again at once: more may have landed during the cycle
                if code == NOTHING_NEW:
                    waiting_since = None
            stop.wait(config.continuous.poll_s)
    finally:
        telemetry.close()
    return 0


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the loop ends after the cycle in progress (the launcher
    forwards the signal to the ranks; an interrupted cycle is resumed by the next run)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.set())
    return stop


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=parse_period, metavar="PERIOD",
                        help="run a cycle every PERIOD (e.g. 1h) instead of once")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(RetrainConfig, args)
    if args.every is not None:
        return run_periodically(config, args.every, stop_on_signals())
    telemetry = CycleTelemetry(config, serve=False)
    code = run_once(config)
    telemetry.on_cycle(code)
    print(f"sirenfeed retrain: {describe_outcome(code)} (exit code {code})")
    return code


def continuous_main(argv: list[str]) -> int:
    """``sirenfeed train --continuous --config conf/retrain.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="sirenfeed train --continuous",
        description="Keep training on new data as it lands: poll the landing zone, and when new "
                    "events have waited continuous.every_s (or number continuous.every_events) run "
                    "a retraining cycle (features, warm start, gate, publish). Takes the retrain "
                    "config (conf/retrain.yaml); SIGTERM stops it after the cycle in progress.")
    parser.add_argument("--continuous", action="store_true", required=True, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return run_continuous(config_from_args(RetrainConfig, args), stop_on_signals())


def describe_outcome(code: int) -> str:
    return {PUBLISHED: "published", NOT_PUBLISHED: "not published (gate refused the candidate)",
            INSUFFICIENT_EVIDENCE: "not published (insufficient evidence)", NOTHING_NEW: "nothing new",
            LOCKED: "another cycle is running", FAILED: "failed"}.get(code, "failed")


if __name__ == "__main__":
    configure_logging()
    sys.exit(main(sys.argv[1:]))
