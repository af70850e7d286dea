"""Training input: Petastorm over the feature dataset, in a global order that no world size changes.

This is the only module that imports Petastorm. It reads ``FEATURES_DIR/{train,eval}`` (the Spark
job's output; its columns are the ``training_columns`` of the event schema the dataset's manifest
records, :func:`read_feature_manifest`) and yields batches as ``dict[column, Tensor]``: ids, ``ts``,
``user_key`` and ``length`` int64, everything else float32, per-token columns shaped ``[B, C]``.
Every reader takes the dataset's :class:`~features.spec.FeatureSpec`, which says which columns
there are and the context length ``C``.

Epochs and logical shards. The training split holds ``N`` rows in row groups (sizes from the
Parquet footers). Epoch ``e`` lays the row groups end to end in an order seeded by ``(seed, e)``
and cuts that sequence of rows into ``S`` (``data.shards``) contiguous ranges, shard ``s`` taking
rows ``[⌊s·N/S⌋, ⌊(s+1)·N/S⌋)``: rows, not row groups, are balanced, so shards differ by at most one
row, and a row group that straddles a cut is read by both shards, each keeping its part
(:func:`epoch_assignment`). A shard's rows are mixed in a buffer of ``shuffle_buffer`` rows seeded
by ``(seed, s, e)``. With ``B = data.batch_size``, an epoch is

    P = ⌈N / B⌉ steps,

and global batch ``k`` of the epoch (one optimizer step) is the ``k``-th chunk of ``B/S`` rows of
every shard, in shard order. No shard holds more than ``P·B/S`` rows and none fewer than
``(P−1)·B/S``, so only the epoch's last step can come up short: each shard fills its chunk with
padding rows (:func:`padding_rows`: windows of no tokens, ``length`` 0 and ``loss_mask`` 0, which
carry no loss, no token weight and count as no sample). Every row is trained exactly once per epoch,
and the next epoch starts on a fresh step.

Rank ``r`` of ``W`` owns the block of shards ``[r·S/W, (r+1)·S/W)`` and their chunks are its micro
batch of ``B/W`` rows, every step, on every rank: all ranks run the same number of steps, computed
from the footers (:func:`training_steps`), never from how much one rank read. The global batches
depend on the data, ``seed``, ``B``, ``shuffle_buffer`` and ``S`` — never on ``W``: every ``W``
that divides ``S`` trains on the same global batches, and a checkpoint taken after ``k`` steps
resumes on another ``W`` at global batch ``k`` exactly. A split with fewer rows than shards is an
error (some shard would hold none), never a hang; so is a row group that holds fewer rows than its
footer says.

Resume: after ``k`` steps a shard starts in epoch ``k // P``, ``(k mod P)·B/S`` rows in; earlier
epochs are skipped by arithmetic, so a resumed rank re-reads at most one epoch of its shards.

Reading: one Petastorm reader per row group (the file's row group, selected as its Petastorm
shard), a background thread reading a few row groups ahead of the training loop.

Evaluation (:func:`eval_batches`) reads its shard of the eval split exactly once, in file order,
with the last batch partial.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from petastorm import make_batch_reader

from common.config import require
from common.files import local_path, visible_files
from features.dataset import read_manifest
from features.spec import FEATURE_SPEC_VERSION, FeatureSpec

log = logging.getLogger(__name__)
# Petastorm warns on every reader it opens that pyarrow's legacy API it uses is deprecated; the pin
# to that pyarrow is deliberate (see constraints.txt), so the warning says nothing to a user.
warnings.filterwarnings("ignore", category=FutureWarning, module="petastorm")

Columns = dict[str, np.ndarray]
Batch = dict[str, torch.Tensor]

SPLITS = ("train", "eval")
PREFETCH_ROW_GROUPS = 4
"""Row groups one rank reads ahead of the training loop."""


class DataError(ValueError):
    """A feature split that cannot be read as training rows (missing, empty, wrong shape)."""


def read_feature_manifest(features_dir: str | Path) -> tuple[dict, FeatureSpec]:
    """The dataset's manifest and feature spec, with the event schema the manifest records (its
    columns, tables and tasks); refuses an incomplete dataset (``IncompleteDatasetError``) and one
    written under another feature spec version."""
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


@dataclass(frozen=True)
class RowGroup:
    """One row group of a split, as its footer describes it."""

    path: Path
    index: int
    """Its position in its file."""
    file_row_groups: int
    rows: int


@dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of row group ``group`` (an index into the split's row groups)."""

    group: int
    start: int
    stop: int


