"""One annotation record type shared by every reader, and numpy box helpers.

A `Record` checks itself on construction: boxes are (N, 4) float32 xyxy in pixels of the
original image, labels (N,) int64, difficult (N,) bool.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Record", "pairwise_iou"]


@dataclass
class Record:
    image: str                       # absolute path of the image file
    width: int                       # original image width in pixels
    height: int                      # original image height in pixels
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    difficult: np.ndarray | None = None
    image_id: str = ""               # stable id; defaults to the image file's stem

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        n = len(self.boxes)
        if self.difficult is None:
            self.difficult = np.zeros(n, dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if len(self.labels) != n or len(self.difficult) != n:
            raise ValueError(
                f"{self.image}: {n} boxes but {len(self.labels)} labels and "
                f"{len(self.difficult)} difficult flags")
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"{self.image}: image size {self.width}x{self.height} is not positive")
        if not self.image_id:
            import os
            self.image_id = os.path.splitext(os.path.basename(self.image))[0]

    def __len__(self) -> int:
        return len(self.boxes)


def pairwise_iou(a: np.ndarray, b: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """IoU matrix (len(a), len(b)) of xyxy boxes; `plus_one` uses the VOC devkit's +1 pixel widths."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    one = 1.0 if plus_one else 0.0
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt + one, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)
