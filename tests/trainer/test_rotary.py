"""Rotary encodings: RoPE algebra, fp32 rotation, SIREN initialisation, and each variant's angle math."""

import math

import numpy as np
import pytest
import torch

from common.config import ConfigError
from features.spec import FeatureSpec, cyclical
from trainer.model import GenerativeRanker, ModelConfig, build_rotary, synthetic_batch
from trainer.rotary import (
    METADATA_EMBEDDING_DIM, OrdinalRoPE, Siren, TimeFeatures, rotate, unit_rotations,
)
from trainer.variants import VARIANTS

T_REF = 1_700_000_000
YEAR = 365.25 * 86_400
FEED_CYCLICAL = ("tod_sin", "tod_cos", "dow_sin", "dow_cos")
"""The feed schema's ``rotary_cyclical_columns``."""


@pytest.fixture(scope="module")
def spec():
    buckets = {"item_id": 101, "author_id": 53, "content_type": 7, "topic": 11, "surface": 5}
    return FeatureSpec(context_len=10, stride=10, buckets=buckets)


@pytest.fixture(scope="module")
def batch(spec):
    return synthetic_batch(spec, 6, seed=3, start_seconds=T_REF - 86_400)


def variant_config(name, **overrides):
    return ModelConfig(**{**VARIANTS[name], **overrides})


def reference_ordinal(width, d_head, base=10000.0):
    """p · θ in float64, independent of the code under test."""
    positions = np.arange(width - 1, -1, -1, dtype=np.float64)
    theta = base ** (-np.arange(0, d_head, 2, dtype=np.float64) / d_head)
    return torch.from_numpy(positions[:, None] * theta[None, :])


def test_scores_depend_only_on_angle_differences():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 32, generator=generator, dtype=torch.float64).unbind(0)
    a, b = (torch.rand(2, 5, 3, 16, generator=generator, dtype=torch.float64) * 20 - 10).unbind(0)

    def rotated(x, angles):
        return rotate(x, torch.polar(torch.ones_like(angles), angles))

    scores = (rotated(q, a) * rotated(k, b)).sum(-1)
    relative = (rotated(q, a - b) * k.float()).sum(-1)
    assert torch.allclose(scores.double(), relative.double(), atol=1e-4)
    assert not torch.allclose(scores.double(), (q * k).sum(-1), atol=1e-2)


def test_rotation_preserves_norms():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 32, generator=generator)
    rotated = rotate(x, unit_rotations(torch.randn(4, 7, 16, generator=generator) * 50))
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert not torch.allclose(rotated, x)


def test_rotation_is_fp32_for_bf16_inputs():
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 50, 32, generator=generator) * 4).to(torch.bfloat16)
    angles = reference_ordinal(50, 32).float()
    rotations = unit_rotations(angles.to(torch.bfloat16))
    assert rotations.dtype == torch.complex64
    result = rotate(x, unit_rotations(angles))
    assert result.dtype == torch.float32
    exact = rotate(x.double(), torch.polar(torch.ones_like(angles.double()), angles.double()))
    error_fp32 = (result.double() - exact.double()).abs().max()
    # The same rotation done in bf16 arithmetic, which the fp32 path must beat by far.
    first, second = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    in_bf16 = torch.stack((first * cos - second * sin, first * sin + second * cos), -1).flatten(-2)
    error_bf16 = (in_bf16.double() - exact.double()).abs().max()
    assert error_fp32 < 1e-5 < 1e-2 < error_bf16


def test_time_features_match_their_definition(spec, batch):
    assert spec.event_schema.rotary_cyclical_columns == FEED_CYCLICAL
    module = TimeFeatures(T_REF, 2.0, FEED_CYCLICAL)
    features = module(batch)
    ts = batch["ts"].numpy()
    cyc = cyclical(ts, {"tod": 86_400, "dow": 604_800})
    expected = np.stack([(ts - T_REF) / YEAR, cyc["tod_sin"], cyc["tod_cos"], cyc["dow_sin"],
                         cyc["dow_cos"]], axis=-1) * (ts > 0)[..., None]
    assert features.shape[-1] == module.count == 5 and features.dtype == torch.float32
    assert np.allclose(features.numpy(), expected, atol=1e-5)
    assert (features[batch["ts"] == 0] == 0).all() and (batch["ts"] == 0).any()


