"""The long-lived workers of the continuous pipeline: one Spark application for the features step,
one ``deepspeed`` launch for the train step, both kept up between cycles.

``sirenfeed train --continuous`` (with ``continuous.resident``, the default) starts them with its
loop, under ``RETRAIN_DIR/resident/``, and hands every cycle's features and train steps to them
(:class:`lifecycle.cycle.Retrainer`) instead of submitting the feature job and launching the ranks
afresh; the rest of the cycle (its journal, lock, gate, publish and exit codes) is the same as
``sirenfeed retrain``'s. Both are :class:`common.resident.ResidentWorker` s: they run in process
groups of their own that die with the loop and hold its lock until they have ended, and one that
dies (a killed JVM or rank, an out-of-memory kill) fails the step it was serving, which the cycle's
journal resumes: the next cycle starts a new worker. :data:`RESIDENT_DIR` holds their inboxes,
and the config, package zip and base training config they were started with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import IO

from common.concurrency import Locked
from common.config import to_yaml
from common.files import atomic_write_text
from common.resident import ResidentWorker
from features.resident import RESIDENT_JOB
from features.settings import FeaturesConfig
from features.submit import job_environment, spark_submit_command, write_job_files
from trainer.config import TrainConfig
from trainer.distributed import remove_leftover_segments
from trainer.launcher import deepspeed_command, free_port, launch_env
from trainer.resident import RESIDENT_RANK_SCRIPT

log = logging.getLogger(__name__)

REQUEST = {"run": "incremental"}
RESIDENT_DIR = "resident"
"""``RETRAIN_DIR/resident/``: the inboxes of the long-lived workers."""


class ResidentFeatures:
    """The features step's long-lived Spark application (:mod:`features.resident`).

    It is kept busy while the rest of a cycle runs: once a features step has its batch, the next
    incremental run is asked for at once (*prefetched*), so the files that land while the ranks
    train, the gate evaluates and the model is published are already a feature batch when the next
    cycle starts. A features step takes the prefetched run's batch if it made one, and otherwise
    runs the job itself. The prefetched run is the same exactly-once append as any other (its
    batch is in the dataset whatever happens to this process next)."""

    def __init__(self, config: FeaturesConfig, root: Path, stdout: IO[str] | None = None):
        self.config = config
        self.worker = ResidentWorker("features", root, self._command, stdout=stdout, env=job_environment())
        self._prefetched: int | None = None
        """The number of the prefetched request in flight, if any."""

    def _command(self, inbox: Path) -> list[str]:
        return [*spark_submit_command(self.config, *write_job_files(self.config, inbox),
                                      script=RESIDENT_JOB), "--inbox", str(inbox)]

    def run(self) -> None:
        """A new batch from the prefetched run, or else from one incremental run now; then the next
        run is prefetched. :class:`Locked` if another incremental job holds the dataset."""
        made = False
        if self._prefetched is not None:
            number, self._prefetched = self._prefetched, None
            made = self._check(self.worker.wait(number), prefetched=True)
        if not made:
            self._check(self.worker.call(REQUEST), prefetched=False)
        self._prefetched = self.worker.submit(REQUEST)

    @staticmethod
    def _check(answer: dict, prefetched: bool) -> bool:
        """Whether ``answer`` made a new batch; raises for a held lock or a failed run."""
        if "locked" in answer:
            raise Locked(answer["locked"])
        if "error" in answer:
            raise RuntimeError(f"the incremental feature job failed: {answer['error']}")
        log.info("resident feature job%s: %s in %.1f s", " (prefetched)" if prefetched else "",
                 f"batch {answer['newest_batch']}" if answer["new_batch"] else "nothing new", answer["seconds"])
        return bool(answer["new_batch"])

    def close(self) -> None:
        self.worker.close()


class ResidentTrainer:
    """The train step's long-lived ranks (:mod:`trainer.resident`), started on ``base``'s
    communication settings."""

    def __init__(self, base: TrainConfig, nproc: int, root: Path, stdout: IO[str] | None = None):
        self.base, self.nproc = base, nproc
        self._port: int | None = None
        self.worker = ResidentWorker("trainer", root, self._command, on_exit=self._sweep, stdout=stdout,
                                     env=launch_env())

    def _command(self, inbox: Path) -> list[str]:
        config_file = inbox / "base.yaml"
        atomic_write_text(config_file, to_yaml(self.base))
        self._port = free_port()
        return deepspeed_command(RESIDENT_RANK_SCRIPT, self.nproc, self._port, str(config_file),
                                 ["--inbox", str(inbox)])

    def _sweep(self) -> None:
        if self._port is not None:
            remove_leftover_segments(self._port)

    def train(self, config_file: Path, resume_from: str) -> None:
        """One warm-start segment: ``config_file`` (its view and run directory) from ``resume_from``."""
        answer = self.worker.call({"config": str(config_file), "resume_from": resume_from})
        log.info("resident trainer: segment in %.1f s", answer["seconds"])

    def close(self) -> None:
        self.worker.close()
