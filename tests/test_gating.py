"""FBS gating: k-WTA counts, d = 1 with unit saliencies is the ungated model, shortcut-tied gates
agree, executed MACs against a hand count, the gathered forward, artifacts, exports, the stage."""
import copy
import json
import math

import pytest
import torch

from yolocompress.artifacts import artifact_from_model, build_model, load_artifact, save_artifact
from yolocompress.compress.gate_stage import switching
from yolocompress.compress.gating import (GatedConv, apply_gating, count_macs, gate_penalty,
                                          gate_plan, gated_convs, gathered_model, keep_count, kwta)
from yolocompress.errors import YoloCompressError
from yolocompress.export import check_onnx, export_darknet, export_onnx
from yolocompress.models.cfg import parse_cfg, read_cfg
from yolocompress.models.darknet import Darknet

from conftest import TINY_CFG, make_mini

# conv0 3->4 (3x3), conv1 4->4 (1x1), detection conv 4->6 on an 8x8 map: conv0 and conv1 are gated
HAND_CFG = """[net]
width=8
height=8
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=1
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=4
size=1
stride=1
pad=0
activation=leaky

[convolutional]
filters=6
size=1
stride=1
pad=0
activation=linear

[yolo]
mask=0
anchors=4,4
classes=1
num=1
"""


