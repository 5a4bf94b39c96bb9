"""Stage 3, spatial attention distilling: attention maps of a teacher and its channel-pruned student
at named layers, the AT loss, the method's layer choice by role, and `DistillCriterion`, which adds
"at" = sum_l beta_l * AT_l (and optionally a logit term "kd" and a teacher-bounded box term
"box_kd") to the student's detection loss, all three times a weight that `DistillDecayHook` can
lower over the recovery (`decay_factor`).

Attention map (attention transfer, Zagoruyko & Komodakis): Q(F) = vec(mean_c |F_c|^p) / ||.||_2,
one unit vector per image over the H*W positions, so channel counts may differ.

Reduction. The method's loss per layer is the mean over batch and positions of (Q_s - Q_t)^2, i.e.
mean_b ||Q_s - Q_t||^2 / (H*W). ||Q_s - Q_t||^2 (in [0, 2]) does not depend on the resolution, so
that mean shrinks as 1/(H*W) with the input size and its betas (1e6 / 1e4 / 1e3) only mean what
they meant at the method's training size. `DistillCriterion` therefore divides by the number of
positions the layer has at REF_SIZE = 416 px, (416 / stride)^2, instead of the actual H*W: at
416 px this is the method's loss exactly, and the AT term is the same at any input size (and
does not jump with multi-scale training).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import YoloCompressError
from ..models.cfg import Block, input_layers
from ..models.darknet import Darknet
from ..models.roles import LayerInfo, describe_layers
from ..models.yolo import decode_head
from ..train.box_ops import IOU_KINDS, bbox_iou, xyxy_to_xywh
from ..train.distributed import unwrap
from ..train.engine import HookBase
from ..train.loss import assign_targets, prepare_targets

__all__ = ["REF_SIZE", "DEFAULT_BETAS", "TEACHER_BN", "attention_map", "at_loss", "ref_positions",
           "box_mask", "rule_beta", "default_distill_layers", "resolve_layers", "match_layers", "logit_kd",
           "bounded_box_kd", "batch_statistics", "DistillCriterion", "DistillLogHook", "DECAYS",
           "decay_factor", "DistillDecayHook"]

REF_SIZE = 416                    # input side at which the betas apply to the per-position mean
DEFAULT_BETAS = (1e6, 1e4, 1e3)   # backbone; neck+head at stride < 32; neck+head at stride >= 32
# how the teacher's BatchNorm normalises: like the training student, with the batch's own
# statistics ("batch"), or with its stored running statistics ("eval", the authors' choice)
TEACHER_BN = ("eval", "batch")
DECAYS = ("none", "linear", "cosine")   # DistillConfig.decay: the distillation terms' weight


def decay_factor(kind: str, progress: float) -> float:
    """The distillation terms' weight at `progress` (the share of the stage's optimizer steps done,
    Trainer.progress): 1 throughout for "none"; 1 - progress ("linear") or
    (1 + cos(pi * progress)) / 2 ("cosine"), which fall from 1 at the first step to 0 at the end."""
    if kind not in DECAYS:
        raise YoloCompressError(f"distill: decay must be one of {list(DECAYS)}, got {kind!r}")
    t = min(max(float(progress), 0.0), 1.0)
    if kind == "linear":
        return 1.0 - t
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def attention_map(f: Tensor, p: float = 2.0, mask: Tensor | None = None) -> Tensor:
    """(B, C, H, W) -> (B, H*W) float32: L2-normalised flatten(mean over channels of |F|^p).
    `mask` (B, H, W) multiplies the map before normalising (foreground-only attention); an
    all-zero map stays zero."""
    if f.dim() != 4:
        raise YoloCompressError(f"attention_map needs a (B, C, H, W) feature map, got "
                                f"{tuple(f.shape)}")
    f = f.float()
    a = (f.square() if p == 2 else f.abs().pow(p)).mean(1)
    if mask is not None:
        a = a * mask.to(a.dtype)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(fs: Tensor, ft: Tensor, p: float = 2.0, mask: Tensor | None = None,
            positions: float | None = None) -> Tensor:
    """Mean over the batch of ||Q(fs) - Q(ft)||^2 divided by `positions`; None = this map's H*W,
    which is the method's mean over batch and positions of the squared difference."""
    if fs.shape[0] != ft.shape[0] or fs.shape[-2:] != ft.shape[-2:]:
        raise YoloCompressError(f"at_loss: student map {tuple(fs.shape)} and teacher map "
                                f"{tuple(ft.shape)} differ in batch or spatial size")
    d = (attention_map(fs, p, mask) - attention_map(ft, p, mask)).square().sum(1).mean()
    return d / (positions if positions is not None else fs.shape[-2] * fs.shape[-1])


