"""Starting torch.distributed through DeepSpeed without leaking its CPU shared-memory buffers, and
leaving a rank's process without the interpreter's finalization.

On CPU nodes whose ranks are all local, DeepSpeed's ``shm_comm`` op creates one POSIX shared
memory segment per rank at init, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``
(about 70 MB each), and never unlinks it. Every run would leave its segments behind in the tmpfs,
which is RAM: a few dozen runs (a test suite, a day of hourly retraining) fill memory until the
OOM killer or a full ``/dev/shm`` stops something unrelated. Once every rank has mapped its peers'
segments the names are no longer needed, so each rank unlinks its own right after init; the
mappings stay valid until the processes exit, and a run killed later leaves nothing behind.
:func:`remove_leftover_segments` sweeps the names of a run that died before that point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

log = logging.getLogger(__name__)

SHM_ROOT = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer"


def segment_name(addr: str, port: str | int, rank: int) -> str:
    """The name DeepSpeed's ``shm_comm`` gives rank ``rank``'s buffer (see its ``shm.cpp``)."""
    return f"{SHM_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """``deepspeed.init_distributed`` plus the release of this rank's shared-memory segment name."""
    import deepspeed
    import torch.distributed as dist

    kwargs = {"dist_backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(**kwargs)
    if _uses_shared_memory(dist.get_world_size()):  # the same answer on every rank, so all or none enter the barrier
        dist.barrier()  # every peer has mapped this rank's segment once it is past init
        segment = SHM_ROOT / segment_name(os.environ.get("MASTER_ADDR", ""),
                                          os.environ.get("MASTER_PORT", ""), dist.get_rank())
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()


def _uses_shared_memory(world: int) -> bool:
    """Whether DeepSpeed set up ``shm_comm`` segments: its op is loaded and all ranks are local."""
    from deepspeed.comm import comm

    local_size = os.environ.get("LOCAL_SIZE", "")
    return (getattr(comm.cdb, "shm_comm_op", None) is not None and local_size.isdigit()
            and int(local_size) == world)


def remove_leftover_segments(port: int) -> int:
    """Unlink the segments of a run on ``port`` that died before its ranks released them; returns
    how many there were."""
    leftovers = list(SHM_ROOT.glob(f"{SHM_PREFIX}_{os.getuid()}_*_{port}_*")) if SHM_ROOT.is_dir() else []
    for segment in leftovers:
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
    if leftovers:
        log.info("removed %d shared-memory segment(s) left by ranks that did not finish init", len(leftovers))
    return len(leftovers)


def exit_rank(code: int) -> NoReturn:
    """Flush the logs and standard streams and end this rank's process with ``code`` at once.

    A rank never returns to the interpreter's finalization: a gloo worker thread can still be
    releasing a finished collective (``AsyncGatherWork`` and its tensors, which hold Python
    objects) while the main thread finalizes, and its GIL acquire then aborts the process
    ("terminate called without an active exception", SIGABRT) after all its work is done. Every
    output a rank writes is complete (atomic renames, closed files) before this is called, and a
    healthy rank has destroyed its process group first, so skipping finalization loses nothing.
    """
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
