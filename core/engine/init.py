"""Explicit weight initialization (He, Xavier, orthogonal, zeros...) of every Linear/Conv/BatchNorm layer."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from core.spec import ModelSpec

# One scheme for every weight, the head included (fastai also initializes its head with kaiming_normal_): what the
# spec names is what runs, and `zeros` really means every weight, which is what the article's warning is about.
# PyTorch's own default (kaiming_uniform_ with a=sqrt(5), i.e. U(+-1/sqrt(fan_in))) is neither He nor Xavier,
# so every scheme is applied explicitly.

RELU_LIKE = ("relu", "leaky_relu", "gelu")
LEAKY_SLOPE = 0.01  # nn.LeakyReLU's default negative slope, which models.py uses
WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def resolve_init(spec: ModelSpec) -> str:
    """The scheme `auto` stands for: He for ReLU-like activations, Xavier for tanh/sigmoid."""
    if spec.init != "auto":
        return spec.init
    return "he_normal" if spec.activation in RELU_LIKE else "xavier_uniform"


def activation_gain(activation: str) -> float:
    """nn.init.calculate_gain of the activation; GELU has none there, so it borrows ReLU's sqrt(2)."""
    if activation == "leaky_relu":
        return nn.init.calculate_gain("leaky_relu", LEAKY_SLOPE)
    if activation == "tanh":
        return nn.init.calculate_gain("tanh")
    if activation == "sigmoid":
        return nn.init.calculate_gain("sigmoid")
    return nn.init.calculate_gain("relu")


def initialize(model: nn.Module, spec: ModelSpec, generator: torch.Generator | None = None) -> str:
    """Initialize every weight of `model` with the spec's scheme, biases to 0, BN to identity; returns the scheme."""
    scheme = resolve_init(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, WEIGHTED):
                _init_weight(m.weight, scheme, spec, generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.fill_(1.0)
                m.bias.zero_()
    return scheme


def _init_weight(w: torch.Tensor, scheme: str, spec: ModelSpec, g: torch.Generator | None) -> None:
    gain = activation_gain(spec.activation)
    # kaiming_* knows only relu and leaky_relu; GELU is close enough to ReLU for the variance argument.
    leaky = spec.activation == "leaky_relu"
    nonlinearity: Literal["relu", "leaky_relu"] = "leaky_relu" if leaky else "relu"
    a = LEAKY_SLOPE if leaky else 0.0
    if scheme == "zeros":
        w.zero_()
    elif scheme == "constant":
        w.fill_(spec.init_scale)
    elif scheme == "normal":
        nn.init.normal_(w, 0.0, spec.init_scale, generator=g)
    elif scheme == "uniform":
        nn.init.uniform_(w, -spec.init_scale, spec.init_scale, generator=g)
    elif scheme == "xavier_uniform":
        nn.init.xavier_uniform_(w, gain, generator=g)
    elif scheme == "xavier_normal":
        nn.init.xavier_normal_(w, gain, generator=g)
    elif scheme == "he_uniform":
        nn.init.kaiming_uniform_(w, a, "fan_in", nonlinearity, generator=g)
    elif scheme == "he_normal":
        nn.init.kaiming_normal_(w, a, "fan_in", nonlinearity, generator=g)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(w, gain, generator=g)
    else:
        raise ValueError(f"unknown init scheme {scheme!r}")


def distinct_units(model: nn.Module, rel_tol: float = 1e-6) -> int:
    """How many different units the model's first layer has: its output units whose incoming weights and bias
    differ from every other's by more than `rel_tol` of the layer's largest weight. Zero initialization gives every
    unit the same gradient, so they stay one unit however long the model trains (the article's symmetry claim)."""
    layer = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)), None)
    if layer is None:
        return 0
    rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        rows = torch.cat([rows, layer.bias.detach().reshape(-1, 1)], dim=1)
    scale = float(rows.abs().max()) or 1.0
    return int(torch.unique(torch.round(rows.float() / (scale * rel_tol)), dim=0).shape[0])
