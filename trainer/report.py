"""``sirenfeed report --run RUN_DIR``: an HTML page with figures of what a run learned.

Reads ``RUN_DIR/history.jsonl`` (the trainer's log windows), ``RUN_DIR/metrics.json`` and the
exported model ``RUN_DIR/export/latest``, scores every label-bearing token of the eval split with
it (``trainer.data.eval_batches``, the trainer's evaluation forward), and writes
``RUN_DIR/report/`` (or ``out``)::

    index.html             metrics table and the figures below
    learning_curves.png    training loss, total and per task, and the learning rate, by step
    reliability.png        per task: mean prediction vs observed rate in equal-width bins
    ne_by_hour.png         per task: NE by UTC hour of day of the event
    ne_by_gap.png          per task: NE by time since the user's previous event (schemas with
                           the ``log_gap`` feature)
    angles.png             SIREN-RoPE only: the learned temporal angle f(x)·ω_j of a few pairs j
                           over one week, and by day of week at a fixed hour
    lambda.png             SIREN-RoPE with the ordinal term: the gate λ by step

The tasks are those of the model's event schema.
NE of a bucket is the bucket's log loss over the entropy of the bucket's own base rate (how much the
model beats a constant predictor of that bucket). The page is assembled in a temporary directory
and renamed into place, so a reader never sees half a report.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import MISSING
from tqdm import tqdm

from common.config import add_config_arguments, config_from_args, require
from common.files import staged_directory
from common.logs import configure_logging
from features.schema import LOG_GAP_COLUMN, LOSS_MASK_COLUMN, TS_COLUMN
from features.spec import SECONDS_PER_DAY, FeatureSpec, cyclical
from trainer.data import DataError, eval_batches, read_feature_manifest
from trainer.evaluate import METRICS_FILE, check_features_fit
from trainer.export import export_root, load_exported
from trainer.metrics import binary_metrics, format_table
from trainer.model import GenerativeRanker
from trainer.rotary import SirenRoPE
from trainer.train import HISTORY_FILE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

REPORT_DIR = "report"
GAP_EDGES_S: tuple[float, ...] = (0.5, 60.0, 600.0, 3_600.0, 6 * 3_600.0, 86_400.0, 7 * 86_400.0)
GAP_LABELS: tuple[str, ...] = ("first", "<1 min", "1–10 min", "10 min–1 h", "1–6 h", "6–24 h",
                               "1–7 d", ">7 d")
"""Buckets of the time since the user's previous event; "first" = no previous event (gap 0)."""
DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
SECONDS_PER_WEEK = 7 * SECONDS_PER_DAY
"""The angle figure's window, whatever periods the schema's cyclical features have."""
MONDAY_EPOCH_OFFSET_S = 4 * SECONDS_PER_DAY
"""1970-01-01 was a Thursday: Monday 00:00 UTC falls 4 days into every epoch week."""


@dataclass
class ReportConfig:
    run: str = MISSING
    """Run directory (history.jsonl, metrics.json, export/latest)."""
    features: str = ""
    """Feature dataset whose eval split is scored (default: the one the run was trained on)."""
    out: str = ""
    """Report directory (default: RUN/report)."""
    batch_size: int = 1024
    """Eval rows scored per forward."""
    bins: int = 15
    """Reliability-diagram bins."""
    min_bucket_tokens: int = 50
    """Buckets with fewer label tokens are left out of the NE-by-bucket plots."""
    pairs: list[int] = field(default_factory=list)
    """Frequency pairs j shown in the angle figure (empty = four spread over 0 … d_head/2 − 1)."""

    def __post_init__(self) -> None:
        require(self.batch_size >= 1, "batch_size", "must be >= 1")
        require(self.bins >= 2, "bins", "must be >= 2")
        require(self.min_bucket_tokens >= 1, "min_bucket_tokens", "must be >= 1")
        require(all(pair >= 0 for pair in self.pairs), "pairs", "must be >= 0")


# --- inputs -----------------------------------------------------------------------------------

def read_history(run: Path) -> list[dict[str, Any]]:
    """History records by step; a resumed run's re-logged step keeps its last record, and a torn
    last line (a crash mid-write) is skipped."""
    path = run / HISTORY_FILE
    if not path.is_file():
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


