"""``sirenfeed train --continuous --config conf/retrain.yaml [key=value ...]``: keep training on new
data as it lands (:func:`lifecycle.poller.run_continuous`).
"""

from __future__ import annotations

import argparse

from common.config import add_config_arguments, config_from_args
from lifecycle.config import RetrainConfig
from lifecycle.poller import run_continuous, stop_on_signals


def main(argv: list[str]) -> int:
    """``sirenfeed train --continuous --config conf/retrain.yaml [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="sirenfeed train --continuous",
        description="Keep training on new data as it lands: poll the landing zone, and when new "
                    "events have waited continuous.every_s (or number continuous.every_events) run "
                    "a retraining cycle (features, warm start, gate, publish). Takes the retrain "
                    "config (conf/retrain.yaml); SIGTERM stops it after the cycle in progress.")
    parser.add_argument("--continuous", action="store_true", required=True, help=argparse.SUPPRESS)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    return run_continuous(config_from_args(RetrainConfig, args), stop_on_signals())
