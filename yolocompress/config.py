"""Typed experiment configuration: one table of defaults, one YAML per experiment, dotted overrides.

`load_config(path, overrides)` reads a YAML experiment (optionally `_base_: other.yaml`, deep-merged),
applies `a.b=c` overrides converted to each default's declared type, and returns a validated,
frozen `Config`. Unknown keys, bad types and bad values raise `YoloCompressError` with a one-line
message `<file>:<line>: <key>: <problem>` naming the file and line that set the key (a `_base_`
file's where the value came from there), or `<file>: override '<a.b=c>': ...`. This is the one place
values are checked: runtime classes take the validated sections (e.g. `AugmentConfig`).

Path rule (`Config.resolve_path`): a relative path (model.cfg, model.weights, data.descriptor) is
taken beside the file that wrote it if it exists there, else relative to the current directory.
Values of the experiment file given to `load_config` (`Config.source`) and of `_base_` files in its
folder stay as written and resolve beside `source`; a `_base_` file elsewhere has its existing
relative paths made absolute when it is read. `to_dict()` keeps the strings otherwise; `cfg_path`, `weights_path` and `data_path` give the resolved paths,
`require_file('model.cfg')` also checks that the file is there (commands call it; loading does not).

To add a section (sparse, prune, distill, gate): write one dataclass deriving from `_Section` (one
comment per default, checks in `_validate`, `metadata=_PATH` on path fields) and add one field
for it to `Config`.
"""
from __future__ import annotations

import difflib
import functools
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from yolocompress.errors import YoloCompressError
from yolocompress.fileio import atomic_open
from yolocompress.stages import ARMS, recovery_stages

__all__ = [
    "IMG_SIZE_RULE",
    "AugmentConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "GateConfig",
    "ModelConfig",
    "PruneConfig",
    "QuantizeConfig",
    "SparseConfig",
    "TrainConfig",
    "config_from_dict",
    "dump_yaml",
    "load_config",
    "valid_img_size",
]

IMG_SIZE_RULE = "must be a positive multiple of 32"  # input sides; checked by `valid_img_size`
_PATH = {"path": True}  # field metadata: a file path, resolved by Config.resolve_path
_NULLS = {"", "~", "null", "Null", "NULL", "none", "None"}  # override spellings of "no value"


def valid_img_size(value: Any) -> bool:
    """The one rule for a network input side (config, artifacts, --img-size): the stride-32
    heads need a positive multiple of 32."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % 32 == 0


class _Section:
    """Base of every config dataclass: coerce each field to its declared type, then `_validate`."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            tp = hints[f.name]
            if is_dataclass(tp):
                if not isinstance(value, tp):
                    raise YoloCompressError(f"{f.name}: expected a {tp.__name__}, got {_show(value)}")
                continue
            try:
                object.__setattr__(self, f.name, _convert(value, tp))
            except ValueError as e:
                raise YoloCompressError(f"{f.name}: {e}") from e
        self._validate()

    def _validate(self) -> None:
        """Range checks of one section; raise through `_require`."""


@dataclass(frozen=True)
class ModelConfig(_Section):
    # the Darknet .cfg file: the architecture (a YAML never redefines the network)
    cfg: str = field(default="cfg/models/yolov4.cfg", metadata=_PATH)
    classes: Optional[int] = None         # number of classes; None = number of names in data.descriptor
    img_size: int = 416                   # network input side in pixels (square, multiple of 32)
    # start from Darknet .weights (full, or partial as yolov4.conv.137) or a .pt artifact; None = random
    weights: Optional[str] = field(default=None, metadata=_PATH)
    letterbox: Optional[bool] = None      # keep aspect ratio, pad; None = as the cfg's [net] letter_box

    def _validate(self) -> None:
        _require(bool(self.cfg), "cfg", "must name a Darknet .cfg file", self.cfg)
        _require(self.classes is None or self.classes >= 1, "classes", "must be >= 1", self.classes)
        _require(valid_img_size(self.img_size), "img_size", IMG_SIZE_RULE, self.img_size)
        _require(self.weights is None or bool(self.weights), "weights", "must be a path or null",
                 self.weights)


