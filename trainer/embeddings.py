"""The id tables: TorchRec embedding tables sharded across the ranks, their optimizer fused into backward.

Every table of the event schema (``spec.buckets``: table → rows, the hash buckets) is one table
``E_t ∈ R^{rows_t × d_model}``, read by the id columns that hash into it (``column_tables``; the
feed: each column its own table of its name; the watch log: ``post_id`` and ``origin_post_id`` both
read ``post_id``'s, one TorchRec table with two feature names). Token i of a row reads
``E_{table(c)}[id_{i,c}]`` for every id column c, and the ranker adds them (``GenerativeRanker.embed``,
in column order). Id 0 is padding: it is never looked up (only real tokens are), its row stays
zero, and padding tokens get a zero vector, as ``nn.Embedding(padding_idx=0)`` gives them in the
exported model.

Training splits the model in two:

- the **sparse part**, this module: an ``EmbeddingCollection`` wrapped by TorchRec's
  ``DistributedModelParallel``. The planner places each table's shards on the ranks
  (``embeddings.sharding``: the planner's choice, or table-wise, column-wise, row-wise); the
  lookup sends each id to the rank holding its row and the row back (all-to-all), and backward
  sends the rows' gradients back to their owner, where FBGEMM's fused kernel applies the optimizer
  at once (exact row-wise Adagrad by default). A table's rows exist once over all ranks, and a step
  updates and communicates only the rows it looked up.
- the **dense part**, everything else, stays with DeepSpeed (ZeRO, AdamW, gradient clipping, bf16).
  The tables are no parameters of the DeepSpeed module, so its gradient all-reduce and optimizer
  never see them.

Gradient scale. DeepSpeed averages the dense gradients over the W ranks, and TorchRec's all-to-all
divides the gradients it carries back to a row's owner by W (its comm ops' gradient division, on by
default), so both parts follow the gradient of the same global loss, and a run trains the same way
on any number of ranks (tests/trainer/test_embeddings.py holds it to that).

Initialisation is a function of (seed, table name, row) only: every row block of ``INIT_BLOCK_ROWS``
rows is drawn from its own seeded generator, ``E_c[r] ~ N(0, 0.02²)``, ``E_c[0] = 0``, so the
initial tables are the same on 1 or N ranks whatever the plan, and no rank ever materialises a
table it does not hold.

State. :meth:`ShardedTables.save` and :meth:`ShardedTables.load` write and read the shards and the
fused optimizer's state with ``torch.distributed.checkpoint`` (each rank its own shards; a load on
another world size or plan reads the slices it now owns), :meth:`ShardedTables.gather` assembles
whole fp32 tables on rank 0 for the export. ``embeddings.sharding=data_parallel`` keeps today's
dense design instead: plain ``nn.Embedding`` tables inside the DeepSpeed model, replicated, AdamW.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import Tensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

from common.config import require
from features.spec import FeatureSpec
from trainer.config import CPU_OPTIMIZERS, EmbeddingsConfig
from trainer.model import INIT_STD, real_tokens

log = logging.getLogger(__name__)

OPTIMIZER_KERNELS = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                     "adagrad": EmbOptimType.EXACT_ADAGRAD, "sgd": EmbOptimType.EXACT_SGD,
                     "adam": EmbOptimType.ADAM}
"""``embeddings.optimizer`` → FBGEMM's fused kernel."""
INIT_BLOCK_ROWS = 1 << 16
TABLES_DIR = "tables"
"""``checkpoints/<tag>/tables/``: the shards and the fused optimizer state (torch.distributed.checkpoint)."""


def table_features(spec: FeatureSpec) -> dict[str, tuple[str, ...]]:
    """Table → the id columns that read it, in the schema's column order (TorchRec's feature names)."""
    schema = spec.event_schema
    return {table: tuple(column for column in schema.id_columns if schema.column_tables[column] == table)
            for table in spec.buckets}


def initial_rows(seed: int, table: str, first: int, count: int, dim: int) -> Tensor:
    """Rows ``[first, first + count)`` of ``table``'s initial weights, fp32: the same values whatever
    shard asks (each block of ``INIT_BLOCK_ROWS`` rows comes from its own generator)."""
    return torch.cat([rows for _, rows in _initial_blocks(seed, table, first, count, dim)])


