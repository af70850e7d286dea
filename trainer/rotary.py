"""Rotary encodings for the ranker's attention: none, ordinal RoPE, TO-RoPE and SIREN-RoPE.

Each encoding maps a batch to one angle per token and frequency pair, ``Θ`` of shape
``[B, C, d_head/2]`` in fp32. The ranker computes it once per forward pass and rotates the queries
and keys of every head and layer by it (:func:`rotate`). After rotation ``q_i · k_j`` depends on
``Θ(i) − Θ(j)`` only, so the encodings differ only in where they put each token on each pair's
circle (docs/design.md, "SIREN-RoPE")::

    none      Θ_j(i) = 0
    ordinal   Θ_j(i) = p_i · θ_j                       θ_j = base^(−2j/d_head)
    to_rope   Θ_j(i) = (p_i + β · Δ_i) · θ_j            Δ_i = hours from token i to the newest
    siren     Θ_j(i) = f(x_i)_j · ω_j + λ · p_i · θ_j   f = f_sin + f_dnn
                                                        x_i = [t̃_i, sin/cos of each rotary period]

``p_i`` is the reverse ordinal position: rows are left-padded, so column ``k`` of a row of width
``C`` is ``p = C − 1 − k`` (newest token 0) whatever the row's length.

Causality. Token i's prediction may depend on tokens j ≤ i only (its own features and its
history), so nothing that puts token i on its circle may depend on a later token. Appending k
tokens to a row adds k to every earlier ``p``; that is harmless where p enters linearly (ordinal,
TO-RoPE, the λ · p · θ term: only ``p_i − p_j`` reaches ``q_i · k_j``), but not inside the
non-linear f. The paper's demo code feeds f the normalised reverse position ``p / (C − 1)`` as one
of its inputs; it counts the tokens that *follow* i, so in that code appending a token moves the
angles, and through attention the predictions, of every earlier token, and training (token i
anywhere in the window) differs from serving (the candidate is always the newest token). We leave
it out: x_i holds only the token's own time features (:class:`TimeFeatures`), and order enters
through λ · p · θ alone.

What x_i holds comes from the event schema (``rotary`` in ``conf/schemas/NAME.yaml``): t̃, then the
cyclical columns of ``rotary.periods`` (the feed: time of day and day of week, so
x_i = [t̃, tod_sin, tod_cos, dow_sin, dow_cos]), and with ``model.categorical_input`` embeddings of
the ids of ``rotary.categoricals`` (the feed: content type, topic, surface).

All angle math runs in fp32 with autocast off, and reads parameters through ``.float()``, so it
stays fp32 under ``torch.autocast`` and also when a wrapper casts the module's parameters to bf16.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from features.spec import SECONDS_PER_DAY, TS_COLUMN

YEAR_SECONDS = 365.25 * SECONDS_PER_DAY
HOUR_SECONDS = 3600.0
METADATA_EMBEDDING_DIM = 8
TO_ROPE_TIME_SCALE_INIT = 0.01
"""β at init: one hour counts as 0.01 positions, so TO-RoPE starts close to ordinal RoPE."""
# The learned scalars (λ, β) have shape [1], not []: DeepSpeed's initial weight broadcast views
# every parameter as bytes, which fails for 0-dim tensors.


def reverse_positions(width: int, device: torch.device) -> Tensor:
    """p = C − 1 − k for columns k = 0 … C − 1, fp32 ``[C]`` (newest token 0)."""
    return torch.arange(width - 1, -1, -1, device=device, dtype=torch.float32)


def rope_frequencies(d_head: int, base: float, device: torch.device) -> Tensor:
    """θ_j = base^(−2j/d_head) for j = 0 … d_head/2 − 1, fp32 ``[d_head/2]``.

    Computed on the fly (a few elements) rather than kept as a buffer, so no dtype cast of the
    module can round it.
    """
    exponents = torch.arange(0, d_head, 2, device=device, dtype=torch.float64) / d_head
    return (base ** -exponents).to(torch.float32)


def has_timestamp(batch: dict[str, Tensor]) -> Tensor:
    """True where the token has an event time; ``ts == 0`` marks padding or a missing time."""
    return batch[TS_COLUMN] > 0


def unit_rotations(angles: Tensor) -> Tensor:
    """e^{iΘ}: the rotations as unit complex numbers (complex64), computed once per forward pass."""
    angles = angles.float()
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x: Tensor, rotations: Tensor) -> Tensor:
    """Rotate each pair ``(x[..., 2j], x[..., 2j + 1])`` by ``rotations[..., j]`` (from
    :func:`unit_rotations`, broadcasting against ``x[..., ::2]``).

    The pair as a complex number times e^{iΘ} is the 2×2 rotation in one fused multiply (forward
    and backward), in complex64, i.e. fp32. Returns fp32; the caller casts back to its dtype.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotations).flatten(-2)


