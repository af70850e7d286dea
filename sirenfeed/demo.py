"""``sirenfeed demo`` (what ``make demo`` runs): the whole pipeline end to end on this machine.

Its steps, numbered on the terminal:

- synthetic feed logs (``features.synth``): ``days`` of history plus ``fresh_days`` fresh days
  kept aside for the retraining leg;
- the Spark feature job through ``spark-submit`` on a local master;
- one step per variant (SIREN-RoPE and the ordinal-RoPE baseline by default): 2-rank DeepSpeed
  training on the same data, evaluated exactly on the held-out last day; then a side-by-side table;
- the first variant's exported model, loaded back with ``weights_only=True``;
- the streaming leg: the last day of events replayed through the embedded Kafka-protocol broker
  into the raw landing zone, checked to hold exactly the replayed valid events;
- continuous retraining: the batch model is served; a Kafka consumer and the long-lived continuous
  pipeline (``sirenfeed train --continuous``: one Spark application and resident ranks kept up for
  every cycle) run beside the demo while each fresh day is produced to Kafka; every cycle appends
  what landed to the features, warm-starts the first variant on it, gates the candidate against
  the served model on the freshest held-out slice and publishes it or not; the gate's verdicts, the
  decision, the freshness (produced to Kafka → decided) and each step's time are printed.

The terminal gets the numbered steps with their times, progress bars, the tables and the decisions
(:class:`Steps`); everything else a step produces (our log records, Python warnings, the
``deepspeed`` launcher and its ranks, ``spark-submit`` and its JVM, the Kafka clients) goes to that
step's log file, ``work/logs/NN-name.log`` (:func:`common.logs.output_to`), named at the end. A
failed step shows the end of its log and the demo exits 1.

Everything lands under ``work`` (default ``demo-out/``), which each run replaces step by step.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shutil
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

import pyarrow.parquet as pq

from common.config import add_config_arguments, config_from_args, load_config, require
from common.files import visible_files
from common.logs import output_to
from common.repo import REPO_ROOT
from features.batches import batch_name
from features.dataset import read_manifest
from features.settings import FeaturesConfig
from features.submit import run_job
from features.summary import describe
from features.synth import SynthConfig, write_synthetic_logs
from features.transforms import EVAL, TRAIN
from ingest.broker import embedded_broker
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.consumer import Ingestor
from ingest.demo import streaming_leg
from ingest.landing import DEAD_LETTER_DIR
from ingest.producer import event_messages, raw_dates, read_day, send_messages
from lifecycle.registry import publish, read_log
from trainer.config import TrainConfig
from trainer.export import load_exported
from trainer.launcher import TRAIN_SCRIPT, run_with_config
from trainer.metrics import format_table
from trainer.variants import variant_overrides

log = logging.getLogger(__name__)

INDENT = "      "
"""What a step's own lines are indented by, under its ``[N/M]`` title."""
WIDTH = 110
"""Where a step's long lines wrap."""
TAIL_LINES = 20
"""How much of a failed step's log the terminal shows."""


@dataclass
class DemoConfig:
    work: str = "demo-out"
    """Where everything lands; each run replaces it step by step."""
    users: int = 1000
    days: int = 14
    seed: int = 7
    nproc: int = 2
    variants: list[str] = field(default_factory=lambda: ["siren", "ordinal"])
    """Named model presets (``trainer.variants``) trained side by side on the same data."""
    feature_overrides: list[str] = field(default_factory=lambda: ["spec.buckets.item_id=20011"])
    """``key=value`` overrides of the feature job (fewer item buckets: the demo's catalogue is small
    and the optimizer step over a 200k-row item table would dominate a CPU demo)."""
    train_overrides: list[str] = field(default_factory=lambda: [
        "data.batch_size=128", "train.epochs=4", "train.log_every=50", "schedule.warmup_steps=30",
        "train.checkpoint_every=0"])
    """``key=value`` overrides of ``conf/train.yaml`` for every demo run (kept small for a laptop;
    ``data.batch_size`` is the global batch, over all ranks)."""
    streaming: bool = True
    """Run the streaming leg: the last day replayed through the embedded Kafka broker into the raw
    landing zone."""
    fresh_days: int = 2
    """Fresh days streamed through Kafka into the continuous pipeline after the batch run, one after
    the other once the last is decided (0 = none)."""

    def __post_init__(self) -> None:
        require(self.users >= 1, "users", "must be >= 1")
        require(self.days >= 2, "days", "must be >= 2 (the last day is held out)")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(bool(self.variants), "variants", "must name at least one model preset")
        require(self.fresh_days >= 0, "fresh_days", "must be >= 0")


