"""Input and output (c, h, w) of every layer of a cfg, from models.kinds' shape rules."""
from __future__ import annotations

from ..errors import YoloCompressError
from .cfg import Block, resolve_sources
from .kinds import LayerShape, kind_of

__all__ = ["LayerShape", "layer_shapes", "layer_io"]


def layer_io(blocks: list[Block], height: int | None = None, width: int | None = None
             ) -> list[tuple[list[LayerShape], LayerShape]]:
    """Per layer: (shapes of the layers it reads, in source order; its output shape), for an
    input of `height`x`width` (default: the [net] size)."""
    net = blocks[0]
    h = height or net.get_int("height", 416)
    w = width or net.get_int("width", 416)
    image = LayerShape(net.get_int("channels", 3), h, w)
    rows: list[tuple[list[LayerShape], LayerShape]] = []
    for i, b in enumerate(blocks[1:]):
        ins = [rows[s][1] if s >= 0 else image for s in resolve_sources(blocks, i)]
        out = kind_of(b).shape(b, i, ins)
        if out.h < 1 or out.w < 1:
            raise YoloCompressError(
                f"{b.where()}: layer {i} output {out.h}x{out.w} is empty for a {h}x{w} input")
        rows.append((ins, out))
    return rows


def layer_shapes(blocks: list[Block], height: int | None = None,
                 width: int | None = None) -> list[LayerShape]:
    """Output (c, h, w) of every layer for an input of `height`x`width` (default: the [net] size)."""
    return [out for _, out in layer_io(blocks, height, width)]
