"""The `nn.Module` of each Darknet layer kind, with Darknet's forward semantics.

Modules that read saved outputs of earlier layers ([route], [shortcut], [sam], [scale_channels])
derive from `ReadsOutputs`: `forward(outputs)` gets the list of layer outputs and reads
`self.sources` (absolute layer indices, the previous layer first where Darknet reads it). The
others take the previous layer's output. Builders live in models.kinds; this module only knows
tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import YoloCompressError
from .block import Block

__all__ = ["ACTIVATIONS", "activation", "ConvLayer", "MaxPoolLayer", "UpsampleLayer",
           "AvgPoolLayer", "ReadsOutputs", "RouteLayer", "ShortcutLayer", "SamLayer",
           "ScaleChannelsLayer", "YoloLayer"]


class HardMish(nn.Module):
    """Darknet's hard_mish: x for x > 0, x²/2 + x on (-2, 0], 0 below."""
    def forward(self, x):
        return torch.where(x > 0, x, torch.where(x > -2, x * x / 2 + x, torch.zeros_like(x)))


# Darknet activation name -> module factory; leaky is Darknet's 0.1 slope.
ACTIVATIONS = {
    "linear": nn.Identity,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "mish": nn.Mish,           # x * tanh(softplus(x)), fused
    "hard_mish": HardMish,
    "logistic": nn.Sigmoid,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "elu": nn.ELU,             # Darknet: x for x >= 0, exp(x) - 1 below (alpha 1)
    "gelu": lambda: nn.GELU(approximate="tanh"),   # Darknet's tanh approximation
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def activation(b: Block, default: str) -> nn.Module:
    """The module of `b`'s `activation=` (models.kinds has checked the name)."""
    name = b.get("activation", default)
    if name not in ACTIVATIONS:
        raise YoloCompressError(f"{b.where('activation')}: unsupported activation '{name}' "
                                f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class ConvLayer(nn.Module):
    def __init__(self, b: Block, in_ch: int, padding: int):
        super().__init__()
        k, n = b.get_int("size"), b.get_int("filters")
        self.bn_enabled = bool(b.get_int("batch_normalize", 0))
        self.conv = nn.Conv2d(in_ch, n, k, b.get_int("stride", 1), padding,
                              groups=b.get_int("groups", 1), bias=not self.bn_enabled)
        if self.bn_enabled:
            self.bn = nn.BatchNorm2d(n, eps=1e-5, momentum=0.03)
        self.act = activation(b, "logistic")

    def forward(self, x):
        x = self.conv(x)
        if self.bn_enabled:
            x = self.bn(x)
        return self.act(x)


class MaxPoolLayer(nn.Module):
    """Darknet maxpool: total padding `pad`, pad//2 before, the rest after, with -inf."""
    def __init__(self, size: int, stride: int, pad: int):
        super().__init__()
        self.size, self.stride = size, stride
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class UpsampleLayer(nn.Module):
    """Nearest-neighbour upsampling by `stride`, times Darknet's `scale`."""
    def __init__(self, stride: int, scale: float = 1.0):
        super().__init__()
        self.stride, self.scale = stride, scale

    def forward(self, x):
        x = F.interpolate(x, scale_factor=self.stride, mode="nearest")
        return x if self.scale == 1.0 else x * self.scale


class AvgPoolLayer(nn.Module):
    """Darknet [avgpool]: the mean of each channel over the whole map, (B, C, 1, 1)."""
    def forward(self, x):
        return x.mean(dim=(2, 3), keepdim=True)


class ReadsOutputs(nn.Module):
    """A layer that reads saved outputs of earlier layers (`sources`)."""
    sources: list[int]


class RouteLayer(ReadsOutputs):
    def __init__(self, sources: list[int], slices: list[tuple[int, int]], channels: list[int]):
        super().__init__()
        self.sources = sources
        self.slices = slices
        self.full = [s == (0, c) for s, c in zip(slices, channels)]

    def forward(self, outputs: list):
        parts = [outputs[s] if full else outputs[s][:, lo:hi]
                 for s, full, (lo, hi) in zip(self.sources, self.full, self.slices)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ShortcutLayer(ReadsOutputs):
    """Darknet's shortcut_multilayer: the previous layer's map plus, on the channels both have,
    each `from` map; the output keeps the previous layer's channel count."""
    def __init__(self, b: Block, sources: list[int], channels: list[int]):
        super().__init__()
        self.sources = sources
        self.channels = channels
        self.act = activation(b, "linear")

    def forward(self, outputs: list):
        x = outputs[self.sources[0]]
        c = self.channels[0]
        for s, cs in zip(self.sources[1:], self.channels[1:]):
            y = outputs[s]
            if cs == c:
                x = x + y
            elif cs > c:
                x = x + y[:, :c]
            else:
                x = torch.cat([x[:, :cs] + y, x[:, cs:]], 1)
        return self.act(x)


class SamLayer(ReadsOutputs):
    """Darknet [sam]: act(previous * from), elementwise on equal shapes."""
    def __init__(self, b: Block, sources: list[int]):
        super().__init__()
        self.sources = sources
        self.act = activation(b, "linear")

    def forward(self, outputs: list):
        return self.act(outputs[self.sources[0]] * outputs[self.sources[1]])


class ScaleChannelsLayer(ReadsOutputs):
    """Darknet [scale_channels]: act(from * previous), the previous (B, C, 1, 1) map scaling each
    channel (or with scale_wh=1 a (B, 1, H, W) map scaling each position)."""
    def __init__(self, b: Block, sources: list[int]):
        super().__init__()
        self.sources = sources
        self.act = activation(b, "linear")

    def forward(self, outputs: list):
        return self.act(outputs[self.sources[1]] * outputs[self.sources[0]])


class YoloLayer(nn.Module):
    """Pass-through: the raw conv output is the head output; decode lives in `models.yolo`."""
    def forward(self, x):
        return x
