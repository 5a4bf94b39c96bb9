"""The table of Darknet layer kinds: everything yolocompress knows about one `[section]`, in one entry.

`KINDS[section]` is a `Kind`: its options (type, range, allowed values; anything else is an
error), which earlier layers it reads, its output shape and cost (params, FLOPs as Darknet prints
them), its module builder, its short name for layer names and roles, and its channel rule (how
its output channels derive from its inputs' channels: what the channel graph traces, what keep
propagation and the bias compensation of pruning carry through it). cfg, profile, darknet, roles,
compress.graph and compress.prune look kinds up here; adding a kind is one entry.

Darknet sections that only serve classification, xnor, tracking, recurrent or contrastive cfgs
(`UNSUPPORTED`) are a clear error, as is any section Darknet does not know.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import YoloCompressError
from .block import Block
from .layers import (ACTIVATIONS, AvgPoolLayer, ConvLayer, MaxPoolLayer, RouteLayer, SamLayer,
                     ScaleChannelsLayer, ShortcutLayer, UpsampleLayer, YoloLayer)

__all__ = ["Option", "Kind", "KINDS", "NET_OPTIONS", "UNSUPPORTED", "ALIASES", "LayerShape",
           "UNTRACED", "Channels", "Produce", "apply_activation", "check_options", "conv_padding", "maxpool_padding", "route_slice",
           "kind_of", "MAX_INPUT_SIZE", "MAX_INPUT_CHANNELS"]

MAX_INPUT_SIZE = 8192       # [net] width/height bound: beyond it a forward pass needs tens of GB
MAX_INPUT_CHANNELS = 1024
UNTRACED = -2               # producer id of channels a kind cannot trace back to convs


@dataclass(frozen=True)
class LayerShape:
    c: int
    h: int
    w: int


@dataclass(frozen=True)
class Option:
    """One `key=value` a kind accepts: `type` int | float | ints | floats | str, an inclusive
    range for numbers (each element of a list), or the allowed strings."""
    type: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, b: Block, key: str) -> None:
        raw = b.get(key)
        if self.type == "str":
            if self.choices and raw not in self.choices:
                raise YoloCompressError(f"{b.where(key)}: [{b.type}] {key}={raw} is not one of "
                                        + ", ".join(self.choices))
            return
        values = {"int": lambda: [b.get_int(key)], "float": lambda: [b.get_float(key)],
                  "ints": lambda: b.get_ints(key), "floats": lambda: b.get_floats(key)}[self.type]()
        for v in values:
            if self.lo is not None and v < self.lo or self.hi is not None and v > self.hi:
                bound = (f"in {self.lo:g}..{self.hi:g}" if self.lo is not None and self.hi is not None
                         else f">= {self.lo:g}" if self.lo is not None else f"<= {self.hi:g}")
                raise YoloCompressError(f"{b.where(key)}: [{b.type}] {key}={raw} must be {bound}")


_INT, _FLOAT, _STR = Option("int"), Option("float"), Option("str")
_FLAG = Option("int", 0, 1)
_ACT = Option("str", choices=tuple(ACTIVATIONS))
# Darknet's per-layer training options (parser.c, after every layer): no effect on inference.
_TRAINING = {"clip": _FLOAT, "onlyforward": _FLAG, "dont_update": _FLAG, "burnin_update": _FLAG,
             "stopbackward": _FLAG, "train_only_bn": _FLAG, "dontload": _FLAG,
             "dontloadscales": _FLAG, "learning_rate": _FLOAT}
_STREAMS = {"stream": _INT, "wait_stream": _INT}           # GPU stream scheduling only

NET_OPTIONS: dict[str, Option] = {
    "width": Option("int", 1, MAX_INPUT_SIZE), "height": Option("int", 1, MAX_INPUT_SIZE),
    "channels": Option("int", 1, MAX_INPUT_CHANNELS),
    "batch": Option("int", 1), "subdivisions": Option("int", 1), "max_batches": Option("int", 0),
    "burn_in": Option("int", 0), "learning_rate": _FLOAT, "learning_rate_min": _FLOAT,
    "momentum": _FLOAT, "decay": _FLOAT, "policy": Option("str", choices=(
        "random", "poly", "constant", "step", "exp", "sigmoid", "steps", "sgdr")),
    "steps": Option("ints"), "scales": Option("floats"), "seq_scales": Option("floats"),
    "step": _INT, "scale": _FLOAT, "gamma": _FLOAT, "power": _FLOAT, "sgdr_cycle": _INT,
    "sgdr_mult": _INT, "time_steps": Option("int", 1), "sequential_subdivisions": _INT,
    "angle": _FLOAT, "aspect": _FLOAT, "saturation": _FLOAT, "exposure": _FLOAT, "hue": _FLOAT,
    "flip": _FLAG, "blur": _INT, "gaussian_noise": _INT, "mixup": _INT, "cutmix": _FLAG,
    "mosaic": _FLAG, "mosaic_bound": _FLAG, "letter_box": _FLAG, "label_smooth_eps": _FLOAT,
    "resize_step": _FLOAT, "max_crop": _INT, "min_crop": _INT, "ema_alpha": _FLOAT,
    "adam": _FLAG, "B1": _FLOAT, "B2": _FLOAT, "eps": _FLOAT, "loss_scale": _FLOAT,
    "dynamic_minibatch": _FLAG, "optimized_memory": _INT, "workspace_size_limit_MB": _FLOAT,
    "use_cuda_graph": _FLAG, "try_fix_nan": _FLAG, "weights_reject_freq": _INT,
    "equidistant_point": _INT, "badlabels_rejection_percentage": _FLOAT,
    "num_sigmas_reject_badlabels": _FLOAT, "adversarial_lr": _FLOAT, "attention": _FLAG,
    "max_chart_loss": _FLOAT, "show_receptive_field": _FLAG, "augment_speed": _INT,
    "track": _FLAG,
}


def check_options(b: Block, options: Mapping[str, Option]) -> None:
    """Every option of `b` is one of `options` and has a valid value."""
    for key in b.options:
        if key not in options:
            raise YoloCompressError(
                f"{b.where(key)}: unknown or unsupported option '{key}' in [{b.type}] "
                f"(accepted: {', '.join(sorted(options))})")
        options[key].check(b, key)


# ---- channel rules ----------------------------------------------------------------------------

Origin = tuple[tuple[int, int], ...]      # the (producer, channel) pairs summed into one channel


def apply_activation(b: Block, default: str, x: np.ndarray) -> np.ndarray:
    """`b`'s activation (`default` when unset) applied to a numpy array."""
    return ACTIVATIONS[b.get("activation", default)]()(torch.from_numpy(x)).numpy()


