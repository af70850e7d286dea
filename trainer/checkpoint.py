"""Checkpoints: DeepSpeed's save under ``RUN_DIR/checkpoints/<tag>/``, published only when complete,
resumable on any world size.

Layout of one checkpoint (``tag = step00001234``)::

    checkpoints/step00001234/        DeepSpeed's files (model states, ZeRO optimizer shards) …
    checkpoints/step00001234/rng_rank00000.pt   each rank's RNG states (dropout continues exactly)
    checkpoints/step00001234/tables/            the sharded id tables and their fused optimizer
                                                state (trainer.embeddings; every rank its shards)
    checkpoints/step00001234/_COMPLETE          written by rank 0 after every rank finished saving:
                                                {"step", "world", "data", "spec"}: the data position
                                                and the feature spec (event schema included) the
                                                weights were trained on
    checkpoints/step00001234/universal/         DeepSpeed's universal form, made when first needed
    checkpoints/latest                          the newest complete tag (atomic rewrite)

A directory without ``_COMPLETE`` is a save that crashed midway: resume ignores it and the next
prune removes it. Resume walks complete checkpoints newest first; if any rank fails to load one
(a corrupt file), all ranks agree to fall back to the previous one.

Another event schema. A checkpoint's tables, heads and projections are shaped by its schema, so a
resume or warm start on a dataset of another schema cannot continue it: planning (before anything
is loaded) stops with ``SchemaError`` naming the differing schema keys (the dataset's value first).

Another world size. Without ZeRO partitioning (ZeRO-0 in fp32) DeepSpeed's files hold the whole
optimizer state and load on any number of ranks. With ZeRO-1/2 (or bf16, whose optimizer DeepSpeed
also partitions) each rank saved only its slice of the fp32 weights and Adam moments, which only
the same world size can read back. Resuming such a checkpoint on ``W' ≠ W`` ranks first converts it
(once, on rank 0) with DeepSpeed's ``ds_to_universal`` into the *universal* form, one file per
parameter for its fp32 weights and each optimizer moment, then loads it with
``checkpoint.load_universal``: every rank takes its new slice, so weights, moments, step count and
learning-rate schedule continue exactly. The RNG streams are per rank and cannot be mapped to
another world size: an elastic resume reseeds them from ``(seed, rank, step)`` (only dropout notices).
The sharded tables need no conversion: ``torch.distributed.checkpoint`` records where every shard
sits in its table, and each rank of the new world reads the slices its own plan gives it.

Loading never unpickles code: DeepSpeed calls ``torch.load(..., weights_only=False)``, so loads run
with ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which makes torch's restricted unpickler refuse anything
but tensors, containers and primitives (plus the few plain-data DeepSpeed types listed in
:func:`_safe_globals`).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint import ds_to_universal
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from common.files import atomic_write_text, replace_directory, write_json
from features.schema import EventSchema, require_same_schema
from features.spec import FeatureSpec

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE_MARKER = "_COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"
TAG_PATTERN = re.compile(r"step(\d{8})")
PARTITIONED_FILES = "*zero_pp_rank_*_optim_states.pt"
"""DeepSpeed's per-rank optimizer slices (ZeRO-1/2, and bf16's optimizer)."""


class CheckpointError(RuntimeError):
    """No checkpoint to resume from, or one that cannot continue this run."""


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint, as its marker describes it."""

    tag: str
    step: int
    world: int
    data: dict[str, int]
    spec: dict[str, Any]
    """The feature spec the weights were trained on, as :meth:`FeatureSpec.record` gives it."""
    partitioned: bool
    """Its optimizer state is split over its ranks: another world size needs the universal form."""


@dataclass(frozen=True)
class ResumePlan:
    """The checkpoints a resume may load, newest first, and how: all natively, or all through the
    universal form (decided by the newest: the engine is configured for one way before loading)."""

    candidates: list[Saved]
    universal: bool

    @property
    def newest(self) -> Saved:
        return self.candidates[0]


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