@torch.no_grad()
def score_eval_tokens(model: GenerativeRanker, features: str | Path, spec: FeatureSpec,
                      batch_size: int) -> dict[str, np.ndarray]:
    """Every label-bearing eval token (``spec``: the dataset's): per task of its schema
    ``pred_<task>`` and ``<task>`` (label), then ``ts``, ``user_key`` and, where the schema has
    ``log_gap``, ``gap_s`` (seconds since the user's previous event, 0 for none)."""
    schema = spec.event_schema
    columns: dict[str, list[np.ndarray]] = {}

    def keep(name: str, values: torch.Tensor, mask: torch.Tensor) -> None:
        columns.setdefault(name, []).append(values[mask].cpu().numpy())

    for batch in tqdm(eval_batches(features, spec, batch_size, 0, 1), desc="score eval", unit="batch"):
        logits = model(batch)
        mask = batch[LOSS_MASK_COLUMN] > 0
        for task in schema.label_columns:
            keep(f"pred_{task}", torch.sigmoid(logits[task].double()), mask)
            keep(task, batch[task].double(), mask)
        keep("ts", batch[TS_COLUMN], mask)
        if LOG_GAP_COLUMN in schema.continuous_columns:
            keep("gap_s", torch.expm1(batch[LOG_GAP_COLUMN].double()), mask)
        keep("user_key", batch["user_key"][:, None].expand_as(mask), mask)
    if not columns:
        raise DataError(f"{features}/eval holds no rows to score")
    return {name: np.concatenate(chunks) for name, chunks in columns.items()}


def gap_bucket(gap_s: np.ndarray) -> np.ndarray:
    """Index into :data:`GAP_LABELS` (0 = first event, gap < 0.5 s)."""
    return np.searchsorted(np.asarray(GAP_EDGES_S), gap_s, side="right")


def ne_by_bucket(tokens: dict[str, np.ndarray], tasks: tuple[str, ...], bucket: np.ndarray, count: int,
                 min_tokens: int) -> dict[str, np.ndarray]:
    """Per task an array of NE by bucket (nan where too few tokens or a single class), and ``count``."""
    result: dict[str, np.ndarray] = {"count": np.bincount(bucket, minlength=count)[:count]}
    for task in tasks:
        values = np.full(count, math.nan)
        for index in range(count):
            chosen = bucket == index
            if chosen.sum() >= min_tokens:
                values[index] = binary_metrics(tokens[f"pred_{task}"][chosen], tokens[task][chosen])["ne"]
        result[task] = values
    return result


# --- figures ----------------------------------------------------------------------------------

def _figure(**kwargs: Any) -> Figure:
    """A figure that renders with the Agg canvas: no pyplot, no global backend, no display.
    (matplotlib is imported here, on first use, so importing this module stays light.)"""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(figure: Figure, path: Path) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path.name


def plot_learning_curves(history: list[dict[str, Any]], tasks: tuple[str, ...], path: Path) -> str | None:
    if not history:
        return None
    steps = [record["step"] for record in history]
    figure = _figure(figsize=(11, 4))
    loss_axis, lr_axis = figure.subplots(1, 2)
    loss_axis.plot(steps, [record["loss"] for record in history], label="total (sum of tasks)", color="black")
    for task in tasks:
        loss_axis.plot(steps, [record["task_loss"][task] for record in history], label=task)
    loss_axis.set(xlabel="step", ylabel="training BCE (mean over log window)", title="Learning curves")
    loss_axis.legend()
    lr_axis.plot(steps, [record["lr"] for record in history], color="tab:gray")
    lr_axis.set(xlabel="step", ylabel="learning rate", title="Schedule")
    return _save(figure, path)


def plot_reliability(tokens: dict[str, np.ndarray], tasks: tuple[str, ...], bins: int, path: Path) -> str:
    figure = _figure(figsize=(4.2 * len(tasks), 4.2))
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    edges = np.linspace(0.0, 1.0, bins + 1)
    for axis, task in zip(axes, tasks):
        pred, label = tokens[f"pred_{task}"], tokens[task]
        which = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, bins - 1)
        counts = np.bincount(which, minlength=bins)
        filled = counts > 0
        mean_pred = np.bincount(which, weights=pred, minlength=bins)[filled] / counts[filled]
        mean_label = np.bincount(which, weights=label, minlength=bins)[filled] / counts[filled]
        top = max(float(mean_pred.max()), float(mean_label.max()), 0.05) * 1.1
        axis.plot([0, top], [0, top], linestyle="--", color="gray", label="perfect calibration")
        axis.scatter(mean_pred, mean_label, s=10 + 60 * counts[filled] / counts.max(), zorder=3,
                     label="bins (size ∝ tokens)")
        axis.plot(mean_pred, mean_label, zorder=2)
        ece = binary_metrics(pred, label, bins=bins)["ece"]
        axis.set(xlim=(0, top), ylim=(0, top), xlabel="mean prediction", ylabel="observed rate",
                 title=f"{task} (ECE {ece:.4f})")
        axis.legend(loc="upper left", fontsize=8)
    return _save(figure, path)


