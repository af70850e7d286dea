"""Logging of the command-line entry points: one format everywhere, dated because cron and systemd
logs of retraining cycles are appended to for days."""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def configure_logging(level: int = logging.INFO) -> None:
    """Root logging for a command (a no-op when the ``sirenfeed`` dispatcher has configured it)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # it logs every connection at INFO
