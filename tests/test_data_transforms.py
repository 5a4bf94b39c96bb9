"""Augmentations: exact box maps, boxes always valid, mosaic quadrants, Darknet HSV ranges."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from yolocompress.config import AugmentConfig
from yolocompress.data.transforms import (PAD_VALUE, augment_hsv, filter_boxes, hflip, letterbox, mosaic4,
                                          random_affine, resize, scale_boxes)
from yolocompress.errors import YoloCompressError


def _scene(w: int, h: int, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
    """Black RGB image with white filled rectangles covering exactly the given pixel-edge boxes."""
    img = np.zeros((h, w, 3), np.uint8)
    for x1, y1, x2, y2 in boxes:
        img[y1:y2, x1:x2] = 255
    return img


def _white_bounds(img: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(img.min(-1) > 127)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _assert_valid(boxes: np.ndarray, size: int) -> None:
    assert boxes.dtype == np.float32 and boxes.shape[1:] == (4,)
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
    assert np.all(boxes >= 0) and np.all(boxes <= size)


def test_letterbox_wide_image_pads_top_and_bottom():
    img = np.full((50, 100, 3), 200, np.uint8)
    out, scale, pad = letterbox(img, 64)
    assert out.shape == (64, 64, 3) and scale == (0.64, 0.64) and pad == (0, 16)
    assert np.all(out[:16] == PAD_VALUE) and np.all(out[48:] == PAD_VALUE) and np.all(out[16:48] == 200)
    np.testing.assert_allclose(scale_boxes([[0, 0, 100, 50], [10, 5, 20, 25]], scale, pad),
                               [[0, 16, 64, 48], [6.4, 19.2, 12.8, 32]], atol=1e-5)


def test_letterbox_rounding_uses_exact_per_axis_scales():
    out, (sx, sy), (px, py) = letterbox(np.zeros((77, 131, 3), np.uint8), 96)
    nw, nh = round(131 * 96 / 131), round(77 * 96 / 131)
    assert (sx, sy) == (nw / 131, nh / 77) and (px, py) == ((96 - nw) // 2, (96 - nh) // 2)


def test_letterbox_and_resize_move_pixels_where_boxes_go():
    box = (40, 20, 120, 60)
    img = _scene(200, 100, [box])
    out, scale, pad = letterbox(img, 128)
    np.testing.assert_allclose(_white_bounds(out), scale_boxes([box], scale, pad)[0], atol=1)
    out, scale = resize(img, 64)
    assert scale == (0.32, 0.64)
    np.testing.assert_allclose(_white_bounds(out), scale_boxes([box], scale)[0], atol=1)


def test_filter_boxes_hand_case():
    boxes = np.array([[-10, 0, 10, 10],    # half outside: kept, clipped
                      [-30, 0, 10, 10],    # 25 % left, below 0.3: dropped
                      [5, 5, 6.5, 9],      # 1.5 px wide: dropped
                      [90, 90, 120, 95]])  # 10 of 30 px inside, area 1/3: kept
    kept, keep = filter_boxes(boxes, (0, 0, 100, 100), min_area_frac=0.3, min_size=2)
    assert keep.tolist() == [True, False, False, True]
    np.testing.assert_array_equal(kept, [[0, 0, 10, 10], [90, 90, 100, 95]])


def test_hflip_is_exact_and_an_involution():
    box = (10, 5, 30, 40)
    img = _scene(64, 48, [box])
    out, boxes = hflip(img, np.array([box], np.float32))
    np.testing.assert_array_equal(boxes, [[34, 5, 54, 40]])
    assert _white_bounds(out) == (34, 5, 54, 40)
    back, boxes2 = hflip(out, boxes)
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(boxes2, [box])


def test_random_affine_without_rotation_maps_pixels_and_boxes_alike():
    box = (30, 40, 90, 70)
    img = _scene(160, 120, [box])
    checked = 0
    for seed in range(10):
        out, boxes, labels = random_affine(img, np.array([box], np.float32), np.array([3]),
                                           np.random.default_rng(seed), 96, jitter=0.2)
        assert out.shape == (96, 96, 3) and labels.tolist() == [3]
        if not np.isin(boxes[0], (0, 96)).any():   # not clipped at the border
            np.testing.assert_allclose(_white_bounds(out), boxes[0], atol=0.6)
            checked += 1
    assert checked >= 8


def test_random_affine_zero_jitter_is_a_plain_stretch():
    img = _scene(80, 40, [(10, 10, 30, 20)])
    out, boxes, _ = random_affine(img, np.array([[10, 10, 30, 20]], np.float32), np.array([0]),
                                  np.random.default_rng(0), 64, jitter=0.0)
    np.testing.assert_allclose(boxes, [[8, 16, 24, 32]], atol=1e-5)
    assert _white_bounds(out) == (8, 16, 24, 32)


def test_random_affine_letterbox_keeps_aspect_without_jitter():
    img = _scene(200, 100, [(0, 0, 200, 100)])
    out, boxes, _ = random_affine(img, np.array([[0, 0, 200, 100]], np.float32), np.array([0]),
                                  np.random.default_rng(0), 64, jitter=0.0, letterbox=True)
    np.testing.assert_allclose(boxes, [[0, 16, 64, 48]], atol=1e-5)
    assert np.all(out[:15] == PAD_VALUE) and np.all(out[17:47] == 255)


def test_rotated_boxes_enclose_the_rotated_object():
    box = (50, 50, 110, 80)
    img = _scene(160, 160, [box])
    for seed in range(10):
        out, boxes, _ = random_affine(img, np.array([box], np.float32), np.array([0]),
                                      np.random.default_rng(seed), 128, jitter=0.1, degrees=40, translate=0.1)
        x1, y1, x2, y2 = _white_bounds(out)
        assert len(boxes) == 1
        b = boxes[0]
        assert b[0] - 1 <= x1 and b[1] - 1 <= y1 and x2 <= b[2] + 1 and y2 <= b[3] + 1


@pytest.mark.parametrize("seed", range(60))
def test_geometric_transforms_keep_boxes_valid(seed):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(4):
        w, h = rng.integers(40, 200, 2)
        xy = rng.uniform(-20, [w, h], (12, 2))
        wh = rng.uniform(0.5, 120, (12, 2))
        boxes = np.clip(np.concatenate([xy, xy + wh], 1), 0, [w, h, w, h]).astype(np.float32)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img, boxes, labels = random_affine(img, boxes, np.arange(12), rng, 64, jitter=0.3,
                                           translate=0.2, degrees=30, letterbox=bool(seed % 2))
        _assert_valid(boxes, 64)
        img, boxes = hflip(img, boxes)
        _assert_valid(boxes, 64)
        parts.append((img, boxes, labels))
    out, boxes, labels = mosaic4(parts, 64, rng)
    assert out.shape == (64, 64, 3) and len(labels) == len(boxes)
    _assert_valid(boxes, 64)
    assert np.all((boxes[:, 2:] - boxes[:, :2]) >= 2)


def test_mosaic_puts_each_source_box_in_its_quadrant():
    rng = np.random.default_rng(0)
    for trial in range(20):
        parts = []
        for k in range(4):   # part k is flat value 10*(k+1), boxes labelled k, spread over the image
            g = np.arange(0, 96, 24, dtype=np.float32)
            boxes = np.array([[x, y, x + 20, y + 20] for x in g for y in g], np.float32)
            parts.append((np.full((96, 96, 3), 10 * (k + 1), np.uint8), boxes, np.full(len(boxes), k)))
        out, boxes, labels = mosaic4(parts, 96, rng)
        assert set(labels.tolist()) == {0, 1, 2, 3}
        quad = np.zeros((96, 96), int) - 1
        for k in range(4):
            quad[out[..., 0] == 10 * (k + 1)] = k
        cx = (quad[0] == 0).sum()
        cy = (quad[:, 0] == 0).sum()
        assert 0.2 * 96 - 1 <= cx <= 0.8 * 96 + 1 and 0.2 * 96 - 1 <= cy <= 0.8 * 96 + 1
        for b, k in zip(boxes, labels):
            x1, y1, x2, y2 = (int(round(v)) for v in b)
            assert np.all(quad[y1:y2, x1:x2] == k), (trial, b, k)


def test_mosaic_needs_four_parts():
    with pytest.raises(ValueError, match="4 images"):
        mosaic4([], 64, np.random.default_rng(0))


def test_hsv_off_is_identity_and_keeps_dtype_shape():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert augment_hsv(img, np.random.default_rng(0), 0, 0, 0) is img
    out = augment_hsv(img, np.random.default_rng(0), 0.1, 1.5, 1.5)
    assert out.dtype == np.uint8 and out.shape == img.shape and not np.array_equal(out, img)


def test_hsv_value_factor_lies_in_one_over_s_to_s_both_ways():
    grey = np.full((4, 4, 3), 100, np.uint8)
    values = np.array([augment_hsv(grey, np.random.default_rng(s), 0, 0, 1.5)[0, 0, 0] for s in range(200)])
    assert values.min() >= np.floor(100 / 1.5) and values.max() <= 150
    assert (values < 95).sum() > 40 and (values > 105).sum() > 40


def test_hsv_hue_shift_bounded_by_hgain_of_the_circle():
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    shifts = []
    for s in range(200):
        out = augment_hsv(red, np.random.default_rng(s), 0.1, 0, 0)
        hue = cv2.cvtColor(out, cv2.COLOR_RGB2HSV_FULL)[0, 0, 0] / 256 * 360
        shifts.append((hue + 180) % 360 - 180)
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= 36 + 3       # ±0.1 of the circle, plus colour quantisation
    assert shifts.min() < -25 and shifts.max() > 25


@pytest.mark.parametrize("field,value", [("mosaic", 1.5), ("flip", -0.1), ("hsv_s", 0.5), ("jitter", 0.6),
                                         ("jitter", 0.5), ("degrees", 200.0)])
def test_augment_config_rejects_out_of_range(field, value):
    with pytest.raises(YoloCompressError, match=field):
        AugmentConfig(**{field: value})


def test_jitter_just_below_half_still_gives_a_crop():
    # the one rule (config.AugmentConfig): jitter < 0.5, so the crop width w - dl - dr stays > 0
    a = AugmentConfig(jitter=0.49)
    img = np.full((40, 60, 3), 200, np.uint8)
    for s in range(50):
        out, boxes, _ = random_affine(img, np.array([[10, 10, 50, 30]], np.float32), np.array([0]),
                                      np.random.default_rng(s), 32, a.jitter)
        assert out.shape == (32, 32, 3) and np.isfinite(boxes).all()


def test_augment_config_defaults_are_darknet_yolov4():
    a = AugmentConfig()
    assert (a.mosaic, a.hsv_h, a.hsv_s, a.hsv_v, a.flip, a.jitter, a.degrees) == \
        (0.5, 0.1, 1.5, 1.5, 0.5, 0.3, 0.0)
