"""Exact evaluation metrics for the multi-task ranker, mergeable across ranks (docs/design.md, "Metrics").

For one binary task with predictions ``p``, labels ``y`` and N tokens:

- log loss  = −mean(y·log p + (1−y)·log(1−p)), with p clipped to [1e-7, 1−1e-7]
- NE        = log loss / H(p̄),  H(p̄) = −(p̄·log p̄ + (1−p̄)·log(1−p̄)),  p̄ = mean(y)
              (lower is better; a constant predictor of p̄ scores exactly 1)
- AUC       = P(p_pos > p_neg) + ½·P(p_pos = p_neg), counted exactly over every (positive, negative)
              pair (Mann–Whitney U with ties worth ½), in O(N log N) by sorting into tie groups
- GAUC      = Σ_u n_u·AUC_u / Σ_u n_u over users u that have both classes, n_u = u's impressions
- calibration = mean(p) / mean(y)
- ECE       = Σ_b (n_b/N)·|mean_p_b − mean_y_b| over ``bins`` equal-width bins on [0, 1] (last bin
              closed), i.e. Σ_b |Σ_{i∈b} p_i − Σ_{i∈b} y_i| / N

Undefined values are ``nan``: every metric of an empty set; NE, AUC and calibration when all labels
are one class (H(p̄) = 0, no pairs, mean(y) = 0); GAUC when no user has both classes or no user ids
were given.

:class:`EvalAccumulator` keeps every label-bearing token (float64, CPU) instead of running sums, so
AUC and GAUC stay exact; :meth:`EvalAccumulator.gather` concatenates the ranks' tokens, and a 2-rank
evaluation equals a 1-rank evaluation of the same tokens up to float summation order.

Two models evaluated on the same tokens are compared event by event (the evaluation gate,
:mod:`lifecycle.gate`): :func:`event_log_loss` gives each token's log-loss term, and
:func:`clustered_mean` the mean of their differences with a standard error that counts users, not
tokens, as the independent units.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

PROB_EPSILON = 1e-7
METRIC_NAMES: tuple[str, ...] = (
    "ne", "log_loss", "auc", "gauc", "calibration", "ece", "base_rate", "mean_pred", "count")

ArrayLike = Union[torch.Tensor, np.ndarray]


def binary_metrics(pred: np.ndarray, label: np.ndarray, user: np.ndarray | None = None,
                   bins: int = 15) -> dict[str, float]:
    """Every metric of one binary task over all of ``pred`` / ``label`` (1-D, same length).

    ``user`` (optional, same length) groups tokens for GAUC. Raises ``ValueError`` for mismatched
    shapes, predictions that are not finite probabilities, or labels other than 0/1.
    """
    pred = np.asarray(pred, dtype=np.float64)
    label = np.asarray(label, dtype=np.float64)
    _check_binary(pred, label, "pred", "label")
    if user is not None:
        user = np.asarray(user)
        if user.shape != pred.shape:
            raise ValueError(f"user has shape {user.shape}, pred has shape {pred.shape}; they must match")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")

    count = pred.size
    if count == 0:
        return {name: (0.0 if name == "count" else math.nan) for name in METRIC_NAMES}

    base_rate = float(label.mean())
    mean_pred = float(pred.mean())
    log_loss = _log_loss(pred, label)
    entropy = _entropy(base_rate)
    auc = float(_auc_by_group(pred, label, np.zeros(count, dtype=np.int64))[0][0])
    gauc = _gauc(pred, label, user) if user is not None else math.nan
    return {
        "ne": log_loss / entropy if entropy > 0 else math.nan,
        "log_loss": log_loss,
        "auc": auc,
        "gauc": gauc,
        "calibration": mean_pred / base_rate if base_rate > 0 else math.nan,
        "ece": _ece(pred, label, bins),
        "base_rate": base_rate,
        "mean_pred": mean_pred,
        "count": float(count),
    }


def _check_binary(pred: np.ndarray, label: np.ndarray, pred_name: str, label_name: str) -> None:
    if pred.shape != label.shape:
        raise ValueError(f"{pred_name} has shape {pred.shape}, {label_name} has shape {label.shape}; "
                         "they must match")
    if pred.size and not (np.isfinite(pred).all() and pred.min() >= 0.0 and pred.max() <= 1.0):
        raise ValueError(f"{pred_name} must be finite probabilities in [0, 1]; got values in "
                         f"[{np.nanmin(pred)}, {np.nanmax(pred)}], nan: {bool(np.isnan(pred).any())}")
    if label.size and not np.isin(label, (0.0, 1.0)).all():
        bad = label[~np.isin(label, (0.0, 1.0))][:5]
        raise ValueError(f"{label_name} must be 0 or 1; found e.g. {bad.tolist()}")


def event_log_loss(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-event log loss ``ℓ_i = −(y_i·log p_i + (1−y_i)·log(1−p_i))``, p clipped to
    [1e-7, 1−1e-7]: the terms whose mean is ``log_loss`` (paired comparisons of two models use them)."""
    p = np.clip(np.asarray(pred, dtype=np.float64), PROB_EPSILON, 1.0 - PROB_EPSILON)
    label = np.asarray(label, dtype=np.float64)
    return -(label * np.log(p) + (1.0 - label) * np.log1p(-p))


