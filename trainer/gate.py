"""The evaluation gate: a candidate replaces the published model only if it is not worse.

Both models are evaluated exactly (:func:`trainer.evaluate.evaluate_split`, in this process) on the
same freshest held-out slice. The candidate passes when its NE on the primary task is finite and
at most ``(1 + tolerance)`` times the published model's (NE: lower is better); with no published
model, a finite NE is enough. A broken candidate (NaN weights, an unreadable export) never passes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from features.config import require
from features.spec import LABEL_COLUMNS
from trainer.data import read_feature_manifest
from trainer.evaluate import Metrics, evaluate_split
from trainer.export import ExportError, load_exported

log = logging.getLogger(__name__)


class BrokenModel(ValueError):
    """An export whose weights are not all finite."""


@dataclass
class GateConfig:
    task: str = "contribution"
    """The primary task whose NE decides."""
    tolerance: float = 0.002
    """Allowed relative NE regression (0.002 = the candidate may be 0.2 % worse)."""
    batch_size: int = 1024
    bins: int = 15

    def __post_init__(self) -> None:
        require(self.task in LABEL_COLUMNS, "gate.task", f"must be one of {', '.join(LABEL_COLUMNS)}")
        require(0 <= self.tolerance < 1, "gate.tolerance", "must be in [0, 1)")
        require(self.batch_size >= 1, "gate.batch_size", "must be >= 1")
        require(self.bins >= 1, "gate.bins", "must be >= 1")


@dataclass
class Decision:
    publish: bool
    reason: str
    candidate: Metrics | None
    current: Metrics | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_export(export_dir: str | Path, features_dir: str | Path, config: GateConfig) -> Metrics:
    """Exact metrics of an export on ``features_dir/eval``; raises ``ExportError`` when the export is
    incomplete or corrupt, or was built for another feature spec."""
    model, _, spec = load_exported(export_dir)
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise BrokenModel(f"{export_dir} has non-finite weights ({', '.join(broken[:3])}): a broken model")
    _, data_spec = read_feature_manifest(features_dir)
    if data_spec != spec:
        raise ExportError(f"{export_dir} was trained on another feature spec than {features_dir}")
    return evaluate_split(model, features_dir, spec.context_len, config.batch_size, rank=0, world=1,
                          device="cpu", bins=config.bins)


def decide(candidate: Metrics | None, current: Metrics | None, config: GateConfig) -> Decision:
    task = config.task
    candidate_ne = candidate[task]["ne"] if candidate else math.nan
    if not math.isfinite(candidate_ne):
        return Decision(False, f"candidate {task} NE is {candidate_ne}: a broken model", candidate, current)
    if current is None or not math.isfinite(current[task]["ne"]):
        return Decision(True, f"no comparable published model; candidate {task} NE {candidate_ne:.5f}",
                        candidate, current)
    current_ne = current[task]["ne"]
    limit = current_ne * (1 + config.tolerance)
    verdict = "not worse" if candidate_ne <= limit else "worse"
    text = (f"candidate {task} NE {candidate_ne:.5f} vs published {current_ne:.5f} "
            f"(limit {limit:.5f}, tolerance {config.tolerance:.2%}): {verdict}")
    return Decision(candidate_ne <= limit, text, candidate, current)


def gate(candidate_export: str | Path, current_export: str | Path | None, features_dir: str | Path,
         config: GateConfig) -> Decision:
    """Evaluate both on ``features_dir``'s eval split and decide."""
    try:
        candidate = evaluate_export(candidate_export, features_dir, config)
    except (ExportError, ValueError) as error:  # metrics refuse non-finite predictions
        return Decision(False, f"candidate unusable, a broken model: {error}", None, None)
    current = None
    if current_export is not None:
        try:
            current = evaluate_export(current_export, features_dir, config)
        except (ExportError, ValueError) as error:
            log.warning("the published model cannot be evaluated on this slice: %s", error)
    decision = decide(candidate, current, config)
    log.info("gate: %s -> %s", decision.reason, "publish" if decision.publish else "keep the published model")
    return decision
