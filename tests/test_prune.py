"""Group channel pruning: masks, slim rebuild, compensation, records, budgets, importances."""
import json

import numpy as np
import pytest
import torch

from yolocompress.compress.budget_evolve import percents_at
from yolocompress.compress.graph import analyze
from yolocompress.compress.groups import Group, group_layers
from yolocompress.compress.importance import (BNTaylor, RandomImportance, bn_gamma_abs, get_importance,
                                              l1_filter, tied_scores)
from yolocompress.compress.prune import (MaskSettings, find_percents_for_budget, group_thresholds,
                                         keep_from_record, make_masks, masked_model_state, plan,
                                         prune, pruned_cost, replay)
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg, write_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.profile import profile_blocks
from yolocompress.models.weights import load_darknet_weights, save_darknet_weights

from conftest import PUBLISHED_CFGS, TINY_CFG, cfg_path

_STATES: dict = {}


def _state(blocks, seed=0):
    """A state_dict of the cfg with random BN gammas/betas/statistics (float32)."""
    key = write_cfg(blocks)
    if key not in _STATES:
        _STATES[key] = Darknet(blocks).state_dict()
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in _STATES[key].items():
        if k.endswith("bn.weight"):
            v = torch.rand(v.shape, generator=g) + 0.05
        elif k.endswith(("bn.bias", "running_mean")):
            v = torch.randn(v.shape, generator=g) * 0.2
        elif k.endswith("running_var"):
            v = torch.rand(v.shape, generator=g) + 0.5
        sd[k] = v.clone()
    return sd


def _model(blocks, sd):
    m = Darknet(blocks)
    m.load_state_dict(sd, strict=True)
    return m.eval()


def _run(blocks, sd, size, seed=1, features=()):
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return _model(blocks, sd)(x, features=features) if features else _model(blocks, sd)(x)


def _cfg(body):
    return parse_cfg("[net]\nwidth=32\nheight=32\nchannels=3\n" + body, source="synthetic.cfg")


def _conv(filters, size=1, bn=1, act="leaky", stride=1):
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\n"
            f"stride={stride}\npad=1\nactivation={act}\n")


_HEAD = "[convolutional]\nfilters=21\nsize=1\nstride=1\npad=1\nactivation=linear\n" \
        "[yolo]\nmask=0,1,2\nanchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n"


# ---- thresholds and masks, by hand ----------------------------------------------------------

def test_group_thresholds_are_each_groups_own_percentile():
    scores = {"A": {0: np.array([0.1, 0.5, 0.3]), 1: np.array([0.2])}, "B": {},
              "C": np.array([2.0, 1.0])}
    assert group_thresholds(scores, {"A": 0.5, "B": 0.3, "C": 0.5}) == \
        {"A": 0.3, "B": None, "C": 2.0}
    assert group_thresholds(scores, {"A": 0.0, "B": 0, "C": 1.0}) == \
        {"A": 0.1, "B": None, "C": float("inf")}
    assert group_thresholds({"A": np.arange(100.0)}, {"A": 0.29})["A"] == 29.0
    with pytest.raises(YoloCompressError, match="no percent for group B"):
        group_thresholds(scores, {"A": 0.5, "C": 0.5})


def _set_gammas(sd, values):
    for conv, gammas in values.items():
        sd[f"layers.{conv}.bn.weight"] = torch.tensor(gammas, dtype=torch.float32)


def test_make_masks_thresholds_floor_and_rounding_by_hand():
    blocks = _cfg(_conv(6, 3) + _conv(4) + _HEAD)
    sd = _state(blocks)
    _set_gammas(sd, {0: [0.9, 0.1, 0.5, 0.05, 0.7, 0.3], 1: [0.2, 0.8, 0.6, 0.4]})
    group = [Group("A", "", (0, 1))]
    # 10 channels, p=0.5: the 5 lowest (0.05 0.1 0.2 0.3 0.4) go, threshold 0.5
    keep = make_masks(blocks, sd, group, [0.5], min_keep=0.1, min_channels=1)
    assert {c: k.tolist() for c, k in keep.items()} == {0: [0, 2, 4], 1: [1, 2]}
    # floor: min_channels=3 tops conv1 up with its next best channel (0.4 -> channel 3)
    keep = make_masks(blocks, sd, group, [0.5], min_keep=0.1, min_channels=3)
    assert keep[1].tolist() == [1, 2, 3]
    # floor by fraction: ceil(0.8 * 6) = 5 for conv0, ceil(0.8 * 4) = 4 for conv1
    keep = make_masks(blocks, sd, group, [1.0], min_keep=0.8, min_channels=1)
    assert keep[0].tolist() == [0, 1, 2, 4, 5] and keep[1].tolist() == [0, 1, 2, 3]
    # round_to=4: conv0's 3 kept become 4 (adds 0.3 -> channel 5), conv1's 2 become 4 (all)
    keep = make_masks(blocks, sd, group, [0.5], min_keep=0.1, min_channels=1, round_to=4)
    assert keep[0].tolist() == [0, 2, 4, 5] and keep[1].tolist() == [0, 1, 2, 3]
    # min_channels is clamped to the layer size
    keep = make_masks(blocks, sd, group, [1.0], min_keep=0.1, min_channels=100)
    assert keep[0].size == 6 and keep[1].size == 4


