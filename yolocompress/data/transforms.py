"""Detection augmentations in numpy/cv2 with Darknet yolov4 semantics.

Images are HWC uint8 **RGB** (the dataset converts after `cv2.imread`); boxes are (N, 4) float xyxy in
continuous pixel coordinates (pixel i spans [i, i+1)), labels (N,). Geometric transforms return boxes
clipped to the image, with degenerate or mostly-cut-away boxes dropped (`filter_boxes`).
The functions take plain numbers; their ranges are checked once, in `config.AugmentConfig`.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

__all__ = ["PAD_VALUE", "letterbox", "resize", "scale_boxes", "filter_boxes",
           "random_affine", "augment_hsv", "hflip", "mosaic4"]

PAD_VALUE = 127  # Darknet fills letterbox borders and out-of-image crops with 0.5 grey


# ----------------------------------------------------------------------------- resizing

def _interp(scale: float) -> int:
    return cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR


def resize(img: np.ndarray, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Stretch to size x size (Darknet's default without letter_box); returns (img, (sx, sy))."""
    h, w = img.shape[:2]
    sx, sy = size / w, size / h
    out = cv2.resize(img, (size, size), interpolation=_interp(min(sx, sy)))
    return out, (sx, sy)


def letterbox(img: np.ndarray, size: int, color: int = PAD_VALUE
              ) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Fit into size x size keeping the aspect ratio, centred on a `color` border.

    Returns (img, (sx, sy), (padx, pady)): a point x maps to x * sx + padx. sx and sy are the exact
    scales of the rounded resized image, so they may differ from each other in the last digits.
    """
    h, w = img.shape[:2]
    r = min(size / w, size / h)
    nw, nh = max(1, int(round(w * r))), max(1, int(round(h * r)))
    padx, pady = (size - nw) // 2, (size - nh) // 2
    out = np.full((size, size) + img.shape[2:], color, dtype=img.dtype)
    out[pady:pady + nh, padx:padx + nw] = (
        img if (nw, nh) == (w, h) else cv2.resize(img, (nw, nh), interpolation=_interp(r)))
    return out, (nw / w, nh / h), (padx, pady)


def scale_boxes(boxes: np.ndarray, scale: tuple[float, float], pad: tuple[float, float] = (0, 0)) -> np.ndarray:
    """x * sx + px, y * sy + py on xyxy boxes (the forward map of `letterbox` / `resize`)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return b * np.array([scale[0], scale[1]] * 2, np.float32) + np.array([pad[0], pad[1]] * 2, np.float32)


