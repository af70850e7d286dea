"""Training input: Petastorm over the feature dataset, sharded by rank, batched into torch tensors.

This is the only module that imports Petastorm. It reads ``FEATURES_DIR/{train,eval}`` (the Spark
job's output, columns :data:`features.spec.TRAINING_COLUMNS`) and yields batches as
``dict[column, Tensor]``: ids, ``ts``, ``user_key`` and ``length`` int64, everything else float32,
per-token columns shaped ``[B, C]``.

Sharding. Petastorm shards by row group (row group ``i`` goes to rank ``i % world``). A split
with fewer row groups than ranks would leave a rank with nothing to read, so then every rank reads
the whole split in the same seeded order and keeps every ``world``-th row (``row % world == rank``):
still disjoint and covering, at the cost of each rank reading the split once. Both modes are
deterministic: one Petastorm worker thread (prefetching, order preserved), row-group order
shuffled with ``seed`` (the same on every rank), rows shuffled in a buffer seeded per rank.

Training never hangs on uneven shards: each rank reads an endless stream (epoch after epoch, each
with its own seeded row-group order), and every rank runs the same number of steps, computed from
the row count in the Parquet footers (:func:`training_steps`), never from how much one rank read.

Resume: the stream is a pure function of (seed, rank, world, batch size, buffer), so a resumed run
rebuilds it and skips the batches the checkpoint says were consumed
(:class:`TrainStream` ``skip_batches``), then yields exactly what an uninterrupted run would.

Evaluation (:func:`eval_batches`) reads its shard of the eval split exactly once, in file order,
with the last batch partial.
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from petastorm import make_batch_reader
from petastorm.errors import NoDataAvailableError

from features.dataset import local_path, read_manifest
from features.spec import (FEATURE_SPEC_VERSION, TOKEN_COLUMNS, TOKEN_FLOAT_COLUMNS, TRAINING_COLUMNS,
                           FeatureSpec)

log = logging.getLogger(__name__)

Columns = dict[str, np.ndarray]
Batch = dict[str, torch.Tensor]

SPLITS = ("train", "eval")
PREFETCH_ROW_GROUPS = 4
"""Row groups the Petastorm worker thread reads ahead of the training loop."""


class DataError(ValueError):
    """A feature split that cannot be read as training rows (missing, empty, wrong shape)."""


def read_feature_manifest(features_dir: str | Path) -> tuple[dict, FeatureSpec]:
    """The dataset's manifest and feature spec; refuses an incomplete dataset
    (``IncompleteDatasetError``) and one written under another feature spec version."""
    manifest = read_manifest(features_dir)
    version = manifest.get("feature_spec_version")
    if version != FEATURE_SPEC_VERSION:
        raise DataError(f"{features_dir} was written with feature spec version {version!r}; this trainer "
                        f"reads version {FEATURE_SPEC_VERSION!r}: re-run the feature job")
    return manifest, FeatureSpec(**manifest["spec"])


def split_dir(features_dir: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return local_path(features_dir) / split


def parquet_files(split_path: Path) -> list[Path]:
    """Data files of a split, skipping ``_``/``.``-prefixed paths (markers, temporaries)."""
    return sorted(path for path in split_path.rglob("*.parquet")
                  if not any(part.startswith(("_", ".")) for part in path.relative_to(split_path).parts))


def count_rows(split_path: Path) -> tuple[int, int]:
    """``(rows, row_groups)`` of a split, from the Parquet footers: exactly what the reader will read."""
    files = parquet_files(split_path)
    if not files:
        raise DataError(f"{split_path} holds no Parquet files: run the feature job first")
    rows = groups = 0
    for path in files:
        metadata = pq.read_metadata(path)
        rows += metadata.num_rows
        groups += metadata.num_row_groups
    return rows, groups


def training_steps(features_dir: str | Path, steps: int, epochs: float, batch_size: int,
                   world: int) -> int:
    """The number of optimizer steps every rank runs: ``steps`` if set, else enough global batches
    for ``epochs`` passes over the training rows. Computed identically on every rank."""
    if steps > 0:
        return steps
    rows, _ = count_rows(split_dir(features_dir, "train"))
    return max(1, math.ceil(epochs * rows / (batch_size * world)))


def _open_reader(split_path: Path, rank: int, world: int, seed: int, shuffle_row_groups: bool):
    """A one-epoch Petastorm batch reader over this rank's row groups, and whether rows must still
    be strided (the split has fewer row groups than ranks, so every rank reads all of it)."""
    common = dict(schema_fields=list(TRAINING_COLUMNS), reader_pool_type="thread", workers_count=1,
                  results_queue_size=PREFETCH_ROW_GROUPS, seed=seed,
                  shuffle_row_groups=shuffle_row_groups, num_epochs=1)
    url = split_path.resolve().as_uri()
    if world > 1:
        try:
            return make_batch_reader(url, cur_shard=rank, shard_count=world, **common), False
        except NoDataAvailableError:
            log.warning("%s has fewer row groups than the %d ranks: every rank reads all of it and "
                        "keeps every %d-th row", split_path, world, world)
    return make_batch_reader(url, **common), world > 1


def _epoch_chunks(split_path: Path, rank: int, world: int, seed: int,
                  shuffle_row_groups: bool) -> Iterator[Columns]:
    """One pass over this rank's rows: a dict of column arrays per row group read."""
    reader, stride_rows = _open_reader(split_path, rank, world, seed, shuffle_row_groups)
    try:
        seen = 0
        for chunk in reader:
            columns = {name: getattr(chunk, name) for name in TRAINING_COLUMNS}
            count = len(columns["user_key"])
            if stride_rows:
                keep = (seen + np.arange(count)) % world == rank
                columns = {name: values[keep] for name, values in columns.items()}
            seen += count
            yield columns
    finally:
        reader.stop()
        reader.join()