@dataclass(frozen=True)
class DataConfig(_Section):
    # the data-set descriptor YAML (root, splits, class names)
    descriptor: str = field(default="data/voc.yaml", metadata=_PATH)
    workers: int = 4                      # DataLoader workers per device; 0 = load in the main process
    cache_images: bool = False            # keep decoded images in RAM after the first epoch
    # the first bad item (annotation, image) is an error; false: skipped, counted, reported once
    strict: bool = False

    def _validate(self) -> None:
        _require(bool(self.descriptor), "descriptor", "must name a data-set YAML", self.descriptor)
        _require(self.workers >= 0, "workers", "must be >= 0", self.workers)


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 100                     # passes over the training split
    batch_size: int = 16                  # images per device per forward pass
    nominal_batch: int = 64               # images per optimizer step, all devices; accumulate up to it
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"  # sgd (with momentum, as Darknet) | adam | adamw
    lr: float = 0.0013                    # lr of one step over nominal_batch images (Darknet yolov4)
    momentum: float = 0.949               # SGD momentum, or Adam beta1
    weight_decay: float = 0.0005          # L2 decay on conv weights only (not BN, not biases)
    burn_in: int = 1000                   # warm-up steps: lr * (step / burn_in) ** burn_in_power
    # each stage's warm-up is at most this share of the stage's own optimizer steps (a stage of
    # 15 steps on a small set warms up for 3, not 50); null = burn_in as given (Darknet)
    burn_in_max: Optional[float] = 0.25
    burn_in_power: float = 4.0            # exponent of the warm-up curve (Darknet power=4)
    schedule: Literal["steps", "cosine"] = "steps"  # after burn-in: decay at `steps`, or cosine
    steps: tuple[float, ...] = (0.8, 0.9)  # fractions of all optimizer steps where lr *= scales
    scales: float = 0.1                   # lr factor at each step; cosine: final lr = lr * scales
    ema: bool = True                      # keep an EMA of the weights; evaluate and save it
    ema_decay: float = 0.9999             # EMA decay per optimizer step
    amp: Optional[bool] = None            # mixed precision; None = on when the device is CUDA
    grad_clip: Optional[float] = None     # clip the total gradient L2 norm to this; None = no clipping
    seed: int = 0                         # seed of the Python, NumPy and torch RNGs
    eval_interval: int = 10               # evaluate every N epochs and after the last; 0 = last only
    multi_scale: bool = True              # random input size per batch (Darknet random=1)
    multi_scale_range: float = 0.4        # sizes from img_size * (1 +- range), multiples of 32
    multi_scale_interval: int = 10        # draw a new size every this many optimizer steps
    out_dir: str = "runs"                 # artifacts in <out_dir>/<name>/<stage>/, relative to the cwd
    log_interval: int = 20                # log losses and lr every this many optimizer steps
    device: str = "auto"                  # auto (CUDA if available) | cpu | cuda | cuda:N | mps

    def _validate(self) -> None:
        for name in ("epochs", "batch_size", "nominal_batch", "multi_scale_interval", "log_interval"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("burn_in", "seed", "eval_interval"):
            _require(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _require(self.lr > 0, "lr", "must be > 0", self.lr)
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)", self.momentum)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _require(self.burn_in_power > 0, "burn_in_power", "must be > 0", self.burn_in_power)
        _require(self.burn_in_max is None or 0 <= self.burn_in_max < 1, "burn_in_max",
                 "must be in [0, 1) or null", self.burn_in_max)
        _require(all(0 < s < 1 for s in self.steps)
                 and all(a < b for a, b in zip(self.steps, self.steps[1:])),
                 "steps", "must be increasing fractions in (0, 1)", list(self.steps))
        _require(0 < self.scales <= 1, "scales", "must be in (0, 1]", self.scales)
        _require(0 < self.ema_decay < 1, "ema_decay", "must be in (0, 1)", self.ema_decay)
        _require(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be > 0 or null",
                 self.grad_clip)
        _require(0 <= self.multi_scale_range < 1, "multi_scale_range", "must be in [0, 1)",
                 self.multi_scale_range)
        _require(bool(self.out_dir), "out_dir", "must be a folder name", self.out_dir)
        _require(re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device) is not None, "device",
                 "must be auto, cpu, cuda, cuda:N or mps", self.device)


@dataclass(frozen=True)
class AugmentConfig(_Section):
    mosaic: float = 0.5                   # probability of a 4-image mosaic (cut point in [0.2, 0.8])
    hsv_h: float = 0.1                    # hue shift in [-h, h] of the hue circle (Darknet hue)
    hsv_s: float = 1.5                    # saturation times a factor in [1/s, s] (Darknet saturation)
    hsv_v: float = 1.5                    # value times a factor in [1/v, v] (Darknet exposure)
    flip: float = 0.5                     # probability of a horizontal flip
    jitter: float = 0.3                   # crop/pad each side by up to this fraction (Darknet jitter)
    translate: float = 0.0                # random affine shift, fraction of the side (not Darknet's)
    degrees: float = 0.0                  # random rotation in [-degrees, degrees]

    def _validate(self) -> None:
        for name in ("mosaic", "flip"):
            _require(0 <= getattr(self, name) <= 1, name, "must be a probability in [0, 1]",
                     getattr(self, name))
        # each crop border moves by up to jitter x side, so at 0.5 the crop can shrink to nothing
        _require(0 <= self.jitter < 0.5, "jitter", "must be in [0, 0.5)", self.jitter)
        _require(0 <= self.translate < 1, "translate", "must be in [0, 1)", self.translate)
        for name in ("hsv_s", "hsv_v"):
            _require(getattr(self, name) >= 1, name, "must be >= 1 (1 = off)", getattr(self, name))
        _require(0 <= self.hsv_h <= 0.5, "hsv_h", "must be in [0, 0.5]", self.hsv_h)
        _require(0 <= self.degrees <= 180, "degrees", "must be in [0, 180]", self.degrees)


@dataclass(frozen=True)
class EvalConfig(_Section):
    # headline metric: VOC 11-point AP50 | VOC all-point AP50 | COCO AP (pycocotools)
    metric: Literal["voc07", "voc12", "coco"] = "voc07"
    conf_thresh: float = 0.005            # drop detections below this score before NMS
    nms_iou: float = 0.45                 # IoU above which NMS suppresses a same-class box
    max_det: int = 300                    # detections kept per image after NMS
    batch_size: int = 16                  # images per device per evaluation forward pass

    def _validate(self) -> None:
        _require(0 <= self.conf_thresh < 1, "conf_thresh", "must be in [0, 1)", self.conf_thresh)
        _require(0 < self.nms_iou <= 1, "nms_iou", "must be in (0, 1]", self.nms_iou)
        _require(self.max_det >= 1, "max_det", "must be >= 1", self.max_det)
        _require(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)


