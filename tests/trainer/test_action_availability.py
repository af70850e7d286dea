"""Actions count only once they were known: raw events of one user → the serving row → the ranker.

An event's actions become available at event time + its duration + the schema's
``actions.known_after.delay_ms`` (the feed: the dwell and 30 s; the watch log: the watch time and
10 s). A token's prediction may depend on an earlier event's actions only if they were available at
the token's own event time; with large random weights any path that breaks this shows in the logits.
Both shipped schemas, each with its own field names, time unit and actions.
"""

from __future__ import annotations

import pytest
import torch
from model_support import randomised

from features.schema import PREV_ACTIONS_KNOWN_COLUMN, load_schema
from features.serving import latest_row, stack_rows
from features.spec import FeatureSpec
from trainer.data import to_tensors
from trainer.model import GenerativeRanker, ModelConfig
from training_fixtures import dataset_spec

BASE_MS = 1_780_272_000_000  # 2026-06-01T00:00:00Z
T_REF = BASE_MS // 1000
SPECS = {
    "feed": FeatureSpec(context_len=6, stride=6,
                        buckets={"item_id": 101, "author_id": 31, "content_type": 7, "topic": 11, "surface": 5}),
    # Fitted as its dataset records it: serving standardizes log_video_s with the job's statistics.
    "watch": dataset_spec(FeatureSpec(context_len=6, stride=6, schema="watch",
                                      buckets={"post_id": 101, "creator_id": 31, "format": 8, "country": 11})),
}
QUIET = {"feed": dict(dwell_ms=0, click=False, like=False, comment=False, share=False),
         "watch": dict(watch_ms=0, hide=False, follow=False)}
"""No action and no duration."""
PERTURBATIONS = {
    "feed": {"actions": dict(click=True, like=False, comment=True, share=True), "duration": dict(dwell_ms=45_000)},
    "watch": {"actions": dict(hide=True, follow=True), "duration": dict(watch_ms=45_000)},
}


def event(schema: str, index: int, offset_ms: int, duration_ms: int, **actions: bool) -> dict:
    if schema == "feed":
        return {"event_id": f"e{index}", "user_id": "u", "item_id": f"i{index}", "author_id": f"a{index % 2}",
                "content_type": "video", "topic": f"t{index}", "surface": "feed", "event_ts": BASE_MS + offset_ms,
                **QUIET["feed"], **actions, "dwell_ms": duration_ms}
    return {"impression_id": f"e{index}", "viewer": "u", "ts": (BASE_MS + offset_ms) // 1000, "tz_offset_min": 120,
            "post_id": f"p{index}", "origin_post_id": f"p{index + 7}", "creator_id": f"c{index % 2}",
            "format": "short", "country": "de", "video_s": 30.0 + index, **QUIET["watch"], **actions,
            "watch_ms": duration_ms}


def timeline(schema: str) -> list[dict]:
    """e0's actions are available at 14 s (+ the delay), long before e1. e1's at 600 + 40 + delay s:
    after e2 (650 s for the feed's 30 s delay, 645 s for the watch log's 10 s), though its event time
    plus the delay alone is not, so it is the duration that makes them pending at e2. e2's are
    available before e3 (700 s)."""
    e2_ms = 650_000 if schema == "feed" else 645_000
    first, second = (dict(click=True), dict(like=True)) if schema == "feed" else (dict(hide=True), dict(follow=True))
    last = dict(share=True) if schema == "feed" else dict(follow=True)
    return [event(schema, 0, 0, 4_000, **first), event(schema, 1, 600_000, 40_000, **second),
            event(schema, 2, e2_ms, 2_000), event(schema, 3, 700_000, 1_000, **last)]


E2, E3 = 4, 5  # columns of e2 and e3 in the left-padded row of C = 6


def with_delay(spec: FeatureSpec, delay_ms: int) -> FeatureSpec:
    """``spec`` over its schema with another ``actions.known_after.delay_ms``."""
    values = spec.event_schema.to_dict()
    values["actions"]["known_after"]["delay_ms"] = delay_ms
    return spec.with_schema(load_schema(values))


def logits(model: GenerativeRanker, events: list[dict], spec: FeatureSpec) -> torch.Tensor:
    """``[C, tasks]`` logits of the serving row that ends at the newest event."""
    row = latest_row(events, spec, {}, scored=len(events))
    with torch.no_grad():
        scores = model(to_tensors(stack_rows([row]), spec))
    return torch.stack([scores[task][0] for task in spec.event_schema.label_columns], dim=-1)


def changed(schema: str, index: int, **fields) -> list[dict]:
    return [dict(e, **fields) if position == index else e for position, e in enumerate(timeline(schema))]


@pytest.fixture(scope="module", params=[(schema, rotary) for schema in SPECS for rotary in ("siren", "ordinal", "none")],
                ids=lambda param: "-".join(param))
def case(request):
    schema, rotary = request.param
    torch.manual_seed(0)
    ranker = GenerativeRanker(ModelConfig(rotary=rotary, d_model=32, n_heads=2), SPECS[schema], T_REF).eval()
    return schema, randomised(ranker, seed=7)


@pytest.mark.parametrize("schema", sorted(SPECS))
def test_the_row_marks_which_previous_actions_are_known(schema):
    assert SPECS[schema].event_schema.action_delay_ms == {"feed": 30_000, "watch": 10_000}[schema]
    row = latest_row(timeline(schema), SPECS[schema], {}, scored=4)
    assert row[PREV_ACTIONS_KNOWN_COLUMN].tolist() == [0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize("perturbation", ["actions", "duration"])
def test_actions_not_yet_available_never_reach_a_prediction(case, perturbation):
    schema, model = case
    spec = SPECS[schema]
    base = logits(model, timeline(schema), spec)
    pending = logits(model, changed(schema, 1, **PERTURBATIONS[schema][perturbation]), spec)
    # e1's actions were pending at e2: neither e2 nor anything before it may move.
    assert torch.allclose(pending[:E2 + 1], base[:E2 + 1], atol=1e-6), (pending - base)[:E2 + 1]


@pytest.mark.parametrize("perturbation", ["actions", "duration"])
def test_available_actions_do_reach_later_predictions(case, perturbation):
    schema, model = case
    spec = SPECS[schema]
    base = logits(model, timeline(schema), spec)
    # e0's actions were known at e1 and flow on to e2 through attention; e2's were known at e3.
    known_at_e1 = logits(model, changed(schema, 0, **PERTURBATIONS[schema][perturbation]), spec)
    assert (known_at_e1[E2] - base[E2]).abs().max() > 1e-3
    known_at_e3 = logits(model, changed(schema, 2, **PERTURBATIONS[schema][perturbation]), spec)
    assert torch.allclose(known_at_e3[:E2 + 1], base[:E2 + 1], atol=1e-6)
    assert (known_at_e3[E3] - base[E3]).abs().max() > 1e-3


def test_pending_is_an_input_distinct_from_known_and_empty(case):
    """With no action and no duration, a known outcome and a pending one still differ: the model is
    told that it does not know yet."""
    schema, model = case
    quiet = [dict(e, **QUIET[schema]) for e in timeline(schema)]
    # e1 (600 s) is known at e2 (650 or 645 s) without a delay, pending with one of 60 s.
    instantly, slowly = (with_delay(SPECS[schema], ms) for ms in (0, 60_000))
    known, pending = logits(model, quiet, instantly), logits(model, quiet, slowly)
    assert torch.allclose(known[:E2], pending[:E2], atol=1e-6)
    assert (known[E2] - pending[E2]).abs().max() > 1e-3
