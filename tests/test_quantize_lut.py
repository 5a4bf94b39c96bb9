"""Table-lookup activations (`quantize.activation: lut`, compress/quantize_lut.py): the tables are
mish / leaky of every input code, the INT8-LUT model runs as close to FP32 as plain INT8 (a
broken table does not), no float mish is left outside the decode and ONNX Runtime fuses every
conv into QLinearConv around the lookups, a model without mish or leaky is left as it was, and a
bad option value is the config's one-line error."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from yolocompress.artifacts import artifact_from_model
from yolocompress.cli import main
from yolocompress.config import QuantizeConfig
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.darknet import Darknet

from conftest import ROOT, TINY_CFG, make_mini

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from yolocompress.compress import quantize_lut  # noqa: E402
from yolocompress.compress.quantize import float_nodes, quantize_onnx  # noqa: E402
from yolocompress.compress.quantize_lut import find_activations, lut_table  # noqa: E402
from yolocompress.compress.recalibrate import Calibration  # noqa: E402
from yolocompress.export import export_onnx  # noqa: E402
from yolocompress.onnx_backend import session, session_options  # noqa: E402

DEMO_BASELINE = ROOT / "cfg" / "experiments" / "demo-baseline.pt"
TINY = TINY_CFG.read_text()          # mish, leaky, shortcut, routes, maxpools, upsample, 2 heads
VARIANTS = {"tiny": TINY, "no_mish": TINY.replace("=mish", "=relu").replace("=leaky", "=relu")}


def _model(text: str, seed: int = 0) -> dict:
    """A tiny random model whose activations span a few units (He-scaled convs, BN offsets of
    sd 0.5: the mish's negative part is used) and whose probabilities span (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    m = Darknet(parse_cfg(text), classes=2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g)
                                 * math.sqrt(2 / mod.weight[0].numel()))
            if isinstance(mod, (nn.Conv2d, nn.BatchNorm2d)) and mod.bias is not None:
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)
    return artifact_from_model(m, "baseline", ["a", "b"])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Per variant: the FP32 export and its INT8 models with activation float and lut (8 random
    calibration images), their records, and a fixed random batch of 4 images."""
    base = tmp_path_factory.mktemp("lut")
    g = torch.Generator().manual_seed(1)
    calib = Calibration(((torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=g),
                          torch.zeros(0, 6)),))
    x = torch.rand(4, 3, 64, 64, generator=g).numpy()
    out = {"calib": calib, "x": x}
    for name, text in VARIANTS.items():
        fp32 = export_onnx(_model(text), base / f"{name}.onnx")
        out[name] = {"fp32": fp32}
        for act in ("float", "lut"):
            path = base / f"{name}-{act}.onnx"
            out[name][f"{act}_rec"] = quantize_onnx(fp32, path, calib,
                                                    QuantizeConfig(activation=act))
            out[name][act] = path
    return out


def _run(path, x, outputs=None):
    return session(path).run(outputs, {"images": x})


def _probs(path, x):
    return _run(path, x)[0][..., 4:]          # objectness and class probabilities, in (0, 1)


def test_the_table_is_the_activation_of_every_code():
    # by hand: code q -> x = (q - 128) * 0.05 -> mish(x) -> round(mish / 0.04) + 8, clipped
    table = lut_table(quantize_lut.KINDS["mish"][0], 0.05, 128, 0.04, 8)
    assert table.dtype == np.uint8 and table.shape == (256,)
    assert table[128] == 8                     # mish(0) = 0: the output zero point
    assert table[148] == 30                    # mish(1.0) = tanh(log(1 + e)) = 0.8651 -> 21.6
    assert table[100] == 0                     # mish(-1.4) = -0.3037 -> -7.6 -> -8 + 8
    assert table[0] == 8                       # mish(-6.4) = -0.0106 -> -0.27 -> 0 + 8
    assert table[255] == 167                   # mish(6.35) = 6.3500 -> 158.75 -> 159 + 8
    assert lut_table(quantize_lut.KINDS["mish"][0], 0.05, 128, 0.01, 0)[255] == 255   # clipped
    for q in (3, 77, 131, 200):
        x = (q - 128) * 0.05
        assert table[q] == min(max(round(x * math.tanh(math.log1p(math.exp(x))) / 0.04) + 8, 0),
                               255)
    leaky = onnx.helper.make_node("LeakyRelu", ["x"], ["y"], alpha=0.1)
    f = quantize_lut.KINDS["leaky"][0]
    assert list(lut_table(lambda v: f(v, leaky), 0.1, 100, 0.1, 50)[[0, 90, 100, 130]]) \
        == [40, 49, 50, 80]                    # -10 -> -1.0, -1 -> -0.1 (-1 code), 0, 3.0


def _lookups(model):
    """(table, input scale / zero point, output scale / zero point) of each lookup in `model`:
    the Q before it and the DQ(s) after it, followed through the graph."""
    from onnx import numpy_helper

    nodes = list(model.graph.node)
    made_by = {t: n for n in nodes for t in n.output}
    readers = {}
    for n in nodes:
        for t in n.input:
            readers.setdefault(t, []).append(n)
    const = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

    def params(n):
        return float(const[n.input[1]]), int(const[n.input[2]])

    out = []
    for n in nodes:
        if n.op_type != "GatherElements":
            continue
        t = n.input[1]
        while made_by[t].op_type != "QuantizeLinear":          # Reshape, Cast, Transpose
            t = made_by[t].input[0]
        y = n.output[0]
        while readers[y][0].op_type in ("Reshape", "Transpose"):
            y = readers[y][0].output[0]
        dqs = [r for r in readers[y] if r.op_type == "DequantizeLinear"]
        out.append((const[n.input[0]].ravel(), params(made_by[t]), [params(d) for d in dqs]))
    return out


def test_the_graph_tables_are_mish_and_leaky_at_the_graph_scales(quantized):
    """Each lookup's table, recomputed by hand from the Q that feeds it and the DQ that reads it
    (float math, not the module's code), equals mish or leaky(0.1) of every code."""
    model = onnx.load(str(quantized["tiny"]["lut"]))
    found = _lookups(model)
    assert len(found) == quantized["tiny"]["lut_rec"]["lut_activations"] == 7
    kinds = []
    for table, (s_in, zp_in), dqs in found:
        assert dqs and all(d == dqs[0] for d in dqs)
        s_out, zp_out = dqs[0]
        x = [(q - zp_in) * s_in for q in range(256)]
        as_mish = [x_ * math.tanh(math.log1p(math.exp(x_))) for x_ in x]
        as_leaky = [x_ if x_ >= 0 else 0.1 * x_ for x_ in x]
        for name, y in (("mish", as_mish), ("leaky", as_leaky)):
            want = np.clip(np.rint(np.array(y) / s_out) + zp_out, 0, 255)
            if (table == want).all():
                kinds.append(name)
                break
        else:
            pytest.fail(f"a table is neither mish nor leaky at s_in {s_in}, zp_in {zp_in}")
    assert sorted(kinds) == ["leaky"] * 6 + ["mish"]       # tiny.cfg: 6 leaky, 1 mish


def test_lut_model_is_as_close_to_fp32_as_plain_int8(quantized, tmp_path, monkeypatch):
    """The lookup reproduces the codes plain INT8 computes (same scales) up to rounding ties,
    plus at most half an 8-bit step where a float reader (shortcut Add, route) now gets the
    looked-up codes. So the LUT model's distance to FP32 stays INT8's own (measured 0.0039 vs
    0.0038 mean on the probabilities, within 25 % here), and the two INT8 models differ by less
    than INT8 differs from FP32 (measured 0.0031). A mish table that is the identity instead
    (negative control) is 4x off (measured 0.017)."""
    x, tiny = quantized["x"], quantized["tiny"]
    ref, plain, lut = (_probs(tiny[k], x) for k in ("fp32", "float", "lut"))
    noise = np.abs(plain - ref).mean()
    assert 1e-4 < noise < 0.02                 # INT8 is close to FP32, and not identical
    assert np.abs(lut - ref).mean() < 1.25 * noise
    assert np.abs(lut - plain).mean() < noise
    monkeypatch.setitem(quantize_lut.KINDS, "mish", (lambda v, node=None: v,
                                                     quantize_lut.KINDS["mish"][1]))
    broken = tmp_path / "broken.onnx"
    quantize_onnx(tiny["fp32"], broken, quantized["calib"], QuantizeConfig(activation="lut"))
    assert np.abs(_probs(broken, x) - ref).mean() > 2 * noise


def test_the_first_mish_codes_equal_plain_int8_exactly(quantized):
    """Where the first conv's mish feeds the next conv, its codes (the QuantizeLinear output the
    lookup takes over) are the plain INT8 model's codes: the tables are exact, not close."""
    tiny = quantized["tiny"]
    plain = onnx.load(str(tiny["float"]))
    first = find_activations(plain.graph)[0]
    assert first.kind == "mish"
    codes = next(n.output[0] for n in plain.graph.node if n.op_type == "QuantizeLinear"
                 and n.input[0] == first.y)
    got = []
    for path in (tiny["float"], tiny["lut"]):
        model = onnx.load(str(path))
        model.graph.output.append(onnx.helper.make_tensor_value_info(
            codes, onnx.TensorProto.UINT8, None))
        opts = session_options(1)
        got.append(ort.InferenceSession(model.SerializeToString(), opts,
                                        providers=["CPUExecutionProvider"]).run(
            [codes], {"images": quantized["x"]})[0].astype(int))
    assert got[0].size > 1000 and len(np.unique(got[0])) > 20
    assert (got[0] != got[1]).mean() < 1e-3 and np.abs(got[0] - got[1]).max() <= 1


def _optimized(path, tmp_path):
    opts = session_options(1)
    opts.optimized_model_filepath = str(tmp_path / f"opt-{path.name}")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def test_no_float_activation_left_and_ort_fuses_the_convs(quantized, tmp_path):
    tiny = quantized["tiny"]
    fp32, lut = onnx.load(str(tiny["fp32"])), onnx.load(str(tiny["lut"]))
    keep = float_nodes(fp32)["keep"]
    assert {a.kind for a in find_activations(fp32.graph, keep)} == {"mish", "leaky"}
    assert find_activations(lut.graph) == []   # none left, not even in the kept part
    ops = [n.op_type for n in lut.graph.node]
    assert "LeakyRelu" not in ops and "Softplus" not in ops
    kept = {n.name for n in lut.graph.node if n.name in set(keep)}
    assert {n.name for n in fp32.graph.node if n.name in set(keep)} == kept   # decode untouched
    assert all(n.name in kept for n in lut.graph.node if n.op_type in ("Sigmoid", "Div"))
    onnx.checker.check_model(lut)
    assert np.isfinite(_run(tiny["lut"], quantized["x"])[0]).all()
    # ONNX Runtime's own graph: every conv a QLinearConv, one lookup per activation, and no
    # Transpose beyond those of plain INT8 (ours cancel against the NHWC ones of QLinearConv)
    plain_opt, lut_opt = _optimized(tiny["float"], tmp_path), _optimized(tiny["lut"], tmp_path)
    convs = sum(n.op_type == "Conv" for n in fp32.graph.node)
    assert lut_opt.count("QLinearConv") == convs and "Conv" not in lut_opt
    assert lut_opt.count("GatherElements") == tiny["lut_rec"]["lut_activations"]
    assert lut_opt.count("Transpose") <= plain_opt.count("Transpose")


def test_other_mish_forms_become_the_same_lookups(quantized, tmp_path):
    """torch's Softplus -> Tanh -> Mul and the one Mish op (opset 18) are found as the export's
    sigmoid form is, and give the same lookups."""
    art = _model(TINY)
    x, calib = quantized["x"], quantized["calib"]
    want = quantized["tiny"]["lut_rec"]["lut_by_kind"]
    ref = _probs(quantized["tiny"]["lut"], x)
    for form, opset in (("softplus", 17), ("op", 18)):
        fp32 = export_onnx(art, tmp_path / f"{form}.onnx", opset=opset, mish=form)
        assert len(find_activations(onnx.load(str(fp32)).graph)) == sum(want.values())
        rec = quantize_onnx(fp32, tmp_path / f"{form}-lut.onnx", calib,
                            QuantizeConfig(activation="lut"))
        assert rec["lut_by_kind"] == want
        assert np.abs(_probs(tmp_path / f"{form}-lut.onnx", x) - ref).mean() < 1e-3


def test_ops_all_keeps_the_chain_out_of_quantize_static_and_looks_it_up(quantized, tmp_path):
    """With ops "all" quantize_static would put Q/DQ inside the mish chain; the activations
    are left out of it, so all of them still become lookups, as close to FP32 as plain INT8."""
    tiny, x = quantized["tiny"], quantized["x"]
    path = tmp_path / "all-lut.onnx"
    rec = quantize_onnx(tiny["fp32"], path, quantized["calib"],
                        QuantizeConfig(ops="all", activation="lut"))
    assert rec["lut_by_kind"] == tiny["lut_rec"]["lut_by_kind"]
    assert find_activations(onnx.load(str(path)).graph) == []
    ref = _probs(tiny["fp32"], x)
    assert np.abs(_probs(path, x) - ref).mean() < 1.25 * np.abs(_probs(tiny["float"], x)
                                                                - ref).mean()


def test_a_model_without_mish_or_leaky_is_left_as_plain_int8(quantized):
    none = quantized["no_mish"]
    assert none["lut_rec"]["lut_activations"] == 0
    assert none["lut_rec"]["lut_by_kind"] == {"mish": 0, "leaky": 0}
    assert none["float_rec"]["lut_activations"] is None       # not asked for
    plain, lut = onnx.load(str(none["float"])), onnx.load(str(none["lut"]))
    assert [n.op_type for n in plain.graph.node] == [n.op_type for n in lut.graph.node]
    x = quantized["x"]
    assert np.array_equal(_run(none["float"], x)[0], _run(none["lut"], x)[0])


def test_quantize_command_with_lut_then_eval(tmp_path, capsys):
    base = make_mini(tmp_path, n_train=4)
    out = base / "m-lut.onnx"
    assert main(["quantize", "--from", str(DEMO_BASELINE), "--config", str(base / "exp.yaml"),
                 "--out", str(out), "--fp32", str(base / "m.onnx"),
                 "quantize.calibration_images=2", "quantize.activation=lut"]) == 0
    # the demo's yolov4-nano: 40 mish and 35 leaky convs, the 3 detection convs linear
    assert "activations as table lookups: 75 (mish 40, leaky 35)" in capsys.readouterr().out
    assert main(["eval", str(out), "--data", str(base / "demo.yaml"), "--workers", "0",
                 "--threads", "1"]) == 0
    assert "mAP (voc07)" in capsys.readouterr().out


def test_a_bad_activation_value_is_the_config_error(tmp_path, capsys):
    base = make_mini(tmp_path, n_train=4)
    assert main(["quantize", "--from", str(DEMO_BASELINE), "--config", str(base / "exp.yaml"),
                 "--out", str(base / "o.onnx"), "quantize.activation=table"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "quantize.activation=table: expected one of 'float', 'lut'" in err
    assert not (base / "o.onnx").exists()
    with pytest.raises(YoloCompressError, match="activation: expected one of 'float', 'lut'"):
        QuantizeConfig(activation="LUT")
