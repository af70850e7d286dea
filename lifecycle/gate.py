"""The evaluation gate: a candidate replaces the published model only when it is shown not to be worse.

Both models are evaluated exactly (:func:`trainer.evaluate.evaluate_tokens`, in this process) on the
same freshest held-out slice, so every label-bearing event i of a task has a log-loss term under
each model, ℓᶜ_i for the candidate and ℓᵖ_i for the published one
(:func:`trainer.metrics.event_log_loss`). For every task t, over its N events of G users:

    d_i       = ℓᶜ_i − ℓᵖ_i                                  paired per-event difference
    d̄         = Σ_i d_i / N                                   the candidate's change in log loss
    se²       = G/(G−1) · Σ_u (Σ_{i∈u} (d_i − d̄))² / N²       clustered by user (trainer.metrics.clustered_mean)
    [lo, hi]  = d̄ ∓ z·se,   z = Φ⁻¹((1 + confidence) / 2)     normal approximation over users
    m_t       = tolerance_t · ℓ̄ᵖ,   ℓ̄ᵖ = Σ_i ℓᵖ_i / N         the regression task t may show

over the tasks of the slice's event schema, ``tolerance_t`` being ``gate.tolerance.<t>`` where given
and ``gate.default_tolerance`` otherwise (:meth:`GateConfig.tolerances`).

Both models' NE on the slice share one denominator H(p̄) (the labels are the same), so d̄ / ℓ̄ᵖ is the
candidate's relative NE change and ``tolerance_t`` an allowed relative NE regression. One user's
events move together, which is why the standard error counts users, not events. A task is

- *not worse* when hi ≤ m_t: the candidate is shown to be at most the tolerance worse;
- *worse* when lo > m_t: a regression beyond the tolerance is shown;
- *inconclusive* otherwise; *too little evidence* with fewer than ``min_events`` events, fewer than
  ``min_positives`` positives, or a single user: nothing can be said, in particular not "broken".

The decision: **publish** when every task is not worse; **refuse** when a task is worse, the
candidate is broken (non-finite weights or predictions, an unreadable export) or was trained on
another event schema than the slice's (the reason names the differing keys); otherwise
**insufficient evidence**, which neither publishes nor calls the candidate broken.

With no published model, a healthy candidate (readable, finite weights and predictions) is
published. A published model that cannot be evaluated on the slice (non-finite weights or
predictions, built for another feature spec or event schema) must not hold publishing back forever, nor let a
candidate through unnoticed: a healthy candidate is published on its own health, the failure is
logged as an error and kept in the decision (``published_error``), which the publish log records
and the ``sirenfeed_retrain_published_unevaluable`` gauge reports.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from common.config import require
from features.schema import EventSchema, SchemaError
from trainer.data import read_feature_manifest
from trainer.evaluate import Metrics, check_features_fit, evaluate_tokens
from trainer.export import ExportError, load_exported
from trainer.metrics import EvalAccumulator, clustered_mean, event_log_loss

log = logging.getLogger(__name__)

PUBLISH, REFUSE, INSUFFICIENT_EVIDENCE = "publish", "refuse", "insufficient_evidence"
"""The gate's outcomes."""
NOT_WORSE, WORSE, INCONCLUSIVE, TOO_LITTLE_EVIDENCE = "not worse", "worse", "inconclusive", "too little evidence"
"""A task's verdicts."""


class BrokenModel(ValueError):
    """An export whose weights are not all finite."""


class UnpairedEvaluations(RuntimeError):
    """The two models' evaluations saw different events, so they cannot be compared event by event."""


