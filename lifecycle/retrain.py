"""``sirenfeed retrain --config conf/retrain.yaml [--every 1h] [key=value ...]``: one incremental
retraining cycle (:mod:`lifecycle.cycle`), or one per period (:mod:`lifecycle.poller`).
"""

from __future__ import annotations

import argparse

from common.config import add_config_arguments, config_from_args
from lifecycle.config import RetrainConfig
from lifecycle.cycle import describe_outcome, run_once
from lifecycle.poller import parse_period, run_periodically, stop_on_signals
from lifecycle.telemetry import CycleTelemetry


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sirenfeed retrain", description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=parse_period, metavar="PERIOD",
                        help="run a cycle every PERIOD (e.g. 1h) instead of once")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(RetrainConfig, args)
    if args.every is not None:
        return run_periodically(config, args.every, stop_on_signals())
    telemetry = CycleTelemetry(config, serve=False)
    code = run_once(config)
    telemetry.on_cycle(code)
    print(f"sirenfeed retrain: {describe_outcome(code)} (exit code {code})")
    return code