_CHAIN3 = (_conv(8, 3) + _conv(4) + _conv(4, 3) + "[shortcut]\nfrom=-2\nactivation=linear\n"
           + _conv(4, 3) + "[shortcut]\nfrom=-2\nactivation=linear\n" + _conv(8) + _HEAD)


def test_majority_union_and_mean_merge_a_tied_set():
    blocks = _cfg(_CHAIN3)
    graph = analyze(blocks)
    assert graph.tied_sets == (frozenset({1, 2, 4}),)
    sd = _state(blocks)
    # threshold 0.5 (p = 0.5 of 12 values); votes per channel: 3, 2, 1, 0
    _set_gammas(sd, {1: [0.9, 0.8, 0.7, 0.1], 2: [0.9, 0.8, 0.2, 0.1], 4: [0.9, 0.2, 0.3, 0.1]})
    group = [Group("T", "", (1, 2, 4))]
    kw = dict(min_keep=0.01, min_channels=1)
    major = make_masks(blocks, sd, group, [0.5], merge="majority", **kw)
    union = make_masks(blocks, sd, group, [0.5], merge="union", **kw)
    assert all(major[c].tolist() == [0, 1] for c in (1, 2, 4))
    assert all(union[c].tolist() == [0, 1, 2] for c in (1, 2, 4))
    # "mean": the set's mean per channel (0.9, 0.6, 0.4, 0.1) against the threshold 0.7
    mean = make_masks(blocks, sd, group, [0.5], merge="mean", **kw)
    assert all(mean[c].tolist() == [0] for c in (1, 2, 4))
    # the floor fills a tied set by its mean score: channel 2 (0.4) before channel 3 (0.1)
    floor = make_masks(blocks, sd, group, [1.0], min_keep=0.01, min_channels=3)
    assert all(floor[c].tolist() == [0, 1, 2] for c in (1, 2, 4))


# ---- every cfg: any thresholds give a model that builds, loads and runs ---------------------

_SWEEPS = {"yolov4": 1, "yolov3": 1, "yolov4-csp": 1}     # big cfgs: one sweep each


@pytest.mark.parametrize("path", PUBLISHED_CFGS + [TINY_CFG], ids=lambda p: p.stem)
def test_random_thresholds_always_build_load_and_run(path):
    blocks = read_cfg(path)
    graph = analyze(blocks)
    groups = group_layers(blocks, graph)
    rng = np.random.default_rng(7)
    for sweep in range(_SWEEPS.get(path.stem, 4)):
        sd = _state(blocks, seed=sweep)
        percents = rng.uniform(0, 1, len(groups))
        percents[rng.integers(len(groups))] = rng.choice([0.0, 1.0])
        settings = MaskSettings(min_keep=float(rng.uniform(0.01, 0.5)),
                                min_channels=int(rng.integers(1, 16)),
                                round_to=int(rng.choice([1, 2, 8])),
                                merge=str(rng.choice(["majority", "union"])))
        keep = make_masks(blocks, sd, groups, percents, min_keep=settings.min_keep,
                          min_channels=settings.min_channels, round_to=settings.round_to,
                          merge=settings.merge)
        for tied in graph.tied_sets:
            assert len({tuple(keep[c]) for c in tied}) == 1
        for c, k in keep.items():
            n = blocks[c + 1].get_int("filters")
            assert k.size >= settings.floor(n)
            assert k.size % settings.round_to == 0 or k.size == n
        new_blocks, new_sd = prune(blocks, sd, keep)
        for c, k in keep.items():
            assert new_blocks[c + 1].get_int("filters") == k.size
        heads = _run(new_blocks, new_sd, 64)
        assert all(torch.isfinite(h).all() for h in heads)


