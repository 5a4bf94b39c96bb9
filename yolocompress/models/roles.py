"""Stable names and roles of a cfg's layers, derived from its structure, never from magic numbers.

Each layer gets `name` (kind + index, e.g. "conv54", stable under channel pruning), its output
`stride`, the network `part` (backbone | neck | head) and a `role`:
- "detect": the conv feeding a [yolo] layer; "head": the conv feeding a detect conv; "yolo";
- "stage_out": the last backbone layer at each stride (the CSP stage outputs);
- otherwise the layer kind's short name (models.kinds).
The backbone ends where the repeated downsample-and-residual pattern stops: walk back from the
first SPP maxpool / upsample / yolo over convs and single-input routes to the first structural
layer; a shortcut ends the backbone there, a concatenating route or maxpool one conv later.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .cfg import Block, input_layers, resolve_sources
from .kinds import kind_of
from .shapes import layer_shapes

__all__ = ["LayerInfo", "describe_layers", "layer_consumers"]


@dataclass(frozen=True)
class LayerInfo:
    index: int
    kind: str          # cfg section name
    name: str          # e.g. "conv54"
    stride: int        # input pixels per output cell
    stage: int         # log2(stride): 0 stem, 1..5 the stride-2..32 levels
    part: str          # backbone | neck | head
    role: str          # detect | head | yolo | stage_out | <kind>
    channels: int      # output channels of the cfg as written

    @property
    def tag(self) -> str:
        """Human-readable address: part/stride/name, e.g. "backbone/s16/conv85"."""
        return f"{self.part}/s{self.stride}/{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


def layer_consumers(blocks: list[Block]) -> list[list[int]]:
    """For each layer, the layers that read its output (next layer or route/shortcut sources)."""
    n = len(blocks) - 1
    users: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for s in input_layers(blocks, i):
            if s >= 0 and i not in users[s]:
                users[s].append(i)
    return users


def _backbone_end(blocks: list[Block]) -> int:
    layers = blocks[1:]
    marker = next((i for i, b in enumerate(layers)
                   if b.type in ("upsample", "yolo")
                   or (b.type == "maxpool" and b.get_int("stride", 1) == 1
                       and b.get_int("size", 1) > 2)), len(layers))
    j = marker - 1
    while j > 0 and (layers[j].type == "convolutional"
                     or (layers[j].type == "route" and len(resolve_sources(blocks, j)) == 1)):
        j -= 1
    if j <= 0:
        return max(marker - 1, 0)
    return j if layers[j].type == "shortcut" else min(j + 1, marker - 1)


def describe_layers(blocks: list[Block]) -> list[LayerInfo]:
    """One LayerInfo per layer of `blocks` (see the module docstring for the rules)."""
    net = blocks[0]
    height = net.get_int("height", 416)
    shapes = layer_shapes(blocks, height, net.get_int("width", 416))
    layers = blocks[1:]
    end = _backbone_end(blocks)
    users = layer_consumers(blocks)
    detect = {i - 1 for i, b in enumerate(layers) if b.type == "yolo"}
    head = {i - 1 for i in detect if i > 0 and layers[i - 1].type == "convolutional"
            and users[i - 1] == [i]}
    infos = []
    for i, (b, s) in enumerate(zip(layers, shapes)):
        stride = max(1, round(height / s.h))
        part = "backbone" if i <= end else "neck"
        if b.type == "yolo" or i in detect or i in head:
            part = "head"
        if b.type == "yolo":
            role = "yolo"
        elif i in detect:
            role = "detect"
        elif i in head:
            role = "head"
        elif part == "backbone" and (i == end or shapes[i + 1].h != s.h):
            role = "stage_out"
        else:
            role = kind_of(b).short
        infos.append(LayerInfo(i, b.type, f"{kind_of(b).short}{i}", stride,
                               int(round(math.log2(stride))), part, role, s.c))
    return infos
