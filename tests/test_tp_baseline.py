"""Torch-Pruning baseline: budget search, exact rebuild, candidate set, ties, errors."""
import copy
import sys

import pytest
import torch

from yolocompress.compress.graph import analyze
from yolocompress.compress.tp_baseline import ignored_layers, rebuild_darknet, tp_prune
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.profile import profile_summary

from conftest import cfg_path

tp = pytest.importorskip("torch_pruning")

SIZE = 64


def _model(name: str, seed: int = 0) -> Darknet:
    """A cfg's Darknet in eval mode with random BN gammas (all distinct, so a kept channel is
    found again by its gamma), betas and running statistics."""
    torch.manual_seed(seed)
    m = Darknet(read_cfg(cfg_path(name)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.layers:
            if getattr(layer, "bn_enabled", False):
                bn = layer.bn
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.05)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return m.eval()


def _convs(model: Darknet) -> list[int]:
    return [i for i, b in enumerate(model.blocks[1:]) if b.type == "convolutional"]


def _filters(model: Darknet) -> dict[int, int]:
    return {i: model.blocks[i + 1].get_int("filters") for i in _convs(model)}


def _kept(original: Darknet, pruned: Darknet) -> dict[int, torch.Tensor]:
    """Conv -> indices of the original's output channels the pruned model kept (by BN gamma)."""
    out = {}
    for i in _convs(original):
        if original.layers[i].bn_enabled:
            g0, g1 = original.layers[i].bn.weight, pruned.layers[i].bn.weight
            out[i] = torch.isin(g0, g1).nonzero().flatten()
            assert out[i].numel() == g1.numel()
    return out


def _run(model: Darknet, seed: int = 1) -> list[torch.Tensor]:
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


def _masked(original: Darknet, kept: dict[int, torch.Tensor]) -> Darknet:
    """The original with every dropped channel's gamma and beta zeroed: such a channel outputs
    act(0) = 0 (mish, leaky), so the pruned model must compute exactly this."""
    m = copy.deepcopy(original)
    with torch.no_grad():
        for i, idx in kept.items():
            drop = torch.ones(m.layers[i].bn.weight.numel(), dtype=torch.bool)
            drop[idx] = False
            m.layers[i].bn.weight[drop] = 0
            m.layers[i].bn.bias[drop] = 0
    return m


@pytest.fixture(scope="module")
def nano():
    return _model("yolov4-nano")


@pytest.fixture(scope="module")
def pruned(nano):
    """{importance: (model, info)} of the nano pruned by 40 % of its FLOPs, and the input's
    state before pruning."""
    before = {k: v.clone() for k, v in nano.state_dict().items()}
    out = {imp: tp_prune(nano, 0.4, SIZE, importance=imp) for imp in ("bn_scale", "magnitude")}
    return out, before


@pytest.mark.parametrize("imp", ["bn_scale", "magnitude"])
def test_budget_reached_and_heads_kept(nano, pruned, imp):
    model, info = pruned[0][imp]
    prof = profile_summary(model.blocks, SIZE, SIZE)
    base = profile_summary(nano.blocks, SIZE, SIZE)
    reduction = 1 - prof["flops"] / base["flops"]
    assert abs(reduction - 0.4) <= 0.01
    assert info["reduction"] == pytest.approx(reduction)
    assert (info["flops_before"], info["flops_after"]) == (base["flops"], prof["flops"])
    assert (info["params_before"], info["params_after"]) == (base["params"], prof["params"])
    assert info["importance"] == imp and 0 < info["ratio"] < 1 and info["evaluations"] >= 1
    assert [o.shape for o in _run(model)] == [o.shape for o in _run(nano)]
    assert [h.index for h in model.heads] == [h.index for h in nano.heads]


@pytest.mark.parametrize("imp", ["bn_scale", "magnitude"])
def test_pruned_equals_original_with_dropped_channels_zeroed(nano, pruned, imp):
    model = pruned[0][imp][0]
    masked = _masked(nano, _kept(nano, model))
    for a, b in zip(_run(model), _run(masked)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_rebuild_equals_torch_pruning_module(nano):
    m = copy.deepcopy(nano)
    pruner = tp.pruner.MetaPruner(m, torch.zeros(1, 3, SIZE, SIZE),
                                  tp.importance.BNScaleImportance(), global_pruning=True,
                                  pruning_ratio=0.3, ignored_layers=ignored_layers(m),
                                  forward_fn=lambda module, x: module(x))
    pruner.step()
    rebuilt = rebuild_darknet(m)
    assert rebuilt.state_dict().keys() == m.state_dict().keys()
    assert sum(rebuilt.blocks[i + 1].get_int("filters") for i in _convs(m)) \
        < sum(_filters(nano).values())
    for a, b in zip(_run(rebuilt), _run(m)):        # m's blocks are stale: it runs its modules
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_input_model_unchanged(nano, pruned):
    before = pruned[1]
    after = nano.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert _filters(nano) == {i: nano.layers[i].conv.out_channels for i in _convs(nano)}


def test_candidate_set_is_the_graph_prunable_set(nano):
    """Torch-Pruning's groups, with our ignored layers, slim exactly graph.prunable."""
    dg = tp.DependencyGraph().build_dependency(nano, torch.zeros(1, 3, SIZE, SIZE))
    index = {nano.layers[i].conv: i for i in _convs(nano)}
    ignored = [mod for layer in ignored_layers(nano) for mod in layer.modules()]
    slimmed = {index[dep.target.module]
               for group in dg.get_all_groups(ignored_layers=ignored)
               for dep, _ in group
               if dep.target.module in index and dg.is_out_channel_pruning_fn(dep.handler)}
    assert slimmed == set(analyze(nano.blocks).prunable)


@pytest.mark.parametrize("imp", ["bn_scale", "magnitude"])
def test_excluded_convs_whole_and_ties_equal(nano, pruned, imp):
    model = pruned[0][imp][0]
    graph = analyze(nano.blocks)
    old, new = _filters(nano), _filters(model)
    assert graph.detect and graph.excluded
    assert all(new[i] == old[i] for i in graph.excluded)        # detection, SPP, upsample
    assert sum(new[i] < old[i] for i in graph.prunable) > len(graph.prunable) // 2
    kept = _kept(nano, model)
    assert graph.tied_sets
    for tied in graph.tied_sets:
        first = min(tied)
        assert all(torch.equal(kept[c], kept[first]) for c in tied), sorted(tied)


def test_importances_keep_different_channels(nano, pruned):
    bn, mag = (_kept(nano, pruned[0][imp][0]) for imp in ("bn_scale", "magnitude"))
    assert any(not torch.equal(bn[i], mag[i]) for i in bn)
    # bn_scale keeps, within an untied conv, the channels with the largest |gamma|
    graph = analyze(nano.blocks)
    for i in graph.prunable:
        if len(graph.tied_with(i)) == 1 and bn[i].numel() < nano.layers[i].bn.weight.numel():
            gamma = nano.layers[i].bn.weight.abs()
            dropped = torch.ones_like(gamma, dtype=torch.bool)
            dropped[bn[i]] = False
            assert gamma[bn[i]].min() > gamma[dropped].max(), i


def test_round_to(nano):
    model, info = tp_prune(nano, 0.3, SIZE, round_to=8)
    graph = analyze(nano.blocks)
    assert abs(info["reduction"] - 0.3) <= 0.01
    assert all(model.blocks[i + 1].get_int("filters") % 8 == 0 for i in graph.prunable)


def test_yolov4_tiny_grouped_routes():
    """yolov4-tiny slices conv outputs with [route] groups=2; the convs feeding those routes
    are excluded, and Torch-Pruning traces the slices of the others correctly."""
    tiny = _model("yolov4-tiny")
    model, info = tp_prune(tiny, 0.5, SIZE)
    assert abs(info["reduction"] - 0.5) <= 0.01
    graph = analyze(tiny.blocks)
    grouped = [i for i, rule in graph.excluded.items() if rule == "grouped_route"]
    assert grouped and all(_filters(model)[i] == _filters(tiny)[i] for i in grouped)
    masked = _masked(tiny, _kept(tiny, model))
    for a, b in zip(_run(model), _run(masked)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"importance": "taylor"}, "unknown importance 'taylor'"),
    ({"flops_reduction": 1.0}, "flops_reduction must be in (0, 1)"),
    ({"img_size": (64, 64, 3)}, "img_size must be"),
    ({"round_to": 0}, "round_to must be"),
    ({"tolerance": 0}, "tolerance must be"),
])
def test_bad_arguments(nano, kwargs, message):
    args = {"flops_reduction": 0.3, "img_size": SIZE, **kwargs}
    with pytest.raises(YoloCompressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tp_prune(nano, **args)


def test_unreachable_budget_names_best(nano):
    with pytest.raises(YoloCompressError, match=r"cannot remove 99\.9% .* most Torch-Pruning "
                                                r"removed .* is \d+\.\d%"):
        tp_prune(nano, 0.999, SIZE)


def test_missing_package(nano, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)     # import now raises ImportError
    with pytest.raises(YoloCompressError, match="pip install torch-pruning"):
        tp_prune(nano, 0.3, SIZE)