class Channels:
    """How a kind's output channels derive from its sources' channels, in three views:
    `origins` (per channel, the conv channels summed into it), `keep` (boolean kept masks; raises
    where a choice breaks the layer) and `constant` (the constant a pruned channel carries; NaN
    where none). Each gets one entry per source, in source order."""
    traceable = True

    def origins(self, b: Block, i: int, ins: Sequence[tuple[Origin, ...]]) -> tuple[Origin, ...]:
        return ins[0]

    def keep(self, b: Block, i: int, srcs: Sequence[int], ins: Sequence[np.ndarray]) -> np.ndarray:
        return ins[0]

    def constant(self, b: Block, ins: Sequence[np.ndarray]) -> np.ndarray:
        return ins[0]


class Produce(Channels):
    """A conv: new channels; compress.graph and compress.prune handle its kept channels."""
    def origins(self, b, i, ins):
        return tuple(((i, c),) for c in range(b.get_int("filters")))


class PassThrough(Channels):
    """Per-channel ops (maxpool with -inf padding, avgpool): channel c out is channel c in, and
    a constant stays that constant."""


class Scaled(PassThrough):
    """[upsample]: nearest neighbour times `scale`."""
    def constant(self, b, ins):
        return ins[0] * b.get_float("scale", 1.0)


class NeedsAll(PassThrough):
    """[yolo]: reads a fixed channel layout, so every input channel must stay."""
    def keep(self, b, i, srcs, ins):
        if not ins[0].all():
            raise YoloCompressError(
                f"{b.where()}: [yolo] at layer {i} needs all {ins[0].size} channels of "
                f"layer {srcs[0]}, but only {int(ins[0].sum())} are kept")
        return ins[0]


class Concat(Channels):
    """[route]: the concatenation of each source's `groups`/`group_id` slice."""
    def origins(self, b, i, ins):
        return tuple(o for m in ins for o in m[slice(*route_slice(b, len(m)))])

    def keep(self, b, i, srcs, ins):
        groups = b.get_int("groups", 1)
        for s, m in zip(srcs, ins):
            counts = m.reshape(groups, -1).sum(axis=1)
            if (counts != counts[0]).any():
                raise YoloCompressError(
                    f"{b.where()}: [route] at layer {i} splits layer {s} into groups={groups}, "
                    f"which needs equally many kept channels per group, got {counts.tolist()}")
        return np.concatenate([m[slice(*route_slice(b, m.size))] for m in ins])

    def constant(self, b, ins):
        return np.concatenate([m[slice(*route_slice(b, m.size))] for m in ins])


