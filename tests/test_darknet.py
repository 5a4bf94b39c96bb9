"""Darknet semantics of the built module: activations, maxpool padding, routes, shortcut, heads."""
import math

import pytest
import torch
import torch.nn.functional as F

from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg
from yolocompress.models.darknet import ACTIVATIONS, Darknet
from yolocompress.models.roles import describe_layers

from conftest import PUBLISHED_CFGS, TINY_CFG, cfg_path


def test_leaky_is_darknet_0_1_and_mish_formula():
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5])
    assert torch.allclose(ACTIVATIONS["leaky"]()(x), torch.tensor([-0.2, -0.05, 0.0, 1.5]))
    # mish(1) = tanh(ln(1 + e))
    assert ACTIVATIONS["mish"]()(torch.tensor([1.0])).item() == pytest.approx(
        math.tanh(math.log1p(math.e)), abs=1e-6)
    assert ACTIVATIONS["logistic"]()(torch.tensor([0.0])).item() == 0.5


def _pool_net(size, stride, hw):
    text = f"[net]\nwidth={hw}\nheight={hw}\nchannels=1\n[maxpool]\nsize={size}\nstride={stride}\n" \
           "[convolutional]\nfilters=6\nsize=1\nactivation=linear\n[yolo]\nmask=0\nanchors=1,1\nclasses=1\n"
    return Darknet(parse_cfg(text))


def test_maxpool_size2_stride1_pads_right_bottom_and_keeps_size():
    m = _pool_net(2, 1, 3)
    x = torch.tensor([[1.0, 5.0, 2.0], [3.0, 0.0, 7.0], [4.0, 6.0, -1.0]]).view(1, 1, 3, 3)
    _, feats = m(x, features=["maxpool0"])
    # each output = max of its 2x2 window to the right/below; the last row/col sees -inf padding
    expected = torch.tensor([[5.0, 7.0, 7.0], [6.0, 7.0, 7.0], [6.0, 6.0, -1.0]])
    assert torch.equal(feats["maxpool0"][0, 0], expected)


def test_maxpool_size2_stride2_rounds_up_odd_inputs():
    m = _pool_net(2, 2, 5)
    x = torch.arange(25.0).view(1, 1, 5, 5)
    _, feats = m(x, features=["maxpool0"])
    out = feats["maxpool0"][0, 0]
    assert out.shape == (3, 3)
    assert torch.equal(out, torch.tensor([[6.0, 8.0, 9.0], [16.0, 18.0, 19.0], [21.0, 23.0, 24.0]]))


