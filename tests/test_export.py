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
