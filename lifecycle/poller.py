"""The long-running modes: a cycle every period (``sirenfeed retrain --every``) or whenever new data
has waited long enough (``sirenfeed train --continuous``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import signal
import threading
import time
from pathlib import Path

from common.concurrency import Locked, exclusive_lock
from common.keeper import STOP_GRACE_S
from features.incremental import pending_raw_files
from lifecycle.config import DrainConfig, RetrainConfig
from lifecycle.cycle import (
    INSUFFICIENT_EVIDENCE, LOCKED, NOT_PUBLISHED, NOTHING_NEW, PUBLISHED, Retrainer, describe_outcome,
    run_once,
)
from lifecycle.resident import RESIDENT_DIR, ResidentFeatures, ResidentTrainer
from lifecycle.telemetry import CycleTelemetry

log = logging.getLogger(__name__)

LOCK_WAIT_S = STOP_GRACE_S + 20
"""How long a starting loop waits for the lock: a killed loop's workers hold it until they have
ended, at most the keeper's grace period after its death."""


def parse_period(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``1d`` → seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a period like 90s, 15m, 1h or 1d, got {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


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

    The loop holds the retraining directory's lock for its whole life (a second loop or a
    ``sirenfeed retrain`` on the same directory gets exit code 5; a loop restarted after a crash
    waits up to :data:`LOCK_WAIT_S` for the old one's workers to end), and with
    ``continuous.resident`` keeps one Spark application and one ``deepspeed`` launch up for all its
    cycles (:mod:`lifecycle.resident`), started with the loop so the first cycle finds them warm.

    Every ``continuous.poll_s`` (after draining Kafka, if ``drain.enabled``) it lists the raw files
    the feature dataset has not read (:func:`features.incremental.pending_raw_files`, no Spark).
    A cycle (features → warm start → gate → publish, the same as ``sirenfeed retrain``) starts
    once they have waited ``continuous.every_s`` or hold ``continuous.every_events`` events; an
    unfinished cycle left by a crash is completed first. Where the files cannot be listed cheaply
    (a remote filesystem) a cycle starts every ``every_s`` and the feature job decides."""

    try:
        with exclusive_lock(Path(config.dir) / "lock", "retraining loop", wait_s=LOCK_WAIT_S):
            features_job, trainer = _start_residents(config) if config.continuous.resident else (None, None)
            try:
                _loop(config, stop, features_job, trainer)
            finally:
                for worker in (features_job, trainer):
                    if worker is not None:
                        worker.close()
    except Locked as error:
        log.error("%s", error)
        return LOCKED
    return 0


def _start_residents(config: RetrainConfig) -> tuple[ResidentFeatures | None, ResidentTrainer]:
    root = Path(config.dir) / RESIDENT_DIR
    # Without spark-submit the features step runs in this process, on its one long-lived session.
    features_job = ResidentFeatures(config.features, root) if config.spark_submit else None
    base = Retrainer(config).segment_config(Path(config.features.out), root / "trainer")
    trainer = ResidentTrainer(base, config.nproc, root)
    for worker in (features_job, trainer):
        if worker is not None:
            worker.worker.ensure_running()
    return features_job, trainer


def _loop(config: RetrainConfig, stop: threading.Event, features_job: ResidentFeatures | None,
          trainer: ResidentTrainer | None) -> None:
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
            # A batch the resident feature job prefetched while the last cycle ran is due at once.
            if due or cycles.unfinished() or (features_job is not None and cycles.untrained_batch()):
                if pending:
                    log.info("%d new raw files (%d events) waited %.0f s: starting a cycle",
                             len(pending), events, now - waiting_since)
                code = run_once(cycles.config, features_job, trainer, lock_held=True)
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


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: the loop ends after the cycle in progress (the launcher
    forwards the signal to the ranks; an interrupted cycle is resumed by the next run)."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, frame: stop.set())
    return stop
