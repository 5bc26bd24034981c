"""Weight initialization: each scheme's statistics, zero biases, and the symmetry that equal weights never break."""

import math

import pytest
import torch
from torch import nn

from core.engine import train
from core.engine.init import initialize, resolve_init
from core.engine.models import build_model
from core.spec import JobSpec, ModelSpec
from tests.factories import make_spec as make_job_spec


def make_spec(**overrides) -> ModelSpec:
    return ModelSpec.model_validate({"arch": "mlp", "layers": [512], "batch_norm": False, **overrides})


def make_net(spec: ModelSpec, n_in: int = 1024, seed: int = 0) -> nn.Module:
    model = build_model(spec, (n_in,), n_classes=3)
    initialize(model, spec, torch.Generator().manual_seed(seed))
    return model


def first_linear(model: nn.Module) -> nn.Linear:
    return next(m for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(
    ("activation", "expected"),
    [
        ("relu", "he_normal"),
        ("leaky_relu", "he_normal"),
        ("gelu", "he_normal"),
        ("tanh", "xavier_uniform"),
        ("sigmoid", "xavier_uniform"),
    ],
)
def test_auto_picks_he_for_relu_like_and_xavier_for_saturating(activation, expected):
    spec = make_spec(activation=activation)
    assert resolve_init(spec) == expected
    assert initialize(build_model(spec, (4,), 2), spec) == expected
    assert resolve_init(make_spec(activation=activation, init="orthogonal")) == "orthogonal"


def test_he_normal_std_is_sqrt_two_over_fan_in():
    w = first_linear(make_net(make_spec(init="he_normal"))).weight
    # PyTorch's default would give 1/sqrt(3 * fan_in), about 0.018 here: 41% below He's 0.044.
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.03)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-3)


def test_he_normal_uses_the_conv_fan_in():
    spec = ModelSpec(arch="cnn", layers=[256], init="he_normal", batch_norm=False)
    model = build_model(spec, (64, 8, 8), 2)
    initialize(model, spec, torch.Generator().manual_seed(0))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.03)


def test_xavier_uniform_bound_follows_the_glorot_formula_with_the_activation_gain():
    w = first_linear(make_net(make_spec(init="xavier_uniform", activation="tanh"))).weight
    bound = 5 / 3 * math.sqrt(6 / (1024 + 512))
    assert w.abs().max().item() <= bound
    assert w.abs().max().item() > 0.99 * bound


def test_xavier_normal_std_and_orthogonal_rows():
    w = first_linear(make_net(make_spec(init="xavier_normal", activation="sigmoid"))).weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / (1024 + 512)), rel=0.03)
    w = first_linear(make_net(make_spec(init="orthogonal", activation="sigmoid", layers=[64]), n_in=128)).weight
    torch.testing.assert_close(w @ w.T, torch.eye(64), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("init", "check"),
    [
        ("zeros", lambda w: bool((w == 0).all())),
        ("constant", lambda w: bool((w == 0.25).all())),
        ("normal", lambda w: abs(w.std().item() - 0.25) < 0.01),
        ("uniform", lambda w: w.abs().max().item() <= 0.25 and w.abs().max().item() > 0.249),
        ("he_uniform", lambda w: w.abs().max().item() <= math.sqrt(6 / 1024) < 1.01 * w.abs().max().item()),
    ],
)
def test_simple_schemes_apply_to_every_weight_including_the_head(init, check):
    model = make_net(make_spec(init=init, init_scale=0.25))
    assert check(first_linear(model).weight)
    if init in ("zeros", "constant"):
        assert check(model.head.weight)


def test_biases_start_at_zero_and_batch_norm_at_identity():
    spec = make_spec(init="he_normal", batch_norm=True, layers=[8, 8])
    model = build_model(spec, (6,), 3)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.5, 1.0)
    initialize(model, spec)
    assert (model.head.bias == 0).all()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_the_generator_makes_initialization_reproducible():
    spec = make_spec(init="he_uniform")
    a, b, c = make_net(spec, seed=1), make_net(spec, seed=1), make_net(spec, seed=2)
    assert torch.equal(first_linear(a).weight, first_linear(b).weight)
    assert not torch.equal(first_linear(a).weight, first_linear(c).weight)


def hidden_weights_after_sgd(init: str, steps: int = 5) -> list[torch.Tensor]:
    spec = make_spec(init=init, init_scale=0.1, layers=[6, 6], activation="tanh")
    model = make_net(spec, n_in=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(32, 10, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return [m.weight.detach() for m in model.body.modules() if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("init", ["zeros", "constant"])
def test_equal_initial_weights_keep_every_hidden_unit_identical(init):
    weights = hidden_weights_after_sgd(init)
    for w in weights:
        torch.testing.assert_close(w, w[:1].expand_as(w), atol=1e-6, rtol=0)  # every unit copies the first
    if init == "constant":  # the units did learn, just all the same thing
        assert not torch.allclose(weights[0], torch.full_like(weights[0], 0.1))


def test_random_initialization_breaks_the_symmetry():
    for w in hidden_weights_after_sgd("he_normal"):
        assert not torch.allclose(w, w[:1].expand_as(w))


@pytest.mark.parametrize(("init", "units"), [("zeros", 1), ("constant", 1), ("he_normal", 16)])
def test_the_final_metrics_count_the_first_layers_distinct_units(init: str, units: int):
    """Zero (or any constant) initialization gives every unit the same gradient: after training they are still one
    unit, which the run reports as model/distinct_units; a random scheme keeps them all apart."""
    spec = JobSpec.model_validate(
        make_job_spec(model={"arch": "mlp", "layers": [16], "init": init}, train={"epochs": 2})
    )
    result = train(spec, [])
    assert result.metrics["model/distinct_units"] == units
