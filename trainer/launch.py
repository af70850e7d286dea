"""``sirenfeed train``: start the real ``deepspeed`` launcher on ``trainer/train.py``.

``sirenfeed train --features FEATURES_DIR --run RUN_DIR [--nproc 2] [--config FILE] [key=value ...]``
runs, and prints first::

    <venv>/bin/deepspeed --num_gpus N --master_port PORT <repo>/trainer/train.py \\
        --config FILE key=value ... features=FEATURES_DIR run=RUN_DIR

On a CPU-only machine ``--num_gpus N`` starts N local ranks (gloo). Every rank gets
``OMP_NUM_THREADS=1`` (unless set), the repository on ``PYTHONPATH`` and ``TORCH_EXTENSIONS_DIR``
(default ``<venv>/torch_extensions``, where DeepSpeed's CPU op was built once). The launcher's
output streams through; its exit code is the command's.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Sequence

from features.config import add_config_arguments, config_from_args
from trainer.config import TrainConfig

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "trainer" / "train.py"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def deepspeed_command(script: Path, nproc: int, master_port: int, config_file: str | None,
                      overrides: Sequence[str]) -> list[str]:
    """The launcher command line for ``nproc`` local ranks running ``script``."""
    launcher = Path(sys.prefix) / "bin" / "deepspeed"
    command = [str(launcher), "--num_gpus", str(nproc), "--master_port", str(master_port), str(script)]
    if config_file:
        command += ["--config", str(config_file)]
    return command + list(overrides)


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every rank needs, on top of ``base`` (default: this process's)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_deepspeed(script: Path, nproc: int, config_file: str | None, overrides: Sequence[str]) -> int:
    """Run the launcher in the foreground, output streaming; returns its exit code."""
    command = deepspeed_command(script, nproc, free_port(), config_file, overrides)
    log.info("running: %s", shlex.join(command))
    return subprocess.run(command, env=launch_env(), check=False).returncode


def configure_logging(rank: int) -> None:
    """Logging inside a launched rank: rank 0 at INFO, the others at WARNING, each line tagged with
    the rank. DeepSpeed's and Petastorm's chatter (INFO lines, Petastorm's pyarrow deprecation
    warnings on every reader it opens) is held back so our progress lines stay readable."""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
    for noisy in ("DeepSpeed", "petastorm"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="sirenfeed train", description="Train the ranker on local ranks through the deepspeed launcher.")
    parser.add_argument("--features", help="feature dataset directory (config key features)")
    parser.add_argument("--run", help="run directory (config key run)")
    parser.add_argument("--nproc", type=int, default=2, help="local ranks (default 2)")
    parser.add_argument("--resume-from", metavar="latest|RUN_DIR",
                        help="warm start: continue this checkpoint on the newer feature batches only "
                             "(trainer.continual; 'latest' = RUN_DIR's own)")
    parser.add_argument("--since-watermark", default="auto", metavar="auto|BATCH",
                        help="with --resume-from: the feature batch the checkpoint was trained "
                             "through (auto: from its client state)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error("--nproc must be >= 1")
    # Fail on a bad config here, before the launcher starts N processes that would all fail.
    config = config_from_args(TrainConfig, args, features=args.features, run=args.run)
    if args.resume_from:
        from trainer import continual  # warm starts build on this module

        continual.check_continual(config)
        return continual.launch(config.features, config.run, args.resume_from, args.since_watermark,
                                args.nproc, args.config, list(args.overrides))
    overrides = list(args.overrides)
    overrides += [f"{key}={value}" for key, value in (("features", args.features), ("run", args.run))
                  if value is not None]
    return run_deepspeed(TRAIN_SCRIPT, args.nproc, args.config, overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
