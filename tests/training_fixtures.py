"""Shared fixtures for the trainer and lifecycle tests: tiny feature datasets of any event schema
written (pyarrow) in exactly the Spark job's layout (``{train,eval}/date=YYYY-MM-DD/part-*.parquet``
+ ``_MANIFEST.json`` + ``_SUCCESS``), and one real 2-rank ``deepspeed`` training run that several
test modules inspect.

The rows carry a learnable signal: task k's label rate is high (0.85) where the id of the schema's
k-th id column (cycling) is a multiple of 3 and low (0.08) elsewhere (the feed: contribution by
item, like by author, long_dwell by content type), so a model that learns embeddings lowers the
loss within a few steps. Everything else is random in the columns' ranges, the time features
computed from the event times as the feature job computes them.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from common.repo import REPO_ROOT
from common.files import visible_files
from features.dataset import read_manifest, write_manifest
from features.schema import LOG_GAP_COLUMN, LOG_ITEM_AGE_COLUMN, LOSS_MASK_COLUMN, PREV_ACTIONS_KNOWN_COLUMN
from features.spec import (
    FEATURE_SPEC_VERSION, FeatureSpec, cyclical, log_gap, prev_actions_known, transform, user_key,
)
from trainer.checkpoint import weights_only_loads
from trainer.data import write_training_rows
from trainer.distributed import SHM_PREFIX, SHM_ROOT
from trainer.embeddings import TABLES_DIR

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))

DAY = 86_400
FIRST_DAY = 1_714_521_600  # 2024-05-01 00:00 UTC

TINY_SPEC = FeatureSpec(
    context_len=8, stride=8,
    buckets={"item_id": 31, "author_id": 11, "content_type": 5, "topic": 7, "surface": 3})
TINY_WATCH_SPEC = FeatureSpec(
    context_len=8, stride=8, schema="watch",
    buckets={"post_id": 31, "creator_id": 11, "format": 4, "country": 7})
"""The watch log's tables as small (``origin_post_id`` reads ``post_id``'s)."""

TRAIN_FILES = [(0, 96, 32), (1, 96, 32), (2, 40, 40)]
"""(day, rows, row-group size): 7 row groups, so 2 ranks get uneven shards (4 and 3)."""
EVAL_FILES = [(3, 48, 16), (3, 21, 21)]
"""4 row groups of uneven size."""

TINY_MODEL = ["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.siren_width=16"]
"""A model small enough that a CPU step takes milliseconds."""


def dataset_spec(spec: FeatureSpec) -> FeatureSpec:
    """``spec`` as the full feature job records it: standardize steps without statistics fitted. The
    fixture's numerics are drawn standardized already, N(0, 1), so their statistics are (0, 1)."""
    schema = spec.event_schema
    if not schema.needs_fit:
        return spec
    return spec.with_schema(schema.fitted({name: (0.0, 1.0) for name, _ in schema.standardize_steps()}))