def _initial_blocks(seed: int, table: str, first: int, count: int, dim: int) -> Iterator[tuple[int, Tensor]]:
    """:func:`initial_rows` one block at a time: (offset into the range, rows), so a shard of tens of
    millions of rows is initialised without a temporary of its size."""
    table_seed = int.from_bytes(table.encode(), "little") % (2**31)
    for block in range(first // INIT_BLOCK_ROWS, (first + count - 1) // INIT_BLOCK_ROWS + 1):
        generator = torch.Generator().manual_seed(hash((seed, table_seed, block)) % (2**63))
        rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=generator) * INIT_STD
        if block == 0:
            rows[0] = 0.0  # padding
        start = block * INIT_BLOCK_ROWS
        low, high = max(first, start), min(first + count, start + INIT_BLOCK_ROWS)
        yield low - first, rows[low - start:high - start]


def lookup_input(batch: dict[str, Tensor], columns: tuple[str, ...], real: Tensor) -> KeyedJaggedTensor:
    """The real tokens' ids of every column (``real``: :func:`trainer.model.real_tokens`), one jagged
    list per row (a row's last ``length`` tokens)."""
    lengths = batch["length"].to(torch.int64)
    return KeyedJaggedTensor(keys=list(columns), values=torch.cat([batch[column][real] for column in columns]),
                             lengths=lengths.repeat(len(columns)))


