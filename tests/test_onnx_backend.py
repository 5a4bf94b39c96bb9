"""ONNX Runtime backend: one set of session options; an exported model carries its class names,
input size and letterbox flag; `eval` and `predict` on the .onnx give the artifact's mAP and
detections (same pre/post-processing, same images); bad .onnx inputs are one-line errors."""
import json
import warnings

import pytest
import torch
import yaml
from torch import nn

from yolocompress.artifacts import load_artifact
from yolocompress.cli import main
from yolocompress.errors import YoloCompressError
from yolocompress.export import export_onnx

from conftest import ROOT

ort = pytest.importorskip("onnxruntime")

from yolocompress.onnx_backend import OnnxModel, session_options  # noqa: E402

DEMO_BASELINE = ROOT / "cfg" / "experiments" / "demo-baseline.pt"


def test_session_options_are_the_documented_ones():
    o = session_options(2)
    assert (o.intra_op_num_threads, o.inter_op_num_threads) == (2, 1)
    assert o.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert o.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert o.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options().intra_op_num_threads == 0          # ONNX Runtime's default
    with pytest.raises(YoloCompressError, match="threads must be >= 1"):
        session_options(0)


def test_metadata_round_trip_and_input_size_check(tmp_path):
    art = load_artifact(DEMO_BASELINE)
    art["cfg"] = art["cfg"].replace("[net]", "[net]\nletter_box=1", 1)
    m = OnnxModel(export_onnx(art, tmp_path / "m.onnx"), threads=1)
    assert (m.names, m.input_size, m.letterbox) == (art["classes"], (256, 256), True)
    assert m(torch.rand(2, 3, 256, 256)).shape == (2, 3 * (16 ** 2 + 32 ** 2 + 8 ** 2), 11)
    with pytest.raises(YoloCompressError, match="exported for 256x256 input, got 224x256"):
        m(torch.rand(1, 3, 224, 256))


def test_onnx_without_our_metadata_is_refused(tmp_path):
    path = tmp_path / "plain.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(nn.Conv2d(3, 4, 1), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False,
                          input_names=["images"])
    with pytest.raises(YoloCompressError, match="no 'yolocompress.classes' in its metadata_props"):
        OnnxModel(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    with pytest.raises(YoloCompressError, match="ONNX Runtime cannot load it"):
        OnnxModel(garbage)
    with pytest.raises(YoloCompressError, match="no such ONNX file"):
        OnnxModel(tmp_path / "missing.onnx")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The shipped demo baseline, its ONNX export and 8 demo val images at its 256 px."""
    from yolocompress.data.synthetic import DEMO_CLASSES, generate_demo

    base = tmp_path_factory.mktemp("onnxeval")
    generate_demo(base / "demo", seed=5, n_train=1, n_val=8, img_size=256)
    (base / "demo.yaml").write_text(yaml.safe_dump({
        "format": "voc", "root": "demo", "train": ["demo/train"], "val": ["demo/val"],
        "names": list(DEMO_CLASSES)}))
    onnx_path = export_onnx(load_artifact(DEMO_BASELINE), base / "demo.onnx")
    return base, onnx_path


def test_eval_onnx_scores_like_the_artifact(demo, capsys):
    base, onnx_path = demo
    res = {}
    for name, model in (("pt", DEMO_BASELINE), ("onnx", onnx_path)):
        assert main(["eval", str(model), "--data", str(base / "demo.yaml"), "--workers", "0",
                     "--threads", "1", "--json", str(base / f"{name}.json")]) == 0
        res[name] = json.loads((base / f"{name}.json").read_text())
    assert res["pt"]["map"] > 0.2                    # a real score, so equality means something
    assert res["onnx"]["map"] == pytest.approx(res["pt"]["map"], abs=2e-3)
    assert res["onnx"]["map50_all"] == pytest.approx(res["pt"]["map50_all"], abs=2e-3)


def test_predict_onnx_gives_the_artifacts_detections(demo, capsys):
    base, onnx_path = demo
    images = base / "demo" / "VOCdemo" / "JPEGImages"
    dets = {}
    for name, model in (("pt", DEMO_BASELINE), ("onnx", onnx_path)):
        out = base / f"pred-{name}"
        assert main(["predict", str(model), str(images), "--out", str(out), "--threads", "1"]) == 0
        dets[name] = json.loads((out / "detections.json").read_text())
    assert len(dets["pt"]) > 5 and len(dets["onnx"]) == len(dets["pt"])
    for a, b in zip(dets["pt"], dets["onnx"]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=0.05)
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_eval_onnx_with_other_classes_is_refused(demo, tmp_path, capsys):
    base, onnx_path = demo
    desc = yaml.safe_load((base / "demo.yaml").read_text())
    desc["names"] = desc["names"][::-1]
    desc["root"] = str(base / "demo")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(desc))
    assert main(["eval", str(onnx_path), "--data", str(tmp_path / "other.yaml")]) == 2
    assert "differ from the data set's" in capsys.readouterr().err


def test_export_cli_mish_and_opset(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["export", str(DEMO_BASELINE), "--format", "onnx", "--out", str(out),
                 "--mish", "fast"]) == 2
    assert capsys.readouterr().err.strip() == ("error: unknown mish form 'fast' (one of sigmoid, "
                                               "op, softplus)")
    assert not out.exists()
    assert main(["export", str(DEMO_BASELINE), "--format", "onnx", "--out", str(out),
                 "--mish", "op", "--opset", "18", "--check"]) == 0
    assert "ONNX Runtime vs PyTorch: max abs diff" in capsys.readouterr().out
    import onnx
    model = onnx.load(str(out))
    assert model.opset_import[0].version == 18
    assert sum(n.op_type == "Mish" for n in model.graph.node) == 40
