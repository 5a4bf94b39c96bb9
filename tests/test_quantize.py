"""INT8 quantization (stage 4): the INT8 model runs in ONNX Runtime close to the FP32 export, the
decode (and the maxpools' -inf padding) stays float, the detection convs are the cfg's detect
layers, reduce_range follows VNNI, and bad models / calibration sets are one-line errors."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from yolocompress.artifacts import load_artifact
from yolocompress.cli import main
from yolocompress.config import QuantizeConfig, load_config
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.roles import describe_layers

from conftest import ROOT, make_mini

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from yolocompress.compress.quantize import (cpu_has_vnni, float_nodes, quantize_onnx,  # noqa: E402
                                            resolve_reduce_range)
from yolocompress.compress.recalibrate import Calibration  # noqa: E402
from yolocompress.data.descriptor import load_descriptor, load_split  # noqa: E402
from yolocompress.export import export_onnx  # noqa: E402
from yolocompress.onnx_backend import OnnxModel  # noqa: E402

DEMO_BASELINE = ROOT / "cfg" / "experiments" / "demo-baseline.pt"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The shipped demo baseline (trained, 256 px) exported, its INT8 model calibrated on 8
    images of a mini demo set, and that set's val images as a fixed input batch."""
    base = make_mini(tmp_path_factory.mktemp("quant"), n_train=8)
    art = load_artifact(DEMO_BASELINE)
    fp32 = export_onnx(art, base / "fp32.onnx")
    desc = load_descriptor(base / "demo.yaml")
    calib = Calibration.from_records(load_split(desc, "train"), 8, 256, False, 8)
    int8 = base / "int8.onnx"
    rec = quantize_onnx(fp32, int8, calib, QuantizeConfig(calibration_images=8))
    val = Calibration.from_records(load_split(desc, "val"), 6, 256, False, 6)
    return base, art, fp32, int8, rec, val.batches[0][0].float() / 255, calib


def _rows(path, x):
    return OnnxModel(path)(x).numpy()


def test_int8_runs_close_to_fp32(models):
    _, _, fp32, int8, rec, x, _ = models
    ref, got = _rows(fp32, x), _rows(int8, x)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert rec["int8_bytes"] < 0.4 * rec["fp32_bytes"]
    # stated tolerance (measured 0.007 and 1.1 px): objectness / class probabilities within 0.02
    # on average, and the boxes of the confident rows (obj > 0.5 in FP32) within 2 px on average
    # at 256 px input
    assert np.abs(got[..., 4:] - ref[..., 4:]).mean() < 0.02
    confident = ref[..., 4] > 0.5
    assert confident.sum() > 5
    assert np.abs(got[..., :4] - ref[..., :4])[confident].mean() < 2.0


def test_quantizing_the_decode_breaks_the_boxes(models, tmp_path):
    """Negative control of the tolerance above: the naive quantization (decode in INT8) puts
    pixel boxes and probabilities in one 8-bit range at the final Concat (measured 0.135)."""
    _, _, fp32, _, _, x, calib = models
    from onnxruntime import quantization as q

    floats = float_nodes(onnx.load(str(fp32)))
    naive = tmp_path / "naive.onnx"
    assert floats["unbounded"] == []
    q.quantize_static(str(fp32), str(naive), _reader(calib), quant_format=q.QuantFormat.QDQ,
                      per_channel=True, activation_type=q.QuantType.QUInt8,
                      weight_type=q.QuantType.QInt8)
    ref, got = _rows(fp32, x), _session_rows(naive, x)
    assert np.abs(got[..., 4:] - ref[..., 4:]).mean() > 0.05


def _reader(calib):
    from yolocompress.compress.quantize import CalibrationReader
    return CalibrationReader(calib, "images")


def _session_rows(path, x):
    from yolocompress.onnx_backend import session
    return session(path).run(None, {"images": x.numpy()})[0]


def _producers(model):
    return {t: n for n in model.graph.node for t in n.output}