@dataclass
class GateConfig:
    tolerance: dict[str, float] = field(default_factory=dict)
    """Per task, the relative NE (= log-loss) regression the candidate may show, where it differs
    from ``default_tolerance``; every key must be a task of the event schema."""
    default_tolerance: float = 0.002
    """The relative NE regression any other task may show (0.002: 0.2 % worse)."""
    confidence: float = 0.95
    """Two-sided level of the interval around the candidate's change in log loss."""
    min_events: int = 1000
    """A task with fewer label-bearing events on the slice has too little evidence."""
    min_positives: int = 30
    """A task with fewer positive labels on the slice has too little evidence."""
    batch_size: int = 1024
    bins: int = 15

    def __post_init__(self) -> None:
        for task, tolerance in self.tolerance.items():
            require(0 <= tolerance < 1, f"gate.tolerance.{task}", "must be in [0, 1)")
        require(0 <= self.default_tolerance < 1, "gate.default_tolerance", "must be in [0, 1)")
        require(0 < self.confidence < 1, "gate.confidence", "must be in (0, 1)")
        require(self.min_events >= 1, "gate.min_events", "must be >= 1")
        require(self.min_positives >= 0, "gate.min_positives", "must be >= 0")
        require(self.batch_size >= 1, "gate.batch_size", "must be >= 1")
        require(self.bins >= 1, "gate.bins", "must be >= 1")

    def tolerances(self, schema: EventSchema) -> dict[str, float]:
        """Every task of ``schema`` → its tolerance; a ``gate.tolerance`` key that is no task of it is
        an error naming the key."""
        tasks = schema.label_columns
        for task in self.tolerance:
            require(task in tasks, f"gate.tolerance.{task}",
                    f"not a task of schema '{schema.name}'; its tasks are {', '.join(tasks)}")
        return {task: self.tolerance.get(task, self.default_tolerance) for task in tasks}


@dataclass
class Decision:
    outcome: str
    """:data:`PUBLISH`, :data:`REFUSE` or :data:`INSUFFICIENT_EVIDENCE`."""
    reason: str
    candidate: Metrics | None
    current: Metrics | None
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per task: events, positives, users, tolerance, verdict and, where compared, the candidate's
    change in log loss and its interval relative to the published model's log loss."""
    published_error: str | None = None
    """Why the published model could not be evaluated, if it could not."""

    @property
    def publish(self) -> bool:
        return self.outcome == PUBLISH

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "publish": self.publish}


def evaluate_export(export_dir: str | Path, features_dir: str | Path, config: GateConfig) -> EvalAccumulator:
    """Every eval token of ``features_dir`` with the export's predictions; raises ``ExportError`` when
    the export is incomplete or corrupt, ``SchemaError`` (a ``ValueError``) naming the differences
    when it was trained on another event schema, ``DataError`` (a ``ValueError``) for windows of
    another length, :class:`BrokenModel` for non-finite weights and ``ValueError`` for non-finite
    predictions."""
    _, data_spec = read_feature_manifest(features_dir)
    model, _, spec = load_exported(export_dir, expected_schema=data_spec.event_schema)
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise BrokenModel(f"{export_dir} has non-finite weights ({', '.join(broken[:3])}): a broken model")
    check_features_fit(spec, data_spec, features_dir, export_dir)
    return evaluate_tokens(model, features_dir, data_spec, config.batch_size, rank=0, world=1, device="cpu")


def compare_task(candidate_loss: np.ndarray, published_loss: np.ndarray, label: np.ndarray,
                 user: np.ndarray, tolerance: float, config: GateConfig) -> dict[str, Any]:
    """One task's verdict from the per-event log losses of both models on the same events."""
    evidence = {"events": int(label.size), "positives": int(label.sum()), "users": int(np.unique(user).size),
                "tolerance": tolerance}
    shortfall = [text for short, text in (
        (evidence["events"] < config.min_events, f"{evidence['events']} events < gate.min_events {config.min_events}"),
        (evidence["positives"] < config.min_positives,
         f"{evidence['positives']} positives < gate.min_positives {config.min_positives}"),
        (evidence["users"] < 2, f"{evidence['users']} user(s): no spread between users to measure")) if short]
    if shortfall:
        return {**evidence, "verdict": TOO_LITTLE_EVIDENCE, "shortfall": "; ".join(shortfall)}
    change, standard_error = clustered_mean(candidate_loss - published_loss, user)
    published_log_loss = float(published_loss.mean())
    z = NormalDist().inv_cdf((1 + config.confidence) / 2)
    margin = tolerance * published_log_loss
    low, high = change - z * standard_error, change + z * standard_error
    verdict = NOT_WORSE if high <= margin else WORSE if low > margin else INCONCLUSIVE
    return {**evidence, "verdict": verdict, "published_log_loss": published_log_loss,
            "change": change / published_log_loss, "low": low / published_log_loss,
            "high": high / published_log_loss}


