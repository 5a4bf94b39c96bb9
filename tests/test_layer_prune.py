"""Layer pruning: residual units found from the graph, removed equals masked, index remapping by
hand, cfg and .weights round trips, unit scores (|gamma| and calibration loss), errors."""
import pytest
import torch

from yolocompress.compress.layer_prune import (ResidualUnit, index_map, least_important,
                                               masked_units_state, remove_units, residual_units,
                                               unit_scores, units_from_record, units_record)
from yolocompress.compress.prune import masked_model_state, prune, prune_record, replay
from yolocompress.compress.prune_search import Calibrated
from yolocompress.compress.recalibrate import Calibration, calib_loss, recalibrate_bn
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg, write_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.weights import load_darknet_weights, save_darknet_weights

from conftest import MINI_CFGS, TINY_CFG, cfg_path
from test_prune import _HEAD, _cfg, _conv, _masks_for, _run, _state

# Two adjacent units A (0 -> 3) and B (3 -> 6); layer 8 is a shortcut over a non-conv chain
# that reads A's output (from=-5), and the route reads B's output (relative) and A's (absolute).
_TWO_UNITS = (_conv(8, 3) + _conv(4, act="mish") + _conv(8, 3, act="mish")
              + "[shortcut]\nfrom=-3\nactivation=linear\n"
              + _conv(4) + _conv(8, 3) + "[shortcut]\nfrom=-3\n"
              + _conv(8) + "[shortcut]\nfrom=-5\n"
              + "[route]\nlayers=-1,-3,3\n" + _HEAD)


def _live_state(blocks, size=64):
    """_state with BN running statistics taken from a random batch, so every layer's output is
    normalised and a unit's branch visibly changes the heads (the default init's signal fades)."""
    model = Darknet(blocks)
    model.load_state_dict(_state(blocks))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    return model.state_dict()


def _refs(blocks):
    return [(b.type, b.options.get("layers", b.options.get("from"))) for b in blocks[1:]
            if b.type in ("route", "shortcut")]


def test_residual_units_of_the_shipped_and_miniature_cfgs():
    nano = read_cfg(cfg_path("yolov4-nano"))
    # by hand from yolov4-nano.cfg: each [shortcut] from=-3 over a 1x1 and a 3x3 conv
    assert [(u.input, u.shortcut) for u in residual_units(nano)] == \
        [(4, 7), (14, 17), (24, 27), (27, 30), (37, 40), (40, 43), (50, 53)]
    assert list(residual_units(nano)[0].convs) == [5, 6]
    assert [(u.input, u.shortcut) for u in residual_units(read_cfg(TINY_CFG))] == [(3, 5)]
    assert len(residual_units(read_cfg(cfg_path("yolov4")))) == 23
    assert residual_units(read_cfg(cfg_path("yolov4-tiny"))) == []
    # the yolov3-tiny-prn miniature: its shortcuts are leaky (x + f(x) then an activation)
    for path in MINI_CFGS:
        assert residual_units(read_cfg(path)) == []
    assert [(u.input, u.shortcut) for u in residual_units(_cfg(_TWO_UNITS))] == [(0, 3), (3, 6)]


@pytest.mark.parametrize("why,body", [
    ("leaky shortcut", _conv(8) + _conv(4) + _conv(8) + "[shortcut]\nfrom=-3\nactivation=leaky\n"),
    ("a route reads the branch", _conv(8) + _conv(8) + _conv(8) + "[shortcut]\nfrom=-3\n"
     + "[route]\nlayers=-3\n" + _conv(8)),
    ("stride-2 branch", _conv(8) + _conv(8) + _conv(8, 3, stride=2) + _conv(8, 3)
     + "[upsample]\nstride=2\n" + "[shortcut]\nfrom=-5\n"),
    ("channels differ", _conv(8) + _conv(4) + _conv(16) + "[shortcut]\nfrom=-3\n"),
    ("no conv between", _conv(8) + _conv(8) + "[shortcut]\nfrom=-1\n"),
])
def test_units_that_are_not_removable(why, body):
    blocks = _cfg(body + _HEAD)
    assert any(b.type == "shortcut" for b in blocks)
    assert residual_units(blocks) == [], why