@dataclass(frozen=True)
class _StageBudget(_Section):
    """A training stage's own budget and optimiser; null = the `train` section's."""
    # this stage's epochs (null: `steps`, else train.epochs); its budget in optimizer steps, used
    # when epochs is null: the fewest whole epochs that make at least this many (a recipe then
    # trains as long on 60 images as on 1000); its lr and optimizer
    epochs: Optional[int] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    optimizer: Optional[Literal["sgd", "adam", "adamw"]] = None

    def _validate(self) -> None:
        _require(self.epochs is None or self.epochs >= 1, "epochs", "must be >= 1 or null",
                 self.epochs)
        _require(self.steps is None or self.steps >= 1, "steps", "must be >= 1 or null",
                 self.steps)
        _require(self.lr is None or self.lr > 0, "lr", "must be > 0 or null", self.lr)


@dataclass(frozen=True)
class SparseConfig(_StageBudget):
    # stage 1 sparse-rate schedule: local_decay (the method's dynamic rule) | constant (network
    # slimming) | step | cosine | linear | target (adapts s to reach target_fraction)
    schedule: Literal["local_decay", "constant", "step", "cosine", "linear", "target"] = "local_decay"
    s: float = 1e-3                       # base L1 rate on BN gammas; 1e-4 is safer from COCO weights
    switch_at: float = 0.4                # local_decay: after this fraction of the epochs, protect ...
    protect: float = 0.35                 # local_decay: ... this share of largest |gamma| (global rank)
    decay: float = 0.01                   # local_decay: protected channels get s * decay
    step_at: float = 0.5                  # step: fraction of training where s becomes s * step_factor
    step_factor: float = 0.1              # step: the factor
    warmup: float = 0.1                   # cosine/linear: fraction of training to ramp s up from 0
    final_ratio: float = 0.1              # cosine/linear: rate at the end = s * final_ratio
    target_fraction: float = 0.5          # target: share of prunable gammas to bring below ...
    target_threshold: float = 0.01        # target: ... this |gamma|
    target_epoch: Optional[int] = None    # target: epoch by which to reach it; None = the last
    include_excluded: bool = False        # penalise every BN conv, not only the prunable ones
    # lr multiplier of the penalised gammas. Under Adam the L1 term moves a gamma by at most
    # ~lr per step whatever s is, so a short stage needs a faster gamma lr to reach ~0
    gamma_lr_mult: float = 1.0
    # keep train.ema in this stage: off by default, since an EMA of the weights lags the gammas the
    # penalty drives to zero, and the EMA is what gets saved and later pruned
    ema: bool = False
    # `yolocompress pipeline` stops before pruning when the share of penalised |gamma| below 1e-2
    # at the end is under this times the share of penalised channels the prune stage will remove
    # (sparse.check=0 prunes anyway; it is not a stage input, so nothing reruns); 0 = no check
    check: float = 0.5

    def _validate(self) -> None:
        super()._validate()
        _require(self.s > 0, "s", "must be > 0", self.s)
        _require(self.check >= 0, "check", "must be >= 0", self.check)
        _require(self.gamma_lr_mult > 0, "gamma_lr_mult", "must be > 0", self.gamma_lr_mult)
        for name in ("switch_at", "warmup"):
            _require(0 <= getattr(self, name) < 1, name, "must be in [0, 1)", getattr(self, name))
        for name in ("protect", "decay", "final_ratio"):
            _require(0 <= getattr(self, name) <= 1, name, "must be in [0, 1]", getattr(self, name))
        for name in ("step_at", "target_fraction"):
            _require(0 < getattr(self, name) < 1, name, "must be in (0, 1)", getattr(self, name))
        _require(self.step_factor >= 0, "step_factor", "must be >= 0", self.step_factor)
        _require(self.target_threshold > 0, "target_threshold", "must be > 0",
                 self.target_threshold)
        _require(self.target_epoch is None or self.target_epoch >= 1, "target_epoch",
                 "must be >= 1 or null", self.target_epoch)


