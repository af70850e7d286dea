"""The generative ranker: a causal transformer over a user's impressions, attention by SIREN-RoPE.

Token i is one event (for the feed, one impression). Which columns it has comes from the event
schema (``spec.event_schema``, features.schema); its input embedding is the sum of

- the hashed-id embeddings of its categorical columns, ``Σ_c E_{table(c)}[id_{i,c}]``: one table per
  schema table (the feed: item, author, content type, topic, surface, each its own table; a column
  that shares a table, like the watch log's ``origin_post_id``, reads the rows of ``post_id``'s),
  rows of this module's ``nn.Embedding`` tables, or in training rows of the sharded tables of
  trainer.embeddings,
- a projection of its continuous columns (the feed: log gap, log item age; plus any numerics),
- a projection of the PREVIOUS token's actions ``a`` (the feed: click, like, comment, share, log
  dwell) and of a pending indicator: with ``m_i = prev_actions_known_i`` (features.spec: 1 iff
  ``event_ts_{i−1} + duration_{i−1} + delay ≤ event_ts_i``) the input is ``[m_i · a_{i−1}, 1 − m_i]``,
  zeros for the first real token of a row. Token i's own actions and labels never reach its own
  prediction, and an earlier token's actions reach it only if they were known at its event time,
- optionally (``time_in_embedding``) a projection of its time features x_i.

Masking at the carrying token is enough for attention as well. Everything in the input of token j
was known at ``ts_j``: its own impression and the actions of j − 1 if known by then. Token i reads
tokens j < i only (causal), and their hidden states are built from inputs k ≤ j, known at
``ts_k ≤ ts_j ≤ ts_i`` since rows are in time order and what is known stays known. So token i's
prediction depends on no action unknown at ``ts_i``. (The actions of i − 2 reach token i only through
token i − 1, as of ``ts_{i−1}``: some that are known by ``ts_i`` go unused, the price of one mask per
token. An incremental batch places a late event after context that is later than itself; the
feature job judges that context as of its user's earliest new event, so the argument still holds.)

Pre-LN blocks with causal attention (token i attends to real tokens j ≤ i) rotate Q and K (never V)
by the angles of one rotary encoding (trainer.rotary), computed once per forward and shared by
every head and layer. One head per task of the schema gives per-token logits (the feed:
``contribution``, ``like``, ``long_dwell``); the loss is masked BCE weighted per task
(:func:`masked_multitask_loss`, weights :func:`resolve_task_weights`).

Batches are dicts keyed by the column names of the schema's training rows, left-padded to C tokens.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.config import require
from features.schema import (
    LOG_GAP_COLUMN, LOSS_MASK_COLUMN, PREV_ACTIONS_KNOWN_COLUMN, TS_COLUMN, EventSchema,
)
from features.spec import FeatureSpec, cyclical, log_gap, prev_actions_known, transform
from trainer.rotary import (
    NoRotary, OrdinalRoPE, RotaryEncoding, SirenRoPE, TimeFeatures, TORoPE, rotate, unit_rotations,
)

logger = logging.getLogger(__name__)

ROTARY_KINDS: tuple[str, ...] = ("none", "ordinal", "to_rope", "siren")
INIT_STD = 0.02


@dataclass
class ModelConfig:
    """The ranker's shape and its rotary encoding (``model.*`` in the training config)."""

    rotary: str = "siren"
    """none | ordinal | to_rope | siren."""
    n_layers: int = 2
    d_model: int = 128
    n_heads: int = 4
    dropout: float = 0.0
    rope_base: float = 10000.0
    siren_width: int = 64
    """Width of both branches of f."""
    siren_layers: int = 2
    """Hidden layers of f_sin."""
    dnn_layers: int = 2
    """Hidden layers of f_dnn."""
    omega0: float = 10.0
    siren_branch: bool = True
    """f_sin on/off (siren only)."""
    dnn_branch: bool = True
    """f_dnn on/off (siren only)."""
    ordinal_term: bool = True
    """The λ · p · θ term on/off (siren only)."""
    categorical_input: bool = False
    """Embeddings of the schema's ``rotary.categoricals`` (the feed: content_type, topic, surface) as
    extra input to f (siren only)."""
    time_in_embedding: bool = False
    """Add a projection of the time features x_i to the token embeddings."""
    angles_per_pair: int = 0
    """How many distinct angles f outputs: 0 = one per frequency pair; k > 0 = k angles, each
    repeated over d_head/2/k neighbouring pairs."""
    t_ref_seconds: int = 0
    """T_ref (epoch seconds) for t̃; 0 = the caller supplies it (the trainer: the dataset watermark)."""
    time_horizon_years: float = 2.0
    """t̃ is clamped to ± this many years around T_ref (trainer.rotary.TimeFeatures)."""
    task_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight overrides per task; a task not listed keeps its weight from the schema's ``tasks``."""

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self) -> None:
        require(self.rotary in ROTARY_KINDS, "model.rotary",
                f"must be one of {', '.join(ROTARY_KINDS)}, got '{self.rotary}'")
        for key in ("n_layers", "d_model", "n_heads", "siren_width", "siren_layers", "dnn_layers"):
            require(getattr(self, key) >= 1, f"model.{key}", "must be >= 1")
        require(self.d_model % self.n_heads == 0, "model.d_model",
                f"must be divisible by model.n_heads ({self.n_heads})")
        require(self.d_head % 2 == 0, "model.d_model",
                f"d_model / n_heads must be even (rotary pairs), got {self.d_head}")
        require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        require(self.rope_base > 1.0, "model.rope_base", "must be > 1")
        require(self.omega0 > 0.0, "model.omega0", "must be > 0")
        require(self.t_ref_seconds >= 0, "model.t_ref_seconds", "must be >= 0 (0 = from the data)")
        require(self.time_horizon_years > 0.0, "model.time_horizon_years", "must be > 0")
        pairs = self.d_head // 2
        angles = self.angles_per_pair
        require(angles == 0 or (angles > 0 and pairs % angles == 0), "model.angles_per_pair",
                f"must be 0 or divide d_head/2 = {pairs}")
        if self.rotary == "siren":
            require(self.siren_branch or self.dnn_branch, "model.siren_branch",
                    "siren needs at least one of model.siren_branch, model.dnn_branch")
        else:
            # Silently ignoring these would mislabel an ablation run.
            for key in ("siren_branch", "dnn_branch", "ordinal_term"):
                require(getattr(self, key), f"model.{key}", "can only be turned off with model.rotary=siren")
            require(not self.categorical_input, "model.categorical_input", "needs model.rotary=siren")
        for task, weight in self.task_weights.items():
            require(weight >= 0.0, f"model.task_weights.{task}", "must be >= 0")