class StepFailed(RuntimeError):
    """A step of the demo failed; the terminal has shown the end of its log."""


class Steps:
    """The demo's numbered steps on ``out``, each one's chatter in a log file of its own.

    A step shows ``[3/7] training 'siren' on 2 ranks … 41 s``: its title as it starts and its time
    as it ends, on one line unless something else reaches the terminal meanwhile (a line of
    :meth:`say`, or a progress bar: a step that draws some says so with ``bars``), when the time
    gets a line of its own. While the step runs, :func:`common.logs.output_to` sends everything
    else to ``logs/NN-name.log``.
    """

    def __init__(self, total: int, logs: Path, out: TextIO):
        self.total, self.logs, self.out = total, logs, out
        self.files: list[Path] = []
        self._title_open = False  # a step's title waits on its line for the step's time

    def _close_title(self) -> None:
        if self._title_open:
            self.out.write("\n")
            self._title_open = False

    def say(self, text: str = "") -> None:
        """Lines of a step's results, indented under the titles (long ones wrapped, their own
        indentation kept)."""
        self._close_title()
        for line in text.split("\n"):
            content = line.lstrip()
            indent = INDENT + line[:len(line) - len(content)]
            wrapped = textwrap.wrap(content, WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                                    break_long_words=False, break_on_hyphens=False)
            self.out.write("\n".join(wrapped) + "\n" if content else "\n")
        self.out.flush()

    def show(self, text: str) -> None:
        """Lines as they are: a table, or the closing lines at the left margin."""
        self._close_title()
        self.out.write(text + "\n")
        self.out.flush()

    @contextlib.contextmanager
    def step(self, name: str, title: str, bars: bool = False) -> Iterator[None]:
        number = len(self.files) + 1
        path = self.logs / f"{number:02d}-{name}.log"
        self.files.append(path)
        self.out.write(f"[{number}/{self.total}] {title} …" + ("\n" if bars else ""))
        self.out.flush()
        self._title_open = not bars
        started = time.monotonic()
        try:
            with output_to(path):
                log.info("step %d/%d: %s", number, self.total, title)
                try:
                    yield
                except Exception:
                    log.exception("step %d/%d failed", number, self.total)
                    raise
        except Exception as error:
            self.say(f"failed after {time.monotonic() - started:.0f} s; the end of {shown(path)}:")
            tail = path.read_text(errors="replace").splitlines()[-TAIL_LINES:]
            self.out.write("".join(f"{INDENT}| {line}\n" for line in tail))
            self.out.flush()
            raise StepFailed(f"step {number}/{self.total} ({title}) failed; log: {path}") from error
        seconds = time.monotonic() - started
        if self._title_open:
            self.out.write(f" {seconds:.0f} s\n")
            self.out.flush()
            self._title_open = False
        else:
            self.say(f"done in {seconds:.0f} s")


