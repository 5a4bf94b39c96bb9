"""The table of Darknet layer kinds: all yolocompress knows about one `[section]`, in one entry.

`KINDS[section]` is a `Kind`: its options (type, range, allowed values; anything else is an
error), which earlier layers it reads, its output shape and cost (params, FLOPs as Darknet prints
them), its module builder (models.layers), its short name for layer names and roles, and its
channel rule (models.channels: what the channel graph traces, what keep propagation and the bias
compensation of pruning carry through it). cfg, profile, darknet, roles,
compress.graph and compress.prune look kinds up here; adding a kind is one entry.

Darknet sections that only serve classification, xnor, tracking, recurrent or contrastive cfgs
(`UNSUPPORTED`) are a clear error, as is any section Darknet does not know.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import YoloCompressError
from .block import Block
from .channels import (Channels, Concat, NeedsAll, PassThrough, Produce, Scaled, Sum, Untraced,
                       route_slice)
from .layers import (ACTIVATIONS, AvgPoolLayer, ConvLayer, MaxPoolLayer, RouteLayer, SamLayer,
                     ScaleChannelsLayer, ShortcutLayer, UpsampleLayer, YoloLayer)

__all__ = ["Option", "Kind", "KINDS", "NET_OPTIONS", "UNSUPPORTED", "ALIASES", "LayerShape",
           "check_options", "conv_padding", "maxpool_padding", "route_slice", "kind_of",
           "MAX_INPUT_SIZE", "MAX_INPUT_CHANNELS"]

MAX_INPUT_SIZE = 8192       # [net] width/height bound: beyond it a forward pass needs tens of GB
MAX_INPUT_CHANNELS = 1024


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
            low, high = self.lo is not None, self.hi is not None
            if low and v < self.lo or high and v > self.hi:
                bound = (f"in {self.lo:g}..{self.hi:g}" if low and high
                         else f">= {self.lo:g}" if low else f"<= {self.hi:g}")
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


def check_options(b: Block, options: Mapping[str, Option], ignore_unknown: bool = False) -> None:
    """Every option of `b` is one of `options` (or, with `ignore_unknown`, is skipped) and the
    known ones have valid values."""
    for key in b.options:
        if key not in options:
            if ignore_unknown:
                continue
            raise YoloCompressError(
                f"{b.where(key)}: unknown or unsupported option '{key}' in [{b.type}] "
                f"(accepted: {', '.join(sorted(options))})")
        options[key].check(b, key)


# ---- shapes, costs, modules -------------------------------------------------------------------

def conv_padding(b: Block) -> int:
    size = b.get_int("size")
    return size // 2 if b.get_int("pad", 0) else b.get_int("padding", 0)


def maxpool_size(b: Block) -> int:
    return b.get_int("size", b.get_int("stride", 1))


def maxpool_padding(b: Block) -> int:
    """Total padding of a Darknet maxpool (split as pad//2 before, the rest after)."""
    return b.get_int("padding", maxpool_size(b) - 1)


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
