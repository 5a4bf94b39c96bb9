"""IoU-family overlap (IoU, GIoU, DIoU, CIoU) of torch boxes in xyxy or xywh (centre) form.

`bbox_iou(a, b, kind, fmt)` broadcasts a (..., 4) against b (..., 4) and returns (...): aligned
pairs for equal shapes, a matrix for a[:, None] vs b[None]. Zero-size boxes give finite values.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import YoloCompressError

__all__ = ["IOU_KINDS", "BOX_FORMATS", "bbox_iou", "xywh_to_xyxy", "xyxy_to_xywh"]

IOU_KINDS = ("iou", "giou", "diou", "ciou")
BOX_FORMATS = ("xyxy", "xywh")
_V_SCALE = 4.0 / math.pi ** 2  # CIoU aspect-ratio term v = 4/pi^2 (atan(wb/hb) - atan(wa/ha))^2


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) centre x, y, width, height -> corners x1, y1, x2, y2."""
    c, wh = boxes[..., :2], boxes[..., 2:]
    return torch.cat((c - wh / 2, c + wh / 2), -1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """(..., 4) corners x1, y1, x2, y2 -> centre x, y, width, height."""
    p1, p2 = boxes[..., :2], boxes[..., 2:]
    return torch.cat(((p1 + p2) / 2, p2 - p1), -1)


def _aspect_term(wh_a: Tensor, wh_b: Tensor, eps: float, stable_grad: bool) -> Tensor:
    """CIoU's v. With `stable_grad` its value is unchanged but d v / d(w, h) drops the factor
    1 / (w^2 + h^2), as the CIoU paper and Darknet's dx_box_iou do (that factor explodes for small
    boxes in normalised units)."""
    wa, ha = wh_a.unbind(-1)
    wb, hb = wh_b.unbind(-1)
    diff = torch.atan(wb / (hb + eps)) - torch.atan(wa / (ha + eps))
    v = _V_SCALE * diff ** 2
    if not stable_grad:
        return v
    k = (-2.0 * _V_SCALE * diff).detach()
    # each bracket is exactly 0 in value; its gradient is (h, -w) for box a and (-h, w) for box b
    surrogate = (ha.detach() * wa - wa.detach() * ha) - (hb.detach() * wb - wb.detach() * hb)
    return v.detach() + k * surrogate


def bbox_iou(a: Tensor, b: Tensor, kind: str = "iou", fmt: str = "xyxy", eps: float = 1e-9,
             stable_aspect_grad: bool = False) -> Tensor:
    """IoU-family overlap of boxes `a` and `b` broadcast against each other: (..., 4) -> (...).

    giou = iou - (enclosing - union) / enclosing; diou = iou - centre_dist^2 / enclosing_diag^2;
    ciou = diou - alpha * v with alpha = v / (1 - iou + v) treated as a constant (no gradient), as
    in the CIoU paper. `eps` keeps zero-size boxes finite.
    """
    if kind not in IOU_KINDS:
        raise YoloCompressError(f"bbox_iou: kind '{kind}' is not one of {', '.join(IOU_KINDS)}")
    if fmt not in BOX_FORMATS:
        raise YoloCompressError(f"bbox_iou: fmt '{fmt}' is not one of {', '.join(BOX_FORMATS)}")
    if a.shape[-1] != 4 or b.shape[-1] != 4:
        raise YoloCompressError(f"bbox_iou: boxes must have 4 values in the last dimension, got "
                                f"shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if fmt == "xywh":
        ctr_a, wh_a, ctr_b, wh_b = a[..., :2], a[..., 2:], b[..., :2], b[..., 2:]
        a, b = xywh_to_xyxy(a), xywh_to_xyxy(b)
    else:
        ctr_a, wh_a = (a[..., :2] + a[..., 2:]) / 2, a[..., 2:] - a[..., :2]
        ctr_b, wh_b = (b[..., :2] + b[..., 2:]) / 2, b[..., 2:] - b[..., :2]
    lo = torch.maximum(a[..., :2], b[..., :2])
    hi = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (hi - lo).clamp(min=0).prod(-1)
    union = wh_a.prod(-1) + wh_b.prod(-1) - inter
    iou = inter / (union + eps)
    if kind == "iou":
        return iou
    enclosing = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    enclosing = enclosing.clamp(min=0)
    if kind == "giou":
        area = enclosing.prod(-1) + eps
        return iou - (area - union) / area
    diou = iou - ((ctr_a - ctr_b) ** 2).sum(-1) / ((enclosing ** 2).sum(-1) + eps)
    if kind == "diou":
        return diou
    v = _aspect_term(wh_a, wh_b, eps, stable_aspect_grad)
    with torch.no_grad():
        alpha = v / ((1.0 - iou) + v + eps)  # this order keeps eps in float32
    return diou - alpha * v