def test_remove_units_renumbers_routes_and_shortcuts_by_hand():
    blocks = _cfg(_TWO_UNITS)
    a, b = residual_units(blocks)
    assert _refs(blocks) == [("shortcut", "-3"), ("shortcut", "-3"), ("shortcut", "-5"),
                             ("route", "-1,-3,3")]
    sd = _state(blocks)
    cases = {  # layer 8 reads A's output: after A's removal, conv0; the route's 3 likewise
        (a,): [("shortcut", "-3"), ("shortcut", "-5"), ("route", "-1,-3,0")],
        (b,): [("shortcut", "-3"), ("shortcut", "-2"), ("route", "-1,-3,3")],
        (a, b): [("shortcut", "-2"), ("route", "-1,-3,0")],
    }
    for units, refs in cases.items():
        new_blocks, new_sd = remove_units(blocks, sd, units)
        assert _refs(new_blocks) == refs
        assert len(new_blocks) == len(blocks) - 3 * len(units)
        assert new_sd.keys() == Darknet(new_blocks).state_dict().keys()
    assert index_map(blocks, (a, b)) == {0: 0, 7: 1, 8: 2, 9: 3, 10: 4, 11: 5, 3: 0, 6: 0}
    # the tensors of the layers after the units moved with them
    new_blocks, new_sd = remove_units(blocks, sd, (a, b))
    assert torch.equal(new_sd["layers.1.conv.weight"], sd["layers.7.conv.weight"])
    assert torch.equal(new_sd["layers.4.conv.bias"], sd["layers.10.conv.bias"])
    assert torch.equal(new_sd["layers.0.bn.weight"], sd["layers.0.bn.weight"])


@pytest.mark.parametrize("name,pick", [
    ("two-units", (0,)), ("two-units", (1,)), ("two-units", (0, 1)), ("tiny", (0,)),
    ("yolov4-nano", (0, 2, 3, 6)),          # (24, 27) and (27, 30) are adjacent
    ("yolov3", (2, 10, 18, 22)),            # the last units of stages 3 and 4: absolute routes
])
def test_removed_equals_masked_model(name, pick):
    blocks = {"two-units": lambda: _cfg(_TWO_UNITS), "tiny": lambda: read_cfg(TINY_CFG)}.get(
        name, lambda: read_cfg(cfg_path(name)))()
    units = [residual_units(blocks)[i] for i in pick]
    size = 32 if name == "two-units" else 64
    sd = _live_state(blocks, size)
    masked = masked_units_state(blocks, sd, units)
    new_blocks, new_sd = remove_units(blocks, sd, units)
    removed, reference, unmasked = (_run(bl, s, size) for bl, s in
                                    ((new_blocks, new_sd), (blocks, masked), (blocks, sd)))
    for x, y in zip(removed, reference):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)
    # the negative control: the units did change the output
    assert max(float((x - z).abs().max()) for x, z in zip(removed, unmasked)) > 1e-3


def test_masking_zeroes_only_the_units_last_convs_and_needs_act_zero():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    u = residual_units(blocks)[1]
    masked = masked_units_state(blocks, sd, [u])
    changed = {k for k in sd if not torch.equal(sd[k], masked[k])}
    assert changed == {f"layers.{u.last_conv}.bn.weight", f"layers.{u.last_conv}.bn.bias"}
    logistic = _cfg(_conv(8) + _conv(8) + _conv(8, act="logistic") + "[shortcut]\nfrom=-3\n"
                    + _HEAD)
    with pytest.raises(YoloCompressError, match="cannot be masked to output 0"):
        masked_units_state(logistic, _state(logistic), residual_units(logistic))


def test_rebuilt_cfg_reparses_runs_the_same_and_weights_round_trip(tmp_path):
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    new_blocks, new_sd = remove_units(blocks, sd, residual_units(blocks)[1:4])
    text = write_cfg(new_blocks)
    assert parse_cfg(text) == new_blocks
    (tmp_path / "slim.cfg").write_text(text)
    reread = read_cfg(tmp_path / "slim.cfg")
    for x, y in zip(_run(reread, new_sd, 64), _run(new_blocks, new_sd, 64)):
        assert torch.equal(x, y)
    model = Darknet(reread)
    model.load_state_dict(new_sd)
    save_darknet_weights(model, tmp_path / "slim.weights")
    loaded = Darknet(reread)
    assert load_darknet_weights(loaded, tmp_path / "slim.weights").complete
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, new_sd[k]), k


