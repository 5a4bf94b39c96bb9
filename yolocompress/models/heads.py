"""What a [yolo] block says about its head: anchors, stride and loss hyper-parameters.

The model's forward returns, per head, a raw tensor (B, A*(5+C), H, W) laid out per anchor as
[tx, ty, tw, th, obj, cls_0 .. cls_{C-1}] (Darknet order). `HeadSpec` is what decode and the
loss need to interpret it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["HeadSpec"]


@dataclass(frozen=True)
class HeadSpec:
    name: str                  # layer name of the [yolo] block, e.g. "yolo_161"
    index: int                 # cfg layer index of the [yolo] block
    stride: int                # input pixels per output cell (8, 16, 32)
    classes: int
    mask: tuple[int, ...]      # indices into all_anchors used by this head
    all_anchors: np.ndarray    # (N, 2) float32 anchor w, h in input pixels (all heads)
    scale_x_y: float = 1.0
    new_coords: bool = False   # yolov4-csp: logistic already applied by the conv, wh = (2x)^2
    iou_thresh: float = 1.0    # extra in-mask anchors with anchor-shape IoU > this get the target
    ignore_thresh: float = 0.7
    truth_thresh: float = 1.0
    iou_normalizer: float = 0.75
    cls_normalizer: float = 1.0
    obj_normalizer: float = 1.0
    iou_loss: str = "mse"      # mse | iou | giou | diou | ciou
    max_delta: float = float("inf")
    label_smooth_eps: float = 0.0

    @property
    def anchors(self) -> np.ndarray:
        """(A, 2) anchors of this head in input pixels."""
        return self.all_anchors[list(self.mask)]

    @property
    def num_anchors(self) -> int:
        return len(self.mask)
