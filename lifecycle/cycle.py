"""``sirenfeed retrain --config conf/retrain.yaml [--every 1h] [key=value ...]``: one incremental
retraining cycle (or one per period), safe to run unattended.

A cycle is a journaled state machine; each step is idempotent and recorded in
``RETRAIN_DIR/cycles/<id>/state.json`` only after it completed (with its duration, under
``seconds``, and its wall-clock end, under ``ended_at``), so a crash anywhere is finished by the
next invocation (an unfinished cycle is resumed before a new one starts):

1. ``drain``: (optional) consume the Kafka topic into the landing zone until idle (``ingest``'s own
   exactly-once publish makes a re-run harmless);
2. ``features``: the incremental feature job appends the unread raw files as a new batch (submitted
   for this cycle, or run by the continuous loop's long-lived Spark application,
   :mod:`lifecycle.resident`);
3. ``train``: warm start from the newest *accepted* lineage checkpoint (the initial run's, or a
   published candidate's; a refused one never) whose checksums verify (a corrupt one falls back to
   the previous) on the batches after its data watermark, through the ``deepspeed`` launcher (or
   the continuous loop's long-lived ranks) into ``cycles/<id>/run``; a completed run is kept, a
   partial one is redone. Nothing new unless a batch is newer than every batch a cycle has already
   trained through;
4. ``gate``: candidate and published model evaluated on the same freshest held-out slice
   (:mod:`lifecycle.gate`: publish, refuse, or insufficient evidence);
5. ``publish``: if the gate passes, the candidate is published, whole or as a delta on the served
   model (``publish.full_every``), and ``registry/latest`` moves atomically (previous
   ``keep_published`` kept, with the models their deltas need); the decision, both metric sets, how
   the model was stored and the event→published latency go to the publish log;
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

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from common.concurrency import EXIT_LOCKED, Locked, exclusive_lock
from common.config import load_config, to_yaml
from common.files import atomic_write_text, write_json
from common.repo import REPO_ROOT
from features.dataset import read_manifest
from features.incremental import pending_raw_files, run_incremental
from features.spark import build_session
from features.submit import run_job
from ingest.config import IngestConfig
from ingest.consumer import Ingestor
from lifecycle.config import RetrainConfig
from lifecycle.gate import gate
from lifecycle.registry import append_log, current, publish, read_log, trained_record
from lifecycle.resident import ResidentFeatures, ResidentTrainer
from lifecycle.view import NothingNew, batches, build_view
from trainer.checkpoint import checkpoint_root, complete_tags
from trainer.config import TrainConfig
from trainer.export import ExportError, sha256, verify_export
from trainer.launcher import LAUNCH_DIR, RESOLVED_CONFIG, run_with_config
from trainer.warm_start import WARM_START_SCRIPT, check_continual, checkpoint_data_watermark

log = logging.getLogger(__name__)

PUBLISHED, FAILED, NOT_PUBLISHED, NOTHING_NEW, LOCKED, INSUFFICIENT_EVIDENCE = 0, 1, 3, 4, 5, 6
OUTCOMES = {"published": PUBLISHED, "not_published": NOT_PUBLISHED, "nothing_new": NOTHING_NEW,
            "insufficient_evidence": INSUFFICIENT_EVIDENCE}
GATE_OUTCOMES = {"publish": "published", "refuse": "not_published", "insufficient_evidence": "insufficient_evidence"}
"""The cycle's outcome for each of the gate's (:mod:`lifecycle.gate`)."""
STEPS = ("drain", "features", "train", "gate", "publish", "advance")


def checkpoint_digests(run_dir: Path, tag: str) -> dict[str, str]:
    """sha256 of every file of one checkpoint (the lineage's record of a good checkpoint)."""
    root = checkpoint_root(run_dir) / tag
    return {str(path.relative_to(root)): sha256(path) for path in sorted(root.rglob("*")) if path.is_file()}


class Retrainer:
    """The cycles of one retraining directory.

    ``features_job`` and ``trainer``: long-lived workers the features and train steps hand their
    work to (:mod:`lifecycle.resident`, the continuous pipeline's) instead of submitting the feature
    job and launching the ranks themselves; ``lock_held``: the caller holds the directory's lock for
    as long as these cycles run (the continuous loop, whose workers must hold it too)."""

    def __init__(self, config: RetrainConfig, features_job: ResidentFeatures | None = None,
                 trainer: ResidentTrainer | None = None, lock_held: bool = False):
        self.config = config
        self.features_job, self.trainer, self.lock_held = features_job, trainer, lock_held
        self.root = Path(config.dir)
        self.registry = self.root / "registry"
        self.lineage_file = self.root / "lineage.json"
        self.lock_file = self.root / "lock"

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
        write_json(folder / "state.json", journal)
        return folder, journal

    def mark_done(self, folder: Path, journal: dict[str, Any], step: str, **facts: Any) -> None:
        journal.update(facts)
        journal["done"].append(step)
        write_json(folder / "state.json", journal)

    def finish(self, folder: Path, journal: dict[str, Any], outcome: str) -> int:
        journal.update(outcome=outcome, finished_at=time.time())
        write_json(folder / "state.json", journal)
        log.info("cycle %s: %s", journal["cycle"], outcome)
        return OUTCOMES[outcome]

    # --- lineage ---------------------------------------------------------------------------

    def lineage(self) -> list[dict[str, Any]]:
        if self.lineage_file.is_file():
            return json.loads(self.lineage_file.read_text())
        return [self._lineage_entry(Path(self.config.initial_run), cycle=None)]

    def _lineage_entry(self, run: Path, cycle: str | None) -> dict[str, Any]:
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

    def untrained_batch(self) -> bool:
        """Whether the feature dataset holds a batch newer than every batch a cycle has decided on
        (what the train step would find new)."""
        try:
            newest = read_manifest(self.config.features.out).get("newest_batch", 0)
        except (OSError, ValueError):  # not readable from here: the poll of the raw files decides
            return False
        return newest > self.lineage()[-1]["batch"]

    def caught_up(self) -> bool:
        """Whether every landed raw file has been decided on: none unread by the feature dataset,
        no batch untrained, no cycle unfinished (local datasets only; False where it cannot tell)."""
        return (pending_raw_files(self.config.features) == {} and not self.untrained_batch()
                and not self.unfinished())

    # --- steps -----------------------------------------------------------------------------

    def step_drain(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        if not self.config.drain.enabled:
            return {"drained": None}

        drain = self.config.drain
        ingest = load_config(IngestConfig, drain.config or None,
                             [*drain.overrides, f"consumer.until_idle_s={drain.idle_s}"])
        summary = Ingestor(ingest).run()
        return {"drained": summary.as_dict()}

    def step_features(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        config = self.config.features
        if self.features_job is not None:
            self.features_job.run()
            worker = "resident"
        elif self.config.spark_submit:
            code = run_job(config)
            if code == EXIT_LOCKED:
                raise Locked(f"another incremental feature job is running on {config.out} (its lock is "
                             "held); the cycle resumes at its features step next time")
            if code != 0:
                raise RuntimeError(f"the incremental feature job failed (exit code {code})")
            worker = "spark-submit"
        else:
            run_incremental(build_session(config.spark), config)
            worker = "in-process"
        return {"newest_batch": batches(config.out)[-1]["index"], "features_worker": worker}

    def step_train(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
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
        train = self.segment_config(view_dir, run)
        check_continual(train)
        if self.trainer is not None:
            config_file = run / LAUNCH_DIR / RESOLVED_CONFIG
            atomic_write_text(config_file, to_yaml(train))
            self.trainer.train(config_file, source["run"])
            code, facts["trainer_worker"] = 0, "resident"
        else:
            code = run_with_config(WARM_START_SCRIPT, self.config.nproc, train, ["--resume-from", source["run"]])
            facts["trainer_worker"] = "launch"
        if code != 0 or not self._trained(run, facts["batch"]):
            raise RuntimeError(f"warm-start training failed (launcher exit code {code})")
        checkpoint_data_watermark(run)
        return facts

    def segment_config(self, features: Path, run: Path) -> TrainConfig:
        """The training config of a warm-start segment on ``features`` into ``run``."""
        train_file = Path(self.config.train_config)
        if not train_file.is_absolute() and not train_file.exists():
            train_file = REPO_ROOT / train_file
        return load_config(TrainConfig, train_file, self.config.train_overrides,
                           {"features": features.resolve(), "run": run.resolve()})

    @staticmethod
    def _trained(run: Path, batch: int) -> bool:
        try:
            verify_export(run / "export" / "latest")
            return int(checkpoint_data_watermark(run)["batch"]) == batch
        except (ExportError, OSError, RuntimeError):
            return False

    def step_gate(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        served = current(self.registry)
        decision = gate(Path(journal["run"]) / "export" / "latest", served, folder / "view", self.config.gate)
        return {"decision": decision.as_dict(), "compared_with": str(served) if served else None}

    def step_publish(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        decision = journal["decision"]
        published_at = time.time()
        trained = {key: journal[key] for key in ("batch", "watermark_ms", "max_event_ms", "since_batch")}
        trained["cycle"] = journal["cycle"]
        publication = None
        if decision["publish"]:
            target = publish(Path(journal["run"]) / "export" / "latest", self.registry, journal["cycle"], trained,
                             self.config.keep_published, full_every=self.config.publish.full_every)
            publication = trained_record(target).get("publication")
        append_log(self.registry, {
            "cycle": journal["cycle"], "published": decision["publish"], "outcome": decision["outcome"],
            "reason": decision["reason"], "tasks": decision["tasks"], "published_error": decision["published_error"],
            "candidate": decision["candidate"], "current": decision["current"],
            "compared_with": journal.get("compared_with"), "trained": trained, "publication": publication,
            "decided_at": published_at,
            "event_to_published_s": (published_at - journal["max_event_ms"] / 1000
                                     if decision["publish"] and journal.get("max_event_ms") else None)})
        return {"published": decision["publish"]}

    def step_advance(self, folder: Path, journal: dict[str, Any]) -> dict[str, Any]:
        lineage = self.lineage()
        if lineage[-1].get("cycle") != journal["cycle"]:
            entry = self._lineage_entry(Path(journal["run"]), journal["cycle"])
            lineage.append({**entry, "accepted": bool(journal["published"])})
            write_json(self.lineage_file, lineage)
        return {}

    # --- the cycle -------------------------------------------------------------------------

    def run_cycle(self) -> int:
        with contextlib.nullcontext() if self.lock_held else exclusive_lock(self.lock_file, "retraining cycle"):
            folder, journal = self.open_cycle()
            for step in STEPS:
                if step in journal["done"]:
                    continue
                started = time.monotonic()
                facts = getattr(self, f"step_{step}")(folder, journal)
                seconds = {**journal.get("seconds", {}), step: round(time.monotonic() - started, 3)}
                ended_at = {**journal.get("ended_at", {}), step: time.time()}
                self.mark_done(folder, journal, step, **facts, seconds=seconds, ended_at=ended_at)
                if journal.get("nothing_new"):
                    return self.finish(folder, journal, "nothing_new")
            return self.finish(folder, journal, GATE_OUTCOMES[journal["decision"]["outcome"]])


def run_once(config: RetrainConfig, features_job: ResidentFeatures | None = None,
             trainer: ResidentTrainer | None = None, lock_held: bool = False) -> int:
    """One cycle (:class:`Retrainer`'s arguments); its exit code, whatever happened."""
    try:
        return Retrainer(config, features_job, trainer, lock_held).run_cycle()
    except Locked as error:
        log.error("%s", error)
        return LOCKED
    except Exception:  # the journal keeps the completed steps; the next invocation resumes
        log.exception("the retraining cycle failed; the next invocation resumes it")
        return FAILED


def describe_outcome(code: int) -> str:
    return {PUBLISHED: "published", NOT_PUBLISHED: "not published (gate refused the candidate)",
            INSUFFICIENT_EVIDENCE: "not published (insufficient evidence)", NOTHING_NEW: "nothing new",
            LOCKED: "another cycle is running", FAILED: "failed"}.get(code, "failed")