def test_unit_scores_rank_by_mean_abs_gamma_by_hand():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    units = residual_units(blocks)
    for u, value in zip(units, (0.5, -0.1, 0.3, 0.1, 0.9, 0.2, 0.7)):
        sd[f"layers.{u.last_conv}.bn.weight"] = torch.full_like(
            sd[f"layers.{u.last_conv}.bn.weight"], value)
    sd[f"layers.{units[0].last_conv}.bn.weight"][:2] = torch.tensor([1.0, -1.0])
    scores = unit_scores(blocks, sd, units)
    n = sd[f"layers.{units[0].last_conv}.bn.weight"].numel()
    assert scores == pytest.approx([(2 + 0.5 * (n - 2)) / n, 0.1, 0.3, 0.1, 0.9, 0.2, 0.7])
    # lowest first, ties to the earlier unit; returned in cfg order
    assert least_important(blocks, units, scores, 3) == [units[1], units[3], units[5]]
    assert least_important(blocks, units, scores, 2) == [units[1], units[3]]
    assert least_important(blocks, units, scores, 0) == []


def test_record_names_units_and_replays_with_channel_pruning():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    units = residual_units(blocks)[2:4]
    rows = units_record(blocks, units, {u.shortcut: 0.25 for u in units})
    assert rows == [
        {"shortcut": "shortcut27", "input": "conv24", "convs": ["conv25", "conv26"],
         "stride": 8, "part": "backbone", "score": 0.25},
        {"shortcut": "shortcut30", "input": "shortcut27", "convs": ["conv28", "conv29"],
         "stride": 8, "part": "backbone", "score": 0.25}]
    assert units_from_record(blocks, rows) == units
    # units first, then channels on the reduced cfg: replay does both from the source
    reduced, reduced_sd = remove_units(blocks, sd, units)
    keep = _masks_for(reduced, reduced_sd)
    record = {**prune_record(reduced, keep), "units": rows}
    want_blocks, want_sd = prune(reduced, reduced_sd, keep, compensate=False)
    got_blocks, got_sd = replay(blocks, sd, record, compensate=False)
    assert write_cfg(got_blocks) == write_cfg(want_blocks)
    assert all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
    # channels pruned on the reduced cfg still equal their masked model there
    masked = masked_model_state(reduced, reduced_sd, keep, zero_beta=True)
    pruned_blocks, pruned_sd = prune(reduced, masked, keep)
    for x, y in zip(_run(pruned_blocks, pruned_sd, 64), _run(reduced, masked, 64)):
        assert torch.allclose(x, y, atol=1e-5, rtol=0)


def test_layer_pruning_errors():
    nano = read_cfg(cfg_path("yolov4-nano"))
    units = residual_units(nano)
    with pytest.raises(YoloCompressError, match=r"prune.layers=8, but the cfg has only 7 "
                                                r"removable residual units"):
        least_important(nano, units, [0.0] * 7, 8)
    tiny4 = read_cfg(cfg_path("yolov4-tiny"))
    with pytest.raises(YoloCompressError, match="prune.layers=1, but the cfg has no removable "
                                                "residual unit"):
        least_important(tiny4, [], [], 1)
    with pytest.raises(YoloCompressError, match="must be >= 0"):
        least_important(nano, units, [0.0] * 7, -1)
    sd = _state(nano)
    with pytest.raises(YoloCompressError, match="conv5 is not a removable residual unit"):
        remove_units(nano, sd, [ResidualUnit(4, 5)])
    with pytest.raises(YoloCompressError, match="named twice"):
        remove_units(nano, sd, [units[0], units[0]])
    with pytest.raises(YoloCompressError, match="prune record removes unit 'conv5'"):
        units_from_record(nano, [{"shortcut": "conv5"}])
    no_bn = _cfg(_conv(8) + _conv(8) + _conv(8, bn=0) + "[shortcut]\nfrom=-3\n" + _HEAD)
    with pytest.raises(YoloCompressError, match="has no BN gamma to rank its residual unit"):
        unit_scores(no_bn, Darknet(no_bn).state_dict(), residual_units(no_bn))


def test_unit_losses_score_a_unit_that_adds_nothing_as_the_full_model():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    targets = torch.tensor([[0, 1, 10.0, 10, 30, 40], [1, 0, 20, 30, 50, 60]])   # xyxy px
    cal = Calibrated(None, Calibration(((images, targets),)))
    units = residual_units(blocks)
    sd = masked_units_state(blocks, _live_state(blocks), units[2:3])    # unit 2 adds 0
    losses = cal.unit_losses(blocks, sd, units)
    model = Darknet(blocks)
    model.load_state_dict(sd)
    full = calib_loss(recalibrate_bn(model, cal.search), cal.search)
    assert losses[2] == pytest.approx(full, rel=1e-5)
    assert all(abs(v - full) > 1e-4 * full for i, v in enumerate(losses) if i != 2)