def _affine_fp32(layer: nn.Linear, x: Tensor, scale: float = 1.0) -> Tensor:
    """``scale · (x Wᵀ + b)`` over the last dimension, in fp32, as one fused kernel (the scale
    rides along in forward and backward instead of costing a separate multiply)."""
    out = torch.addmm(layer.bias.float(), x.flatten(0, -2), layer.weight.float().t(), beta=scale, alpha=scale)
    return out.view(*x.shape[:-1], out.shape[-1])


class TimeFeatures(nn.Module):
    """x_i = [t̃, c_1, …, c_k] per token, fp32 ``[B, C, 1 + k]``::

        t̃ = clamp((T − T_ref) / year, −H, H)        H = horizon_years (model.time_horizon_years)

    with c the row's own ``cyclical_columns``, ``sin/cos(2π·T/P)`` per period P as features.spec
    computes them (the schema's ``rotary_cyclical_columns``; the feed's are time of day and day of
    week, so x_i = [t̃, tod_sin, tod_cos, dow_sin, dow_cos]). Every entry is a function of token i's
    own event time T, so x_i is causal (the module docstring says why the paper's reverse-position
    input is not here). A token without a timestamp gets all zeros.

    ``T_ref`` is a persistent int64 buffer: a checkpoint restores the anchor it was trained with, a
    warm start keeps it (re-anchoring, :meth:`set_time_reference`, would move every t̃ the weights
    have learned from), and the export records it. What keeps long-running incremental training
    sound far from ``T_ref`` is the clamp: beyond ``H`` years t̃ saturates instead of feeding f
    values ever further outside the range it was trained on, while the cyclical terms keep their
    meaning.
    """

    def __init__(self, t_ref_seconds: float, horizon_years: float, cyclical_columns: Sequence[str]):
        super().__init__()
        self.horizon_years = horizon_years
        self.cyclical_columns = tuple(cyclical_columns)
        self.register_buffer("t_ref_seconds", torch.tensor(int(t_ref_seconds), dtype=torch.int64))

    @property
    def count(self) -> int:
        """Entries of x_i: 1 + k."""
        return 1 + len(self.cyclical_columns)

    def set_time_reference(self, t_ref_seconds: float) -> None:
        self.t_ref_seconds.fill_(int(t_ref_seconds))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ts = batch[TS_COLUMN]
        # Subtract in int64: epoch seconds do not fit fp32 exactly (one ulp is 128 s).
        years = (ts - self.t_ref_seconds).to(torch.float32) / YEAR_SECONDS
        features = torch.stack(
            [years.clamp(-self.horizon_years, self.horizon_years)]
            + [batch[column].to(torch.float32) for column in self.cyclical_columns], dim=-1)
        return features * has_timestamp(batch).unsqueeze(-1)


class RotaryEncoding(nn.Module):
    """Base: ``forward(batch)`` (alias :meth:`angles`) returns Θ, fp32 ``[B, C, d_head/2]``."""

    def __init__(self, d_head: int, rope_base: float):
        super().__init__()
        self.d_head = d_head
        self.pairs = d_head // 2
        self.rope_base = rope_base

    def angles(self, batch: dict[str, Tensor]) -> Tensor:
        return self(batch)

    def ordinal_angles(self, batch: dict[str, Tensor]) -> Tensor:
        """p · θ, fp32 ``[C, d_head/2]`` (broadcasts over the batch)."""
        ts = batch[TS_COLUMN]
        positions = reverse_positions(ts.shape[1], ts.device)
        return positions.unsqueeze(-1) * rope_frequencies(self.d_head, self.rope_base, ts.device)