# ---- the pruned model equals the masked model -----------------------------------------------

def _masks_for(blocks, sd, percents=(0.4, 0.5, 0.6, 0.5, 0.4)):
    groups = group_layers(blocks)
    return make_masks(blocks, sd, groups, list(percents)[:len(groups)], min_channels=2)


@pytest.mark.parametrize("name", ["yolov4-nano", "yolov4-tiny", "tiny"])
def test_pruned_equals_masked_model_with_zero_beta(name):
    blocks = read_cfg(TINY_CFG if name == "tiny" else cfg_path(name))
    sd = _state(blocks)
    keep = _masks_for(blocks, sd)
    assert any(k.size < blocks[c + 1].get_int("filters") for c, k in keep.items())
    masked = masked_model_state(blocks, sd, keep, zero_beta=True)
    new_blocks, new_sd = prune(blocks, masked, keep)
    for a, b in zip(_run(new_blocks, new_sd, 64), _run(blocks, masked, 64)):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_masked_model_state_zeroes_only_pruned_channels():
    blocks = read_cfg(TINY_CFG)
    sd = _state(blocks)
    keep = {3: [0, 2, 5], 4: [0, 2, 5]}
    masked = masked_model_state(blocks, sd, keep)
    gamma = masked["layers.3.bn.weight"]
    assert (gamma[[1, 3, 4, 6, 7]] == 0).all() and (gamma[[0, 2, 5]] != 0).all()
    assert torch.equal(masked["layers.3.bn.bias"], sd["layers.3.bn.bias"])
    assert torch.equal(masked["layers.0.bn.weight"], sd["layers.0.bn.weight"])
    assert (masked_model_state(blocks, sd, keep, zero_beta=True)["layers.4.bn.bias"][[1, 7]]
            == 0).all()


# 1x1 readers only: the pruned channels' constants pass a maxpool, an upsample, routes and a
# shortcut with a leaky activation before being folded, so compensation is exact.
_ONE_BY_ONE = (_conv(8, 3, stride=2) + _conv(8) + _conv(8)
               + "[shortcut]\nfrom=-2\nactivation=leaky\n[maxpool]\nsize=2\nstride=2\n"
               + "[upsample]\nstride=2\n"
               + "[route]\nlayers=-1,-5\n" + _conv(16) + _conv(8, act="mish") + _HEAD)


def test_compensation_is_exact_for_1x1_readers_with_nonzero_beta():
    blocks = _cfg(_ONE_BY_ONE)
    sd = _state(blocks)
    for c in (1, 2):                 # negative sums, where the shortcut's leaky bends them
        sd[f"layers.{c}.bn.bias"] = -sd[f"layers.{c}.bn.bias"].abs() - 0.1
    keep = {1: [0, 3, 4], 2: [0, 3, 4], 7: [1, 2, 5, 9, 12], 8: [0, 6]}
    masked = masked_model_state(blocks, sd, keep)
    new_blocks, new_sd = prune(blocks, masked, keep)
    _, uncompensated = prune(blocks, masked, keep, compensate=False)
    ref = _run(blocks, masked, 32)[0]
    assert torch.allclose(_run(new_blocks, new_sd, 32)[0], ref, atol=1e-5, rtol=0)
    assert (_run(new_blocks, uncompensated, 32)[0] - ref).abs().max() > 1e-2


def test_compensation_into_a_3x3_reader_is_exact_in_the_interior_only():
    blocks = _cfg(_conv(8, 3) + _conv(8, 3) + _HEAD)
    sd = _state(blocks)
    keep = {0: [1, 2, 6]}
    masked = masked_model_state(blocks, sd, keep)
    new_blocks, new_sd = prune(blocks, masked, keep)
    ref = _run(blocks, masked, 32, features=["conv1"])[1]["conv1"]
    out = _run(new_blocks, new_sd, 32, features=["conv1"])[1]["conv1"]
    diff = (out - ref).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-5
    assert diff[..., 0, :].max() > 1e-3 and diff[..., :, -1].max() > 1e-3


