"""Warm-start (continual) training on the feature batches added since a checkpoint's data watermark.

``sirenfeed train --features FEATURES_DIR --run RUN_DIR --resume-from latest|SOURCE_RUN
[--since-watermark auto|K]`` trains only on what the checkpoint has not seen, continuing its
weights, optimizer state, LR schedule position and step count (on any world size the checkpoint
allows: ZeRO stage 0 keeps the optimizer state whole). ``latest`` continues ``RUN_DIR`` itself.

Data watermark. Every checkpoint records ``data_watermark = {batch, watermark_ms}``: the newest
feature batch (:mod:`features.incremental`) of the data it was trained on. Selecting by batch
rather than by event time is what makes late events safe: a late event lives in a newer batch
although its time is older. A batch's ``eval`` part is its held-out slice, so a model trained
through batch ``b`` has seen the train parts of batches ``≤ b`` and the eval parts of batches
``< b``. The next segment trains on the train parts of batches ``(b, n]`` and the eval parts of
``[b, n)`` and is evaluated on the eval part of ``n``, the freshest slice: across the segments of
the accepted lineage every event is trained on exactly once (a segment of ``train.epochs=1``,
``train.steps=0`` trains each row of its view once, :mod:`trainer.data`; a refused segment's
batches are trained again by the next one, which starts from the last accepted checkpoint).

The selection is materialised as a *view*: an ordinary feature dataset directory whose files are
hard links (symbolic links across filesystems) to the selected batch files, with a manifest that
carries the new data watermark. The unchanged trainer reads it; nothing is copied.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.config import add_config_arguments, config_from_args, require
from features.dataset import local_path, replace_directory, write_manifest
from trainer import checkpoint
from trainer.config import TrainConfig
from trainer.data import parquet_files, read_feature_manifest
from trainer.launch import REPO_ROOT, configure_logging, run_deepspeed
from trainer.train import Trainer

log = logging.getLogger(__name__)

CONTINUAL_SCRIPT = REPO_ROOT / "trainer" / "warm_start.py"
SPLITS = ("train", "eval")


class NothingNew(RuntimeError):
    """No feature batch newer than the data watermark (or none with a held-out slice yet)."""


def batches(features_dir: str | Path) -> list[dict[str, Any]]:
    """The dataset's batches, oldest first; a dataset never appended to is one batch (index 0)."""
    manifest, _ = read_feature_manifest(features_dir)
    if manifest.get("batches"):
        return manifest["batches"]
    root = local_path(features_dir)
    files = {split: [str(path.relative_to(root)) for path in parquet_files(root / split)]
             for split in SPLITS}
    return [{"index": 0, "name": "b000000", "watermark_ms": manifest["watermark_ms"],
             "max_event_ms": manifest["watermark_ms"], "files": files}]


def select(features_dir: str | Path, since_batch: int) -> dict[str, Any]:
    """The files a segment after batch ``since_batch`` trains and evaluates on."""
    catalog = batches(features_dir)
    newer = [entry for entry in catalog if entry["index"] > since_batch]
    if not newer:
        raise NothingNew(f"{features_dir} has no batch after {since_batch}")
    newest = newer[-1]
    if not newest["files"]["eval"]:
        raise NothingNew(f"batch {newest['index']} of {features_dir} holds no held-out rows yet")
    train = [path for entry in newer for path in entry["files"]["train"]]
    train += [path for entry in catalog if since_batch <= entry["index"] < newest["index"]
              for path in entry["files"]["eval"]]
    if not train:
        raise NothingNew(f"nothing to train on after batch {since_batch} of {features_dir}")
    # Newest event time the model will have been trained on: all of the batches before the newest
    # (from the watermark batch on), and the newest one's train part (events before its split).
    max_event_ms = max([entry.get("max_event_ms") or 0 for entry in catalog
                        if since_batch <= entry["index"] < newest["index"]] +
                       ([min(newest["max_event_ms"], newest["split_ts_ms"] - 1)]
                        if newest["files"]["train"] else []))
    return {"since": since_batch, "batch": newest["index"], "watermark_ms": newest["watermark_ms"],
            "train": train, "eval": list(newest["files"]["eval"]), "max_event_ms": max_event_ms}


def build_view(features_dir: str | Path, since_batch: int, view_dir: str | Path) -> dict[str, Any]:
    """Materialise :func:`select` as a feature dataset at ``view_dir``; returns its manifest. A view
    already there is replaced whole (:func:`features.dataset.replace_directory`).

    Raises :class:`NothingNew` when there is nothing to train on."""
    selection = select(features_dir, since_batch)
    manifest, _ = read_feature_manifest(features_dir)
    source, view = local_path(features_dir), Path(view_dir)
    view.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the view and swapped in complete, so a crash leaves the previous view readable.
    staging = Path(tempfile.mkdtemp(prefix=f".{view.name}.staging-", dir=view.parent))
    try:
        view_manifest = _link_view(source, manifest, selection, since_batch, staging)
        replace_directory(staging, view)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return view_manifest


