"""Shared by the ranker's leak tests: weights large enough that no weak path from an input to a
logit hides behind the small initialisation."""

from __future__ import annotations

import torch
from torch import nn


def randomised(model: nn.Module, seed: int, gain: float = 3.0) -> nn.Module:
    """Every weight matrix and embedding redrawn N(0, gain²/fan_in), every vector (biases, norm
    gains, ω, λ, β) N(0, 1), padding embeddings kept zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            std = gain / parameter.shape[-1] ** 0.5 if parameter.ndim >= 2 else 1.0
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight[module.padding_idx].zero_()
    return model
