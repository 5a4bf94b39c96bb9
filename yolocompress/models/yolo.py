"""YOLO head decode and post-processing (confidence filter + class-aware NMS).

`decode` turns raw head outputs into (B, N, 5+C) rows [cx, cy, w, h, obj, p_0..p_{C-1}] in input
pixels, following Darknet: xy = sigmoid(t)*s - 0.5*(s-1) (s = scale_x_y), cx = (i + xy)*stride,
w = exp(tw)*anchor_w; with `new_coords` the conv already applied the logistic and w = (2*tw)^2*anchor_w.
`postprocess` keeps every (box, class) with obj*p_class > conf_thresh and runs NMS per class.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from .heads import HeadSpec

__all__ = ["decode", "decode_head", "postprocess", "BoxPredictions"]


def decode_head(out: torch.Tensor, head: HeadSpec, input_hw: tuple[int, int]) -> torch.Tensor:
    """One head's (B, A*(5+C), H, W) raw output -> (B, A*H*W, 5+C) decoded rows."""
    b, _, h, w = out.shape
    a = head.num_anchors
    p = out.view(b, a, 5 + head.classes, h, w).permute(0, 1, 3, 4, 2)
    s = head.scale_x_y
    stride_y, stride_x = input_hw[0] / h, input_hw[1] / w
    gy, gx = torch.meshgrid(torch.arange(h, device=out.device, dtype=out.dtype),
                            torch.arange(w, device=out.device, dtype=out.dtype), indexing="ij")
    anchors = torch.as_tensor(head.anchors, dtype=out.dtype, device=out.device).view(1, a, 1, 1, 2)
    if head.new_coords:
        xy, rest = p[..., :2], p[..., 4:]
        wh = (2 * p[..., 2:4]) ** 2 * anchors
    else:
        xy, rest = torch.sigmoid(p[..., :2]), torch.sigmoid(p[..., 4:])
        wh = torch.exp(p[..., 2:4]) * anchors
    xy = xy * s - 0.5 * (s - 1)
    cx = (gx + xy[..., 0]) * stride_x
    cy = (gy + xy[..., 1]) * stride_y
    boxes = torch.stack([cx, cy, wh[..., 0], wh[..., 1]], -1)
    return torch.cat([boxes, rest], -1).reshape(b, -1, 5 + head.classes)


def decode(outputs: Sequence[torch.Tensor], heads: Sequence[HeadSpec],
           input_hw: tuple[int, int]) -> torch.Tensor:
    """All heads -> (B, N, 5+C) rows [cx, cy, w, h, obj, class probs] in input pixels."""
    return torch.cat([decode_head(o, h, input_hw) for o, h in zip(outputs, heads)], 1)


@dataclass
class BoxPredictions:
    """Detections of one image: xyxy boxes (input pixels unless mapped), scores, labels."""
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


def postprocess(decoded: torch.Tensor, conf_thresh: float = 0.25, iou_thresh: float = 0.45,
                max_det: int = 300, max_candidates: int = 30000) -> list[BoxPredictions]:
    """Per image: every class with obj*p > conf_thresh is a candidate; class-aware NMS; top max_det."""
    results = []
    for rows in decoded:
        scores = rows[:, 4:5] * rows[:, 5:]
        idx, cls = (scores > conf_thresh).nonzero(as_tuple=True)
        conf = scores[idx, cls]
        if len(conf) > max_candidates:
            top = conf.topk(max_candidates).indices
            idx, cls, conf = idx[top], cls[top], conf[top]
        c = rows[idx, :4]
        boxes = torch.cat([c[:, :2] - c[:, 2:] / 2, c[:, :2] + c[:, 2:] / 2], 1)
        keep = batched_nms(boxes.float(), conf.float(), cls, iou_thresh)[:max_det]
        results.append(BoxPredictions(boxes[keep], conf[keep], cls[keep]))
    return results