def shown(path: Path) -> str:
    """``path`` as the terminal shows it: relative to the working directory when inside it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def days(count: int, kind: str) -> str:
    """``1 fresh day``, ``2 fresh days``."""
    return f"{count} {kind} day{'' if count == 1 else 's'}"


def utc_minutes(ms: int) -> str:
    """An epoch-millisecond time as ``YYYY-MM-DD HH:MM UTC``."""
    return f"{dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc):%Y-%m-%d %H:%M} UTC"


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    work = Path(config.work).resolve()
    synth_dir, raw, features = work / "synth", work / "raw", work / "features"
    train_conf = REPO_ROOT / "conf" / "train.yaml"
    total = 2 + len(config.variants) + 1 + int(config.streaming) + int(config.fresh_days > 0)
    shutil.rmtree(work / "logs", ignore_errors=True)  # a previous run's steps are not this one's
    steps = Steps(total, work / "logs", sys.stdout)
    # The producer's and the consumer's progress bars show only on a terminal (tqdm's disable=None).
    kafka_bars = sys.stderr.isatty()

    # synth draws its progress bar whatever stderr is.
    with steps.step("synth", f"synthetic feed logs: {config.users:,} users × {config.days} days, "
                    f"+{days(config.fresh_days, 'fresh')} kept aside", bars=True):
        synth = load_config(SynthConfig, None, [f"users={config.users}",
                                                f"days={config.days + config.fresh_days}",
                                                f"seed={config.seed}"])
        manifest = write_synthetic_logs(synth, synth_dir)
        fresh_dates = split_history(synth_dir, raw, config.fresh_days)
    steps.say(f"{manifest['events']:,} events → {shown(raw)}, with {manifest['bad_events_total']} malformed "
              f"and {manifest['duplicates']} duplicates for the feature job to catch")

    job = load_config(FeaturesConfig, None, config.feature_overrides, {"raw": raw, "out": features})
    with steps.step("features", f"Spark feature job (spark-submit, {job.spark.master}) → {shown(features)}"):
        code = run_job(job)
        if code != 0:
            raise RuntimeError(f"the feature job failed (spark-submit exit code {code})")
        log.info("the feature dataset:\n%s", describe(features))
    steps.say(feature_summary(read_manifest(features)))

    results = {}
    for name in config.variants:
        run_dir = work / "runs" / name
        with steps.step(f"train-{name}", f"training '{name}' on {config.nproc} ranks → {shown(run_dir)}"):
            shutil.rmtree(run_dir, ignore_errors=True)  # a previous demo's checkpoints are not this one's
            train = load_config(TrainConfig, train_conf, [*variant_overrides(name), *config.train_overrides],
                                {"features": features, "run": run_dir})
            code = run_with_config(TRAIN_SCRIPT, config.nproc, train)
            if code != 0:
                raise RuntimeError(f"training '{name}' failed (launcher exit code {code})")
        results[name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    baseline = f"; ΔNE% vs '{config.variants[0]}'" if len(results) > 1 else ""
    steps.say(f"held-out last day (NE, ECE: lower is better; AUC, GAUC: higher{baseline}):")
    steps.show(textwrap.indent(format_table(results), INDENT))

    export = work / "runs" / config.variants[0] / "export" / "latest"
    with steps.step("export", f"the exported '{config.variants[0]}' model, loaded back with weights_only=True"):
        model, _, spec = load_exported(export)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    steps.say(f"{shown(export)} → {export.resolve().name}: {parameters:,} parameters, C = {spec.context_len}, "
              "checksums verified")

    if config.streaming:
        with steps.step("streaming", "streaming leg: the last day through Kafka into the landing zone",
                        bars=kafka_bars):
            result = streaming_leg(raw, work / "stream")
        steps.say(result["summary"])

    if fresh_dates:
        with steps.step("retrain", f"continuous retraining: {days(len(fresh_dates), 'fresh')} through "
                        "Kafka and the long-lived pipeline", bars=True):
            retraining_leg(config, work, synth_dir, fresh_dates, work / "runs" / config.variants[0], steps)

    steps.show(f"demo finished in {time.monotonic() - started:.0f} s; outputs under {shown(work)}")
    steps.show(textwrap.fill(f"logs: {shown(steps.logs)}/" + ", ".join(path.name for path in steps.files),
                             WIDTH, subsequent_indent=INDENT))
    return 0


def feature_summary(manifest: dict[str, Any]) -> str:
    """The feature job's counts in two lines (the whole summary, ``describe``, is in the log)."""
    splits = manifest["splits"]
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in manifest["quarantined_by_reason"].items())
    lines = [f"{manifest['input_events']:,} input events: {manifest['events']:,} kept, "
             f"{manifest['duplicates']:,} duplicates, {manifest['quarantined']:,} quarantined"
             + (f" ({reasons})" if reasons else ""),
             f"windows of up to {manifest['spec']['context_len']} events: {splits[TRAIN]['rows']:,} train "
             f"({splits[TRAIN]['label_tokens']:,} labels), {splits[EVAL]['rows']:,} eval "
             f"({splits[EVAL]['label_tokens']:,} labels) from {utc_minutes(manifest['split_ts_ms'])}"]
    return "\n".join(lines)


