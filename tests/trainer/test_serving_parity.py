"""Serving parity: the exported model, loaded in a fresh process, scores the eval split exactly as
the trainer's own evaluation forward did."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from trainer.evaluate import METRICS_FILE
from trainer.export import load_exported
from trainer.metrics import binary_metrics
from trainer.report import score_eval_tokens

FRESH_PROCESS = """
import sys
import numpy as np
from trainer.export import load_exported
from trainer.report import score_eval_tokens
model, config, spec = load_exported(sys.argv[1] + "/export/latest")
tokens = score_eval_tokens(model, config.features, spec, config.data.eval_batch_size)
np.savez(sys.argv[2], **tokens)
"""


@pytest.mark.slow
def test_fresh_process_scores_equal_the_trainers_evaluation(trained_run, tmp_path):
    scored = tmp_path / "scored.npz"
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(trained_run.run), str(scored)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = dict(np.load(scored))

    # Bit for bit what this process computes with the same export and the trainer's eval batches;
    # another batch size only reorders float sums inside the kernels.
    model, config, spec = load_exported(trained_run.run / "export" / "latest")
    with torch.no_grad():
        here = score_eval_tokens(model, config.features, spec, config.data.eval_batch_size)
        regrouped = score_eval_tokens(model, config.features, spec, batch_size=7)
    for name, values in here.items():
        assert np.array_equal(values, fresh[name]), name
        assert np.allclose(regrouped[name], fresh[name], rtol=1e-5, atol=1e-7), name

    # And the metrics the trainer computed on 2 ranks with its DeepSpeed engine at the end of training
    # (each rank batches its own shard, so predictions agree to float32 rounding, not bit for bit).
    trainer_metrics = json.loads((trained_run.run / METRICS_FILE).read_text())["metrics"]
    for task in spec.event_schema.label_columns:
        mine = binary_metrics(fresh[f"pred_{task}"], fresh[task], fresh["user_key"])
        for metric in ("ne", "auc", "gauc", "ece", "count"):
            assert mine[metric] == pytest.approx(trainer_metrics[task][metric], rel=1e-6, abs=1e-9), (task, metric)
