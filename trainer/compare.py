"""``sirenfeed compare``: rotary variants × seeds on identical data and budget, with honest statistics.

    sirenfeed compare --features FEATURES_DIR --out OUT --variants ordinal,siren --seeds 3 \\
        [--truth RAW_DIR] [--config conf/compare.yaml] [train_overrides=[...]] [key=value ...]

Every (variant, seed) run is one ``deepspeed`` training run (the launcher of ``sirenfeed train``,
``conf/train.yaml`` plus ``train_overrides``) into ``OUT/<variant>/seed<k>/``, with the variant's
preset (:mod:`trainer.variants`) and ``seed = data.seed = k``: the seed fixes the weights' init and
the data order, and the same seed gives every variant the same data order, so runs pair by seed.
Each run is evaluated exactly on the held-out later window (``FEATURES_DIR/eval``) by the trainer.

Resumable: a finished run leaves ``result.json`` (written atomically after its export verified) and
is never redone; a run that has checkpoints but no result continues from its newest checkpoint; a
run with neither starts afresh.

Statistics, per variant, task and metric over the n seeds: mean ± sample std (ddof 1). Against the
baseline (``ordinal``), per seed s the paired difference ``d_s = m(variant, s) − m(baseline, s)``
and the relative NE change ``100·(NE_v,s / NE_base,s − 1)``; their mean, the standard error
``SE = std(d)/√n``, and whether ``|mean| > 2·SE`` (roughly a 95 % two-sided interval excluding 0;
with n = 3 a t-interval would need 4.3·SE, so "exceeds 2 SE" is a screening mark, not a test).

The tasks are those of the feature dataset's event schema.

With ``truth`` (the synthetic logs' directory, written by ``sirenfeed synth`` for the same schema),
the Bayes-optimal metrics of the eval events, scored with the generator's true probabilities
(``RAW_DIR/_truth``: an ``event_id`` and a ``p_<task>`` column per task), are the floor no model can
beat; the labels are computed from the raw events by the schema (:func:`features.spec.label_values`).
Where the truth also has ``relational_logit`` (the feed simulator's planted relational effect: a
recent, observable engagement with the same author, :mod:`features.synth`), it splits the eval
events into the *relational* slice, where the effect is active (``relational_logit >
relational_threshold``), and the rest. Each run's exported model scores the eval tokens again (one
process, matched to the events by user, second and the id of the schema's item column), and per
slice every metric gets the same statistics as overall, the Bayes floor included; per variant, the
paired contrast ``ΔNE%_relational,s − ΔNE%_rest,s`` says whether it gains on the relational events
more than on the others, i.e. whether it captures the relational mechanism rather than an absolute
one. Truth without that column (a simulator that plants no relational effect) gives no slice.

Writes ``OUT/compare.json`` (every number) and ``OUT/compare.md`` (the tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from omegaconf import MISSING
from tqdm import tqdm

from common.config import (
    ConfigError, add_config_arguments, config_from_args, load_config, require, to_dict,
)
from common.files import atomic_write_text, visible_files, write_json
from common.logs import configure_logging
from common.repo import REPO_ROOT
from features.dataset import read_manifest
from features.schema import EVENT_ID, EVENT_TS, LOSS_MASK_COLUMN, TS_COLUMN, USER_ID, ContractConfig, EventSchema
from features.spec import hash_id, label_values, user_key
from features.synth import TRUTH_DIR
from features.validation import check_record
from trainer.checkpoint import complete_tags
from trainer.config import TrainConfig
from trainer.data import eval_batches, read_feature_manifest
from trainer.evaluate import METRICS_FILE
from trainer.export import export_root, load_exported, verify_export
from trainer.launcher import TRAIN_SCRIPT, run_with_config
from trainer.metrics import binary_metrics
from trainer.variants import VARIANTS, variant_overrides

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
TRAIN_LOG = "train.log"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
SUMMARY_METRICS: tuple[str, ...] = ("ne", "auc", "gauc", "ece")
BAYES_ROW = "bayes (truth)"
RELATIONAL_COLUMN = "relational_logit"
SLICES: tuple[str, ...] = ("relational", "rest")
PREDICT_BATCH_ROWS = 1024
RESERVED_KEYS = ("features", "run", "seed", "data.seed", "train.resume", "model.rotary",
                 "model.siren_branch", "model.dnn_branch", "model.ordinal_term",
                 "model.categorical_input", "model.time_in_embedding")
"""Keys compare sets itself: overriding them would break 'identical data and budget'."""


@dataclass
class CompareConfig:
    features: str = MISSING
    """Feature dataset every run trains and evaluates on."""
    out: str = MISSING
    """Comparison directory: ``<variant>/seed<k>/`` runs, ``compare.json``, ``compare.md``."""
    variants: list[str] = field(default_factory=lambda: ["ordinal", "to_rope", "dnn_only",
                                                         "siren_only", "siren"])
    """Presets of :mod:`trainer.variants`."""
    baseline: str = "ordinal"
    """The variant paired differences are taken against (must be among ``variants``)."""
    seeds: int = 3
    """Runs per variant, one per seed; a seed sets the model initialisation and the data order."""
    first_seed: int = 0
    """Seeds are ``first_seed … first_seed + seeds − 1``."""
    nproc: int = 2
    """DeepSpeed ranks per run."""
    train_config: str = ""
    """Training config file; empty = the repository's ``conf/train.yaml``."""
    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the training config, the same for every run (the shared budget),
    e.g. ``[train.epochs=2, optim.lr=0.002]``."""
    truth: str = ""
    """Synthetic raw logs directory with ``_truth/``: adds the Bayes-optimal floor (optional)."""
    bins: int = 15
    """Equal-width calibration bins for the floor's ECE (the trainer's evaluation uses 15)."""
    relational_threshold: float = 0.1
    """With ``truth``: eval events whose ``relational_logit`` exceeds this form the relational slice."""

    def __post_init__(self) -> None:
        require(bool(self.variants), "variants", "must name at least one variant")
        unknown = [name for name in self.variants if name not in VARIANTS]
        require(not unknown, "variants", f"unknown {unknown}; valid: {', '.join(VARIANTS)}")
        require(len(set(self.variants)) == len(self.variants), "variants", "must not repeat a variant")
        require(self.baseline in self.variants, "baseline",
                f"'{self.baseline}' must be one of the compared variants {self.variants}")
        require(self.seeds >= 1, "seeds", "must be >= 1")
        require(self.first_seed >= 0, "first_seed", "must be >= 0")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(self.bins >= 1, "bins", "must be >= 1")
        require(self.relational_threshold >= 0, "relational_threshold", "must be >= 0")
        for item in self.train_overrides:
            key = item.split("=", 1)[0].strip()
            require("=" in item, "train_overrides", f"'{item}' is not key=value")
            require(key not in RESERVED_KEYS, "train_overrides",
                    f"'{key}' is set by compare itself (variant, seed, data, run)")

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def train_config_file(self) -> Path:
        return Path(self.train_config) if self.train_config else REPO_ROOT / "conf" / "train.yaml"


class CompareError(RuntimeError):
    """A training run of the comparison failed."""


def run_dir(out: str | Path, variant: str, seed: int) -> Path:
    return Path(out) / variant / f"seed{seed}"


def run_overrides(config: CompareConfig, variant: str) -> list[str]:
    """The training overrides of one variant's runs: the shared budget, then the variant's preset."""
    return [*config.train_overrides, *variant_overrides(variant)]


def run_config(config: CompareConfig, variant: str, seed: int, resume: bool = False) -> TrainConfig:
    """The training config of one run: :func:`run_overrides` on the shared config file, then its
    seed (model init and data order), data and run directory, which win."""
    return load_config(TrainConfig, config.train_config_file, run_overrides(config, variant), {
        "seed": seed, "data": {"seed": seed}, "features": config.features,
        "run": run_dir(config.out, variant, seed), "train": {"resume": resume}})


def check_train_configs(config: CompareConfig) -> None:
    """Fail before any training when a variant's training config would be rejected."""
    for variant in config.variants:
        run_config(config, variant, config.first_seed)