def ref_positions(stride: int) -> float:
    """Positions of a stride-`stride` layer at REF_SIZE x REF_SIZE input."""
    return (REF_SIZE / stride) ** 2


def box_mask(targets: Tensor, batch_size: int, size: tuple[int, int],
             img_size: tuple[int, int]) -> Tensor:
    """(B, H, W) float mask: 1 on the cells of an H x W map (over an h x w input) that a GT box of
    that image overlaps, or that hold its centre (so tiny boxes mark one cell). `targets` is the
    loss's (M, 6) [batch_index, class, x1, y1, x2, y2] in input pixels."""
    h, w = size
    device = targets.device if torch.is_tensor(targets) else None
    if not torch.is_tensor(targets) or targets.numel() == 0:
        return torch.zeros(batch_size, h, w, device=device)
    t = targets.detach().float()
    sy, sx = img_size[0] / h, img_size[1] / w

    def cover(lo: Tensor, hi: Tensor, n: int, s: float) -> Tensor:   # (M, n) cells hit
        edges = torch.arange(n, device=t.device, dtype=torch.float32) * s
        centre = ((lo + hi) / 2)[:, None]
        overlap = (edges[None] < hi[:, None]) & (edges[None] + s > lo[:, None])
        inside = (edges[None] <= centre) & (centre < edges[None] + s)
        return (overlap | inside).float()

    ys, xs = cover(t[:, 3], t[:, 5], h, sy), cover(t[:, 2], t[:, 4], w, sx)
    owner = F.one_hot(t[:, 0].long(), batch_size).float()                  # (M, B)
    rows = (owner[:, :, None] * ys[:, None, :]).reshape(len(t), batch_size * h)
    return (rows.T @ xs).reshape(batch_size, h, w).clamp_(max=1.0)


# ---- which layers --------------------------------------------------------------------------

def rule_beta(info: LayerInfo, betas: Sequence[float] = DEFAULT_BETAS) -> float:
    """The method's weight of a layer: betas[0] in the backbone, else betas[1] below stride 32,
    else betas[2]."""
    if info.part == "backbone":
        return float(betas[0])
    return float(betas[1] if info.stride < 32 else betas[2])


def default_distill_layers(blocks: list[Block], betas: Sequence[float] = DEFAULT_BETAS
                           ) -> list[tuple[str, float]]:
    """The method's layers, found by role, in cfg order with `rule_beta` weights:
    - the backbone's stage outputs (role stage_out) at strides 2 to 16;
    - the layer feeding each [upsample] (the top-down neck's outputs at strides 32 and 16);
    - the head convs (role head: the 3x3 convs feeding the detection convs).
    yolov4: conv10 conv23 conv54 conv85 | conv117 (s32) conv127 (s16) | conv137 conv148 conv159,
    the authors' nine. yolov4-nano: conv10 conv20 conv33 conv46 | conv69 conv79 | conv89 conv100
    conv111. yolov3: shortcut4 shortcut11 shortcut36 shortcut61 | conv84 conv96 | conv80 conv92
    conv104. yolov4-tiny (one upsample, two heads): conv0 route8 route16 route24 | conv32 |
    conv28 conv35."""
    infos = describe_layers(blocks)
    picked = {i.index for i in infos
              if (i.part == "backbone" and i.role == "stage_out" and 2 <= i.stride <= 16)
              or i.role == "head"}
    for i, b in enumerate(blocks[1:]):
        if b.type == "upsample":
            picked.update(input_layers(blocks, i))
    picked.discard(-1)
    return [(infos[i].name, rule_beta(infos[i], betas)) for i in sorted(picked)]


