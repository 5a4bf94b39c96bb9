"""YOLO decode against hand computation (scale_x_y, new_coords) and class-aware NMS."""
import math

import numpy as np
import pytest
import torch

from yolocompress.models.heads import HeadSpec
from yolocompress.models.yolo import decode, postprocess


def _head(**kw):
    base = dict(name="yolo1", index=1, stride=16, classes=2, mask=(1,),
                all_anchors=np.array([[10, 14], [30, 20]], np.float32))
    base.update(kw)
    return HeadSpec(**base)


def test_decode_single_cell_matches_darknet_formula():
    head = _head(scale_x_y=1.2)
    out = torch.zeros(1, 7, 2, 3)                      # 1 anchor, 5+2 channels, H=2, W=3
    out[0, :, 1, 2] = torch.tensor([0.5, -1.0, 0.2, -0.3, 1.0, 2.0, -2.0])
    rows = decode([out], [head], (32, 48))             # stride 16 both ways
    r = rows[0, 1 * 3 + 2]                              # cell (j=1, i=2)
    sig = lambda v: 1 / (1 + math.exp(-v))
    s = 1.2
    cx = (2 + sig(0.5) * s - 0.5 * (s - 1)) * 16
    cy = (1 + sig(-1.0) * s - 0.5 * (s - 1)) * 16
    expected = [cx, cy, math.exp(0.2) * 30, math.exp(-0.3) * 20, sig(1.0), sig(2.0), sig(-2.0)]
    assert r.tolist() == pytest.approx(expected, rel=1e-6)
    assert rows.shape == (1, 6, 7)


def test_decode_new_coords_uses_raw_logistic_outputs():
    head = _head(new_coords=True, scale_x_y=2.0)
    out = torch.zeros(1, 7, 1, 1)
    out[0, :, 0, 0] = torch.tensor([0.25, 0.75, 0.5, 0.25, 0.9, 0.6, 0.1])
    r = decode([out], [head], (16, 16))[0, 0]
    # xy = t*s - (s-1)/2 ; wh = (2t)^2 * anchor ; obj/cls taken as is
    assert r.tolist() == pytest.approx(
        [(0.25 * 2 - 0.5) * 16, (0.75 * 2 - 0.5) * 16, 1.0 * 30, 0.25 * 20, 0.9, 0.6, 0.1])


def test_decode_anchor_major_layout():
    head = _head(mask=(0, 1))
    out = torch.zeros(1, 14, 1, 1)
    out[0, 7 + 2, 0, 0] = math.log(2.0)                # second anchor's tw
    rows = decode([out], [head], (16, 16))[0]
    assert rows[0, 2].item() == pytest.approx(10.0)
    assert rows[1, 2].item() == pytest.approx(60.0)


def test_postprocess_is_class_aware_and_thresholded():
    # rows: [cx, cy, w, h, obj, p0, p1]
    rows = torch.tensor([[[50, 50, 20, 20, 0.9, 0.9, 0.0],
                          [51, 50, 20, 20, 0.8, 0.9, 0.0],     # same class, overlaps -> removed
                          [51, 50, 20, 20, 0.8, 0.0, 0.9],     # other class -> kept
                          [10, 10, 4, 4, 0.1, 0.1, 0.1]]])     # below threshold
    (p,) = postprocess(rows, conf_thresh=0.25, iou_thresh=0.45)
    assert p.labels.tolist() == [0, 1]
    assert p.scores.tolist() == pytest.approx([0.81, 0.72])
    assert p.boxes[0].tolist() == pytest.approx([40, 40, 60, 60])