def test_compensation_error_is_far_below_no_compensation_on_nano():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    keep = _masks_for(blocks, sd)
    masked = masked_model_state(blocks, sd, keep)
    new_blocks, comp = prune(blocks, masked, keep)
    _, plain = prune(blocks, masked, keep, compensate=False)
    ref = _run(blocks, masked, 128)
    err = [sum((a - b).abs().mean().item() for a, b in zip(_run(new_blocks, s, 128), ref))
           for s in (comp, plain)]
    # border pixels of 3x3 readers keep an error (see prune's docstring); on average it is small
    assert err[0] < 0.2 * err[1]


def test_prune_slices_tensors_and_offsets_across_routes_and_shortcuts():
    blocks = read_cfg(TINY_CFG)
    sd = _state(blocks)
    keep = {0: [1, 4, 7], 3: [0, 2, 5], 4: [0, 2, 5], 18: [3, 8]}
    new_blocks, new_sd = prune(blocks, sd, keep, compensate=False)
    w8 = sd["layers.8.conv.weight"]          # reads route 6 = shortcut 5 (3+4, 8ch) + conv1
    assert torch.equal(new_sd["layers.8.conv.weight"],
                       w8[:, [0, 2, 5] + list(range(8, 24))])
    w18 = sd["layers.18.conv.weight"]        # route -1, 6: upsampled conv12 (16) + route 6 (24)
    assert torch.equal(new_sd["layers.18.conv.weight"],
                       w18[[3, 8]][:, list(range(16)) + [16, 18, 21] + list(range(24, 40))])
    assert torch.equal(new_sd["layers.1.conv.weight"], sd["layers.1.conv.weight"][:, [1, 4, 7]])
    assert torch.equal(new_sd["layers.4.bn.running_var"], sd["layers.4.bn.running_var"][[0, 2, 5]])
    assert new_blocks[1].get("filters") == "3" and blocks[1].get("filters") == "8"


# ---- errors ---------------------------------------------------------------------------------

def test_bad_groups_percents_and_settings_are_errors():
    blocks = read_cfg(TINY_CFG)
    sd = _state(blocks)
    with pytest.raises(YoloCompressError, match="never pruned \\(grouped_route\\)"):
        make_masks(blocks, sd, [Group("A", "", (1,))], [0.5])
    with pytest.raises(YoloCompressError, match="split over groups"):
        make_masks(blocks, sd, [Group("A", "", (3,)), Group("B", "", (4,))], [0.5, 0.5])
    with pytest.raises(YoloCompressError, match="not a conv"):
        make_masks(blocks, sd, [Group("A", "", (2,))], [0.5])
    groups = group_layers(blocks)
    with pytest.raises(YoloCompressError, match="3 percents for 5 groups"):
        make_masks(blocks, sd, groups, [0.1, 0.2, 0.3])
    with pytest.raises(YoloCompressError, match="percent of group G2 must be in"):
        make_masks(blocks, sd, groups, [0.1, 1.5, 0, 0, 0])
    with pytest.raises(YoloCompressError, match="percents name groups"):
        make_masks(blocks, sd, groups, {"G1": 0.5})
    with pytest.raises(YoloCompressError, match="unknown merge 'any'"):
        make_masks(blocks, sd, groups, [0.5] * 5, merge="any")
    with pytest.raises(YoloCompressError, match="min_keep"):
        make_masks(blocks, sd, groups, [0.5] * 5, min_keep=0)
    with pytest.raises(YoloCompressError, match="\\[yolo\\] at layer 14 needs all 21"):
        prune(blocks, sd, {13: list(range(20))})
    with pytest.raises(YoloCompressError, match="shortcut-tied convs must keep one channel set"):
        prune(blocks, sd, {3: [0, 1]})


def test_pruning_a_non_bn_conv_needs_compensate_false():
    blocks = _cfg(_conv(8) + _conv(8, bn=0) + _conv(4) + _HEAD)
    sd = _state(blocks)
    with pytest.raises(YoloCompressError, match="compensate=False"):
        prune(blocks, sd, {1: [0, 1]})
    new_blocks, new_sd = prune(blocks, sd, {1: [0, 1]}, compensate=False)
    assert torch.equal(new_sd["layers.1.conv.bias"], sd["layers.1.conv.bias"][:2])


# ---- records --------------------------------------------------------------------------------

