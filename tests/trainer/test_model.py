"""The generative ranker: config checks, variants, causality (no label leakage), padding, precision,
the masked multi-task loss and optimizer parameter groups; the layout and causality of a model of
the watch schema (a shared table, two tasks of its own)."""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from model_support import randomised as large_random_weights

from common.config import ConfigError, load_config
from features.spec import FeatureSpec
from trainer.model import (
    CausalSelfAttention, GenerativeRanker, ModelConfig, attention_mask, masked_multitask_loss,
    parameter_groups, real_tokens, resolve_task_weights, synthetic_batch,
)
from trainer.rotary import TimeFeatures, rotate, unit_rotations
from trainer.variants import VARIANTS, variant_overrides

T_REF = 1_700_000_000
SMALL = {"d_model": 32, "n_heads": 2}
SPECS = {
    "feed": FeatureSpec(context_len=12, stride=12,
                        buckets={"item_id": 101, "author_id": 53, "content_type": 7, "topic": 11, "surface": 5}),
    "watch": FeatureSpec(context_len=12, stride=12, schema="watch",
                         buckets={"post_id": 101, "creator_id": 53, "format": 8, "country": 11}),
}
FEED = SPECS["feed"].event_schema
ID_COLUMNS, LABEL_COLUMNS = FEED.id_columns, FEED.label_columns


@pytest.fixture(scope="module")
def spec():
    return SPECS["feed"]


@pytest.fixture(scope="module")
def batch(spec):
    return synthetic_batch(spec, 8, seed=5, start_seconds=T_REF - 86_400)


def schema_batch(schema: str):
    """The ``batch`` fixture's rows for the spec of ``schema``."""
    return synthetic_batch(SPECS[schema], 8, seed=5, start_seconds=T_REF - 86_400)


def small_model(spec, seed=0, **overrides):
    torch.manual_seed(seed)
    return GenerativeRanker(ModelConfig(**{**SMALL, **overrides}), spec, T_REF).eval()


def sharpened(model, scale=20.0):
    """Scale up the query/key weights: at init attention is nearly uniform, so positions barely
    matter; sharp attention makes any change of the rotation visible in the logits."""
    with torch.no_grad():
        for block in model.blocks:
            block.attention.qkv.weight[:2 * model.config.d_model] *= scale
    return model


@dataclass
class Root:
    model: ModelConfig = field(default_factory=ModelConfig)


@pytest.mark.parametrize("override,key", [
    ("model.rotary=alibi", "model.rotary"),
    ("model.n_heads=3", "model.d_model"),
    ("model.d_model=12", "model.d_model"),
    ("model.dropout=1.0", "model.dropout"),
    ("model.angles_per_pair=3", "model.angles_per_pair"),
    ("model.categorical_input=true", "model.categorical_input"),
    ("model.task_weights.like=-1", "model.task_weights.like"),
    ("model.rope_base=1", "model.rope_base"),
    ("model.time_horizon_years=0", "model.time_horizon_years"),
    ("model.n_layer=3", "model.n_layer"),
])
def test_bad_config_fails_naming_the_key(override, key):
    overrides = [override, "model.rotary=ordinal"] if key == "model.categorical_input" else [override]
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(Root, overrides=overrides)


def test_task_weights_are_the_schemas_with_overrides_and_keys_are_checked_against_it(spec):
    assert resolve_task_weights(ModelConfig(), FEED) == {"contribution": 1.0, "like": 1.0, "long_dwell": 1.0}
    watch = SPECS["watch"].event_schema
    assert resolve_task_weights(ModelConfig(), watch) == {"follow": 2.0, "watched": 1.0}
    assert resolve_task_weights(ModelConfig(task_weights={"watched": 0.5}), watch) == {"follow": 2.0, "watched": 0.5}
    assert small_model(spec, task_weights={"like": 0.0}).task_weights == {
        "contribution": 1.0, "like": 0.0, "long_dwell": 1.0}
    # Which tasks there are is the schema's to say: a key of another schema fails at model build.
    with pytest.raises(ConfigError, match="'model.task_weights.ctr'.*not a task of schema 'feed'"):
        small_model(spec, task_weights={"ctr": 1.0})
    with pytest.raises(ConfigError, match="'model.task_weights.like'.*not a task of schema 'watch'"):
        resolve_task_weights(ModelConfig(task_weights={"like": 1.0}), watch)
    with pytest.raises(ConfigError, match="'model.task_weights'.*must not all be 0"):
        resolve_task_weights(ModelConfig(task_weights={"follow": 0.0, "watched": 0.0}), watch)


