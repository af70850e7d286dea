"""Logging of the command-line entry points and of launched ranks: one format everywhere, dated
because cron and systemd logs of retraining cycles are appended to for days."""

from __future__ import annotations

import datetime as dt
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging for a command (a no-op when the ``sirenfeed`` dispatcher has configured it)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # it logs every connection at INFO


def configure_rank_logging(rank: int) -> None:
    """Logging inside a launched rank: rank 0 at INFO, the others at WARNING, each line tagged with
    the rank. DeepSpeed's and Petastorm's INFO chatter is held back so our progress lines stay
    readable."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
                        datefmt=DATE_FORMAT, force=True)
    for noisy in ("DeepSpeed", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def utc_text(ms: int | None) -> str:
    """An epoch-millisecond time as ISO-8601 UTC text for logs and summaries ("none" if unknown)."""
    if ms is None:
        return "none"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")
