"""The long-lived continuous pipeline (``sirenfeed train --continuous`` with its resident Spark
application and resident ranks) survives a SIGKILL of any one of its processes, and nothing is lost
or duplicated: one day of events lands per cycle, and between cycles we kill the resident feature
job's JVM, then one resident rank, then the loop itself in the middle of a cycle (and restart it).
Every day ends up in exactly one feature batch, every cycle is decided and published (or not)
exactly once, the lineage takes each cycle once, a killed worker is replaced, a killed loop takes
all its processes with it and the restarted one completes its cycle, and SIGTERM ends the loop
with exit code 0. Processes are found by a marker in their environment (``retrain_support``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest
from retrain_support import MARKER, TINY, marked_processes, start_lineage, write_day

from common.repo import REPO_ROOT
from lifecycle.cycle import FAILED
from lifecycle.registry import read_log
from lifecycle.view import batches

pytestmark = pytest.mark.slow

STOP_BOUND_S = 30.0
CYCLE_TIMEOUT_S = 600.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return start_lineage(tmp_path_factory.mktemp("continuous-kill"), "spark_submit=true",
                         "features.spark.master=local[2]", "features.spark.driver_memory=1g",
                         "train_overrides=[" + ",".join([*TINY, "schedule.kind=constant", "train.steps=6"]) + "]",
                         "continuous.poll_s=0.5", "continuous.every_s=0")


@pytest.fixture
def loops(setup, tmp_path) -> Iterator[Callable[[], tuple[subprocess.Popen, str]]]:
    """Starts the continuous loop with a fresh marker; whatever still carries a marker afterwards is
    killed, so a failing test leaves nothing running."""
    markers, processes = [], []

    def start() -> tuple[subprocess.Popen, str]:
        marker = uuid.uuid4().hex
        markers.append(marker)
        command = [sys.executable, "-m", "sirenfeed.cli", "train", "--continuous", "--config",
                   str(REPO_ROOT / "conf" / "retrain.yaml"), *setup["overrides"]]
        log = (tmp_path / f"loop-{len(markers)}.log").open("w")
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, MARKER: marker})
        log.close()
        processes.append(process)
        return process, marker

    yield start
    for marker in markers:
        for pid in marked_processes(marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in processes:
        process.wait(timeout=60)


def journal(setup, number: int) -> dict:
    path = Path(setup["config"].dir) / "cycles" / f"c{number:06d}" / "state.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def wait_for(condition: Callable[[], bool], loop: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + CYCLE_TIMEOUT_S
    while not condition():
        assert loop.poll() is None, f"the loop ended (exit code {loop.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.2)


def decided(setup, number: int) -> Callable[[], bool]:
    return lambda: journal(setup, number).get("outcome") is not None


def only(processes: dict[int, str], what: str) -> int:
    assert len(processes) == 1, f"expected one {what}, found {processes}"
    return next(iter(processes))


def assert_all_gone(marker: str) -> None:
    deadline = time.monotonic() + STOP_BOUND_S
    while (survivors := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not survivors, f"{STOP_BOUND_S:.0f} s after the loop was killed these still run:\n" + \
        "\n".join(f"{pid}: {command[:300]}" for pid, command in survivors.items())


@pytest.mark.timeout(2400)
def test_the_continuous_pipeline_survives_a_sigkill_of_each_of_its_processes(setup, loops, tmp_path):
    raw = Path(setup["config"].features.raw)
    loop, marker = loops()
    wait_for(decided(setup, 1), loop, "cycle 1 decided (day 2)")

    # The resident feature job's JVM, killed while idle: the next cycle's features step gets a new one.
    jvm = only({pid: command for pid, command in marked_processes(marker).items()
                if "org.apache.spark.deploy.SparkSubmit" in command and "features/resident.py" in command},
               "resident Spark JVM")
    os.kill(jvm, signal.SIGKILL)
    write_day(raw, 3)
    wait_for(decided(setup, 2), loop, "cycle 2 decided (day 3) after the JVM was killed")

    # One resident rank, killed while idle: the watchdog ends the other, the next cycle launches anew.
    rank = only(marked_processes(marker, also_set="RANK=1"), "resident rank 1")
    os.kill(rank, signal.SIGKILL)
    write_day(raw, 4)
    wait_for(decided(setup, 3), loop, "cycle 3 decided (day 4) after a rank was killed")

    # The loop itself, killed in the middle of cycle 4: everything it started goes with it, and a
    # restarted loop (waiting for the lock the dying workers hold) completes the cycle.
    write_day(raw, 5)
    wait_for(lambda: "features" in journal(setup, 4).get("done", []), loop, "cycle 4 past its features step")
    os.kill(loop.pid, signal.SIGKILL)
    loop.wait()
    assert_all_gone(marker)
    assert journal(setup, 4).get("outcome") is None, "the loop was killed too late to test a resume"
    loop, marker = loops()
    wait_for(decided(setup, 4), loop, "cycle 4 decided by the restarted loop")
    loop.send_signal(signal.SIGTERM)
    assert loop.wait(timeout=120) == 0
    assert_all_gone(marker)

    logs = "\n".join(path.read_text() for path in sorted(tmp_path.glob("loop-*.log")))
    assert "the features worker ended" in logs and "the trainer worker ended" in logs, "no worker was replaced"
    cycles = [journal(setup, number) for number in (1, 2, 3, 4)]
    assert all(entry["features_worker"] == "resident" and entry["trainer_worker"] == "resident" for entry in cycles)
    assert not journal(setup, 5), "a cycle ran with nothing new"
    # Exactly once: each day's file in one batch, each cycle decided, logged and in the lineage once.
    catalogue = batches(str(setup["features"]))
    read = [file for entry in catalogue for file in entry["input_files"]]
    assert len(read) == len(set(read)) and [entry["events"] for entry in catalogue[1:]] == [72] * 4
    assert [record["cycle"] for record in read_log(Path(setup["config"].dir) / "registry")] == \
        [entry["cycle"] for entry in cycles]
    lineage = json.loads((Path(setup["config"].dir) / "lineage.json").read_text())
    assert [entry["cycle"] for entry in lineage[1:]] == [entry["cycle"] for entry in cycles]
    assert all(entry["outcome"] != FAILED for entry in cycles)
