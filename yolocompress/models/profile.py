"""Per-layer output shapes, parameters and FLOPs of a cfg, computed from the blocks (no tracing).

FLOPs follow Darknet's printed convention: conv 2·(c/g)·n·k²·out_h·out_w, maxpool k²·c·out_h·out_w,
shortcut the output size; route, upsample and yolo count nothing. Params are the trainable ones:
conv weights plus BN gamma+beta, or the conv bias when there is no BN.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import YoloCompressError
from .cfg import Block, resolve_sources

__all__ = ["LayerShape", "LayerProfile", "layer_shapes", "profile_blocks", "conv_padding",
           "maxpool_padding", "route_slice"]


@dataclass(frozen=True)
class LayerShape:
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class LayerProfile:
    index: int
    kind: str
    out: tuple[int, int, int]      # (c, h, w)
    params: int
    flops: int

    def to_dict(self) -> dict:
        return asdict(self)


def conv_padding(b: Block) -> int:
    size = b.get_int("size")
    return size // 2 if b.get_int("pad", 0) else b.get_int("padding", 0)


def maxpool_padding(b: Block) -> int:
    """Total padding of a Darknet maxpool (split as pad//2 before, the rest after)."""
    return b.get_int("padding", b.get_int("size", b.get_int("stride", 1)) - 1)


def route_slice(b: Block, channels: int) -> tuple[int, int]:
    """Channel range [start, end) that one input of a route with `groups`/`group_id` contributes."""
    groups = b.get_int("groups", 1)
    gid = b.get_int("group_id", 0)
    if groups < 1 or not 0 <= gid < groups:
        raise YoloCompressError(f"{b.where()}: [route] groups={groups} group_id={gid} is invalid")
    if channels % groups:
        raise YoloCompressError(
            f"{b.where()}: [route] groups={groups} does not divide the {channels} input channels")
    part = channels // groups
    return gid * part, (gid + 1) * part


def layer_shapes(blocks: list[Block], height: int | None = None,
                 width: int | None = None) -> list[LayerShape]:
    """Output (c, h, w) of every layer for an input of `height`x`width` (default: the [net] size)."""
    net = blocks[0]
    h = height or net.get_int("height", 416)
    w = width or net.get_int("width", 416)
    c = net.get_int("channels", 3)
    shapes: list[LayerShape] = []
    for i, b in enumerate(blocks[1:]):
        prev = shapes[-1] if shapes else LayerShape(c, h, w)
        if b.type == "convolutional":
            k, s, p = b.get_int("size"), b.get_int("stride", 1), conv_padding(b)
            groups = b.get_int("groups", 1)
            n = b.get_int("filters")
            if n < 1 or prev.c % groups or n % groups:
                raise YoloCompressError(
                    f"{b.where()}: conv layer {i}: filters={n} groups={groups} do not fit "
                    f"{prev.c} input channels")
            out = LayerShape(n, (prev.h + 2 * p - k) // s + 1, (prev.w + 2 * p - k) // s + 1)
        elif b.type == "maxpool":
            k = b.get_int("size", b.get_int("stride", 1))
            s, p = b.get_int("stride", 1), maxpool_padding(b)
            out = LayerShape(prev.c, (prev.h + p - k) // s + 1, (prev.w + p - k) // s + 1)
        elif b.type == "upsample":
            s = b.get_int("stride", 2)
            out = LayerShape(prev.c, prev.h * s, prev.w * s) if s > 0 else \
                LayerShape(prev.c, prev.h // -s, prev.w // -s)
        elif b.type == "route":
            srcs = [shapes[j] for j in resolve_sources(blocks, i)]
            if len({(s.h, s.w) for s in srcs}) > 1:
                raise YoloCompressError(
                    f"{b.where()}: [route] at layer {i} joins maps of different sizes "
                    + ", ".join(f"{s.h}x{s.w}" for s in srcs))
            ch = 0
            for s in srcs:
                lo, hi = route_slice(b, s.c)
                ch += hi - lo
            out = LayerShape(ch, srcs[0].h, srcs[0].w)
        elif b.type == "shortcut":
            srcs = [shapes[j] for j in resolve_sources(blocks, i)]
            if any((s.c, s.h, s.w) != (prev.c, prev.h, prev.w) for s in srcs):
                raise YoloCompressError(
                    f"{b.where()}: [shortcut] at layer {i} adds maps of shapes "
                    + ", ".join(f"{s.c}x{s.h}x{s.w}" for s in srcs))
            out = prev
        elif b.type == "yolo":
            out = prev
        else:  # parse_cfg rejects unknown sections; blocks built in code may not have been parsed
            raise YoloCompressError(f"{b.where()}: unsupported layer kind [{b.type}]")
        if out.h < 1 or out.w < 1:
            raise YoloCompressError(
                f"{b.where()}: layer {i} output {out.h}x{out.w} is empty for a {h}x{w} input")
        shapes.append(out)
    return shapes


def profile_blocks(blocks: list[Block], height: int | None = None,
                   width: int | None = None) -> list[LayerProfile]:
    """Params and Darknet FLOPs per layer."""
    shapes = layer_shapes(blocks, height, width)
    in_c = blocks[0].get_int("channels", 3)
    rows = []
    for i, (b, out) in enumerate(zip(blocks[1:], shapes)):
        c_in = shapes[i - 1].c if i else in_c
        params = flops = 0
        if b.type == "convolutional":
            k, n, g = b.get_int("size"), out.c, b.get_int("groups", 1)
            weights = (c_in // g) * n * k * k
            params = weights + (2 * n if b.get_int("batch_normalize", 0) else n)
            flops = 2 * weights * out.h * out.w
        elif b.type == "maxpool":
            k = b.get_int("size", b.get_int("stride", 1))
            flops = k * k * out.c * out.h * out.w
        elif b.type == "shortcut":
            flops = out.c * out.h * out.w
        rows.append(LayerProfile(i, b.type, (out.c, out.h, out.w), params, flops))
    return rows


def profile_summary(blocks: list[Block], height: int | None = None,
                    width: int | None = None) -> dict:
    """Totals and per-layer rows: {"input", "params", "flops", "flops_conv", "layers": [...]}."""
    from .roles import describe_layers  # roles imports this module

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
