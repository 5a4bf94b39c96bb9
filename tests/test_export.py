"""Export: Darknet cfg+weights round trip; ONNX decoded output equals PyTorch in ONNX Runtime."""
import pytest
import torch

from yolocompress.artifacts import artifact_from_model, build_model
from yolocompress.export import check_onnx, export_darknet, export_onnx
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.weights import load_darknet_weights

from conftest import TINY_CFG, cfg_path


def _trained_like(path, classes=3, size=None):
    torch.manual_seed(1)
    m = Darknet(read_cfg(path), classes=classes)
    with torch.no_grad():   # non-trivial BN statistics, as after training
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return artifact_from_model(m, "baseline", [f"c{i}" for i in range(classes)],
                               input_size=size or m.input_size)


def test_darknet_export_reimports_identically(tmp_path):
    art = _trained_like(TINY_CFG)
    cfg, weights = export_darknet(art, tmp_path / "model")
    m = Darknet(read_cfg(cfg))
    rep = load_darknet_weights(m, weights)
    assert rep.complete
    ref = build_model(art).state_dict()
    assert all(torch.equal(ref[k], v) for k, v in m.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("name,size", [("tiny", (64, 64)), ("yolov4-nano", (128, 160))])
def test_onnx_matches_pytorch(tmp_path, name, size):
    pytest.importorskip("onnxruntime")
    path = TINY_CFG if name == "tiny" else cfg_path(name)
    art = _trained_like(path, size=size)
    out = export_onnx(art, tmp_path / "m.onnx")
    import onnx
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 13
    assert check_onnx(art, out) < 1e-4


def test_sigmoid_mish_equals_mish():
    from yolocompress.export import SigmoidMish
    x = torch.cat([torch.linspace(-100, 100, 200001), torch.tensor([-1e30, 1e30, 0.0])])
    got = SigmoidMish()(x)
    assert torch.isfinite(got[:-3]).all()
    # hand values: mish(1) = tanh(log(1 + e)), mish(-1) = -tanh(log(1 + 1/e))
    assert SigmoidMish()(torch.tensor([-1.0, 0.0, 1.0])).tolist() == pytest.approx(
        [-0.3034014613741, 0.0, 0.8650983882673], abs=1e-6)
    assert (got - torch.nn.functional.mish(x)).abs()[:-3].max() < 5e-6
    assert got[-2] == 1e30 and got[-1] == 0
    ref = torch.nn.functional.mish(x.double())[:-3]
    assert ((got[:-3].double() - ref).abs() / ref.abs().clamp(min=1e-3)).max() < 1e-5


def _ops(path):
    import onnx
    from collections import Counter
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_onnx_mish_forms(tmp_path):
    pytest.importorskip("onnxruntime")
    art = _trained_like(cfg_path("yolov4-nano"), size=(64, 64))
    mish_layers = art["cfg"].count("activation=mish")
    assert mish_layers == 40
    default = _ops(export_onnx(art, tmp_path / "a.onnx"))
    assert default["Softplus"] == default["Tanh"] == default["Mish"] == 0
    assert default["Sigmoid"] == mish_layers + 6          # + the 3 heads' xy and obj/class
    assert _ops(export_onnx(art, tmp_path / "a18.onnx", opset=18)) == default   # DEFAULT_OPSET
    op = export_onnx(art, tmp_path / "b.onnx", opset=18, mish="op")
    assert _ops(op)["Mish"] == mish_layers and _ops(op)["Softplus"] == 0
    softplus = export_onnx(art, tmp_path / "c.onnx", mish="softplus")
    assert _ops(softplus)["Softplus"] == mish_layers
    for path in (op, softplus):
        assert check_onnx(art, path) < 1e-4


def test_onnx_export_bad_arguments(tmp_path):
    art = _trained_like(TINY_CFG)
    from yolocompress.errors import YoloCompressError
    for kw, msg in [({"mish": "fast"}, "unknown mish form 'fast'"),
                    ({"mish": "op"}, "mish form 'op' needs ONNX opset 18 or newer, got 17"),
                    ({"opset": 12}, "opset 12 is too old")]:
        with pytest.raises(YoloCompressError, match=msg):
            export_onnx(art, tmp_path / "m.onnx", **kw)
    assert not (tmp_path / "m.onnx").exists()
