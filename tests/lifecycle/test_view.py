"""Warm-start views (trainer/warm_start.py) without Spark: a view is replaced atomically, so a crash
while one is rebuilt leaves the previous complete view in place."""

from __future__ import annotations

import pytest

from features.dataset import read_manifest, write_manifest
from trainer import warm_start as continual
from trainer.data import parquet_files
from trainer.warm_start import build_view

DAY_MS = 86_400_000


def two_batch_features(root, write_features):
    """The tiny dataset as two feature batches: batch 0 holds the first train file and the first
    eval file, batch 1 the rest."""
    write_features(root)
    manifest = read_manifest(root)
    train = [str(path.relative_to(root)) for path in parquet_files(root / "train")]
    held_out = [str(path.relative_to(root)) for path in parquet_files(root / "eval")]

    def batch(index, files):
        end_ms = manifest["watermark_ms"] + index * DAY_MS
        return {"index": index, "name": f"b{index:06d}", "watermark_ms": end_ms, "max_event_ms": end_ms,
                "split_ts_ms": end_ms - DAY_MS, "files": files}

    manifest["batches"] = [batch(0, {"train": train[:1], "eval": held_out[:1]}),
                           batch(1, {"train": train[1:], "eval": held_out[1:]})]
    write_manifest(root, manifest)
    return root


def view_files(view):
    return sorted(str(path.relative_to(view)) for path in view.rglob("*") if path.is_file())


def test_a_crash_while_a_view_is_rebuilt_leaves_the_previous_view_intact(tmp_path, monkeypatch,
                                                                         feature_writer):
    features = two_batch_features(tmp_path / "features", feature_writer)
    view = tmp_path / "run" / "view"
    first = build_view(features, 0, view)
    before = view_files(view)
    assert first["data_watermark"]["batch"] == 1 and read_manifest(view) == first

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash before the view's manifest is written")

    monkeypatch.setattr(continual, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_view(features, 0, view)
    assert read_manifest(view) == first, "the previous view lost its manifest"
    assert view_files(view) == before
    assert [path.name for path in view.parent.iterdir()] == ["view"], "the staging folder was left behind"