def resolve_layers(blocks: list[Block], names: Sequence[str] = (), betas: Sequence[float] = (),
                   rule: Sequence[float] = DEFAULT_BETAS) -> list[tuple[str, float]]:
    """(name, beta) pairs: the defaults when `names` is empty; else `names` with `betas` (one per
    name) or, when `betas` is empty, the `rule_beta` of each named layer."""
    if len(rule) != 3 or any(b < 0 for b in rule):
        raise YoloCompressError(f"distill: the beta rule needs 3 values >= 0 (backbone, neck, "
                                f"stride-32), got {list(rule)}")
    if not names:
        if betas:
            raise YoloCompressError("distill: betas given without layers; name the layers too")
        return default_distill_layers(blocks, rule)
    infos = {i.name: i for i in describe_layers(blocks)}
    for n in names:
        if n not in infos:
            raise YoloCompressError(f"distill: no layer named '{n}' in the cfg (names look like "
                                    f"'conv54', 'route16', 'shortcut36')")
    if len(set(names)) != len(names):
        raise YoloCompressError(f"distill: a layer is named twice in {list(names)}")
    if betas and len(betas) != len(names):
        raise YoloCompressError(f"distill: {len(names)} layers but {len(betas)} betas")
    if any(b < 0 for b in betas):
        raise YoloCompressError(f"distill: betas must be >= 0, got {list(betas)}")
    return [(n, float(betas[k]) if betas else rule_beta(infos[n], rule))
            for k, n in enumerate(names)]


def match_layers(teacher: Darknet, student: Darknet, names: Sequence[str],
                 teacher_names: Sequence[str] | None = None) -> list[LayerInfo]:
    """The student's LayerInfo of each name, after checking that the teacher has the same layer
    (same kind and stride; named `teacher_names` there, default the same names, e.g. where
    layer pruning removed units: compress.layer_prune.source_names): the student must be a pruned
    copy of the teacher."""
    t_infos = {i.name: i for i in teacher.infos}
    s_infos = {i.name: i for i in student.infos}
    out = []
    for n, tn in zip(names, names if teacher_names is None else teacher_names):
        for who, infos, name in (("teacher", t_infos, tn), ("student", s_infos, n)):
            if name not in infos:
                raise YoloCompressError(f"distill: layer '{name}' is not in the {who} "
                                        f"({len(infos)} layers); the student must be a pruned "
                                        f"copy of the teacher")
        t, s = t_infos[tn], s_infos[n]
        if (t.kind, t.stride) != (s.kind, s.stride):
            raise YoloCompressError(f"distill: layer '{n}' is a stride-{t.stride} {t.kind} in the "
                                    f"teacher but a stride-{s.stride} {s.kind} in the student")
        out.append(s)
    return out


# ---- logit distillation --------------------------------------------------------------------

def _logits(x: Tensor, num_anchors: int, new_coords: bool) -> Tensor:
    """(B, A*(5+C), H, W) -> (B, A, 5+C, H, W) float32 logits; new_coords heads hold
    probabilities, which are turned back into logits."""
    b, _, h, w = x.shape
    x = x.float().view(b, num_anchors, -1, h, w)
    return torch.logit(x.clamp(1e-6, 1 - 1e-6)) if new_coords else x


def _binary_kl(zs: Tensor, zt: Tensor) -> Tensor:
    """Elementwise KL(Bernoulli(sigmoid zt) || Bernoulli(sigmoid zs)), stable in the logits."""
    pt = torch.sigmoid(zt)
    return (F.binary_cross_entropy_with_logits(zs, pt, reduction="none")
            - F.binary_cross_entropy_with_logits(zt, pt, reduction="none"))


