"""Transfer learning: loading a source run's weights, freezing blocks bit-for-bit, discriminative learning rates."""

import itertools

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from core.engine.init import initialize
from core.engine.models import Net, build_model
from core.engine.transfer import frozen_block_count, load_pretrained, param_groups
from core.spec import ModelSpec, SpecError, TransferSpec

SHAPE = (1, 8, 8)


def make_net(n_classes: int = 4, seed: int = 0, **overrides) -> Net:
    spec = ModelSpec.model_validate({"arch": "cnn", "layers": [4, 6], "hidden": [8], "dropout": 0.3, **overrides})
    model = build_model(spec, SHAPE, n_classes)
    initialize(model, spec, torch.Generator().manual_seed(seed))
    return model


def make_transfer(**overrides) -> TransferSpec:
    return TransferSpec.model_validate({"from_path": "source.safetensors", **overrides})


def saved(model: nn.Module, tmp_path) -> str:
    path = str(tmp_path / "source.safetensors")
    save_file(model.state_dict(), path)
    return path


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def train_steps(model: Net, groups: list[dict], steps: int = 3) -> None:
    opt = torch.optim.Adam(groups)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, *SHAPE, generator=gen) * 3 + 1, torch.randint(0, 4, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_loading_the_same_architecture_reproduces_the_source(tmp_path):
    source, target = make_net(seed=0), make_net(seed=1)
    info = load_pretrained(target, saved(source, tmp_path))
    assert info["loaded"] == len(source.state_dict()) and info["new_head"] is False
    x = torch.randn(5, *SHAPE)
    torch.testing.assert_close(target.eval()(x), source.eval()(x), rtol=0, atol=0)


def test_a_different_class_count_gets_a_fresh_head_and_the_source_body(tmp_path):
    source, target = make_net(n_classes=4, seed=0), make_net(n_classes=3, seed=1)
    fresh_head = snapshot(target.head)
    info = load_pretrained(target, saved(source, tmp_path))
    assert info["new_head"] is True and info["message"] == "new head: 3 classes"
    assert info["loaded"] == len(source.state_dict()) - 2
    for name, value in source.body.state_dict().items():
        assert torch.equal(target.body.state_dict()[name], value), name
    assert all(torch.equal(target.head.state_dict()[k], v) for k, v in fresh_head.items())


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [({"layers": [4, 7]}, "body.1.0.weight has shape"), ({"layers": [4]}, "missing from the source")],
)
def test_a_different_architecture_is_a_transfer_spec_error(tmp_path, overrides, detail):
    path = saved(make_net(), tmp_path)
    with pytest.raises(SpecError, match=detail) as err:
        load_pretrained(make_net(**overrides), path)
    assert err.value.path == "transfer" and "architecture differs" in err.value.message


def test_a_source_with_extra_layers_is_refused(tmp_path):
    path = saved(make_net(layers=[4, 6], hidden=[8, 8]), tmp_path)
    with pytest.raises(SpecError, match="which this model lacks"):
        load_pretrained(make_net(layers=[4, 6], hidden=[8]), path)


@pytest.mark.parametrize(
    ("overrides", "frozen"),
    [
        ({"freeze": "small"}, 3),
        ({"freeze": "medium"}, 2),
        ({"freeze": "large"}, 0),
        ({"trainable_last": 1}, 2),
        ({"freeze": "small", "trainable_last": 2}, 1),
        ({"trainable_last": 10}, 0),
        ({"trainable_last": 0}, 3),
    ],
)
def test_frozen_block_count(overrides, frozen):
    assert frozen_block_count(make_net(), make_transfer(**overrides)) == frozen


@pytest.mark.parametrize(("freeze", "n_frozen"), [("small", 3), ("medium", 2)])
def test_frozen_blocks_stay_bit_identical_through_training(tmp_path, freeze, n_frozen):
    model = make_net()
    load_pretrained(model, saved(make_net(seed=5), tmp_path))
    model.freeze_blocks(frozen_block_count(model, make_transfer(freeze=freeze)))
    before = [snapshot(b) for b in model.blocks()] + [snapshot(model.head)]
    train_steps(model, param_groups(model, 1e-2, make_transfer(freeze=freeze)))
    after = [snapshot(b) for b in model.blocks()] + [snapshot(model.head)]
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        # Weights, BN affine parameters and BN running statistics alike.
        unchanged = all(torch.equal(b[k], a[k]) for k in b)
        assert unchanged == (i < n_frozen), f"block {i}"


def test_trainable_last_trains_exactly_the_last_blocks(tmp_path):
    model = make_net()
    model.freeze_blocks(frozen_block_count(model, make_transfer(trainable_last=2)))
    before = [snapshot(b) for b in model.blocks()]
    train_steps(model, param_groups(model, 1e-2, None))
    changed = [
        any(not torch.equal(v, snapshot(blk)[k]) for k, v in b.items())
        for b, blk in zip(before, model.blocks(), strict=True)
    ]
    assert changed == [False, True, True]


def test_param_groups_hold_only_trainable_parameters_in_one_group_by_default():
    model = make_net()
    model.freeze_blocks(2)
    (group,) = param_groups(model, 1e-3, make_transfer())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert group["lr"] == 1e-3 and group["name"] == "all"
    assert {id(p) for p in group["params"]} == {id(p) for p in trainable}
    assert len(param_groups(model, 1e-3, None)) == 1


def test_early_lr_factor_spreads_learning_rates_geometrically_up_to_the_head():
    model = make_net()
    groups = param_groups(model, 1e-3, make_transfer(freeze="large", early_lr_factor=0.01))
    lrs = [g["lr"] for g in groups]
    assert [g["name"] for g in groups] == ["block0", "block1", "block2", "head"]
    assert lrs[0] == pytest.approx(1e-5) and lrs[-1] == 1e-3
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert ratios == pytest.approx([100 ** (1 / 3)] * 3)
    torch.optim.Adam(groups)  # the groups are valid optimizer input


def test_discriminative_rates_start_at_the_first_trainable_block():
    model = make_net()
    model.freeze_blocks(2)
    groups = param_groups(model, 1e-3, make_transfer(early_lr_factor=0.1))
    assert [(g["name"], g["lr"]) for g in groups] == [("block2", pytest.approx(1e-4)), ("head", 1e-3)]
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
