"""Overhead of SIREN-RoPE over ordinal RoPE: train-step and inference time, and parameter share.

    .venv/bin/python bench/overhead.py [--contexts 50,256,1024] [--reps 12] [--tokens 12800]

At each context length C the two rankers (the paper's scale: 2 layers, d = 128, 4 heads, the
default feature spec's buckets) are timed in one process on the same batch (``synthetic_batch``,
``tokens / C`` rows), alternating which goes first each repetition so drift on a shared machine hits
both alike. A train step is forward + masked multi-task loss + backward + AdamW step (the trainer's
parameter groups); inference is a no-grad forward in eval mode. Ratios are medians of per-repetition
ratios (siren / ordinal); the paper reports ≈ 2.4 % train and ≈ 1.8 % inference overhead and 0.3 %
of parameters. On a busy machine the whole-step ratio is noisy, so the extra time of the one part
that differs (the rotary encoding's angles and rotations, forward and backward) is also timed
alone, many times, and reported over the ordinal step (``component_overhead_pct``). With ``--profile`` the top operators of one SIREN-RoPE train step are logged.

Writes ``bench/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from common.config import load_config
from common.files import write_json
from common.logs import configure_logging
from features.spec import FeatureSpec
from trainer.model import (
    GenerativeRanker, ModelConfig, masked_multitask_loss, parameter_groups, synthetic_batch,
)
from trainer.rotary import unit_rotations
from trainer.variants import VARIANTS

log = logging.getLogger("bench.overhead")

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.json"
T_REF_SECONDS = 1_700_000_000
PAPER = {"train_overhead_pct": 2.4, "inference_overhead_pct": 1.8, "parameter_share_pct": 0.3}


def build(variant: str, context_len: int, seed: int = 0) -> tuple[GenerativeRanker, torch.optim.Optimizer]:
    config = load_config(ModelConfig, overrides=[f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                                                 for key, value in VARIANTS[variant].items()])
    torch.manual_seed(seed)
    model = GenerativeRanker(config, FeatureSpec(context_len=context_len, stride=context_len), T_REF_SECONDS)
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.01), lr=1e-3)
    return model, optimizer


def train_step(model: GenerativeRanker, optimizer: torch.optim.Optimizer, batch: dict) -> None:
    model.train()
    loss, _ = masked_multitask_loss(model(batch), batch, model.task_weights)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


@torch.no_grad()
def inference(model: GenerativeRanker, batch: dict) -> None:
    model.eval()
    model(batch)


def rotary_pass(model: GenerativeRanker, batch: dict, backward: bool) -> None:
    """Only what differs between the variants: the angles and their rotations (and their backward)."""
    with torch.set_grad_enabled(backward):
        rotations = unit_rotations(model.rotation_angles(batch))
        if backward:
            # Every parameter of f gets a gradient (an ordinal encoding has none: nothing to do).
            total = rotations.real.sum() + rotations.imag.sum()
            if total.requires_grad:
                total.backward()


def timed(function, *args) -> float:
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def measure(context_len: int, rows: int, reps: int, warmup: int) -> dict:
    spec = FeatureSpec(context_len=context_len, stride=context_len)
    batch = synthetic_batch(spec, rows, seed=1, start_seconds=T_REF_SECONDS - 30 * 86_400)
    models = {name: build(name, context_len) for name in ("ordinal", "siren")}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "inference": []} for name in models}
    for rep in range(warmup + reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for kind in ("train", "inference"):
            for name in order:
                model, optimizer = models[name]
                seconds = (timed(train_step, model, optimizer, batch) if kind == "train"
                           else timed(inference, model, batch))
                if rep >= warmup:
                    times[name][kind].append(seconds)
    result = {"context_len": context_len, "rows": rows, "reps": reps}
    for kind in ("train", "inference"):
        ratios = [s / o for s, o in zip(times["siren"][kind], times["ordinal"][kind])]
        result[kind] = {
            "ordinal_median_s": statistics.median(times["ordinal"][kind]),
            "siren_median_s": statistics.median(times["siren"][kind]),
            "ratio_median": statistics.median(ratios),
            "overhead_pct": 100.0 * (statistics.median(ratios) - 1.0),
            "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else ratios,
        }
    rotary: dict[str, dict[str, list[float]]] = {name: {"train": [], "inference": []} for name in models}
    for rep in range(warmup + 3 * reps):
        for name in (list(models) if rep % 2 == 0 else list(reversed(models))):
            for kind in ("train", "inference"):
                seconds = timed(rotary_pass, models[name][0], batch, kind == "train")
                if rep >= warmup:
                    rotary[name][kind].append(seconds)
    for kind in ("train", "inference"):
        extra = statistics.median(rotary["siren"][kind]) - statistics.median(rotary["ordinal"][kind])
        result[kind]["rotary_extra_s"] = extra
        # The variants differ only in the rotary encoding: its extra time over the whole ordinal
        # step is the overhead, measured on a part small enough to repeat many times.
        result[kind]["component_overhead_pct"] = 100.0 * extra / result[kind]["ordinal_median_s"]
    siren, _ = models["siren"]
    rotary, total = siren.parameter_counts()
    result["parameters"] = {"siren_total": total, "siren_rotary": rotary,
                            "ordinal_total": models["ordinal"][0].parameter_counts()[1],
                            "share_pct": 100.0 * rotary / total}
    log.info("C=%d rows=%d: train %+.2f%% (component %+.2f%%; %.3f vs %.3f s), inference %+.2f%% "
             "(component %+.2f%%; %.4f vs %.4f s), params %.4f%%", context_len, rows,
             result["train"]["overhead_pct"], result["train"]["component_overhead_pct"],
             result["train"]["siren_median_s"], result["train"]["ordinal_median_s"],
             result["inference"]["overhead_pct"], result["inference"]["component_overhead_pct"],
             result["inference"]["siren_median_s"], result["inference"]["ordinal_median_s"],
             result["parameters"]["share_pct"])
    return result


def profile(context_len: int, rows: int) -> str:
    spec = FeatureSpec(context_len=context_len, stride=context_len)
    batch = synthetic_batch(spec, rows, seed=1, start_seconds=T_REF_SECONDS - 30 * 86_400)
    model, optimizer = build("siren", context_len)
    train_step(model, optimizer, batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        train_step(model, optimizer, batch)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench/overhead.py", description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="50,256,1024")
    parser.add_argument("--tokens", type=int, default=12_800, help="tokens per batch (rows = tokens / C)")
    parser.add_argument("--reps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (a trainer rank uses 1)")
    parser.add_argument("--profile", action="store_true", help="log the top operators of a SIREN-RoPE step")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    configure_logging()
    logging.getLogger("trainer.model").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    contexts = [int(value) for value in args.contexts.split(",")]
    load_before = os.getloadavg()[0]
    results = [measure(c, max(1, args.tokens // c), args.reps, args.warmup) for c in contexts]
    record = {"benchmark": "overhead", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
              "machine": platform.machine(), "cpus": os.cpu_count(),
              # Other processes on the machine make whole-step ratios noisy; the load says how busy it was.
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
              "paper": PAPER, "contexts": results}
    write_json(args.out, record)
    print(f"{'C':>5} {'rows':>5} {'train %':>8} {'(comp.)':>8} {'infer %':>8} {'(comp.)':>8} {'params %':>9}")
    for result in results:
        train, infer = result["train"], result["inference"]
        print(f"{result['context_len']:>5} {result['rows']:>5} {train['overhead_pct']:>+8.2f} "
              f"{train['component_overhead_pct']:>+8.2f} {infer['overhead_pct']:>+8.2f} "
              f"{infer['component_overhead_pct']:>+8.2f} {result['parameters']['share_pct']:>9.4f}")
    if args.profile:
        log.info("SIREN-RoPE train step at C=%d:\n%s", contexts[0], profile(contexts[0], max(1, args.tokens // contexts[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