def logit_kd(student_heads: Sequence[Tensor], teacher_heads: Sequence[Tensor], specs,
             temperature: float = 1.0) -> Tensor:
    """Output distillation: T^2 * binary KL between teacher and student sigmoid(logit / T) on
    objectness (every prediction) and classes (weighted by the teacher's objectness probability,
    so background cells do not dominate); summed over predictions, divided by the batch size
    (the detection loss's reduction)."""
    total = student_heads[0].new_zeros((), dtype=torch.float32)
    for zs, zt, spec in zip(student_heads, teacher_heads, specs):
        zs = _logits(zs, spec.num_anchors, spec.new_coords)
        zt = _logits(zt.detach(), spec.num_anchors, spec.new_coords)
        obj = _binary_kl(zs[:, :, 4] / temperature, zt[:, :, 4] / temperature).sum()
        weight = torch.sigmoid(zt[:, :, 4:5])
        cls = (_binary_kl(zs[:, :, 5:] / temperature, zt[:, :, 5:] / temperature) * weight).sum()
        total = total + obj + cls
    return total * temperature ** 2 / student_heads[0].shape[0]


def bounded_box_kd(student_heads: Sequence[Tensor], teacher_heads: Sequence[Tensor], specs,
                   targets: Tensor, img_size: tuple[int, int], margin: float = 0.0) -> Tensor:
    """Teacher-bounded box regression (Chen et al., NeurIPS 2017) on the detection loss's own
    (GT, prediction) pairs (Darknet's assignment): the student's 1 - IoU(box, GT) counts where it
    exceeds the teacher's minus `margin` (l_s + margin > l_t), else 0, so the teacher bounds the
    term instead of being a target. IoU of each head's iou_loss kind (plain IoU for mse heads);
    summed over pairs, divided by the batch size."""
    batch = student_heads[0].shape[0]
    total = student_heads[0].new_zeros((), dtype=torch.float32)
    gts = prepare_targets(targets.to(student_heads[0].device) if torch.is_tensor(targets)
                          else targets, batch, specs[0].classes, img_size)
    for zs, zt, spec, asg in zip(student_heads, teacher_heads, specs,
                                 assign_targets(gts, specs, img_size)):
        if not len(asg.gt):
            continue
        h, w = zs.shape[-2:]
        rows = (asg.anchor * h + asg.gy) * w + asg.gx          # decode_head's row order
        bs = decode_head(zs.float(), spec, img_size)[asg.batch, rows, :4]
        bt = decode_head(zt.detach().float(), spec, img_size)[asg.batch, rows, :4]
        gt = xyxy_to_xywh(gts[asg.gt, 2:])
        kind = spec.iou_loss if spec.iou_loss in IOU_KINDS else "iou"
        ls = 1 - bbox_iou(bs, gt, kind, fmt="xywh")
        lt = 1 - bbox_iou(bt, gt, kind, fmt="xywh")
        total = total + torch.where(ls + margin > lt, ls, torch.zeros_like(ls)).sum()
    return total / batch


# ---- the criterion -------------------------------------------------------------------------

@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, every BatchNorm of `model` normalises with the batch's statistics and
    leaves its running statistics untouched; its modes are restored on exit."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.track_running_stats) for m in bns]
    for m in bns:
        m.train()
        m.track_running_stats = False      # train mode without running stats: no update
    try:
        yield
    finally:
        for m, (training, track) in zip(bns, saved):
            m.train(training)
            m.track_running_stats = track


