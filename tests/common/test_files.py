"""The durable file operations every component shares: readers see the old or the new, never half."""

from __future__ import annotations

import json
import math
import os

import pytest

from common.files import point_symlink, staged_directory, visible_files, write_json


def test_write_json_writes_standard_json_with_undefined_values_as_null(tmp_path):
    target = tmp_path / "deep" / "record.json"
    write_json(target, {"b": math.nan, "a": [1.5, math.inf], "c": {"d": -math.inf}})
    assert json.loads(target.read_text()) == {"a": [1.5, None], "b": None, "c": {"d": None}}
    assert target.read_text().index('"a"') < target.read_text().index('"b"'), "keys are sorted"
    assert [path.name for path in target.parent.iterdir()] == ["record.json"], "no temporary left"


def test_point_symlink_swaps_the_link_and_leaves_nothing_beside_it(tmp_path):
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
    point_symlink(tmp_path / "latest", "one")
    point_symlink(tmp_path / "latest", "two")
    assert os.readlink(tmp_path / "latest") == "two"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latest", "one", "two"]


def test_a_staged_directory_replaces_its_target_whole_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "dataset"
    with staged_directory(target) as staging:
        (staging / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with staged_directory(target) as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("crash while building")
    assert [path.name for path in target.iterdir()] == ["old.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["dataset"], "the staging folder was left behind"
    with staged_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [path.name for path in target.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["dataset"], "the retired copy was left behind"


def test_visible_files_skips_markers_state_and_files_being_written(tmp_path):
    for relative in ("date=1/a.parquet", "date=1/b.parquet", "date=2/c.parquet", "_state/d.parquet",
                     ".staging-x/e.parquet", "date=2/.f.parquet", "date=2/_SUCCESS", "g.json"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text("")
    assert [str(path.relative_to(tmp_path)) for path in visible_files(tmp_path)] == [
        "date=1/a.parquet", "date=1/b.parquet", "date=2/c.parquet"]
    assert visible_files(tmp_path / "missing") == []
