"""``sirenfeed demo`` (what ``make demo`` runs): the whole pipeline end to end on this machine.

1. synthetic feed logs (``features.synth``): ``days`` of history plus ``retrain_cycles`` fresh days
   kept aside for the retraining leg,
2. the Spark feature job through ``spark-submit`` on a local master, and its summary,
3. 2-rank DeepSpeed training of SIREN-RoPE and of the ordinal-RoPE baseline on the same data,
   each evaluated exactly on the held-out last day, and a side-by-side table,
4. the exported model, loaded back with ``weights_only=True``,
5. the streaming leg: the last day of events replayed through the embedded Kafka-protocol broker
   into the raw landing zone, checked to hold exactly the replayed valid events,
6. incremental retraining: the batch model is served; then each fresh day is produced to Kafka and
   one ``sirenfeed retrain`` cycle drains it into the landing zone, appends it to the features,
   warm-starts the first variant on it, gates the candidate against the served model on the freshest
   held-out slice and publishes it or not; the decision and the freshness are printed.

Everything lands under ``work`` (default ``demo-out/``), which each run replaces step by step.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.config import add_config_arguments, config_from_args, load_config, require
from common.repo import REPO_ROOT
from features.batches import batch_name
from features.dataset import read_manifest
from features.settings import FeaturesConfig
from features.submit import run_job
from features.summary import describe
from features.synth import SynthConfig, write_synthetic_logs
from ingest.broker import embedded_broker
from ingest.clients import make_producer
from ingest.config import IngestConfig
from ingest.demo import streaming_leg
from ingest.producer import event_messages, raw_dates, read_day, send_messages
from lifecycle.config import CONTINUAL_TRAIN_OVERRIDES, DrainConfig, RetrainConfig
from lifecycle.cycle import INSUFFICIENT_EVIDENCE, NOT_PUBLISHED, PUBLISHED, describe_outcome, run_once
from lifecycle.registry import publish, read_log
from lifecycle.telemetry import CycleTelemetry
from trainer.config import TrainConfig
from trainer.export import load_exported
from trainer.launcher import TRAIN_SCRIPT, run_with_config
from trainer.metrics import format_table
from trainer.variants import variant_overrides

log = logging.getLogger(__name__)


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
    retrain_cycles: int = 2
    """Fresh days streamed through Kafka after the batch run, one retraining cycle each (0 = none)."""

    def __post_init__(self) -> None:
        require(self.users >= 1, "users", "must be >= 1")
        require(self.days >= 2, "days", "must be >= 2 (the last day is held out)")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(bool(self.variants), "variants", "must name at least one model preset")
        require(self.retrain_cycles >= 0, "retrain_cycles", "must be >= 0")


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(config: DemoConfig) -> int:
    started = time.monotonic()
    work = Path(config.work).resolve()
    synth_dir, raw, features = work / "synth", work / "raw", work / "features"
    train_conf = REPO_ROOT / "conf" / "train.yaml"
    steps = 6 if config.retrain_cycles else 5

    _banner(f"1/{steps} synthetic feed logs: {config.users} users x {config.days} days "
            f"(+{config.retrain_cycles} fresh) -> {raw}")
    synth = load_config(SynthConfig, None, [f"users={config.users}",
                                            f"days={config.days + config.retrain_cycles}",
                                            f"seed={config.seed}"])
    manifest = write_synthetic_logs(synth, synth_dir)
    fresh_dates = split_history(synth_dir, raw, config.retrain_cycles)
    print(f"{manifest['events']:,} events ({manifest['bad_events_total']} malformed and "
          f"{manifest['duplicates']} duplicates planted for the feature job to catch); "
          f"{len(fresh_dates)} fresh day(s) kept aside: {', '.join(fresh_dates) or 'none'}")

    _banner(f"2/{steps} Spark feature job -> {features}")
    job = load_config(FeaturesConfig, None, config.feature_overrides, {"raw": raw, "out": features})
    if run_job(job) != 0:
        log.error("the feature job failed")
        return 1
    print(describe(features))

    results = {}
    for name in config.variants:
        run_dir = work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a previous demo's checkpoints are not this one's
        _banner(f"3/{steps} training '{name}' on {config.nproc} ranks -> {run_dir}")
        train = load_config(TrainConfig, train_conf, [*variant_overrides(name), *config.train_overrides],
                            {"features": features, "run": run_dir})
        code = run_with_config(TRAIN_SCRIPT, config.nproc, train)
        if code != 0:
            log.error("training '%s' failed (exit code %d)", name, code)
            return 1
        results[name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]

    _banner("held-out last day, per task (lower NE/ECE is better, higher AUC/GAUC is better)")
    print(format_table(results))

    _banner(f"4/{steps} the exported model")
    export = work / "runs" / config.variants[0] / "export" / "latest"
    model, _, spec = load_exported(export)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"{export} -> {export.resolve().name}: {parameters:,} parameters, C = {spec.context_len}, "
          "loaded with torch.load(weights_only=True) and checksums verified")

    if config.streaming:
        _banner(f"5/{steps} streaming leg: last day through Kafka into the landing zone")
        result = streaming_leg(raw, work / "stream")
        print(result["summary"])

    if fresh_dates:
        _banner(f"6/{steps} incremental retraining: {len(fresh_dates)} cycle(s) on fresh days from Kafka")
        retraining_leg(config, work, synth_dir, fresh_dates, work / "runs" / config.variants[0])

    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; outputs under {work}")
    return 0


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
                   initial_run: Path) -> None:
    """Serve the batch model, then one retraining cycle per fresh day produced to Kafka."""
    root = work / "retrain"
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(work / "broker", ignore_errors=True)
    ingest_overrides = [f"landing.dir={work / 'raw'}", f"broker.run_dir={work / 'broker'}", "broker.port=0",
                        "metrics.report_lag=false"]
    ingest = load_config(IngestConfig, None, ingest_overrides)
    features = work / "features"
    manifest = read_manifest(features)
    served = publish(initial_run / "export" / "latest", root / "registry", f"{batch_name(0)}-batch",
                     {"batch": 0, "watermark_ms": manifest["watermark_ms"], "cycle": None,
                      "max_event_ms": min(manifest["watermark_ms"], manifest["split_ts_ms"] - 1)}, keep=3)
    print(f"serving the batch model {served.name}; fresh days will come through Kafka")
    fresh = raw_dates(synth_dir)
    with embedded_broker(ingest) as address:
        retrain = RetrainConfig(
            dir=str(root), initial_run=str(initial_run), nproc=config.nproc,
            features=load_config(FeaturesConfig, None, config.feature_overrides,
                                 {"raw": work / "raw", "out": features}),
            train_overrides=[*CONTINUAL_TRAIN_OVERRIDES, *variant_overrides(config.variants[0]),
                             *config.train_overrides, "train.epochs=1"],
            drain=DrainConfig(enabled=True, idle_s=3,
                              overrides=[*ingest_overrides, f"kafka.bootstrap_servers={address}"]))
        telemetry = CycleTelemetry(retrain, serve=False)
        producer = make_producer(load_config(IngestConfig, None, [*ingest_overrides,
                                                                   f"kafka.bootstrap_servers={address}"]))
        try:
            for number, date in enumerate(fresh_dates, 1):
                day = read_day(fresh[date])
                produced_at = time.time()
                send_messages(producer, ingest.kafka.topic, event_messages(day), total=day.num_rows,
                              description=f"produce {date}")
                print(f"\n--- cycle {number}: {day.num_rows:,} events of {date} produced to Kafka", flush=True)
                code = run_once(retrain)
                telemetry.on_cycle(code)
                if code not in (PUBLISHED, NOT_PUBLISHED, INSUFFICIENT_EVIDENCE):
                    raise RuntimeError(f"retraining cycle {number} ended: {describe_outcome(code)} (exit code {code})")
                print(_cycle_summary(read_log(root / "registry")[-1], produced_at))
        finally:
            producer.close()
    print(f"\npublish log: {root / 'registry' / 'publish.jsonl'}; "
          f"gauges: {telemetry.textfile}")


def _cycle_summary(record: dict, produced_at: float) -> str:
    """The gate decision and the freshness of one cycle, from its publish log record."""
    newest = dt.datetime.fromtimestamp(record["trained"]["max_event_ms"] / 1000, dt.timezone.utc)
    lines = [f"gate: {record['reason']} -> " + ("PUBLISHED" if record["published"] else "kept the served model"),
             f"candidate trained through batch {record['trained']['batch']}, "
             f"newest event {newest:%Y-%m-%d %H:%M} UTC"]
    if record["published"]:
        lines.append(f"freshness: produced to Kafka -> serving in {record['decided_at'] - produced_at:.0f} s")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="output directory (config key work)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return run_demo(config_from_args(DemoConfig, args, work=args.work))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