@dataclass(frozen=True)
class PruneConfig(_Section):
    # stage 2: the share of each group's channels (lowest importance) below its threshold, one
    # value per group (yolov4: G1-G5) or one value for every group; defaults are the method's
    # hand-set YOLOv4 values
    percents: tuple[float, ...] = (0.18, 0.50, 0.97, 0.865, 0.68)
    min_keep: float = 0.1                 # every pruned layer keeps at least this share of channels ...
    min_channels: int = 8                 # ... and at least this many (at most all it has)
    round_to: int = 1                     # round kept channels up to a multiple of this (8 suits SIMD)
    # shortcut-tied masks: kept by >= half of the set | by any | where the set's mean score passes
    merge: Literal["majority", "union", "mean"] = "mean"
    # groups: one threshold per group (the method's five on yolov4) | global: one threshold for
    # every prunable conv (network slimming); with global, percents has one value
    grouping: Literal["groups", "global"] = "groups"
    # channel ranking (compress/importance.py): |BN gamma| (network slimming) | |gamma| / its
    # layer's mean | its rank in the layer (a common threshold cuts every layer by one share) |
    # |gamma * dL/dgamma| over the search images (BN-Taylor) | L1 | L2 of filters | random
    # (seeded by train.seed)
    importance: Literal["bn_gamma_abs", "bn_gamma_norm", "bn_gamma_rank", "bn_taylor",
                        "l1_filter", "l2_filter", "random"] = "bn_gamma_norm"
    # fold pruned channels' constant act(beta) into the next layer; off: after BN recalibration
    # it costs mAP right after pruning (docs/BENCHMARKS.md, "Right after pruning")
    compensate: bool = False
    # budget mode: search percents (from `percents` as the base) removing budget_ratio of this
    # metric (latency: predicted by a per-layer table measured once in latency_backend, cached;
    # compress/latency_table.py); null = use `percents` as given
    budget_target: Optional[Literal["params", "flops", "latency"]] = None
    latency_backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    latency_threads: int = 2              # intra-op threads of the latency table and check
    budget_ratio: float = 0.5             # budget mode: fraction of params / FLOPs to remove
    # budget mode: greedy (raise the group losing least importance per cost) | scale (t * percents)
    # | evolve (per-group thresholds from one common threshold, an evolution strategy scored by
    # `allocation` over search_rounds candidates; compress/budget_evolve.py)
    budget_method: Literal["greedy", "scale", "evolve"] = "evolve"
    # what scores a candidate: importance lost (greedy) | calibration loss | minus mAP
    # (eval.metric) of the pruned model recalibrated on search_images (greedy: per cost removed,
    # raising by score_step of the metric a round; evolve: as is); scale scores nothing
    allocation: Literal["importance", "loss", "map"] = "loss"
    score_step: float = 0.05
    search_rounds: int = 48               # budget_method evolve: candidates scored
    # training images (evenly spaced, no augmentation) the BN running statistics of the pruned
    # model are re-estimated on before it is scored or saved; 0 = keep the stored statistics
    recalibrate: int = 400
    search_images: int = 64               # the first of those: candidates' scores, BN-Taylor
    # least-squares reconstruction (compress/reconstruct.py): after rebuilding, each conv is
    # refitted on the first this many of those images so that its output matches the unpruned
    # conv's on the channels it kept (ThiNet / He et al. 2017); 0 = off. On the protocol's
    # sparse model at -65 % FLOPs it adds 20 points right after pruning and 0.5-1 after the
    # recovery (docs/BENCHMARKS.md)
    reconstruct: int = 128
    # layer pruning (compress/layer_prune.py), before the channels: remove this many residual
    # units (a [shortcut] and the convs feeding only it); 0 = off. A budget counts what they remove
    layers: int = 0
    # which units: lowest mean |BN gamma| of the conv before the shortcut (tanluren) | lowest
    # calibration loss with the unit removed (recalibrated on search_images; one model per unit)
    layer_importance: Literal["bn_gamma_mean", "loss"] = "bn_gamma_mean"

    def _validate(self) -> None:
        _require(len(self.percents) >= 1 and all(0 <= p <= 1 for p in self.percents), "percents",
                 "must be a non-empty list of fractions in [0, 1]", list(self.percents))
        _require(0 < self.min_keep <= 1, "min_keep", "must be in (0, 1]", self.min_keep)
        for name in ("min_channels", "round_to", "latency_threads"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        _require(0 < self.budget_ratio < 1, "budget_ratio", "must be in (0, 1)", self.budget_ratio)
        _require(0 < self.score_step < 1, "score_step", "must be in (0, 1)", self.score_step)
        _require(self.recalibrate >= 0, "recalibrate", "must be >= 0", self.recalibrate)
        _require(self.search_images >= 1, "search_images", "must be >= 1", self.search_images)
        _require(self.reconstruct >= 0, "reconstruct", "must be >= 0", self.reconstruct)
        _require(self.layers >= 0, "layers", "must be >= 0", self.layers)
        _require(self.search_rounds >= 1, "search_rounds", "must be >= 1", self.search_rounds)
        _require(self.allocation != "importance" or self.budget_method != "evolve",
                 "budget_method", "'evolve' needs allocation loss or map", self.budget_method)
        _require(self.layers == 0 or self.budget_target != "latency", "layers",
                 "layer pruning with a latency budget is not supported (the latency table is "
                 "of the unpruned cfg's layers)", self.layers)


@dataclass(frozen=True)
class DistillConfig(_StageBudget):
    # layers whose spatial attention the student learns ("conv54", ...); empty = the method's
    # layers by role: backbone stage outputs s2-s16, the layer feeding each upsample, head convs
    layers: tuple[str, ...] = ()
    betas: tuple[float, ...] = ()         # one weight per entry of layers; empty = the rule below
    beta_backbone: float = 1e6            # rule: weight of backbone layers
    beta_neck: float = 1e4                # rule: weight of neck and head layers below stride 32
    beta_deep: float = 1e3                # rule: weight of neck and head layers at stride 32
    p: float = 2.0                        # attention map = mean over channels of |F|^p
    fg_mask: bool = False                 # compare attention inside ground-truth boxes only
    output_kd: float = 0.0                # weight of the objectness/class logit term "kd"; 0 = off
    kd_temperature: float = 1.0           # temperature of that term (T^2-scaled binary KL)
    box_kd: float = 0.0                   # weight of the teacher-bounded box term "box_kd"; 0 = off
    box_kd_margin: float = 0.0            # it counts where student 1-IoU + margin > teacher's
    # the teacher's BatchNorm: "batch" = the batch's statistics, the regime of the training
    # student's BN, so an identical student has zero loss; "eval" = its running statistics (the
    # authors' eval-mode teacher; on the demo that regime gap alone is 2/3 of the AT term)
    teacher_bn: Literal["eval", "batch"] = "batch"
    # the distillation terms' weight over the stage's optimizer steps: "none" = constant (the
    # method); "linear" / "cosine" = from 1 at the first step to 0 at the last, so the recovery
    # ends as a plain fine-tune (compress/distill.py: decay_factor)
    decay: Literal["none", "linear", "cosine"] = "none"
    # the AT weights from the student's start instead of the betas: every layer the same share
    # and all of them together `balance` x the detection loss at the first step, measured on
    # balance_images training images (compress/distill_balance.py); null = the betas / the rule
    balance: Optional[float] = None
    balance_images: int = 64
    # (epochs / steps / lr / optimizer, _StageBudget: also those of the plain fine-tune it is
    # compared with)

    def _validate(self) -> None:
        super()._validate()
        _require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat a name",
                 list(self.layers))
        _require(not self.betas or len(self.betas) == len(self.layers), "betas",
                 f"must be empty or one per layer ({len(self.layers)})", list(self.betas))
        _require(all(b >= 0 for b in self.betas), "betas", "must be >= 0", list(self.betas))
        for name in ("beta_backbone", "beta_neck", "beta_deep", "output_kd", "box_kd"):
            _require(getattr(self, name) >= 0, name, "must be >= 0", getattr(self, name))
        _require(self.p > 0, "p", "must be > 0", self.p)
        _require(self.kd_temperature > 0, "kd_temperature", "must be > 0", self.kd_temperature)
        _require(self.balance is None or self.balance > 0, "balance", "must be > 0 or null",
                 self.balance)
        _require(self.balance is None or not self.betas, "balance",
                 "replaces betas: give one of the two", self.balance)
        _require(self.balance_images >= 1, "balance_images", "must be >= 1", self.balance_images)


