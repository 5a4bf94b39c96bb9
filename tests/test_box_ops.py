"""IoU-family overlaps: hand-computed values, format equivalence, degenerate boxes, errors."""
import math

import numpy as np
import pytest
import torch

from yolocompress.data.records import pairwise_iou
from yolocompress.errors import YoloCompressError
from yolocompress.train.box_ops import bbox_iou, xywh_to_xyxy, xyxy_to_xywh


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# Case 1: a = (0,0,4,4), b = (2,2,6,6)
#   inter = 2*2 = 4, union = 16 + 16 - 4 = 28, iou = 1/7
#   enclosing (0,0,6,6) = 36: giou = 1/7 - (36 - 28)/36 = 1/7 - 2/9 = -5/63
#   centres (2,2), (4,4): rho^2 = 8, diag^2 = 6^2 + 6^2 = 72: diou = 1/7 - 8/72 = 2/63
#   same aspect ratio -> v = 0 -> ciou = diou
# Case 2: a = (0,0,4,2) (w 4, h 2), b = (0,0,2,4) (w 2, h 4)
#   inter = 2*2 = 4, union = 8 + 8 - 4 = 12, iou = 1/3
#   enclosing (0,0,4,4) = 16: giou = 1/3 - 4/16 = 1/12
#   centres (2,1), (1,2): rho^2 = 2, diag^2 = 32: diou = 1/3 - 1/16 = 13/48
#   v = 4/pi^2 (atan(2/4) - atan(4/2))^2 = 4/pi^2 atan(3/4)^2   (atan 2 - atan 1/2 = atan 3/4)
#   alpha = v / (1 - 1/3 + v); ciou = 13/48 - alpha v  (~= 0.237081)
# Case 3: a = (0,0,1,1), b = (2,0,3,1): disjoint
#   iou = 0; enclosing 3x1 = 3, union 2: giou = -1/3; rho^2 = 4, diag^2 = 9 + 1: diou = -0.4
_V2 = 4 / math.pi ** 2 * math.atan(0.75) ** 2
_CASES = [
    ((0, 0, 4, 4), (2, 2, 6, 6), {"iou": 1 / 7, "giou": -5 / 63, "diou": 2 / 63, "ciou": 2 / 63}),
    ((0, 0, 4, 2), (0, 0, 2, 4), {"iou": 1 / 3, "giou": 1 / 12, "diou": 13 / 48,
                                  "ciou": 13 / 48 - _V2 / (2 / 3 + _V2) * _V2}),
    ((0, 0, 1, 1), (2, 0, 3, 1), {"iou": 0.0, "giou": -1 / 3, "diou": -0.4, "ciou": -0.4}),
]


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_hand_computed_values_in_both_formats(kind):
    a = _t(*[c[0] for c in _CASES])
    b = _t(*[c[1] for c in _CASES])
    want = torch.tensor([c[2][kind] for c in _CASES], dtype=torch.float64)
    torch.testing.assert_close(bbox_iou(a, b, kind), want, atol=1e-9, rtol=0)
    torch.testing.assert_close(bbox_iou(xyxy_to_xywh(a), xyxy_to_xywh(b), kind, fmt="xywh"), want,
                               atol=1e-9, rtol=0)
    assert abs(_CASES[1][2]["ciou"] - 0.237081) < 1e-6  # the closed form above, evaluated


def test_overlaps_are_symmetric_in_value():
    a, b = _t(*[c[0] for c in _CASES]), _t(*[c[1] for c in _CASES])
    for kind in ("iou", "giou", "diou", "ciou"):
        torch.testing.assert_close(bbox_iou(a, b, kind), bbox_iou(b, a, kind))


def test_format_conversions_round_trip():
    xyxy = _t((1, 2, 5, 10), (0, 0, 0, 0))
    xywh = xyxy_to_xywh(xyxy)
    torch.testing.assert_close(xywh, _t((3, 6, 4, 8), (0, 0, 0, 0)))
    torch.testing.assert_close(xywh_to_xyxy(xywh), xyxy)


