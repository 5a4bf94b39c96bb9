"""Per-layer output shapes, parameters and FLOPs of a cfg, computed from the blocks (no tracing).

FLOPs follow Darknet's printed convention (models.kinds, each kind's `cost`): conv
2·(c/g)·n·k²·out_h·out_w, maxpool k²·c·out_h·out_w, shortcut the output size per added map;
route, upsample, avgpool, sam, scale_channels and yolo count nothing. Params are the trainable
ones: conv weights plus BN gamma+beta, or the conv bias when there is no BN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .cfg import Block
from .kinds import conv_padding, kind_of, maxpool_padding, route_slice
from .roles import describe_layers
from .shapes import LayerShape, layer_io, layer_shapes

__all__ = ["LayerShape", "LayerProfile", "layer_shapes", "profile_blocks", "profile_summary",
           "conv_padding", "maxpool_padding", "route_slice"]


@dataclass(frozen=True)
class LayerProfile:
    index: int
    kind: str
    out: tuple[int, int, int]      # (c, h, w)
    params: int
    flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def profile_blocks(blocks: list[Block], height: int | None = None,
                   width: int | None = None) -> list[LayerProfile]:
    """Params and Darknet FLOPs per layer."""
    rows = []
    for i, (b, (ins, out)) in enumerate(zip(blocks[1:], layer_io(blocks, height, width))):
        params, flops = kind_of(b).cost(b, ins, out)
        rows.append(LayerProfile(i, b.type, (out.c, out.h, out.w), params, flops))
    return rows


def profile_summary(blocks: list[Block], height: int | None = None,
                    width: int | None = None) -> dict:
    """Totals and per-layer rows: {"input", "params", "flops", "flops_conv", "layers": [...]}."""
    rows = profile_blocks(blocks, height, width)
    infos = describe_layers(blocks)
    net = blocks[0]
    layers = [{**r.to_dict(), "name": info.name, "part": info.part, "role": info.role,
               "stride": info.stride} for r, info in zip(rows, infos)]
    return {
        "input": [height or net.get_int("height", 416), width or net.get_int("width", 416)],
        "params": sum(r.params for r in rows),
        "flops": sum(r.flops for r in rows),
        "flops_conv": sum(r.flops for r in rows if r.kind == "convolutional"),
        "layers": layers,
    }