class _Replay:
    """Stands in for the student inside the wrapped detection criterion: calling it on the batch
    images returns the head outputs of the forward already run, so the student runs once."""

    def __init__(self, model: nn.Module, images: Tensor, heads: list[Tensor]):
        self._model, self._images, self._heads = model, images, heads

    def __call__(self, x: Tensor, *args: Any, **kwargs: Any) -> list[Tensor]:
        if x is not self._images or args or kwargs:
            raise YoloCompressError("DistillCriterion: the wrapped criterion must call "
                                    "model(images) on the batch images only")
        return self._heads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class DistillCriterion:
    """criterion(model, batch) -> the wrapped criterion's terms + "at" (+ "kd" when output_kd,
    + "box_kd" when box_kd).

    One step: the teacher (eval mode, no grad, frozen, moved to the batch's device; with
    teacher_bn="batch" its BatchNorms use the batch's statistics, as the student's do) and the
    student (`model`, possibly DDP-wrapped; one forward with `features=layers`) both run on the
    batch images; the wrapped criterion gets the student's head outputs through a stand-in
    model; "at" = sum_l beta_l * at_loss(F_s, F_t, p, mask, ref_positions(stride_l)) in float32.
    "loss" is set to the sum of all terms. The beta-weighted per-layer values of the last call
    are in `last_layer_terms` (detached tensors), not in the returned dict: the trainer sums
    every returned key.
    """

    def __init__(self, criterion: Callable[[nn.Module, Sequence[Any]], dict], teacher: Darknet,
                 layers: Sequence[str], betas: Sequence[float], *, p: float = 2.0,
                 fg_mask: bool = False, output_kd: float | None = None,
                 kd_temperature: float = 1.0, teacher_bn: str = "batch",
                 box_kd: float = 0.0, box_kd_margin: float = 0.0,
                 teacher_layers: Sequence[str] | None = None) -> None:
        if not layers:
            raise YoloCompressError("distill: no layers to distill")
        if len(betas) != len(layers):
            raise YoloCompressError(f"distill: {len(layers)} layers but {len(betas)} betas")
        if len(set(layers)) != len(layers):
            raise YoloCompressError(f"distill: a layer is named twice in {list(layers)}")
        if any(b < 0 for b in betas):
            raise YoloCompressError(f"distill: betas must be >= 0, got {list(betas)}")
        if p <= 0:
            raise YoloCompressError(f"distill: p must be > 0, got {p}")
        if output_kd is not None and output_kd < 0:
            raise YoloCompressError(f"distill: output_kd must be >= 0 or None, got {output_kd}")
        if kd_temperature <= 0:
            raise YoloCompressError(f"distill: kd_temperature must be > 0, got {kd_temperature}")
        if box_kd < 0:
            raise YoloCompressError(f"distill: box_kd must be >= 0, got {box_kd}")
        if teacher_bn not in TEACHER_BN:
            raise YoloCompressError(f"distill: teacher_bn must be one of {list(TEACHER_BN)}, got "
                                    f"{teacher_bn!r}")
        self.teacher_bn = teacher_bn
        self.box_kd, self.box_kd_margin = float(box_kd), float(box_kd_margin)
        self.criterion, self.teacher = criterion, teacher
        self.layers, self.betas = list(layers), [float(b) for b in betas]
        # the same layers' names in the teacher (they differ where residual units were removed)
        self.teacher_layers = list(layers if teacher_layers is None else teacher_layers)
        if len(self.teacher_layers) != len(self.layers):
            raise YoloCompressError(f"distill: {len(layers)} layers but "
                                    f"{len(self.teacher_layers)} teacher layers")
        self.p, self.fg_mask = float(p), bool(fg_mask)
        self.output_kd, self.kd_temperature = float(output_kd or 0.0), float(kd_temperature)
        teacher.requires_grad_(False)
        teacher.eval()
        self.last_layer_terms: dict[str, Tensor] = {}
        self.scale = 1.0                     # on every distillation term; DistillDecayHook sets it
        self._checked: int | None = None
        self._positions: list[float] = []

    def _check(self, student: nn.Module) -> None:
        if self._checked == id(student):
            return
        if not isinstance(student, Darknet):
            raise YoloCompressError(f"distill: the student must be a Darknet model, got "
                                    f"{type(student).__name__}")
        infos = match_layers(self.teacher, student, self.layers, self.teacher_layers)
        self._positions = [ref_positions(i.stride) for i in infos]
        if self.output_kd or self.box_kd:
            layout = [[(h.classes, h.mask, h.new_coords, h.anchors.tolist())
                       for h in m.heads]
                      for m in (self.teacher, student)]
            if layout[0] != layout[1]:
                raise YoloCompressError("distill: output_kd / box_kd need teacher and student heads "
                                        "with the same classes, anchors and coordinates")
        self._checked = id(student)

    def __call__(self, model: nn.Module, batch: Sequence[Any]) -> dict[str, Tensor]:
        images, targets = batch[0], batch[1]
        student = unwrap(model)
        self._check(student)
        teacher = self.teacher
        if next(teacher.parameters()).device != images.device:
            teacher.to(images.device)
        teacher.eval()                       # whatever train() calls reached it
        stats = batch_statistics(teacher) if self.teacher_bn == "batch" else nullcontext()
        with torch.no_grad(), stats:
            t_heads, t_feats = teacher(images, features=self.teacher_layers)
        heads, feats = model(images, features=self.layers)
        terms = dict(self.criterion(_Replay(model, images, heads), batch))
        # the engine's rule: "loss" is the criterion's own sum unless it is the only term
        terms = {"det": terms["loss"]} if set(terms) == {"loss"} else \
            {k: v for k, v in terms.items() if k != "loss"}
        per_layer = {}
        for name, t_name, beta, positions in zip(self.layers, self.teacher_layers, self.betas,
                                                  self._positions):
            fs, ft = feats[name], t_feats[t_name]
            if fs.shape[-2:] != ft.shape[-2:]:
                raise YoloCompressError(f"distill: layer '{name}' is {tuple(fs.shape[-2:])} in the "
                                        f"student but {tuple(ft.shape[-2:])} in the teacher")
            mask = box_mask(targets, fs.shape[0], fs.shape[-2:], images.shape[-2:]) \
                if self.fg_mask else None
            per_layer[name] = beta * at_loss(fs, ft, self.p, mask, positions)
        terms["at"] = self.scale * torch.stack(list(per_layer.values())).sum()
        if self.output_kd:
            terms["kd"] = self.scale * self.output_kd * logit_kd(heads, t_heads, student.heads,
                                                                 self.kd_temperature)
        if self.box_kd:
            terms["box_kd"] = self.scale * self.box_kd * bounded_box_kd(
                heads, t_heads, student.heads, targets, tuple(images.shape[-2:]),
                self.box_kd_margin)
        terms["loss"] = torch.stack([v.reshape(()).float() for v in terms.values()]).sum()
        self.last_layer_terms = {k: v.detach() for k, v in per_layer.items()}
        return terms