def test_siren_needs_a_branch():
    with pytest.raises(ConfigError, match="'model.siren_branch'"):
        ModelConfig(siren_branch=False, dnn_branch=False)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_loads_over_any_base(name):
    base = ["model.categorical_input=true", "model.dnn_branch=false"]
    config = load_config(Root, overrides=base + variant_overrides(name)).model
    for key, value in VARIANTS[name].items():
        assert getattr(config, key) == value


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="siren_categorical"):
        variant_overrides("sirne")


def test_forward_gives_fp32_logits_per_task(spec, batch):
    model = small_model(spec)
    pad_only = {**batch, "length": batch["length"].clone()}
    pad_only["length"][0] = 0
    logits = model(pad_only)
    assert set(logits) == set(LABEL_COLUMNS)
    for values in logits.values():
        assert values.shape == (8, 12) and values.dtype == torch.float32
        assert torch.isfinite(values).all()


def test_angles_are_computed_once_per_forward_and_shared_by_all_layers(spec, batch):
    model = small_model(spec, n_layers=3)
    rotary_calls, seen = [], []
    model.rotary.register_forward_hook(lambda module, args, output: rotary_calls.append(output))
    for block in model.blocks:
        block.attention.register_forward_pre_hook(lambda module, args: seen.append(args[1]))
    model(batch)
    assert len(rotary_calls) == 1 and rotary_calls[0].dtype == torch.float32
    assert len(seen) == 3 and all(rotations is seen[0] for rotations in seen)
    assert torch.equal(seen[0][:, :, 0, 0], unit_rotations(rotary_calls[0]))


def test_attention_rotates_queries_and_keys_but_not_values():
    torch.manual_seed(0)
    attention = CausalSelfAttention(ModelConfig(**SMALL)).eval()
    x = torch.randn(3, 6, 32)
    rotations = unit_rotations(torch.randn(3, 6, 8) * 3)[:, :, None, None, :]
    mask = attention_mask(real_tokens(torch.tensor([6, 4, 1]), 6))
    q, k, v = attention.qkv(x).view(3, 6, 3, 2, 16).unbind(2)

    def reference(values):
        heads = [rotate(q, rotations[:, :, 0]), rotate(k, rotations[:, :, 0]), values]
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in heads), attn_mask=mask)
        return attention.proj(y.transpose(1, 2).reshape(3, 6, 32))

    output = attention(x, rotations, mask)
    assert torch.allclose(output, reference(v), atol=1e-6)
    assert not torch.allclose(output, reference(rotate(v, rotations[:, :, 0])), atol=1e-3)


def test_angles_stay_fp32_under_bf16_autocast(spec, batch):
    model = small_model(spec)
    reference_angles = model.rotation_angles(batch)
    reference_logits = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        angles = model.rotation_angles(batch)
        logits = model(batch)
    assert angles.dtype == torch.float32 and torch.equal(angles, reference_angles)
    assert logits["like"].dtype == torch.float32
    assert torch.allclose(logits["like"], reference_logits["like"], atol=0.05)


def test_angles_stay_fp32_when_the_model_is_cast_to_bf16(spec, batch):
    model = small_model(spec)
    reference = model.rotation_angles(batch)
    model.to(torch.bfloat16)
    angles = model.rotation_angles(batch)
    assert angles.dtype == torch.float32
    assert torch.allclose(angles, reference, rtol=0.02, atol=0.05)
    assert torch.isfinite(model(batch)["contribution"]).all()


def perturbed(batch, columns, start, seed):
    generator = torch.Generator().manual_seed(seed)
    changed = dict(batch)
    for column in columns:
        values = batch[column].clone()
        values[:, start:] = torch.rand(values[:, start:].shape, generator=generator) * 3
        changed[column] = values
    return changed


