"""The keeper of :func:`common.concurrency.process_group`: ``python -m common.keeper PARENT_PID --
COMMAND...``.

It leads the process group of one command (the ``deepspeed`` launcher, ``spark-submit``), starts
the command as its child and asks the kernel for SIGTERM when its parent dies (where there is no
``PR_SET_PDEATHSIG`` it polls its parent every :data:`POLL_S` seconds). Then it sends SIGTERM to
its whole group, waits up to :data:`STOP_GRACE_S` seconds for the group to end, and sends SIGKILL
to whatever is left. While the parent lives the keeper is transparent: a signal sent to it alone
goes on to the command, and it exits with the command's status (killed by the same signal if the
command was). A lock file it inherited stays held until it exits, i.e. until its group has ended.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from common.concurrency import FORWARDED, KEEPER_MODULE, die_with_parent
from common.logs import configure_logging

log = logging.getLogger(KEEPER_MODULE)

STOP_GRACE_S = 10.0
"""After the parent died: how long the group has to end on SIGTERM before it gets SIGKILL."""
REPARENT_WAIT_S = 1.0
"""How long a signal waits to tell its parent's death from a signal sent while the parent lives."""
POLL_S = 1.0
"""How often the keeper checks that its parent still lives (where no parent-death signal exists)."""


class _ParentDied(Exception):
    """Raised inside the keeper once the process that started it is gone."""


def _keep(parent: int, command: list[str]) -> int:
    """The keeper: run ``command`` as this group's member until it ends and return its status
    (``Popen.returncode``), or, if ``parent`` dies first, stop the whole group."""
    child: subprocess.Popen | None = None

    def on_signal(signum: int, frame: Any) -> None:
        if _parent_gone(parent):
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


def _parent_gone(parent: int) -> bool:
    """Whether ``parent`` has died. The kernel's parent-death signal fires when the parent *thread*
    that started this process exits: while the other threads of a multi-threaded parent (torch's)
    are still being killed, this process is briefly the child of one of them, the same pid, so a
    signal arriving then waits up to :data:`REPARENT_WAIT_S` for the reparenting to finish."""
    deadline = time.monotonic() + REPARENT_WAIT_S
    while os.getppid() == parent:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


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
    """``python -m common.keeper PARENT_PID -- COMMAND...``: the keeper of :func:`process_group`."""
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