@pytest.mark.parametrize("size", [5, 9, 13])
def test_spp_maxpool_equals_torch_same_padding(size):
    m = _pool_net(size, 1, 16)
    x = torch.randn(2, 1, 16, 16)
    _, feats = m(x, features=["maxpool0"])
    assert torch.equal(feats["maxpool0"], F.max_pool2d(x, size, 1, size // 2))


def test_route_group_takes_second_half_and_shortcut_adds():
    m = Darknet(read_cfg(TINY_CFG)).eval()
    x = torch.randn(2, 3, 64, 64)
    _, f = m(x, features=["conv1", "route2", "conv3", "conv4", "shortcut5", "route6", "conv0"])
    assert torch.equal(f["route2"], f["conv1"][:, 8:16])
    assert torch.equal(f["shortcut5"], f["conv4"] + f["conv3"])
    # route -1,-5 from layer 6: shortcut5 then conv1
    assert torch.equal(f["route6"], torch.cat([f["shortcut5"], f["conv1"]], 1))


def test_upsample_is_nearest_and_route_absolute_index():
    m = Darknet(read_cfg(TINY_CFG)).eval()
    _, f = m(torch.randn(1, 3, 64, 64), features=["route15", "upsample16", "route17", "route6"])
    assert torch.equal(f["upsample16"], f["route15"].repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert torch.equal(f["route17"], torch.cat([f["upsample16"], f["route6"]], 1))


def test_conv_padding_and_batchnorm_eps():
    m = Darknet(read_cfg(TINY_CFG))
    conv0 = m.layers[0]
    assert conv0.conv.padding == (1, 1) and conv0.conv.stride == (2, 2)
    assert conv0.bn.eps == 1e-5 and conv0.conv.bias is None
    det = m.layers[13]
    assert not det.bn_enabled and det.conv.bias is not None


@pytest.mark.parametrize("size", [64, 96, 128])
def test_tiny_head_shapes(size):
    m = Darknet(read_cfg(TINY_CFG))
    outs = m(torch.randn(1, 3, size, size))
    assert [tuple(o.shape) for o in outs] == [(1, 21, size // 8, size // 8),
                                              (1, 21, size // 4, size // 4)]


def test_classes_rewritten_at_build_time():
    m = Darknet(read_cfg(TINY_CFG), classes=4)
    assert m.classes == 4 and all(h.classes == 4 for h in m.heads)
    assert m(torch.randn(1, 3, 64, 64))[0].shape[1] == 3 * (4 + 5)


def test_unknown_feature_name_is_clear_error():
    m = Darknet(read_cfg(TINY_CFG))
    with pytest.raises(YoloCompressError, match="no layer named 'conv99'"):
        m(torch.randn(1, 3, 64, 64), features=["conv99"])


def test_head_spec_read_from_yolo_blocks():
    m = Darknet(read_cfg(TINY_CFG))
    h0, h1 = m.heads
    assert (h0.index, h0.stride, h0.mask, h0.scale_x_y) == (14, 8, (3, 4, 5), 1.05)
    assert (h1.index, h1.stride, h1.mask, h1.scale_x_y) == (20, 4, (0, 1, 2), 1.1)
    assert h0.anchors.tolist() == [[16, 20], [24, 18], [40, 36]]
    assert h0.iou_thresh == pytest.approx(0.213) and h0.iou_loss == "ciou"


def test_detection_filters_must_match_classes():
    text = read_cfg(TINY_CFG)
    text[14].set("filters", 20)
    with pytest.raises(YoloCompressError, match="expects 21 channels"):
        Darknet(text)


def test_roles_of_tiny():
    infos = describe_layers(read_cfg(TINY_CFG))
    by = {i.name: i for i in infos}
    assert by["conv13"].role == "detect" and by["yolo14"].part == "head"
    assert by["conv18"].role == "head" and by["conv19"].role == "detect"
    assert by["conv8"].part == "backbone" and by["maxpool9"].part == "neck"
    assert by["route6"].role == "stage_out" and by["route6"].stride == 4
    assert [by[n].stride for n in ("conv0", "conv1", "conv8", "upsample16")] == [2, 4, 8, 4]


@pytest.mark.parametrize("name", ["yolov4-nano", "yolov4-tiny"])
@pytest.mark.parametrize("size", [320, 416, 608])
def test_shipped_small_cfgs_forward(name, size):
    m = Darknet(read_cfg(cfg_path(name)), classes=3).eval()
    with torch.no_grad():
        outs = m(torch.zeros(1, 3, size, size))
    strides = [h.stride for h in m.heads]
    assert [tuple(o.shape) for o in outs] == [
        (1, h.num_anchors * 8, size // s, size // s) for h, s in zip(m.heads, strides)]


@pytest.mark.slow
@pytest.mark.parametrize("size", [320, 416, 608])
def test_yolov4_forward(size):
    m = Darknet(read_cfg(cfg_path("yolov4")), classes=20).eval()
    with torch.no_grad():
        outs = m(torch.zeros(1, 3, size, size))
    assert [tuple(o.shape) for o in outs] == [(1, 75, size // s, size // s) for s in (8, 16, 32)]


@pytest.mark.parametrize("name,stage_outs", [
    ("yolov4", {2: "conv10", 4: "conv23", 8: "conv54", 16: "conv85", 32: "conv104"}),
    ("yolov4-tiny", {}),
])
def test_published_roles(name, stage_outs):
    infos = describe_layers(read_cfg(cfg_path(name)))
    by_name = {i.name: i for i in infos}
    for stride, lname in stage_outs.items():
        assert by_name[lname].role == "stage_out" and by_name[lname].stride == stride
    detect = [i for i in infos if i.role == "detect"]
    assert len(detect) == sum(i.kind == "yolo" for i in infos)
    assert all(infos[d.index + 1].kind == "yolo" for d in detect)


@pytest.mark.parametrize("path", PUBLISHED_CFGS, ids=lambda p: p.stem)
def test_every_published_cfg_builds_and_runs(path):
    m = Darknet(read_cfg(path), classes=20).eval()
    with torch.no_grad():
        outs = m(torch.zeros(1, 3, 128, 160))
    assert len(outs) == len(m.heads)
    for out, head in zip(outs, m.heads):
        assert out.shape == (1, head.num_anchors * 25, 128 // head.stride, 160 // head.stride)
