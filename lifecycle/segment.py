"""``sirenfeed train --resume-from latest|SOURCE_RUN [--since-watermark auto|K]``: build the
warm-start view (:mod:`lifecycle.view`) of the batches after a checkpoint's data watermark, then
launch the warm-start segment (:mod:`trainer.warm_start`) on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from common.config import add_config_arguments, config_from_args
from lifecycle.view import NothingNew, build_view
from trainer.config import TrainConfig
from trainer.launcher import run_with_config
from trainer.warm_start import WARM_START_SCRIPT, check_continual, checkpoint_data_watermark

log = logging.getLogger(__name__)

NOTHING_NEW_EXIT = 4
"""Exit code of ``sirenfeed train --resume-from`` when no batch is newer than the watermark."""


def launch(config: TrainConfig, resume_from: str, since: str, nproc: int) -> int:
    """Build the view of ``config.features``' batches after the checkpoint's, then launch the
    warm-start segment on it into ``config.run``.

    Returns the launcher's exit code, or :data:`NOTHING_NEW_EXIT` when there is nothing to train on."""
    source = config.run if resume_from == "latest" else resume_from
    since_batch = int(checkpoint_data_watermark(source)["batch"]) if since == "auto" else int(since)
    view = Path(config.run) / "views" / f"since-{since_batch:06d}"
    try:
        manifest = build_view(config.features, since_batch, view)
    except NothingNew as error:
        log.info("%s", error)
        return NOTHING_NEW_EXIT
    log.info("training on batches %d..%d through %s", since_batch, manifest["data_watermark"]["batch"], view)
    segment = dataclasses.replace(config, features=str(view))
    return run_with_config(WARM_START_SCRIPT, nproc, segment, ["--resume-from", source])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sirenfeed train --resume-from",
        description="Warm start: continue a checkpoint on the feature batches it has not seen, on "
                    "this node's ranks.")
    parser.add_argument("--resume-from", required=True, metavar="latest|RUN_DIR",
                        help="the checkpoint to continue ('latest' = RUN_DIR's own)")
    parser.add_argument("--since-watermark", default="auto", metavar="auto|BATCH",
                        help="the feature batch the checkpoint was trained through (auto: from its "
                             "client state)")
    parser.add_argument("--features", help="feature dataset directory (config key features)")
    parser.add_argument("--run", help="run directory (config key run)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    # Fail on a bad config here, before the launcher starts N processes that would all fail.
    config = config_from_args(TrainConfig, args, features=_absolute(args.features), run=_absolute(args.run))
    check_continual(config)
    return launch(config, args.resume_from, args.since_watermark, args.nproc)


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (the ranks run elsewhere); URIs and ``None`` as they are."""
    return path if path is None or "://" in path else str(Path(path).expanduser().resolve())
