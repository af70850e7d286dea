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

With ``truth`` (the synthetic logs' directory), the Bayes-optimal metrics of the eval events, scored
with the generator's true probabilities (``RAW_DIR/_truth``), are the floor no model can beat.

Writes ``OUT/compare.json`` (every number) and ``OUT/compare.md`` (the tables) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import MISSING
from tqdm import tqdm

from features.config import (ConfigError, add_config_arguments, config_from_args, load_config, require,
                             to_dict)
from features.dataset import atomic_write_text, json_safe, read_manifest
from features.logs import configure_logging
from features.schema import ContractConfig
from features.spec import LABEL_COLUMNS, FeatureSpec, long_dwell_threshold, user_key
from features.synth import TRUTH_COLUMNS, TRUTH_DIR
from features.validation import check_record
from trainer.checkpoint import complete_tags
from trainer.config import TrainConfig
from trainer.evaluate import METRICS_FILE
from trainer.export import export_root, verify_export
from trainer.distributed import remove_leftover_segments
from trainer.launch import REPO_ROOT, TRAIN_SCRIPT, deepspeed_command, free_port, launch_env
from trainer.metrics import binary_metrics
from trainer.variants import VARIANTS, variant_overrides

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
TRAIN_LOG = "train.log"
COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
SUMMARY_METRICS: tuple[str, ...] = ("ne", "auc", "gauc", "ece")
BAYES_ROW = "bayes (truth)"
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
    first_seed: int = 0
    """Seeds are ``first_seed … first_seed + seeds − 1``."""
    nproc: int = 2
    train_config: str = ""
    """Training config file; empty = the repository's ``conf/train.yaml``."""
    train_overrides: list[str] = field(default_factory=list)
    """``key=value`` overrides of the training config, the same for every run (the budget)."""
    truth: str = ""
    """Synthetic raw logs directory with ``_truth/``: adds the Bayes-optimal floor (optional)."""
    bins: int = 15
    """Equal-width calibration bins for the floor's ECE (the trainer's evaluation uses 15)."""

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


def run_overrides(config: CompareConfig, variant: str, seed: int) -> list[str]:
    """The training overrides of one run: shared budget, then the variant and seed (which win)."""
    return [*config.train_overrides, *variant_overrides(variant), f"seed={seed}", f"data.seed={seed}",
            f"features={config.features}", f"run={run_dir(config.out, variant, seed)}"]


def check_train_configs(config: CompareConfig) -> None:
    """Fail before any training when a variant's training config would be rejected."""
    for variant in config.variants:
        load_config(TrainConfig, config.train_config_file, run_overrides(config, variant, config.first_seed))


def read_result(run: Path) -> dict[str, Any] | None:
    path = run / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_one(config: CompareConfig, variant: str, seed: int) -> dict[str, Any]:
    """Train (or resume) one run through the deepspeed launcher; its log goes to ``RUN/train.log``.

    Returns the result record, written to ``RUN/result.json`` once the export has verified.
    """
    run = run_dir(config.out, variant, seed)
    overrides = run_overrides(config, variant, seed)
    if complete_tags(run):
        overrides.append("train.resume=true")
        log.info("%s/seed%d: resuming from its newest checkpoint", variant, seed)
    elif run.exists():
        shutil.rmtree(run)  # a crashed attempt that never checkpointed: nothing worth keeping
    run.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = deepspeed_command(TRAIN_SCRIPT, config.nproc, port, str(config.train_config_file), overrides)
    with (run / TRAIN_LOG).open("a") as stream:
        code = subprocess.run(command, env=launch_env(), stdout=stream, stderr=subprocess.STDOUT,
                              check=False).returncode
    remove_leftover_segments(port)
    if code != 0:
        tail = (run / TRAIN_LOG).read_text()[-3000:]
        raise CompareError(f"training {variant} seed {seed} failed (exit code {code}); "
                           f"log {run / TRAIN_LOG}:\n{tail}")
    export = verify_export(export_root(run) / "latest")
    metrics = json.loads((run / METRICS_FILE).read_text())
    result = {"variant": variant, "seed": seed, "step": export["step"], "export": export["tag"],
              "metrics": metrics["metrics"], "overrides": overrides}
    atomic_write_text(run / RESULT_FILE, json.dumps(result, indent=2, sort_keys=True) + "\n")
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


def summarize(results: dict[str, dict[int, dict[str, Any]]], baseline: str) -> dict[str, Any]:
    """Per variant and task: mean ± std of each metric, and the paired differences to ``baseline``."""
    summary: dict[str, Any] = {}
    base = results[baseline]
    for variant, by_seed in results.items():
        seeds = sorted(by_seed)
        pairs = [seed for seed in seeds if seed in base]
        summary[variant] = {}
        for task in LABEL_COLUMNS:
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

RAW_COLUMNS = ("event_id", "user_id", "item_id", "author_id", "content_type", "topic", "surface",
               "event_ts", "dwell_ms", "click", "like", "comment", "share")


def _parquet_table(root: Path, columns: list[str] | None = None) -> pa.Table:
    """Every data file under ``root`` (hidden and ``_``-prefixed paths, like ``_truth``, skipped)."""
    files = sorted(path for path in root.rglob("*.parquet")
                   if not any(part.startswith(("_", ".")) for part in path.relative_to(root).parts))
    return pa.concat_tables([pq.read_table(path, columns=columns) for path in files])


def bayes_floor(raw_dir: str | Path, features_dir: str | Path, bins: int = 15) -> dict[str, dict[str, float]]:
    """Metrics per task of the generator's true probabilities on exactly the eval split's events:
    the valid (contract), deduplicated events at or after the split time of the feature dataset."""
    raw_dir = Path(raw_dir)
    if not (raw_dir / TRUTH_DIR).is_dir():
        raise FileNotFoundError(f"{raw_dir / TRUTH_DIR} not found: 'truth' must be synthetic logs "
                                "written by `sirenfeed synth`")
    read_manifest(raw_dir)
    manifest = read_manifest(features_dir)
    spec = FeatureSpec(**manifest["spec"])
    contract = ContractConfig(**manifest["config"]["contract"])
    split_ms = manifest["split_ts_ms"]
    events = _parquet_table(raw_dir, list(RAW_COLUMNS)).to_pylist()
    seen: set[str] = set()
    kept: dict[str, dict[str, Any]] = {}
    for event in sorted((e for e in events if (e["event_ts"] or 0) >= split_ms),
                        key=lambda e: (e["event_ts"], e["event_id"] or "")):
        if event["event_id"] in seen or check_record(event, contract, manifest["processing_ms"]) is not None:
            continue
        seen.add(event["event_id"])
        kept[event["event_id"]] = event
    truth = _parquet_table(raw_dir / TRUTH_DIR).to_pydict()
    probability = {event_id: row for event_id, *row in zip(truth["event_id"], *(truth[c] for c in TRUTH_COLUMNS))}
    missing = [event_id for event_id in kept if event_id not in probability]
    if missing:
        raise ValueError(f"{len(missing)} eval events have no ground truth in {raw_dir / TRUTH_DIR}, "
                         f"e.g. {missing[:3]}")
    ordered = list(kept.values())
    labels = {
        "contribution": [e["like"] or e["comment"] or e["share"] for e in ordered],
        "like": [e["like"] for e in ordered],
        "long_dwell": [e["dwell_ms"] >= long_dwell_threshold(spec, e["content_type"]) for e in ordered],
    }
    users = np.array([user_key(e["user_id"]) for e in ordered], dtype=np.int64)
    floor = {}
    for index, task in enumerate(LABEL_COLUMNS):
        column = TRUTH_COLUMNS.index(f"p_{task}")
        pred = np.array([probability[e["event_id"]][column] for e in ordered], dtype=np.float64)
        floor[task] = binary_metrics(pred, np.asarray(labels[task], dtype=np.float64), users, bins)
    return floor


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


def format_markdown(summary: dict[str, Any], baseline: str, floor: dict[str, Any] | None) -> str:
    """One markdown table per task: mean ± std over seeds, paired ΔNE (absolute and %) to the baseline
    as mean ± SE, ``*`` where |mean| > 2 SE."""
    lines: list[str] = []
    for task in LABEL_COLUMNS:
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



def compare(config: CompareConfig) -> dict[str, Any]:
    """Run (or finish) the comparison and write ``compare.json`` and ``compare.md``; returns the record."""
    check_train_configs(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(config)
    summary = summarize(results, config.baseline)
    floor = bayes_floor(config.truth, config.features, config.bins) if config.truth else None
    record = {"config": to_dict(config), "runs": {v: {str(s): m for s, m in r.items()} for v, r in results.items()},
              "summary": summary, "bayes_floor": floor}
    atomic_write_text(out / COMPARE_JSON, json.dumps(json_safe(record), indent=2, sort_keys=True) + "\n")
    atomic_write_text(out / COMPARE_MD, format_markdown(summary, config.baseline, floor))
    return record


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
    variants = None if args.variants is None else "[" + ",".join(
        name.strip() for name in args.variants.split(",") if name.strip()) + "]"
    config = config_from_args(CompareConfig, args, features=args.features, out=args.out, variants=variants,
                              seeds=args.seeds, truth=args.truth, nproc=args.nproc)
    record = compare(config)
    print(format_markdown(record["summary"], config.baseline, record["bayes_floor"]))
    return 0


if __name__ == "__main__":
    configure_logging()
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as error:
        print(f"sirenfeed compare: {error}", file=sys.stderr)
        sys.exit(2)