def test_decode_stays_float(models):
    _, art, fp32, int8, rec, _, _ = models
    floats = float_nodes(onnx.load(str(fp32)))
    detect = [i.index for i in describe_layers(parse_cfg(art["cfg"])) if i.role == "detect"]
    assert floats["detect"] == [f"/model/layers.{i}/conv/Conv" for i in detect]
    assert rec["detect_convs"] == floats["detect"]
    assert floats["unbounded"] == []             # export writes the SPP padding into MaxPool
    q = onnx.load(str(int8))
    by_name = {n.name: n for n in q.graph.node}
    made_by = _producers(q)
    assert len(floats["decode"]) > 50
    conv_out = {by_name[c].output[0] for c in floats["detect"]}
    for name in floats["decode"]:
        node = by_name[name]                     # still there, as a float op
        assert node.op_type not in ("QuantizeLinear", "DequantizeLinear")
        for t in node.input:                     # float, or an INT8 detection conv's output
            if t in made_by and made_by[t].op_type == "DequantizeLinear":
                assert made_by[made_by[t].input[0]].input[0] in conv_out, (name, t)
    # the detection convs themselves are INT8 (keep_float "decode"): DQ-fed weights
    for name in floats["detect"]:
        assert made_by[by_name[name].input[1]].op_type == "DequantizeLinear"
    scales = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    qnodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert len(qnodes) > 50
    assert all(np.isfinite(scales[n.input[1]]).all() and (scales[n.input[1]] > 0).all()
               for n in qnodes)
    assert {p.key: p.value for p in q.metadata_props} == {p.key: p.value for p in
                                                          onnx.load(str(fp32)).metadata_props}


def test_odd_maxpool_padding_stays_float_and_calibrates(tmp_path):
    """tiny.cfg's size-2 maxpools pad right/bottom with -inf (a Pad in the graph): the Pad feeds
    its maxpool directly in float (no 8-bit scale holds -inf), and even the histogram
    calibration runs."""
    from yolocompress.artifacts import artifact_from_model
    from yolocompress.models.cfg import read_cfg
    from yolocompress.models.darknet import Darknet

    from conftest import TINY_CFG
    m = Darknet(read_cfg(TINY_CFG), classes=2)
    art = artifact_from_model(m, "baseline", ["a", "b"])
    fp32 = export_onnx(art, tmp_path / "tiny.onnx")
    floats = float_nodes(onnx.load(str(fp32)))
    odd = [i for i, b in enumerate(m.blocks[1:]) if b.type == "maxpool"
           and b.get_int("padding", b.get_int("size", 1) - 1) % 2]      # Darknet's default pad
    assert len(odd) == 2                          # the two size-2 maxpools of tiny.cfg
    assert sorted(floats["unbounded"]) == sorted(f"/model/layers.{i}/{op}" for i in odd
                                                 for op in ("Pad", "MaxPool"))
    calib = Calibration(((torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
                          torch.zeros(0, 6)),))
    out = tmp_path / "tiny-int8.onnx"
    quantize_onnx(fp32, out, calib, QuantizeConfig(method="entropy", ops="all"))
    q = onnx.load(str(out))
    made_by = _producers(q)
    pools = [n for n in q.graph.node if n.name in floats["unbounded"] and n.op_type == "MaxPool"]
    assert len(pools) == 2 and all(made_by[n.input[0]].op_type == "Pad" for n in pools)
    scales = [onnx.numpy_helper.to_array(i) for i in q.graph.initializer if i.name.endswith("_scale")]
    assert scales and all(np.isfinite(s).all() for s in scales)
    x = torch.rand(1, 3, 64, 64)
    assert np.isfinite(_rows(out, x)).all()


def test_keep_float_detect_keeps_the_detection_convs_float(models, tmp_path):
    _, _, fp32, _, _, _, calib = models
    out = tmp_path / "int8d.onnx"
    rec = quantize_onnx(fp32, out, calib.head(1), QuantizeConfig(keep_float="detect"))
    q = onnx.load(str(out))
    made_by = _producers(q)
    by_name = {n.name: n for n in q.graph.node}
    readers = {t: n.op_type for n in q.graph.node for t in n.input}
    for name in rec["detect_convs"]:        # float weights in, float logits out
        conv = by_name[name]
        assert conv.input[1] not in made_by or made_by[conv.input[1]].op_type != "DequantizeLinear"
        assert readers[conv.output[0]] != "QuantizeLinear"


