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
from torch import nn

from ..errors import YoloCompressError
from .cfg import Block, resolve_sources, set_classes, yolo_mask
from .heads import HeadSpec
from .kinds import kind_of
from .layers import ACTIVATIONS, ConvLayer, ReadsOutputs, YoloLayer
from .roles import LayerInfo, describe_layers
from .shapes import layer_io

__all__ = ["Darknet", "ACTIVATIONS", "ConvLayer", "heads_from_blocks"]


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
        layers = []
        self._sources: list[list[int]] = []
        for i, (b, (ins, _)) in enumerate(zip(blocks[1:], layer_io(blocks))):
            srcs = resolve_sources(blocks, i)
            layers.append(kind_of(b).module(b, ins, srcs))
            self._sources.append(srcs)
        self.layers = nn.ModuleList(layers)
        self._yolo_index = [h.index for h in self.heads]
        # outputs that routes, shortcuts, sam and scale_channels read back
        self._keep = {s for m, srcs in zip(layers, self._sources)
                      if isinstance(m, ReadsOutputs) for s in srcs}
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

    @property
    def sources(self) -> tuple[tuple[int, ...], ...]:
        """Per layer, the absolute indices of the outputs it reads (-1: the image)."""
        return tuple(tuple(s) for s in self._sources)

    def run_layer(self, i: int, prev: torch.Tensor, outputs: Sequence) -> torch.Tensor:
        """Layer i's output from the previous layer's and the saved outputs (forward's step)."""
        layer = self.layers[i]
        return layer(outputs) if isinstance(layer, ReadsOutputs) else layer(prev)

    def forward(self, x: torch.Tensor, features: Sequence[str] = ()):
        want = {self.layer_index(n): n for n in features}
        keep = self._keep | set(want)
        outputs: list = [None] * len(self.layers)
        feats: dict[str, torch.Tensor] = {}
        heads = []
        prev = x
        for i, layer in enumerate(self.layers):
            y = self.run_layer(i, prev, outputs)
            if i in keep:
                outputs[i] = y
            if i in want:
                feats[want[i]] = y
            if isinstance(layer, YoloLayer):
                heads.append(y)
            prev = y
        return (heads, feats) if features else heads