def saved_checkpoints(run_dir: str | Path) -> list[Saved]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    saved = []
    for tag in complete_tags(run_dir):
        try:
            marker = json.loads((root / tag / COMPLETE_MARKER).read_text())
            saved.append(Saved(tag, marker["step"], marker["world"], marker["data"], marker["spec"],
                               any((root / tag).glob(PARTITIONED_FILES))))
        except (KeyError, TypeError, ValueError) as error:
            log.warning("ignoring checkpoint %s/%s: its %s is not one this version writes (%r)",
                        root, tag, COMPLETE_MARKER, error)
    return saved


def plan_resume(run_dir: str | Path, world: int, schema: EventSchema) -> ResumePlan:
    """Which checkpoints a resume on ``world`` ranks can load, and whether through the universal
    form. ``schema`` is the event schema of the data the run continues on: a checkpoint trained on
    another raises ``SchemaError`` naming the differences."""
    saved = saved_checkpoints(run_dir)
    if not saved:
        raise CheckpointError(f"train.resume is set but {checkpoint_root(run_dir)} holds no complete "
                              "checkpoint")
    for checkpoint in reversed(saved):  # newest first: the one a resume would load is named
        require_same_schema(schema, checkpoint.spec["schema"],
                            f"checkpoint {checkpoint_root(run_dir) / checkpoint.tag} (differences: the "
                            "feature dataset's value vs the checkpoint's)")
    universal = saved[-1].partitioned and saved[-1].world != world
    candidates = []
    for checkpoint in reversed(saved):
        if checkpoint.partitioned == universal or (not universal and checkpoint.world == world):
            candidates.append(checkpoint)
        else:
            log.warning("checkpoint %s (written by %d ranks) cannot be loaded the way %s is: skipped",
                        checkpoint.tag, checkpoint.world, saved[-1].tag)
    if universal:
        log.info("checkpoint %s was written by %d ranks with a partitioned optimizer; resuming on %d "
                 "ranks through its universal form", saved[-1].tag, saved[-1].world, world)
    return ResumePlan(candidates, universal)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_file(root: Path, tag: str, rank: int) -> Path:
    return root / tag / f"rng_rank{rank:05d}.pt"


def save(engine, run_dir: str | Path, step: int, client_state: dict[str, Any], data: dict[str, int],
         spec: FeatureSpec, keep: int, tables=None) -> str:
    """Save on every rank (collective); rank 0 marks it complete, moves ``latest`` and prunes.

    ``data`` (the data position) goes into the marker as well as the client state, and ``spec``
    (what the weights were trained on) into the marker, so a resume can plan from the markers alone."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    rank = _rank()
    if rank == 0:  # overwriting a tag (a resumed run passing it again): not complete until rewritten
        (root / tag / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(root / tag / UNIVERSAL, ignore_errors=True)
    dist.barrier()
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    # The info key is what ds_to_universal requires of a checkpoint it converts.
    client_state = {**client_state, "data": data, UNIVERSAL_CHECKPOINT_INFO: universal_info}
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    if tables is not None:
        tables.save(root / tag)
    torch.save({"torch": torch.get_rng_state(), "accelerator": get_accelerator().get_rng_state()},
               _rng_file(root, tag, rank))
    dist.barrier()  # every rank's files are on disk before the checkpoint is declared complete
    if rank == 0:
        marker = {"step": step, "world": _world(), "data": data, "spec": spec.record()}
        # Keys in order (not write_json's sorted ones): the schema's mappings are ordered.
        atomic_write_text(root / tag / COMPLETE_MARKER, json.dumps(marker) + "\n")
        atomic_write_text(root / LATEST, tag + "\n")
        _prune(root, keep)
        log.info("checkpoint %s complete", root / tag)
    dist.barrier()
    return tag


def _prune(root: Path, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones, crashed partial saves and
    leftovers of a crashed universal conversion."""
    tags = complete_tags(root.parent)
    newest = tags[-1]
    for path in root.iterdir():
        if path.name.startswith(".") and f".{UNIVERSAL}." in path.name:
            shutil.rmtree(path, ignore_errors=True)
            continue
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