def _link_view(source: Path, manifest: dict[str, Any], selection: dict[str, Any], since_batch: int,
               view: Path) -> dict[str, Any]:
    """Link the selected files of ``source`` into the empty directory ``view`` and write its manifest."""
    for split in SPLITS:
        for index, relative in enumerate(selection[split]):
            # train/date=D/<file> of any batch (eval parts included) keeps its date partition.
            target = view / split / Path(relative).parent.name / f"{index:05d}-{Path(relative).name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source / relative, target)
            except OSError:
                os.symlink((source / relative).resolve(), target)
    view_manifest = {
        "dataset": manifest.get("dataset"), "feature_spec_version": manifest["feature_spec_version"],
        "spec": manifest["spec"], "source": str(source), "watermark_ms": selection["watermark_ms"],
        "split_ts_ms": manifest.get("split_ts_ms"), "max_event_ms": selection["max_event_ms"],
        "data_watermark": {"batch": selection["batch"], "watermark_ms": selection["watermark_ms"]},
        "since_batch": since_batch, "files": {split: selection[split] for split in SPLITS},
    }
    write_manifest(view, view_manifest)
    return view_manifest


def checkpoint_data_watermark(run_dir: str | Path) -> dict[str, Any]:
    """The ``data_watermark`` in the client state of ``run_dir``'s newest complete checkpoint."""
    tags = checkpoint.complete_tags(run_dir)
    if not tags:
        raise checkpoint.CheckpointError(f"{checkpoint.checkpoint_root(run_dir)} holds no complete checkpoint")
    path = checkpoint.checkpoint_root(run_dir) / tags[-1] / "mp_rank_00_model_states.pt"
    with checkpoint.weights_only_loads():
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "data_watermark" not in state:
        raise checkpoint.CheckpointError(f"{path} records no data watermark: pass --since-watermark")
    return state["data_watermark"]


class WarmStartTrainer(Trainer):
    """A :class:`Trainer` that starts from another run's checkpoint instead of fresh weights."""

    def warm_start(self, source_run: str | Path) -> None:
        tag, client_state = checkpoint.load_latest(self.engine, source_run)
        self.step = self.first_step = client_state["step"]
        self.total_steps += self.step
        self._continue_at_configured_lr()
        log.info("warm start from %s/%s at step %d (trained through batch %s); %d new steps",
                 source_run, tag, self.step, client_state.get("data_watermark", {}).get("batch"),
                 self.total_steps - self.step)


    def _continue_at_configured_lr(self) -> None:
        """The checkpoint brings its optimizer's and scheduler's learning rate (a batch run's peak
        ``optim.lr``, or wherever its cosine ended); a segment trains at this run's ``optim.lr``."""
        scheduler = self.engine.lr_scheduler
        scheduler.base_lrs = [self.config.optim.lr] * len(scheduler.base_lrs)
        rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(self.engine.optimizer.param_groups, rates):
            group["initial_lr"], group["lr"] = self.config.optim.lr, rate
        scheduler._last_lr = rates
        log.info("continual learning rate %.2e", rates[0])


def check_continual(config: TrainConfig) -> None:
    require(config.schedule.kind == "constant", "schedule.kind",
            "continual training needs 'constant' (a cosine decay would restart or sit at min_lr)")
    if config.train.steps != 0 or config.train.epochs != int(config.train.epochs):
        # Allowed (a fixed budget per segment can be what a user wants), but said out loud.
        log.warning("train.steps=%d, train.epochs=%g: this segment does not train every new event "
                    "the same whole number of times (needs train.steps=0 and whole train.epochs)",
                    config.train.steps, config.train.epochs)


def rank_main(argv: list[str]) -> int:
    """One rank of a warm-start segment (started by the ``deepspeed`` launcher)."""
    parser = argparse.ArgumentParser(prog="trainer/warm_start.py")
    parser.add_argument("--resume-from", required=True, help="run directory to continue from")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(TrainConfig, args)
    check_continual(config)
    trainer = WarmStartTrainer(config)
    try:
        trainer.warm_start(args.resume_from)
        trainer.fit()
    finally:
        trainer.close()
    dist.destroy_process_group()
    return 0


def launch(features: str, run: str, resume_from: str, since: str, nproc: int,
           config_file: str | None, overrides: list[str]) -> int:
    """``sirenfeed train --resume-from …``: build the view, then launch the warm-start segment.

    Returns the launcher's exit code, or :data:`NOTHING_NEW_EXIT` when there is nothing to train on."""
    source = run if resume_from == "latest" else resume_from
    since_batch = int(checkpoint_data_watermark(source)["batch"]) if since == "auto" else int(since)
    view = Path(run) / "views" / f"since-{since_batch:06d}"
    try:
        manifest = build_view(features, since_batch, view)
    except NothingNew as error:
        log.info("%s", error)
        return NOTHING_NEW_EXIT
    log.info("training on batches %d..%d through %s", since_batch, manifest["data_watermark"]["batch"], view)
    return run_deepspeed(CONTINUAL_SCRIPT, nproc, config_file,
                         [*overrides, f"features={view}", f"run={run}", "--resume-from", source])


NOTHING_NEW_EXIT = 4
"""Exit code of ``sirenfeed train --resume-from`` when no batch is newer than the watermark."""



if __name__ == "__main__":
    configure_logging(int(os.environ.get("RANK", "0")))
    sys.exit(rank_main(sys.argv[1:]))
