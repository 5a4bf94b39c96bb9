"""Blocks -> `nn.Module` with Darknet's semantics.

`Darknet(blocks)(x)` returns the raw head outputs, one (B, A*(5+C), H, W) tensor per [yolo] layer
in cfg order; `forward(x, features=["conv54", ...])` also returns those layers' outputs by name.
Parameters live under `layers.<index>.conv/bn` so state_dict keys follow cfg indices.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import YoloCompressError
from .cfg import Block, resolve_sources, set_classes, yolo_mask
from .heads import HeadSpec
from .profile import conv_padding, layer_shapes, maxpool_padding, route_slice
from .roles import LayerInfo, describe_layers

__all__ = ["Darknet", "ACTIVATIONS", "heads_from_blocks"]


# Darknet activation name -> module factory; leaky is Darknet's 0.1 slope.
ACTIVATIONS = {
    "linear": nn.Identity,
    "leaky": lambda: nn.LeakyReLU(0.1),
    "mish": nn.Mish,           # x * tanh(softplus(x)), fused
    "logistic": nn.Sigmoid,
    "relu": nn.ReLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
}


def _activation(b: Block, default: str) -> nn.Module:
    name = b.get("activation", default)
    if name not in ACTIVATIONS:
        raise YoloCompressError(f"{b.where('activation')}: unsupported activation '{name}' "
                                f"(supported: {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class ConvLayer(nn.Module):
    def __init__(self, b: Block, in_ch: int):
        super().__init__()
        k, n = b.get_int("size"), b.get_int("filters")
        self.bn_enabled = bool(b.get_int("batch_normalize", 0))
        self.conv = nn.Conv2d(in_ch, n, k, b.get_int("stride", 1), conv_padding(b),
                              groups=b.get_int("groups", 1), bias=not self.bn_enabled)
        if self.bn_enabled:
            self.bn = nn.BatchNorm2d(n, eps=1e-5, momentum=0.03)
        self.act = _activation(b, "logistic")

    def forward(self, x):
        x = self.conv(x)
        if self.bn_enabled:
            x = self.bn(x)
        return self.act(x)


class MaxPoolLayer(nn.Module):
    """Darknet maxpool: total padding `padding` (default size-1), pad//2 before, the rest after, -inf."""
    def __init__(self, b: Block):
        super().__init__()
        self.size = b.get_int("size", b.get_int("stride", 1))
        self.stride = b.get_int("stride", 1)
        pad = maxpool_padding(b)
        self.pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x):
        if any(self.pad):
            x = F.pad(x, self.pad, value=float("-inf"))
        return F.max_pool2d(x, self.size, self.stride)


class UpsampleLayer(nn.Module):
    def __init__(self, b: Block):
        super().__init__()
        self.stride = b.get_int("stride", 2)
        if self.stride < 1:
            raise YoloCompressError(f"{b.where('stride')}: [upsample] stride must be >= 1")

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.stride, mode="nearest")


