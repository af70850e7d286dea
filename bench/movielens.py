"""The worked example of docs/your-logs.md: MovieLens-100K through the whole pipeline with its own
schema file, and ordinal RoPE, the time-in-embedding control and SIREN-RoPE compared over seeds.

    .venv/bin/python bench/movielens.py [--seeds 3] [--work DIR] [--keep]

Steps, each a real command: ``sirenfeed movielens`` (the ratings of the ``recbole`` wheel as raw
events of ``conf/schemas/movielens.yaml``), ``sirenfeed features`` with ``spec.schema=movielens``
(and ``contract.epoch_ms=0``: the ratings are from 1997-98), then ``sirenfeed compare`` of the three
variants, ``seeds`` runs each on 2 ranks with the same budget. Writes
``bench/results/movielens.json`` (atomically): the dataset's counts, every run's metrics, and per
variant and task the mean ± std over seeds and the paired difference to ordinal RoPE, whichever way
they go. ``make movielens`` runs it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.files import write_json
from common.repo import REPO_ROOT
from features.dataset import read_manifest

RESULTS = REPO_ROOT / "bench" / "results" / "movielens.json"
VARIANTS = ("ordinal", "time_embedding", "siren")
FEATURE_OVERRIDES = ("spec.schema=movielens", "contract.epoch_ms=0", "eval_days=28")
"""The last four weeks of ratings are held out (the log ends on 1998-04-22)."""
TRAIN_OVERRIDES = ("data.batch_size=128", "train.epochs=4", "optim.lr=0.002", "schedule.warmup_steps=20",
                   "train.log_every=10", "train.checkpoint_every=0")
"""The same budget for every run: four passes over the train windows."""


def sirenfeed(*arguments: str) -> None:
    """One ``sirenfeed`` command, its output passed through; fails the bench on a non-zero exit."""
    command = [sys.executable, "-m", "sirenfeed.cli", *arguments]
    print("$ sirenfeed " + " ".join(arguments), flush=True)
    subprocess.run(command, cwd=REPO_ROOT, check=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", help="working directory (default: a fresh temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-movielens-"))
    started = time.monotonic()
    try:
        raw, features, compare = work / "raw", work / "features", work / "compare"
        if not (raw / "_SUCCESS").is_file():
            sirenfeed("movielens", "--out", str(raw))
        if not (features / "_SUCCESS").is_file():
            sirenfeed("features", "--raw", str(raw), "--out", str(features), *FEATURE_OVERRIDES)
        sirenfeed("compare", "--features", str(features), "--out", str(compare), "--variants",
                  ",".join(VARIANTS), "--seeds", str(args.seeds), f"train_overrides=[{','.join(TRAIN_OVERRIDES)}]")
        manifest = read_manifest(features)
        results = json.loads((compare / "compare.json").read_text())
        write_json(RESULTS, {
            "bench": "movielens",
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": {"platform": platform.platform(), "python": platform.python_version()},
            "seconds": round(time.monotonic() - started, 1),
            "commands": {"features": list(FEATURE_OVERRIDES), "train_overrides": list(TRAIN_OVERRIDES),
                         "variants": list(VARIANTS), "seeds": args.seeds},
            "dataset": {"events": manifest["events"], "quarantined": manifest["quarantined"],
                        "splits": manifest["splits"], "schema": manifest["spec"]["schema"]["name"]},
            "compare": results,
        })
        print((compare / "compare.md").read_text())
        print(f"wrote {RESULTS} in {time.monotonic() - started:.0f} s")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
