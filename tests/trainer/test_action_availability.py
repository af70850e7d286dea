"""Actions count only once they were known: raw events of one user → the serving row → the ranker.

An event's actions (click, like, comment, share, dwell) become available at event time + dwell +
``spec.action_log_delay_ms``. A token's prediction may depend on an earlier event's actions only if
they were available at the token's own event time; with large random weights any path that breaks
this shows in the logits.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from model_support import randomised

from features.serving import latest_row, stack_rows
from features.spec import LABEL_COLUMNS, PREV_ACTIONS_KNOWN_COLUMN, FeatureSpec
from trainer.data import to_tensors
from trainer.model import GenerativeRanker, ModelConfig

BASE_MS = 1_780_272_000_000  # 2026-06-01T00:00:00Z
T_REF = BASE_MS // 1000
SPEC = FeatureSpec(context_len=6, stride=6, action_log_delay_ms=30_000,
                   buckets={"item_id": 101, "author_id": 31, "content_type": 7, "topic": 11, "surface": 5})


def event(index: int, offset_ms: int, dwell_ms: int, **actions: bool) -> dict:
    return {"event_id": f"e{index}", "user_id": "u", "item_id": f"i{index}", "author_id": f"a{index % 2}",
            "content_type": "video", "topic": f"t{index}", "surface": "feed", "event_ts": BASE_MS + offset_ms,
            "dwell_ms": dwell_ms, "click": False, "like": False, "comment": False, "share": False, **actions}


# e0's actions are available at 34 s, long before e1. e1's at 600 + 40 + 30 = 670 s: after e2
# (650 s), though its event time plus the delay alone (630 s) is not, so it is the dwell that makes
# them pending at e2. e2's are available at 682 s, before e3 (700 s).
TIMELINE = [event(0, 0, 4_000, click=True), event(1, 600_000, 40_000, like=True),
            event(2, 650_000, 2_000), event(3, 700_000, 1_000, share=True)]
E2, E3 = 4, 5  # columns of e2 and e3 in the left-padded row of C = 6


def logits(model: GenerativeRanker, events: list[dict], spec: FeatureSpec = SPEC) -> torch.Tensor:
    """``[C, tasks]`` logits of the serving row that ends at the newest event."""
    row = latest_row(events, spec, {}, scored=len(events))
    with torch.no_grad():
        scores = model(to_tensors(stack_rows([row]), spec.context_len))
    return torch.stack([scores[task][0] for task in LABEL_COLUMNS], dim=-1)


def changed(index: int, **fields) -> list[dict]:
    return [dict(e, **fields) if position == index else e for position, e in enumerate(TIMELINE)]


PERTURBATIONS = {"actions": dict(click=True, like=False, comment=True, share=True),
                 "dwell": dict(dwell_ms=45_000)}


@pytest.fixture(scope="module", params=["siren", "ordinal", "none"])
def model(request):
    torch.manual_seed(0)
    ranker = GenerativeRanker(ModelConfig(rotary=request.param, d_model=32, n_heads=2), SPEC, T_REF).eval()
    return randomised(ranker, seed=7)


def test_the_row_marks_which_previous_actions_are_known():
    row = latest_row(TIMELINE, SPEC, {}, scored=len(TIMELINE))
    assert row[PREV_ACTIONS_KNOWN_COLUMN].tolist() == [0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_actions_not_yet_available_never_reach_a_prediction(model, perturbation):
    base = logits(model, TIMELINE)
    pending = logits(model, changed(1, **PERTURBATIONS[perturbation]))
    # e1's actions were pending at e2: neither e2 nor anything before it may move.
    assert torch.allclose(pending[:E2 + 1], base[:E2 + 1], atol=1e-6), (pending - base)[:E2 + 1]


@pytest.mark.parametrize("perturbation", sorted(PERTURBATIONS))
def test_available_actions_do_reach_later_predictions(model, perturbation):
    base = logits(model, TIMELINE)
    # e0's actions were known at e1 and flow on to e2 through attention; e2's were known at e3.
    known_at_e1 = logits(model, changed(0, **PERTURBATIONS[perturbation]))
    assert (known_at_e1[E2] - base[E2]).abs().max() > 1e-3
    known_at_e3 = logits(model, changed(2, **PERTURBATIONS[perturbation]))
    assert torch.allclose(known_at_e3[:E2 + 1], base[:E2 + 1], atol=1e-6)
    assert (known_at_e3[E3] - base[E3]).abs().max() > 1e-3


def test_pending_is_an_input_distinct_from_known_and_empty(model):
    """With no action and no dwell, a known outcome and a pending one still differ: the model is
    told that it does not know yet."""
    quiet = [dict(e, dwell_ms=0, click=False, like=False, comment=False, share=False) for e in TIMELINE]
    # e1 (600 s) is known at e2 (650 s) without a delay, pending with one of 60 s.
    instantly, slowly = (dataclasses.replace(SPEC, action_log_delay_ms=ms) for ms in (0, 60_000))
    known, pending = logits(model, quiet, instantly), logits(model, quiet, slowly)
    assert torch.allclose(known[:E2], pending[:E2], atol=1e-6)
    assert (known[E2] - pending[E2]).abs().max() > 1e-3