class RouteLayer(nn.Module):
    def __init__(self, b: Block, sources: list[int], channels: list[int]):
        super().__init__()
        self.sources = sources
        self.slices = [route_slice(b, c) for c in channels]
        self.full = [s == (0, c) for s, c in zip(self.slices, channels)]

    def forward(self, outputs: list):
        parts = [outputs[s] if full else outputs[s][:, lo:hi]
                 for s, full, (lo, hi) in zip(self.sources, self.full, self.slices)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ShortcutLayer(nn.Module):
    def __init__(self, b: Block, sources: list[int]):
        super().__init__()
        self.sources = sources
        self.act = _activation(b, "linear")

    def forward(self, outputs: list):
        x = outputs[self.sources[0]]
        for s in self.sources[1:]:
            x = x + outputs[s]
        return self.act(x)


class YoloLayer(nn.Module):
    """Pass-through: the raw conv output is the head output; decode lives in `models.yolo`."""
    def forward(self, x):
        return x


def heads_from_blocks(blocks: list[Block], infos: list[LayerInfo]) -> list[HeadSpec]:
    """One HeadSpec per [yolo] block, in cfg order."""
    heads = []
    for i, b in enumerate(blocks[1:]):
        if b.type != "yolo":
            continue
        anchors = np.asarray(b.get_floats("anchors"), dtype=np.float32)
        if len(anchors) % 2:
            raise YoloCompressError(f"{b.where('anchors')}: anchors must be w,h pairs")
        mask = tuple(yolo_mask(b))
        classes = b.get_int("classes", 80)
        conv_out = blocks[i].get_int("filters") if i > 0 and blocks[i].type == "convolutional" else -1
        if conv_out != (classes + 5) * len(mask):
            raise YoloCompressError(
                f"{b.where()}: [yolo] at layer {i} expects {(classes + 5) * len(mask)} channels "
                f"((classes {classes} + 5) x {len(mask)} anchors) but the conv before it has "
                f"filters={conv_out}")
        heads.append(HeadSpec(
            name=infos[i].name, index=i, stride=infos[i].stride, classes=classes, mask=mask,
            all_anchors=anchors.reshape(-1, 2),
            scale_x_y=b.get_float("scale_x_y", 1.0),
            new_coords=bool(b.get_int("new_coords", 0)),
            iou_thresh=b.get_float("iou_thresh", 1.0),
            ignore_thresh=b.get_float("ignore_thresh", 0.5),
            truth_thresh=b.get_float("truth_thresh", 1.0),
            iou_normalizer=b.get_float("iou_normalizer", 0.75),
            cls_normalizer=b.get_float("cls_normalizer", 1.0),
            obj_normalizer=b.get_float("obj_normalizer", 1.0),
            iou_loss=b.get("iou_loss", "mse"),
            max_delta=b.get_float("max_delta", float("inf")),
        ))
    return heads


class Darknet(nn.Module):
    """A Darknet cfg as a PyTorch module. `classes` rewrites the heads before building."""

    def __init__(self, blocks: list[Block], classes: int | None = None):
        super().__init__()
        if classes is not None:
            blocks = set_classes(blocks, classes)
        self.blocks = blocks
        self.net = blocks[0]
        self.infos = describe_layers(blocks)
        self.heads = heads_from_blocks(blocks, self.infos)
        if not self.heads:
            raise YoloCompressError(f"{blocks[0].source}: the cfg has no [yolo] layer")
        self.classes = self.heads[0].classes
        if any(h.classes != self.classes for h in self.heads):
            raise YoloCompressError(f"{blocks[0].source}: [yolo] layers disagree on classes")
        shapes = layer_shapes(blocks)
        in_c = self.net.get_int("channels", 3)
        layers = []
        self._sources: list[list[int]] = []
        for i, b in enumerate(blocks[1:]):
            prev_c = shapes[i - 1].c if i else in_c
            srcs = [i - 1]
            if b.type == "convolutional":
                m = ConvLayer(b, prev_c)
            elif b.type == "maxpool":
                m = MaxPoolLayer(b)
            elif b.type == "upsample":
                m = UpsampleLayer(b)
            elif b.type == "route":
                srcs = resolve_sources(blocks, i)
                m = RouteLayer(b, srcs, [shapes[s].c for s in srcs])
            elif b.type == "shortcut":
                srcs = resolve_sources(blocks, i)
                m = ShortcutLayer(b, srcs)
            else:
                m = YoloLayer()
            layers.append(m)
            self._sources.append(srcs)
        self.layers = nn.ModuleList(layers)
        self._yolo_index = [h.index for h in self.heads]
        # outputs that routes and shortcuts read back
        self._keep = {s for b, srcs in zip(blocks[1:], self._sources)
                      if b.type in ("route", "shortcut") for s in srcs}
        self._by_name = {info.name: info.index for info in self.infos}

    def initialize(self) -> None:
        """Prior biases for the detection convs so training from scratch starts sane: objectness
        as if ~8 objects per image over all cells, classes uniform (the YOLOv5 prior)."""
        h, w = self.input_size
        with torch.no_grad():
            for head in self.heads:
                layer = self.layers[head.index - 1]
                if layer.bn_enabled or head.new_coords:
                    continue
                bias = layer.conv.bias.view(head.num_anchors, 5 + head.classes)
                cells = (h / head.stride) * (w / head.stride)
                bias[:, 4] = math.log(8 / cells)
                bias[:, 5:] = math.log(0.6 / max(head.classes - 0.99, 0.01))

    @property
    def input_size(self) -> tuple[int, int]:
        return self.net.get_int("height", 416), self.net.get_int("width", 416)

    @property
    def letterbox(self) -> bool:
        return bool(self.net.get_int("letter_box", 0))

    def layer_index(self, name: str) -> int:
        if name not in self._by_name:
            raise YoloCompressError(f"no layer named '{name}' (names look like "
                                    f"'{self.infos[0].name}', '{self.infos[-1].name}')")
        return self._by_name[name]

    def forward(self, x: torch.Tensor, features: Sequence[str] = ()):
        want = {self.layer_index(n): n for n in features}
        keep = self._keep | set(want)
        outputs: list = [None] * len(self.layers)
        feats: dict[str, torch.Tensor] = {}
        heads = []
        prev = x
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (RouteLayer, ShortcutLayer)):
                y = layer(outputs)
            else:
                y = layer(prev)
            if i in keep:
                outputs[i] = y
            if i in want:
                feats[want[i]] = y
            if isinstance(layer, YoloLayer):
                heads.append(y)
            prev = y
        return (heads, feats) if features else heads