class DistillDecayHook(HookBase):
    """Sets `trainer.criterion.scale` (a DistillCriterion's weight on its distillation terms) to
    decay_factor(kind, trainer.progress) before every micro-batch. Stateless: a resumed run gets
    the same weights from its step count."""

    priority = 10                          # a schedule

    def __init__(self, kind: str) -> None:
        decay_factor(kind, 0.0)            # an unknown kind fails here, not at the first step
        self.kind = kind

    def before_step(self) -> None:
        self.trainer.criterion.scale = decay_factor(self.kind, self.trainer.progress)


class DistillLogHook(HookBase):
    """Epoch means of the criterion's per-layer AT values (beta-weighted) into trainer.storage as
    "at/<layer>", so LoggerHook (priority 70) writes them to the CSV and TensorBoard. Reads
    `trainer.criterion.last_layer_terms` after every micro-batch::

        after_backward(): sums[layer] += value (on the device, no sync)
        after_epoch():    storage["at/<layer>"] = sums / count; reset
    """

    priority = 60

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def after_backward(self) -> None:
        terms = getattr(self.trainer.criterion, "last_layer_terms", {})
        for k, v in terms.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._count += bool(terms)

    def after_epoch(self) -> None:
        for k, v in self._sums.items():
            self.trainer.storage[f"at/{k}"] = float(v) / max(self._count, 1)
        self._sums, self._count = {}, 0

    def state_dict(self) -> dict:
        if not self._count:
            return {}
        return {"sums": {k: float(v) for k, v in self._sums.items()}, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        self._sums = {k: torch.tensor(v) for k, v in state.get("sums", {}).items()}
        self._count = int(state.get("count", 0))