@pytest.mark.parametrize("schema", sorted(SPECS))
@pytest.mark.parametrize("rotary", ["siren", "to_rope", "ordinal"])
def test_no_leakage_from_a_tokens_own_or_later_actions_and_labels(schema, rotary):
    spec, batch = SPECS[schema], schema_batch(schema)
    tasks = spec.event_schema.label_columns
    model = small_model(spec, rotary=rotary)
    columns = sorted(set(spec.event_schema.action_columns + tasks + ("loss_mask",)))
    forward_checks = 0
    with torch.no_grad():
        base = model(batch)
        for position in (0, 4, 8, 11):
            changed = model(perturbed(batch, columns, position, seed=position))
            for task in tasks:
                seen = slice(0, position + 1)
                assert torch.allclose(changed[task][:, seen], base[task][:, seen], atol=1e-6)
            real = batch["loss_mask"][:, position] > 0
            if position < 11 and real.any():
                # The actions do flow forward: the next token sees them.
                first = tasks[0]
                assert (changed[first][real, position + 1] != base[first][real, position + 1]).all()
                forward_checks += 1
    assert forward_checks >= 2


@pytest.mark.parametrize("schema", sorted(SPECS))
@pytest.mark.parametrize("rotary", ["siren", "to_rope"])
def test_later_timestamps_do_not_move_earlier_predictions(schema, rotary):
    spec, batch = SPECS[schema], schema_batch(schema)
    # Sharp enough that a moved angle shows in the later logits of either schema's small model.
    model = sharpened(small_model(spec, rotary=rotary), scale=40.0)
    later = {**batch, "ts": batch["ts"].clone()}
    later["ts"][:, 9:] += torch.where(batch["ts"][:, 9:] > 0, 365 * 86_400, 0)
    with torch.no_grad():
        base, changed = model(batch), model(later)
    real = batch["loss_mask"][:, 9:] > 0
    for task in spec.event_schema.label_columns:
        assert torch.allclose(changed[task][:, :9], base[task][:, :9], atol=1e-5), task
    assert max((changed[task][:, 9:][real] - base[task][:, 9:][real]).abs().max()
               for task in spec.event_schema.label_columns) > 1e-3


def randomised(model, seed, gain=3.0):
    """Large random weights (:func:`model_support.randomised`) with sharpened queries and keys: the
    trained-looking small init hides how much an angle can move the logits; this makes any
    non-causal input visible."""
    return sharpened(large_random_weights(model, seed, gain), scale=4.0)


def dropping_newest(batch, count):
    """The rows without their ``count`` newest tokens: every per-token column shifted right by
    ``count`` inside the same width and left-padded with zeros, ``length`` reduced by ``count``.
    Column k of the result holds the token of column k − count of ``batch``."""
    width = batch["ts"].shape[1]
    shorter = {}
    for column, values in batch.items():
        if values.ndim == 2 and values.shape[1] == width:
            shorter[column] = F.pad(values[:, :width - count], (count, 0))
        else:
            shorter[column] = values
    shorter["length"] = batch["length"] - count
    return shorter