def plot_ne_by_bucket(values: dict[str, np.ndarray], tasks: tuple[str, ...], labels: list[str], xlabel: str,
                      title: str, path: Path) -> str:
    figure = _figure(figsize=(10, 6))
    ne_axis, count_axis = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    positions = np.arange(len(labels))
    for task in tasks:
        ne_axis.plot(positions, values[task], marker="o", label=task)
    ne_axis.axhline(1.0, linestyle="--", color="gray", linewidth=0.8)
    ne_axis.set(ylabel="NE (bucket's own base rate)", title=title)
    ne_axis.legend()
    count_axis.bar(positions, values["count"], color="tab:gray")
    count_axis.set(ylabel="tokens", xlabel=xlabel)
    count_axis.set_xticks(positions, labels, rotation=0 if len(labels) > 10 else 20)
    return _save(figure, path)


def temporal_angles(rotary: SirenRoPE, periods: dict[str, float], ts: np.ndarray) -> np.ndarray:
    """f(x)·ω at event times ``ts`` (epoch seconds, on the clock the cyclical features read: UTC, or
    local time for a schema with a UTC offset): ``[len(ts), d_head/2]``.

    x is built by the model's own :class:`~trainer.rotary.TimeFeatures` (its T_ref and clamp) from
    the feature pipeline's cyclical columns of the schema's ``periods``, as in training. Categorical
    inputs to f (if any) get the padding id, whose embedding is zero: the time effect alone.
    """
    ts = np.asarray(ts, dtype=np.int64)
    row = {TS_COLUMN: torch.from_numpy(ts)[None]}
    row.update({column: torch.from_numpy(values)[None] for column, values in cyclical(ts, periods).items()})
    if rotary.metadata is not None:
        row.update({column: torch.zeros_like(row[TS_COLUMN]) for column in rotary.metadata})
    with torch.no_grad():
        return (rotary.temporal_function(rotary.inputs(row)) * rotary.omega.float())[0].numpy()


