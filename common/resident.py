"""A long-lived worker process and its owner, talking through request files.

The continuous pipeline keeps its expensive processes up between cycles (a Spark application, the
ranks of a ``deepspeed`` launch) instead of starting them for every cycle. The owner starts the
worker's command once, in a process group of its own that dies with the owner
(:func:`common.concurrency.process_group`, so a SIGKILLed owner leaves nothing behind and the locks
it holds stay held until the whole group has ended), and then hands it requests.

The protocol is files, so any process that can read a directory can serve it (a Spark driver, rank
0 of a launch), whatever language or launcher stands between the owner and it:

- ``INBOX/request-NNNNNN.json``: a request, written atomically by the owner, numbered in order;
- ``INBOX/answer-NNNNNN.json``: its answer, written atomically by the worker when it is done.

``INBOX`` is a fresh folder for every start of the worker (``ROOT/NAME/<start id>/``), so an answer
is always the current worker's, never a late one from a worker that died. The owner waits for an
answer while watching the worker's process: if the process ends first, :class:`WorkerDied` (with
its exit code), and whatever is left of its group is killed. A request ``{"stop": true}`` asks the
worker to end; :meth:`ResidentWorker.close` sends it and waits, then ends the group by force.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Sequence

from common.concurrency import process_group
from common.files import write_json
from common.logs import child_output

log = logging.getLogger(__name__)

POLL_S = 0.05
"""How often the owner looks for an answer, and an idle worker for a request."""
STOP = {"stop": True}


class WorkerDied(RuntimeError):
    """The worker's process ended before it answered."""

    def __init__(self, name: str, code: int | None):
        super().__init__(f"the {name} worker ended (exit code {code}) before it answered")
        self.code = code


def _request_file(inbox: Path, number: int) -> Path:
    return inbox / f"request-{number:06d}.json"


def _answer_file(inbox: Path, number: int) -> Path:
    return inbox / f"answer-{number:06d}.json"


class ResidentWorker:
    """The owner's side: start the worker, send requests, stop it.

    ``command(inbox)`` builds the worker's command line for an inbox folder; ``popen`` goes to
    :func:`common.concurrency.process_group` (``env``, …); ``stdout`` takes the worker's output
    (stderr too; default: the file of an open :func:`common.logs.output_to`, else this process's
    streams). ``on_exit`` runs after the
    worker's group has ended, however it ended (e.g. sweeping what a killed launch left)."""

    def __init__(self, name: str, root: Path, command: Callable[[Path], Sequence[str]],
                 on_exit: Callable[[], None] | None = None, stdout: IO[str] | None = None, **popen: Any):
        self.name = name
        self.root = Path(root) / name
        self._command = command
        self._on_exit = on_exit
        stdout = stdout if stdout is not None else child_output()
        self._popen = {**popen, **({"stdout": stdout, "stderr": subprocess.STDOUT} if stdout else {})}
        self._group: contextlib.ExitStack | None = None
        self.process: subprocess.Popen | None = None
        self.inbox: Path | None = None
        self._sent = 0
        self.starts = 0
        """How many times the worker was started (1 + restarts after deaths)."""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self) -> None:
        """Start the worker unless it runs (again, if it died: what it left is cleaned up first)."""
        if self.alive():
            return
        if self.process is not None:
            log.warning("the %s worker ended (exit code %s); starting a new one", self.name,
                        self.process.returncode)
            self._end_group()
        # Its owner alone uses this folder, and no earlier worker of it lives (they die with their
        # owner, and this owner ended the last one): what is there is left over.
        shutil.rmtree(self.root, ignore_errors=True)
        self.inbox = self.root / f"{int(time.time() * 1000)}-{os.getpid()}"
        self.inbox.mkdir(parents=True)
        self._sent = 0
        command = list(self._command(self.inbox))
        group = contextlib.ExitStack()
        self.process = group.enter_context(process_group(command, forward_signals=False, **self._popen))
        self._group = group
        self.starts += 1
        log.info("started the %s worker (pid %d): %s", self.name, self.process.pid, shlex.join(command))

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send ``request`` and wait for its answer; :class:`WorkerDied` if the worker ends first."""
        return self.wait(self.submit(request))

    def submit(self, request: dict[str, Any]) -> int:
        """Send ``request`` without waiting; returns its number for :meth:`wait`. The worker takes
        requests one at a time, in order."""
        self.ensure_running()
        assert self.inbox is not None
        self._sent += 1
        write_json(_request_file(self.inbox, self._sent), request)
        return self._sent

    def wait(self, number: int) -> dict[str, Any]:
        """The answer to request ``number`` of the running worker, once it is there;
        :class:`WorkerDied` if the worker ends first (or has been replaced since)."""
        if self.process is None or self.inbox is None or number > self._sent:
            raise WorkerDied(self.name, None)
        answer = _answer_file(self.inbox, number)
        while not answer.is_file():
            if self.process.poll() is not None:
                code = self.process.returncode
                self._end_group()
                raise WorkerDied(self.name, code)
            time.sleep(POLL_S)
        return json.loads(answer.read_text())

    def close(self, timeout_s: float = 60.0) -> None:
        """Ask the worker to stop, wait up to ``timeout_s``, then stop its group by force."""
        if self.process is None:
            return
        if self.alive() and self.inbox is not None:
            self._sent += 1
            write_json(_request_file(self.inbox, self._sent), STOP)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout_s)
        self._end_group()

    def _end_group(self) -> None:
        """End every process of the worker's group (a worker's own children can outlive it, e.g. a
        Spark driver whose JVM was killed) and release what its owner holds of it."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGTERM if self.process.poll() is None else signal.SIGKILL)
        if self._group is not None:
            with contextlib.suppress(Exception):
                self.process.wait(30)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self._group.close()
            self._group = None
        self.process = None
        if self._on_exit is not None:
            self._on_exit()


class Inbox:
    """The worker's side: the requests of one inbox folder, in order, and their answers."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._next = 1

    def poll(self) -> dict[str, Any] | None:
        """The next request if it has arrived, else None."""
        request = _request_file(self.folder, self._next)
        if not request.is_file():
            return None
        self._next += 1
        return json.loads(request.read_text())

    def requests(self, idle: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """Every request until the stop request; ``idle`` runs between polls (a health check that
        raises when what the worker holds has died)."""
        while True:
            request = self.poll()
            if request is None:
                if idle is not None:
                    idle()
                time.sleep(POLL_S)
                continue
            if is_stop(request):
                return
            yield request

    def answer(self, answer: dict[str, Any]) -> None:
        """Answer the request :meth:`poll` returned last."""
        write_json(_answer_file(self.folder, self._next - 1), answer)


def is_stop(request: dict[str, Any] | None) -> bool:
    return bool(request) and bool(request.get("stop"))
