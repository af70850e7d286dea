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
  outlives it for more than :data:`STOP_GRACE_S` seconds.

The second needs a process that notices the death. A parent-death signal
(``prctl(PR_SET_PDEATHSIG)``) on the command alone does not do it: ``deepspeed``'s runner passes no
signal on to the launcher it starts on one node (it does so only for pdsh launches), so the launcher
and its ranks would keep running; and spark-submit's JVM does not stop the job's Python driver it
started. So the group's leader is a small *keeper* (``python -m features.concurrency PARENT -- COMMAND``)
that starts the command as its child, in its own group, and asks the kernel for SIGTERM when its
parent dies (where there is no ``PR_SET_PDEATHSIG`` it polls its parent every :data:`POLL_S`
seconds). Then it sends SIGTERM to its whole group, waits up to :data:`STOP_GRACE_S` seconds for
the group to end, and sends SIGKILL to whatever is left. While the parent lives the keeper is
transparent: a signal sent to it alone goes on to the command, and it exits with the command's
status (killed by the same signal if the command was).

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

from features.logs import configure_logging

KEEPER_MODULE = "features.concurrency"
log = logging.getLogger(KEEPER_MODULE)  # the same name when this file runs as the keeper

EXIT_LOCKED = 5
"""Exit code of a command that did nothing because another run holds its lock."""
FORWARDED = (signal.SIGINT, signal.SIGTERM)
STOP_GRACE_S = 10.0
"""After the parent died: how long the group has to end on SIGTERM before it gets SIGKILL."""
POLL_S = 1.0
"""How often the keeper checks that its parent still lives (where no parent-death signal exists)."""
PR_SET_PDEATHSIG = 1


class Locked(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def exclusive_lock(path: Path, what: str = "process") -> Iterator[None]:
    """``flock`` on ``path``, held until the block ends or the process dies (no stale locks);
    :class:`Locked` at once if another process holds it. ``what`` names the holder's kind of run
    in that error ("another ``what`` is running on ``path.parent`` (pid …)")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise Locked(f"another {what} is running on {path.parent} ({holder}); "
                         "not starting one on top of it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        handle.flush()
        try:
            yield
        finally:
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
def process_group(command: Sequence[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """Start ``command`` under its keeper, in a session and process group of its own that dies with
    this process; ``popen`` goes to :class:`subprocess.Popen` (``env``, ``cwd``, ``stdout``, …).
    While the block runs, SIGINT and SIGTERM to this process (main thread only) go to the whole
    group. Leaving the block waits for the group's leader; leaving it by an exception first sends
    the group SIGTERM."""
    process = subprocess.Popen([sys.executable, "-m", KEEPER_MODULE, str(os.getpid()), "--", *command],
                               start_new_session=True, **popen)

    def forward(signum: int, frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
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


class _ParentDied(Exception):
    """Raised inside the keeper once the process that started it is gone."""


def _keep(parent: int, command: list[str]) -> int:
    """The keeper: run ``command`` as this group's member until it ends and return its status
    (``Popen.returncode``), or, if ``parent`` dies first, stop the whole group."""
    child: subprocess.Popen | None = None

    def on_signal(signum: int, frame: Any) -> None:
        if os.getppid() != parent:
            raise _ParentDied
        if child is not None:
            # One sent to this process alone must reach the command; one sent to the whole group
            # reaches it twice, which the launcher and spark-submit take as once.
            child.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, on_signal)
    try:
        # With the kernel's signal, waiting is interrupted by on_signal; without it, poll.
        poll_s = None if die_with_parent(signal.SIGTERM) else POLL_S
        if os.getppid() != parent:  # it died before this process could ask for the signal
            raise _ParentDied
        child = subprocess.Popen(command)
        while True:
            try:
                return child.wait(timeout=poll_s)
            except subprocess.TimeoutExpired:
                if os.getppid() != parent:
                    raise _ParentDied from None
    except _ParentDied:
        _stop_group(parent, command)
        return 128 + signal.SIGTERM


def _stop_group(parent: int, command: list[str]) -> None:
    """SIGTERM to every process of this group, SIGKILL to those still there after STOP_GRACE_S."""
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    log.warning("pid %d, which started %s, is gone: stopping its process group", parent, command[0])
    deadline = time.monotonic() + STOP_GRACE_S
    while _others_in_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    if _others_in_group():
        log.warning("process group %d still runs %.0f s after SIGTERM: SIGKILL", os.getpgrp(), STOP_GRACE_S)
        os.killpg(0, signal.SIGKILL)


def _others_in_group() -> bool:
    """Whether a live process other than this one is in this process group (no ``/proc``: assume so)."""
    if not os.path.isdir("/proc/self"):
        return True
    group, me = os.getpgrp(), os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
                state, _, pgrp = stat.read().rsplit(b")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == group and state != b"Z":
            return True
    return False


def _main(argv: list[str]) -> int:
    """``python -m features.concurrency PARENT_PID -- COMMAND...``: the keeper of :func:`process_group`."""
    configure_logging()
    parent, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit(f"usage: python -m {KEEPER_MODULE} PARENT_PID -- COMMAND...")
    status = _keep(int(parent), command)
    if status < 0:  # end the way the command ended, so the parent sees the same signal
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    return status


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
