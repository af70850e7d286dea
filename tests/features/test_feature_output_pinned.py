"""The feature jobs' output pinned bit for bit: a full run and one incremental append on fixed synthetic
logs (feed, and a full run of the watch schema, which fits standardize statistics and has a UTC
offset) must give exactly the rows, types and counts captured from the job before its performance
work. A change of any value, row, column type or nullability changes a digest; a deliberate change of
the data contract must update the constants (and say why in its commit). The schema part names
the list item too: train and eval changed once, rows unchanged, when arrays became 2-level lists."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from features.full import run
from features.incremental import run_incremental
from features.schema import ContractConfig
from features.settings import FeaturesConfig, IncrementalConfig
from features.spec import FeatureSpec
from features.synth import SynthConfig, write_synthetic_logs

DAY_MS = 86_400_000
START = "2026-06-01"
START_MS = 1_780_272_000_000
NOW_MS = START_MS + 30 * DAY_MS
DAYS = 4

PINNED = {
    "feed full": {
        "train": "484e60473c7e8c96410e93679f743512fa605fb427f0a859128df16242a529dd",
        "eval": "dc4406bb9a241d8a56ff06371d2cfc5527518c876031afc9f880cf5b9c1ee179",
        "quarantine": "85bbd02ae4916cdf0c89f90592513e52b26a314b44f82f4bf0273765cfb24dd2",
        "manifest": "ed828ebf2031f2896d47b1a20c1bc7eca9a5bf1c3d24bc8621aa7a6376697275",
    },
    "feed incremental": {
        "train": "10671483e7726956863ce1e223fd070e15db45c409715b86632cbc610c27c865",
        "eval": "de8e2a95e2873b2f3888a25786ff86df3a51d45e99d84e6751f530714e344fe3",
        "quarantine": "8bfa283e70652a36d6e77d7a51e1c9caddbeac900414bb522bb2c6aa6c034d84",
        "state/items": "74ccb2d99e1cf4dc6ce33f6ee072b3ff142c8347b17579165dc0cb8040bb7b37",
        "state/seen": "57ddf5f314799d65658c43ebcb077e4c9c4eab96f56dc6fcf170409638f285cc",
        "state/users": "da64c8eb61ef30ee68fd6629be44d8c3f656ed41a9df971d6b57b6ba452e039d",
        "manifest": "1cc38f4ee308d7024e3be451f651677a8946cfdfd62bbbaaf5ccf1df74e69960",
    },
    "watch full": {
        "train": "cca65c106b5d4315383fc50b4b22a32fff81a23991ec600158e4ede2117ccca8",
        "eval": "8e9b034869e1dba545babc19a08256f7f0ad5b6f65ad5ea6a2c7caaef3c6bc09",
        "quarantine": "5fbcb9b63346f37a8c041abb91ef5086aabd1d562bdb5fbe73c201b9f14665a3",
        "manifest": "100c9c7a5e32e53b4b232842406745f1c34a7847d21679ad6fda04595500c6f6",
    },
}


def digest(path: Path) -> str:
    """sha256 of a Parquet dataset: its Arrow schema (types and nullability, partition columns
    included) and its rows, each serialized canonically (JSON, keys sorted, floats as repr), sorted."""
    table = pq.read_table(path)
    rows = sorted(json.dumps(row, sort_keys=True, default=str) for row in table.to_pylist())
    content = hashlib.sha256(table.schema.remove_metadata().to_string().encode())
    for row in rows:
        content.update(row.encode() + b"\n")
    return content.hexdigest()


def counts(manifest: dict) -> dict:
    keys = ("input_events", "valid_events", "duplicates", "events", "quarantined", "quarantined_by_reason",
            "watermark_ms", "split_ts_ms", "splits", "columns")
    record = {key: manifest.get(key) for key in keys}
    record["spec"] = manifest["spec"]  # fitted standardize statistics, bit for bit
    for entry in manifest.get("batches", [])[1:]:
        record.setdefault("batches", []).append(
            {key: value for key, value in entry.items() if key not in ("created_at", "input_files", "files")})
    return json.loads(json.dumps(record, sort_keys=True))


def outputs(out: Path, manifest: dict) -> dict:
    found = {name: digest(out / name) for name in ("train", "eval", "quarantine")}
    if manifest.get("state"):
        state = out / manifest["state"]
        found.update({f"state/{part.name}": digest(part)
                      for part in sorted(state.iterdir()) if part.is_dir()})
    found["manifest"] = hashlib.sha256(json.dumps(counts(manifest), sort_keys=True).encode()).hexdigest()
    return found


def config(raw: Path, out: Path, schema: str, **incremental) -> FeaturesConfig:
    return FeaturesConfig(raw=str(raw), out=str(out),
                          spec=FeatureSpec(context_len=8, stride=3, schema=schema),
                          contract=ContractConfig(now_ms=NOW_MS), eval_days=1, train_files=2, eval_files=2,
                          incremental=IncrementalConfig(enabled=bool(incremental), **incremental))


def synthetic(root: Path, schema: str) -> Path:
    logs = root / f"synth-{schema}"
    write_synthetic_logs(SynthConfig(users=60, days=DAYS, seed=7, start_date=START, bad_fraction=0.02,
                                     duplicate_fraction=0.02, schema=schema), logs)
    return logs


@pytest.fixture(scope="module")
def feed_runs(spark, tmp_path_factory):
    """The first three days as a full run, then the fourth (plus re-delivered, late and too-late
    copies of day-three events in day three's partition) appended with a 12 h holdout."""
    root = tmp_path_factory.mktemp("pinned")
    logs, raw, out = synthetic(root, "feed"), root / "raw", root / "features"
    dates = sorted(path.name for path in logs.glob("date=*"))
    for date in dates[:-1]:
        shutil.copytree(logs / date, raw / date)
    full = outputs(out, run(spark, config(raw, out, "feed")))
    shutil.copytree(logs / dates[-1], raw / dates[-1])
    first_file = next((logs / dates[-2]).glob("*.parquet"))
    day_three = pq.read_table(first_file).slice(0, 40).to_pylist()
    late = [dict(event, event_id=f"late-{n}", event_ts=event["event_ts"] + 60_000 * n)
            for n, event in enumerate(day_three[:20])]
    pq.write_table(pa.Table.from_pylist(day_three[20:] + late, schema=pq.read_schema(first_file)),
                   raw / dates[-2] / "late.parquet")
    appended = outputs(out, run_incremental(spark, config(raw, out, "feed", allowed_lateness_s=18 * 3600,
                                                          holdout_s=12 * 3600)))
    return {"feed full": full, "feed incremental": appended}


def test_feed_full_and_incremental_outputs_are_pinned(feed_runs):
    for name in ("feed full", "feed incremental"):
        assert feed_runs[name] == PINNED[name], name


def test_watch_full_output_is_pinned(spark, tmp_path):
    logs, out = synthetic(tmp_path, "watch"), tmp_path / "features"
    assert outputs(out, run(spark, config(logs, out, "watch"))) == PINNED["watch full"]
