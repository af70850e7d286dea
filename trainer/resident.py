"""One rank of the long-lived trainer of the continuous pipeline: ranks that stay up between cycles.

    deepspeed trainer/resident.py --config BASE.yaml --inbox INBOX

``sirenfeed train --continuous`` (:mod:`lifecycle.resident`) starts this once, through the same
``deepspeed`` launcher as any training, and sends it one request per cycle
(:class:`common.resident.Inbox`): ``{"config": SEGMENT.yaml, "resume_from": RUN}``. Every rank then
trains that warm-start segment exactly as :mod:`trainer.warm_start` would in a fresh launch (a new
:class:`~trainer.warm_start.WarmStartTrainer` on the segment's own config, view and run directory),
and rank 0 answers once the segment's checkpoint and export are complete. What a segment reuses is
what a launch costs: the interpreters with torch, DeepSpeed and TorchRec imported, the process group
and its rendezvous, the watchdog; weights, optimizer state and data always come from the files.

Rank 0 reads the inbox and broadcasts each request (or that there is none yet) every
:data:`IDLE_POLL_S` seconds, so all ranks take the same requests in the same order. The watchdog
(:mod:`trainer.watchdog`) runs for the ranks' whole life, idle time included: a rank that dies or
fails, in a segment or between them, ends every rank at once, the launcher exits non-zero, and the
owner sees the worker gone (:class:`common.resident.WorkerDied`) and starts a new one. ``BASE.yaml``
gives only what the ranks need before any segment: the communication backend, timeouts and heartbeat.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from common.config import add_config_arguments, config_from_args, load_config
from common.logs import configure_rank_logging
from common.repo import REPO_ROOT
from common.resident import Inbox, is_stop
from trainer.config import TrainConfig
from trainer.distributed import exit_rank
from trainer.train import start_distributed
from trainer.warm_start import WarmStartTrainer, check_continual
from trainer.watchdog import Watchdog, die_with_parent

log = logging.getLogger(__name__)

RESIDENT_RANK_SCRIPT = REPO_ROOT / "trainer" / "resident.py"
IDLE_POLL_S = 0.1
"""How often idle ranks look for a request (one small broadcast each time)."""


def train_segment(request: dict[str, Any], watchdog: Watchdog) -> None:
    """One warm-start segment, on every rank (the same as a fresh launch of :mod:`trainer.warm_start`)."""
    config = load_config(TrainConfig, Path(request["config"]), [])
    check_continual(config)
    trainer = WarmStartTrainer(config, watchdog=watchdog)
    try:
        trainer.warm_start(request["resume_from"])
        trainer.fit()
    finally:
        trainer.close()


def serve(inbox: Inbox | None, watchdog: Watchdog) -> None:
    """Take the requests rank 0 reads from ``inbox`` until the stop request, on every rank."""
    while True:
        request = [inbox.poll() if inbox is not None else None]
        dist.broadcast_object_list(request, src=0)
        if request[0] is None:
            time.sleep(IDLE_POLL_S)
            continue
        if is_stop(request[0]):
            return
        started = time.monotonic()
        train_segment(request[0], watchdog)
        if inbox is not None:
            inbox.answer({"trained": request[0]["config"], "seconds": round(time.monotonic() - started, 3)})


def rank_main(argv: list[str]) -> NoReturn:
    parser = argparse.ArgumentParser(prog="trainer/resident.py")
    parser.add_argument("--inbox", required=True, help="the request folder its owner writes to")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    die_with_parent()
    try:
        start_distributed(config)
        rank = dist.get_rank()
        configure_rank_logging(rank)
        # The idle broadcasts run on the rank's device (NCCL needs it set before a collective).
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        watchdog = Watchdog.from_environment(config.distributed.heartbeat_timeout_s)
        watchdog.start()
        log.info("resident trainer up on %d ranks; waiting for segments in %s", dist.get_world_size(), args.inbox)
        serve(Inbox(Path(args.inbox)) if rank == 0 else None, watchdog)
        watchdog.close()
    except Exception:
        # No destroy_process_group: with a peer gone it can hang instead of returning.
        log.exception("rank %s failed", os.environ.get("RANK", "?"))
        exit_rank(1)
    dist.destroy_process_group()
    exit_rank(0)


if __name__ == "__main__":
    configure_rank_logging(int(os.environ.get("RANK", "0")))
    sys.exit(rank_main(sys.argv[1:]))