def plot_angles(model: GenerativeRanker, pairs: list[int], path: Path) -> str | None:
    rotary = model.rotary
    if not isinstance(rotary, SirenRoPE):
        return None
    chosen = sorted({min(pair, rotary.pairs - 1) for pair in pairs}) or sorted(
        {0, rotary.pairs // 3, 2 * rotary.pairs // 3, rotary.pairs - 1})
    periods = model.schema.periods
    clock = "local time" if model.schema.utc_offset_field else "UTC"
    t_ref = int(rotary.time_features.t_ref_seconds.item())
    monday = t_ref - (t_ref - MONDAY_EPOCH_OFFSET_S) % SECONDS_PER_WEEK  # the Monday 00:00 before T_ref
    week = monday + np.arange(0, SECONDS_PER_WEEK, 600)
    angles = temporal_angles(rotary, periods, week)
    figure = _figure(figsize=(13, 4.5))
    week_axis, day_axis = figure.subplots(1, 2)
    days = (week - monday) / SECONDS_PER_DAY
    for pair in chosen:
        week_axis.plot(days, angles[:, pair], label=f"pair j={pair} (ω={rotary.omega[pair].item():.2f})")
    week_axis.set_xticks(np.arange(7) + 0.5, DAY_NAMES)
    for boundary in range(1, 7):
        week_axis.axvline(boundary, color="lightgray", linewidth=0.6)
    week_axis.set(xlabel=f"time of week ({clock}), ticks at noon", ylabel="f(x)_j · ω_j  [rad]",
                  title="Learned temporal angle over one week")
    week_axis.legend(fontsize=8)
    hours = np.arange(0, 24, 0.25)
    for pair in chosen[:2]:
        for day in (0, 2, 5, 6):
            times = monday + day * SECONDS_PER_DAY + (hours * 3600).astype(np.int64)
            day_axis.plot(hours, temporal_angles(rotary, periods, times)[:, pair],
                          label=f"j={pair}, {DAY_NAMES[day]}")
    day_axis.set(xlabel=f"hour of day ({clock})", ylabel="f(x)_j · ω_j  [rad]",
                 title="By time of day, for a few days of the week")
    day_axis.legend(fontsize=7, ncol=2)
    return _save(figure, path)


def plot_lambda(history: list[dict[str, Any]], path: Path) -> str | None:
    points = [(record["step"], record["lambda"]) for record in history if record.get("lambda") is not None]
    if not points:
        return None
    figure = _figure(figsize=(6, 3.5))
    axis = figure.subplots()
    axis.plot(*zip(*points), marker=".")
    axis.set(xlabel="step", ylabel="λ", title="Ordinal gate λ over training")
    return _save(figure, path)


# --- the page ---------------------------------------------------------------------------------

CAPTIONS = {
    "learning_curves.png": "Training loss per log window (mean over ranks and steps), total and per task; learning rate.",
    "reliability.png": "Reliability diagrams on the eval split: mean prediction against the observed rate per bin.",
    "ne_by_hour.png": "NE by UTC hour of day of the event (eval split).",
    "ne_by_gap.png": "NE by time since the user's previous event (eval split); 'first' = no previous event.",
    "angles.png": "The learned temporal part of the rotation, f(x)·ω, for a few frequency pairs. Only "
                  "differences between tokens matter for attention.",
    "lambda.png": "The gate λ on the ordinal term λ·p·θ.",
}


def render_html(run: Path, metrics: dict[str, Any], config: dict[str, Any], figures: list[str],
                notes: list[str]) -> str:
    model = config.get("model", {})
    variant = ", ".join(f"{key}={model.get(key)}" for key in (
        "rotary", "siren_branch", "dnn_branch", "ordinal_term", "categorical_input", "time_in_embedding"))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>sirenfeed report: {html.escape(run.name)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto}"
        "img{max-width:100%;border:1px solid #ddd}pre{background:#f6f6f6;padding:1em}</style>",
        "</head><body>",
        f"<h1>Run {html.escape(str(run.name))}</h1>",
        f"<p>Model: {html.escape(variant)}; features: {html.escape(str(config.get('features')))}</p>",
        "<h2>Eval metrics (held-out later window)</h2>",
        f"<pre>{html.escape(format_table({run.name: metrics}))}</pre>",
    ]
    parts += [f"<p><em>{html.escape(note)}</em></p>" for note in notes]
    for name in figures:
        parts += [f"<h2>{html.escape(name.removesuffix('.png').replace('_', ' '))}</h2>",
                  f"<p>{html.escape(CAPTIONS.get(name, ''))}</p>", f"<img src='{html.escape(name)}' alt='{name}'>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(config: ReportConfig) -> Path:
    """Write the report directory; returns its path."""
    run = Path(config.run)
    model, train_config, spec = load_exported(export_root(run) / "latest")
    features = config.features or train_config.features
    _, data_spec = read_feature_manifest(features)
    check_features_fit(spec, data_spec, features, run)
    tasks = spec.event_schema.label_columns
    history = read_history(run)
    tokens = score_eval_tokens(model, features, data_spec, config.batch_size)
    metrics = {task: binary_metrics(tokens[f"pred_{task}"], tokens[task], tokens["user_key"])
               for task in tasks}
    target = Path(config.out) if config.out else run / REPORT_DIR
    with staged_directory(target) as staging:
        figures = [plot_learning_curves(history, tasks, staging / "learning_curves.png"),
                   plot_reliability(tokens, tasks, config.bins, staging / "reliability.png")]
        hours = ((tokens["ts"] % SECONDS_PER_DAY) // 3600).astype(np.int64)
        figures.append(plot_ne_by_bucket(
            ne_by_bucket(tokens, tasks, hours, 24, config.min_bucket_tokens), tasks, [str(h) for h in range(24)],
            "hour of day (UTC)", "NE by hour of day", staging / "ne_by_hour.png"))
        if "gap_s" in tokens:
            gaps = ne_by_bucket(tokens, tasks, gap_bucket(tokens["gap_s"]), len(GAP_LABELS),
                                config.min_bucket_tokens)
            figures.append(plot_ne_by_bucket(gaps, tasks, list(GAP_LABELS), "time since the user's previous event",
                                             "NE by gap since previous event", staging / "ne_by_gap.png"))
        figures += [plot_angles(model, config.pairs, staging / "angles.png"),
                    plot_lambda(history, staging / "lambda.png")]
        notes = [] if history else [f"No {HISTORY_FILE} in the run: no learning curves."]
        if not isinstance(model.rotary, SirenRoPE):
            notes.append(f"rotary={train_config.model.rotary}: no learned temporal angle to show.")
        saved = json.loads((run / METRICS_FILE).read_text())["metrics"] if (run / METRICS_FILE).is_file() else None
        if saved is not None and any(abs(saved[t]["ne"] - metrics[t]["ne"]) > 1e-6 for t in tasks):
            notes.append("The export's eval NE differs from metrics.json (evaluated on other features?).")
        raw_config = json.loads((export_root(run) / "latest" / "config.json").read_text())
        (staging / "index.html").write_text(render_html(run, metrics, raw_config,
                                                        [name for name in figures if name], notes))
    log.info("wrote %s", target / "index.html")
    return target


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed report", description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="run directory (config key run)")
    parser.add_argument("--features", help="feature dataset (default: the run's)")
    parser.add_argument("--out", help="report directory (default: RUN/report)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(ReportConfig, args, run=args.run, features=args.features, out=args.out)
    target = build_report(config)
    print(target / "index.html")
    return 0


if __name__ == "__main__":
    configure_logging()
    sys.exit(main(sys.argv[1:]))
