"""YOLOv4 training loss with the semantics of AlexeyAB Darknet's yolo_layer.c.

`YoloLoss(heads)(outputs, targets, (h, w))` -> {"box", "obj", "cls", "loss"}: `outputs` are the raw
head tensors (B, A*(5+C), H, W), `targets` one (M, 6) tensor [batch_index, class, x1, y1, x2, y2]
in input pixels.

What it does, and where it differs from Darknet:
- Targets are clipped to the input; boxes under 0.001 of its width or height are dropped (Darknet's
  loader rule), so zero-size boxes never reach a log or a division.
- Assignment: a GT goes to the cell holding its centre, with the best anchor over all anchors by
  anchor-shape IoU (boxes aligned at the origin) in whichever head masks it, plus every in-mask
  anchor of every head whose shape IoU exceeds that head's iou_thresh (< 1 enables the rule).
- Two GTs on one (anchor, cell): as in Darknet, not "the later wins": both box terms count, the
  class target is the union of their classes and, when iou_thresh < 1, each box term is divided by
  the number of classes at that slot (Darknet's averages_yolo_deltas).
- box: (1 - IoU/GIoU/DIoU/CIoU) x iou_normalizer in net-normalised units, or Darknet's "mse":
  0.5 (2 - w h) iou_normalizer |(xy, t_wh) - target|^2 (xy the decoded in-cell offset, t_wh raw).
- obj: BCE, target 1 on assigned slots, 0 elsewhere except unassigned predictions whose decoded
  box has IoU > ignore_thresh with a GT of their image (no loss there). AlexeyAB additionally
  requires some class probability > 0.25 for that exemption; we follow the plain rule.
  truth_thresh < 1 (Darknet's extra positives) is not implemented and refused.
- cls: BCE on assigned slots, targets y (1 - eps) + eps/2 (Darknet's label smoothing); scaled by
  cls_normalizer (Darknet applies it only with counters_per_class; yolov4 uses 1.0 anyway).
- Gradients are Darknet's deltas, not the exact gradient of the reported box value: d box / d raw
  is dL/d(bx, by, bw, bh) in net-normalised units with no decode Jacobian for x, y (Darknet skips
  sigmoid' * scale_x_y / grid) and exp(t) for w, h (x1 with new_coords), CIoU's alpha constant and
  its aspect gradient without 1/(w^2+h^2); each element clipped to +-max_delta in unscaled loss
  units, so AMP loss scaling does not move the clip. iou_normalizer 0.07 and max_delta 5 of the
  yolov4 recipe are calibrated for exactly these deltas (exact gradients are 1-2 orders of
  magnitude smaller).
  With new_coords (the conv already applied the logistic) obj/cls values are BCE on probabilities
  and their gradient w.r.t. the probability is Darknet's (p - target).
- Reduction: each term is summed over predictions and images, then divided by the batch size.
  Per image that is Darknet's summed deltas; Darknet's update divides the lr by the batch, so the
  Darknet lr (0.0013 for yolov4) applies unchanged and the scale does not depend on batch size.
  With gradient accumulation, average the micro-batch losses to keep that.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import YoloCompressError
from ..models.heads import HeadSpec
from ..models.yolo import decode_head
from .box_ops import IOU_KINDS, bbox_iou, xywh_to_xyxy, xyxy_to_xywh

__all__ = ["YoloLoss", "Assignment", "IOU_LOSSES", "prepare_targets", "assign_targets"]

IOU_LOSSES = ("mse",) + IOU_KINDS
_MIN_REL_SIZE = 1e-3        # Darknet's loader drops boxes with w or h < 0.001 of the input
_MAX_LOG_WH = 20.0          # cap on t_w, t_h in the exp(t) gradient factor
_BIG = 1e4                  # cap on decoded boxes (net-normalised) so a diverged net stays finite
_IGNORE_BLOCK = 1 << 24     # predictions x GTs per block of the ignore-IoU computation


class Assignment(NamedTuple):
    """(GT, prediction) pairs of one head, each (P,) int64: GT row, image, anchor slot, cell y, x"""
    gt: Tensor
    batch: Tensor
    anchor: Tensor
    gy: Tensor
    gx: Tensor


def _bad_row_reason(row: list[float], batch_size: int, num_classes: int) -> str:
    b, c, x1, y1, x2, y2 = row
    if not all(math.isfinite(v) for v in row):
        return "it holds NaN or inf"
    if b != int(b) or not 0 <= b < batch_size:
        return f"batch index must be an integer in [0, {batch_size})"
    if c != int(c) or not 0 <= c < num_classes:
        return f"class must be an integer in [0, {num_classes})"
    return "box has x2 < x1 or y2 < y1"


def prepare_targets(targets: Tensor, batch_size: int, num_classes: int,
                    img_size: tuple[int, int]) -> Tensor:
    """Checks (M, 6) targets [batch_index, class, x1, y1, x2, y2] and returns them as float32,
    clipped to the (h, w) input, without boxes narrower or shorter than 0.001 of it."""
    if not isinstance(targets, Tensor) or targets.dim() != 2 or targets.shape[1] != 6:
        if isinstance(targets, Tensor) and targets.numel() == 0:
            return targets.new_zeros((0, 6), dtype=torch.float32)
        shape = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise YoloCompressError(f"loss targets must be an (M, 6) tensor [batch_index, class, x1, "
                                f"y1, x2, y2], got {shape}")
    t = targets.detach().float()
    b, c, x1, y1, x2, y2 = t.unbind(1)
    bad = (~torch.isfinite(t).all(1) | (b != b.round()) | (b < 0) | (b >= batch_size)
           | (c != c.round()) | (c < 0) | (c >= num_classes) | (x2 < x1) | (y2 < y1))
    if bad.any():
        k = int(bad.nonzero()[0, 0])
        row = t[k].tolist()
        raise YoloCompressError(f"loss targets row {k} {[round(v, 3) for v in row]} is invalid: "
                                f"{_bad_row_reason(row, batch_size, num_classes)}")
    h, w = img_size
    xy = torch.stack((x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)), 1)
    size = xy[:, 2:] - xy[:, :2]
    keep = (size[:, 0] >= _MIN_REL_SIZE * w) & (size[:, 1] >= _MIN_REL_SIZE * h)
    return torch.cat((t[:, :2], xy), 1)[keep]


def _shape_iou(wh: Tensor, anchors: Tensor) -> Tensor:
    """(M, 2) GT sizes vs (N, 2) anchor sizes -> (M, N) IoU of the boxes aligned at the origin."""
    inter = torch.minimum(wh[:, None], anchors[None]).prod(-1)
    return inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)


def assign_targets(gts: Tensor, heads: Sequence[HeadSpec],
                   img_size: tuple[int, int]) -> list[Assignment]:
    """Darknet's target assignment for `prepare_targets` output; one `Assignment` per head.

    Pairs come GT-major (row order of `gts`), anchors ascending within a GT.
    """
    h_in, w_in = img_size
    wh = gts[:, 4:6] - gts[:, 2:4]
    centre = (gts[:, 2:4] + gts[:, 4:6]) / 2
    result = []
    for head in heads:
        anchors = torch.as_tensor(head.all_anchors, dtype=torch.float32, device=gts.device)
        shape_iou = _shape_iou(wh, anchors.view(-1, 2))
        best = shape_iou.argmax(1)  # first maximum, like Darknet's strict '>' scan
        mask = torch.as_tensor(head.mask, dtype=torch.long, device=gts.device)
        hit = best[:, None] == mask[None]
        if head.iou_thresh < 1.0:
            hit |= shape_iou[:, mask] > head.iou_thresh
        g, a = hit.nonzero(as_tuple=True)
        grid_h, grid_w = h_in // head.stride, w_in // head.stride
        gx = (centre[g, 0] / w_in * grid_w).long().clamp_(0, grid_w - 1)
        gy = (centre[g, 1] / h_in * grid_h).long().clamp_(0, grid_h - 1)
        result.append(Assignment(g, gts[g, 0].long(), a, gy, gx))
    return result


def _per_image(gts: Tensor, batch_size: int) -> Tensor:
    """GT boxes padded per image to (B, G, 4) xyxy; padding is the all-zero box, whose IoU with
    anything is 0."""
    b = gts[:, 0].long()
    counts = torch.bincount(b, minlength=batch_size)
    g = int(counts.max()) if len(gts) else 0
    order = torch.argsort(b, stable=True)
    b_sorted = b[order]
    pos = torch.arange(len(gts), device=gts.device) - (torch.cumsum(counts, 0) - counts)[b_sorted]
    boxes = gts.new_zeros((batch_size, g, 4))
    boxes[b_sorted, pos] = gts[order, 2:]
    return boxes


@torch.no_grad()
def _ignored(pred_xyxy: Tensor, gt_boxes: Tensor, thresh: float) -> Tensor:
    """(B, N) predictions whose best IoU with a GT of their image exceeds `thresh`."""
    batch, n = pred_xyxy.shape[:2]
    g = gt_boxes.shape[1]
    out = torch.zeros((batch, n), dtype=torch.bool, device=pred_xyxy.device)
    if g == 0 or thresh >= 1.0:
        return out
    step = max(1, _IGNORE_BLOCK // max(1, n * g))
    for s in range(0, batch, step):  # blocks of images bound the (B, N, G) IoU memory
        iou = bbox_iou(pred_xyxy[s:s + step, :, None], gt_boxes[s:s + step, None])
        out[s:s + step] = iou.amax(-1) > thresh
    return out


def _with_grad(value: Tensor, x: Tensor, grad: Tensor) -> Tensor:
    """`value` in the forward pass, d/dx = `grad` (elementwise) in the backward pass."""
    return value.detach() + (x - x.detach()) * grad.detach()


def _bce(x: Tensor, target: Tensor, probs: bool) -> Tensor:
    """Elementwise BCE on logits, or on probabilities (new_coords) with Darknet's gradient p - y."""
    if not probs:
        return F.binary_cross_entropy_with_logits(x, target, reduction="none")
    return _with_grad(F.binary_cross_entropy(x, target, reduction="none"), x, x - target)