def test_broadcast_matrix_matches_records_pairwise_iou():
    g = torch.Generator().manual_seed(1)
    p1 = torch.rand(7, 2, generator=g, dtype=torch.float64) * 50
    a = torch.cat([p1, p1 + torch.rand(7, 2, generator=g, dtype=torch.float64) * 30], 1)
    p2 = torch.rand(5, 2, generator=g, dtype=torch.float64) * 50
    b = torch.cat([p2, p2 + torch.rand(5, 2, generator=g, dtype=torch.float64) * 30], 1)
    got = bbox_iou(a[:, None], b[None])
    assert got.shape == (7, 5)
    np.testing.assert_allclose(got.numpy(), pairwise_iou(a.numpy(), b.numpy()), atol=1e-9)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("stable", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_boxes_give_finite_values_and_gradients(kind, stable, dtype):
    # zero-size box on itself, zero-size inside a real box, a line, identical boxes
    a = _t((3, 3, 3, 3), (5, 5, 5, 5), (0, 0, 4, 0), (.1, .1, .3, .3)).to(dtype)
    a.requires_grad_(True)
    b = _t((3, 3, 3, 3), (0, 0, 10, 10), (0, 0, 4, 0), (.1, .1, .3, .3)).to(dtype)
    v = bbox_iou(a, b, kind, stable_aspect_grad=stable)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(a.grad).all()
    assert v[3].item() == pytest.approx(1.0, abs=1e-6)   # identical boxes: every kind is 1
    assert v[1].item() <= 0.0                  # empty box: no overlap


def test_ciou_alpha_is_constant_and_stable_grad_drops_one_over_w2_plus_h2():
    # prediction (xywh) centred on the target so rho = 0 and only iou and alpha*v move
    pred = _t((0, 0, 4, 2)).requires_grad_(True)
    gt = _t((0, 0, 2, 4))
    grads = {}
    for stable in (False, True):
        p = pred.detach().clone().requires_grad_(True)
        bbox_iou(p, gt, "ciou", fmt="xywh", stable_aspect_grad=stable).sum().backward()
        grads[stable] = p.grad[0]
    # d(-alpha v)/dw: exact = -alpha * 2*4/pi^2 * (atan(wg/hg) - atan(w/h)) * (-h / (w^2 + h^2)),
    # stable = same without 1/(w^2 + h^2); their difference with w=4, h=2:
    iou = 4 / 12  # inter 2x2, union 8 + 8 - 4
    diff = math.atan(2 / 4) - math.atan(4 / 2)
    v = 4 / math.pi ** 2 * diff ** 2
    alpha = v / (1 - iou + v)
    k = alpha * 8 / math.pi ** 2 * diff
    want_dw = k * 2 * (1 / (4 ** 2 + 2 ** 2) - 1)    # d/dw: h factor
    want_dh = -k * 4 * (1 / (4 ** 2 + 2 ** 2) - 1)   # d/dh: -w factor
    got = grads[False] - grads[True]
    assert got[0] == pytest.approx(0.0, abs=1e-12) and got[1] == pytest.approx(0.0, abs=1e-12)
    assert got[2].item() == pytest.approx(want_dw, rel=1e-6)
    assert got[3].item() == pytest.approx(want_dh, rel=1e-6)
    # and the stable form leaves the value alone
    assert bbox_iou(pred, gt, "ciou", "xywh", stable_aspect_grad=True).item() == pytest.approx(
        bbox_iou(pred, gt, "ciou", "xywh").item())


def test_bad_arguments_are_clear_errors():
    a = _t((0, 0, 1, 1))
    with pytest.raises(YoloCompressError, match="kind 'eiou'"):
        bbox_iou(a, a, "eiou")
    with pytest.raises(YoloCompressError, match="fmt 'cxcywh'"):
        bbox_iou(a, a, fmt="cxcywh")
    with pytest.raises(YoloCompressError, match="4 values"):
        bbox_iou(a[:, :3], a)