def split_history(synth_dir: Path, raw: Path, fresh_days: int) -> list[str]:
    """Hard-link all but the last ``fresh_days`` days of the synthetic log into ``raw`` (the history
    the batch run reads; replaced); returns the dates kept aside."""
    folders = sorted(synth_dir.glob("date=*"))
    history = folders[:len(folders) - fresh_days]
    shutil.rmtree(raw, ignore_errors=True)
    for folder in history:
        shutil.copytree(folder, raw / folder.name, copy_function=os.link)
    return [folder.name.split("=", 1)[1] for folder in folders[len(history):]]


def retraining_leg(config: DemoConfig, work: Path, synth_dir: Path, fresh_dates: list[str],
                   initial_run: Path, steps: Steps) -> None:
    """Serve the batch model, then run the long-lived continuous pipeline beside the demo: one
    Kafka consumer into the landing zone and ``sirenfeed train --continuous`` (its resident Spark
    application and ranks), while each fresh day is produced to Kafka; every cycle's decision and
    the day's freshness (produced → decided) are shown."""
    # Imported here, inside the step's log redirect: these load DeepSpeed, which announces its
    # accelerator as it loads (a warning on every CPU-only machine, nothing to act on in a demo).
    from lifecycle import config as lifecycle_config, cycle, poller

    root = work / "retrain"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(work / "broker", ignore_errors=True)
    ingest_overrides = [f"landing.dir={work / 'raw'}", f"broker.run_dir={work / 'broker'}", "broker.port=0",
                        "metrics.report_lag=false"]
    features = work / "features"
    manifest = read_manifest(features)
    served = publish(initial_run / "export" / "latest", root / "registry", f"{batch_name(0)}-batch",
                     {"batch": 0, "watermark_ms": manifest["watermark_ms"], "cycle": None,
                      "max_event_ms": min(manifest["watermark_ms"], manifest["split_ts_ms"] - 1)}, keep=3)
    steps.say(f"serving the batch model {served.name}; fresh days come through Kafka")
    fresh = raw_dates(synth_dir)
    with embedded_broker(load_config(IngestConfig, None, ingest_overrides)) as address:
        ingest = load_config(IngestConfig, None, [*ingest_overrides, f"kafka.bootstrap_servers={address}"])
        retrain = lifecycle_config.RetrainConfig(
            dir=str(root), initial_run=str(initial_run), nproc=config.nproc,
            features=load_config(FeaturesConfig, None, config.feature_overrides,
                                 {"raw": work / "raw", "out": features}),
            train_overrides=[*lifecycle_config.CONTINUAL_TRAIN_OVERRIDES, *variant_overrides(config.variants[0]),
                             *config.train_overrides, "train.epochs=1"],
            # A day lands in a few seconds: waiting that long makes it one batch, not several.
            continuous=lifecycle_config.ContinuousConfig(poll_s=0.5, every_s=DAY_LANDS_S))
        stop = threading.Event()
        pipeline = Pipeline(
            threading.Thread(target=Ingestor(ingest, stop).run, name="demo-ingest", daemon=True),
            threading.Thread(target=poller.run_continuous, args=(retrain, stop), name="demo-continuous",
                             daemon=True))
        producer = make_producer(ingest)
        started = time.monotonic()
        try:
            pipeline.start()
            steps.say("long-lived pipeline: a Kafka consumer, one Spark application and "
                      f"{config.nproc} resident ranks, kept up for every cycle")
            decided = 0
            for number, date in enumerate(fresh_dates, 1):
                day = read_day(fresh[date])
                landed_before = landed_messages(work / "raw")
                send_messages(producer, ingest.kafka.topic, event_messages(day), total=day.num_rows,
                              description=f"produce {date}")
                produced_at = time.time()
                steps.say(f"day {number}: {day.num_rows:,} events of {date} produced to Kafka")
                retrainer = cycle.Retrainer(retrain)
                pipeline.wait_until(lambda: landed_messages(work / "raw") >= landed_before + day.num_rows
                                    and retrainer.caught_up(), f"day {number} decided")
                records = read_log(root / "registry")
                for record in records[decided:]:
                    steps.say(textwrap.indent(cycle_summary(record, produced_at, journal_of(root, record)), "  "))
                decided = len(records)
        finally:
            producer.close()
            stop.set()
            pipeline.join()
        steps.say(f"{decided} cycles in {time.monotonic() - started:.0f} s; publish log: "
                  f"{shown(root / 'registry' / 'publish.jsonl')}")


