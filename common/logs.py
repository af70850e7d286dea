"""Logging of the command-line entry points and of launched ranks: one format everywhere, dated
because cron and systemd logs of retraining cycles are appended to for days."""

from __future__ import annotations

import datetime as dt
import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def _named_or_serious(record: logging.LogRecord) -> bool:
    """Our code logs through named loggers; INFO lines on the root logger itself come from
    libraries (FBGEMM logs every table's kernel arguments that way), and only their warnings count."""
    return record.name != "root" or record.levelno >= logging.WARNING


def _hold_back_library_chatter() -> None:
    for handler in logging.getLogger().handlers:
        if _named_or_serious not in handler.filters:
            handler.addFilter(_named_or_serious)
    for noisy in ("DeepSpeed", "petastorm", "torchrec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TorchRec asks torch.fx whether it is tracing on every lookup, and torch warns about the API.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging for a command (a no-op when the ``sirenfeed`` dispatcher has configured it)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # it logs every connection at INFO
    _hold_back_library_chatter()


def configure_rank_logging(rank: int) -> None:
    """Logging inside a launched rank: rank 0 at INFO, the others at WARNING, each line tagged with
    the rank. DeepSpeed's, Petastorm's, TorchRec's and FBGEMM's INFO chatter is held back so our
    progress lines stay readable."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
                        datefmt=DATE_FORMAT, force=True)
    _hold_back_library_chatter()


def utc_text(ms: int | None) -> str:
    """An epoch-millisecond time as ISO-8601 UTC text for logs and summaries ("none" if unknown)."""
    if ms is None:
        return "none"
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).isoformat(timespec="seconds")
