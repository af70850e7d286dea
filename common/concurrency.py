"""Running beside other processes: an exclusive lock no crash leaves behind, and child processes that
die with the process that started them.

**Locks.** :func:`exclusive_lock` is an ``flock`` on a file: the kernel releases it when its holder
ends, however it ends, so there are no stale locks to clean up. A second taker fails at once with
:class:`Locked`, naming the holder (pid and since when); commands report that with exit code
:data:`EXIT_LOCKED`. ``flock`` needs a filesystem that honours it: local disks, NFSv4 and most
cluster filesystems do; object stores and HDFS have no such thing.

**Children.** :func:`process_group` runs a command (the ``deepspeed`` launcher, ``spark-submit``) in
a session and process group of its own, for two reasons:

- SIGINT and SIGTERM sent to this process while the command runs are forwarded to the whole group,
  so stopping the parent stops every process the command started, the launcher's ranks included;
- if the parent is killed outright (SIGKILL: cron, systemd, the OOM killer), nothing it started
  outlives it for more than :data:`common.keeper.STOP_GRACE_S` seconds.

The second needs a process that notices the death. A parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) on the command alone does not do it: ``deepspeed``'s runner passes no
signal on to the launcher it starts on one node (it does so only for pdsh launches), so the launcher
and its ranks would keep running; and spark-submit's JVM does not stop the job's Python driver it
started. So the group's leader is a small *keeper* (the command :mod:`common.keeper`) that
starts the command as its child, in its own group, and stops the whole group once its parent is gone.

**Locks outlive a killed holder until its children are gone.** A command started while this process
holds an :func:`exclusive_lock` holds it too: the keeper inherits the lock's file (an ``flock``
belongs to the open file, shared by every process that has it), so the lock is free again only
once the parent and the whole group have ended. Without that, the next retraining cycle could take
the lock of a SIGKILLed one and delete a run directory under ranks that are still stopping.

A process that moves to a group of its own is not reached by the group's signals; the one such
process here, pyspark's worker daemon, ends when the JVM that started it closes its stdin.
``PR_SET_PDEATHSIG`` fires when the *thread* that started the keeper ends: call
:func:`process_group` from a thread that waits for the command, as its ``with`` block does.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

KEEPER_MODULE = "common.keeper"
log = logging.getLogger(__name__)

EXIT_LOCKED = 5
"""Exit code of a command that did nothing because another run holds its lock."""
FORWARDED = (signal.SIGINT, signal.SIGTERM)
PR_SET_PDEATHSIG = 1
_held_lock_files: set[int] = set()
"""File descriptors of the locks this process holds: every :func:`process_group` inherits them."""


class Locked(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str = "process", wait_s: float = 0.0) -> Iterator[None]:
    """``flock`` on ``path``, held until the block ends or the process dies (no stale locks);
    :class:`Locked` if another process still holds it after ``wait_s`` seconds (0: at once).
    ``what`` names the holder's kind of run in that error ("another ``what`` is running on
    ``path.parent`` (pid …)")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    with path.open("a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise Locked(f"another {what} is running on {path.parent} ({holder}); "
                             "not starting one on top of it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        handle.flush()
        _held_lock_files.add(handle.fileno())
        try:
            yield
        finally:
            _held_lock_files.discard(handle.fileno())
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def die_with_parent(signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``signum`` to this process when its parent dies, and send it now if the
    parent died before the request took effect; returns whether the kernel will (Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        return False
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
    return True


@contextlib.contextmanager
def process_group(command: Sequence[str], forward_signals: bool = True,
                  **popen: Any) -> Iterator[subprocess.Popen]:
    """Start ``command`` under its keeper, in a session and process group of its own that dies with
    this process; ``popen`` goes to :class:`subprocess.Popen` (``env``, ``cwd``, ``stdout``, …).
    While the block runs, SIGINT and SIGTERM to this process (main thread only, and unless
    ``forward_signals`` is false: a long-lived worker its owner stops in its own way) go to the
    whole group. Leaving the block waits for the group's leader; leaving it by an exception first sends
    the group SIGTERM. The keeper inherits every lock this process holds (module docstring)."""
    pass_fds = tuple(popen.pop("pass_fds", ())) + tuple(sorted(_held_lock_files))
    process = subprocess.Popen([sys.executable, "-m", KEEPER_MODULE, str(os.getpid()), "--", *command],
                               start_new_session=True, pass_fds=pass_fds, **popen)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    handlers = {}
    if forward_signals and threading.current_thread() is threading.main_thread():
        handlers = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        with process:
            try:
                yield process
            except BaseException:
                forward(signal.SIGTERM, None)
                raise
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
