"""``sirenfeed report``: the HTML page and its figures render from a tiny real run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from trainer.evaluate import METRICS_FILE
from trainer.model import GenerativeRanker, ModelConfig, synthetic_batch
from trainer.report import GAP_LABELS, gap_bucket, main, ne_by_bucket, read_history, temporal_angles
from trainer.rotary import YEAR_SECONDS
from trainer.train import HISTORY_FILE
from trainer.variants import VARIANTS

# pyparsing 3.3 deprecates names matplotlib's font and mathtext parsers still use.

FIGURES = ("learning_curves.png", "reliability.png", "ne_by_hour.png", "ne_by_gap.png", "angles.png",
           "lambda.png")


@pytest.fixture(scope="module")
def report(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["--run", str(trained_run.run), "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_every_figure_is_a_real_image_on_the_page(report):
    from matplotlib.image import imread

    page = (report / "index.html").read_text()
    for name in FIGURES:
        image = imread(report / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"
        assert f"src='{name}'" in page
    assert sorted(path.name for path in report.iterdir()) == sorted(FIGURES + ("index.html",))


@pytest.mark.slow
def test_page_metrics_match_the_trainers_evaluation(report, trained_run):
    page = (report / "index.html").read_text()
    saved = json.loads((trained_run.run / METRICS_FILE).read_text())["metrics"]
    for task, values in saved.items():
        assert f"{values['ne']:.4f}" in page, task
    assert "differs from metrics.json" not in page


@pytest.mark.slow
def test_history_has_every_log_window_with_task_losses_and_lambda(trained_run):
    history = read_history(trained_run.run)
    assert [record["step"] for record in history] == list(range(4, 33, 4))
    for record in history:
        assert set(record["task_loss"]) == {"contribution", "like", "long_dwell"}
        assert record["loss"] == pytest.approx(sum(record["task_loss"].values()), rel=1e-6)
        assert record["lambda"] is not None and record["lr"] > 0 and record["samples_per_s"] > 0


@pytest.mark.slow
def test_torn_history_line_and_resumed_steps_are_tolerated(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.run, run, symlinks=True)
    lines = (run / HISTORY_FILE).read_text().splitlines()
    again = json.loads(lines[-1]) | {"loss": 123.0}
    (run / HISTORY_FILE).write_text("\n".join(lines + [json.dumps(again), '{"step": 40, "lo']))
    history = read_history(run)
    assert history[-1]["step"] == 32 and history[-1]["loss"] == 123.0 and len(history) == len(lines)


def test_gap_buckets_and_bucket_ne():
    gaps = np.array([0.0, 30.0, 61.0, 3599.0, 7200.0, 86_401.0, 10 * 86_400.0])
    assert [GAP_LABELS[i] for i in gap_bucket(gaps)] == [
        "first", "<1 min", "1–10 min", "10 min–1 h", "1–6 h", "1–7 d", ">7 d"]
    rng = np.random.default_rng(0)
    label = (rng.random(400) < 0.3).astype(float)
    tokens = {f"pred_{task}": np.where(label > 0, 0.6, 0.2) for task in ("contribution", "like", "long_dwell")}
    tokens.update({task: label for task in ("contribution", "like", "long_dwell")})
    bucket = np.repeat([0, 1], 200)
    bucket[:5] = 2
    values = ne_by_bucket(tokens, ("contribution", "like", "long_dwell"), bucket, 3, min_tokens=50)
    assert values["count"].tolist() == [195, 200, 5]
    assert values["like"][0] < 1.0 and values["like"][1] < 1.0 and np.isnan(values["like"][2])


@pytest.mark.parametrize("name", ["siren", "siren_categorical", "siren_no_ordinal"])
def test_temporal_angles_are_the_models_own(tiny_spec, name):
    """The figure's f(x)·ω is the temporal part of the angles the model attends with, computed by
    the model's TimeFeatures (anchor and clamp included), with categorical inputs at padding."""
    t_ref = 1_714_800_000
    torch.manual_seed(0)
    config = ModelConfig(**VARIANTS[name], d_model=32, n_heads=2, time_horizon_years=0.5)
    model = GenerativeRanker(config, tiny_spec, t_ref)
    batch = synthetic_batch(tiny_spec, 6, seed=1, start_seconds=t_ref + int(0.4 * YEAR_SECONDS))
    schema = tiny_spec.event_schema
    batch.update({column: torch.zeros_like(batch[column]) for column in schema.rotary_categoricals})
    rotary, periods = model.rotary, schema.periods
    with torch.no_grad():
        angles = rotary(batch)
        if rotary.ordinal_gate is not None:
            angles = angles - rotary.ordinal_gate * rotary.ordinal_angles(batch)
    real = batch["ts"] > 0
    expected = angles[real].numpy()
    assert np.allclose(temporal_angles(rotary, periods, batch["ts"][real].numpy()), expected, atol=1e-5)
    beyond = temporal_angles(rotary, periods, batch["ts"][real].numpy() + int(YEAR_SECONDS))
    # A year later everything lies past the horizon: only the cyclical inputs still move f.
    assert not np.allclose(beyond, expected, atol=1e-3)
    at_horizon = t_ref + int(0.5 * YEAR_SECONDS) + np.arange(0, 7 * 86_400 * 52, 7 * 86_400)
    same_phase = temporal_angles(rotary, periods, at_horizon + 7 * 86_400 * 3)
    assert np.allclose(same_phase, temporal_angles(rotary, periods, at_horizon), atol=1e-4)