def row_groups(split_path: Path) -> list[RowGroup]:
    """The split's row groups in file order, from the Parquet footers: exactly what the reader reads."""
    files = visible_files(split_path)
    if not files:
        raise DataError(f"{split_path} holds no Parquet files: run the feature job first")
    groups = []
    for path in files:
        metadata = pq.read_metadata(path)
        groups += [RowGroup(path, index, metadata.num_row_groups, metadata.row_group(index).num_rows)
                   for index in range(metadata.num_row_groups)]
    return groups


def count_rows(split_path: Path) -> tuple[int, int]:
    """``(rows, row_groups)`` of a split, from the Parquet footers."""
    groups = row_groups(split_path)
    return sum(group.rows for group in groups), len(groups)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    """``P = ⌈rows / batch_size⌉``: an epoch's steps, the last one padded if it comes up short."""
    return -(-rows // batch_size)


def training_steps(features_dir: str | Path, steps: int, epochs: float, batch_size: int) -> int:
    """The number of optimizer steps every rank runs: ``steps`` if set, else ``⌈epochs · P⌉`` (so
    ``epochs`` whole epochs train every row exactly ``epochs`` times). The same on every rank and
    for every world size."""
    if steps > 0:
        return steps
    rows, _ = count_rows(split_dir(features_dir, "train"))
    # Rounded first so that float noise (0.1 · 30 = 3.0000000000000004) cannot add a step.
    return max(1, math.ceil(round(epochs * steps_per_epoch(rows, batch_size), 9)))


def epoch_assignment(group_rows: Sequence[int], shards: int, seed: int, epoch: int) -> list[list[Piece]]:
    """Per shard, the pieces of row groups it trains on in epoch ``epoch``: the row groups laid end
    to end in an order seeded by ``(seed, epoch)``, cut into ``shards`` ranges of ``⌊N/S⌋`` or
    ``⌈N/S⌉`` rows. Disjoint, covering every row once, and independent of the world size."""
    total = sum(group_rows)
    cuts = [shard * total // shards for shard in range(shards + 1)]
    assignment: list[list[Piece]] = [[] for _ in range(shards)]
    offset = 0
    for group in np.random.default_rng([seed, epoch]).permutation(len(group_rows)).tolist():
        first, last = offset, offset + group_rows[group]
        shard = bisect.bisect_right(cuts, first) - 1
        while shard < shards and cuts[shard] < last:
            start, stop = max(first, cuts[shard]), min(last, cuts[shard + 1])
            if start < stop:
                assignment[shard].append(Piece(group, start - first, stop - first))
            shard += 1
        offset = last
    return assignment


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


def _strides_rows(split_path: Path, groups: int, ranks: int) -> bool:
    """Whether ``ranks`` eval readers must each read the whole split and keep every ``ranks``-th row
    (Petastorm cannot give every rank a row group)."""
    if ranks > 1 and groups < ranks:
        log.warning("%s: fewer row groups than the %d ranks (%d): each reads all of it and keeps every "
                    "%d-th row", split_path, ranks, groups, ranks)
        return True
    return False


def _eval_chunks(split_path: Path, names: Sequence[str], shard: int, shards: int,
                 stride: bool) -> Iterator[Columns]:
    """One pass over one eval shard's rows, in file order: a dict of column arrays per row group."""
    options = dict(schema_fields=list(names), reader_pool_type="thread", workers_count=1,
                   results_queue_size=PREFETCH_ROW_GROUPS, seed=0, shuffle_row_groups=False, num_epochs=1)
    if shards > 1 and not stride:
        options.update(cur_shard=shard, shard_count=shards)
    reader = make_batch_reader(split_path.resolve().as_uri(), **options)
    try:
        seen = 0
        for chunk in reader:
            chunk_columns = {name: getattr(chunk, name) for name in names}
            count = _rows(chunk_columns)
            if stride:
                chunk_columns = _take(chunk_columns, (seen + np.arange(count)) % shards == shard)
            seen += count
            yield chunk_columns
    finally:
        reader.stop()
        reader.join()


def _read_row_group(group: RowGroup, names: Sequence[str]) -> Columns:
    """One row group through Petastorm: its file as the dataset, the row group as its shard."""
    # A plain path in the URL: Petastorm does not undo the percent-encoding of ``date=…``.
    reader = make_batch_reader(f"file://{group.path.resolve()}", schema_fields=list(names),
                               reader_pool_type="dummy", shuffle_row_groups=False, num_epochs=1,
                               cur_shard=group.index, shard_count=group.file_row_groups)
    try:
        columns = _concat([{name: getattr(chunk, name) for name in names} for chunk in reader])
    finally:
        reader.stop()
        reader.join()
    if _rows(columns) != group.rows:
        raise DataError(f"row group {group.index} of {group.path} holds {_rows(columns)} rows; its footer "
                        f"says {group.rows}: the file changed or is corrupt")
    return columns


def _read_pieces(groups: Sequence[RowGroup], pieces: Sequence[Piece], prefetch: int,
                 names: Sequence[str]) -> Iterator[Columns]:
    """The rows of ``pieces`` in order (columns ``names``), a background thread reading ``prefetch``
    row groups ahead."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-groups") as pool:
        pending = deque()
        try:
            for piece in pieces:
                pending.append((piece, pool.submit(_read_row_group, groups[piece.group], names)))
                if len(pending) > prefetch:
                    yield _piece_rows(*pending.popleft())
            while pending:
                yield _piece_rows(*pending.popleft())
        finally:
            for _, future in pending:
                future.cancel()


def _piece_rows(piece: Piece, future) -> Columns:
    return _slice(future.result(), piece.start, piece.stop)


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


def padding_rows(count: int, spec: FeatureSpec) -> Columns:
    """``count`` rows that fill a short last step of an epoch: windows of no tokens (``length`` 0,
    ``loss_mask`` 0, every column 0), so they carry no loss and no token weight, and count as no
    sample (:func:`real_rows`)."""
    schema = spec.event_schema
    return {name: np.zeros((count, spec.context_len) if name in schema.token_columns else (count,),
                           np.float32 if name in schema.token_float_columns else np.int64)
            for name in schema.training_columns}


def real_rows(batch: Batch) -> torch.Tensor:
    """Boolean ``[B]``: the batch's real rows. Every real window holds at least one token, so only a
    padding row has ``length`` 0."""
    return batch["length"] > 0


def _shard_chunks(groups: Sequence[RowGroup], shard: int, shards: int, per_shard: int, seed: int,
                  shuffle_buffer: int, first_step: int, prefetch: int, spec: FeatureSpec) -> Iterator[Columns]:
    """Shard ``shard``'s endless stream of chunks of ``per_shard`` rows, from global step
    ``first_step`` on: ``P`` chunks an epoch, its rows once each, then padding up to the epoch's end."""
    group_rows = [group.rows for group in groups]
    epoch_steps = steps_per_epoch(sum(group_rows), per_shard * shards)
    first_epoch, first_step_in_epoch = divmod(first_step, epoch_steps)
    for epoch in itertools.count(first_epoch):
        pieces = epoch_assignment(group_rows, shards, seed, epoch)[shard]
        rows = _mixed(_read_pieces(groups, pieces, prefetch, spec.event_schema.training_columns), shuffle_buffer,
                      np.random.default_rng([seed, shard, epoch]))
        done = first_step_in_epoch if epoch == first_epoch else 0
        for chunk in _rechunk(_skip_rows(rows, done * per_shard), per_shard, keep_partial=True):
            short = per_shard - _rows(chunk)
            yield _concat([chunk, padding_rows(short, spec)]) if short else chunk
            done += 1
        for _ in range(done, epoch_steps):
            yield padding_rows(per_shard, spec)


def to_tensors(columns: Mapping[str, np.ndarray], spec: FeatureSpec) -> Batch:
    """The spec's training columns → tensors in the dtypes the model expects, checking the token
    axis is ``C`` (``spec.context_len``)."""
    schema = spec.event_schema
    batch: Batch = {}
    for name in schema.training_columns:
        values = columns[name]
        if name in schema.token_columns and (values.ndim != 2 or values.shape[1] != spec.context_len):
            raise DataError(f"column {name!r} has shape {values.shape}; expected [rows, {spec.context_len}] "
                            "(the feature spec's context_len)")
        dtype = np.float32 if name in schema.token_float_columns else np.int64
        # Arrays read straight from Arrow are read-only; torch wants writable memory.
        batch[name] = torch.from_numpy(np.require(values, dtype=dtype, requirements=["C", "W"]))
    return batch


def write_training_rows(path: Path, columns: Mapping[str, np.ndarray | torch.Tensor], spec: FeatureSpec,
                        row_group_size: int) -> None:
    """Write the spec's training columns the way the Spark job does (per-token columns as Parquet
    lists), for tests and benchmarks that need a dataset without running Spark; ``features/job.py``
    writes the real ones."""
    schema = spec.event_schema
    arrays = {}
    for name in schema.training_columns:
        values = np.asarray(columns[name])
        dtype = np.float32 if name in schema.token_float_columns else np.int32 if name == "length" else np.int64
        values = values.astype(dtype)
        if name in schema.token_columns:
            offsets = np.arange(0, values.size + 1, values.shape[1], dtype=np.int32)
            arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values.reshape(-1)))
        else:
            arrays[name] = pa.array(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(arrays), path, row_group_size=row_group_size)