def test_plan_record_is_json_and_replays_to_the_same_model():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    groups = group_layers(blocks)
    percents = [0.3, 0.4, 0.7, 0.6, 0.5]
    record = json.loads(json.dumps(plan(blocks, sd, groups, percents, round_to=2)))
    assert record["layers"]["conv37"] == record["layers"]["conv39"] == record["layers"]["conv42"]
    assert set(record["groups"]) == {"G1", "G2", "G3", "G4", "G5"}
    assert record["groups"]["G2"][0] == "conv34"
    assert record["percents"] == dict(zip(record["groups"], percents))
    assert record["settings"] == {"min_keep": 0.1, "min_channels": 8, "round_to": 2,
                                  "merge": "majority", "importance": "bn_gamma_abs"}
    assert record["filters"]["conv34"][0] == 128
    keep = make_masks(blocks, sd, groups, percents, round_to=2)
    direct_blocks, direct_sd = prune(blocks, sd, keep)
    replay_blocks, replay_sd = replay(blocks, sd, record)
    assert write_cfg(replay_blocks) == write_cfg(direct_blocks)
    assert direct_sd.keys() == replay_sd.keys()
    assert all(torch.equal(direct_sd[k], replay_sd[k]) for k in direct_sd)


def test_bad_records_are_errors():
    blocks = read_cfg(TINY_CFG)
    with pytest.raises(YoloCompressError, match="version 1"):
        keep_from_record(blocks, {"layers": {}})
    with pytest.raises(YoloCompressError, match="layer 'conv99'"):
        keep_from_record(blocks, {"version": 1, "layers": {"conv99": [0]}})
    with pytest.raises(YoloCompressError, match="outside its 8 filters"):
        replay(blocks, _state(blocks), {"version": 1, "layers": {"conv0": [9]}})


def test_pruned_cfg_and_weights_round_trip(tmp_path):
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    new_blocks, new_sd = prune(blocks, sd, _masks_for(blocks, sd))
    text = write_cfg(new_blocks)
    assert parse_cfg(text) == new_blocks
    model = _model(parse_cfg(text), new_sd)
    save_darknet_weights(model, tmp_path / "slim.weights")
    loaded = Darknet(parse_cfg(text))
    report = load_darknet_weights(loaded, tmp_path / "slim.weights")
    assert report.complete
    for k, v in loaded.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, new_sd[k]), k


# ---- budget ---------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["params", "flops"])
@pytest.mark.parametrize("method", ["scale", "greedy"])
def test_budget_lands_within_one_percent_on_nano(metric, method):
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    base = [0.2, 0.4, 0.9, 0.8, 0.6]
    r = find_percents_for_budget(blocks, sd, None, base, (metric, 0.45), method=method)
    assert 0.45 <= r.reduction <= 0.45 * 1.01
    new_blocks, _ = prune(blocks, sd, r.keep)
    before = sum(getattr(row, metric) for row in profile_blocks(blocks))
    after = sum(getattr(row, metric) for row in profile_blocks(new_blocks))
    assert after == pruned_cost(blocks, r.keep, metric)
    assert 1 - after / before == pytest.approx(r.reduction)
    if method == "scale":                    # one factor on all groups
        factors = {round(r.percents[n] / b, 6) for n, b in zip(r.percents, base)
                   if r.percents[n] < 1}
        assert len(factors) == 1


def test_budget_greedy_from_zero_and_unreachable_targets():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    sd = _state(blocks)
    r = find_percents_for_budget(blocks, sd, target=("params", 0.3))
    assert 0.3 <= r.reduction <= 0.303
    with pytest.raises(YoloCompressError, match="cannot remove 99.0% of the params"):
        find_percents_for_budget(blocks, sd, target=("params", 0.99))
    with pytest.raises(YoloCompressError, match="unknown budget metric"):
        find_percents_for_budget(blocks, sd, target=("energy", 0.3))
    with pytest.raises(YoloCompressError, match="needs a non-zero base percent"):
        find_percents_for_budget(blocks, sd, target=("params", 0.3), method="scale")


def _nano_and_g3():
    """(yolov4-nano blocks, a state, its groups, {G3 conv: its filters})."""
    blocks = read_cfg(cfg_path("yolov4-nano"))
    groups = group_layers(blocks)
    return (blocks, _state(blocks), groups,
            {c: blocks[c + 1].get_int("filters") for c in groups[2].layers})