@dataclass(frozen=True)
class QuantizeConfig(_Section):
    # stage 4 (`yolocompress quantize`): ONNX Runtime static INT8 quantization (QDQ, uint8
    # activations, int8 weights) of the exported model
    calibration_images: int = 200         # training images the activation ranges are taken from
    # how activation ranges are set from them: minmax | entropy (KL; through quantize_static it
    # has 128 bins for 128 levels, one candidate range: it equals minmax) | percentile
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    percentile: float = 99.999            # percentile method: the share of values inside the range
    per_channel: bool = True              # one weight scale per output channel (else per tensor)
    # which ops run in INT8: "conv" = the convs (their inputs quantized, activations float between
    # them); "all" = every op ONNX Runtime can quantize (the mish arithmetic too)
    ops: Literal["conv", "all"] = "conv"
    # what stays in float: "decode" = the box decode after the detection convs (quantizing it
    # gives ~0 mAP); "detect" = that and the detection convs themselves
    keep_float: Literal["decode", "detect"] = "decode"
    # how the activations after the INT8 convs run: "lut" = mish and leaky as a 256-entry table
    # lookup on the uint8 codes (1.6-1.8x FP32 at batch 1 on the demo, docs/BENCHMARKS.md);
    # "float" = dequantized, mish as float arithmetic (about FP32's speed)
    activation: Literal["float", "lut"] = "lut"
    # 7-bit weights against int16 saturation on CPUs without VNNI; null = on exactly there
    reduce_range: Optional[bool] = None

    def _validate(self) -> None:
        _require(self.calibration_images >= 1, "calibration_images", "must be >= 1",
                 self.calibration_images)
        _require(50 < self.percentile < 100, "percentile", "must be in (50, 100)", self.percentile)


@dataclass(frozen=True)
class GateConfig(_StageBudget):
    # FBS dynamic channel gating (`yolocompress gate`, compress/gating.py): the share of each gated
    # conv's output channels an image keeps (k-WTA keeps ceil(density * C) by predicted saliency)
    density: float = 0.5
    # one density per pruning group (yolov4: G1-G5, in order) replacing `density`; empty = none
    densities: tuple[float, ...] = ()
    l1: float = 1e-3                      # weight of the L1 term on the saliencies g ("gate")

    def _validate(self) -> None:
        super()._validate()
        _require(0 < self.density <= 1, "density", "must be in (0, 1]", self.density)
        _require(all(0 < d <= 1 for d in self.densities), "densities",
                 "must be fractions in (0, 1]", list(self.densities))
        _require(self.l1 >= 0, "l1", "must be >= 0", self.l1)


@dataclass(frozen=True)
class PipelineConfig(_Section):
    # an artifact `yolocompress pipeline` adopts as this experiment's baseline stage (copied into
    # runs/<name>/baseline/) instead of training one; null = train it. `yolocompress train`
    # always trains (--force over an adopted copy), which is how a shipped baseline is reproduced.
    baseline: Optional[str] = field(default=None, metadata=_PATH)
    # likewise a sparse artifact trained from that baseline, adopted as the sparse stage (a
    # benchmark's shared starting point, which CPU training cannot reproduce bit for bit); null =
    # train it. `yolocompress sparse --force` trains it instead.
    sparse: Optional[str] = field(default=None, metadata=_PATH)
    # how the pruned model recovers (both train distill.epochs / .steps at distill.lr):
    # "finetune" = plain fine-tuning on the detection loss (runs/<name>/finetuned/); "distill" =
    # the method's stage 3, spatial-attention distillation from the sparse model (distilled/).
    # Fine-tuning is the default because it wins on the protocol benchmark (docs/BENCHMARKS.md:
    # at -50 % FLOPs distillation costs 2.1 points, behind on every seed)
    recovery: Literal["finetune", "distill"] = "finetune"
    # run stage 4 after the recovery: the recovered model's FP32 and INT8 ONNX in
    # runs/<name>/quantized/ (the `quantize` section), scored in ONNX Runtime in the report
    quantize: bool = False


