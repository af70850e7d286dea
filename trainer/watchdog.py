"""Failure detection across ranks, so that no rank waits forever for one that is gone.

Every rank runs a :class:`Watchdog` thread once torch.distributed is up. It talks through the TCP
store the ranks rendezvoused on (hosted by rank 0 at ``MASTER_ADDR:MASTER_PORT``), on its own
connection, under the prefix ``sirenfeed/watchdog/``:

- every ``interval`` seconds each rank writes its heartbeat, ``beat/<rank> = "<sequence> <step>"``;
- rank 0 reads all heartbeats; a rank whose heartbeat has not changed for ``heartbeat_timeout_s``
  is declared dead (SIGKILL, the OOM killer, a lost node all look like this);
- the first verdict wins ``reason`` (an atomic compare-and-set): a rank that crashes posts its own
  exception, rank 0 posts a dead rank; every watchdog polls ``reason`` and, once it is set, logs it
  and ends its process with :data:`EXIT_PEER_FAILED` at once, even while the main thread is
  blocked inside a collective that would otherwise wait for the dead peer;
- a rank that loses the store altogether has lost rank 0 (or the network to it) and exits too.

So a death is noticed within ``heartbeat_timeout_s`` plus one interval, and a crash within one
interval. The remaining failure, a rank alive but stuck, is bounded by the collective timeout
(``distributed.timeout_s``, given to ``torch.distributed``): the waiting rank's collective raises,
and :meth:`Watchdog.fail` turns that into a verdict too. The launcher of each node then sees a rank
exit non-zero, stops the node's other ranks and exits non-zero itself.

:func:`die_with_parent` (:mod:`common.concurrency`) makes a rank die with its launcher, and :func:`inject_fault` is the fire
drill (``distributed.fault``) that proves all of this on a real cluster.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

from common.concurrency import die_with_parent  # noqa: F401 - part of this module's interface for the ranks
from trainer.config import FAULTS

log = logging.getLogger(__name__)

EXIT_PEER_FAILED = 3
"""Exit code of a rank stopped because another rank failed (the failed rank's own code differs)."""
STORE_PREFIX = "sirenfeed/watchdog/"
REASON = "reason"


class FireDrill(RuntimeError):
    """The exception ``distributed.fault=raise`` throws."""


def _exit_now(reason: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(EXIT_PEER_FAILED)


def is_communication_error(error: BaseException) -> bool:
    """A failed collective: usually the echo of another rank's death, not a failure of this rank."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset",
                                      "Broken pipe", "Timed out"))


class Watchdog:
    """One rank's heartbeat and failure monitor (see the module docstring).

    ``on_abort`` is what a verdict does to this process (default: log it and ``os._exit``).
    """

    def __init__(self, rank: int, world: int, heartbeat_timeout_s: float, host: str, port: int,
                 on_abort: Callable[[str], None] | None = None):
        self.rank, self.world = rank, world
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.interval = max(0.2, heartbeat_timeout_s / 6)
        self.step = 0
        """The training step this rank is at; the training loop sets it, heartbeats carry it."""
        self._address = f"{host}:{port}"
        self._beats = self._connect(host, port)
        self._reports = self._connect(host, port)  # the main thread's own connection
        self._on_abort = on_abort or _exit_now
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="sirenfeed-watchdog", daemon=True)

    def _connect(self, host: str, port: int) -> dist.Store:
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=timedelta(seconds=self.heartbeat_timeout_s))
        return dist.PrefixStore(STORE_PREFIX, store)

    @classmethod
    def from_environment(cls, heartbeat_timeout_s: float) -> "Watchdog":
        """A watchdog for this launcher-started rank (``RANK``, ``WORLD_SIZE``, ``MASTER_*``)."""
        return cls(dist.get_rank(), dist.get_world_size(), heartbeat_timeout_s,
                   os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))

    def start(self) -> None:
        """Publish this rank's identity and first heartbeat, then watch in the background. Call on
        every rank right after the process group is up (rank 0 counts silence from then on)."""
        self._beats.set(f"who/{self.rank}", f"pid {os.getpid()} on {socket.gethostname()}")
        self._beat(0)
        if self.rank == 0:
            self._await_peers()
        self._thread.start()

    def _await_peers(self) -> None:
        keys = [f"beat/{peer}" for peer in range(1, self.world)]
        try:
            self._beats.wait(keys, timedelta(seconds=self.heartbeat_timeout_s))
        except dist.DistStoreError:
            missing = [peer for peer in range(1, self.world) if not self._beats.check([f"beat/{peer}"])]
            raise RuntimeError(f"rank(s) {missing} did not start within {self.heartbeat_timeout_s:.0f} s "
                               "of the rendezvous") from None

    def close(self) -> None:
        """Stop watching (every rank, after the run's last collective): this rank's heartbeat
        becomes ``done`` so rank 0 does not take the end of the run for a death (unless this rank
        failed: then its silence must count)."""
        self._closing.set()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.heartbeat_timeout_s)
        if self._reported:
            return
        try:
            self._beats.set(f"beat/{self.rank}", "done")
        except Exception:  # noqa: BLE001 - rank 0 may already be gone after a clean end
            pass

    def fail(self, error: BaseException) -> None:
        """This rank's main thread failed with ``error``: make every other rank stop.

        A failed collective is most likely the echo of another rank's death, so first give the
        verdict about that rank time to arrive (then this process ends with it); only if none
        arrives does this rank post its own failure.
        """
        if is_communication_error(error):
            deadline = time.monotonic() + self.heartbeat_timeout_s + 3 * self.interval
            while time.monotonic() < deadline and not self._stop.is_set():
                if self._verdict(self._reports) is not None:
                    self._thread.join(timeout=3 * self.interval)  # the watchdog acts on it
                    break
                time.sleep(self.interval / 2)
            message = (f"rank {self.rank}: a collective failed and no rank was found dead or failed "
                       f"within {self.heartbeat_timeout_s:.0f} s (a rank stuck past "
                       f"distributed.timeout_s?): {error}")
        else:
            message = f"rank {self.rank} failed at step {self.step}: {type(error).__name__}: {error}"
        self._reported = True
        try:
            self._reports.compare_set(REASON, "", message)
        except Exception as store_error:  # noqa: BLE001 - the store's host may be the failure
            log.error("could not tell the other ranks (%s): %s", self._address, store_error)

    def _beat(self, sequence: int) -> None:
        self._beats.set(f"beat/{self.rank}", f"{sequence} {self.step}")

    @staticmethod
    def _verdict(store: dist.Store) -> str | None:
        return store.get(REASON).decode() if store.check([REASON]) else None

    def _run(self) -> None:
        last_seen: dict[int, tuple[bytes, float]] = {}
        sequence = 0
        while not self._stop.wait(self.interval):
            try:
                sequence += 1
                self._beat(sequence)
                verdict = self._verdict(self._beats)
                if verdict is None and self.rank == 0 and not self._closing.is_set():
                    verdict = self._check_peers(last_seen)
            except Exception as error:  # noqa: BLE001 - any store failure means rank 0 is unreachable
                if self._closing.is_set():
                    return
                verdict = (f"rank {self.rank} lost contact with rank 0, which hosts the rendezvous store "
                           f"at {self._address} ({error}): rank 0 or its node died, or the network failed")
            if verdict is not None:
                if self._reported:  # this rank's own failure: its main thread reports and exits
                    return
                self._stop.set()
                log.error("stopping rank %d: %s", self.rank, verdict)
                self._on_abort(verdict)
                return

    def _check_peers(self, last_seen: dict[int, tuple[bytes, float]]) -> str | None:
        """Rank 0: the verdict about the first rank silent for ``heartbeat_timeout_s``, if any."""
        now = time.monotonic()
        peers = [peer for peer in range(self.world) if peer != self.rank]
        beats = self._beats.multi_get([f"beat/{peer}" for peer in peers]) if peers else []
        for peer, beat in zip(peers, beats):
            if beat == b"done":
                continue
            previous = last_seen.get(peer)
            if previous is None or previous[0] != beat:
                last_seen[peer] = (beat, now)
                continue
            silent = now - previous[1]
            if silent > self.heartbeat_timeout_s:
                who = self._beats.get(f"who/{peer}").decode()
                step = beat.decode().split()[-1]
                message = (f"rank {peer} ({who}) has sent no heartbeat for {silent:.0f} s, last at "
                           f"step {step}: it died (killed, out of memory, node lost) or froze")
                return self._beats.compare_set(REASON, "", message).decode()
        return None


def inject_fault(kind: str, rank: int, step: int) -> None:
    """The fire drill: make this rank fail the way ``kind`` says, as a real failure would."""
    log.warning("fire drill: rank %d %s at step %d", rank, kind, step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "raise":
        raise FireDrill(f"fire drill: rank {rank} raised at step {step}")
    elif kind == "hang":
        threading.Event().wait()
    else:
        raise ValueError(f"unknown fault {kind!r}; expected one of {', '.join(FAULTS)}")