@contextlib.contextmanager
def _quiet_torchrec() -> Iterator[None]:
    """The planner's stats tables and its warnings about dry runs are not for our users; the plan
    is logged once, by :func:`describe_plan`."""
    names = ("torchrec", "torchrec.distributed.planner.stats", "torchrec.distributed.planner.types",
             "torchrec.distributed.planner.storage_reservations")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class ShardedTables:
    """The id tables of one rank's training run: sharded, fused-optimised, checkpointed (collective
    methods must be called by every rank)."""

    def __init__(self, config: EmbeddingsConfig, spec: FeatureSpec, dim: int, device: torch.device,
                 seed: int):
        self.config = config
        self.rows = dict(spec.buckets)
        """Table → rows."""
        self.features = table_features(spec)
        self.columns = tuple(column for columns in self.features.values() for column in columns)
        """The id columns looked up, grouped by table (the order of the lookup's keys)."""
        self.dim = dim
        self.world = dist.get_world_size()
        if device.type == "cpu":
            require(config.optimizer in CPU_OPTIMIZERS, "embeddings.optimizer",
                    f"'{config.optimizer}' needs GPU ranks; on CPU use one of {', '.join(CPU_OPTIMIZERS)}")
        collection = EmbeddingCollection(
            tables=[EmbeddingConfig(name=table, num_embeddings=rows, embedding_dim=dim,
                                    feature_names=list(self.features[table]))
                    for table, rows in self.rows.items()],
            device=torch.device("meta"))
        fused = {"optimizer": OPTIMIZER_KERNELS[config.optimizer], "learning_rate": config.lr, "eps": config.eps}
        if config.optimizer == "adam":
            fused["beta1"], fused["beta2"] = config.betas
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        with _quiet_torchrec():
            topology = TopologyFactory.create_topology(
                trainer_config=TrainerConfig(world_size=self.world,
                                             local_world_size=int(os.environ.get("LOCAL_SIZE", self.world))),
                kernel_config=KernelConfig(compute_device=device.type))
            planner = EmbeddingShardingPlanner(topology=topology, constraints=self._constraints())
            self.plan = planner.collective_plan(collection, [sharder], dist.GroupMember.WORLD)
            self.module = DistributedModelParallel(collection, device=device, plan=self.plan, sharders=[sharder])
        self._initialise(seed)
        if dist.get_rank() == 0:
            log.info("id tables (%s, %s, lr %g):\n%s", config.sharding, config.optimizer, config.lr,
                     describe_plan(self.plan))

    def _constraints(self) -> dict[str, ParameterConstraints]:
        kinds = None if self.config.sharding == "auto" else [self.config.sharding]
        shard_dim = self.config.column_shard_dim or max(1, self.dim // self.world)
        if self.config.sharding == "column_wise":
            require(self.dim % shard_dim == 0, "embeddings.column_shard_dim",
                    f"must divide d_model ({self.dim})")
        return {table: ParameterConstraints(sharding_types=kinds, compute_kernels=["fused"],
                                            min_partition=shard_dim if kinds == ["column_wise"] else None)
                for table in self.rows}

    def _weights(self) -> dict[str, "torch.distributed._shard.sharded_tensor.ShardedTensor"]:
        return {table: self.module.state_dict()[f"embeddings.{table}.weight"] for table in self.rows}

    @torch.no_grad()
    def _initialise(self, seed: int) -> None:
        for table, weight in self._weights().items():
            for shard in weight.local_shards():
                (first, column_start), (count, width) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                for offset, rows in _initial_blocks(seed, table, first, count, self.dim):
                    shard.tensor[offset:offset + len(rows)].copy_(rows[:, column_start:column_start + width])

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every id column's embeddings ``[B, C, d]`` (zeros at padding), keyed by column, from the
        ranks holding the rows of its table."""
        real = real_tokens(batch["length"], batch[self.columns[0]].shape[1])
        looked_up = self.module(lookup_input(batch, self.columns, real))
        real = real.unsqueeze(-1)
        embedded = {}
        for column in self.columns:
            values = looked_up[column].values()
            embedded[column] = values.new_zeros(*real.shape[:2], self.dim).masked_scatter(real, values)
        return embedded

    def idle(self, context_len: int) -> None:
        """Take part in a lookup with nothing to look up (a rank whose evaluation share ran out)."""
        empty = {column: torch.zeros(1, context_len, dtype=torch.int64) for column in self.columns}
        empty["length"] = torch.zeros(1, dtype=torch.int32)
        with torch.no_grad():
            self(empty)

    # --- state ------------------------------------------------------------------------------

    def _state(self) -> dict[str, object]:
        return {"weights": self.module.state_dict(), "optimizer": self.module.fused_optimizer.state_dict()}

    def save(self, checkpoint_dir: Path) -> None:
        """Write this rank's shards and optimizer state under ``checkpoint_dir/tables`` (collective)."""
        dcp.save(self._state(), checkpoint_id=str(Path(checkpoint_dir) / TABLES_DIR))

    def load(self, checkpoint_dir: Path) -> None:
        """Read the shards this rank holds now, whatever world size or plan wrote them (collective)."""
        path = Path(checkpoint_dir) / TABLES_DIR
        state = self._state()
        self._check_shapes(path, state)
        dcp.load(state, checkpoint_id=str(path))
        self.module.fused_optimizer.load_state_dict(state["optimizer"])

    @staticmethod
    def _check_shapes(path: Path, state: dict[str, object]) -> None:
        """Say which table does not fit, rather than a shape error from deep inside the loader."""
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        for prefix, group in (("weights", state["weights"]), ("optimizer", state["optimizer"]["state"])):
            for name, value in _tensors(group):
                key = f"{prefix}.{name}" if prefix == "weights" else f"optimizer.state.{name}"
                if key not in saved:
                    raise ValueError(f"{path} holds no {key}: it was written for other tables")
                size = getattr(saved[key], "size", None)
                if size is not None and tuple(size) != tuple(value.size()):
                    raise ValueError(
                        f"{path}: {key} was saved with shape {tuple(size)}, this run needs {tuple(value.size())} "
                        "(another number of column shards: resume with the embeddings.sharding and "
                        "embeddings.column_shard_dim it was trained with)")

    def gather(self, into: dict[str, Tensor] | None) -> None:
        """Copy every whole table into ``into[table]`` (fp32 ``[rows, d]``) on rank 0; other ranks pass
        ``None`` (collective)."""
        for table, weight in self._weights().items():
            weight.gather(dst=0, out=None if into is None else into[table])


def _tensors(group, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    for name, value in group.items():
        if isinstance(value, dict):
            yield from _tensors(value, f"{prefix}{name}.")
        elif isinstance(value, Tensor):
            yield f"{prefix}{name}", value


def describe_plan(plan) -> str:
    """One line per table: its sharding type and where its shards are (rank: rows × columns at offset)."""
    lines = []
    for module_plan in plan.plan.values():
        for table, parameter in module_plan.items():
            shards = ", ".join(
                f"rank {shard.placement.rank()}: rows {shard.shard_offsets[0]}+{shard.shard_sizes[0]} "
                f"cols {shard.shard_offsets[1]}+{shard.shard_sizes[1]}"
                for shard in parameter.sharding_spec.shards) if parameter.sharding_spec else "replicated"
            lines.append(f"  {table}: {parameter.sharding_type} ({shards})")
    return "\n".join(lines)
