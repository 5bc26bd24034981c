"""Batched training-time augmentation on the device: per-example random parameters, all drawn from one generator.

Inputs arrive normalized (x = (raw - shift) / scale). Colour, contrast and noise are defined in raw input units;
since each is linear per example, it is folded into one per-example gain/bias (or 3x3 channel mix) that acts on the
normalized batch directly, which equals denormalize -> apply -> renormalize without the two extra passes.
Examples that a coin leaves alone get an exact identity (gain 1, bias 0, or torch.where), so they stay bit-equal.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from core.engine.data import check_augment
from core.spec import AugmentSpec, ColorSpec, ContrastSpec, CropSpec, FlipSpec, NoiseSpec, RotateSpec

# Columns of the one uniform draw per call: a fixed layout keeps streams reproducible whatever is enabled.
(CROP_P, CROP_AREA, CROP_RATIO, CROP_X, CROP_Y, ROT_P, ROT_ANGLE, FLIP_H, FLIP_V,
 COLOR_P, BRIGHT, SAT, HUE, CONTRAST_P, CONTRAST, NOISE_P, N_DRAWS) = range(17)  # fmt: skip

# RGB -> YIQ (NTSC). Y is the grey level: scaling I,Q blends with grey (saturation), rotating them turns the hue.
_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
RGB_TO_YIQ, YIQ_TO_RGB = _YIQ.float(), torch.linalg.inv(_YIQ).float()
_Part = TypeVar("_Part", CropSpec, RotateSpec, FlipSpec, ColorSpec, ContrastSpec, NoiseSpec)


class Augmenter:
    """Applies the enabled augmentations of an AugmentSpec to a normalized batch, in AugmentSpec.enabled() order."""

    def __init__(self, spec: AugmentSpec, kind: str, shift: Tensor, scale: Tensor):
        check_augment(spec, kind)
        self.spec, self.kind = spec, kind
        self.shift, self.scale = shift.float(), scale.float()
        # The parts that can act (p = 0 costs nothing); None for the others.
        self.crop, self.rotate, self.flip = _active(spec.crop), _active(spec.rotate), _active(spec.flip)
        self.color, self.contrast, self.noise = _active(spec.color), _active(spec.contrast), _active(spec.noise)
        self.enabled = any(getattr(self, name) for name in spec.enabled())
        self._geometric = kind == "image" and bool(self.crop or self.rotate)
        self._fold_flip = self._geometric and self.flip is not None  # a flip is free inside the crop/rotate grid

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A new augmented batch with the same shape, dtype and device as `x`."""
        if not self.enabled:
            return x
        u = torch.rand(x.shape[0], N_DRAWS, generator=generator, device=x.device)
        if self._geometric:
            x = self._affine(x, u)
        if self.flip and not self._fold_flip:
            x = self._flip(x, u, self.flip)
        if self.color or self.contrast:
            x = self._gain_bias(x, u)
        if self.noise:
            x = self._noise(x, u, generator, self.noise)
        return x

    # ------------------------------------------------------------------------------------- geometry

    def _affine(self, x: Tensor, u: Tensor) -> Tensor:
        """Crop, rotation and flips as one sampling grid, so each image is resampled once."""
        b, _, h, w = x.shape
        theta, hit = self._theta(u, h, w)
        # Output pixel centres (align_corners=False) mapped into the input; cheaper than F.affine_grid on CPU.
        xs = (torch.arange(w, device=x.device) * 2 + 1) / w - 1
        ys = ((torch.arange(h, device=x.device) * 2 + 1) / h - 1)[:, None]
        t = theta[:, :, None, None]
        grid = torch.stack([t[:, 0] * xs + (t[:, 1] * ys + t[:, 2]), t[:, 3] * xs + (t[:, 4] * ys + t[:, 5])], -1)
        out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.where(_per_example(hit, x), out, x)

    def _theta(self, u: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Per-example output -> input affine map (B, 6) in grid units [-1, 1], and which examples it moves."""
        crop, rotate, flip = self.crop, self.rotate, self.flip if self._fold_flip else None
        one, zero = u.new_ones(u.shape[0]), u.new_zeros(u.shape[0])
        sx, sy, tx, ty, cos, sin, fx, fy = one, one, zero, zero, one, zero, one, one
        hit = torch.zeros_like(one, dtype=torch.bool)
        if crop:
            on = u[:, CROP_P] < crop.p
            area = _between(u[:, CROP_AREA], *crop.scale)
            ratio = torch.exp(_between(u[:, CROP_RATIO], math.log(crop.ratio[0]), math.log(crop.ratio[1])))
            # Box sides as fractions of the image; h/w turns the pixel aspect ratio into fractions.
            sx = torch.where(on, (area * ratio * h / w).sqrt().clamp(max=1.0), one)
            sy = torch.where(on, (area / ratio * w / h).sqrt().clamp(max=1.0), one)
            tx, ty = (1 - sx) * (2 * u[:, CROP_X] - 1), (1 - sy) * (2 * u[:, CROP_Y] - 1)
            hit = hit | on
        if rotate:
            on = u[:, ROT_P] < rotate.p
            angle = torch.deg2rad(torch.where(on, _between(u[:, ROT_ANGLE], -rotate.degrees, rotate.degrees), zero))
            cos, sin = angle.cos(), angle.sin()
            hit = hit | on
        if flip and flip.horizontal:
            on = u[:, FLIP_H] < flip.p
            fx, hit = torch.where(on, -one, one), hit | on
        if flip and flip.vertical:
            on = u[:, FLIP_V] < flip.p
            fy, hit = torch.where(on, -one, one), hit | on
        # in = S R F out + t: flip the output, rotate it (pixels kept square), then scale and shift into the box.
        theta = [sx * cos * fx, -sx * sin * fy * h / w, tx, sy * sin * fx * w / h, sy * cos * fy, ty]
        return torch.stack(theta, 1), hit

    def _flip(self, x: Tensor, u: Tensor, flip: FlipSpec) -> Tensor:
        if flip.horizontal:  # the last axis: image width, or signal length
            x = torch.where(_per_example(u[:, FLIP_H] < flip.p, x), x.flip(-1), x)
        if flip.vertical:
            x = torch.where(_per_example(u[:, FLIP_V] < flip.p, x), x.flip(-2), x)
        return x

    # ------------------------------------------------------------------------------------ intensity

    def _gain_bias(self, x: Tensor, u: Tensor) -> Tensor:
        """Colour then contrast, as x' = G x + t per example (G a scalar gain or a 3x3 channel mix)."""
        b, c = x.shape[:2]
        s, sh = self.scale.reshape(-1), self.shift.reshape(-1)  # per channel (images/signals)
        color = self.color
        if color and c == 3 and (color.saturation > 0 or color.hue > 0):
            gain, bias = self._colour_mix(u, s, sh, color)
        else:
            gain, bias = self._brightness(u, s, sh, c, color)
        if self.contrast:
            gain, bias = self._contrast(x, u, gain, bias, s, sh, self.contrast)
        if gain.dim() == 3:
            return torch.baddbmm(bias.to(x.dtype).unsqueeze(-1), gain.to(x.dtype), x.reshape(b, c, -1)).view_as(x)
        return torch.addcmul(_expand(bias, x), x, _per_example(gain, x).to(x.dtype))

    def _brightness(self, u: Tensor, s: Tensor, sh: Tensor, c: int, color: ColorSpec | None) -> tuple[Tensor, Tensor]:
        gain = u.new_ones(u.shape[0])
        if color and color.brightness > 0:
            factor = _between(u[:, BRIGHT], 1 - color.brightness, 1 + color.brightness)
            gain = torch.where(u[:, COLOR_P] < color.p, factor, gain)
        # raw' = g raw  ->  x' = g x + (g - 1) shift / scale
        return gain, (gain - 1)[:, None] * (sh / s).expand(c)

    def _colour_mix(self, u: Tensor, s: Tensor, sh: Tensor, color: ColorSpec) -> tuple[Tensor, Tensor]:
        b = u.shape[0]
        bright = _between(u[:, BRIGHT], 1 - color.brightness, 1 + color.brightness)
        sat = _between(u[:, SAT], 1 - color.saturation, 1 + color.saturation)
        turn = _between(u[:, HUE], -color.hue, color.hue) * (2 * math.pi)
        k = torch.zeros(b, 3, 3, device=u.device)
        k[:, 0, 0] = 1
        k[:, 1, 1], k[:, 1, 2] = sat * turn.cos(), -sat * turn.sin()
        k[:, 2, 1], k[:, 2, 2] = sat * turn.sin(), sat * turn.cos()
        mix = (YIQ_TO_RGB.to(u.device) @ k @ RGB_TO_YIQ.to(u.device)) * bright[:, None, None]  # raw-space mix
        eye = torch.eye(3, device=u.device).expand(b, 3, 3)
        mix = torch.where((u[:, COLOR_P] < color.p)[:, None, None], mix, eye)
        # raw' = M raw  ->  x' = (D^-1 M D) x + D^-1 (M shift - shift), D = diag(scale)
        gain = mix * s[None, None, :] / s[None, :, None]
        bias = ((mix @ sh) - sh) / s
        return gain, bias

    def _contrast(self, x: Tensor, u: Tensor, gain: Tensor, bias: Tensor, s: Tensor, sh: Tensor,
                  contrast: ContrastSpec) -> tuple[Tensor, Tensor]:  # fmt: skip
        """raw' = c (raw - m) + m with m the raw per-example mean, folded into the colour map before it."""
        c = torch.where(u[:, CONTRAST_P] < contrast.p, _between(u[:, CONTRAST], *contrast.range), u.new_ones(1))
        xm = x.float().mean(dim=tuple(range(2, x.dim())))  # (B, C): the map is linear, so means map through it
        x1m = (gain @ xm.unsqueeze(-1)).squeeze(-1) + bias if gain.dim() == 3 else gain[:, None] * xm + bias
        m = (x1m * s + sh).mean(1, keepdim=True)  # raw mean over channels and positions
        # x'' = c x' + (1 - c)(m - shift) / scale
        new_bias = c[:, None] * bias + (1 - c)[:, None] * (m - sh) / s
        new_gain = c[:, None, None] * gain if gain.dim() == 3 else c * gain
        return new_gain, new_bias

    def _noise(self, x: Tensor, u: Tensor, generator: torch.Generator, noise: NoiseSpec) -> Tensor:
        # std is in raw input units; one raw unit is 1/scale in normalized units.
        std = _per_example((u[:, NOISE_P] < noise.p).float() * noise.std, x) / self.scale
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return torch.addcmul(x, z, std.to(x.dtype))


def _active(part: _Part | None) -> _Part | None:
    return part if part is not None and part.p > 0 else None


def _between(u: Tensor, low: float, high: float) -> Tensor:
    return low + (high - low) * u


def _per_example(v: Tensor, x: Tensor) -> Tensor:
    return v.view(-1, *([1] * (x.dim() - 1)))


def _expand(bias: Tensor, x: Tensor) -> Tensor:
    # (B, C) -> (B, C, 1, ...) so that it broadcasts over positions.
    return bias.view(*bias.shape, *([1] * (x.dim() - 2))).to(x.dtype)
