"""Training input: Petastorm over the feature dataset, in a global order that no world size changes.

This is the only module that imports Petastorm. It reads ``FEATURES_DIR/{train,eval}`` (the Spark
job's output, columns :data:`features.spec.TRAINING_COLUMNS`) and yields batches as
``dict[column, Tensor]``: ids, ``ts``, ``user_key`` and ``length`` int64, everything else float32,
per-token columns shaped ``[B, C]``.

Logical shards. The training split is read as ``S`` logical shards (``data.shards``), each one a
Petastorm shard: row group ``i`` belongs to shard ``i % S``. Global batch ``k`` (``data.batch_size``
rows, one optimizer step) is the ``k``-th chunk of ``batch_size / S`` rows of every shard, in shard
order. Rank ``r`` of ``W`` owns the block of shards ``[r·S/W, (r+1)·S/W)``, and their chunks are its
micro batch. The sequence of global batches therefore depends on the data, ``seed``,
``batch_size``, ``shuffle_buffer`` and ``S`` — never on ``W``: every ``W`` that divides ``S`` trains
on the same global batches, and a checkpoint taken after ``k`` steps resumes on another ``W`` at
global batch ``k`` exactly. With ``S = W`` (the default for a fresh run) each rank reads one
Petastorm shard; with ``S/W`` shards per rank a rank holds ``S/W`` readers.

Each shard is an endless stream: epoch after epoch, its row groups in an order seeded by
``(seed, epoch)`` (one Petastorm worker thread, order preserved), its rows mixed in a buffer of
``shuffle_buffer`` rows seeded by ``(seed, shard, epoch)``; an epoch's last partial chunk continues
into the next epoch. Uneven shards thus never run dry, and every rank runs the same number of
steps, computed from the row count in the Parquet footers (:func:`training_steps`), never from how
much one rank read. A shard whose epoch holds no row is an error, not an endless loop.

Fewer row groups than shards: Petastorm cannot give every shard a row group, so then every shard
reads the whole split in the same seeded order and keeps every ``S``-th row (``row % S == shard``):
still disjoint and covering, at the cost of reading the split once per shard (tiny splits only).

Resume: after ``k`` steps a shard's stream starts ``k · batch_size / S`` rows in. Whole epochs are
skipped by arithmetic (the shard's epoch length comes from the footers or from reading one small
column), so a resumed rank re-reads at most one epoch of its shards, never the run so far.

Evaluation (:func:`eval_batches`) reads its shard of the eval split exactly once, in file order,
with the last batch partial.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from petastorm import make_batch_reader

from features.config import require
from features.dataset import local_path, read_manifest
from features.spec import (FEATURE_SPEC_VERSION, TOKEN_COLUMNS, TOKEN_FLOAT_COLUMNS, TRAINING_COLUMNS,
                           FeatureSpec)

log = logging.getLogger(__name__)
# Petastorm warns on every reader it opens that pyarrow's legacy API it uses is deprecated; the pin
# to that pyarrow is deliberate (see constraints.txt), so the warning says nothing to a user.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")

Columns = dict[str, np.ndarray]
Batch = dict[str, torch.Tensor]

SPLITS = ("train", "eval")
PREFETCH_ROW_GROUPS = 4
"""Row groups the Petastorm worker threads of one rank read ahead of the training loop."""
COUNT_COLUMN = "length"
"""The narrowest column: read alone when only a shard's row count is needed."""


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


def training_steps(features_dir: str | Path, steps: int, epochs: float, batch_size: int) -> int:
    """The number of optimizer steps every rank runs: ``steps`` if set, else enough global batches
    of ``batch_size`` rows for ``epochs`` passes over the training rows. The same on every rank and
    for every world size."""
    if steps > 0:
        return steps
    rows, _ = count_rows(split_dir(features_dir, "train"))
    return max(1, math.ceil(epochs * rows / batch_size))


def check_layout(batch_size: int, shards: int, world: int) -> None:
    """Fail fast, naming the key, unless ``world`` ranks can split the global batch by shards."""
    require(shards % world == 0, "data.shards",
            f"{shards} logical shards cannot be split over {world} ranks: the world size must divide "
            "data.shards (set data.shards to a multiple of every world size the run will use)")
    require(batch_size % shards == 0, "data.batch_size",
            f"the global batch of {batch_size} rows must be a multiple of data.shards={shards}")


def shards_of_rank(rank: int, world: int, shards: int) -> range:
    """The logical shards rank ``rank`` of ``world`` reads: a contiguous block."""
    per_rank = shards // world
    return range(rank * per_rank, (rank + 1) * per_rank)