class TrainStream:
    """The endless, deterministic stream of one rank's micro batches: its share of each global batch.

    ``spec`` is the dataset's (:func:`read_feature_manifest`): its columns and context length.
    ``batch_size`` is the global batch; ``shards`` the logical shards (0 = ``world``). Iterate it
    for batches; ``steps`` counts global batches handed out (including skipped ones): that number,
    stored in a checkpoint, is the data position to resume from on any world size dividing ``shards``.
    """

    def __init__(self, features_dir: str | Path, spec: FeatureSpec, batch_size: int,
                 shuffle_buffer: int, seed: int, rank: int, world: int, shards: int = 0,
                 skip_steps: int = 0):
        shards = shards or world
        check_layout(batch_size, shards, world)
        path = split_dir(features_dir, "train")
        groups = row_groups(path)  # fails clearly on an empty split instead of waiting forever
        rows = sum(group.rows for group in groups)
        if rows < shards:
            raise DataError(f"{path} holds {rows} rows, fewer than the {shards} shards (data.shards): "
                            "some shard would hold none")
        per_shard = batch_size // shards
        owned = shards_of_rank(rank, world, shards)
        prefetch = max(1, PREFETCH_ROW_GROUPS // len(owned))
        self._shards = [_shard_chunks(groups, shard, shards, per_shard, seed, shuffle_buffer, skip_steps,
                                      prefetch, spec)
                        for shard in owned]
        self._spec = spec
        self.steps = skip_steps

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        batch = to_tensors(_concat([next(shard) for shard in self._shards]), self._spec)
        self.steps += 1
        return batch

    def close(self) -> None:
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> "TrainStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def eval_batches(features_dir: str | Path, spec: FeatureSpec, batch_size: int, rank: int,
                 world: int) -> Iterator[Batch]:
    """This rank's disjoint share of the eval split, each row exactly once, in file order (``spec``:
    the dataset's)."""
    path = split_dir(features_dir, "eval")
    _, groups = count_rows(path)
    stride = _strides_rows(path, groups, world)
    chunks = _eval_chunks(path, spec.event_schema.training_columns, rank, world, stride)
    try:
        for columns in _rechunk(chunks, batch_size, keep_partial=True):
            yield to_tensors(columns, spec)
    finally:
        chunks.close()
