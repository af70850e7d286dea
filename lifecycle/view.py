"""The warm-start view: which feature batches a segment after a checkpoint trains and is evaluated on.

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

import os
from pathlib import Path
from typing import Any

from common.files import local_path, staged_directory, visible_files
from features.batches import first_batch
from features.dataset import write_manifest
from trainer.data import read_feature_manifest

SPLITS = ("train", "eval")


class NothingNew(RuntimeError):
    """No feature batch newer than the data watermark (or none with a held-out slice yet)."""


def batches(features_dir: str | Path) -> list[dict[str, Any]]:
    """The dataset's batches, oldest first; a dataset never appended to is one batch (index 0)."""
    manifest, _ = read_feature_manifest(features_dir)
    if manifest.get("batches"):
        return manifest["batches"]
    root = local_path(features_dir)
    files = {split: [str(path.relative_to(root)) for path in visible_files(root / split)]
             for split in SPLITS}
    return [first_batch(manifest, files)]


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
    already there is replaced whole (:func:`common.files.staged_directory`).

    Raises :class:`NothingNew` when there is nothing to train on."""
    selection = select(features_dir, since_batch)
    manifest, _ = read_feature_manifest(features_dir)
    source, view = local_path(features_dir), Path(view_dir)
    # Built beside the view and swapped in complete, so a crash leaves the previous view readable.
    with staged_directory(view) as staging:
        return _link_view(source, manifest, selection, since_batch, staging)


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
