"""The networks a ModelSpec describes (linear, MLP, 1-D/2-D CNN, ResNet) as a body of blocks plus a head."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from core.spec import ConvLayerSpec, ModelSpec, SpecError

# Dropout rule, the same for every arch: a Dropout follows each dense hidden layer, and in cnn/resnet one more
# acts on the flattened features, so the rate always applies before the head. Conv feature maps get none.
# A layer followed by BatchNorm has no bias: BN's own shift makes it redundant.


class Net(nn.Module):
    """Feature body (blocks and parameterless modules in order) followed by a linear classifier head."""

    def __init__(self, body: nn.Sequential, head: nn.Linear, conv2d: bool):
        super().__init__()
        self.body = body
        self.head = head
        self.conv2d = conv2d
        self._frozen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def blocks(self) -> list[nn.Module]:
        """The body's parameter-bearing blocks in order: hidden layers, conv layers, stem, residual blocks."""
        return [m for m in self.body if any(True for _ in m.parameters())]

    @property
    def frozen(self) -> int:
        return self._frozen

    def freeze_blocks(self, n_frozen: int) -> None:
        """Freeze the first n blocks (weights and BN statistics); the others and the head train."""
        blocks = self.blocks()
        self._frozen = max(0, min(n_frozen, len(blocks)))
        for i, block in enumerate(blocks):
            block.requires_grad_(i >= self._frozen)
        self.head.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> Net:
        super().train(mode)
        # Frozen BN layers keep normalizing with the source's statistics; in train mode they would overwrite them.
        for block in self.blocks()[: self._frozen]:
            for m in block.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def build_model(spec: ModelSpec, input_shape: tuple[int, ...], n_classes: int) -> Net:
    """Build the network for examples of `input_shape` ((C,H,W) image, (C,L) signal, (F,) vector)."""
    input_shape = tuple(int(d) for d in input_shape)
    if not 1 <= len(input_shape) <= 3:
        raise SpecError("model", f"inputs must be vectors, signals or images, not shape {input_shape}")
    if spec.arch in ("linear", "mlp"):
        layers: list[nn.Module] = [nn.Flatten()]
        widths = spec.layers if spec.arch == "mlp" else []
        conv2d = False
    else:
        # A vector is read as a one-channel signal.
        shape = (1, *input_shape) if len(input_shape) == 1 else input_shape
        layers = [nn.Unflatten(1, shape)] if len(input_shape) == 1 else []
        make = _conv_blocks if spec.arch == "cnn" else _resnet_blocks
        layers += make(spec, shape[0], list(shape[1:]))
        layers.append(nn.Flatten())
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        widths = spec.hidden
        conv2d = len(shape) == 3
    n_features = _n_features(nn.Sequential(*layers), input_shape)
    layers += _dense_blocks(spec, n_features, widths)
    n_features = widths[-1] if widths else n_features
    return Net(nn.Sequential(*layers), nn.Linear(n_features, n_classes), conv2d)


def count_blocks(spec: ModelSpec) -> int:
    """How many blocks build_model gives for this spec (without building it)."""
    if spec.arch == "linear":
        return 0
    if spec.arch == "mlp":
        return len(spec.layers)
    if spec.arch == "cnn":
        return len(spec.conv or spec.layers) + len(spec.hidden)
    return 1 + len(spec.layers) + len(spec.hidden)


def _n_features(features: nn.Sequential, input_shape: tuple[int, ...]) -> int:
    # A dummy example through the feature layers gives the flattened width; eval so BN leaves its stats alone.
    with torch.no_grad():
        out = features.eval()(torch.zeros(1, *input_shape))
    features.train()
    return int(out.shape[1])


def _activation(spec: ModelSpec) -> nn.Module:
    return ACTIVATIONS[spec.activation]()


def _dense_blocks(spec: ModelSpec, n_in: int, widths: Sequence[int]) -> list[nn.Module]:
    blocks: list[nn.Module] = []
    for width in widths:
        layers: list[nn.Module] = [nn.Linear(n_in, width, bias=not spec.batch_norm)]
        if spec.batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(_activation(spec))
        if spec.dropout > 0:
            layers.append(nn.Dropout(spec.dropout))
        blocks.append(nn.Sequential(*layers))
        n_in = width
    return blocks


def _conv_blocks(spec: ModelSpec, channels: int, size: list[int]) -> list[nn.Module]:
    explicit = spec.conv is not None
    # The `layers` shorthand: 3x3 convs, each followed by a 2x pool while the map is big enough for one.
    shorthand = [ConvLayerSpec.model_construct(channels=w, kernel=3, stride=1, padding=1, pool=2) for w in spec.layers]
    blocks: list[nn.Module] = []
    for i, layer in enumerate(spec.conv or shorthand):
        padding = layer.kernel // 2 if layer.padding is None else layer.padding
        size = [(s + 2 * padding - layer.kernel) // layer.stride + 1 for s in size]
        if min(size) < 1:
            raise SpecError("model.conv" if explicit else "model.layers", f"layer {i} shrinks the input to nothing")
        pool = layer.pool
        if pool > 1 and min(size) < pool:
            if explicit:
                raise SpecError("model.conv", f"layer {i}: pool {pool} is larger than its {size} feature map")
            pool = 1
        size = [s // pool for s in size]
        blocks.append(_conv_block(spec, len(size), channels, layer.channels, layer.kernel, layer.stride, padding, pool))
        channels = layer.channels
    return blocks


def _conv_block(
    spec: ModelSpec, dims: int, c_in: int, c_out: int, kernel: int, stride: int, padding: int, pool: int
) -> nn.Sequential:
    conv, bn, maxpool = _conv_types(dims)
    layers: list[nn.Module] = [conv(c_in, c_out, kernel, stride, padding, bias=not spec.batch_norm)]
    if spec.batch_norm:
        layers.append(bn(c_out))
    layers.append(_activation(spec))
    if pool > 1:
        layers.append(maxpool(pool))
    return nn.Sequential(*layers)


def _conv_types(dims: int) -> tuple[type, type, type]:
    if dims == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN, added to an identity or 1x1-conv shortcut."""

    def __init__(self, spec: ModelSpec, dims: int, c_in: int, c_out: int, stride: int):
        super().__init__()
        conv, bn, _ = _conv_types(dims)
        bias = not spec.batch_norm
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=bias)
        self.bn1 = bn(c_out) if spec.batch_norm else nn.Identity()
        self.act1 = _activation(spec)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = bn(c_out) if spec.batch_norm else nn.Identity()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(conv(c_in, c_out, 1, stride, 0, bias=bias))
            if spec.batch_norm:
                self.shortcut.append(bn(c_out))
        self.act2 = _activation(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


def _resnet_blocks(spec: ModelSpec, channels: int, size: list[int]) -> list[nn.Module]:
    dims = len(size)
    blocks: list[nn.Module] = [_conv_block(spec, dims, channels, spec.layers[0], 3, 1, 1, pool=1)]
    channels = spec.layers[0]
    for i, width in enumerate(spec.layers):
        blocks.append(BasicBlock(spec, dims, channels, width, stride=1 if i == 0 else 2))
        channels = width
    pool = nn.AdaptiveAvgPool1d(1) if dims == 1 else nn.AdaptiveAvgPool2d(1)
    return [*blocks, pool]
