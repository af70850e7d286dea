"""Logging of the command-line entry points and of launched ranks: one format everywhere, dated
because cron and systemd logs of retraining cycles are appended to for days; and
:func:`output_to`, which sends a stretch of a command's output to a file instead of the terminal
(the demo's per-step logs)."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import sys
import warnings
from pathlib import Path
from typing import Iterator, TextIO

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


_child_output: TextIO | None = None


def child_output() -> TextIO | None:
    """The file that processes this one launches (the ``deepspeed`` launcher of
    :mod:`trainer.launcher`, ``spark-submit`` of :mod:`features.submit`) write to while
    :func:`output_to` holds one; None: this process's own streams."""
    return _child_output


def _stream_handlers() -> list[logging.StreamHandler]:
    """Every handler of the logging tree whose stream can be pointed elsewhere: not a file
    handler (its own file), nor one whose stream is a property (``logging``'s last-resort kind,
    which dill installs: it always writes to the current ``sys.stderr``)."""
    loggers = [logging.getLogger(), *(entry for entry in logging.Logger.manager.loggerDict.values()
                                      if isinstance(entry, logging.Logger))]
    return [handler for logger in loggers for handler in logger.handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
            and not isinstance(getattr(type(handler), "stream", None), property)]


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """``warnings.showwarning`` that hands the warning to logging, as ``logging.captureWarnings``
    does (without its process-wide switch, which could not be put back as it was)."""
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning("%s", text)


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[TextIO]:
    """For the block, send to the file ``path`` (replaced; its folder created) instead of the
    terminal: the log records of every handler that writes to stdout or stderr (their formats and
    filters kept), Python warnings (as log records of ``py.warnings``), whatever is printed to
    ``sys.stdout``, and the output of the processes launched meanwhile (:func:`child_output`).

    ``sys.stderr`` itself stays the terminal's, so progress bars still show. A handler that a
    library adds on stdout during the block (DeepSpeed's, as it loads) writes to the file until
    the block ends and to this process's stdout after it. Not reentrant, and for the main thread:
    the streams it swaps are the whole process's."""
    global _child_output
    path.parent.mkdir(parents=True, exist_ok=True)
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    stdout = sys.stdout
    # Line-buffered, so the file can be followed while the step runs.
    with path.open("w", buffering=1) as sink, warnings.catch_warnings():
        moved = {handler: handler.stream for handler in _stream_handlers()
                 if any(handler.stream is stream for stream in terminal)}
        for handler in moved:
            handler.setStream(sink)
        warnings.showwarning = _log_warning
        _child_output = sink
        try:
            with contextlib.redirect_stdout(sink):
                yield sink
        finally:
            _child_output = None
            for handler in _stream_handlers():
                if handler.stream is sink:
                    handler.setStream(moved.get(handler, stdout))