def test_time_features_depend_on_the_tokens_own_time_only(batch):
    """No position in x_i: the same token gets the same features in any column of any row."""
    features = TimeFeatures(T_REF, 2.0, FEED_CYCLICAL)
    shifted = {column: values[:, 1:] if values.ndim == 2 else values for column, values in batch.items()}
    assert torch.equal(features(shifted), features(batch)[:, 1:])


def test_time_offset_is_clamped_to_the_horizon(batch):
    """t̃ saturates at ± H years, however far incremental training runs from T_ref; the cyclical
    terms are untouched."""
    features = TimeFeatures(T_REF, 1.5, FEED_CYCLICAL)
    real = batch["ts"] > 0
    for years, expected in ((5.0, 1.5), (-4.0, -1.5), (1.0, 1.0)):
        moved = {**batch, "ts": torch.where(real, batch["ts"] + int(years * YEAR), 0)}
        x = features(moved)
        within = (batch["ts"][real] - T_REF).float() / YEAR
        assert torch.allclose(x[..., 0][real], (within + years).clamp(-1.5, 1.5), atol=1e-5)
        if expected != years:
            assert (x[..., 0][real] == expected).all()
        assert torch.equal(x[..., 1:], features(batch)[..., 1:])


def test_none_variant_gives_zero_angles(spec, batch):
    angles = build_rotary(variant_config("none"), spec, T_REF)(batch)
    assert angles.shape == (6, 10, 16) and angles.dtype == torch.float32
    assert (angles == 0).all()


def test_ordinal_variant_is_reverse_position_times_theta(spec, batch):
    angles = build_rotary(variant_config("ordinal"), spec, T_REF)(batch)
    assert torch.allclose(angles.double(), reference_ordinal(10, 32).expand(6, -1, -1), rtol=1e-6)
    assert (angles[:, -1] == 0).all()


def test_to_rope_adds_scaled_hours_to_the_newest_token(spec, batch):
    rotary = build_rotary(variant_config("to_rope"), spec, T_REF)
    with torch.no_grad():
        rotary.time_scale.fill_(0.5)
    ts = batch["ts"].numpy()
    newest = ts.max(axis=1, keepdims=True)
    hours = np.where(ts > 0, (newest - ts) / 3600.0, 0.0)
    positions = np.arange(9, -1, -1)[None, :] + 0.5 * hours
    theta = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    expected = torch.from_numpy(positions[..., None] * theta)
    assert torch.allclose(rotary(batch).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,has_siren,has_dnn,has_ordinal", [
    ("siren", True, True, True), ("siren_only", True, False, True),
    ("dnn_only", False, True, True), ("siren_no_ordinal", True, True, False)])
def test_siren_variants_angle_math(spec, batch, name, has_siren, has_dnn, has_ordinal):
    torch.manual_seed(0)
    rotary = build_rotary(variant_config(name), spec, T_REF)
    assert (rotary.siren is not None, rotary.dnn is not None) == (has_siren, has_dnn)
    assert (rotary.ordinal_gate is not None) == has_ordinal
    with torch.no_grad():
        rotary.omega.copy_(torch.linspace(0.5, 3.0, 16))
        if has_ordinal:
            rotary.ordinal_gate.fill_(0.7)
        x = rotary.inputs(batch)
        f = sum(branch(x) for branch in (rotary.siren, rotary.dnn) if branch is not None)
        expected = f.double() * rotary.omega.double() * (batch["ts"] > 0).unsqueeze(-1)
        if has_ordinal:
            expected = expected + 0.7 * reference_ordinal(10, 32)
        angles = rotary(batch)
    assert torch.allclose(angles.double(), expected, rtol=1e-5, atol=1e-5)


def test_omega_zero_reduces_siren_to_ordinal_rope(spec, batch):
    rotary = build_rotary(variant_config("siren"), spec, T_REF)
    ordinal = OrdinalRoPE(32, 10000.0)(batch)
    with torch.no_grad():
        rotary.omega.zero_()
        assert torch.equal(rotary(batch), ordinal)
        rotary.ordinal_gate.fill_(0.25)
        assert torch.equal(rotary(batch), 0.25 * ordinal)


def test_zero_function_reduces_siren_to_ordinal_rope(spec, batch):
    rotary = build_rotary(variant_config("siren"), spec, T_REF)
    assert not torch.equal(rotary(batch), OrdinalRoPE(32, 10000.0)(batch))
    with torch.no_grad():
        for branch in (rotary.siren, rotary.dnn):
            branch.output.weight.zero_()
            branch.output.bias.zero_()
    assert torch.equal(rotary(batch), OrdinalRoPE(32, 10000.0)(batch))