def test_scored_greedy_follows_the_score_and_lands_on_the_budget():
    """A score that punishes any pruning in G3 (and is blind to the rest): the scored search
    takes the FLOPs elsewhere, where the importance-per-FLOP greedy does prune G3."""
    blocks, sd, groups, g3 = _nano_and_g3()
    calls = []

    def score(keep):
        calls.append(1)
        return float(sum(n - keep[c].size for c, n in g3.items()))

    r = find_percents_for_budget(blocks, sd, groups, [0.0] * 5, ("flops", 0.3), score=score,
                                 score_step=0.1)
    assert 0.3 <= r.reduction <= 0.303 and all(r.keep[c].size == n for c, n in g3.items())
    # the base, then <= G calls a round; a round advances 0.1 or empties a group
    assert 1 + 5 * 3 <= len(calls) <= 1 + 5 * (3 + 5) - 1
    plain = find_percents_for_budget(blocks, sd, groups, [0.0] * 5, ("flops", 0.3))
    assert any(plain.keep[c].size < n for c, n in g3.items())
    with pytest.raises(YoloCompressError, match="needs method greedy or evolve"):
        find_percents_for_budget(blocks, sd, groups, [0.1] * 5, ("flops", 0.3), method="scale",
                                 score=score)


def test_evolve_starts_from_one_common_threshold_and_follows_the_score():
    """A score that punishes pruning G3: the evolution moves FLOPs out of G3 and every
    candidate lands on the budget; the start is the common threshold of every group."""
    blocks, sd, groups, g3 = _nano_and_g3()
    seen = []

    def score(keep):
        seen.append(1 - pruned_cost(blocks, keep, "flops") / pruned_cost(blocks, {}, "flops"))
        return float(sum(n - keep[c].size for c, n in g3.items()))

    kw = dict(score=score, method="evolve", evolve_options=dict(rounds=12, population=4))
    r = find_percents_for_budget(blocks, sd, groups, None, ("flops", 0.3), **kw)
    assert len(r.history) == len(seen) == 12 and 0.3 <= r.reduction <= 0.303
    assert all(0.3 <= red <= 0.303 for red in seen)
    assert r.history[0]["generation"] == 0 and r.history[-1]["generation"] == 3
    assert score(r.keep) == min(h["score"] for h in r.history) < r.history[0]["score"]
    # the start: one threshold for all groups, so no group drops a score another group keeps
    scores = {g.name: np.sort(np.concatenate(list(bn_gamma_abs(sd, g).values()))) for g in groups}
    ks = {n: int(round(p * scores[n].size)) for n, p in r.history[0]["percents"].items()}
    assert max(scores[n][k - 1] for n, k in ks.items() if k > 0) \
        < min(scores[n][k] for n, k in ks.items() if k < scores[n].size)
    again = find_percents_for_budget(blocks, sd, groups, None, ("flops", 0.3), **kw)
    assert again.percents == r.percents                  # seeded
    with pytest.raises(YoloCompressError, match="'evolve' needs a score"):
        find_percents_for_budget(blocks, sd, groups, None, ("flops", 0.3), method="evolve")
    with pytest.raises(YoloCompressError, match="evolve needs rounds >= 1"):
        find_percents_for_budget(blocks, sd, groups, None, ("flops", 0.3), score=score,
                                 method="evolve", evolve_options=dict(rounds=0))


def test_percents_at_counts_scores_strictly_below_each_threshold():
    scores = {"A": np.array([0.1, 0.2, 0.2, 0.5]), "B": np.array([1.0, 2.0])}
    assert percents_at(scores, {"A": 0.2, "B": 5.0}) == {"A": 0.25, "B": 1.0}
    assert percents_at(scores, {"A": 0.0, "B": 1.5}) == {"A": 0.0, "B": 0.5}
    # the group threshold of such a percent passes exactly the scores >= the threshold
    assert group_thresholds({"A": scores["A"]}, {"A": 0.25})["A"] == 0.2


# ---- importance -----------------------------------------------------------------------------