@pytest.mark.parametrize("schema", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("appended", [1, 3])
def test_appending_later_tokens_never_changes_an_earlier_prediction(schema, name, appended):
    """Token i is predicted from tokens < i only: the same row with ``appended`` later tokens gives
    every earlier token the same logits (aligned by token, not by column: rows are left-padded, so
    appending shifts the earlier tokens left), for every rotary variant and the time-in-embedding
    controls, with large random weights, for the feed and the watch schema."""
    spec = SPECS[schema]
    model = randomised(small_model(spec, **VARIANTS[name]), seed=11)
    rows = synthetic_batch(spec, 24, seed=23, start_seconds=T_REF - 86_400)
    keep = rows["length"] > appended
    longer = {column: values[keep] for column, values in rows.items()}
    shorter = dropping_newest(longer, appended)
    earlier = real_tokens(shorter["length"], spec.context_len)[:, appended:]
    assert earlier.sum() > 50
    with torch.no_grad():
        before, after = model(shorter), model(longer)
    assert set(before) == set(spec.event_schema.label_columns)
    for task in spec.event_schema.label_columns:
        expected, actual = before[task][:, appended:][earlier], after[task][:, :-appended][earlier]
        change = (actual - expected).abs().max() / expected.abs().max()
        assert change < 1e-4, f"{name}: an appended token moved an earlier {task} logit by {change:.2e}"


def test_a_tokens_item_features_change_its_own_prediction(spec, batch):
    model = small_model(spec)
    changed = {**batch, "item_id": batch["item_id"].clone()}
    changed["item_id"][:, 6] = torch.where(batch["item_id"][:, 6] > 0, batch["item_id"][:, 6] % 100 + 1, 0)
    real = batch["loss_mask"][:, 6] > 0
    with torch.no_grad():
        base, after = model(batch), model(changed)
    assert real.any()
    assert (after["like"][real, 6] != base["like"][real, 6]).all()
    assert torch.equal(after["like"][:, :6], base["like"][:, :6])


@pytest.mark.parametrize("rotary", ["siren", "to_rope"])
def test_padding_changes_nothing_for_real_tokens(spec, batch, rotary):
    model = small_model(spec, rotary=rotary, categorical_input=rotary == "siren")
    padding = batch["loss_mask"] == 0
    assert padding.any() and not padding.all()
    generator = torch.Generator().manual_seed(7)
    noisy = {}
    for column, values in batch.items():
        if values.ndim < 2:
            noisy[column] = values
            continue
        if column in ID_COLUMNS:
            noise = torch.randint(1, spec.buckets[column], values.shape, generator=generator)
        elif column == "ts":
            noise = T_REF - torch.randint(0, 86_400, values.shape, generator=generator)
        else:
            noise = torch.rand(values.shape, generator=generator) * 5
        noisy[column] = torch.where(padding, noise.to(values.dtype), values)
    noisy["loss_mask"] = batch["loss_mask"]
    with torch.no_grad():
        base, changed = model(batch), model(noisy)
    for task in LABEL_COLUMNS:
        assert torch.allclose(changed[task][~padding], base[task][~padding], atol=1e-5)


def test_loss_ignores_masked_tokens_and_matches_the_definition(spec, batch):
    generator = torch.Generator().manual_seed(0)
    logits = {task: torch.randn(8, 12, generator=generator, requires_grad=True) for task in LABEL_COLUMNS}
    weights = {task: 1.0 for task in LABEL_COLUMNS}
    total, per_task = masked_multitask_loss(logits, batch, weights)
    mask = batch["loss_mask"].numpy() > 0
    for task in LABEL_COLUMNS:
        x, y = logits[task].detach().double().numpy()[mask], batch[task].double().numpy()[mask]
        expected = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
        assert abs(per_task[task].item() - expected) < 1e-5
    garbage = {**batch, **{task: torch.where(batch["loss_mask"] > 0, batch[task], float("nan"))
                           for task in LABEL_COLUMNS}}
    moved = {task: torch.where(batch["loss_mask"] > 0, values, values + 100.0)
             for task, values in logits.items()}
    again, _ = masked_multitask_loss(moved, garbage, weights)
    assert torch.allclose(again, total)
    again.backward()
    for task in LABEL_COLUMNS:
        assert torch.isfinite(logits[task].grad).all()
        assert (logits[task].grad[batch["loss_mask"] == 0] == 0).all()


def test_loss_applies_task_weights(batch):
    logits = {task: torch.randn(8, 12) for task in LABEL_COLUMNS}
    weights = {"contribution": 2.0, "like": 0.0, "long_dwell": 0.5}
    total, per_task = masked_multitask_loss(logits, batch, weights)
    assert torch.allclose(total, 2.0 * per_task["contribution"] + 0.5 * per_task["long_dwell"])
    with pytest.raises(KeyError, match="long_dwell"):
        masked_multitask_loss(logits, batch, {"contribution": 1.0, "like": 1.0})


def test_gradient_reaches_omega_lambda_and_both_branches(spec, batch):
    model = small_model(spec).train()
    loss, _ = masked_multitask_loss(model(batch), batch, model.task_weights)
    loss.backward()
    rotary = model.rotary
    for parameter in (rotary.omega, rotary.ordinal_gate, rotary.siren.hidden[0].weight,
                      rotary.dnn.hidden[0].weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_parameter_groups_exempt_omega_lambda_biases_norms_embeddings(spec):
    model = small_model(spec, categorical_input=True)
    groups = parameter_groups(model, weight_decay=0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay.isdisjoint(no_decay) and decay | no_decay == {id(p) for p in model.parameters()}
    block = model.blocks[0]
    exempt = [model.rotary.omega, model.rotary.ordinal_gate, block.attention.qkv.bias,
              block.attention_norm.weight, model.final_norm.bias, model.id_embeddings["item_id"].weight,
              model.rotary.metadata["topic"].weight]
    assert all(id(p) in no_decay for p in exempt)
    assert all(id(p) in decay for p in (block.attention.qkv.weight, model.rotary.siren.hidden[1].weight,
                                        model.heads.weight))
    assert torch.optim.AdamW(groups, lr=1e-3) is not None


def test_time_reference_comes_from_config_or_caller_and_travels_with_the_weights(spec):
    config = ModelConfig(**SMALL)
    model = GenerativeRanker(config, spec, T_REF)
    assert model.rotary.time_features.t_ref_seconds.item() == T_REF
    pinned = GenerativeRanker(ModelConfig(**SMALL, t_ref_seconds=1_600_000_000), spec, T_REF)
    assert pinned.rotary.time_features.t_ref_seconds.item() == 1_600_000_000
    restored = GenerativeRanker(config, spec, 1_500_000_000)
    restored.load_state_dict(model.state_dict())
    assert restored.rotary.time_features.t_ref_seconds.item() == T_REF
    restored.set_time_reference(1_650_000_000)
    assert all(module.t_ref_seconds.item() == 1_650_000_000
               for module in restored.modules() if isinstance(module, TimeFeatures))


def test_rotary_parameter_share_of_the_default_model():
    model = GenerativeRanker(ModelConfig(), FeatureSpec(), T_REF)
    rotary, total = model.parameter_counts()
    assert rotary == sum(p.numel() for p in model.rotary.parameters()) == 11_185
    assert total == sum(p.numel() for p in model.parameters())
    assert rotary / total < 0.003


def test_a_watch_model_has_one_table_per_schema_table_and_the_schemas_heads_and_weights():
    spec = SPECS["watch"]
    model = small_model(spec, categorical_input=True)
    assert {table: tuple(embedding.weight.shape) for table, embedding in model.id_embeddings.items()} == {
        "post_id": (101, 32), "creator_id": (53, 32), "format": (8, 32), "country": (11, 32)}
    assert model.continuous_projection.in_features == 3  # log_gap, log_item_age, log_video_s
    assert model.previous_action_projection.in_features == 4  # hide, follow, log_watch, pending
    assert model.heads.out_features == 2 and model.task_weights == {"follow": 2.0, "watched": 1.0}
    assert model.rotary.time_features.cyclical_columns == ("day_sin", "day_cos", "week_sin", "week_cos")
    assert list(model.rotary.metadata) == ["format", "country"]
    batch = schema_batch("watch")
    with torch.no_grad():
        logits = model(batch)
    assert set(logits) == {"follow", "watched"}
    total, per_task = masked_multitask_loss(logits, batch, model.task_weights)
    assert torch.allclose(total, 2.0 * per_task["follow"] + per_task["watched"])


def test_both_columns_of_a_shared_table_read_the_same_rows():
    """``origin_post_id`` reads ``post_id``'s table: swapping the two columns' ids leaves every
    token's summed embedding, hence every logit, exactly as it was (with a table each it would not),
    while changing a token's origin post changes its prediction."""
    spec = SPECS["watch"]
    model = randomised(small_model(spec), seed=3)
    batch = schema_batch("watch")
    swapped = {**batch, "post_id": batch["origin_post_id"], "origin_post_id": batch["post_id"]}
    moved = {**batch, "origin_post_id": batch["origin_post_id"].clone()}
    moved["origin_post_id"][:, 6] = torch.where(batch["origin_post_id"][:, 6] > 0,
                                                batch["origin_post_id"][:, 6] % 100 + 1, 0)
    real = batch["loss_mask"][:, 6] > 0
    assert real.any() and (batch["post_id"] != batch["origin_post_id"]).any()
    with torch.no_grad():
        base, after_swap, after_move = model(batch), model(swapped), model(moved)
    for task in base:
        assert torch.equal(after_swap[task], base[task]), task
        assert (after_move[task][real, 6] != base[task][real, 6]).all(), task