def test_missing_timestamp_keeps_only_the_ordinal_term(spec, batch):
    rotary = build_rotary(variant_config("siren"), spec, T_REF)
    missing = {**batch, "ts": batch["ts"].clone()}
    missing["ts"][:, 5] = 0
    angles = rotary(missing)
    with torch.no_grad():
        ordinal = rotary.ordinal_gate * OrdinalRoPE(32, 10000.0)(batch)
    assert torch.equal(angles[:, 5], ordinal[:, 5])
    assert not torch.allclose(rotary(batch)[:, 5], ordinal[:, 5])


def test_angles_per_pair_repeats_each_angle_over_neighbouring_pairs(spec, batch):
    rotary = build_rotary(variant_config("siren_no_ordinal", angles_per_pair=4), spec, T_REF)
    assert rotary.siren.output.out_features == 4
    with torch.no_grad():
        f = rotary(batch) / rotary.omega
    real = batch["ts"] > 0
    groups = f[real].view(-1, 4, 4)
    assert torch.allclose(groups, groups[..., :1].expand_as(groups), atol=1e-6)
    assert not torch.allclose(groups[:, 0], groups[:, 1])


def test_categorical_input_moves_angles_with_the_categories(spec, batch):
    changed = {**batch, "content_type": batch["content_type"].clone()}
    real = batch["ts"][:, 7] > 0
    changed["content_type"][:, 7] = torch.where(real, batch["content_type"][:, 7] % 6 + 1, 0)
    categorical = build_rotary(variant_config("siren_categorical"), spec, T_REF)
    moved = (categorical(changed) != categorical(batch)).any(-1)
    assert moved[:, 7].equal(real) and real.any()
    assert not moved[:, :7].any() and not moved[:, 8:].any()
    plain = build_rotary(variant_config("siren"), spec, T_REF)
    assert torch.equal(plain(changed), plain(batch))


def test_time_embedding_changes_embeddings_not_angles(spec, batch):
    torch.manual_seed(0)
    model = GenerativeRanker(variant_config("time_embedding", d_model=32, n_heads=2), spec, T_REF)
    shifted = {**batch, "ts": torch.where(batch["ts"] > 0, batch["ts"] + 30 * 86_400, 0)}
    assert torch.equal(model.rotation_angles(batch), OrdinalRoPE(16, 10000.0)(batch))
    assert torch.equal(model.rotation_angles(shifted), model.rotation_angles(batch))
    real = batch["loss_mask"] > 0
    with torch.no_grad():
        assert not torch.allclose(model(shifted)["like"][real], model(batch)["like"][real])
        ordinal = GenerativeRanker(variant_config("ordinal", d_model=32, n_heads=2), spec, T_REF)
        assert torch.equal(ordinal(shifted)["like"], ordinal(batch)["like"])


def test_time_embedding_siren_rotates_like_siren_and_embeds_time_like_the_control(spec, batch):
    config = variant_config("time_embedding_siren", d_model=32, n_heads=2)
    assert config.rotary == "siren" and config.time_in_embedding
    torch.manual_seed(0)
    model = GenerativeRanker(config, spec, T_REF)
    torch.manual_seed(0)
    siren = GenerativeRanker(variant_config("siren", d_model=32, n_heads=2), spec, T_REF)
    siren.rotary.load_state_dict(model.rotary.state_dict())
    assert model.time_projection is not None and siren.time_projection is None
    assert torch.equal(model.rotation_angles(batch), siren.rotation_angles(batch))
    real = batch["ts"] > 0
    shifted = {**batch, "ts": torch.where(real, batch["ts"] + 3 * 3_600, 0)}
    assert not torch.allclose(model.rotation_angles(shifted)[real], model.rotation_angles(batch)[real])
    # A row's first token attends to itself only, where the rotation cancels (q_i · k_i is
    # unrotated): its own time reaches its prediction through the embedding alone.
    rows = torch.arange(batch["ts"].shape[0])
    first = batch["ts"].shape[1] - batch["length"].long()
    with torch.no_grad():
        embedded = (model(shifted)["like"] - model(batch)["like"])[rows, first].abs()
        rotated_only = (siren(shifted)["like"] - siren(batch)["like"])[rows, first].abs()
    assert (embedded > 1e-6).all() and (rotated_only < 1e-6).all()


