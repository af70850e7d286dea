"""Warm-start views (lifecycle/view.py) without Spark: a view is replaced atomically, so a crash
while one is rebuilt leaves the previous complete view in place."""

from __future__ import annotations

import pytest

from common.files import visible_files
from features.dataset import read_manifest, write_manifest
from lifecycle import view as lifecycle_view
from lifecycle.view import build_view

DAY_MS = 86_400_000


def two_batch_features(root, write_features):
    """The tiny dataset as two feature batches: batch 0 holds the first train file and the first
    eval file, batch 1 the rest."""
    write_features(root)
    manifest = read_manifest(root)
    train = [str(path.relative_to(root)) for path in visible_files(root / "train")]
    held_out = [str(path.relative_to(root)) for path in visible_files(root / "eval")]

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

    monkeypatch.setattr(lifecycle_view, "write_manifest", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_view(features, 0, view)
    assert read_manifest(view) == first, "the previous view lost its manifest"
    assert view_files(view) == before
    assert [path.name for path in view.parent.iterdir()] == ["view"], "the staging folder was left behind"


def catalogue(tmp_path, write_features, entries):
    """The tiny dataset with the batch catalogue ``entries`` (all that :func:`select` reads)."""
    root = write_features(tmp_path / "features")
    manifest = read_manifest(root)
    manifest["batches"] = entries
    write_manifest(root, manifest)
    return root


def entry(index, train, held_out, max_event_ms=None):
    watermark = (index + 1) * DAY_MS
    return {"index": index, "name": f"b{index:06d}", "watermark_ms": watermark, "split_ts_ms": watermark - 1000,
            "max_event_ms": max_event_ms or watermark - 10, "files": {"train": train, "eval": held_out}}


def test_a_segment_trains_on_the_newer_batches_and_the_held_out_parts_it_has_not_seen(tmp_path, feature_writer):
    root = catalogue(tmp_path, feature_writer, [entry(0, ["t0"], ["e0"]), entry(1, ["t1"], ["e1"]), entry(2, ["t2"], ["e2"]),
                                entry(3, ["t3a", "t3b"], ["e3"])])
    selection = lifecycle_view.select(root, 1)
    # Trained through batch 1: it saw t0, t1 and e0; e1 was its own held-out slice.
    assert selection["train"] == ["t2", "t3a", "t3b", "e1", "e2"]
    assert selection["eval"] == ["e3"] and selection["batch"] == 3 and selection["since"] == 1
    assert selection["watermark_ms"] == 4 * DAY_MS
    # Newest event trained on: batch 1 and 2 whole, batch 3 only before its split.
    assert selection["max_event_ms"] == 4 * DAY_MS - 1000 - 1


def test_nothing_new_when_no_batch_is_newer_or_the_newest_has_no_held_out_rows(tmp_path, feature_writer):
    root = catalogue(tmp_path, feature_writer, [entry(0, ["t0"], ["e0"]), entry(1, ["t1"], [])])
    with pytest.raises(lifecycle_view.NothingNew, match="no held-out rows"):
        lifecycle_view.select(root, 0)
    with pytest.raises(lifecycle_view.NothingNew, match="no batch after 1"):
        lifecycle_view.select(root, 1)


def test_a_dataset_never_appended_to_is_batch_zero_with_every_file_it_holds(tmp_path, feature_writer):
    root = feature_writer(tmp_path / "features")
    (only,) = lifecycle_view.batches(root)
    assert only["index"] == 0 and only["name"] == "b000000"
    assert only["files"]["train"] == [str(path.relative_to(root)) for path in visible_files(root / "train")]
    assert only["files"]["eval"] == [str(path.relative_to(root)) for path in visible_files(root / "eval")]
    with pytest.raises(lifecycle_view.NothingNew):
        lifecycle_view.select(root, 0)
