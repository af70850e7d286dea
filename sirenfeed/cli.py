"""``sirenfeed <command> [--config FILE] [options] [key=value ...]``.

Each command lives in the package that owns it and exposes ``main(argv) -> int``; this module only
dispatches, importing the chosen command alone so ``sirenfeed --help`` stays fast. ``sirenfeed
train`` has three modes, each owned by its own package: a batch run (:mod:`trainer.launch`), a warm
start (``--resume-from``, :mod:`lifecycle.segment`) and continuous training (``--continuous``,
:mod:`lifecycle.continuous`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from common.config import ConfigError
from common.logs import configure_logging

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("features.synth", "write synthetic logs of an event schema (the feed world by default)"),
    "movielens": ("features.movielens", "convert MovieLens-100K into raw events of the movielens schema"),
    "features": ("features.submit", "run the Spark feature job (spark-submit, local master)"),
    "train": ("trainer.launch", "train the ranker through the deepspeed launcher (local ranks, a hostfile, or one node of many); "
                                "--continuous: keep training on new data as it lands"),
    "evaluate": ("trainer.evaluate", "evaluate RUN_DIR/export/latest exactly on FEATURES_DIR/eval"),
    "compare": ("trainer.compare", "train rotary variants x seeds on the same data; mean ± std and paired deltas"),
    "report": ("trainer.report", "HTML report with figures of a run: curves, calibration, NE by hour/gap, angles"),
    "broker": ("ingest.broker", "run the embedded Kafka-protocol broker on 127.0.0.1"),
    "produce": ("ingest.producer", "replay raw events into a Kafka topic as JSON"),
    "ingest": ("ingest.consumer", "consume events into the raw Parquet landing zone, exactly once"),
    "retrain": ("lifecycle.retrain", "one incremental retraining cycle (features, warm start, gate, publish)"),
    "demo": ("sirenfeed.demo", "run the whole pipeline end to end on the embedded defaults"),
    "conf": ("sirenfeed.conf", "regenerate conf/*.yaml from the config schemas (--check: only compare)"),
}


TRAIN_MODES = {"continuous": "lifecycle.continuous", "resume_from": "lifecycle.segment"}
"""The modules of ``sirenfeed train``'s modes, by the option that selects them."""


def _train_module(argv: list[str]) -> str:
    """The module of the ``sirenfeed train`` mode ``argv`` selects (options parsed, not matched)."""
    modes = argparse.ArgumentParser(add_help=False)
    group = modes.add_mutually_exclusive_group()
    group.add_argument("--continuous", action="store_true")
    group.add_argument("--resume-from")
    selected, _ = modes.parse_known_args(argv)
    chosen = [TRAIN_MODES[name] for name in TRAIN_MODES if getattr(selected, name)]
    return chosen[0] if chosen else COMMANDS["train"][0]


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: sirenfeed <command> [--config FILE] [options] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`sirenfeed <command> --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sirenfeed: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    configure_logging()
    # What libraries print while they load (DeepSpeed announces its accelerator) is not the command's
    # output, which may be a YAML file (--print-config) or a table.
    with contextlib.redirect_stdout(sys.stderr):
        module = importlib.import_module(_train_module(rest) if name == "train" else COMMANDS[name][0])
    try:
        return int(module.main(rest) or 0)
    except ConfigError as error:
        print(f"sirenfeed {name}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
