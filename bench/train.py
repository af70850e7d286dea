"""Benchmark: training step time of SIREN-RoPE against ordinal RoPE, and the input pipeline's wait.

    .venv/bin/python bench/train.py [--config FILE] [key=value ...]   →  bench/results/train.json

1. Step time (forward + backward + AdamW step) of the default ranker with ``model.rotary=siren``
   and ``ordinal``, at each context length in ``contexts``: both models live in one process, train
   on the same batch, and are timed alternately (siren, ordinal, then ordinal, siren, …) for
   ``rounds`` rounds, so machine noise hits both alike. Reported: medians and siren / ordinal.
2. Data wait: a short real training read — the Petastorm stream (``trainer.data.TrainStream``)
   over a Parquet dataset in the feature job's layout feeding the default model — and the share of
   step time spent waiting for the next batch, plus the reader's rows/s on its own.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import add_config_arguments, config_from_args, require, to_dict
from common.files import write_json
from features.spec import FeatureSpec
from trainer.data import TrainStream, write_training_rows
from trainer.model import (
    GenerativeRanker, ModelConfig, masked_multitask_loss, parameter_groups, synthetic_batch,
)

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"
VARIANTS = ("siren", "ordinal")
T_REF_SECONDS = 1_700_000_000


@dataclass
class TrainBenchConfig:
    contexts: list[int] = field(default_factory=lambda: [50, 512])
    batch_sizes: list[int] = field(default_factory=lambda: [64, 8])
    """Rows per step at each context length (about the same tokens per step)."""
    rounds: int = 12
    steps_per_round: int = 2
    """Steps timed per model per round; short rounds let both models see the same machine load."""
    warmup_steps: int = 2
    data_rows: int = 8192
    data_row_group: int = 256
    data_batch_size: int = 256
    data_steps: int = 16
    out: str = ""
    """Result file (default bench/results/train.json)."""

    def __post_init__(self) -> None:
        require(len(self.contexts) == len(self.batch_sizes) > 0, "batch_sizes",
                "needs one batch size per entry of contexts")
        require(self.rounds >= 1 and self.steps_per_round >= 1, "rounds", "rounds and steps must be >= 1")
        require(self.data_rows >= self.data_batch_size, "data_rows", "must be >= data_batch_size")


class StepTimer:
    """One model with its optimizer; :meth:`step` runs one training step and times its parts."""

    def __init__(self, rotary: str, spec: FeatureSpec):
        torch.manual_seed(0)
        self.config = ModelConfig(rotary=rotary)
        self.model = GenerativeRanker(self.config, spec, T_REF_SECONDS)
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, 0.01), lr=1e-3)

    def step(self, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
        """(forward + backward seconds, whole step seconds)."""
        started = time.perf_counter()
        loss, _ = masked_multitask_loss(self.model(batch), batch, self.model.task_weights)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        self.optimizer.step()
        return backward_done - started, time.perf_counter() - started


def compare_rotaries(config: TrainBenchConfig, context_len: int, batch_size: int) -> dict:
    spec = FeatureSpec(context_len=context_len, stride=context_len)
    batch = synthetic_batch(spec, batch_size, seed=0, start_seconds=T_REF_SECONDS - 30 * 86_400)
    timers = {variant: StepTimer(variant, spec) for variant in VARIANTS}
    for timer in timers.values():
        for _ in range(config.warmup_steps):
            timer.step(batch)
    times: dict[str, dict[str, list[float]]] = {v: {"forward_backward": [], "step": []} for v in VARIANTS}
    for round_index in range(config.rounds):
        order = VARIANTS if round_index % 2 == 0 else VARIANTS[::-1]
        for variant in order:
            for _ in range(config.steps_per_round):
                forward_backward, step = timers[variant].step(batch)
                times[variant]["forward_backward"].append(forward_backward)
                times[variant]["step"].append(step)
    medians = {variant: {part: statistics.median(values) for part, values in parts.items()}
               for variant, parts in times.items()}
    return {
        "context_len": context_len, "batch_size": batch_size,
        "median_step_s": {variant: medians[variant]["step"] for variant in VARIANTS},
        "median_forward_backward_s": {variant: medians[variant]["forward_backward"] for variant in VARIANTS},
        "siren_over_ordinal_step": medians["siren"]["step"] / medians["ordinal"]["step"],
        "siren_over_ordinal_forward_backward": (medians["siren"]["forward_backward"]
                                                / medians["ordinal"]["forward_backward"]),
        "samples_per_variant": len(times["siren"]["step"]),
    }


def measure_data_wait(config: TrainBenchConfig) -> dict:
    spec = FeatureSpec()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        files = max(1, config.data_rows // (4 * config.data_row_group))
        rows_per_file = config.data_rows // files
        for index in range(files):
            rows = synthetic_batch(spec, rows_per_file, seed=index, start_seconds=T_REF_SECONDS - 86_400)
            write_training_rows(Path(root) / "train" / "date=2023-11-13" / f"part-{index:05d}.parquet",
                                rows, spec, config.data_row_group)

        with TrainStream(root, spec, config.data_batch_size, 4096, 0, 0, 1) as stream:
            started = time.perf_counter()
            for _ in range(config.data_steps):
                next(stream)
            reader_rows_per_s = config.data_steps * config.data_batch_size / (time.perf_counter() - started)

        timer = StepTimer("siren", spec)
        waited = total = 0.0
        with TrainStream(root, spec, config.data_batch_size, 4096, 0, 0, 1) as stream:
            timer.step(next(stream))  # first step pays one-off costs; not part of the steady state
            for _ in range(config.data_steps):
                started = time.perf_counter()
                batch = next(stream)
                got_batch = time.perf_counter()
                timer.step(batch)
                waited += got_batch - started
                total += time.perf_counter() - started
    return {"rows": files * rows_per_file, "files": files, "row_group_rows": config.data_row_group,
            "batch_size": config.data_batch_size, "steps": config.data_steps,
            "data_wait_fraction": waited / total, "step_s": total / config.data_steps,
            "reader_only_rows_per_s": reader_rows_per_s,
            "training_rows_per_s": config.data_steps * config.data_batch_size / total}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/train.py", description=__doc__.splitlines()[0])
    add_config_arguments(parser)
    config = config_from_args(TrainBenchConfig, parser.parse_args(argv))
    results = {
        "benchmark": "train", "config": to_dict(config), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "processor": platform.processor(),
        "rotary_step_time": [compare_rotaries(config, context, batch)
                             for context, batch in zip(config.contexts, config.batch_sizes)],
        "data_wait": measure_data_wait(config),
    }
    target = Path(config.out) if config.out else RESULTS
    write_json(target, results)
    for row in results["rotary_step_time"]:
        step = row["median_step_s"]
        print(f"C={row['context_len']:<4} B={row['batch_size']:<3} step siren {step['siren']:.3f} s"
              f"  ordinal {step['ordinal']:.3f} s  ratio {row['siren_over_ordinal_step']:.3f}"
              f"  (forward+backward ratio {row['siren_over_ordinal_forward_backward']:.3f})")
    wait = results["data_wait"]
    print(f"data wait {100 * wait['data_wait_fraction']:.1f}% of step time "
          f"(B={wait['batch_size']}, {wait['step_s']:.3f} s/step; reader alone "
          f"{wait['reader_only_rows_per_s']:.0f} rows/s)  ->  {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