class Sum(Channels):
    """[shortcut] (Darknet's shortcut_multilayer): output channel j is the previous layer's
    channel j plus channel j of every `from` map that has one; the output has the previous
    layer's channel count."""
    def origins(self, b, i, ins):
        out = []
        for j, origin in enumerate(ins[0]):
            summed = set(origin).union(*(m[j] for m in ins[1:] if j < len(m)))
            out.append(tuple(sorted(summed)))
        return tuple(out)

    def keep(self, b, i, srcs, ins):
        for s, m in zip(srcs[1:], ins[1:]):
            n = min(m.size, ins[0].size)
            if not np.array_equal(m[:n], ins[0][:n]):
                raise YoloCompressError(
                    f"{b.where()}: [shortcut] at layer {i} adds layers {srcs[0]} and {s} "
                    "whose kept channels differ; shortcut-tied convs must keep one channel set")
        return ins[0]

    def constant(self, b, ins):
        total = ins[0].copy()
        for m in ins[1:]:
            n = min(m.size, total.size)
            total[:n] += m[:n]
        return apply_activation(b, "linear", total)


class Untraced(Channels):
    """[sam], [scale_channels]: products of two maps, so a pruned channel is no constant there;
    every input channel must stay, and the output channels are traced to no conv."""
    traceable = False

    def origins(self, b, i, ins):
        return tuple(((UNTRACED, c),) for c in range(len(ins[-1])))

    def keep(self, b, i, srcs, ins):
        for s, m in zip(srcs, ins):
            if not m.all():
                raise YoloCompressError(
                    f"{b.where()}: [{b.type}] at layer {i} multiplies layer {s}'s channels, so "
                    f"all {m.size} must be kept, but only {int(m.sum())} are")
        return np.ones(len(ins[-1]), dtype=bool)

    def constant(self, b, ins):
        return np.full(len(ins[-1]), np.nan)


# ---- shapes, costs, modules -------------------------------------------------------------------

def conv_padding(b: Block) -> int:
    size = b.get_int("size")
    return size // 2 if b.get_int("pad", 0) else b.get_int("padding", 0)


def maxpool_size(b: Block) -> int:
    return b.get_int("size", b.get_int("stride", 1))


def maxpool_padding(b: Block) -> int:
    """Total padding of a Darknet maxpool (split as pad//2 before, the rest after)."""
    return b.get_int("padding", maxpool_size(b) - 1)


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