def clustered_mean(values: np.ndarray, cluster: np.ndarray) -> tuple[float, float]:
    """Mean of per-event ``values`` and its standard error when events are clustered (by user):

        mean = Σ_i v_i / N,   se² = G/(G−1) · Σ_g (Σ_{i∈g} (v_i − mean))² / N²

    over the G distinct clusters g (the cluster-robust variance of a mean). One user's events are
    correlated, so the events-are-independent ``std/√N`` would understate the noise. ``se`` is nan
    with fewer than two clusters, ``mean`` with no event.
    """
    values = np.asarray(values, dtype=np.float64)
    cluster = np.asarray(cluster)
    if values.shape != cluster.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and cluster {cluster.shape} must be 1-D and of one shape")
    if values.size == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    _, which = np.unique(cluster, return_inverse=True)
    clusters = int(which.max()) + 1
    if clusters < 2:
        return mean, math.nan
    residual_sums = np.bincount(which, weights=values - mean, minlength=clusters)
    variance = clusters / (clusters - 1) * float(np.sum(residual_sums ** 2)) / values.size ** 2
    return mean, math.sqrt(variance)


def _log_loss(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(event_log_loss(pred, label)))


def _entropy(rate: float) -> float:
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log1p(-rate))


def _auc_by_group(score: np.ndarray, label: np.ndarray, group: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC AUC of every group: ``(auc, positives, negatives)``, one entry per distinct group.

    Sorting by (group, score) lines each group's tokens up in tie blocks of equal score. A positive
    beats every negative in a lower block of its group and ties with the negatives of its own block,
    so twice the Mann–Whitney U of a block is ``pos_b · (2·neg_below_b + neg_b)``: integers, summed
    exactly in int64. ``auc`` is nan for a group with a single class.
    """
    order = np.lexsort((score, group))
    group, score, positive = group[order], score[order], label[order].astype(np.int64)
    block_start = np.flatnonzero(np.r_[True, (group[1:] != group[:-1]) | (score[1:] != score[:-1])])
    pos_b = np.add.reduceat(positive, block_start)
    neg_b = np.diff(np.r_[block_start, group.size]) - pos_b

    block_group = group[block_start]
    first_block = np.flatnonzero(np.r_[True, block_group[1:] != block_group[:-1]])
    group_of_block = np.cumsum(np.r_[True, block_group[1:] != block_group[:-1]]) - 1
    neg_before = np.cumsum(neg_b) - neg_b  # negatives in all earlier blocks, of any group
    neg_below = neg_before - neg_before[first_block][group_of_block]

    twice_u = np.add.reduceat(pos_b * (2 * neg_below + neg_b), first_block)
    positives = np.add.reduceat(pos_b, first_block)
    negatives = np.add.reduceat(neg_b, first_block)
    pairs = positives * negatives
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = np.where(pairs > 0, twice_u / (2.0 * pairs), math.nan)
    return auc, positives, negatives


def _gauc(pred: np.ndarray, label: np.ndarray, user: np.ndarray) -> float:
    auc, positives, negatives = _auc_by_group(pred, label, user)
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        return math.nan
    impressions = (positives + negatives)[both].astype(np.float64)
    return float(np.sum(impressions * auc[both]) / impressions.sum())


def _ece(pred: np.ndarray, label: np.ndarray, bins: int) -> float:
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, bins - 1)
    pred_sum = np.bincount(which, weights=pred, minlength=bins)
    label_sum = np.bincount(which, weights=label, minlength=bins)
    return float(np.abs(pred_sum - label_sum).sum() / pred.size)


def _to_numpy(value: ArrayLike, dtype: np.dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        torch_dtype = torch.float64 if dtype == np.float64 else torch.int64
        return value.detach().to(device="cpu", dtype=torch_dtype).numpy()
    return np.asarray(value, dtype=dtype)


class EvalAccumulator:
    """Every label-bearing token of an evaluation, per task (the schema's, ``label_columns``),
    ready for exact metrics.

    Call :meth:`add` per batch, :meth:`gather` once on every rank, then :meth:`compute`.
    """

    def __init__(self, tasks: Sequence[str]):
        self.tasks: tuple[str, ...] = tuple(tasks)
        if not self.tasks or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks must be distinct and non-empty, got {self.tasks}")
        self._preds: dict[str, list[np.ndarray]] = {task: [] for task in self.tasks}
        self._labels: dict[str, list[np.ndarray]] = {task: [] for task in self.tasks}
        self._users: list[np.ndarray] = []

    def __len__(self) -> int:
        """Tokens kept so far (the same for every task)."""
        return sum(chunk.size for chunk in self._users)

    def add(self, probs: Mapping[str, ArrayLike], labels: Mapping[str, ArrayLike], mask: ArrayLike,
            user_key: ArrayLike) -> None:
        """Keep the tokens with ``mask == 1``.

        ``probs[task]``, ``labels[task]`` and ``mask`` are [B, C] (probabilities, 0/1 labels, the
        loss mask); ``user_key`` is [B]. Tensors may live on any device and have any float dtype.
        """
        mask = _to_numpy(mask, np.float64)
        if mask.ndim != 2:
            raise ValueError(f"mask must be [B, C], got shape {mask.shape}")
        if not np.isin(mask, (0.0, 1.0)).all():
            raise ValueError("mask must hold only 0 and 1")
        user_key = _to_numpy(user_key, np.int64)
        if user_key.shape != mask.shape[:1]:
            raise ValueError(f"user_key must be [B] = {mask.shape[:1]}, got shape {user_key.shape}")
        keep = mask == 1.0

        batch_preds, batch_labels = {}, {}
        for task in self.tasks:
            if task not in probs or task not in labels:
                raise ValueError(f"task '{task}' missing from probs ({sorted(probs)}) "
                                 f"or labels ({sorted(labels)})")
            pred = _to_numpy(probs[task], np.float64)
            label = _to_numpy(labels[task], np.float64)
            if pred.shape != mask.shape:
                raise ValueError(f"probs['{task}'] has shape {pred.shape}, mask has shape {mask.shape}")
            batch_preds[task], batch_labels[task] = pred[keep], label[keep]
            _check_binary(batch_preds[task], batch_labels[task], f"probs['{task}']", f"labels['{task}']")
        for task in self.tasks:
            self._preds[task].append(batch_preds[task])
            self._labels[task].append(batch_labels[task])
        self._users.append(np.broadcast_to(user_key[:, None], mask.shape)[keep])

    def merge(self, other: "EvalAccumulator") -> "EvalAccumulator":
        """A new accumulator holding this one's tokens followed by ``other``'s (neither changes)."""
        if other.tasks != self.tasks:
            raise ValueError(f"cannot merge accumulators of different tasks: {self.tasks} vs {other.tasks}")
        merged = EvalAccumulator(self.tasks)
        for task in self.tasks:
            merged._preds[task] = self._preds[task] + other._preds[task]
            merged._labels[task] = self._labels[task] + other._labels[task]
        merged._users = self._users + other._users
        return merged

    def gather(self, group: dist.ProcessGroup | None = None) -> "EvalAccumulator":
        """Collective: every rank of ``group`` calls it and gets all ranks' tokens, in rank order.

        Returns ``self`` when torch.distributed is not initialised. Sends two padded tensors per
        rank (float64 predictions and labels, int64 user keys: 60-bit keys would not survive a
        float) with ``all_gather``, so it works on gloo and NCCL (NCCL ranks must have set their
        CUDA device) and with ranks that hold no token. Every rank ends up holding the whole
        evaluation set in host memory.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        world = dist.get_world_size(group)
        device = (torch.device("cuda", torch.cuda.current_device())
                  if dist.get_backend(group) == "nccl" else torch.device("cpu"))

        values, users = self._packed()
        shape = torch.tensor([values.shape[0], values.shape[1]], dtype=torch.int64, device=device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape, group=group)
        rows = [int(s[0]) for s in shapes]
        widths = {int(s[1]) for s in shapes}
        if widths != {values.shape[1]}:
            raise ValueError(f"ranks accumulate different task counts ({sorted(widths)}); "
                             "every rank must use the same tasks")
        padded_rows = max(max(rows), 1)  # all_gather needs equal shapes; never zero-sized
        values_out = self._all_gather_padded(values, padded_rows, world, device, group)
        users_out = self._all_gather_padded(users, padded_rows, world, device, group)

        merged = EvalAccumulator(self.tasks)
        for rank_values, rank_users, n in zip(values_out, users_out, rows):
            merged._append_packed(rank_values[:n].cpu().numpy(), rank_users[:n].cpu().numpy())
        logger.debug("gathered %d tokens from %d ranks (%s)", len(merged), world, rows)
        return merged

    @staticmethod
    def _all_gather_padded(local: np.ndarray, rows: int, world: int, device: torch.device,
                           group: dist.ProcessGroup | None) -> list[torch.Tensor]:
        padded = torch.zeros((rows,) + local.shape[1:], dtype=torch.from_numpy(local).dtype, device=device)
        padded[: local.shape[0]] = torch.from_numpy(local).to(device)
        out = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(out, padded, group=group)
        return out

    def _packed(self) -> tuple[np.ndarray, np.ndarray]:
        """``[N, 2·tasks]`` float64 (pred, label per task) and ``[N]`` int64 user keys."""
        columns = []
        for task in self.tasks:
            columns += [_concat(self._preds[task], np.float64), _concat(self._labels[task], np.float64)]
        return np.stack(columns, axis=1), _concat(self._users, np.int64)

    def _append_packed(self, values: np.ndarray, users: np.ndarray) -> None:
        for index, task in enumerate(self.tasks):
            self._preds[task].append(values[:, 2 * index])
            self._labels[task].append(values[:, 2 * index + 1])
        self._users.append(users)

    def tokens(self, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(pred, label, user_key)`` of every token held for ``task``, in the order added."""
        return (_concat(self._preds[task], np.float64), _concat(self._labels[task], np.float64),
                _concat(self._users, np.int64))

    def compute(self, bins: int = 15) -> dict[str, dict[str, float]]:
        """Task → :func:`binary_metrics` over every token held (call after :meth:`gather`)."""
        users = _concat(self._users, np.int64)
        return {task: binary_metrics(_concat(self._preds[task], np.float64),
                                     _concat(self._labels[task], np.float64), users, bins)
                for task in self.tasks}


def _concat(chunks: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate(chunks).astype(dtype, copy=False) if chunks else np.zeros(0, dtype=dtype)


TABLE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("NE", "ne"), ("AUC", "auc"), ("GAUC", "gauc"), ("ECE", "ece"), ("calib", "calibration"))


def format_table(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> str:
    """A fixed-width table of run/variant → task → metrics, one line per (run, task).

    With more than one run, ``ΔNE%`` gives each run's relative NE change against the first run on
    the same task (negative is better), the number the SIREN-RoPE comparison is read from.
    """
    compare = len(results) > 1
    baseline = next(iter(results.values()), {})
    header = ["run", "task"] + [title for title, _ in TABLE_COLUMNS]
    header += (["ΔNE%"] if compare else []) + ["count"]
    rows = []
    for run, tasks in results.items():
        for task, metrics in tasks.items():
            row = [run, task] + [_number(metrics.get(key, math.nan), 4) for _, key in TABLE_COLUMNS]
            if compare:
                base_ne = baseline.get(task, {}).get("ne", math.nan)
                row.append(_number(100.0 * (metrics.get("ne", math.nan) / base_ne - 1.0), 2, signed=True)
                           if base_ne else "n/a")
            count = metrics.get("count", math.nan)
            row.append(str(int(count)) if math.isfinite(count) else "n/a")
            rows.append(row)
    widths = [max(len(line[i]) for line in [header] + rows) for i in range(len(header))]
    text_columns = 2  # run and task are left-aligned, numbers right-aligned

    def render(line: list[str]) -> str:
        cells = [cell.ljust(width) if i < text_columns else cell.rjust(width)
                 for i, (cell, width) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule] + [render(row) for row in rows])


def _number(value: float, digits: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