def resolve_task_weights(config: ModelConfig, schema: EventSchema) -> dict[str, float]:
    """The loss weight of every task, in the schema's task order: the schema's ``tasks`` weights,
    with ``model.task_weights`` overriding some (which tasks there are is the schema's to say, so a
    key that names none is an error here, where the schema is known)."""
    tasks = schema.task_weights
    for task in config.task_weights:
        require(task in tasks, f"model.task_weights.{task}",
                f"not a task of schema '{schema.name}'; its tasks are {', '.join(tasks)}")
    weights = {task: float(config.task_weights.get(task, weight)) for task, weight in tasks.items()}
    require(sum(weights.values()) > 0.0, "model.task_weights", f"must not all be 0 (got {weights})")
    return weights


def build_rotary(config: ModelConfig, spec: FeatureSpec, t_ref_seconds: float) -> RotaryEncoding:
    if config.rotary == "none":
        return NoRotary(config.d_head, config.rope_base)
    if config.rotary == "ordinal":
        return OrdinalRoPE(config.d_head, config.rope_base)
    if config.rotary == "to_rope":
        return TORoPE(config.d_head, config.rope_base)
    schema = spec.event_schema
    if config.categorical_input:
        require(bool(schema.rotary_categoricals), "model.categorical_input",
                f"schema '{schema.name}' lists no rotary.categoricals to embed")
    return SirenRoPE(
        d_head=config.d_head, rope_base=config.rope_base, t_ref_seconds=t_ref_seconds,
        time_horizon_years=config.time_horizon_years, width=config.siren_width,
        siren_layers=config.siren_layers, dnn_layers=config.dnn_layers, omega0=config.omega0,
        siren_branch=config.siren_branch, dnn_branch=config.dnn_branch, ordinal_term=config.ordinal_term,
        angle_count=config.angles_per_pair or config.d_head // 2,
        cyclical_columns=schema.rotary_cyclical_columns,
        metadata_buckets={column: spec.buckets[schema.column_tables[column]]
                          for column in schema.rotary_categoricals} if config.categorical_input else None)


