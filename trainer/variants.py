"""Named ablation presets of the ranker's rotary encoding, for comparison runs.

Every preset sets all of the ablation switches, so applying one on top of any config gives exactly
that variant (a switch left over from a base config cannot leak into it).
"""

from __future__ import annotations

from typing import Any

from common.config import ConfigError

_FULL_SIREN: dict[str, Any] = {
    "rotary": "siren", "siren_branch": True, "dnn_branch": True, "ordinal_term": True,
    "categorical_input": False, "time_in_embedding": False,
}

VARIANTS: dict[str, dict[str, Any]] = {
    "none": {**_FULL_SIREN, "rotary": "none"},
    "ordinal": {**_FULL_SIREN, "rotary": "ordinal"},
    "to_rope": {**_FULL_SIREN, "rotary": "to_rope"},
    "time_embedding": {**_FULL_SIREN, "rotary": "ordinal", "time_in_embedding": True},
    "time_embedding_siren": {**_FULL_SIREN, "time_in_embedding": True},
    "siren_only": {**_FULL_SIREN, "dnn_branch": False},
    "dnn_only": {**_FULL_SIREN, "siren_branch": False},
    "siren": dict(_FULL_SIREN),
    "siren_categorical": {**_FULL_SIREN, "categorical_input": True},
    "siren_no_ordinal": {**_FULL_SIREN, "ordinal_term": False},
}
"""Variant name -> ``model.*`` values.

``time_embedding`` (the token's time features in its embedding, ordinal RoPE in attention) is the
control for SIREN-RoPE; ``time_embedding_siren`` keeps the same embedding and adds SIREN-RoPE, so
the pair measures what the rotation adds on top of time features. A rotation cannot move a token's
prediction by its own time alone (``q_i · k_i`` is unrotated), only how it relates to its history.
"""


def _format(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def variant_overrides(name: str) -> list[str]:
    """``["model.rotary=...", ...]`` for the named variant, to append to a command's overrides."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown model variant '{name}'; valid variants: {', '.join(VARIANTS)}")
    return [f"model.{key}={_format(value)}" for key, value in VARIANTS[name].items()]