class NoRotary(RotaryEncoding):
    """No positional signal in attention: Θ = 0 (rotation by zero is the identity)."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ts = batch[TS_COLUMN]
        return torch.zeros(*ts.shape, self.pairs, device=ts.device, dtype=torch.float32)


class OrdinalRoPE(RotaryEncoding):
    """Standard RoPE over reverse ordinal positions: Θ_j(i) = p_i · θ_j."""

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ts = batch[TS_COLUMN]
        return self.ordinal_angles(batch).expand(ts.shape[0], -1, -1)


class TORoPE(RotaryEncoding):
    """Time-and-order RoPE: Θ_j(i) = (p_i + β · Δ_i) · θ_j, β learned.

    ``Δ_i`` is the linear time in hours from token i to the row's newest timestamp. Being linear,
    the newest time cancels in every difference Θ(i) − Θ(j), so a later token's timestamp cannot
    move the attention scores of earlier tokens (a log scale would let it). A token without a
    timestamp gets Δ = 0.
    """

    def __init__(self, d_head: int, rope_base: float):
        super().__init__(d_head, rope_base)
        self.time_scale = nn.Parameter(torch.full((1,), TO_ROPE_TIME_SCALE_INIT))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ts = batch[TS_COLUMN]
        with torch.autocast(device_type=ts.device.type, enabled=False):
            newest = ts.amax(dim=1, keepdim=True)
            hours = (newest - ts).to(torch.float32) / HOUR_SECONDS * has_timestamp(batch)
            positions = reverse_positions(ts.shape[1], ts.device) + self.time_scale.float() * hours
            return positions.unsqueeze(-1) * rope_frequencies(self.d_head, self.rope_base, ts.device)


class Siren(nn.Module):
    """f_sin: hidden layers ``sin(ω0 · (W x + b))`` and a linear output (Sitzmann et al., 2020).

    Initialisation keeps every hidden pre-activation (before the bias) ~N(0, 1) and every
    activation arcsine distributed (std 1/√2): first layer W ~ U(−1/in, 1/in), later layers and the output
    W ~ U(−√(6/in)/ω0, √(6/in)/ω0); biases keep PyTorch's default.
    """

    def __init__(self, in_features: int, width: int, hidden_layers: int, out_features: int,
                 omega0: float):
        super().__init__()
        self.omega0 = omega0
        sizes = [in_features] + [width] * hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(width, out_features)
        with torch.no_grad():
            self.hidden[0].weight.uniform_(-1.0 / in_features, 1.0 / in_features)
            for layer in [*self.hidden[1:], self.output]:
                bound = math.sqrt(6.0 / layer.in_features) / omega0
                layer.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = torch.sin(_affine_fp32(layer, x, scale=self.omega0))
        return _affine_fp32(self.output, x)


class ReluMLP(nn.Module):
    """f_dnn: hidden ReLU layers and a linear output, for monotone and aperiodic trends."""

    def __init__(self, in_features: int, width: int, hidden_layers: int, out_features: int):
        super().__init__()
        sizes = [in_features] + [width] * hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(width, out_features)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden:
            x = torch.relu(_affine_fp32(layer, x))
        return _affine_fp32(self.output, x)


class SirenRoPE(RotaryEncoding):
    """Θ_j(i) = f(x_i)_j · ω_j + λ · p_i · θ_j, with f = f_sin + f_dnn (either branch optional).

    f outputs ``angle_count`` values, each repeated over ``d_head/2 / angle_count`` neighbouring
    pairs; ω (one per pair, init π) and the gate λ (init 1) are learned. A token without a
    timestamp keeps only λ · p · θ. x_i's cyclical part is ``cyclical_columns``; with
    ``metadata_buckets`` (id column → rows of the table it reads, in order) an embedding of each of
    those columns' ids joins x_i (the feed: content_type, topic, surface).
    """

    def __init__(self, *, d_head: int, rope_base: float, t_ref_seconds: float,
                 time_horizon_years: float, width: int, siren_layers: int, dnn_layers: int, omega0: float,
                 siren_branch: bool, dnn_branch: bool, ordinal_term: bool, angle_count: int,
                 cyclical_columns: Sequence[str], metadata_buckets: dict[str, int] | None):
        super().__init__(d_head, rope_base)
        self.time_features = TimeFeatures(t_ref_seconds, time_horizon_years, cyclical_columns)
        self.metadata = None if metadata_buckets is None else nn.ModuleDict({
            column: nn.Embedding(rows, METADATA_EMBEDDING_DIM, padding_idx=0)
            for column, rows in metadata_buckets.items()})
        if self.metadata is not None:
            with torch.no_grad():
                for embedding in self.metadata.values():
                    # Inputs in [−1, 1], the range the SIREN initialisation assumes.
                    embedding.weight.uniform_(-1.0, 1.0)
                    embedding.weight[0].zero_()
        in_features = self.time_features.count + (
            0 if self.metadata is None else len(self.metadata) * METADATA_EMBEDDING_DIM)
        self.angle_count = angle_count
        self.siren = Siren(in_features, width, siren_layers, angle_count, omega0) if siren_branch else None
        self.dnn = ReluMLP(in_features, width, dnn_layers, angle_count) if dnn_branch else None
        self.omega = nn.Parameter(torch.full((self.pairs,), math.pi))
        self.ordinal_gate = nn.Parameter(torch.ones(1)) if ordinal_term else None

    def inputs(self, batch: dict[str, Tensor]) -> Tensor:
        """x_i, optionally with metadata embeddings: fp32 ``[B, C, in_features]``."""
        x = self.time_features(batch)
        if self.metadata is None:
            return x
        return torch.cat([x] + [embedding(batch[column]).float()
                                for column, embedding in self.metadata.items()], dim=-1)

    def temporal_function(self, x: Tensor) -> Tensor:
        """f(x) = f_sin(x) + f_dnn(x), one value per frequency pair: ``[B, C, d_head/2]``."""
        branches = [branch(x) for branch in (self.siren, self.dnn) if branch is not None]
        f = branches[0] if len(branches) == 1 else branches[0] + branches[1]
        if self.angle_count < self.pairs:
            f = f.repeat_interleave(self.pairs // self.angle_count, dim=-1)
        return f

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        ts = batch[TS_COLUMN]
        with torch.autocast(device_type=ts.device.type, enabled=False):
            temporal = self.temporal_function(self.inputs(batch)) * self.omega.float()
            angles = temporal * has_timestamp(batch).unsqueeze(-1)
            if self.ordinal_gate is not None:
                angles = angles + self.ordinal_gate.float() * self.ordinal_angles(batch)
            return angles