@dataclass(frozen=True)
class BenchConfig(_Section):
    # `yolocompress bench compress`: FLOPs reductions to compare the arms at, the arms
    # (the names of stages.ARMS, default all) and the recovery seeds
    budgets: tuple[float, ...] = (0.35, 0.5, 0.65)
    arms: tuple[str, ...] = tuple(ARMS)
    seeds: tuple[int, ...] = (0, 1, 2)
    # the scratch arm (the pruned architecture from random init) is the expensive one: its seeds,
    # epochs (null: the epochs behind the sparse model plus a recovery's) and lr (null: train.lr)
    scratch_seeds: tuple[int, ...] = (0,)
    scratch_epochs: Optional[int] = None
    scratch_lr: Optional[float] = None
    # the ours_iterative arm: prunes to reach each budget, a fine-tune between them (the recovery
    # epochs split evenly, so it trains no longer than the one-shot arms)
    iterative_steps: int = 3
    # `yolocompress bench ablation`: one budget, every factor over these seeds
    ablation_budget: float = 0.5
    ablation_seeds: tuple[int, ...] = (0, 1)

    def _validate(self) -> None:
        _require(len(self.budgets) >= 1 and all(0 < b < 1 for b in self.budgets), "budgets",
                 "must be a non-empty list of fractions in (0, 1)", list(self.budgets))
        recoveries = recovery_stages()
        known = [a for a, arm in ARMS.items() if arm.recovery in (*recoveries, "pipeline")]
        _require(len(self.arms) >= 1 and all(a in known for a in self.arms), "arms",
                 f"must be a non-empty list of {', '.join(known)}", list(self.arms))
        _require(self.scratch_epochs is None or self.scratch_epochs >= 1, "scratch_epochs",
                 "must be >= 1 or null", self.scratch_epochs)
        _require(self.iterative_steps >= 2, "iterative_steps", "must be >= 2",
                 self.iterative_steps)
        _require(self.scratch_lr is None or self.scratch_lr > 0, "scratch_lr", "must be > 0 or "
                 "null", self.scratch_lr)
        for name in ("seeds", "ablation_seeds", "scratch_seeds"):
            v = getattr(self, name)
            _require(len(v) >= 1 and len(set(v)) == len(v) and all(x >= 0 for x in v), name,
                     "must be a non-empty list of distinct seeds >= 0", list(v))
        _require(0 < self.ablation_budget < 1, "ablation_budget", "must be in (0, 1)",
                 self.ablation_budget)


