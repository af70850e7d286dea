"""A lock held by a process that is SIGKILLed stays held until the children it started are gone."""

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

from common.concurrency import Locked, exclusive_lock
from common.keeper import STOP_GRACE_S

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from common.concurrency import exclusive_lock, process_group
    with exclusive_lock(Path(sys.argv[1]), "test run"):
        # A child that ignores SIGTERM: the keeper needs its whole grace period to stop it.
        with process_group(["bash", "-c", "trap '' TERM; echo started; sleep 120 & wait"],
                           stdout=sys.stdout):
            time.sleep(300)
""")


def marked_processes(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if marker.encode() in environ.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def lock_is_free(path) -> bool:
    try:
        with exclusive_lock(path, "probe"):
            return True
    except Locked:
        return False


def test_a_killed_holders_lock_stays_held_until_its_children_are_gone(tmp_path):
    lock = tmp_path / "lock"
    marker = f"SIRENFEED_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "started"
        holder.kill()
        holder.wait()
        assert not lock_is_free(lock), "the lock was free while the killed holder's children still ran"
        assert marked_processes(marker), "the children should still be stopping"
        deadline = time.monotonic() + STOP_GRACE_S + 15
        while not lock_is_free(lock) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lock_is_free(lock), f"lock still held {STOP_GRACE_S + 15:.0f} s after the holder died"
        assert marked_processes(marker) == [], "the lock was released before the children were gone"
    finally:
        holder.stdout.close()
        for pid in marked_processes(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
