"""A ``sirenfeed retrain`` cycle SIGKILLed (as cron, systemd or the OOM killer do) takes every process
it started with it: while its spark-submit feature step runs (the JVM and the job's Python driver),
and while it trains (the deepspeed runner, the launcher and its ranks); the next invocation then
completes the cycle. The cycle's processes are found by a marker in their environment, which every
process it starts inherits, so Spark and deepspeed runs of other tests on the machine do not count."""

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
from retrain_support import MARKER, TINY, marked_processes, start_lineage

from common.repo import REPO_ROOT
from features.dataset import read_manifest
from lifecycle.cycle import INSUFFICIENT_EVIDENCE, NOT_PUBLISHED, PUBLISHED, STEPS

pytestmark = pytest.mark.slow

STOP_BOUND_S = 30.0


def train_overrides(steps: int) -> str:
    return "train_overrides=[" + ",".join([*TINY, "schedule.kind=constant", f"train.steps={steps}"]) + "]"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return start_lineage(tmp_path_factory.mktemp("retrain-kill"), "spark_submit=true",
                         "features.spark.master=local[2]", "features.spark.driver_memory=1g")


@pytest.fixture
def cycle(setup, tmp_path) -> Iterator[Callable[..., tuple[subprocess.Popen, str]]]:
    """Starts ``sirenfeed retrain`` with a fresh marker; whatever still carries a marker afterwards is
    killed by its pid, so a failing test leaves nothing running."""
    markers, processes = [], []

    def start(*overrides: str) -> tuple[subprocess.Popen, str]:
        marker = uuid.uuid4().hex
        markers.append(marker)
        command = [sys.executable, "-m", "sirenfeed.cli", "retrain", "--config",
                   str(REPO_ROOT / "conf" / "retrain.yaml"), *setup["overrides"], *overrides]
        log = (tmp_path / f"retrain-{len(markers)}.log").open("w")
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


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the cycle ended (exit code {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)


def assert_all_gone(marker: str) -> None:
    deadline = time.monotonic() + STOP_BOUND_S
    while (survivors := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not survivors, f"{STOP_BOUND_S:.0f} s after the cycle was killed these still run:\n" + \
        "\n".join(f"{pid}: {command[:300]}" for pid, command in survivors.items())


def test_killing_a_cycle_in_its_spark_submit_feature_step_stops_the_jvm_and_the_driver(setup, cycle):
    process, marker = cycle(train_overrides(6))

    def started() -> bool:
        commands = marked_processes(marker).values()
        return (any("org.apache.spark.deploy.SparkSubmit" in command for command in commands)
                and any("python" in command.split()[0] and "features/job.py" in command for command in commands))

    wait_for(started, process, "the spark-submit JVM and the job's Python driver")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert_all_gone(marker)
    assert "batches" not in read_manifest(setup["features"]), "the killed cycle's feature job kept running"


@pytest.mark.timeout(1600)
def test_killing_a_cycle_while_it_trains_stops_every_rank_and_the_next_one_completes_it(setup, cycle):
    process, marker = cycle(train_overrides(100_000))
    wait_for(lambda: len(marked_processes(marker, also_set="LOCAL_RANK")) == 2, process, "two training ranks")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert_all_gone(marker)

    process, marker = cycle(train_overrides(6))
    assert process.wait(timeout=600) in (PUBLISHED, NOT_PUBLISHED, INSUFFICIENT_EVIDENCE)  # any gate outcome completes it
    assert_all_gone(marker)
    journal = json.loads((Path(setup["config"].dir) / "cycles" / "c000001" / "state.json").read_text())
    assert journal["done"] == list(STEPS) and journal["batch"] == 1