@dataclass(frozen=True)
class Config(_Section):
    # experiment name (runs/<name>/); load_config: the file's stem (a _base_'s name is not inherited)
    name: Optional[str] = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    source: Optional[str] = None          # absolute path of the experiment file, set by load_config

    def _validate(self) -> None:
        _require(self.name is None or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name) is not None,
                 "name", "must be letters, digits, '.', '_' or '-' (it names a folder)", self.name)

    def to_dict(self) -> dict[str, Any]:
        """The experiment as plain JSON-able data (lists, not tuples); `config_from_dict` inverts it."""
        return _plain(self)

    def resolve_path(self, value: str | os.PathLike[str]) -> Path:
        """Absolute path of `value` by the path rule: beside `source` if it exists there, else cwd."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        if self.source is not None:
            beside = Path(self.source).parent / p
            if beside.exists():
                return Path(os.path.abspath(beside))
        return Path(os.path.abspath(p))

    def require_file(self, key: str) -> Path:
        """Resolved path of the path key `key` (e.g. 'model.cfg'); an error if no file is there."""
        section, _, leaf = key.partition(".")
        if (section, leaf) not in _path_keys():
            raise YoloCompressError(f"'{key}' is not a path key; path keys: "
                                    + ", ".join(".".join(k) for k in _path_keys()))
        value = getattr(getattr(self, section), leaf)
        if value is None:
            raise YoloCompressError(f"{self.source or 'config'}: {key} is not set")
        path = self.resolve_path(value)
        if not path.is_file():
            places = [str(path)]
            if self.source is not None and not Path(value).expanduser().is_absolute():
                places.insert(0, str(Path(os.path.abspath(Path(self.source).parent / value))))
            raise YoloCompressError(f"{self.source or 'config'}: {key} file {value!r} not found "
                                    f"(looked for {' and '.join(places)})")
        return path

    @property
    def cfg_path(self) -> Path:
        return self.resolve_path(self.model.cfg)

    @property
    def weights_path(self) -> Path | None:
        return None if self.model.weights is None else self.resolve_path(self.model.weights)

    @property
    def data_path(self) -> Path:
        return self.resolve_path(self.data.descriptor)


def load_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Config:
    """Read an experiment YAML (with `_base_` inheritance), apply `a.b=c` overrides, validate."""
    path = Path(path)
    where = str(path)
    origins: dict[str, str] = {}
    merged = _read_tree(path, (), Path(os.path.abspath(path)).parent, origins)
    for text in overrides:
        _apply_override(merged, text, where)
        origins[text.partition("=")[0].strip()] = f"{where}: override {text!r}"
    if merged.get("name") is None:
        merged["name"] = path.stem
    merged["source"] = os.path.abspath(path)
    try:
        return _build(Config, merged)
    except YoloCompressError as e:
        raise YoloCompressError(f"{_origin(str(e), origins, where)}: {e}") from e


def _origin(message: str, origins: Mapping[str, str], default: str) -> str:
    """Where the key a validation message starts with ('train.lr: ...') was set: 'file:line' or
    'file: override ...'; a cross-key check names its section's line; `default` if unknown."""
    key = message.partition(":")[0]
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return default


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild and validate a `Config` from `Config.to_dict()` output (e.g. stored in an artifact)."""
    if not isinstance(d, Mapping):
        raise YoloCompressError(f"config: expected a mapping, got {_show(d)}")
    _check_keys(d, Config, lambda key: "config dict")
    try:
        return _build(Config, d)
    except YoloCompressError as e:
        raise YoloCompressError(f"config dict: {e}") from e


def dump_yaml(config: Config, path: str | os.PathLike[str]) -> None:
    """Write `config` as a stand-alone experiment YAML, atomically (temp file + rename).

    Path values are written absolute (as resolved now), so the file loads from any folder;
    `source` is left out (load_config sets it).
    """
    d = config.to_dict()
    del d["source"]
    for section, key in _path_keys():
        if d[section][key] is not None:
            d[section][key] = str(config.resolve_path(d[section][key]))
    text = f"# resolved experiment {config.name!r}" + (
        f", from {config.source}" if config.source else "") + "\n"
    text += yaml.safe_dump(d, sort_keys=False, default_flow_style=False)
    path = Path(path)
    try:
        with atomic_open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot write config: {e.strerror or e}") from e


# --- loading -----------------------------------------------------------------------------------

def _read_tree(path: Path, chain: tuple[Path, ...], top: Path, origins: dict[str, str]
               ) -> dict[str, Any]:
    """The file's mapping deep-merged over its `_base_` chain; keys checked against the file.

    `origins` gets 'file:line' of every key, the child's where it overrides a base. A relative path
    value in a file outside `top` (the folder of the experiment given to load_config) is made
    absolute against that file's folder when it exists there (the path rule, applied to the file
    that wrote it); values in `top`'s own files stay as written."""
    real = path.resolve()
    if real in chain:
        cycle = " -> ".join(p.name for p in (*chain, real))
        raise YoloCompressError(f"{path}: _base_ cycle: {cycle}")
    data, lines = _read_yaml(path)
    here = {key: f"{path}:{line}" for key, line in lines.items()}
    base = data.pop("_base_", None)
    _check_keys(data, Config, lambda key: here.get(key, str(path)))
    if "source" in data:
        raise YoloCompressError(f"{here.get('source', path)}: 'source' is set by load_config from "
                                f"the file path; remove it")
    if Path(os.path.abspath(path)).parent != top:
        _anchor_paths(data, Path(os.path.abspath(path)).parent)
    if base is None:
        origins.update(here)
        return data
    if not isinstance(base, str) or not base:
        raise YoloCompressError(f"{here.get('_base_', path)}: _base_ must be a YAML file name, got "
                                f"a {type(base).__name__}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise YoloCompressError(f"{here.get('_base_', path)}: _base_ file {base_path} not found")
    parent = _read_tree(base_path, (*chain, real), top, origins)
    parent.pop("name", None)  # each experiment is named after its own file unless it says otherwise
    origins.update(here)
    return _deep_merge(parent, data)


def _anchor_paths(data: dict[str, Any], folder: Path) -> None:
    """Relative path values of `data` that exist beside `folder` become absolute (in place)."""
    for section, key in _path_keys():
        node = data.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() \
                and (folder / value).exists():
            node[key] = os.path.abspath(folder / value)


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's top-level mapping and the line of every dotted key in it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise YoloCompressError(f"{path}: experiment file not found") from e
    except IsADirectoryError as e:
        raise YoloCompressError(f"{path}: is a folder, not an experiment file") from e
    except UnicodeDecodeError as e:
        raise YoloCompressError(f"{path}: not a text (UTF-8) file") from e
    except OSError as e:
        raise YoloCompressError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise YoloCompressError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from e
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise YoloCompressError(f"{path}: expected a mapping of sections at the top, got "
                                f"{_kind(data)}")
    lines: dict[str, int] = {}
    _key_lines(node, "", lines)
    return data, lines


def _key_lines(node: Any, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                key = f"{prefix}{k.value}"
                out[key] = k.start_mark.line + 1
                _key_lines(v, f"{key}.", out)


def _kind(value: Any) -> str:
    """What a value is, in a few words (not the value: that may be a whole file)."""
    if isinstance(value, str):
        return f"a string of {len(value)} characters" if len(value) > 40 else repr(value)
    return f"a {type(value).__name__}"


def _deep_merge(base: dict[str, Any], child: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(out.get(key), dict) and (isinstance(value, Mapping) or value is None):
            out[key] = _deep_merge(out[key], value or {})  # an empty `train:` keeps the base's train
        else:
            out[key] = value
    return out


def _apply_override(merged: dict[str, Any], text: str, where: str) -> None:
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise YoloCompressError(f"{where}: override {text!r} is not of the form key=value")
    tp = _leaf_type(key, f"{where}: override {text!r}")
    try:
        value = _convert(_parse_text(raw.strip(), tp), tp)
    except ValueError as e:
        raise YoloCompressError(f"{where}: override {key}={raw.strip()}: {e}") from e
    *sections, leaf = key.split(".")
    node = merged
    for s in sections:
        if not isinstance(node.get(s), dict):
            node[s] = {}
        node = node[s]
    node[leaf] = value


def _leaf_type(key: str, where: str) -> Any:
    """Declared type of a dotted key that names a value (not a section); unknown keys are errors."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            raise YoloCompressError(_unknown(".".join(parts[: i + 1]), where))
        cls = hints[part]
        if i < len(parts) - 1 and not is_dataclass(cls):
            raise YoloCompressError(_unknown(key, where))
    if is_dataclass(cls):
        raise YoloCompressError(f"{where}: '{key}' is a section; set its keys, e.g. {key}.<key>=value")
    if key == "source":
        raise YoloCompressError(f"{where}: 'source' is set by load_config from the file path")
    return cls


def _parse_text(raw: str, tp: Any) -> Any:
    """Override text -> value; a string field keeps the text verbatim (`name=2024` stays a string)."""
    inner, optional = _strip_optional(tp)
    if optional and raw in _NULLS:
        return None
    if inner is str or typing.get_origin(inner) is Literal:
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"not a valid value ({' '.join(str(e).split())})") from e


# --- schema ------------------------------------------------------------------------------------

def _build(cls: Any, data: Mapping[str, Any]) -> Any:
    """Construct `cls` from a mapping whose keys were checked; nested sections are mappings (or null)."""
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if is_dataclass(tp):
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise YoloCompressError(f"{key}: expected a mapping of {key} keys, got {_show(value)}")
            try:
                value = _build(tp, value)
            except YoloCompressError as e:
                raise YoloCompressError(f"{key}.{e}") from e
        kwargs[key] = value
    return cls(**kwargs)


def _check_keys(data: Mapping[str, Any], cls: Any, where: Any, prefix: str = "") -> None:
    """Unknown keys are errors; `where(dotted key)` says where the key was written."""
    hints = _hints(cls)
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in hints:
            raise YoloCompressError(_unknown(path, where(path)))
        if is_dataclass(hints[key]) and isinstance(value, Mapping):
            _check_keys(value, hints[key], where, f"{path}.")


def _unknown(path: str, where: str) -> str:
    """'unknown key ...' with the closest valid key: a near spelling in the same section, else the
    same key in another section (the section itself is valid: checking stops at the first bad part)."""
    valid = _valid_keys()
    prefix, _, leaf = path.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in valid if k.rpartition(".")[0] == prefix}
    near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
    close = [siblings[near[0]]] if near else [k for k in valid if k.rpartition(".")[2] == leaf]
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{where}: unknown key '{path}'{hint}"


@functools.cache
def _valid_keys() -> tuple[str, ...]:
    """Every dotted key of the table, sections included (e.g. 'train', 'train.lr')."""
    out: list[str] = []

    def walk(cls: Any, prefix: str) -> None:
        for name, tp in _hints(cls).items():
            out.append(prefix + name)
            if is_dataclass(tp):
                walk(tp, f"{prefix}{name}.")

    walk(Config, "")
    return tuple(k for k in out if k != "source")


@functools.cache
def _path_keys() -> tuple[tuple[str, str], ...]:
    """(section, key) of every field marked as a path (metadata=_PATH)."""
    return tuple((name, f.name) for name, tp in _hints(Config).items() if is_dataclass(tp)
                 for f in fields(tp) if f.metadata.get("path"))


@functools.cache
def _hints(cls: Any) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# --- values ------------------------------------------------------------------------------------

def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _strip_optional(tp)
    if optional:
        return f"{_describe(inner)} or null"
    if typing.get_origin(inner) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(inner))
    if typing.get_origin(inner) is tuple:
        if (typing.get_args(inner) or (float,))[0] is str:
            return "a list of strings, e.g. [conv54, conv85]"
        return "a list of numbers, e.g. [0.8, 0.9]"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}[inner]


def _convert(value: Any, tp: Any) -> Any:
    """`value` as the declared type `tp`, or ValueError('expected ..., got ...')."""
    inner, optional = _strip_optional(tp)
    if value is None and optional:
        return None
    out = _convert_plain(value, inner)
    if out is _BAD:
        raise ValueError(f"expected {_describe(tp)}, got {_show(value)}")
    return out


_BAD = object()


def _convert_plain(value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) is Literal:
        return value if isinstance(value, str) and value in typing.get_args(tp) else _BAD
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)):
            return _BAD
        elem = (typing.get_args(tp) or (float,))[0]
        items = [_convert_plain(v, elem) for v in value]
        return _BAD if any(v is _BAD for v in items) else tuple(items)
    if tp is bool:
        if isinstance(value, str):
            return {"true": True, "false": False}.get(value.strip().lower(), _BAD)
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        return _BAD
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                return _BAD
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return _BAD
        return float(value) if math.isfinite(value) else _BAD
    if tp is str:
        return value if isinstance(value, str) else _BAD
    raise TypeError(f"config field type {tp!r} is not supported")


def _require(ok: bool, name: str, requirement: str, value: Any) -> None:
    if not ok:
        raise YoloCompressError(f"{name}: {requirement}, got {_show(value)}")


def _show(value: Any) -> str:
    text = "null" if value is None else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
