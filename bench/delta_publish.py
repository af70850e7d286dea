"""Benchmark: what a delta publish writes, against a full copy, as a share of the table rows changes.

    .venv/bin/python bench/delta_publish.py [--config FILE] [key=value ...]  →  bench/results/delta_publish.json

For each item-table size in ``item_rows`` the default ranker (other tables at their default
buckets) is exported and published whole into a fresh registry; then, for each share in
``changed_shares``, a copy of it with that share of every table's rows changed (a continual cycle
updates only the rows its events look up) and every dense weight changed (a cycle updates them
all) is exported and published with ``publish.full_every`` large enough for a delta. Reported per
case: the bytes of the delta's model file and of the full model file and their ratio, the rows the
delta found changed (must equal the rows changed), the publish and load times, and whether the
registry's model loads bit for bit as the full export of the same weights.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import add_config_arguments, config_from_args, load_config, require, to_dict
from common.files import write_json
from common.logs import configure_logging
from features.spec import FeatureSpec
from lifecycle.registry import publish
from trainer.config import TrainConfig
from trainer.export import DELTA_FILE, MODEL_FILE, export_model, load_state
from trainer.model import GenerativeRanker

log = logging.getLogger("bench.delta_publish")

RESULTS = Path(__file__).resolve().parent / "results" / "delta_publish.json"
T_REF_SECONDS = 1_700_000_000


@dataclass
class DeltaBenchConfig:
    item_rows: list[int] = field(default_factory=lambda: [200_003, 2_000_003])
    changed_shares: list[float] = field(default_factory=lambda: [0.01, 0.02, 0.05, 0.2])
    """Share of every table's rows a cycle changes."""
    out: str = ""
    """Result file (default bench/results/delta_publish.json)."""

    def __post_init__(self) -> None:
        require(bool(self.item_rows) and all(rows >= 2 for rows in self.item_rows), "item_rows",
                "must be table sizes >= 2")
        require(bool(self.changed_shares) and all(0 < share <= 1 for share in self.changed_shares),
                "changed_shares", "must be shares in (0, 1]")


def changed_copy(model: GenerativeRanker, share: float, seed: int) -> tuple[GenerativeRanker, int]:
    """``model`` with ``share`` of every table's rows and every dense weight moved; returns it and the
    number of table rows changed."""
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("id_embeddings."):
                rows = max(1, int(share * parameter.shape[0]))
                ids = torch.randperm(parameter.shape[0], generator=generator)[:rows]
                parameter[ids] += 1e-3 * torch.randn(rows, parameter.shape[1], generator=generator)
                changed += rows
            else:
                parameter += 1e-4 * torch.randn(parameter.shape, generator=generator)
    return model, changed


def measure(rows: int, shares: list[float], root: Path) -> list[dict]:
    spec = FeatureSpec(buckets={**FeatureSpec().buckets, "item_id": rows})
    config = load_config(TrainConfig, overrides=[f"features={root}", f"run={root / 'run'}"])
    torch.manual_seed(0)
    model = GenerativeRanker(config.model, spec, T_REF_SECONDS)
    registry = root / "registry"
    base = export_model(model, config, spec, root / "run", "base", 0)
    publish(base, registry, "c000000", {}, keep=100, full_every=100)
    full_bytes = (registry / "c000000" / MODEL_FILE).stat().st_size
    results = []
    for index, share in enumerate(shares, start=1):
        log.info("item table %d rows: publishing a cycle that changed %.0f%% of the rows", rows, 100 * share)
        candidate, changed = changed_copy(model, share, seed=index)
        export = export_model(candidate, config, spec, root / "run", f"cycle{index}", index)
        started = time.perf_counter()
        target = publish(export, registry, f"c{index:06d}", {}, keep=100, full_every=100)
        published_s = time.perf_counter() - started
        started = time.perf_counter()
        loaded = load_state(target)
        load_s = time.perf_counter() - started
        expected = torch.load(export / MODEL_FILE, weights_only=True)
        identical = loaded.keys() == expected.keys() and all(
            torch.equal(loaded[key], expected[key]) and loaded[key].dtype == expected[key].dtype for key in expected)
        delta_bytes = (target / DELTA_FILE).stat().st_size
        found = sum(torch.load(target / DELTA_FILE, weights_only=True)["tables"][f"id_embeddings.{table}.weight"]
                    ["ids"].numel() for table in spec.buckets)
        results.append({"item_rows": rows, "changed_share": share, "rows_changed": changed, "rows_in_delta": found,
                        "delta_bytes": delta_bytes, "full_bytes": full_bytes,
                        "delta_over_full": delta_bytes / full_bytes, "publish_s": published_s, "load_s": load_s,
                        "loads_bit_identical": identical})
        # Every cycle builds on the served one: the next delta is on this one.
        model = candidate
        shutil.rmtree(export)
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/delta_publish.py", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging()
    config = config_from_args(DeltaBenchConfig, args)
    cases = []
    for rows in config.item_rows:
        with tempfile.TemporaryDirectory(prefix="sirenfeed-delta-") as scratch:
            cases.extend(measure(rows, config.changed_shares, Path(scratch)))
    target = Path(config.out) if config.out else RESULTS
    write_json(target, {"config": to_dict(config), "machine": platform.platform(), "cases": cases,
                        "target_delta_at_most_5_percent_when_5_percent_change": all(
                            case["delta_over_full"] <= 0.05 for case in cases if case["changed_share"] <= 0.05)})
    print(f"{'item rows':>10} {'changed':>8} {'delta MB':>9} {'full MB':>8} {'ratio':>7} {'publish s':>9} "
          f"{'load s':>7} {'identical':>9}")
    for case in cases:
        print(f"{case['item_rows']:>10} {case['changed_share']:>8.0%} {case['delta_bytes'] / 1e6:>9.2f} "
              f"{case['full_bytes'] / 1e6:>8.1f} {case['delta_over_full']:>7.3f} {case['publish_s']:>9.2f} "
              f"{case['load_s']:>7.2f} {str(case['loads_bit_identical']):>9}")
    log.info("wrote %s", target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