def decide(candidate: EvalAccumulator, published: EvalAccumulator | None, config: GateConfig,
           schema: EventSchema, published_error: str | None = None) -> Decision:
    """The decision for a healthy (evaluated) candidate against the published model's evaluation
    on the same slice, ``None`` when there is no published model or it could not be evaluated
    (``published_error`` says why). ``schema``: the slice's, whose tasks are compared."""
    tolerances = config.tolerances(schema)
    candidate_metrics = candidate.compute(config.bins)
    if published is None:
        if published_error is not None:
            return Decision(PUBLISH, f"the published model cannot be evaluated ({published_error}); "
                            "the candidate is healthy and is published on its own health",
                            candidate_metrics, None, published_error=published_error)
        return Decision(PUBLISH, "no published model; the candidate is healthy (finite weights and predictions)",
                        candidate_metrics, None)
    tasks = {}
    for task in schema.label_columns:
        candidate_pred, label, user = candidate.tokens(task)
        published_pred, published_label, published_user = published.tokens(task)
        if not (np.array_equal(label, published_label) and np.array_equal(user, published_user)):
            raise UnpairedEvaluations(f"{task}: the candidate and the published model were evaluated on "
                                      "different events")
        tasks[task] = compare_task(event_log_loss(candidate_pred, label), event_log_loss(published_pred, label),
                                   label, user, tolerances[task], config)
    verdicts = {comparison["verdict"] for comparison in tasks.values()}
    outcome = REFUSE if WORSE in verdicts else PUBLISH if verdicts == {NOT_WORSE} else INSUFFICIENT_EVIDENCE
    summary = {PUBLISH: "not worse on every task", REFUSE: "worse",
               INSUFFICIENT_EVIDENCE: "insufficient evidence"}[outcome]
    reason = "; ".join(_describe(task, comparison) for task, comparison in tasks.items()) + f": {summary}"
    return Decision(outcome, reason, candidate_metrics, published.compute(config.bins), tasks)


def _describe(task: str, comparison: dict[str, Any]) -> str:
    if comparison["verdict"] == TOO_LITTLE_EVIDENCE:
        return f"{task} too little evidence ({comparison['shortfall']})"
    return (f"{task} log loss {comparison['change']:+.3%} [{comparison['low']:+.3%}, {comparison['high']:+.3%}] "
            f"vs published (tolerance {comparison['tolerance']:.2%}, {comparison['events']} events, "
            f"{comparison['users']} users) {comparison['verdict']}")


def gate(candidate_export: str | Path, current_export: str | Path | None, features_dir: str | Path,
         config: GateConfig) -> Decision:
    """Evaluate both exports on ``features_dir``'s eval split and decide."""
    _, spec = read_feature_manifest(features_dir)
    schema = spec.event_schema
    config.tolerances(schema)  # a misnamed task fails here, not after two evaluations
    try:
        candidate = evaluate_export(candidate_export, features_dir, config)
    except SchemaError as error:  # not broken: trained for other events than this slice's
        decision = Decision(REFUSE, f"candidate unusable on this slice: {error}", None, None)
        log.info("gate: %s -> refuse", decision.reason)
        return decision
    except (ExportError, ValueError) as error:  # ValueError: the metrics refuse non-finite predictions
        decision = Decision(REFUSE, f"candidate unusable, a broken model: {error}", None, None)
        log.info("gate: %s -> refuse", decision.reason)
        return decision
    published, published_error = None, None
    if current_export is not None:
        try:
            published = evaluate_export(current_export, features_dir, config)
        except (ExportError, ValueError) as error:
            published_error = f"{current_export}: {error}"
            log.error("the published model cannot be evaluated on this slice: %s", published_error)
    decision = decide(candidate, published, config, schema, published_error)
    log.info("gate: %s -> %s", decision.reason, decision.outcome)
    return decision