def _rows(rng: np.random.Generator, spec: FeatureSpec, count: int, day: int) -> dict[str, np.ndarray]:
    """``count`` left-padded windows of random users with a learnable label signal."""
    schema = spec.event_schema
    width = spec.context_len
    columns: dict[str, np.ndarray] = {
        "user_key": np.array([user_key(f"user{u}") for u in rng.integers(0, 40, count)], np.int64),
        "length": rng.integers(2, width + 1, count).astype(np.int32),
        "ts": np.zeros((count, width), np.int64),
        **{name: np.zeros((count, width), np.int64) for name in schema.id_columns},
        **{name: np.zeros((count, width), np.float32) for name in schema.token_float_columns},
    }
    for row in range(count):
        length = int(columns["length"][row])
        real = slice(width - length, width)
        ts = FIRST_DAY + day * DAY + rng.integers(0, DAY // 2) + np.cumsum(rng.integers(30, 3600, length))
        columns["ts"][row, real] = ts
        for name in schema.id_columns:
            columns[name][row, real] = rng.integers(1, spec.buckets[schema.column_tables[name]], length)
        for index, task in enumerate(schema.label_columns):
            signal = columns[schema.id_columns[index % len(schema.id_columns)]][row, real]
            columns[task][row, real] = rng.random(length) < np.where(signal % 3 == 0, 0.85, 0.08)
        duration_ms = rng.integers(1_000, 30_000, length)
        for name, value in schema.config.actions.columns.items():
            if name in schema.label_columns:
                continue  # the label's own column, drawn above
            if schema.field(value.field).kind == "bool":
                columns[name][row, real] = rng.random(length) < 0.3
            else:  # a numeric outcome: the duration actions wait for, where it is that field
                raw = duration_ms if value.field == schema.known_after_field else rng.exponential(8_000.0, length)
                columns[name][row, real] = transform(raw, value.transforms)
        for name in schema.continuous_columns:
            if name == LOG_GAP_COLUMN:
                columns[name][row, real] = log_gap(ts)
            elif name == LOG_ITEM_AGE_COLUMN:
                columns[name][row, real] = np.log1p(rng.integers(0, 30 * DAY, length))
            else:  # a numeric, standardized
                columns[name][row, real] = rng.standard_normal(length)
        offset = np.full(length, rng.integers(-12, 15) * 3600) if schema.utc_offset_field else None
        for name, values in cyclical(ts, schema.periods, offset).items():
            columns[name][row, real] = values
        columns[PREV_ACTIONS_KNOWN_COLUMN][row, real] = prev_actions_known(
            ts * 1000, duration_ms if schema.known_after_field else None, schema.action_delay_ms)
        columns[LOSS_MASK_COLUMN][row, real] = 1.0
    return columns


def write_features(root: Path, spec: FeatureSpec = TINY_SPEC,
                   train_files=TRAIN_FILES, eval_files=EVAL_FILES, seed: int = 0) -> Path:
    """A feature dataset of ``spec``'s schema in the Spark job's layout; returns ``root``. Its
    manifest records :func:`dataset_spec` (``read_feature_manifest`` gives that back)."""
    spec = dataset_spec(spec)
    rng = np.random.default_rng(seed)
    rows = {}
    for split, files in (("train", train_files), ("eval", eval_files)):
        rows[split] = 0
        for index, (day, count, group_rows) in enumerate(files):
            date = np.datetime64(FIRST_DAY + day * DAY, "s").astype("datetime64[D]")
            write_training_rows(root / split / f"date={date}" / f"part-{index:05d}.parquet",
                                _rows(rng, spec, count, day), spec, group_rows)
            rows[split] += count
    split_day = min(day for day, _, _ in eval_files)
    write_manifest(root, {  # the keys features/job.py writes that the trainer reads
        "spec": spec.record(), "feature_spec_version": FEATURE_SPEC_VERSION,
        "watermark_ms": (FIRST_DAY + (split_day + 1) * DAY) * 1000,
        "split_ts_ms": (FIRST_DAY + split_day * DAY) * 1000,
        "splits": {split: {"rows": count} for split, count in rows.items()}})
    return root


def as_next_batch(root: Path) -> Path:
    """Catalogue a written feature dataset as feature batch 1, the layout an incremental append
    leaves, so a warm start from a checkpoint trained through batch 0 trains on it."""
    manifest = read_manifest(root)
    files = {split: [str(path.relative_to(root)) for path in visible_files(root / split)]
             for split in ("train", "eval")}
    manifest["batches"] = [{"index": 1, "name": "b000001", "watermark_ms": manifest["watermark_ms"],
                            "max_event_ms": manifest["watermark_ms"], "split_ts_ms": manifest["split_ts_ms"],
                            "files": files}]
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="session")
def tiny_features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="session")
def tiny_watch_features(tmp_path_factory) -> Path:
    """:func:`write_features` of the watch schema (:data:`TINY_WATCH_SPEC`)."""
    return write_features(tmp_path_factory.mktemp("watch-features"), TINY_WATCH_SPEC)