def real_tokens(length: Tensor, width: int) -> Tensor:
    """Boolean ``[B, C]``: True for a row's real tokens, its last ``length`` columns."""
    columns = torch.arange(width, device=length.device)
    return columns >= (width - length.to(columns.dtype)).unsqueeze(1)


def attention_mask(real: Tensor) -> Tensor:
    """Boolean ``[B, 1, C, C]``, True = may attend: causal (key j ≤ query i) and real keys only.

    Every token may also attend to itself, so a padding query (all its earlier keys are padding)
    still has one key and a padding-only row stays finite; real queries never see padding.
    """
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    itself = torch.eye(width, dtype=torch.bool, device=real.device)
    return (causal & (real.unsqueeze(1) | itself)).unsqueeze(1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.residual_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rotations: Tensor, mask: Tensor) -> Tensor:
        batch_size, width, d_model = x.shape
        qkv = self.qkv(x).view(batch_size, width, 3, self.n_heads, d_model // self.n_heads)
        # Q and K rotated together in one fp32 op, cast back to the compute dtype; V as is.
        q, k = rotate(qkv[:, :, :2], rotations).to(qkv.dtype).unbind(dim=2)
        v = qkv[:, :, 2]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0)
        return self.residual_dropout(self.proj(y.transpose(1, 2).reshape(batch_size, width, d_model)))


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, 4 * config.d_model)
        self.proj = nn.Linear(4 * config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.proj(F.gelu(self.up(x))))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(config.d_model)
        self.attention = CausalSelfAttention(config)
        self.feed_forward_norm = nn.LayerNorm(config.d_model)
        self.feed_forward = FeedForward(config)

    def forward(self, x: Tensor, rotations: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attention(self.attention_norm(x), rotations, mask)
        return x + self.feed_forward(self.feed_forward_norm(x))


class GenerativeRanker(nn.Module):
    """Per-token logits for every task of the spec's schema from a batch of left-padded rows.

    The id tables are ``id_embeddings.<table>`` (for the feed, table = column name), the heads one
    output per task in the schema's order, and :attr:`task_weights` the resolved loss weights
    (:func:`resolve_task_weights`). ``t_ref_seconds`` anchors t̃ unless ``config.t_ref_seconds`` is set, which wins. It is kept in a
    persistent buffer, so loading a checkpoint restores the anchor the weights were trained with
    (:meth:`time_reference` reads it, the one source the export records); :meth:`set_time_reference`
    re-anchors.
    """

    def __init__(self, config: ModelConfig, spec: FeatureSpec, t_ref_seconds: float,
                 tables_outside: bool = False):
        super().__init__()
        self.config = config
        self.schema = schema = spec.event_schema
        self.task_weights = resolve_task_weights(config, schema)
        t_ref = config.t_ref_seconds or t_ref_seconds
        d_model = config.d_model
        # Training with sharded tables (trainer.embeddings) passes the looked-up rows to forward.
        self.id_embeddings = nn.ModuleDict({} if tables_outside else {
            table: nn.Embedding(rows, d_model, padding_idx=0) for table, rows in spec.buckets.items()})
        # A schema without continuous columns has nothing to project (a Linear over 0 inputs would
        # be a learned constant the heads' biases already give).
        self.continuous_projection = (nn.Linear(len(schema.continuous_columns), d_model)
                                      if schema.continuous_columns else None)
        # The previous token's actions and the pending indicator (embed).
        self.previous_action_projection = nn.Linear(len(schema.action_columns) + 1, d_model)
        self.time_features = (TimeFeatures(t_ref, config.time_horizon_years, schema.rotary_cyclical_columns)
                              if config.time_in_embedding else None)
        self.time_projection = (nn.Linear(self.time_features.count, d_model)
                                if config.time_in_embedding else None)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(d_model)
        self.heads = nn.Linear(d_model, len(schema.label_columns))
        for child in self.children():
            child.apply(self._init_weights)
        for block in self.blocks:
            # Residual projections scaled so the residual stream's variance does not grow with depth.
            for projection in (block.attention.proj, block.feed_forward.proj):
                nn.init.normal_(projection.weight, mean=0.0, std=INIT_STD / math.sqrt(2 * config.n_layers))
        # Built after the generic init: the rotary encoding initialises itself (Sitzmann for f_sin).
        self.rotary = build_rotary(config, spec, t_ref)
        rotary_count, total = self.parameter_counts()
        logger.info("ranker: rotary=%s, %d parameters, %d in the rotary encoding (%.3f%%)",
                    config.rotary, total, rotary_count, 100.0 * rotary_count / total)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def parameter_counts(self) -> tuple[int, int]:
        """(parameters of the rotary encoding, all parameters)."""
        rotary = sum(parameter.numel() for parameter in self.rotary.parameters())
        return rotary, sum(parameter.numel() for parameter in self.parameters())

    def set_time_reference(self, t_ref_seconds: float) -> None:
        for module in self.modules():
            if isinstance(module, TimeFeatures):
                module.set_time_reference(t_ref_seconds)

    def time_reference(self) -> int | None:
        """The T_ref (epoch seconds) the weights use, read from the time-feature buffers (after a
        checkpoint load, the checkpoint's); None for a model without time features."""
        anchors = {int(module.t_ref_seconds.item()) for module in self.modules()
                   if isinstance(module, TimeFeatures)}
        if len(anchors) > 1:
            raise ValueError(f"the model's time features disagree about T_ref: {sorted(anchors)}")
        return anchors.pop() if anchors else None

    def embed(self, batch: dict[str, Tensor], real: Tensor, looked_up: dict[str, Tensor] | None = None) -> Tensor:
        schema = self.schema
        if looked_up is None:
            looked_up = {column: self.id_embeddings[schema.column_tables[column]](batch[column])
                         for column in schema.id_columns}
        ids = [looked_up[column] for column in schema.id_columns]
        x = sum(ids)  # 0 for a schema without categoricals; the projections below give the shape
        dtype = ids[0].dtype if ids else self.previous_action_projection.weight.dtype
        if self.continuous_projection is not None:
            continuous = torch.stack([batch[column] for column in schema.continuous_columns], dim=-1).to(dtype)
            x = x + self.continuous_projection(continuous)
        known_column = batch[PREV_ACTIONS_KNOWN_COLUMN]
        actions = (torch.stack([batch[column] for column in schema.action_columns], dim=-1)
                   if schema.action_columns else known_column.new_zeros(*known_column.shape, 0)).to(dtype)
        real_column = real.unsqueeze(-1).to(dtype)
        # Shift right by one token: token i sees the actions of token i − 1, never its own.
        previous_actions = F.pad(actions * real_column, (0, 0, 1, -1))
        # Rows are left-padded, so a real previous token implies a real token i.
        has_previous = F.pad(real_column, (0, 0, 1, -1))
        known = known_column.to(dtype).unsqueeze(-1) * has_previous
        # Pending is an input of its own: "not known yet" is not "no action".
        pending = has_previous - known
        x = x + self.previous_action_projection(torch.cat([previous_actions * known, pending], dim=-1))
        if self.time_projection is not None:
            x = x + self.time_projection(self.time_features(batch).to(dtype))
        return x

    def rotation_angles(self, batch: dict[str, Tensor]) -> Tensor:
        """Θ, fp32 ``[B, C, d_head/2]``."""
        return self.rotary(batch)

    def forward(self, batch: dict[str, Tensor], looked_up: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Logits ``[B, C]`` keyed by task. ``looked_up``: every id column's embeddings ``[B, C, d]``
        (keyed by column, a shared table's rows under each column reading it), zeros at padding, when
        the tables live outside this module; otherwise this module's own tables are read."""
        real = real_tokens(batch["length"], batch[TS_COLUMN].shape[1])
        # Once per forward, in fp32; every head of every layer uses the same angles.
        rotations = unit_rotations(self.rotation_angles(batch))[:, :, None, None, :]
        mask = attention_mask(real)
        x = self.embedding_dropout(self.embed(batch, real, looked_up))
        for block in self.blocks:
            x = block(x, rotations, mask)
        logits = self.heads(self.final_norm(x)).float()
        return dict(zip(self.schema.label_columns, logits.unbind(dim=-1)))


def masked_multitask_loss(logits: dict[str, Tensor], batch: dict[str, Tensor],
                          weights: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_task weight · (masked mean BCE-with-logits over ``loss_mask`` tokens), and each task's
    masked mean (detached, for logging). Labels of masked tokens are never read, so anything there
    (even NaN) changes neither the loss nor its gradient."""
    mask = batch[LOSS_MASK_COLUMN].float()
    counted = mask > 0
    tokens = mask.sum().clamp_min(1.0)
    total = torch.zeros((), device=mask.device)
    per_task: dict[str, Tensor] = {}
    for task, task_logits in logits.items():
        if task not in weights:
            raise KeyError(f"no loss weight for task '{task}' "
                           f"(weights given for: {', '.join(sorted(weights))})")
        labels = torch.where(counted, batch[task].float(), 0.0)
        token_losses = F.binary_cross_entropy_with_logits(task_logits.float(), labels, reduction="none")
        loss = (token_losses * mask).sum() / tokens
        per_task[task] = loss.detach()
        total = total + weights[task] * loss
    return total, per_task


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Optimizer groups: decay for weight matrices; none for embeddings and every parameter of
    fewer than two dimensions (ω, λ, β, biases, norm gains)."""
    embedding_parameters = {id(parameter) for module in model.modules() if isinstance(module, nn.Embedding)
                            for parameter in module.parameters(recurse=False)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        exempt = parameter.ndim < 2 or id(parameter) in embedding_parameters
        (no_decay if exempt else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def synthetic_batch(spec: FeatureSpec, batch_size: int, *, seed: int = 0,
                    start_seconds: int = 1_700_000_000) -> dict[str, Tensor]:
    """Random rows in the training-row contract of the spec's schema (left-padded, lengths 1 … C):
    for shape checks, export tracing and benchmarks, never for training.

    Ids are uniform over their table's rows (so a step touches rows all over a table); event times
    have exponential gaps of about an hour; ``log_gap``, the cyclical columns (with a random whole-
    hour UTC offset where the schema has one), the actions and ``prev_actions_known`` are computed by
    features.spec from those times and from random raw values of the fields they read (bool fields
    true with probability 0.2, numeric ones exponential around 8000); the other continuous columns
    are random, and every label is 0/1 with probability 0.2 (a label that is also an action column
    is that column)."""
    schema = spec.event_schema
    config = schema.config
    rng = np.random.default_rng(seed)
    width = spec.context_len
    shape = (batch_size, width)
    lengths = rng.integers(1, width + 1, size=batch_size)
    real = np.arange(width)[None, :] >= (width - lengths)[:, None]
    gaps = rng.exponential(3_600.0, size=shape).astype(np.int64) + 1
    ts = start_seconds + np.cumsum(gaps, axis=1)
    ts = np.where(real, ts, 0)
    columns: dict[str, np.ndarray] = {TS_COLUMN: ts}
    for column in schema.id_columns:
        columns[column] = rng.integers(1, spec.buckets[schema.column_tables[column]], size=shape) * real
    raw: dict[str, np.ndarray] = {}

    def field_values(name: str) -> np.ndarray:
        """One random draw per raw field, shared by every column computed from it."""
        if name not in raw:
            raw[name] = (rng.random(size=shape) < 0.2 if schema.field(name).kind == "bool"
                         else rng.exponential(8_000.0, size=shape))
        return raw[name]

    for column in schema.continuous_columns:
        if column == LOG_GAP_COLUMN:
            columns[column] = np.zeros(shape, dtype=np.float32)
            for row in range(batch_size):
                columns[column][row, real[row]] = log_gap(ts[row, real[row]])
        else:
            columns[column] = np.log1p(rng.exponential(86_400.0, size=shape))
    offset = (rng.integers(-12, 15, size=shape) * 3_600) if schema.utc_offset_field else None
    columns.update(cyclical(ts, schema.periods, offset))
    for column, value in config.actions.columns.items():
        columns[column] = transform(field_values(value.field), value.transforms)
    duration = field_values(schema.known_after_field).astype(np.int64) if schema.known_after_field else None
    columns[PREV_ACTIONS_KNOWN_COLUMN] = np.zeros(shape, dtype=np.float32)
    for row in range(batch_size):
        columns[PREV_ACTIONS_KNOWN_COLUMN][row, real[row]] = prev_actions_known(
            ts[row, real[row]] * 1000, None if duration is None else duration[row, real[row]],
            schema.action_delay_ms)
    for column in schema.label_columns:
        if column not in columns:
            columns[column] = rng.random(size=shape) < 0.2
    columns[LOSS_MASK_COLUMN] = real
    integer = {TS_COLUMN, *schema.id_columns}
    batch = {column: torch.from_numpy(np.where(real, values, 0).astype(
        np.int64 if column in integer else np.float32)) for column, values in columns.items()}
    batch["length"] = torch.from_numpy(lengths.astype(np.int32))
    batch["user_key"] = torch.from_numpy(rng.integers(1, 2**60, size=batch_size, dtype=np.int64))
    return batch