def row_fingerprints(user_key: np.ndarray, ts: np.ndarray) -> list[int]:
    """A 64-bit id per row (its user and its token timestamps), to audit who trained on what."""
    return [int.from_bytes(hashlib.blake2b(np.int64(user).tobytes()
                                           + np.ascontiguousarray(times, np.int64).tobytes(),
                                           digest_size=8).digest(), "little")
            for user, times in zip(user_key, ts)]


def _strides_rows(split_path: Path, groups: int, shards: int, unit: str) -> bool:
    """Whether ``shards`` readers must each read the whole split and keep every ``shards``-th row."""
    if shards > 1 and groups < shards:
        log.warning("%s: fewer row groups than the %d %s (%d): each reads all of it and keeps every "
                    "%d-th row", split_path, shards, unit, groups, shards)
        return True
    return False


def _epoch_chunks(split_path: Path, shard: int, shards: int, seed: int, shuffle_row_groups: bool,
                  stride: bool, columns: Sequence[str] = TRAINING_COLUMNS,
                  prefetch: int = PREFETCH_ROW_GROUPS) -> Iterator[Columns]:
    """One pass over one shard's rows: a dict of column arrays per row group read."""
    options = dict(schema_fields=list(columns), reader_pool_type="thread", workers_count=1,
                   results_queue_size=prefetch, seed=seed, shuffle_row_groups=shuffle_row_groups,
                   num_epochs=1)
    if shards > 1 and not stride:
        options.update(cur_shard=shard, shard_count=shards)
    reader = make_batch_reader(split_path.resolve().as_uri(), **options)
    try:
        seen = 0
        for chunk in reader:
            chunk_columns = {name: getattr(chunk, name) for name in columns}
            count = _rows(chunk_columns)
            if stride:
                chunk_columns = _take(chunk_columns, (seen + np.arange(count)) % shards == shard)
            seen += count
            yield chunk_columns
    finally:
        reader.stop()
        reader.join()


def _rows(columns: Columns) -> int:
    return len(next(iter(columns.values())))


def _concat(pieces: list[Columns]) -> Columns:
    if len(pieces) == 1:
        return pieces[0]
    return {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}


def _take(columns: Columns, index: np.ndarray) -> Columns:
    return {name: values[index] for name, values in columns.items()}


def _slice(columns: Columns, start: int, stop: int) -> Columns:
    return {name: values[start:stop] for name, values in columns.items()}


def _mixed(chunks: Iterable[Columns], shuffle_buffer: int, rng: np.random.Generator) -> Iterator[Columns]:
    """One epoch's rows in training order. Without a buffer: read order. With one: whenever
    ``shuffle_buffer`` rows are held they are permuted and all but half a buffer go out, the rest
    mixing with the rows still to come (one permutation per buffer, so constant cost per row);
    the epoch's remainder goes out permuted."""
    if shuffle_buffer == 0:
        yield from chunks
        return
    pending: list[Columns] = []
    held = 0
    keep_behind = shuffle_buffer // 2
    for chunk in chunks:
        pending.append(chunk)
        held += _rows(chunk)
        if held < shuffle_buffer:
            continue
        pool = _take(_concat(pending), rng.permutation(held))
        yield _slice(pool, 0, held - keep_behind)
        pending, held = [_slice(pool, held - keep_behind, held)], keep_behind
    if held:
        yield _take(_concat(pending), rng.permutation(held))


def _rechunk(pieces: Iterable[Columns], rows: int, keep_partial: bool = False) -> Iterator[Columns]:
    """Cut a stream of row pieces into chunks of exactly ``rows`` rows (and the remainder, if
    ``keep_partial``)."""
    pending: list[Columns] = []
    held = 0
    for piece in pieces:
        pending.append(piece)
        held += _rows(piece)
        if held < rows:
            continue
        pool = _concat(pending)
        full = held // rows * rows
        for start in range(0, full, rows):
            yield _slice(pool, start, start + rows)
        pending = [_slice(pool, full, held)]
        held -= full
    if held and keep_partial:
        yield _concat(pending)


def _skip_rows(pieces: Iterable[Columns], count: int) -> Iterator[Columns]:
    for piece in pieces:
        size = _rows(piece)
        if count >= size:
            count -= size
            continue
        yield _slice(piece, count, size) if count else piece
        count = 0


