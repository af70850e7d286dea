"""``sirenfeed demo`` (what ``make demo`` runs): the whole pipeline end to end on this machine.

1. synthetic feed logs (``features.synth``),
2. the Spark feature job through ``spark-submit`` on a local master, and its summary,
3. 2-rank DeepSpeed training of SIREN-RoPE and of the ordinal-RoPE baseline on the same data,
   each evaluated exactly on the held-out last day, and a side-by-side table,
4. the exported model, loaded back with ``weights_only=True``,
5. the streaming leg: the last day of events replayed through the embedded Kafka-protocol broker
   into the raw landing zone, checked to hold exactly the replayed valid events.

Everything lands under ``work`` (default ``demo-out/``), which each run replaces step by step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from features.config import add_config_arguments, config_from_args, load_config, require

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    work: str = "demo-out"
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
    """``key=value`` overrides of ``conf/train.yaml`` for every demo run (kept small for a laptop)."""
    streaming: bool = True

    def __post_init__(self) -> None:
        require(self.users >= 1, "users", "must be >= 1")
        require(self.days >= 2, "days", "must be >= 2 (the last day is held out)")
        require(self.nproc >= 1, "nproc", "must be >= 1")
        require(bool(self.variants), "variants", "must name at least one model preset")


def _banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(config: DemoConfig) -> int:
    from features.settings import FeaturesConfig
    from features.submit import run_job
    from features.summary import describe
    from features.synth import SynthConfig, write_synthetic_logs
    from trainer.export import load_exported
    from trainer.launch import TRAIN_SCRIPT, run_deepspeed
    from trainer.metrics import format_table
    from trainer.variants import variant_overrides

    started = time.monotonic()
    work = Path(config.work).resolve()
    raw, features = work / "raw", work / "features"
    train_conf = Path(__file__).resolve().parent.parent / "conf" / "train.yaml"

    _banner(f"1/5 synthetic feed logs: {config.users} users x {config.days} days -> {raw}")
    synth = load_config(SynthConfig, None, [f"users={config.users}", f"days={config.days}",
                                            f"seed={config.seed}"])
    manifest = write_synthetic_logs(synth, raw)
    print(f"{manifest['events']:,} events ({manifest['bad_events_total']} malformed and "
          f"{manifest['duplicates']} duplicates planted for the feature job to catch)")

    _banner(f"2/5 Spark feature job -> {features}")
    job = load_config(FeaturesConfig, None, [f"raw={raw}", f"out={features}", *config.feature_overrides])
    if run_job(job) != 0:
        log.error("the feature job failed")
        return 1
    print(describe(features))

    results = {}
    for name in config.variants:
        run_dir = work / "runs" / name
        _banner(f"3/5 training '{name}' on {config.nproc} ranks -> {run_dir}")
        code = run_deepspeed(TRAIN_SCRIPT, config.nproc, str(train_conf), [
            f"features={features}", f"run={run_dir}", *variant_overrides(name),
            *config.train_overrides])
        if code != 0:
            log.error("training '%s' failed (exit code %d)", name, code)
            return 1
        results[name] = json.loads((run_dir / "metrics.json").read_text())["metrics"]

    _banner("held-out last day, per task (lower NE/ECE is better, higher AUC/GAUC is better)")
    print(format_table(results))

    _banner("4/5 the exported model")
    export = work / "runs" / config.variants[0] / "export" / "latest"
    model, _, spec = load_exported(export)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    print(f"{export} -> {export.resolve().name}: {parameters:,} parameters, C = {spec.context_len}, "
          "loaded with torch.load(weights_only=True) and checksums verified")

    if config.streaming:
        from ingest.demo import streaming_leg

        _banner("5/5 streaming leg: last day through Kafka into the landing zone")
        result = streaming_leg(raw, work / "stream")
        print(result["summary"])

    print(f"\ndemo finished in {time.monotonic() - started:.0f} s; outputs under {work}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed demo", description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="output directory (config key work)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return run_demo(config_from_args(DemoConfig, args, work=args.work))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