def to_universal(root: Path, tag: str) -> Path:
    """Write ``<tag>/universal`` (if not there yet) with DeepSpeed's ``ds_to_universal``; staged
    beside the tag (the converter walks its input folder) and renamed into place when complete."""
    target = root / tag / UNIVERSAL
    if (target / COMPLETE_MARKER).is_file():
        return target
    staging = root / f".{tag}.universal.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    # One worker each: the converter's process pools would fork a process running threads.
    args = argparse.Namespace(input_folder=str(root / tag), output_folder=str(staging),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                              strict=True, inject_missing_state=False)
    chatter = io.StringIO()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
        write_json(staging / COMPLETE_MARKER, {"source": tag}, indent=None)
        replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        log.debug("ds_to_universal output:\n%s", chatter.getvalue())
        raise
    log.info("converted checkpoint %s to its universal form", root / tag)
    return target


def _agree(ok: bool) -> bool:
    """Collective: true only if ``ok`` on every rank."""
    flag = torch.tensor([int(ok)], dtype=torch.int64, device=get_accelerator().current_device_name())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1


def _load_one(engine, root: Path, checkpoint: Saved, universal: bool, tables) -> dict[str, Any] | None:
    """Load one checkpoint on this rank; ``None`` if it cannot be read (all ranks must call it)."""
    converted = True
    if universal and _rank() == 0:
        try:
            to_universal(root, checkpoint.tag)
        except Exception as error:  # whatever the failure, this checkpoint cannot continue the run
            log.warning("cannot convert checkpoint %s to its universal form: %s", root / checkpoint.tag,
                        error)
            converted = False
    if universal and not _agree(converted):
        return None
    load_dir, tag = (root / checkpoint.tag, UNIVERSAL) if universal else (root, checkpoint.tag)
    same_world = checkpoint.world == _world()
    client_state = rng = None
    try:
        with weights_only_loads():
            path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
            rng = (torch.load(_rng_file(root, checkpoint.tag, _rank()), weights_only=True)
                   if same_world else None)
        if path is None:
            log.warning("DeepSpeed found no checkpoint in %s", load_dir / tag)
            client_state = None
    except Exception as error:  # whatever the failure, this checkpoint cannot continue the run
        log.warning("cannot load checkpoint %s: %s", root / checkpoint.tag, error)
        client_state = None
    if tables is not None:
        # Reading the tables is a collective: only when every rank has the dense part.
        if not _agree(client_state is not None):
            return None
        try:
            tables.load(root / checkpoint.tag)
        except Exception as error:  # the same on every rank: the loader shares its failures
            log.warning("cannot load the id tables of checkpoint %s: %s", root / checkpoint.tag, error)
            return None
    if client_state is None:
        return None
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        get_accelerator().set_rng_state(rng["accelerator"])
    return client_state


def load(engine, run_dir: str | Path, plan: ResumePlan, tables=None) -> tuple[Saved, dict[str, Any]]:
    """Load the newest planned checkpoint every rank can read; returns it and its client state.
    RNG states are restored only when the world size is unchanged (the caller reseeds otherwise)."""
    root = checkpoint_root(run_dir)
    for checkpoint in plan.candidates:
        client_state = _load_one(engine, root, checkpoint, plan.universal, tables)
        if _agree(client_state is not None):
            log.info("resumed from checkpoint %s (step %d, written by %d ranks)", root / checkpoint.tag,
                     checkpoint.step, checkpoint.world)
            return checkpoint, client_state
        log.warning("checkpoint %s is unreadable on some rank: falling back to the previous one",
                    checkpoint.tag)
    raise CheckpointError(f"no checkpoint in {root} could be loaded by every rank")


def load_latest(engine, run_dir: str | Path, schema: EventSchema, tables=None) -> tuple[str, dict[str, Any]]:
    """Load ``run_dir``'s newest complete checkpoint natively (a warm start from another run);
    returns ``(tag, client_state)``. ``schema``: the event schema of the data it continues on
    (another one is a ``SchemaError``, :func:`plan_resume`). One written by another world size with a
    partitioned optimizer needs its universal form, which only a resume (``train.resume``) sets up."""
    plan = plan_resume(run_dir, _world(), schema)
    if plan.universal:
        raise CheckpointError(
            f"{checkpoint_root(run_dir) / plan.newest.tag} was written by {plan.newest.world} ranks with a "
            f"partitioned optimizer (ZeRO-1/2 or bf16): continue it on {plan.newest.world} ranks, or "
            "resume it with train.resume=true, which converts it to its universal form")
    saved, client_state = load(engine, run_dir, plan, tables)
    return saved.tag, client_state