def _counted(pieces: Iterable[Columns]) -> Iterator[Columns]:
    """Pass pieces through; the generator's return value is how many rows went by."""
    rows = 0
    for piece in pieces:
        rows += _rows(piece)
        yield piece
    return rows


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class _Shard:
    """One logical shard of a split: where its rows come from and how many an epoch holds."""

    def __init__(self, split_path: Path, shard: int, shards: int, stride: bool, rows_in_split: int):
        self.split_path, self.shard, self.shards, self.stride = split_path, shard, shards, stride
        self._rows_in_split = rows_in_split

    def epoch_rows(self) -> int:
        if self.stride or self.shards == 1:
            return len(range(self.shard, self._rows_in_split, self.shards))
        chunks = _epoch_chunks(self.split_path, self.shard, self.shards, 0, False, False, (COUNT_COLUMN,))
        return sum(_rows(chunk) for chunk in chunks)

    def rows(self, seed: int, shuffle_buffer: int, start_row: int, prefetch: int) -> Iterator[Columns]:
        """The endless training-order row stream, from row ``start_row`` on.

        One Petastorm reader per epoch rather than its ``num_epochs=None``: the endless ventilator
        reshuffles a timing-dependent number of times at each epoch start, so later epochs would
        differ between runs and break resume.
        """
        first_epoch, skip = 0, 0
        if start_row:
            epoch_rows = self.epoch_rows()
            if epoch_rows == 0:
                raise self._empty()
            first_epoch, skip = divmod(start_row, epoch_rows)
        for epoch in itertools.count(first_epoch):
            chunks = _epoch_chunks(self.split_path, self.shard, self.shards, _epoch_seed(seed, epoch),
                                   True, self.stride, prefetch=prefetch)
            rows = _mixed(chunks, shuffle_buffer, np.random.default_rng([seed, self.shard, epoch]))
            if skip:
                rows, skip = _skip_rows(rows, skip), 0
            if (yield from _counted(rows)) == 0:
                raise self._empty()

    def _empty(self) -> DataError:
        return DataError(f"shard {self.shard} of {self.shards} of {self.split_path} holds no rows "
                         "(empty row groups): it would never fill a batch")


def to_tensors(columns: Columns, context_len: int) -> Batch:
    """Column arrays → tensors in the dtypes the model expects, checking the token axis is ``C``."""
    batch: Batch = {}
    for name in TRAINING_COLUMNS:
        values = columns[name]
        if name in TOKEN_COLUMNS and (values.ndim != 2 or values.shape[1] != context_len):
            raise DataError(f"column {name!r} has shape {values.shape}; expected [rows, {context_len}] "
                            "(the feature spec's context_len)")
        dtype = np.float32 if name in TOKEN_FLOAT_COLUMNS else np.int64
        # Arrays read straight from Arrow are read-only; torch wants writable memory.
        batch[name] = torch.from_numpy(np.require(values, dtype=dtype, requirements=["C", "W"]))
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
    """The endless, deterministic stream of one rank's micro batches: its share of each global batch.

    ``batch_size`` is the global batch; ``shards`` the logical shards (0 = ``world``). Iterate it
    for batches; ``steps`` counts global batches handed out (including skipped ones): that number,
    stored in a checkpoint, is the data position to resume from on any world size dividing ``shards``.
    """

    def __init__(self, features_dir: str | Path, context_len: int, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world: int, shards: int = 0,
                 skip_steps: int = 0):
        shards = shards or world
        check_layout(batch_size, shards, world)
        path = split_dir(features_dir, "train")
        rows, groups = count_rows(path)  # fails clearly on an empty split instead of waiting forever
        if rows < shards:
            raise DataError(f"{path} holds {rows} rows, fewer than the {shards} shards (data.shards): "
                            "some shard would never fill a batch")
        stride = _strides_rows(path, groups, shards, "shards")
        per_shard = batch_size // shards
        owned = shards_of_rank(rank, world, shards)
        prefetch = max(1, PREFETCH_ROW_GROUPS // len(owned))
        self._shards = [
            _rechunk(_Shard(path, shard, shards, stride, rows).rows(
                seed, shuffle_buffer, skip_steps * per_shard, prefetch), per_shard)
            for shard in owned]
        self._context_len = context_len
        self.steps = skip_steps

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = to_tensors(_concat([next(shard) for shard in self._shards]), self._context_len)
        self.steps += 1
        return batch

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def eval_batches(features_dir: str | Path, context_len: int, batch_size: int, rank: int,
                 world: int) -> Iterator[Batch]:
    """This rank's disjoint share of the eval split, each row exactly once, in file order."""
    path = split_dir(features_dir, "eval")
    _, groups = count_rows(path)
    stride = _strides_rows(path, groups, world, "ranks")
    chunks = _epoch_chunks(path, rank, world, seed=0, shuffle_row_groups=False, stride=stride)
    try:
        for columns in _rechunk(chunks, batch_size, keep_partial=True):
            yield to_tensors(columns, context_len)
    finally:
        chunks.close()