def _endless_chunks(split_path: Path, rank: int, world: int, seed: int) -> Iterator[Columns]:
    """Epoch after epoch, each with its own seeded row-group order.

    One reader per epoch rather than Petastorm's ``num_epochs=None``: its endless ventilator
    reshuffles a timing-dependent number of times at each epoch start, so the order of every epoch
    after the first would differ between runs and break resume.
    """
    for epoch in itertools.count():
        epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        yield from _epoch_chunks(split_path, rank, world, epoch_seed, shuffle_row_groups=True)


def _concat(chunks: list[Columns]) -> Columns:
    if len(chunks) == 1:
        return chunks[0]
    return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}


def _take(columns: Columns, index: np.ndarray) -> Columns:
    return {name: values[index] for name, values in columns.items()}


def _batches(chunks: Iterable[Columns], batch_size: int, shuffle_buffer: int,
             rng: np.random.Generator | None, drop_last: bool) -> Iterator[Columns]:
    """Re-cut row-group chunks into batches of ``batch_size`` rows.

    With ``rng``, rows are shuffled in a buffer: once it holds ``shuffle_buffer + batch_size`` rows
    it is permuted, whole batches are emitted, and about half a buffer stays behind to mix with the
    rows still to come (one permutation per buffer, not per batch, so the cost per row is constant).
    """
    pending: list[Columns] = []
    buffered = 0
    keep_behind = shuffle_buffer // 2 if rng is not None else 0
    threshold = shuffle_buffer + batch_size if rng is not None else batch_size
    for chunk in chunks:
        pending.append(chunk)
        buffered += len(chunk["user_key"])
        if buffered < threshold:
            continue
        pool = _concat(pending)
        order = rng.permutation(buffered) if rng is not None else np.arange(buffered)
        emit = (buffered - keep_behind) // batch_size * batch_size
        for start in range(0, emit, batch_size):
            yield _take(pool, order[start:start + batch_size])
        pending = [_take(pool, order[emit:])]
        buffered -= emit
    if buffered:
        pool = _concat(pending)
        order = rng.permutation(buffered) if rng is not None else np.arange(buffered)
        full = buffered // batch_size * batch_size
        for start in range(0, full, batch_size):
            yield _take(pool, order[start:start + batch_size])
        if full < buffered and not drop_last:
            yield _take(pool, order[full:])


def to_tensors(columns: Columns, context_len: int) -> Batch:
    """Column arrays → tensors in the dtypes the model expects, checking the token axis is ``C``."""
    batch: Batch = {}
    for name in TRAINING_COLUMNS:
        values = columns[name]
        if name in TOKEN_COLUMNS and (values.ndim != 2 or values.shape[1] != context_len):
            raise DataError(f"column {name!r} has shape {values.shape}; expected [rows, {context_len}] "
                            "(the feature spec's context_len)")
        dtype = np.float32 if name in TOKEN_FLOAT_COLUMNS else np.int64
        batch[name] = torch.from_numpy(np.ascontiguousarray(values, dtype=dtype))
    return batch


def write_training_rows(path: Path, columns: Mapping[str, np.ndarray | torch.Tensor],
                        row_group_size: int) -> None:
    """Write rows the way the Spark job does (per-token columns as Parquet lists), for tests and
    benchmarks that need a dataset without running Spark; ``features/job.py`` writes the real ones."""
    arrays = {}
    for name in TRAINING_COLUMNS:
        values = np.asarray(columns[name])
        dtype = np.float32 if name in TOKEN_FLOAT_COLUMNS else np.int32 if name == "length" else np.int64
        values = values.astype(dtype)
        if name in TOKEN_COLUMNS:
            offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


class TrainStream:
    """The endless, deterministic stream of training batches of one rank.

    Iterate it for batches; ``consumed`` counts batches handed out (including skipped ones): that
    number, stored in a checkpoint, is the data position to resume from.
    """

    def __init__(self, features_dir: str | Path, context_len: int, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world: int, skip_batches: int = 0):
        path = split_dir(features_dir, "train")
        count_rows(path)  # fails clearly on an empty split instead of waiting forever
        self._chunks = _endless_chunks(path, rank, world, seed)
        rng = np.random.default_rng([seed, rank])
        self._columns = _batches(self._chunks, batch_size, shuffle_buffer, rng, drop_last=True)
        self._context_len = context_len
        self.consumed = 0
        for _ in range(skip_batches):
            next(self._columns)
            self.consumed += 1

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = to_tensors(next(self._columns), self._context_len)
        self.consumed += 1
        return batch

    def close(self) -> None:
        self._columns.close()
        self._chunks.close()

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def eval_batches(features_dir: str | Path, context_len: int, batch_size: int, rank: int,
                 world: int) -> Iterator[Batch]:
    """This rank's disjoint share of the eval split, each row exactly once, in file order."""
    path = split_dir(features_dir, "eval")
    count_rows(path)
    chunks = _epoch_chunks(path, rank, world, seed=0, shuffle_row_groups=False)
    try:
        for columns in _batches(chunks, batch_size, 0, None, drop_last=False):
            yield to_tensors(columns, context_len)
    finally:
        chunks.close()