DAY_LANDS_S = 3.0
"""``continuous.every_s`` of the demo's pipeline."""
DECISION_TIMEOUT_S = 1800.0


class Pipeline:
    """The demo's consumer and continuous-loop threads, watched while the demo waits on them."""

    def __init__(self, *threads: threading.Thread):
        self.threads = threads

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while not condition():
            if not all(thread.is_alive() for thread in self.threads):
                raise RuntimeError(f"the pipeline stopped before {what} (see this step's log)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} within {DECISION_TIMEOUT_S:.0f} s (see this step's log)")
            time.sleep(0.5)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=300)


def landed_messages(raw: Path) -> int:
    """Messages the consumer has landed in ``raw``: valid events plus dead letters (Parquet footers)."""
    files = visible_files(raw) + visible_files(raw / DEAD_LETTER_DIR)
    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def journal_of(root: Path, record: dict[str, Any]) -> dict[str, Any]:
    return json.loads((root / "cycles" / record["cycle"] / "state.json").read_text())


def cycle_summary(record: dict[str, Any], produced_at: float, journal: dict[str, Any] | None = None) -> str:
    """The gate's verdict per task, the decision and the freshness of one cycle, from its publish
    log record (and where its time went, from its ``journal``)."""
    tasks = record.get("tasks") or {}
    if tasks:
        evidence = next(iter(tasks.values()))
        width = max(len(task) for task in tasks)
        lines = [f"gate on {evidence['events']:,} held-out events of {evidence['users']:,} users: "
                 "the candidate's log-loss change vs the served model"]
        for task, verdict in tasks.items():
            numbers = (f"{verdict['change']:+.2%} [{verdict['low']:+.2%}, {verdict['high']:+.2%}], "
                       f"tolerance {verdict['tolerance']:.2%}" if "change" in verdict else verdict["shortfall"])
            lines.append(f"  {task:<{width}}  {numbers}: {verdict['verdict']}")
    else:  # decided without a comparison: the candidate's own health, or a broken candidate
        lines = [f"gate: {record['reason']}"]
    decision = ("PUBLISHED" if record["published"]
                else f"{record['outcome'].replace('_', ' ')}, kept the served model")
    lines += [f"decision: {decision}",
              f"candidate trained through batch {record['trained']['batch']}, "
              f"newest event {utc_minutes(record['trained']['max_event_ms'])}"]
    lines.append(f"freshness: produced to Kafka → {'serving' if record['published'] else 'decided'} in "
                 f"{record['decided_at'] - produced_at:.0f} s")
    if journal is not None:
        seconds = journal["seconds"]
        lines.append(f"{journal['cycle']}: features {seconds['features']:.0f} s ({journal['features_worker']}), "
                     f"train {seconds['train']:.0f} s ({journal['trainer_worker']}), gate {seconds['gate']:.0f} s, "
                     f"publish {seconds['publish']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="output directory (config key work)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(DemoConfig, args, work=args.work)
    try:
        return run_demo(config)
    except StepFailed:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
