"""Batched augmentation: per-example draws, probabilities, reproducibility, and raw-unit semantics."""

import pytest
import torch

from core.engine.augment import Augmenter
from core.spec import AugmentSpec, SpecError

SHIFT, SCALE = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1), torch.tensor([2.0, 0.5, 3.0]).view(3, 1, 1)


def make_augmenter(kind="image", channels=3, shift=None, scale=None, **parts) -> Augmenter:
    shift = SHIFT[:channels] if shift is None else shift
    scale = SCALE[:channels] if scale is None else scale
    return Augmenter(AugmentSpec.model_validate(parts), kind, shift, scale)


def batch(*shape, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(aug: Augmenter, x: torch.Tensor, seed=0) -> torch.Tensor:
    return aug(x, torch.Generator(x.device).manual_seed(seed))


def raw(x: torch.Tensor, channels=3) -> torch.Tensor:
    return x * SCALE[:channels] + SHIFT[:channels]


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Which examples differ at all."""
    return (a != b).flatten(1).any(1)


ALL_P1 = {
    "crop": {"scale": (0.5, 0.9), "p": 1},
    "rotate": {"degrees": 30, "p": 1},
    "flip": {"horizontal": True, "vertical": True, "p": 1},
    "color": {"brightness": 0.3, "saturation": 0.3, "hue": 0.1, "p": 1},
    "contrast": {"range": (0.5, 1.5), "p": 1},
    "noise": {"std": 0.1, "p": 1},
}


def test_nothing_on_or_every_p_zero_is_disabled_and_returns_the_batch():
    x = batch(8, 3, 6, 6)
    assert not make_augmenter().enabled
    off = make_augmenter(**{name: {**part, "p": 0} for name, part in ALL_P1.items()})
    assert not off.enabled and torch.equal(run(off, x), x)


def test_p_one_changes_every_example_and_keeps_shape_dtype_device():
    for dtype in (torch.float32, torch.float64):
        x = batch(16, 3, 8, 10).to(dtype)
        y = run(make_augmenter(**ALL_P1), x)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert changed(x, y).all()


def test_same_seed_same_output_other_seed_other_output():
    aug, x = make_augmenter(**ALL_P1), batch(8, 3, 8, 8)
    assert torch.equal(run(aug, x, seed=3), run(aug, x, seed=3))
    assert not torch.equal(run(aug, x, seed=3), run(aug, x, seed=4))


def test_flip_is_drawn_per_example():
    x = batch(64, 3, 5, 5)
    y = run(make_augmenter(flip={"horizontal": True, "p": 0.5}), x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped | kept).all() and 10 < flipped.sum() < 54


def test_signal_flip_mirrors_the_length_axis():
    x = batch(32, 2, 12)
    y = run(make_augmenter("signal", channels=2, flip={"horizontal": True, "p": 0.5}), x)
    assert ((y == x.flip(-1)).flatten(1).all(1) | (y == x).flatten(1).all(1)).all()
    assert changed(x, y).any() and not changed(x, y).all()


@pytest.mark.parametrize("part", ["crop", "rotate", "color", "contrast", "noise"])
def test_unselected_examples_stay_bit_equal(part):
    x = batch(64, 3, 7, 9)  # odd sizes: resampling at pixel centres is not exact there
    y = run(make_augmenter(**{part: {**ALL_P1[part], "p": 0.5}}), x)
    moved = changed(x, y)
    assert 10 < moved.sum() < 54


@pytest.mark.parametrize("part", ["crop", "rotate"])
def test_geometry_differs_per_example(part):
    x = batch(1, 3, 12, 12).expand(16, -1, -1, -1).contiguous()  # one image, sixteen copies
    y = run(make_augmenter(**{part: ALL_P1[part]}), x)
    assert torch.cdist(y.flatten(1), y.flatten(1)).fill_diagonal_(1.0).min() > 1e-3


def test_full_size_crop_is_identity_and_folded_flip_is_a_mirror():
    x = batch(4, 3, 6, 9)
    full = {"scale": (1.0, 1.0), "ratio": (1.5, 1.5), "p": 1}
    assert torch.allclose(run(make_augmenter(crop=full), x), x, atol=1e-5)
    y = run(make_augmenter(crop=full, flip={"horizontal": True, "vertical": True, "p": 1}), x)
    assert torch.allclose(y, x.flip(-1).flip(-2), atol=1e-5)


def test_small_crop_zooms_in():
    ramp = torch.linspace(0, 1, 32).expand(8, 3, 32, 32)
    y = run(
        make_augmenter(
            shift=torch.zeros(3, 1, 1), scale=torch.ones(3, 1, 1), crop={"scale": (0.25, 0.25), "ratio": (1, 1), "p": 1}
        ),
        ramp,
    )
    span = y.amax((1, 2, 3)) - y.amin((1, 2, 3))
    assert torch.allclose(span, torch.full((8,), 0.5), atol=0.05)  # half the width is seen


def test_noise_std_is_in_raw_units():
    x = torch.zeros(256, 3, 16, 16)
    y = run(make_augmenter(noise={"std": 0.5, "p": 1}), x)
    raw_noise = (raw(y) - raw(x)).transpose(0, 1).reshape(3, -1)
    assert torch.allclose(raw_noise.std(1), torch.full((3,), 0.5), rtol=0.03)


def test_contrast_scales_around_each_examples_raw_mean():
    x = batch(32, 3, 8, 8)
    y = run(make_augmenter(contrast={"range": (0.5, 1.5), "p": 1}), x)
    rx, ry = raw(x).flatten(1), raw(y).flatten(1)
    assert torch.allclose(ry.mean(1), rx.mean(1), atol=1e-4)
    factor = (ry - ry.mean(1, keepdim=True)).norm(dim=1) / (rx - rx.mean(1, keepdim=True)).norm(dim=1)
    assert (factor > 0.5 - 1e-4).all() and (factor < 1.5 + 1e-4).all() and factor.std() > 0.05


def test_brightness_multiplies_raw_values_on_one_channel():
    shift, scale = torch.full((1, 1, 1), 3.0), torch.full((1, 1, 1), 2.0)
    x = batch(32, 1, 6, 6)
    y = run(make_augmenter(channels=1, shift=shift, scale=scale, color={"brightness": 0.4, "p": 1}), x)
    ratio = ((y * 2 + 3) / (x * 2 + 3)).flatten(1)
    assert torch.allclose(ratio.std(1), torch.zeros(32), atol=1e-4)
    assert (ratio.mean(1) > 0.6 - 1e-4).all() and (ratio.mean(1) < 1.4 + 1e-4).all()


def test_saturation_and_hue_keep_grey_grey_and_keep_luma():
    luma = torch.tensor([0.299, 0.587, 0.114])
    colour = {"brightness": 0.0, "saturation": 0.5, "hue": 0.2, "p": 1}
    grey = batch(16, 1, 5, 5).expand(16, 3, 5, 5)  # raw values, equal in R, G and B
    x = (grey - SHIFT) / SCALE
    y_raw = raw(run(make_augmenter(color=colour), x))
    assert torch.allclose(y_raw, grey, atol=1e-4)
    x = batch(16, 3, 5, 5)
    y_raw = raw(run(make_augmenter(color=colour), x))
    assert torch.allclose(
        torch.einsum("c,bchw->bhw", luma, y_raw), torch.einsum("c,bchw->bhw", luma, raw(x)), atol=1e-3
    )
    assert changed(x, (y_raw - SHIFT) / SCALE).all()


def test_image_only_parts_are_refused_for_other_inputs():
    with pytest.raises(SpecError) as e:
        make_augmenter("vector", channels=1, rotate={"degrees": 5})
    assert e.value.path == "data.augment.rotate"
    assert make_augmenter("vector", shift=torch.zeros(4), scale=torch.ones(4), noise={"std": 1}).enabled