def test_importances_by_hand():
    blocks = _cfg(_conv(3) + _conv(2) + _HEAD)
    sd = _state(blocks)
    sd["layers.0.bn.weight"] = torch.tensor([-0.5, 0.25, 0.0])
    sd["layers.1.conv.weight"] = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, -3.0]]).view(2, 3, 1, 1)
    assert bn_gamma_abs(sd, [0])[0].tolist() == [0.5, 0.25, 0.0]
    assert l1_filter(sd, Group("A", "", (1,)))[1].tolist() == [3.5, 3.0]
    model = _model(blocks, sd)
    assert bn_gamma_abs(model, [0])[0].tolist() == [0.5, 0.25, 0.0]
    r1, r2 = RandomImportance(3), get_importance("random", seed=3)
    assert np.array_equal(r1(sd, [0, 1])[1], r2(sd, [0, 1])[1]) and r1.name == "random(seed=3)"
    assert not np.array_equal(r1(sd, [0])[0], RandomImportance(4)(sd, [0])[0])
    assert tied_scores({0: np.array([1.0, 2.0]), 5: np.array([3.0, 0.0])}, {0, 5}).tolist() == \
        [2.0, 1.0]
    with pytest.raises(YoloCompressError, match="unknown importance 'taylor'"):
        get_importance("taylor")
    with pytest.raises(YoloCompressError, match="no 'layers.2.bn.weight'"):
        bn_gamma_abs(sd, [2])


def test_normalised_l2_and_taylor_importances_by_hand():
    blocks = _cfg(_conv(3) + _conv(2) + _HEAD)
    sd = _state(blocks)
    sd["layers.0.bn.weight"] = torch.tensor([-0.5, 0.25, 0.0])
    sd["layers.1.bn.weight"] = torch.zeros(2)
    sd["layers.1.conv.weight"] = torch.tensor([[1.0, -2.0, 2.0], [0.0, 0.0, -3.0]]).view(2, 3, 1, 1)
    norm = get_importance("bn_gamma_norm")(sd, [0, 1])
    assert norm[0].tolist() == [2.0, 1.0, 0.0] and norm[1].tolist() == [1.0, 1.0]  # mean 0.25; 0
    assert get_importance("l2_filter")(sd, [1])[1].tolist() == [3.0, 3.0]
    taylor = get_importance("bn_taylor", gradients={0: [0.1, 0.3, 0.2], 1: np.ones(2)})
    assert taylor.name == "bn_taylor" and taylor(sd, [0])[0].tolist() == [0.1, 0.3, 0.2]
    with pytest.raises(YoloCompressError, match=r"no gradients for convs \[1\]"):
        BNTaylor({0: np.ones(3)})(sd, [0, 1])
    with pytest.raises(YoloCompressError, match="needs gamma gradients"):
        get_importance("bn_taylor")


def test_rank_importance_cuts_every_layer_by_one_share():
    blocks = _cfg(_conv(4) + _conv(8) + _HEAD)
    sd = _state(blocks)
    sd["layers.0.bn.weight"] = torch.tensor([0.3, -0.1, 0.3, 2.0])      # a tie: by index
    sd["layers.1.bn.weight"] = torch.linspace(-8, 0, 8) * 1e-3          # a tiny-gamma layer
    rank = get_importance("bn_gamma_rank")(sd, [0, 1])
    assert rank[0].tolist() == [0.5, 0.25, 0.75, 1.0]
    assert rank[1].tolist() == [k / 8 for k in (8, 7, 6, 5, 4, 3, 2, 1)]
    # one common threshold: half of each layer goes, whatever the spread of its gammas
    groups, kw = [Group("all", "", (0, 1))], dict(min_keep=0.01, min_channels=1)
    keep = make_masks(blocks, sd, groups, [0.5], importance=get_importance("bn_gamma_rank"), **kw)
    assert keep[0].tolist() == [2, 3] and keep[1].tolist() == [0, 1, 2, 3]
    # |gamma| / layer mean cuts the peaked layer to 1 and the even one to 5 (threshold 6/7)
    keep = make_masks(blocks, sd, groups, [0.5], importance=get_importance("bn_gamma_norm"), **kw)
    assert keep[0].tolist() == [3] and keep[1].tolist() == [0, 1, 2, 3, 4]


def test_importance_plugs_into_masks():
    blocks = read_cfg(TINY_CFG)
    sd = _state(blocks)
    groups = group_layers(blocks)
    kw = dict(min_keep=0.1, min_channels=1)
    by_l1 = make_masks(blocks, sd, groups, [0.5] * 5, importance=l1_filter, **kw)
    scores = l1_filter(sd, [18])[18]
    assert by_l1[18].tolist() == sorted(np.argsort(-scores)[:by_l1[18].size].tolist())
    by_random = make_masks(blocks, sd, groups, [0.5] * 5, importance=RandomImportance(1), **kw)
    assert plan(blocks, sd, groups, [0.5] * 5, importance=RandomImportance(1), **kw)["layers"][
        "conv18"] == by_random[18].tolist()
