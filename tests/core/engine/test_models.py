"""Network construction: shapes for every arch and input kind, the MNIST-1D ConvBase, BN, dropout, freezing."""

import pytest
import torch
from torch import nn

from core.engine.models import BasicBlock, build_model, count_blocks
from core.spec import ModelSpec, SpecError

INPUTS = {"image": (3, 12, 12), "signal": (2, 40), "vector": (20,)}


def make_spec(**overrides) -> ModelSpec:
    return ModelSpec.model_validate({"arch": "mlp", "layers": [8, 16], **overrides})


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("arch", ["linear", "mlp", "cnn", "resnet"])
@pytest.mark.parametrize("kind", list(INPUTS))
def test_every_arch_maps_every_input_kind_to_class_logits(arch, kind):
    spec = make_spec(arch=arch, hidden=[12] if arch in ("cnn", "resnet") else [], dropout=0.3)
    model = build_model(spec, INPUTS[kind], n_classes=5)
    assert model(torch.randn(4, *INPUTS[kind])).shape == (4, 5)
    assert len(model.blocks()) == count_blocks(spec)
    assert model.conv2d == (arch in ("cnn", "resnet") and kind == "image")
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5


def test_linear_arch_is_logistic_regression():
    model = build_model(make_spec(arch="linear"), (3, 4, 4), n_classes=10)
    assert model.blocks() == []
    assert sum(p.numel() for p in model.parameters()) == 48 * 10 + 10


def mnist1d_convbase() -> nn.Module:
    # greydanus/mnist1d notebooks/models.py ConvBase, written out by hand.
    class ConvBase(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv1d(1, 25, 5, stride=2, padding=1)
            self.conv2 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.conv3 = nn.Conv1d(25, 25, 3, stride=2, padding=1)
            self.linear = nn.Linear(125, 10)

        def forward(self, x):
            x = x.view(-1, 1, x.shape[-1])
            h = self.conv3(self.conv2(self.conv1(x).relu()).relu()).relu()
            return self.linear(h.flatten(1))

    return ConvBase()


def convbase_spec() -> ModelSpec:
    layers = [{"channels": 25, "kernel": 5, "stride": 2, "padding": 1}]
    layers += [{"channels": 25, "kernel": 3, "stride": 2, "padding": 1}] * 2
    return make_spec(arch="cnn", conv=layers, batch_norm=False)


@pytest.mark.parametrize("input_shape", [(40,), (1, 40)])
def test_explicit_conv_layers_reproduce_the_mnist1d_convbase_exactly(input_shape):
    ours, reference = build_model(convbase_spec(), input_shape, 10), mnist1d_convbase()
    assert ours.head.in_features == 125
    shapes = [p.shape for p in ours.parameters()]
    assert shapes == [p.shape for p in reference.parameters()]
    assert sum(p.numel() for p in ours.parameters()) == 5210
    with torch.no_grad():
        for mine, theirs in zip(ours.parameters(), reference.parameters(), strict=True):
            mine.copy_(theirs)
    x = torch.randn(7, *input_shape)
    torch.testing.assert_close(ours(x), reference(x))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_batch_norm_off_means_no_bn_and_layers_keep_their_bias(arch):
    off = build_model(make_spec(arch=arch, batch_norm=False, hidden=[4]), INPUTS["image"], 3)
    on = build_model(make_spec(arch=arch, batch_norm=True, hidden=[4]), INPUTS["image"], 3)
    assert bn_layers(off) == []
    assert all(m.bias is not None for m in off.body.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert len(bn_layers(on)) >= len(on.blocks()) > 0
    # A layer followed by BN needs no bias: BN's shift replaces it.
    assert all(m.bias is None for m in on.body.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet"])
def test_dropout_is_random_in_training_and_off_in_evaluation(arch):
    model = build_model(make_spec(arch=arch, dropout=0.5, batch_norm=False), INPUTS["signal"], 4)
    x = torch.randn(16, *INPUTS["signal"])
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_no_dropout_modules_when_the_rate_is_zero():
    model = build_model(make_spec(arch="cnn", hidden=[8], dropout=0.0), INPUTS["image"], 4)
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_cnn_layers_pool_by_two_until_the_map_is_too_small():
    model = build_model(make_spec(arch="cnn", layers=[4, 6, 5]), (1, 3, 3), 2)
    # 3x3 -> pool -> 1x1 -> no pool -> 1x1 -> no pool: 5 channels of 1x1 reach the head.
    assert model.head.in_features == 5
    model = build_model(make_spec(arch="cnn", layers=[4, 6]), (1, 8, 8), 2)
    assert model.head.in_features == 6 * 2 * 2


def test_explicit_conv_layers_that_do_not_fit_the_input_are_spec_errors():
    with pytest.raises(SpecError, match="model.conv"):
        build_model(make_spec(arch="cnn", conv=[{"channels": 4, "kernel": 9, "padding": 0}]), (1, 5), 2)
    with pytest.raises(SpecError, match="pool"):
        build_model(make_spec(arch="cnn", conv=[{"channels": 4, "pool": 8}]), (1, 5), 2)


def test_resnet_halves_the_map_from_the_second_stage_with_projection_shortcuts():
    model = build_model(make_spec(arch="resnet", layers=[4, 8, 8]), (3, 16, 16), 2)
    stages = [m for m in model.body if isinstance(m, BasicBlock)]
    assert [isinstance(b.shortcut, nn.Identity) for b in stages] == [True, False, False]
    seen = []
    stages[-1].register_forward_hook(lambda m, i, out: seen.append(out.shape))
    model(torch.randn(2, 3, 16, 16))
    assert seen == [(2, 8, 4, 4)]


def test_freeze_blocks_keeps_frozen_batch_norm_in_eval_mode_through_train():
    model = build_model(make_spec(layers=[8, 8, 8]), INPUTS["vector"], 3)
    model.freeze_blocks(2)
    model.train()
    blocks = model.blocks()
    assert model.frozen == 2
    assert [any(p.requires_grad for p in b.parameters()) for b in blocks] == [False, False, True]
    assert [bn_layers(b)[0].training for b in blocks] == [False, False, True]
    assert all(p.requires_grad for p in model.head.parameters())
    model.freeze_blocks(0)
    model.train()
    assert all(p.requires_grad for p in model.parameters()) and all(m.training for m in bn_layers(model))
