"""Checkpoints: DeepSpeed's save under ``RUN_DIR/checkpoints/<tag>/``, published only when complete.

Layout of one checkpoint (``tag = step00001234``)::

    checkpoints/step00001234/        DeepSpeed's files (model states, ZeRO optimizer shards) …
    checkpoints/step00001234/rng_rank00000.pt   each rank's RNG states (dropout continues exactly)
    checkpoints/step00001234/_COMPLETE          written by rank 0 after every rank finished saving
    checkpoints/latest                          the newest complete tag (atomic rewrite)

A directory without ``_COMPLETE`` is a save that crashed midway: resume ignores it and the next
prune removes it. Resume walks complete checkpoints newest first; if any rank fails to load one
(a corrupt file), all ranks agree to fall back to the previous one.

Loading never unpickles code: DeepSpeed calls ``torch.load(..., weights_only=False)``, so loads run
with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which makes torch's restricted unpickler refuse anything
but tensors, containers and primitives (plus the few plain-data DeepSpeed types listed in
:func:`_safe_globals`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from features.dataset import atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "_COMPLETE"
LATEST = "latest"
TAG_PATTERN = re.compile(r"step(\d{8})")


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or one that cannot continue this run."""


def _safe_globals() -> list[Any]:
    """The plain-data DeepSpeed types its ZeRO optimizer shards pickle besides tensors: an enum,
    a dataclass of two ints and the (static) loss scaler. Instances get their fields set; no
    function named by the file is ever called."""
    return [ZeroStageEnum, LossScaler, fragment_address]


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def complete_tags(run_dir: str | Path) -> list[str]:
    """Complete checkpoint tags, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    tags = [path.name for path in root.iterdir()
            if TAG_PATTERN.fullmatch(path.name) and (path / COMPLETE_MARKER).is_file()]
    return sorted(tags)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _rng_file(root: Path, tag: str, rank: int) -> Path:
    return root / tag / f"rng_rank{rank:05d}.pt"


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], keep: int) -> str:
    """Save on every rank (collective); rank 0 marks it complete, moves ``latest`` and prunes."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    rank = _rank()
    if rank == 0:  # overwriting a tag (a resumed run passing it again): not complete until rewritten
        (root / tag / COMPLETE_MARKER).unlink(missing_ok=True)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()},
               _rng_file(root, tag, rank))
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        atomic_write_text(root / tag / COMPLETE_MARKER, json.dumps({"step": step}) + "\n")
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep)
        log.info("checkpoint %s complete", root / tag)
    dist.barrier()
    return tag


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and crashed partial saves."""
    tags = complete_tags(root.parent)
    newest = tags[-1]
    for path in root.iterdir():
        if not TAG_PATTERN.fullmatch(path.name):
            continue
        complete = (path / COMPLETE_MARKER).is_file()
        if (complete and path.name not in tags[-keep:]) or (not complete and path.name < newest):
            shutil.rmtree(path)
            log.info("removed checkpoint %s", path)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``torch.load`` to its safe unpickler for the duration (DeepSpeed passes
    ``weights_only=False``)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def _load_one(engine, root: Path, tag: str) -> dict[str, Any] | None:
    try:
        with weights_only_loads():
            path, client_state = engine.load_checkpoint(str(root), tag=tag)
            rng = torch.load(_rng_file(root, tag, _rank()), weights_only=True)
    except Exception as error:  # whatever the failure, this checkpoint cannot continue the run
        log.warning("cannot load checkpoint %s: %s", root / tag, error)
        return None
    if path is None:
        log.warning("DeepSpeed found no checkpoint in %s", root / tag)
        return None
    torch.set_rng_state(rng["torch"])
    get_accelerator().set_rng_state(rng["accelerator"])
    return client_state


def load_latest(engine, run_dir: str | Path) -> tuple[str, dict[str, Any]]:
    """Load the newest complete checkpoint every rank can read; returns ``(tag, client_state)``."""
    root = checkpoint_root(run_dir)
    tags = complete_tags(run_dir)
    if not tags:
        raise CheckpointError(f"train.resume is set but {root} holds no complete checkpoint")
    for tag in reversed(tags):
        client_state = _load_one(engine, root, tag)
        loaded = torch.tensor([0 if client_state is None else 1], dtype=torch.int64,
                              device=get_accelerator().current_device_name())
        dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
        if loaded.item() == 1:
            log.info("resumed from checkpoint %s (step %d)", root / tag, client_state["step"])
            return tag, client_state
        log.warning("checkpoint %s is unreadable on some rank: falling back to the previous one", tag)
    raise CheckpointError(f"no checkpoint in {root} could be loaded by every rank")