def _conv_shape(b, i, ins):
    prev = ins[0]
    k, s, p = b.get_int("size"), b.get_int("stride", 1), conv_padding(b)
    groups, n = b.get_int("groups", 1), b.get_int("filters")
    if prev.c % groups or n % groups:
        raise YoloCompressError(f"{b.where()}: conv layer {i}: filters={n} groups={groups} do "
                                f"not fit {prev.c} input channels")
    return LayerShape(n, (prev.h + 2 * p - k) // s + 1, (prev.w + 2 * p - k) // s + 1)


def _conv_cost(b, ins, out):
    k, n, g = b.get_int("size"), out.c, b.get_int("groups", 1)
    weights = (ins[0].c // g) * n * k * k
    params = weights + (2 * n if b.get_int("batch_normalize", 0) else n)
    return params, 2 * weights * out.h * out.w


def _conv_check(b):
    if b.get_int("dilation", 1) != 1 and b.get_int("size") > 1:
        raise YoloCompressError(f"{b.where('dilation')}: [convolutional] dilation > 1 is not "
                                "supported")


def _route_check(b):
    groups, gid = b.get_int("groups", 1), b.get_int("group_id", 0)
    if gid >= groups:
        raise YoloCompressError(f"{b.where('group_id')}: [route] group_id={gid} must be below "
                                f"groups={groups}")


def _maxpool_shape(b, i, ins):
    prev, k, s, p = ins[0], maxpool_size(b), b.get_int("stride", 1), maxpool_padding(b)
    return LayerShape(prev.c, (prev.h + p - k) // s + 1, (prev.w + p - k) // s + 1)


def _maxpool_cost(b, ins, out):
    k = maxpool_size(b)
    return 0, k * k * out.c * out.h * out.w


def _route_shape(b, i, ins):
    if len({(s.h, s.w) for s in ins}) > 1:
        raise YoloCompressError(f"{b.where()}: [route] at layer {i} joins maps of different "
                                "sizes " + ", ".join(f"{s.h}x{s.w}" for s in ins))
    c = 0
    for s in ins:
        lo, hi = route_slice(b, s.c)
        c += hi - lo
    return LayerShape(c, ins[0].h, ins[0].w)


def _shortcut_shape(b, i, ins):
    prev = ins[0]
    if any((s.h, s.w) != (prev.h, prev.w) for s in ins[1:]):
        raise YoloCompressError(f"{b.where()}: [shortcut] at layer {i} adds maps of shapes "
                                + ", ".join(f"{s.c}x{s.h}x{s.w}" for s in ins)
                                + " (the sizes must match; the channel counts may differ)")
    return prev


def _sam_shape(b, i, ins):
    if ins[0] != ins[1]:
        raise YoloCompressError(f"{b.where()}: [sam] at layer {i} multiplies maps of shapes "
                                + ", ".join(f"{s.c}x{s.h}x{s.w}" for s in ins)
                                + " (they must be equal)")
    return ins[1]


def _scale_channels_shape(b, i, ins):
    prev, src = ins
    want = (1, src.h, src.w) if b.get_int("scale_wh", 0) else (src.c, 1, 1)
    if (prev.c, prev.h, prev.w) != want:
        raise YoloCompressError(
            f"{b.where()}: [scale_channels] at layer {i} scales a {src.c}x{src.h}x{src.w} map by "
            f"a {prev.c}x{prev.h}x{prev.w} one; it must be {'x'.join(map(str, want))}")
    return src


def _no_cost(b, ins, out):
    return 0, 0


@dataclass(frozen=True)
class Kind:
    section: str
    short: str                                   # name prefix and default role ("conv54")
    options: Mapping[str, Option]
    shape: Callable[[Block, int, list[LayerShape]], LayerShape]      # (block, index, inputs)
    module: Callable[[Block, list[LayerShape], list[int]], nn.Module]  # (block, inputs, sources)
    channels: Channels
    required: tuple[str, ...] = ()
    refs: str | None = None          # the option naming the layers it reads
    with_previous: bool = False      # reads the previous layer first, then `refs`
    max_refs: int | None = None
    cost: Callable[[Block, list[LayerShape], LayerShape], tuple[int, int]] = _no_cost
    check: Callable[[Block], None] = field(default=lambda b: None)   # cross-option checks

    def validate(self, b: Block) -> None:
        for key in self.required:
            if key not in b.options:
                raise YoloCompressError(f"{b.where()}: [{b.type}] is missing '{key}'")
        check_options(b, {**_TRAINING, **self.options})
        self.check(b)


_YOLO_OPTIONS = {
    "mask": Option("ints", 0), "anchors": Option("floats", 0), "classes": Option("int", 1),
    "num": Option("int", 1), "jitter": _FLOAT, "ignore_thresh": _FLOAT, "truth_thresh": _FLOAT,
    "iou_thresh": _FLOAT, "random": _FLOAT, "resize": _FLOAT, "scale_x_y": _FLOAT,
    "new_coords": _FLAG, "iou_normalizer": _FLOAT, "cls_normalizer": _FLOAT,
    "obj_normalizer": _FLOAT, "delta_normalizer": _FLOAT, "max_delta": _FLOAT,
    "iou_loss": Option("str", choices=("mse", "iou", "giou", "diou", "ciou")),
    "iou_thresh_kind": Option("str", choices=("iou", "giou", "diou", "ciou")),
    "nms_kind": Option("str", choices=("default", "greedynms", "diounms")), "beta_nms": _FLOAT,
    "objectness_smooth": _FLAG, "label_smooth_eps": _FLOAT, "focal_loss": _FLAG,
    "max": Option("int", 1), "counters_per_class": Option("ints", 0), "show_details": _FLAG,
    # in published cfgs (yolov4-sam-mish.cfg): Gaussian-YOLO's term, and one Darknet never reads
    "uc_normalizer": _FLOAT, "beta1": _FLOAT,
}

KINDS: dict[str, Kind] = {k.section: k for k in (
    Kind("convolutional", "conv", {
        "filters": Option("int", 1, 65536), "size": Option("int", 1, 64),
        "stride": Option("int", 1, 64), "pad": Option("int", 0), "padding": Option("int", 0),
        "groups": Option("int", 1), "dilation": Option("int", 1), "batch_normalize": _FLAG,
        "activation": _ACT, **_STREAMS},
        _conv_shape, lambda b, ins, srcs: ConvLayer(b, ins[0].c, conv_padding(b)), Produce(),
        required=("filters", "size"), cost=_conv_cost, check=_conv_check),
    Kind("route", "route", {"layers": Option("ints"), "groups": Option("int", 1),
                            "group_id": Option("int", 0), **_STREAMS},
         _route_shape,
         lambda b, ins, srcs: RouteLayer(srcs, [route_slice(b, s.c) for s in ins],
                                         [s.c for s in ins]),
         Concat(), required=("layers",), refs="layers", check=_route_check),
    Kind("shortcut", "shortcut", {"from": Option("ints"), "activation": _ACT,
                                  "weights_type": Option("str", choices=("none",)),
                                  "weights_normalization": Option("str", choices=("none",))},
         _shortcut_shape, lambda b, ins, srcs: ShortcutLayer(b, srcs, [s.c for s in ins]), Sum(),
         required=("from",), refs="from", with_previous=True,
         cost=lambda b, ins, out: (0, out.c * out.h * out.w * (len(ins) - 1))),
    Kind("maxpool", "maxpool", {"size": Option("int", 1, 1024), "stride": Option("int", 1, 1024),
                                "padding": Option("int", 0)},
         _maxpool_shape,
         lambda b, ins, srcs: MaxPoolLayer(maxpool_size(b), b.get_int("stride", 1),
                                           maxpool_padding(b)),
         PassThrough(), cost=_maxpool_cost),
    Kind("avgpool", "avgpool", {}, lambda b, i, ins: LayerShape(ins[0].c, 1, 1),
         lambda b, ins, srcs: AvgPoolLayer(), PassThrough()),
    Kind("upsample", "upsample", {"stride": Option("int", 1, 64), "scale": _FLOAT},
         lambda b, i, ins: LayerShape(ins[0].c, ins[0].h * b.get_int("stride", 2),
                                      ins[0].w * b.get_int("stride", 2)),
         lambda b, ins, srcs: UpsampleLayer(b.get_int("stride", 2), b.get_float("scale", 1.0)),
         Scaled()),
    Kind("sam", "sam", {"from": Option("ints"), "activation": _ACT}, _sam_shape,
         lambda b, ins, srcs: SamLayer(b, srcs), Untraced(), required=("from",), refs="from",
         with_previous=True, max_refs=1),
    Kind("scale_channels", "scale", {"from": Option("ints"), "scale_wh": _FLAG,
                                     "activation": _ACT},
         _scale_channels_shape, lambda b, ins, srcs: ScaleChannelsLayer(b, srcs), Untraced(),
         required=("from",), refs="from", with_previous=True, max_refs=1),
    Kind("yolo", "yolo", _YOLO_OPTIONS, lambda b, i, ins: ins[0],
         lambda b, ins, srcs: YoloLayer(), NeedsAll(), required=("anchors",)),
)}

ALIASES = {"conv": "convolutional", "network": "net", "max": "maxpool", "avg": "avgpool"}

# Darknet sections left out, each serving cfgs outside YOLOv3/v4/v7 detection.
UNSUPPORTED = {
    "local": "locally connected", "activation": "standalone activation", "crnn": "recurrent",
    "gru": "recurrent", "lstm": "recurrent", "conv_lstm": "recurrent", "rnn": "recurrent",
    "history": "tracking", "connected": "classification", "conn": "classification",
    "local_avg": "classification", "local_avgpool": "classification", "reorg3d": "YOLOv2",
    "reorg": "YOLOv2", "dropout": "classification", "lrn": "classification",
    "normalization": "classification", "batchnorm": "standalone BN", "soft": "classification",
    "softmax": "classification", "contrastive": "contrastive", "cost": "classification",
    "crop": "classification", "detection": "YOLOv1", "region": "YOLOv2",
    "gaussian_yolo": "Gaussian YOLOv3", "empty": "placeholder", "silence": "placeholder",
    "implicit": "YOLOR",
}


def kind_of(b: Block) -> Kind:
    """The table entry of a layer block; an error for a kind that is not in it."""
    kind = KINDS.get(b.type)
    if kind is None:
        raise YoloCompressError(f"{b.where()}: unsupported layer kind [{b.type}]")
    return kind