def read_result(run: Path) -> dict[str, Any] | None:
    path = run / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_one(config: CompareConfig, variant: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one run through the deepspeed launcher; its log goes to ``RUN/train.log``.

    Returns the result record, written to ``RUN/result.json`` once the export has verified.
    """
    run = run_dir(config.out, variant, seed)
    resume = bool(complete_tags(run))
    if resume:
        log.info("%s/seed%d: resuming from its newest checkpoint", variant, seed)
    elif run.exists():
        shutil.rmtree(run)  # a crashed attempt that never checkpointed: nothing worth keeping
    run.mkdir(parents=True, exist_ok=True)
    with (run / TRAIN_LOG).open("a") as stream:
        code = run_with_config(TRAIN_SCRIPT, config.nproc, run_config(config, variant, seed, resume),
                               stdout=stream)
    if code != 0:
        tail = (run / TRAIN_LOG).read_text()[-3000:]
        raise CompareError(f"training {variant} seed {seed} failed (exit code {code}); "
                           f"log {run / TRAIN_LOG}:\n{tail}")
    export = verify_export(export_root(run) / "latest")
    metrics = json.loads((run / METRICS_FILE).read_text())
    result = {"variant": variant, "seed": seed, "step": export["step"], "export": export["tag"],
              "metrics": metrics["metrics"], "overrides": run_overrides(config, variant)}
    write_json(run / RESULT_FILE, result)
    return result


def run_all(config: CompareConfig) -> dict[str, dict[int, dict[str, Any]]]:
    """Every (variant, seed) result, training what is not finished yet, seed by seed so an
    interrupted comparison already holds complete pairs."""
    results: dict[str, dict[int, dict[str, Any]]] = {variant: {} for variant in config.variants}
    jobs = [(variant, seed) for seed in config.seed_list for variant in config.variants]
    progress = tqdm(jobs, desc="compare", unit="run")
    for variant, seed in progress:
        progress.set_postfix_str(f"{variant} seed {seed}")
        result = read_result(run_dir(config.out, variant, seed))
        if result is None:
            result = train_one(config, variant, seed)
            log.info("%s seed %d done: %s", variant, seed, ", ".join(
                f"{task} NE {values['ne']:.4f}" for task, values in result["metrics"].items()))
        else:
            log.info("%s seed %d already done, skipped", variant, seed)
        results[variant][seed] = result["metrics"]
    progress.close()
    return results


# --- statistics -------------------------------------------------------------------------------

def mean_std(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()) if array.size else math.nan,
            "std": float(array.std(ddof=1)) if array.size > 1 else math.nan, "n": int(array.size)}


def paired(differences: list[float]) -> dict[str, float | bool]:
    """Mean, std, standard error of paired differences and whether |mean| exceeds 2 SE."""
    stats = mean_std(differences)
    n = stats["n"]
    se = stats["std"] / math.sqrt(n) if n > 1 else math.nan
    return {**stats, "se": se, "exceeds_2se": bool(n > 1 and se > 0 and abs(stats["mean"]) > 2 * se)}


def _value(runs: dict[int, dict[str, Any]], seed: int, task: str, metric: str) -> float:
    number = runs[seed][task][metric]  # metrics.json writes an undefined value as null
    return math.nan if number is None else float(number)


def summarize(results: dict[str, dict[int, dict[str, Any]]], baseline: str,
              tasks: tuple[str, ...]) -> dict[str, Any]:
    """Per variant and task: mean ± std of each metric, and the paired differences to ``baseline``."""
    summary: dict[str, Any] = {}
    base = results[baseline]
    for variant, by_seed in results.items():
        seeds = sorted(by_seed)
        pairs = [seed for seed in seeds if seed in base]
        summary[variant] = {}
        for task in tasks:
            entry: dict[str, Any] = {metric: mean_std([_value(by_seed, s, task, metric) for s in seeds])
                                     for metric in SUMMARY_METRICS}
            if variant != baseline:
                entry["vs_baseline"] = {metric: paired([_value(by_seed, s, task, metric) - _value(base, s, task, metric)
                                                        for s in pairs]) for metric in SUMMARY_METRICS}
                entry["vs_baseline"]["ne_relative_pct"] = paired(
                    [100.0 * (_value(by_seed, s, task, "ne") / _value(base, s, task, "ne") - 1.0) for s in pairs])
            summary[variant][task] = entry
    return summary


# --- the Bayes-optimal floor ------------------------------------------------------------------

def key_column(schema: EventSchema) -> str:
    """The id column that, with the user and the second, matches a token to its event: the item
    whose age the schema tracks, else its first categorical."""
    return schema.item_age_field or schema.id_columns[0]


def _parquet_table(root: Path, columns: list[str] | None = None) -> pa.Table:
    """Every data file under ``root`` (hidden and ``_``-prefixed paths, like ``_truth``, skipped)."""
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in visible_files(root)])


@dataclass
class EvalTruth:
    """The eval split's events, each once, with their labels and the generator's ground truth."""

    keys: list[tuple[int, int, int]]
    """Per event ``(user_key, ts, id)`` as the feature rows hold them, the id that of
    :func:`key_column`: how a token is matched."""
    users: np.ndarray
    labels: dict[str, np.ndarray]
    probability: dict[str, np.ndarray]
    """The true probability per task."""
    relational_logit: np.ndarray | None
    """The relational term of the engagement logit; ``None`` for truth written before it existed."""


def eval_truth(raw_dir: str | Path, features_dir: str | Path) -> EvalTruth:
    """The generator's truth on exactly the eval split's events: the valid (contract, the dataset's
    schema), deduplicated events at or after the split time of the feature dataset."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / TRUTH_DIR).is_dir():
        raise FileNotFoundError(f"{raw_dir / TRUTH_DIR} not found: 'truth' must be synthetic logs "
                                "written by `sirenfeed synth`")
    read_manifest(raw_dir)
    manifest, spec = read_feature_manifest(features_dir)
    schema = spec.event_schema
    tasks = schema.label_columns
    contract = ContractConfig(**manifest["config"]["contract"])
    split_ms = manifest["split_ts_ms"]
    records = _parquet_table(raw_dir, list(schema.field_names)).to_pylist()
    valid = [schema.canonical(record) for record in records
             if check_record(record, schema, contract, manifest["processing_ms"]) is None]
    # The copy of a duplicated event the feature job keeps: the first in the schema's dedup order.
    kept: dict[str, dict[str, Any]] = {}
    for event in sorted((e for e in valid if e[EVENT_TS] >= split_ms),
                        key=lambda e: [e[name] for name in schema.dedup_order]):
        kept.setdefault(event[EVENT_ID], event)
    truth = _parquet_table(raw_dir / TRUTH_DIR).to_pydict()
    wanted = [f"p_{task}" for task in tasks]
    absent = [column for column in wanted if column not in truth]
    if absent:
        raise ValueError(f"{raw_dir / TRUTH_DIR} has no {', '.join(absent)}: it is not the truth of logs of "
                         f"schema '{schema.name}' (tasks {', '.join(tasks)})")
    columns = [*wanted, *([RELATIONAL_COLUMN] if RELATIONAL_COLUMN in truth else [])]
    by_event = {event_id: row for event_id, *row in zip(truth["event_id"], *(truth[c] for c in columns))}
    missing = [event_id for event_id in kept if event_id not in by_event]
    if missing:
        raise ValueError(f"{len(missing)} eval events have no ground truth in {raw_dir / TRUTH_DIR}, "
                         f"e.g. {missing[:3]}")
    ordered = list(kept.values())
    rows = np.array([by_event[e[EVENT_ID]] for e in ordered], dtype=np.float64).reshape(len(ordered), len(columns))
    key = key_column(schema)
    table = schema.column_tables[key]
    return EvalTruth(
        keys=[(user_key(e[USER_ID]), e[EVENT_TS] // 1000, hash_id(table, e[key], spec.buckets[table]))
              for e in ordered],
        users=np.array([user_key(e[USER_ID]) for e in ordered], dtype=np.int64),
        labels={task: label_values(schema.config.labels[task], ordered).astype(np.float64) for task in tasks},
        probability={task: rows[:, columns.index(f"p_{task}")] for task in tasks},
        relational_logit=rows[:, columns.index(RELATIONAL_COLUMN)] if RELATIONAL_COLUMN in columns else None)


def bayes_floor(raw_dir: str | Path, features_dir: str | Path, bins: int = 15) -> dict[str, dict[str, float]]:
    """Metrics per task of the generator's true probabilities on exactly the eval split's events."""
    truth = eval_truth(raw_dir, features_dir)
    return {task: binary_metrics(truth.probability[task], truth.labels[task], truth.users, bins)
            for task in truth.labels}


# --- the relational slice ---------------------------------------------------------------------

@dataclass
class EvalPredictions:
    """One model's prediction of every label-bearing eval token, in file order."""

    keys: list[tuple[int, int, int]]
    """Per token ``(user_key, ts, id)``, as in :attr:`EvalTruth.keys`."""
    users: np.ndarray
    labels: dict[str, np.ndarray]
    pred: dict[str, np.ndarray]


@torch.no_grad()
def eval_predictions(run: str | Path, features_dir: str | Path) -> EvalPredictions:
    """Score the eval split with the run's exported model, in this process (refused, naming the
    differences, when the run was trained on another event schema than the dataset's)."""
    _, data_spec = read_feature_manifest(features_dir)
    model, _, _ = load_exported(export_root(run) / "latest", expected_schema=data_spec.event_schema)
    schema = data_spec.event_schema
    key = key_column(schema)
    keys: list[tuple[int, int, int]] = []
    users, labels, pred = [], {task: [] for task in schema.label_columns}, {task: [] for task in schema.label_columns}
    for batch in eval_batches(features_dir, data_spec, PREDICT_BATCH_ROWS, 0, 1):
        logits = model(batch)
        bearing = batch[LOSS_MASK_COLUMN] > 0
        row_users = batch["user_key"][:, None].expand_as(bearing)[bearing]
        keys += zip(row_users.tolist(), batch[TS_COLUMN][bearing].tolist(), batch[key][bearing].tolist())
        users.append(row_users.numpy())
        for task in schema.label_columns:
            labels[task].append(batch[task][bearing].double().numpy())
            pred[task].append(torch.sigmoid(logits[task].float())[bearing].double().numpy())
    return EvalPredictions(keys, np.concatenate(users),
                           {task: np.concatenate(values) for task, values in labels.items()},
                           {task: np.concatenate(values) for task, values in pred.items()})


def slice_metrics(pred: dict[str, np.ndarray], labels: dict[str, np.ndarray], users: np.ndarray,
                  relational: np.ndarray, bins: int = 15) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics per slice (:data:`SLICES`) and task; ``relational`` marks the relational slice."""
    masks = {"relational": relational, "rest": ~relational}
    return {name: {task: binary_metrics(pred[task][mask], labels[task][mask], users[mask], bins)
                   for task in labels} for name, mask in masks.items()}


def _relational_mask(truth: EvalTruth, predictions: EvalPredictions, threshold: float) -> np.ndarray:
    """Per token, whether its event is in the relational slice."""
    # Two events of one user in the same second on the same item would share a key; the generator's
    # gaps make that vanishingly rare, and such a pair is scored by the later event's truth.
    index = {key: position for position, key in enumerate(truth.keys)}
    unmatched = [key for key in predictions.keys if key not in index]
    if unmatched:
        raise ValueError(f"{len(unmatched)} eval tokens have no ground truth event (user, ts, id), "
                         f"e.g. {unmatched[:3]}: is 'truth' the raw logs these features were built from?")
    active = truth.relational_logit > threshold
    return active[np.fromiter((index[key] for key in predictions.keys), np.int64, len(predictions.keys))]


def relational_slice(truth: EvalTruth, predictions: dict[str, dict[int, EvalPredictions]], baseline: str,
                     threshold: float, bins: int = 15) -> dict[str, Any]:
    """Every run's metrics on the relational slice and the rest, their statistics over seeds (as
    :func:`summarize`), the Bayes floor per slice, and per variant the paired contrast
    ``ΔNE%_relational,s − ΔNE%_rest,s`` to ``baseline``."""
    active = truth.relational_logit > threshold
    tasks = tuple(truth.labels)
    runs = {variant: {seed: slice_metrics(p.pred, p.labels, p.users, _relational_mask(truth, p, threshold), bins)
                      for seed, p in by_seed.items()} for variant, by_seed in predictions.items()}
    summary = {name: summarize({variant: {seed: slices[name] for seed, slices in by_seed.items()}
                                for variant, by_seed in runs.items()}, baseline, tasks) for name in SLICES}
    contrast: dict[str, Any] = {}
    base = runs[baseline]
    for variant, by_seed in runs.items():
        if variant == baseline:
            continue
        pairs = sorted(seed for seed in by_seed if seed in base)
        contrast[variant] = {task: paired([
            100.0 * (by_seed[s]["relational"][task]["ne"] / base[s]["relational"][task]["ne"]
                     - by_seed[s]["rest"][task]["ne"] / base[s]["rest"][task]["ne"]) for s in pairs])
            for task in tasks}
    return {"column": RELATIONAL_COLUMN, "threshold": threshold,
            "events": {"relational": int(active.sum()), "rest": int((~active).sum())},
            "bayes_floor": slice_metrics(truth.probability, truth.labels, truth.users, active, bins),
            "runs": runs, "summary": summary, "contrast": contrast}


# --- tables -----------------------------------------------------------------------------------

def _pm(stats: dict[str, float], digits: int = 4) -> str:
    if not math.isfinite(stats["mean"]):
        return "n/a"
    if not math.isfinite(stats["std"]):
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _signed(stats: dict[str, Any], digits: int) -> str:
    if not math.isfinite(stats["mean"]):
        return "n/a"
    se = f" ± {stats['se']:.{digits}f}" if math.isfinite(stats["se"]) else ""
    return f"{stats['mean']:+.{digits}f}{se}{' *' if stats['exceeds_2se'] else ''}"


def _tasks(summary: dict[str, Any]) -> list[str]:
    """The tasks of a :func:`summarize` record, in order (every variant has the same)."""
    return list(next(iter(summary.values())))


def format_markdown(summary: dict[str, Any], baseline: str, floor: dict[str, Any] | None) -> str:
    """One markdown table per task: mean ± std over seeds, paired ΔNE (absolute and %) to the baseline
    as mean ± SE, ``*`` where |mean| > 2 SE."""
    lines: list[str] = []
    for task in _tasks(summary):
        lines += [f"### {task}", "",
                  f"| variant | n | NE | AUC | GAUC | ECE | ΔNE vs {baseline} | ΔNE % | ΔAUC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for variant, tasks in summary.items():
            entry = tasks[task]
            versus = entry.get("vs_baseline")
            deltas = (["—", "—", "—"] if versus is None else
                      [_signed(versus["ne"], 5), _signed(versus["ne_relative_pct"], 2), _signed(versus["auc"], 5)])
            lines.append("| " + " | ".join([variant, str(entry["ne"]["n"])]
                                           + [_pm(entry[m]) for m in SUMMARY_METRICS] + deltas) + " |")
        if floor is not None:
            values = floor[task]
            lines.append("| " + " | ".join([BAYES_ROW, "—"] + [
                "n/a" if not math.isfinite(values[m]) else f"{values[m]:.4f}" for m in SUMMARY_METRICS]
                + ["—", "—", "—"]) + " |")
        lines.append("")
    lines.append("Mean ± sample std over seeds; Δ columns: paired by seed, mean ± standard error; "
                 "`*` = |mean| > 2 SE. Lower NE/ECE and higher AUC/GAUC are better.")
    return "\n".join(lines) + "\n"


def format_slice_markdown(record: dict[str, Any], baseline: str) -> str:
    """One markdown table per task: NE on the relational slice and on the rest, the paired ΔNE % to
    the baseline on each, and their paired contrast (negative: the variant gains more where the
    relational effect is active)."""
    events = record["events"]
    total = events["relational"] + events["rest"]
    share = 100.0 * events["relational"] / total if total else math.nan
    lines = [f"## Relational slice: {record['column']} > {record['threshold']:g} "
             f"({events['relational']} of {total} eval events, {share:.1f} %)", "",
             "The simulator's planted relational effect (the synthetic feed's: a recent, observable "
             "engagement with the same author) is active on the relational slice.", ""]
    for task in _tasks(record["summary"]["relational"]):
        lines += [f"### {task} by slice", "",
                  f"| variant | NE relational | ΔNE % vs {baseline} | NE rest | ΔNE % vs {baseline} | "
                  "ΔNE % relational − rest |",
                  "|---|---|---|---|---|---|"]
        for variant in record["summary"]["relational"]:
            cells = [variant]
            for name in SLICES:
                entry = record["summary"][name][variant][task]
                versus = entry.get("vs_baseline")
                cells += [_pm(entry["ne"]), "—" if versus is None else _signed(versus["ne_relative_pct"], 2)]
            contrast = record["contrast"].get(variant)
            cells.append("—" if contrast is None else _signed(contrast[task], 2))
            lines.append("| " + " | ".join(cells) + " |")
        floor = [record["bayes_floor"][name][task]["ne"] for name in SLICES]
        lines.append("| " + " | ".join([BAYES_ROW, *(item for value in floor for item in (
            "n/a" if not math.isfinite(value) else f"{value:.4f}", "—")), "—"]) + " |")
        lines.append("")
    lines.append("NE per slice: mean ± sample std over seeds; Δ columns paired by seed, mean ± standard "
                 "error, `*` = |mean| > 2 SE; the last column is ΔNE % on the relational slice minus "
                 "ΔNE % on the rest, per seed.")
    return "\n".join(lines) + "\n"



def compare(config: CompareConfig) -> dict[str, Any]:
    """Run (or finish) the comparison and write ``compare.json`` and ``compare.md``; returns the record."""
    check_train_configs(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    _, spec = read_feature_manifest(config.features)
    results = run_all(config)
    summary = summarize(results, config.baseline, spec.event_schema.label_columns)
    truth = eval_truth(config.truth, config.features) if config.truth else None
    floor = None if truth is None else {
        task: binary_metrics(truth.probability[task], truth.labels[task], truth.users, config.bins)
        for task in truth.labels}
    slices = None
    if truth is not None and truth.relational_logit is None:
        log.warning("%s has no %s column (written before it existed): no relational slice",
                    Path(config.truth) / TRUTH_DIR, RELATIONAL_COLUMN)
    elif truth is not None:
        predictions = {variant: {seed: eval_predictions(run_dir(config.out, variant, seed), config.features)
                                 for seed in by_seed} for variant, by_seed in results.items()}
        slices = relational_slice(truth, predictions, config.baseline, config.relational_threshold, config.bins)
    record = {"config": to_dict(config), "runs": {v: {str(s): m for s, m in r.items()} for v, r in results.items()},
              "summary": summary, "bayes_floor": floor, "relational_slice": slices}
    write_json(out / COMPARE_JSON, record)
    atomic_write_text(out / COMPARE_MD, compare_markdown(record, config.baseline))
    return record


def compare_markdown(record: dict[str, Any], baseline: str) -> str:
    """``compare.md``: the overall tables, then the relational slice's where there is one."""
    text = format_markdown(record["summary"], baseline, record["bayes_floor"])
    if record["relational_slice"] is not None:
        text += "\n" + format_slice_markdown(record["relational_slice"], baseline)
    return text


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed compare", description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="feature dataset directory (config key features)")
    parser.add_argument("--out", help="comparison directory (config key out)")
    parser.add_argument("--variants", help="comma-separated presets, e.g. ordinal,siren (config key variants)")
    parser.add_argument("--seeds", type=int, help="seeds per variant (config key seeds)")
    parser.add_argument("--truth", help="synthetic raw logs with _truth/: adds the Bayes floor (config key truth)")
    parser.add_argument("--nproc", type=int, help="ranks per run (config key nproc)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    variants = None if args.variants is None else [
        name.strip() for name in args.variants.split(",") if name.strip()]
    config = config_from_args(CompareConfig, args, features=args.features, out=args.out, variants=variants,
                              seeds=args.seeds, truth=args.truth, nproc=args.nproc)
    record = compare(config)
    print(compare_markdown(record, config.baseline))
    return 0


if __name__ == "__main__":
    configure_logging()
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as error:
        print(f"sirenfeed compare: {error}", file=sys.stderr)
        sys.exit(2)