@dataclasses.dataclass(frozen=True)
class LaunchedRun:
    run: Path
    features: Path
    overrides: tuple[str, ...]
    output: str


TRAIN_OVERRIDES = (
    *TINY_MODEL, "model.dropout=0.1", "data.batch_size=32", "data.shuffle_buffer=64",
    "data.eval_batch_size=32", "train.steps=32", "train.log_every=4", "train.eval_every=16",
    "train.checkpoint_every=8", "train.keep_checkpoints=2", "schedule.warmup_steps=4",
    "optim.lr=0.02", "embeddings.lr=0.1", "deepspeed.zero_stage=1")
"""A short run that logs, evaluates mid-run, checkpoints four times (keeping two) and shards the
optimizer state (ZeRO-1), with dropout so resuming must restore each rank's RNG; its id tables are
sharded over the two ranks (the planner's choice) with row-wise Adagrad."""


def checkpoint_weights(tag_dir: Path, scratch: Path) -> dict[str, "torch.Tensor"]:
    """The whole model a checkpoint holds, keyed as the export keys it: DeepSpeed's dense module plus
    the sharded tables (``tables/``, read whole through torch.distributed.checkpoint's converter)."""
    with weights_only_loads():
        weights = dict(torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=True)["module"])
    converted = scratch / f"{tag_dir.parent.parent.name}-{tag_dir.name}-tables.pt"
    dcp_to_torch_save(tag_dir / TABLES_DIR, converted)
    for name, table in torch.load(converted, weights_only=True)["weights"].items():
        weights["id_" + name] = table  # embeddings.<table>.weight -> id_embeddings.<table>.weight
    return weights


def shared_memory_segments() -> set[Path]:
    """This user's DeepSpeed ``shm_comm`` segments currently in ``/dev/shm``."""
    return set(SHM_ROOT.glob(f"{SHM_PREFIX}_{os.getuid()}_*")) if SHM_ROOT.is_dir() else set()


def launch_training(features: Path, run: Path, *overrides: str) -> LaunchedRun:
    """``sirenfeed train`` (its module's ``main``) with 2 CPU ranks; fails the test on a non-zero exit
    or if the run left shared memory behind (tests run one at a time, so anything new is its own)."""
    before = shared_memory_segments()
    command = [sys.executable, "-m", "sirenfeed.cli", "train", "--features", str(features), "--run", str(run),
               "--nproc", "2", "--config", str(REPO_ROOT / "conf" / "train.yaml"), *overrides]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"training failed ({result.returncode}):\n{output[-6000:]}"
    assert shared_memory_segments() - before == set()
    return LaunchedRun(run, features, tuple(overrides), output)


@pytest.fixture(scope="session")
def trained_run(tiny_features, tmp_path_factory) -> LaunchedRun:
    return launch_training(tiny_features, tmp_path_factory.mktemp("run") / "run", *TRAIN_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_spec() -> FeatureSpec:
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_watch_spec() -> FeatureSpec:
    """:data:`TINY_WATCH_SPEC` as its dataset records it (fitted)."""
    return dataset_spec(TINY_WATCH_SPEC)


@pytest.fixture(scope="session")
def feature_writer():
    """:func:`write_features`, for tests that need a dataset of another shape."""
    return write_features


@pytest.fixture(scope="session")
def launch():
    """:func:`launch_training`, for tests that start their own run."""
    return launch_training


@pytest.fixture(scope="session")
def checkpoint_state():
    """:func:`checkpoint_weights`."""
    return checkpoint_weights


@pytest.fixture(scope="session")
def train_overrides() -> tuple[str, ...]:
    return TRAIN_OVERRIDES


@pytest.fixture(scope="session")
def tiny_model_overrides() -> tuple[str, ...]:
    return tuple(TINY_MODEL)