def test_vnni_detection_and_reduce_range(tmp_path, monkeypatch):
    import yolocompress.compress.quantize as qmod
    monkeypatch.setattr(qmod.platform, "machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(info) is True
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert cpu_has_vnni(info) is False
    assert cpu_has_vnni(tmp_path / "missing") is None
    assert resolve_reduce_range(None, True)[0] is False
    on, why = resolve_reduce_range(None, False)
    assert on is True and "no VNNI" in why
    assert resolve_reduce_range(None, None)[0] is True
    assert resolve_reduce_range(False, False)[0] is False    # an explicit setting wins
    monkeypatch.setattr(qmod.platform, "machine", lambda: "aarch64")
    assert cpu_has_vnni(info) is True


def test_quantize_command_then_eval_on_the_int8_file(tmp_path, capsys):
    base = make_mini(tmp_path, n_train=4)
    out = base / "m-int8.onnx"
    args = ["quantize", "--from", str(DEMO_BASELINE), "--config", str(base / "exp.yaml"),
            "--out", str(out), "--fp32", str(base / "m.onnx"), "quantize.calibration_images=2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "VNNI" in text and "calibrated on 2 training images" in text
    assert main(args) == 2                                   # an existing result needs --force
    assert "--force" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0
    assert main(["eval", str(out), "--data", str(base / "demo.yaml"), "--workers", "0",
                 "--threads", "1"]) == 0
    assert "mAP (voc07)" in capsys.readouterr().out


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    return err


def test_bad_models_and_calibration_sets_are_one_line_errors(tmp_path, capsys, monkeypatch):
    base = make_mini(tmp_path, n_train=4)
    exp = str(base / "exp.yaml")
    garbage = base / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert "ONNX Runtime cannot load it" in _err(
        capsys, ["quantize", "--from", str(garbage), "--config", exp, "--out", str(base / "o.onnx")])
    assert "no such file" in _err(
        capsys, ["quantize", "--from", str(base / "none.pt"), "--config", exp, "--out", str(base / "o.onnx")])
    assert "calibration_images: must be >= 1" in _err(
        capsys, ["quantize", "--from", str(DEMO_BASELINE), "--config", exp, "--out", str(base / "o.onnx"),
                 "quantize.calibration_images=0"])
    # a data set whose training split is empty: nothing to calibrate on
    (base / "demo" / "VOCdemo" / "ImageSets" / "Main" / "train.txt").write_text("")
    assert "no usable images in split 'train'" in _err(
        capsys, ["quantize", "--from", str(DEMO_BASELINE), "--config", exp, "--out", str(base / "o.onnx")])
    assert not (base / "o.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    calib = Calibration(((torch.zeros(1, 3, 256, 256, dtype=torch.uint8), torch.zeros(0, 6)),))
    with pytest.raises(YoloCompressError, match="not installed"):
        quantize_onnx(garbage, base / "o.onnx", calib, QuantizeConfig())
    monkeypatch.undo()
    with pytest.raises(YoloCompressError, match="no calibration images"):
        quantize_onnx(garbage, base / "o.onnx", Calibration(()), QuantizeConfig())


def test_a_graph_without_convs_cannot_be_quantized():
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(YoloCompressError, match="no Conv layers"):
        float_nodes(helper.make_model(g))


def test_quantize_section_defaults_load(tmp_path):
    base = make_mini(tmp_path)
    cfg = load_config(base / "exp.yaml", ["quantize.method=percentile"])
    assert cfg.quantize.method == "percentile" and cfg.quantize.reduce_range is None
    with pytest.raises(YoloCompressError, match="method"):
        load_config(base / "exp.yaml", ["quantize.method=kl"])
    assert Path(cfg.source).is_file()
