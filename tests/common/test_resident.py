"""A long-lived worker and its owner (:mod:`common.resident`): requests answered in order by one
process, a worker that dies reported with its exit code and replaced by a fresh one on a fresh
inbox, a stop request honoured, and a worker that ignores it ended by force."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from common.repo import REPO_ROOT
from common.resident import ResidentWorker, WorkerDied

# A worker: answers {"pid", "echo"}; {"die": code} ends it at once; "hang_on_stop" ignores the stop.
WORKER = """
import os, sys, time
from pathlib import Path
from common.resident import Inbox
inbox = Inbox(Path(sys.argv[1]))
for request in inbox.requests():
    if "die" in request:
        os._exit(request["die"])
    inbox.answer({"pid": os.getpid(), "echo": request["echo"]})
if os.environ.get("HANG_ON_STOP"):
    time.sleep(3600)
"""


def worker(tmp_path: Path, **environment: str) -> ResidentWorker:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return ResidentWorker("echo", tmp_path / "resident", lambda inbox: [sys.executable, str(script), str(inbox)],
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **environment})


def test_one_process_answers_every_request_in_order(tmp_path):
    echo = worker(tmp_path)
    try:
        answers = [echo.call({"echo": n}) for n in range(5)]
    finally:
        echo.close()
    assert [answer["echo"] for answer in answers] == list(range(5))
    assert len({answer["pid"] for answer in answers}) == 1 and echo.starts == 1
    assert not echo.alive()


def test_a_dead_worker_is_reported_and_replaced_on_a_fresh_inbox(tmp_path):
    echo = worker(tmp_path)
    try:
        first = echo.call({"echo": "a"})
        old_inbox = echo.inbox
        with pytest.raises(WorkerDied) as died:
            echo.call({"die": 7})
        assert died.value.code == 7 and not echo.alive()
        second = echo.call({"echo": "b"})
    finally:
        echo.close()
    assert second["echo"] == "b" and second["pid"] != first["pid"] and echo.starts == 2
    assert echo.inbox != old_inbox and not old_inbox.exists(), "the dead worker's inbox was reused"


def test_a_worker_that_ignores_the_stop_request_is_ended(tmp_path):
    echo = worker(tmp_path, HANG_ON_STOP="1")
    echo.call({"echo": 1})
    pid = echo.process.pid
    started = time.monotonic()
    echo.close(timeout_s=1)
    assert time.monotonic() - started < 20
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_requests_sent_ahead_are_answered_in_order_and_a_replaced_worker_answers_none_of_them(tmp_path):
    echo = worker(tmp_path)
    try:
        first, second = echo.submit({"echo": 1}), echo.submit({"echo": 2})
        assert echo.wait(second)["echo"] == 2 and echo.wait(first)["echo"] == 1
        pending = echo.submit({"die": 3})
        with pytest.raises(WorkerDied):
            echo.wait(pending)
        assert echo.call({"echo": 4})["echo"] == 4
        with pytest.raises(WorkerDied):
            echo.wait(echo.submit({"echo": 5}) + 1)  # never sent to this worker
    finally:
        echo.close()
