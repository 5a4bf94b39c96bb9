"""Params / FLOPs against Darknet's reference figures (REFERENCE.md) and a hand-computed cfg."""
import pytest

from yolocompress.models.cfg import read_cfg, set_classes
from yolocompress.models.profile import layer_shapes, profile_blocks, profile_summary

from conftest import TINY_CFG, cfg_path

# (cfg, classes, size, trainable params, total BFLOPs, conv-only BFLOPs or None)
REFERENCE = [
    ("yolov4", 80, 416, 64_363_101, 60.14, 60.105),
    ("yolov4", 80, 512, 64_363_101, 91.10, None),
    ("yolov4", 80, 608, 64_363_101, 128.46, None),
    ("yolov4", 20, 416, 64_040_001, 59.70, None),
    ("yolov4-tiny", 80, 416, 6_056_606, 6.91, None),
    ("yolov4-csp", 80, 512, 52_921_437, 77.0, None),
    ("yolov3", 80, 416, 61_949_149, 65.88, None),
    ("yolov3-tiny", 80, 416, 8_852_366, 5.57, None),
]


@pytest.mark.parametrize("name,classes,size,params,bflops,conv_bflops", REFERENCE)
def test_reference_figures(name, classes, size, params, bflops, conv_bflops):
    blocks = set_classes(read_cfg(cfg_path(name)), classes)
    s = profile_summary(blocks, size, size)
    assert s["params"] == params
    # Darknet prints two decimals (one for csp): agree to that rounding
    digits = len(str(bflops).split(".")[1])
    assert round(s["flops"] / 1e9, digits) == pytest.approx(bflops)
    if conv_bflops is not None:
        assert round(s["flops_conv"] / 1e9, 3) == pytest.approx(conv_bflops)


def test_tiny_cfg_hand_computed():
    rows = profile_blocks(read_cfg(TINY_CFG))
    conv0 = rows[0]
    # 3->8, 3x3, stride 2 on 64x64 -> 32x32; weights 3*8*9 = 216, BN 16 params
    assert conv0.out == (8, 32, 32) and conv0.params == 216 + 16
    assert conv0.flops == 2 * 216 * 32 * 32
    # shortcut counts its output size; SPP maxpool 5x5 over 32 channels at 8x8
    assert rows[5].flops == 8 * 16 * 16
    assert rows[9].flops == 25 * 32 * 8 * 8
    # detection conv: no BN -> bias; 16->21 1x1
    assert rows[13].params == 16 * 21 + 21
    assert sum(r.flops for r in rows if r.kind in ("route", "upsample", "yolo")) == 0


def test_shapes_follow_input_size():
    shapes = layer_shapes(read_cfg(TINY_CFG), 96, 128)
    assert (shapes[13].h, shapes[13].w) == (12, 16)
    assert (shapes[19].h, shapes[19].w) == (24, 32)