def _randomised(model):
    """Non-trivial BN statistics and gate weights, as after training (no saliency ties)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
                mod.weight.uniform_(0.5, 1.5, generator=g)
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 1.0, generator=g)
    return model.eval()


def _gated(cfg=TINY_CFG, density=0.5):
    m = Darknet(read_cfg(cfg))
    return _randomised(apply_gating(m, gate_plan(m.blocks, density)))


def test_keep_count_is_ceil_without_float_noise():
    assert [keep_count(d, 20) for d in (0.35, 0.5, 0.75, 1.0)] == [7, 10, 15, 20]
    assert keep_count(0.35, 32) == 12 and keep_count(0.01, 8) == 1   # ceil(11.2); at least 1


@pytest.mark.parametrize("density", [0.35, 0.5, 0.75, 1.0])
def test_kwta_keeps_exactly_ceil_dc_largest(density):
    g = torch.rand(5, 20, generator=torch.Generator().manual_seed(0))
    k = keep_count(density, 20)
    mask = kwta(g, k)
    assert mask.sum(1).tolist() == [k] * 5
    kept_min = torch.where(mask.bool(), g, torch.inf).amin(1)
    dropped_max = torch.where(mask.bool(), -torch.inf, g).amax(1)
    assert (kept_min > dropped_max).all()


def test_gated_model_keeps_ceil_dc_channels_per_image():
    m = _gated(density=0.35)
    x = torch.rand(3, 3, 64, 64)
    m(x)
    for conv in gated_convs(m):
        mask = conv.gate_ref.last[0]
        assert mask.sum(1).tolist() == [math.ceil(0.35 * conv.conv.out_channels)] * 3


def test_density_one_unit_saliency_equals_ungated():
    dense = _randomised(Darknet(read_cfg(TINY_CFG)))
    gated = apply_gating(copy.deepcopy(dense), gate_plan(dense.blocks, 1.0)).eval()
    for conv in gated_convs(gated):
        with torch.no_grad():
            conv.gate.fc.weight.zero_()
            conv.gate.fc.bias.fill_(1.0)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(dense(x), gated(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        # negative control: half the channels gated off changes the output
        half = apply_gating(Darknet(dense.blocks), gate_plan(dense.blocks, 0.5))
        half.load_state_dict(gated.state_dict())
        assert (half.eval()(x)[0] - dense(x)[0]).abs().max() > 1e-3


def test_shortcut_tied_gates_are_identical():
    m = _gated(density=0.5)       # tiny.cfg: convs 3 and 4 are summed by the shortcut at 5
    assert isinstance(m.layers[3], GatedConv) and isinstance(m.layers[4], GatedConv)
    assert m.layers[3].gate_ref is m.layers[4].gate_ref and m.layers[3].leader
    assert "layers.4.gate.fc.weight" not in m.state_dict()
    names = [m.infos[i].name for i in (3, 4, 5)]
    _, feats = m(torch.rand(4, 3, 64, 64), features=names)
    live = [f.abs().amax(dim=(2, 3)) > 0 for f in feats.values()]
    assert torch.equal(live[0], live[1]) and torch.equal(live[1], live[2])
    assert live[0].sum(1).tolist() == [4] * 4          # ceil(0.5 * 8) of 8, per image


def test_executed_macs_match_hand_count():
    blocks = parse_cfg(HAND_CFG, "hand.cfg")
    plan = gate_plan(blocks, 0.5)
    assert [s["convs"] for s in plan["sets"]] == [[0], [1]]
    m = _randomised(apply_gating(Darknet(blocks), plan))
    with count_macs(m) as c:
        m(torch.rand(2, 3, 8, 8))
    # conv0: 9 * 3 in * 2 kept * 64 = 3456; conv1: 2 live in * 2 kept * 64 = 256;
    # detection: 2 live in * 6 * 64 = 768; gates: 3 * 4 + 4 * 4 = 28
    assert c.per_image == [3456 + 256 + 768 + 28] * 2
    assert c.dense == 9 * 3 * 4 * 64 + 4 * 4 * 64 + 4 * 6 * 64
    assert c.images == 2 and c.usage[0].sum().item() == 2 * 2


def test_gathered_forward_equals_gated():
    m = _gated(density=0.5)
    g = gathered_model(m)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(m(x), g(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with pytest.raises(YoloCompressError, match="batch 1"):
        g(torch.rand(2, 3, 64, 64))
    with torch.no_grad():          # g = 0 everywhere on conv0: conv1 reads no live channel
        m.layers[0].gate.fc.weight.zero_()
        m.layers[0].gate.fc.bias.fill_(-1.0)
        g = gathered_model(m)
        for a, b in zip(m(x), g(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_penalty_is_sum_of_mean_saliencies():
    m = _gated(density=0.5)
    m(torch.rand(2, 3, 64, 64))
    want = sum(c.gate_ref.last[1].mean() for c in gated_convs(m))
    torch.testing.assert_close(gate_penalty(m), want)


def _artifact(m):
    return artifact_from_model(m, "gated", ["a", "b"], gating=m.gating)


def test_gated_artifact_round_trip(tmp_path):
    m = _gated(density=0.5)
    path = tmp_path / "g.pt"
    save_artifact(_artifact(m), path)
    back = build_model(load_artifact(path)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(m(x), back(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("sets,problem", [
    ([{"convs": [3], "density": 0.5}], "not the shortcut-tied set"),
    ([{"convs": [13], "density": 0.5}], "prunable convs"),
    ([{"convs": [0], "density": 0.0}], "density must be in"),
])
def test_bad_gating_record_is_one_line(sets, problem):
    art = _artifact(_gated())
    art["gating"] = {"sets": sets}
    with pytest.raises(YoloCompressError, match=problem) as e:
        build_model(art, source="x.pt")
    assert "\n" not in str(e.value) and str(e.value).startswith("x.pt: ")


def test_onnx_keeps_gating_and_darknet_refuses(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx
    art = _artifact(_gated(density=0.5))
    out = export_onnx(art, tmp_path / "g.onnx")
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"TopK", "ScatterElements"} <= ops
    assert check_onnx(art, out) < 1e-3
    with pytest.raises(YoloCompressError, match="Darknet has no per-image channel gates"):
        export_darknet(art, tmp_path / "d", inputs=["g.pt"])
    assert not (tmp_path / "d.cfg").exists()


def test_gate_plan_densities_by_group():
    blocks = read_cfg(TINY_CFG)
    plan = gate_plan(blocks, 0.5, {"G5": 0.25})
    assert {tuple(s["convs"]): s["density"] for s in plan["sets"]} == {
        (0,): 0.5, (3, 4): 0.5, (18,): 0.25}
    with pytest.raises(YoloCompressError, match="group 'G9'"):
        gate_plan(blocks, 0.5, {"G9": 0.5})


def test_gate_stage_trains_resumes_and_measures(tmp_path, capsys):
    from yolocompress.cli import main
    base = make_mini(tmp_path, train={"epochs": 1, "batch_size": 4, "nominal_batch": 4,
                                      "burn_in": 1, "eval_interval": 1, "multi_scale": False,
                                      "device": "cpu"})
    argv = ["gate", "--config", str(base / "exp.yaml"), "gate.density=0.5", "gate.l1=0.01"]
    assert main(argv) == 0
    out = base / "runs" / "exp" / "gated"
    art = load_artifact(out / "best.pt")
    assert art["stage"] == "gated" and art["gating"]["l1"] == 0.01
    assert {s["density"] for s in art["gating"]["sets"]} == {0.5}
    res = json.loads((out / "gate_macs.json").read_text())
    assert res["images"] == 6 and len(res["macs_per_image"]) == 6
    assert 0 < res["macs_mean"] < 0.5 * res["macs_dense"]
    assert all(len(u) > 0 and all(0 <= v <= 1 for v in u) for u in res["usage"].values())
    assert (out / "channel_usage.png").stat().st_size > 0
    sw = switching(res["usage"])
    assert (f"{sw['switching_share']:.1%} of the gated channels switch between images, in "
            f"{sw['gates_switching']} of {len(res['usage'])} gates") in capsys.readouterr().out
    assert "gate" in (out / "train_log.csv").read_text().splitlines()[0]
    mtime = (out / "best.pt").stat().st_mtime_ns
    assert main(argv) == 0                          # complete, same inputs: reused
    assert (out / "best.pt").stat().st_mtime_ns == mtime
    assert main([*argv[:-1], "gate.l1=0.02"]) == 2   # changed input: refused, nothing redone
    one = load_artifact(out / "last.pt")
    (out / "metrics.json").unlink()                  # as if killed before the stage finished
    capsys.readouterr()
    assert main(argv) == 0
    assert "resuming from" in capsys.readouterr().out
    two = load_artifact(out / "last.pt")             # nothing left to train: the same weights
    assert any(".gate." in k for k in two["state_dict"])
    assert all(torch.equal(one["state_dict"][k], two["state_dict"][k]) for k in one["state_dict"])
    assert main(["gate", "--config", str(base / "exp.yaml"), "gate.densities=[0.5,0.5]"]) == 2