def _darknet_rows(values: Tensor, raw: Tensor, slope: Tensor, fn: Callable[[Tensor], Tensor],
                  max_delta: float) -> Tensor:
    """Per-row loss fn(values) (P, 4) -> (P,) whose gradient w.r.t. `raw` is Darknet's delta:
    dfn/dvalues * slope, clipped to +-max_delta per element."""
    if not raw.requires_grad or len(values) == 0:  # no_grad / inference_mode, or no pairs
        return fn(values).detach()
    leaf = values.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = fn(leaf)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    # Darknet's fix_nan_inf zeroes non-finite deltas
    grad = torch.nan_to_num(grad * slope.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    if math.isfinite(max_delta):
        grad = grad.clamp(-max_delta, max_delta)
    return loss.detach() + ((raw - raw.detach()) * grad).sum(1)


class YoloLoss(nn.Module):
    """YOLOv4 loss over all [yolo] heads; see the module docstring for the exact semantics.

    `label_smoothing` overrides every head's cfg `label_smooth_eps` when given.
    """

    def __init__(self, heads: Sequence[HeadSpec], label_smoothing: float | None = None):
        super().__init__()
        self.heads = tuple(heads)
        if not self.heads:
            raise YoloCompressError("YoloLoss: the model has no [yolo] heads")
        classes = {h.classes for h in self.heads}
        if len(classes) != 1:
            raise YoloCompressError(f"YoloLoss: [yolo] heads disagree on classes: "
                                    f"{sorted(classes)}")
        self.num_classes = classes.pop()
        if label_smoothing is not None and not 0.0 <= label_smoothing < 1.0:
            raise YoloCompressError(f"YoloLoss: label_smoothing {label_smoothing} is not in [0, 1)")
        self.label_smoothing = label_smoothing
        for h in self.heads:
            if h.iou_loss not in IOU_LOSSES:
                raise YoloCompressError(f"{h.name}: iou_loss '{h.iou_loss}' is not one of "
                                        f"{', '.join(IOU_LOSSES)}")
            if h.truth_thresh < 1.0:
                raise YoloCompressError(f"{h.name}: truth_thresh={h.truth_thresh} < 1 is not "
                                        "supported by the loss (yolov4 uses 1)")
            if not h.mask or max(h.mask) >= len(h.all_anchors):
                raise YoloCompressError(f"{h.name}: mask {h.mask} does not index its "
                                        f"{len(h.all_anchors)} anchors")

    def _check_outputs(self, outputs: Sequence[Tensor], img_size: tuple[int, int]) -> int:
        if len(outputs) != len(self.heads):
            raise YoloCompressError(f"loss got {len(outputs)} head outputs for {len(self.heads)} "
                                    "[yolo] heads")
        if len(img_size) != 2 or min(img_size) <= 0:
            raise YoloCompressError(f"loss img_size must be (height, width), got {img_size}")
        batch = outputs[0].shape[0]
        if batch == 0:
            raise YoloCompressError("loss got an empty batch")
        for head, out in zip(self.heads, outputs):
            want = (batch, head.num_anchors * (5 + head.classes),
                    img_size[0] // head.stride, img_size[1] // head.stride)
            if (tuple(out.shape) != want or img_size[0] % head.stride or img_size[1] % head.stride):
                raise YoloCompressError(
                    f"{head.name}: output shape {tuple(out.shape)} does not fit input "
                    f"{img_size[0]}x{img_size[1]} at stride {head.stride} (expected {want})")
        return batch

    def forward(self, outputs: Sequence[Tensor], targets: Tensor,
                img_size: tuple[int, int]) -> dict[str, Tensor]:
        img_size = tuple(int(v) for v in img_size)
        batch = self._check_outputs(outputs, img_size)
        device = outputs[0].device
        with torch.autocast(device.type, enabled=False):
            if isinstance(targets, Tensor):
                targets = targets.to(device)
            gts = prepare_targets(targets, batch, self.num_classes, img_size)
            gt_boxes = _per_image(gts, batch)
            terms = torch.zeros(3, device=device)
            assignments = assign_targets(gts, self.heads, img_size)
            for head, out, asg in zip(self.heads, outputs, assignments):
                terms = terms + torch.stack(
                    self._head_terms(head, out.float(), gts, asg, gt_boxes, img_size))
        box, obj, cls = terms / batch
        return {"box": box, "obj": obj, "cls": cls, "loss": box + obj + cls}

    def _head_terms(self, head: HeadSpec, out: Tensor, gts: Tensor, asg: Assignment,
                    gt_boxes: Tensor, img_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """One head's (box, obj, cls) sums over its batch."""
        batch, _, grid_h, grid_w = out.shape
        na, nc = head.num_anchors, self.num_classes
        raw = out.view(batch, na, 5 + nc, grid_h, grid_w).permute(0, 1, 3, 4, 2)
        # NaN passes this check on purpose: the trainer reports a NaN loss by term
        if head.new_coords and bool(((raw < 0) | (raw > 1)).any()):
            raise YoloCompressError(f"{head.name}: new_coords head outputs must be probabilities "
                                    "in [0, 1] (the conv before it applies the logistic)")
        with torch.no_grad():
            boxes = decode_head(out, head, img_size)[..., :4].reshape(batch, na, grid_h, grid_w, 4)

        # slots: distinct (image, anchor, cell) with at least one GT
        key = ((asg.batch * na + asg.anchor) * grid_h + asg.gy) * grid_w + asg.gx
        slots, pair_slot = torch.unique(key, return_inverse=True)
        sb, sa = slots // (na * grid_h * grid_w), slots // (grid_h * grid_w) % na
        sy, sx = slots // grid_w % grid_h, slots % grid_w
        cls_hit = out.new_zeros((len(slots), nc))
        cls_hit[pair_slot, gts[asg.gt, 1].long()] = 1.0

        eps = head.label_smooth_eps if self.label_smoothing is None else self.label_smoothing
        cls = _bce(raw[sb, sa, sy, sx, 5:], cls_hit * (1 - eps) + 0.5 * eps, head.new_coords)
        cls = cls.sum() * head.cls_normalizer

        obj_target = torch.zeros_like(raw[..., 4])
        obj_target[sb, sa, sy, sx] = 1.0
        ignored = _ignored(xywh_to_xyxy(boxes).view(batch, -1, 4), gt_boxes,
                           head.ignore_thresh).view_as(obj_target)
        weight = (~ignored | (obj_target > 0)).float()
        obj = (_bce(raw[..., 4], obj_target, head.new_coords) * weight).sum() * head.obj_normalizer

        box = self._box_rows(head, raw, boxes, gts, asg, img_size)
        if head.iou_thresh < 1.0:  # Darknet averages a slot's box deltas over its classes
            box = box / cls_hit.sum(1)[pair_slot]
        return box.sum(), obj, cls

    @staticmethod
    def _box_rows(head: HeadSpec, raw: Tensor, boxes: Tensor, gts: Tensor, asg: Assignment,
                  img_size: tuple[int, int]) -> Tensor:
        """(P,) box loss per (GT, prediction) pair, carrying Darknet's delta as gradient."""
        h_in, w_in = img_size
        grid_h, grid_w = raw.shape[2:4]
        norm = raw.new_tensor([w_in, h_in, w_in, h_in])
        t = raw[asg.batch, asg.anchor, asg.gy, asg.gx, :4]
        pred = (boxes[asg.batch, asg.anchor, asg.gy, asg.gx] / norm).clamp(-_BIG, _BIG)
        gt = xyxy_to_xywh(gts[asg.gt, 2:]) / norm
        anchors = torch.as_tensor(head.anchors, dtype=raw.dtype, device=raw.device)[asg.anchor]
        anchors = anchors / norm[:2]
        gain = head.iou_normalizer

        if head.iou_loss == "mse":
            grid = raw.new_tensor([grid_w, grid_h])
            cell = torch.stack((asg.gx, asg.gy), 1).to(raw.dtype)
            if head.new_coords:
                t_wh = torch.sqrt(gt[:, 2:] / (4 * anchors))
            else:
                t_wh = torch.log(gt[:, 2:] / anchors)
            target = torch.cat((gt[:, :2] * grid - cell, t_wh), 1)
            scale = 2.0 - gt[:, 2] * gt[:, 3]
            values = torch.cat((pred[:, :2] * grid - cell, t[:, 2:]), 1)

            def fn(v: Tensor) -> Tensor:
                return 0.5 * gain * scale * ((v - target) ** 2).sum(1)
            return _darknet_rows(values, t, torch.ones_like(t), fn, math.inf)

        slope = torch.ones_like(t)
        if not head.new_coords:
            slope[:, 2:] = torch.exp(t[:, 2:].detach().clamp(max=_MAX_LOG_WH))

        def fn(v: Tensor) -> Tensor:
            overlap = bbox_iou(v, gt, head.iou_loss, fmt="xywh", stable_aspect_grad=True)
            return gain * (1.0 - overlap)
        return _darknet_rows(pred, t, slope, fn, head.max_delta)
