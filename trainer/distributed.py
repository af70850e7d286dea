"""Starting torch.distributed through DeepSpeed without leaking its CPU shared-memory buffers.

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
from datetime import timedelta
from pathlib import Path

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