def test_siren_initial_weight_bounds():
    torch.manual_seed(0)
    siren = Siren(6, 64, 2, 16, omega0=10.0)
    first, hidden = siren.hidden
    layers = [(first, 1.0 / 6)] + [(layer, math.sqrt(6.0 / 64) / 10.0) for layer in (hidden, siren.output)]
    for layer, bound in layers:
        largest = layer.weight.abs().max().item()
        assert 0.95 * bound < largest <= bound


def test_siren_initial_activation_statistics():
    """Sitzmann et al.: hidden pre-activations ~N(0, 1) and sine activations arcsine distributed
    (std 1/√2), from inputs uniform in [−1, 1]."""
    torch.manual_seed(0)
    siren = Siren(6, 64, 2, 16, omega0=10.0)
    x = torch.rand(20_000, 6) * 2 - 1
    first, hidden = siren.hidden
    with torch.no_grad():
        pre_first = siren.omega0 * first(x)
        # Weights U(±1/in) on inputs U(±1), biases U(±1/√in): the variance this init implies.
        expected_std = siren.omega0 * math.sqrt(6 * (1 / 6) ** 2 / 9 + (1 / 6) / 3)
        assert abs(pre_first.std().item() - expected_std) < 0.15
        activations = torch.sin(pre_first)
        assert arcsine_distance(activations) < 0.03
        pre_hidden = siren.omega0 * (activations @ hidden.weight.T)
        assert abs(pre_hidden.std().item() - 1.0) < 0.1
        hidden_activations = torch.sin(siren.omega0 * hidden(activations))
    for values in (activations, hidden_activations):
        assert abs(values.std().item() - 1 / math.sqrt(2)) < 0.03
        assert abs(values.mean().item()) < 0.1
    assert arcsine_distance(hidden_activations) < 0.08


def arcsine_distance(values):
    """Kolmogorov–Smirnov distance to the arcsine law on [−1, 1]: F(y) = 1/2 + arcsin(y)/π."""
    ordered = values.flatten().double().sort().values
    empirical = torch.arange(1, ordered.numel() + 1, dtype=torch.float64) / ordered.numel()
    return (empirical - (0.5 + torch.asin(ordered.clamp(-1, 1)) / math.pi)).abs().max().item()


def test_rotary_parameter_count(spec):
    config = ModelConfig()
    rotary = build_rotary(config, spec, T_REF)
    width, inputs, outputs = 64, 5, 16
    branch = (inputs * width + width) + (width * width + width) + (width * outputs + outputs)
    assert sum(p.numel() for p in rotary.parameters()) == 2 * branch + outputs + 1
    categorical = build_rotary(variant_config("siren_categorical"), spec, T_REF)
    metadata = ("content_type", "topic", "surface")
    assert spec.event_schema.rotary_categoricals == metadata
    extra_inputs = len(metadata) * METADATA_EMBEDDING_DIM
    tables = sum(spec.buckets[column] for column in metadata) * METADATA_EMBEDDING_DIM
    assert sum(p.numel() for p in categorical.parameters()) == (
        2 * branch + 2 * extra_inputs * width + tables + outputs + 1)


def test_the_watch_schemas_rotary_inputs_are_its_own_periods_and_categoricals():
    """x_i = [t̃, day_sin, day_cos, week_sin, week_cos] from the watch log's local-time columns, and
    with categorical inputs the format and country embeddings (sized by their tables)."""
    spec = FeatureSpec(context_len=10, stride=10, schema="watch", buckets={"format": 8, "country": 17})
    rotary = build_rotary(variant_config("siren_categorical"), spec, T_REF)
    assert rotary.time_features.cyclical_columns == ("day_sin", "day_cos", "week_sin", "week_cos")
    assert {column: embedding.num_embeddings for column, embedding in rotary.metadata.items()} == {
        "format": 8, "country": 17}
    assert rotary.siren.hidden[0].in_features == 5 + 2 * METADATA_EMBEDDING_DIM
    batch = synthetic_batch(spec, 4, seed=2, start_seconds=T_REF - 86_400)
    x = rotary.inputs(batch)
    assert torch.equal(x[..., :5], TimeFeatures(T_REF, 2.0, rotary.time_features.cyclical_columns)(batch))
    assert rotary(batch).shape == (4, 10, 16)


def test_categorical_input_needs_rotary_categoricals_in_the_schema(spec):
    schema = spec.event_schema.to_dict()
    schema["rotary"]["categoricals"] = []
    bare = FeatureSpec(context_len=10, stride=10, schema=schema)
    with pytest.raises(ConfigError, match="'model.categorical_input'.*no rotary.categoricals"):
        build_rotary(variant_config("siren_categorical"), bare, T_REF)
