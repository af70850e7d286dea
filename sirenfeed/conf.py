"""``sirenfeed conf [--check]``: (re)generate every file of ``conf/`` from its config schema.

Each default and its explanation live once, in the schema dataclass (the field and its docstring);
the YAML files users read and copy are rendered from it (:func:`common.conf_files.render_defaults`),
so they cannot drift. ``--check`` writes nothing and exits 1 naming the files that differ from what
their schema renders (a default or a docstring changed without regenerating).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from common.conf_files import render_defaults
from common.files import atomic_write_text
from common.repo import REPO_ROOT
from features.settings import FeaturesConfig
from features.synth import SynthConfig
from ingest.config import IngestConfig
from lifecycle.config import RetrainConfig
from sirenfeed.demo import DemoConfig
from trainer.compare import CompareConfig
from trainer.config import TrainConfig
from trainer.evaluate import EvaluateConfig
from trainer.report import ReportConfig

CONF_DIR = REPO_ROOT / "conf"


@dataclass(frozen=True)
class ConfFile:
    schema: type
    header: str
    """Which command reads the file and how to override it (the file's first comment lines)."""


CONF_FILES: dict[str, ConfFile] = {
    "synth.yaml": ConfFile(SynthConfig, """\
sirenfeed synth --out RAW_DIR --config conf/synth.yaml [key=value ...], e.g. process.topics=20"""),
    "features.yaml": ConfFile(FeaturesConfig, """\
sirenfeed features --raw RAW --out OUT [--incremental] --config conf/features.yaml [key=value ...]
e.g. spec.context_len=64 eval_days=2; spark-submit features/job.py takes the same options."""),
    "train.yaml": ConfFile(TrainConfig, """\
sirenfeed train --features DIR --run RUN_DIR [--nproc 2] --config conf/train.yaml [key=value ...]"""),
    "evaluate.yaml": ConfFile(EvaluateConfig, """\
sirenfeed evaluate --run RUN_DIR [--features DIR] [--nproc N] --config conf/evaluate.yaml
    [key=value ...]"""),
    "ingest.yaml": ConfFile(IngestConfig, """\
sirenfeed broker | produce | ingest --config conf/ingest.yaml [key=value ...],
e.g. sirenfeed ingest --config conf/ingest.yaml consumer.max_events=1000"""),
    "demo.yaml": ConfFile(DemoConfig, """\
sirenfeed demo --config conf/demo.yaml [key=value ...] (what `make demo` runs)"""),
    "retrain.yaml": ConfFile(RetrainConfig, """\
sirenfeed retrain [--every 1h] | train --continuous --config conf/retrain.yaml [key=value ...]
with the required keys, e.g. dir=STATE initial_run=RUN features.raw=LANDING features.out=FEATURES"""),
    "compare.yaml": ConfFile(CompareConfig, """\
sirenfeed compare --features DIR --out OUT [--variants a,b] [--seeds N] [--truth RAW_DIR]
    --config conf/compare.yaml [key=value ...]"""),
    "report.yaml": ConfFile(ReportConfig, """\
sirenfeed report --run RUN [--features DIR] [--out DIR] --config conf/report.yaml [key=value ...]"""),
}
"""Every file of ``conf/``: its schema, and the header naming the command that reads it."""

GENERATED_NOTE = "Generated from {schema} by `sirenfeed conf`: edit the schema instead."


def render(name: str) -> str:
    """The text ``conf/<name>`` should hold."""
    conf_file = CONF_FILES[name]
    note = GENERATED_NOTE.format(schema=f"{conf_file.schema.__module__}.{conf_file.schema.__qualname__}")
    return render_defaults(conf_file.schema, f"{conf_file.header}\n{note}")


def out_of_date(conf_dir: Path = CONF_DIR) -> list[str]:
    """The names of :data:`CONF_FILES` whose file in ``conf_dir`` is missing or differs."""
    return [name for name in CONF_FILES
            if not (conf_dir / name).is_file() or (conf_dir / name).read_text() != render(name)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed conf", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming the files that differ from their schema")
    args = parser.parse_args(argv)
    stale = out_of_date()
    if args.check:
        for name in stale:
            print(f"conf/{name} differs from {CONF_FILES[name].schema.__qualname__}'s defaults; "
                  "run `sirenfeed conf`", file=sys.stderr)
        return 1 if stale else 0
    for name in stale:
        atomic_write_text(CONF_DIR / name, render(name))
        print(f"wrote conf/{name}")
    print(f"conf/: {len(CONF_FILES) - len(stale)} of {len(CONF_FILES)} files were up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
