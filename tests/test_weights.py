"""Darknet .weights: bit-exact round trip, both headers, partial files, class mismatch, bad files."""
import numpy as np
import pytest
import torch

from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.weights import load_darknet_weights, save_darknet_weights

from conftest import TINY_CFG


def _random_model(classes=2, seed=0):
    torch.manual_seed(seed)
    m = Darknet(read_cfg(TINY_CFG), classes=classes)
    with torch.no_grad():
        for p in m.state_dict().values():
            if p.dtype.is_floating_point:
                p.copy_(torch.rand_like(p) + 0.1)   # positive: valid running_var too
    return m


def _equal(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa
               if sa[k].dtype.is_floating_point and not any(k.startswith(s) for s in skip))


def test_write_read_write_is_bit_exact(tmp_path):
    m = _random_model()
    p1, p2 = tmp_path / "a.weights", tmp_path / "b.weights"
    save_darknet_weights(m, p1, header=(0, 2, 5, 12345))
    m2 = _random_model(seed=1)
    rep = load_darknet_weights(m2, p1)
    assert rep.complete and rep.header == (0, 2, 5, 12345) and rep.layers_loaded == 9
    assert _equal(m, m2)
    save_darknet_weights(m2, p2, header=rep.header)
    assert p1.read_bytes() == p2.read_bytes()


def test_file_layout_bn_order_and_old_header(tmp_path):
    m = _random_model()
    p = tmp_path / "old.weights"
    save_darknet_weights(m, p, header=(0, 1, 0, 7))
    raw = p.read_bytes()
    assert np.frombuffer(raw[12:16], "<u4")[0] == 7          # 16-byte header: uint32 seen
    floats = np.frombuffer(raw[16:], "<f4")
    bn = m.layers[0].bn
    # BN conv: beta, gamma, mean, var, then OIHW weights
    assert np.array_equal(floats[0:8], bn.bias.detach().numpy())
    assert np.array_equal(floats[8:16], bn.weight.detach().numpy())
    assert np.array_equal(floats[24:32], bn.running_var.numpy())
    assert np.array_equal(floats[32:32 + 216], m.layers[0].conv.weight.detach().numpy().ravel())
    rep = load_darknet_weights(_random_model(seed=3), p)
    assert rep.header == (0, 1, 0, 7) and rep.complete


def test_partial_file_loads_leading_layers(tmp_path):
    m = _random_model()
    p = tmp_path / "full.weights"
    save_darknet_weights(m, p)
    sizes = [sum(t.numel() for t in (l.bn.bias, l.bn.weight, l.bn.running_mean, l.bn.running_var,
                                      l.conv.weight)) for l in (m.layers[0], m.layers[1])]
    partial = tmp_path / "tiny.conv.2"
    partial.write_bytes(p.read_bytes()[:20 + 4 * sum(sizes)])
    m2 = _random_model(seed=5)
    before = m2.layers[3].conv.weight.clone()
    rep = load_darknet_weights(m2, partial)
    assert rep.layers_loaded == 2 and rep.last_layer == 1 and not rep.complete
    assert torch.equal(m2.layers[1].conv.weight, m.layers[1].conv.weight)
    assert torch.equal(m2.layers[3].conv.weight, before)
    assert "partial" in rep.summary()


def test_truncated_inside_a_layer_names_it(tmp_path):
    m = _random_model()
    p = tmp_path / "x.weights"
    save_darknet_weights(m, p)
    p.write_bytes(p.read_bytes()[:-40])
    with pytest.raises(YoloCompressError, match=r"ends inside layer 19 \(conv19"):
        load_darknet_weights(_random_model(), p)


def test_too_long_and_odd_sized_files(tmp_path):
    m = _random_model()
    p = tmp_path / "x.weights"
    save_darknet_weights(m, p)
    long = tmp_path / "long.weights"
    long.write_bytes(p.read_bytes() + b"\0" * 12)
    with pytest.raises(YoloCompressError, match="3 float32 values more"):
        load_darknet_weights(_random_model(), long)
    odd = tmp_path / "odd.weights"
    odd.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(YoloCompressError, match="whole number of float32"):
        load_darknet_weights(_random_model(), odd)
    tiny = tmp_path / "hdr.weights"
    tiny.write_bytes(b"\0" * 8)
    with pytest.raises(YoloCompressError, match="too short"):
        load_darknet_weights(_random_model(), tiny)


def test_class_count_mismatch_skips_detection_convs(tmp_path):
    src = _random_model(classes=2)
    p = tmp_path / "c2.weights"
    save_darknet_weights(src, p)
    dst = _random_model(classes=7, seed=9)
    det_before = dst.layers[13].conv.weight.clone()
    rep = load_darknet_weights(dst, p)
    assert rep.file_classes == 2 and rep.skipped == ["conv13", "conv19"]
    assert rep.layers_loaded == 7
    assert torch.equal(dst.layers[13].conv.weight, det_before)
    assert _equal(src, dst, skip=("layers.13.", "layers.19."))
    assert "made for 2 classes" in rep.summary()


def test_missing_file():
    with pytest.raises(YoloCompressError, match="cannot read weights"):
        load_darknet_weights(_random_model(), "/nonexistent.weights")