def filter_boxes(boxes: np.ndarray, region: tuple[float, float, float, float], min_area_frac: float = 0.25,
                 min_size: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to `region` (x0, y0, x1, y1); keep those with width and height >= min_size px whose
    clipped area is >= min_area_frac of the unclipped one. Returns (clipped kept boxes, keep mask)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = region
    c = np.stack([b[:, 0].clip(x0, x1), b[:, 1].clip(y0, y1), b[:, 2].clip(x0, x1), b[:, 3].clip(y0, y1)], 1)
    w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
    area0 = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = (w >= min_size) & (h >= min_size) & (w * h >= min_area_frac * area0)
    return c[keep].astype(np.float32), keep


# ----------------------------------------------------------------------------- geometric

def random_affine(img: np.ndarray, boxes: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                  size: int, jitter: float = 0.3, translate: float = 0.0, degrees: float = 0.0,
                  letterbox: bool = False, fill: int = PAD_VALUE
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Darknet's jitter crop, then optional rotation/translation, rendered at size x size.

    The crop's left, right, top and bottom borders each move by uniform(-jitter, jitter) x the image
    side (out of the image is `fill`); the crop is stretched to the output. With `letterbox` the crop
    is first widened to a square about its centre, as Darknet's letter_box does, so the aspect ratio
    only changes by the jitter. Rotated boxes become the bounds of their rotated corners.
    """
    h, w = img.shape[:2]
    dl, dr = rng.uniform(-jitter, jitter, 2) * w
    dt, db = rng.uniform(-jitter, jitter, 2) * h
    if letterbox:  # grow the shorter side of the un-jittered image to the square output's aspect
        ex, ey = max(h - w, 0) / 2, max(w - h, 0) / 2
        dl, dr, dt, db = dl - ex, dr - ex, dt - ey, db - ey
    cx0, cy0, cw, ch = dl, dt, w - dl - dr, h - dt - db
    m = np.array([[size / cw, 0, -cx0 * size / cw], [0, size / ch, -cy0 * size / ch], [0, 0, 1]])
    if degrees or translate:
        a = np.deg2rad(rng.uniform(-degrees, degrees))
        t = rng.uniform(-translate, translate, 2) * size
        c, s, half = np.cos(a), np.sin(a), size / 2
        rot = np.array([[c, -s, half - c * half + s * half + t[0]],
                        [s, c, half - s * half - c * half + t[1]], [0, 0, 1]])
        m = rot @ m
    # cv2 addresses pixel centres by integer index: shift the continuous-coordinate map by half a pixel.
    to_idx = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]]) @ m @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    out = cv2.warpAffine(img, to_idx[:2], (size, size), flags=cv2.INTER_LINEAR,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=(fill,) * 3)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    corners = b[:, [0, 1, 2, 1, 2, 3, 0, 3]].reshape(-1, 4, 2)
    moved = corners @ m[:2, :2].T + m[:2, 2]
    nb = np.concatenate([moved.min(1), moved.max(1)], 1)
    kept, keep = filter_boxes(nb, (0, 0, size, size))
    return out, kept, np.asarray(labels)[keep]


def hflip(img: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: x1' = W - x2, x2' = W - x1."""
    w = img.shape[1]
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.ascontiguousarray(img[:, ::-1]), np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)


def mosaic4(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int, rng: np.random.Generator,
            fill: int = PAD_VALUE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Darknet mosaic: a cut point (cx, cy) uniform in [0.2, 0.8] x size splits the output into four
    quadrants (top-left, top-right, bottom-left, bottom-right); quadrant k shows a random window of
    parts[k] = (img, boxes, labels), whose boxes are shifted, clipped to the quadrant and filtered."""
    if len(parts) != 4:
        raise ValueError(f"mosaic4 needs 4 images, got {len(parts)}")
    cx, cy = (int(round(v * size)) for v in rng.uniform(0.2, 0.8, 2))
    quads = [(0, 0, cx, cy), (cx, 0, size, cy), (0, cy, cx, size), (cx, cy, size, size)]
    out = np.full((size, size, 3), fill, np.uint8)
    all_boxes, all_labels = [], []
    for (img, boxes, labels), (qx0, qy0, qx1, qy1) in zip(parts, quads):
        qw, qh = qx1 - qx0, qy1 - qy0
        h, w = img.shape[:2]
        ox = int(rng.integers(0, max(w - qw, 0) + 1))   # window origin inside the part
        oy = int(rng.integers(0, max(h - qh, 0) + 1))
        win = img[oy:oy + qh, ox:ox + qw]
        out[qy0:qy0 + win.shape[0], qx0:qx0 + win.shape[1]] = win
        shift = np.array([qx0 - ox, qy0 - oy] * 2, np.float32)
        # Clip to the part's own pixels too: where the part is smaller than the quadrant there is fill.
        region = (qx0, qy0, min(qx1, qx0 + win.shape[1]), min(qy1, qy0 + win.shape[0]))
        kept, keep = filter_boxes(np.asarray(boxes, np.float32).reshape(-1, 4) + shift, region)
        all_boxes.append(kept)
        all_labels.append(np.asarray(labels)[keep])
    return out, np.concatenate(all_boxes).astype(np.float32), np.concatenate(all_labels)


# ----------------------------------------------------------------------------- photometric

def _rand_scale(rng: np.random.Generator, s: float) -> float:
    """Darknet rand_scale: uniform in [1, s], inverted with probability 1/2."""
    if s in (0, 1):
        return 1.0
    f = rng.uniform(1.0, s)
    return f if rng.random() < 0.5 else 1.0 / f


def augment_hsv(img: np.ndarray, rng: np.random.Generator, hgain: float = 0.1, sgain: float = 1.5,
                vgain: float = 1.5) -> np.ndarray:
    """Shift hue by uniform(±hgain) of the circle; scale saturation and value by Darknet rand_scale.

    `img` is RGB uint8. With hgain 0 and sgain, vgain in {0, 1} the image is returned unchanged.
    """
    if hgain == 0 and sgain in (0, 1) and vgain in (0, 1):
        return img
    dh = rng.uniform(-hgain, hgain)
    fs, fv = _rand_scale(rng, sgain), _rand_scale(rng, vgain)
    h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL))  # hue on 0..255
    x = np.arange(256, dtype=np.float32)
    lut_h = (np.round(x + dh * 256) % 256).astype(np.uint8)
    lut_s = np.clip(np.round(x * fs), 0, 255).astype(np.uint8)
    lut_v = np.clip(np.round(x * fv), 0, 255).astype(np.uint8)
    hsv = cv2.merge([cv2.LUT(h, lut_h), cv2.LUT(s, lut_s), cv2.LUT(v, lut_v)])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
