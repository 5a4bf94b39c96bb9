"""Channel dependency analysis: hand-checked channel maps, tied sets, exclusions, keep checks."""
import copy

import numpy as np
import pytest

from yolocompress.compress.graph import (EXCLUSION_RULES, INPUT, ChannelUse, analyze,
                                         propagate_keep, prunable_layers)
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg, resolve_sources
from yolocompress.models.profile import layer_shapes

from conftest import PUBLISHED_CFGS, TINY_CFG, cfg_path

ALL_CFGS = PUBLISHED_CFGS + [TINY_CFG]


def _one(conv, channels):
    return tuple(((conv, c),) for c in channels)


def _conv(filters, bn=1, size=1, groups=1):
    return (f"[convolutional]\nbatch_normalize={bn}\nfilters={filters}\nsize={size}\nstride=1\n"
            f"pad=1\ngroups={groups}\nactivation=leaky\n")


def _cfg(*layers):
    return parse_cfg("[net]\nwidth=16\nheight=16\nchannels=3\n" + "\n".join(layers),
                     source="synthetic.cfg")


@pytest.fixture(scope="module")
def v4():
    blocks = read_cfg(cfg_path("yolov4"))
    return blocks, analyze(blocks)


# ---- tiny.cfg, checked by hand -------------------------------------------------------------

def test_tiny_channel_maps():
    g = analyze(read_cfg(TINY_CFG))
    assert g.input_map(0) == _one(INPUT, range(3))
    assert g.maps[1] == _one(1, range(16))
    assert g.maps[2] == _one(1, range(8, 16))             # groups=2 group_id=1: second half
    assert g.input_map(3) == g.maps[2]
    tie = tuple(((3, j), (4, j)) for j in range(8))        # shortcut: channel j = 3.j + 4.j
    assert g.maps[5] == tie
    assert g.maps[6] == tie + _one(1, range(16))           # route -1,-5
    assert g.maps[7] == g.maps[6]                          # maxpool passes through
    assert g.maps[10] == _one(8, range(32)) * 2            # route -1,-2 over SPP maxpool 9
    assert g.maps[17] == _one(12, range(16)) + g.maps[6]   # route -1, 6 after the upsample
    assert g.maps[14] == _one(13, range(21))               # [yolo] passes its conv through


def test_tiny_consumers_ties_and_exclusions():
    blocks = read_cfg(TINY_CFG)
    g = analyze(blocks)
    assert g.consumers[1] == (ChannelUse(3, 0, 8, 8), ChannelUse(8, 8, 0, 16),
                              ChannelUse(18, 24, 0, 16))
    assert g.consumers[3] == (ChannelUse(4, 0, 0, 8), ChannelUse(8, 0, 0, 8),
                              ChannelUse(18, 16, 0, 8))
    assert g.consumers[4] == (ChannelUse(8, 0, 0, 8), ChannelUse(18, 16, 0, 8))
    assert g.consumers[8] == (ChannelUse(12, 0, 0, 32), ChannelUse(12, 32, 0, 32))
    assert g.consumers[13] == ()
    assert g.readers[12] == (13, 15, 16, 17, 18)
    assert g.tied_sets == (frozenset({3, 4}),)
    assert g.tied_with(4) == frozenset({3, 4}) and g.tied_with(0) == frozenset({0})
    assert g.excluded == {1: "grouped_route", 8: "before_spp", 12: "before_upsample",
                          13: "detection", 19: "detection"}
    assert prunable_layers(blocks) == [0, 3, 4, 18]


# ---- published cfgs -------------------------------------------------------------------------

def test_yolov4_tied_sets_and_exclusions(v4):
    _, g = v4
    # CSP stages 1..5: the conv before the residual blocks and each block's second conv
    assert g.tied_sets == (
        frozenset({4, 6}), frozenset({14, 16, 19}),
        frozenset({27, 29, 32, 35, 38, 41, 44, 47, 50}),
        frozenset({58, 60, 63, 66, 69, 72, 75, 78, 81}),
        frozenset({89, 91, 94, 97, 100}))
    assert g.excluded == {107: "before_spp", 117: "before_upsample", 127: "before_upsample",
                          138: "detection", 149: "detection", 160: "detection"}
    assert not g.misaligned


def test_yolov4_route_offsets(v4):
    _, g = v4
    assert g.maps[9] == _one(8, range(64)) + _one(2, range(64))        # CSP merge route -1,-7
    assert g.consumers[2] == (ChannelUse(10, 64, 0, 64),)
    assert g.consumers[1] == (ChannelUse(2, 0, 0, 64), ChannelUse(4, 0, 0, 64))
    # SPP: route -1,-3,-5,-6 = maxpools 13, 9, 5 and the conv itself, all of conv 107
    assert g.maps[113] == _one(107, range(512)) * 4
    assert g.consumers[107] == tuple(ChannelUse(114, k * 512, 0, 512) for k in range(4))
    # PAN top-down: route -1,-3 puts the lateral conv first, the upsampled conv second
    assert g.maps[121] == _one(120, range(256)) + _one(117, range(256))
    assert g.consumers[117] == (ChannelUse(122, 256, 0, 256),)
    assert g.consumers[127] == (ChannelUse(132, 128, 0, 128),)
    assert g.consumers[54] == (ChannelUse(55, 0, 0, 256), ChannelUse(130, 0, 0, 256))
    # PAN bottom-up: route -1,-16 / -1,-37
    assert g.consumers[126] == (ChannelUse(127, 0, 0, 256), ChannelUse(143, 256, 0, 256))
    assert g.consumers[116] == (ChannelUse(117, 0, 0, 512), ChannelUse(154, 512, 0, 512))
    # a residual chain's sum reaches every conv after it
    assert g.consumers[14] == (ChannelUse(15, 0, 0, 64), ChannelUse(18, 0, 0, 64),
                               ChannelUse(21, 0, 0, 64))
    assert g.maps[20] == tuple(((14, j), (16, j), (19, j)) for j in range(64))


def test_yolov4_nano_tied_sets():
    g = analyze(read_cfg(cfg_path("yolov4-nano")))
    assert g.tied_sets == (frozenset({4, 6}), frozenset({14, 16}), frozenset({24, 26, 29}),
                           frozenset({37, 39, 42}), frozenset({50, 52}))
    assert g.excluded == {59: "before_spp", 69: "before_upsample", 79: "before_upsample",
                          90: "detection", 101: "detection", 112: "detection"}


def test_yolov4_tiny_grouped_route_feeders():
    g = analyze(read_cfg(cfg_path("yolov4-tiny")))
    assert g.excluded == {2: "grouped_route", 10: "grouped_route", 18: "grouped_route",
                          29: "detection", 32: "before_upsample", 36: "detection"}
    assert g.tied_sets == ()
    assert g.consumers[2] == (ChannelUse(4, 0, 32, 32), ChannelUse(10, 0, 0, 64))


def test_yolov3_shortcut_chains():
    g = analyze(read_cfg(cfg_path("yolov3")))
    assert g.tied_sets == (
        frozenset({1, 3}), frozenset({5, 7, 10}),
        frozenset({12, 14, 17, 20, 23, 26, 29, 32, 35}),
        frozenset({37, 39, 42, 45, 48, 51, 54, 57, 60}),
        frozenset({62, 64, 67, 70, 73}))
    assert g.excluded == {81: "detection", 84: "before_upsample", 93: "detection",
                          96: "before_upsample", 105: "detection"}


@pytest.mark.parametrize("path", ALL_CFGS, ids=lambda p: p.stem)
def test_every_conv_is_prunable_or_excluded_by_its_rule(path):
    blocks = read_cfg(path)
    g = analyze(blocks)
    layers = blocks[1:]
    convs = [i for i, b in enumerate(layers) if b.type == "convolutional"]
    assert prunable_layers(blocks) == sorted(set(convs) - set(g.excluded))
    names = list(EXCLUSION_RULES)
    for c in convs:
        applying = [n for n in names if EXCLUSION_RULES[n].applies(g, c)]
        assert applying[:1] == ([g.excluded[c]] if c in g.excluded else []), c
    for c in g.prunable:
        assert layers[c].get_int("batch_normalize", 0) == 1
    # the direct cases, read straight off the cfg
    for i, b in enumerate(layers[1:], start=1):
        prev = i - 1
        if b.type in ("yolo", "upsample") and layers[prev].type == "convolutional":
            assert prev in g.excluded
        if b.type == "route" and b.get_int("groups", 1) > 1:
            assert all(s in g.excluded for s in resolve_sources(blocks, i)
                       if layers[s].type == "convolutional")
    seen = set()
    for s in g.tied_sets:
        assert len(s) >= 2 and not seen & s and s <= set(g.prunable)
        assert len({layers[c].get_int("filters") for c in s}) == 1
        seen |= s


def _random_keep(blocks, g, rng):
    keep, done = {}, set()
    for c in g.prunable:
        if c in done:
            continue
        n = blocks[c + 1].get_int("filters")
        chans = np.sort(rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False))
        for m in g.tied_with(c):
            keep[m] = chans
        done |= g.tied_with(c)
    return keep


@pytest.mark.parametrize("path", ALL_CFGS, ids=lambda p: p.stem)
def test_random_keeps_build_consistent_cfgs(path):
    blocks = read_cfg(path)
    g = analyze(blocks)
    rng = np.random.default_rng(len(blocks))
    for _ in range(3):
        keep = _random_keep(blocks, g, rng)
        kept = propagate_keep(blocks, keep)
        slim = copy.deepcopy(blocks)
        for c, n in kept.filters.items():
            slim[c + 1].set("filters", n)
        shapes = layer_shapes(slim)
        assert [o.size for o in kept.outputs] == [s.c for s in shapes]
        for c in g.convs:
            assert kept.inputs[c].size == (shapes[c - 1].c if c else 3)
            assert kept.filters[c] == len(keep.get(c, kept.outputs[c]))
        # the channel maps say the same: a channel survives iff all its origins do
        sets = {c: set(v.tolist()) for c, v in keep.items()}

        def survives(origin):
            return all(c not in sets or ch in sets[c] for c, ch in origin)

        for i, m in enumerate(g.maps):
            assert kept.outputs[i].tolist() == [p for p, o in enumerate(m) if survives(o)]
        for c in g.convs:
            assert kept.inputs[c].tolist() == [p for p, o in enumerate(g.input_map(c))
                                               if survives(o)]


# ---- keep propagation: structure checks and bad input ---------------------------------------

def test_grouped_route_needs_balanced_groups():
    blocks = read_cfg(cfg_path("yolov4-tiny"))
    kept = propagate_keep(blocks, {2: [0, 5, 40, 63]})       # two kept channels in each half
    assert kept.outputs[3].tolist() == [8, 31]               # group_id=1 takes 32..63
    assert kept.inputs[4].tolist() == [8, 31]
    assert kept.outputs[8].tolist() == [0, 5, 40, 63] + list(range(64, 128))
    assert kept.filters[2] == 4
    with pytest.raises(YoloCompressError, match=r"\[route\] at layer 3 .*groups=2.*\[2, 1\]"):
        propagate_keep(blocks, {2: [0, 1, 40]})


def test_shortcut_and_yolo_checks(v4):
    blocks, _ = v4
    with pytest.raises(YoloCompressError, match=r"yolov4\.cfg:\d+: \[shortcut\] at layer 17 "
                                                r"adds layers 16 and 14"):
        propagate_keep(blocks, {14: [0, 1]})
    with pytest.raises(YoloCompressError, match=r"\[yolo\] at layer 139 needs all 255"):
        propagate_keep(blocks, {138: list(range(200))})
    tied = propagate_keep(blocks, {14: [0, 1], 16: [0, 1], 19: [0, 1]})
    assert tied.inputs[21].tolist() == [0, 1] and tied.inputs[15].tolist() == [0, 1]


@pytest.mark.parametrize("keep, message", [
    ({3: [0]}, r"keep names layer 3, a \[route\], not a conv"),
    ({500: [0]}, r"not one of layers 0\.\.161"),
    ({0: []}, "non-empty list of channel indices"),
    ({0: [0.5]}, "non-empty list of channel indices"),
    ({0: np.array([True, False])}, "non-empty list of channel indices"),
    ({0: [32]}, "channel 32, outside its 32 filters"),
    ({0: [-1]}, "channel -1, outside"),
    ({0: [1, 1]}, "repeats a channel"),
])
def test_bad_keep_is_a_clear_error(v4, keep, message):
    blocks, _ = v4
    with pytest.raises(YoloCompressError, match=message):
        propagate_keep(blocks, keep)


def test_full_keep_changes_nothing(v4):
    blocks, _ = v4
    kept = propagate_keep(blocks, {})
    shapes = layer_shapes(blocks)
    assert all(o.tolist() == list(range(s.c)) for o, s in zip(kept.outputs, shapes))
    assert kept.filters == {i: s.c for i, s in enumerate(shapes)
                            if blocks[i + 1].type == "convolutional"}


# ---- rules no published cfg triggers --------------------------------------------------------

def test_tie_to_an_excluded_conv_excludes_the_set():
    # conv 2 reads half of conv 0 through a grouped route; the shortcut then ties 2 to 0
    blocks = _cfg(_conv(8), "[route]\nlayers=-1\ngroups=2\ngroup_id=0\n", _conv(8),
                  "[shortcut]\nfrom=0\n", _conv(4))
    g = analyze(blocks)
    assert g.tied_sets == (frozenset({0, 2}),)
    assert g.excluded == {0: "grouped_route", 2: "tied_to_excluded"}
    assert prunable_layers(blocks) == [4]


def test_grouped_conv_no_bn_and_yolo_behind_a_maxpool():
    blocks = _cfg(_conv(8), _conv(8, size=3, groups=8), _conv(4, bn=0), _conv(21),
                  "[maxpool]\nsize=2\nstride=1\n",
                  "[yolo]\nmask=0,1,2\nanchors=1,1, 2,2, 3,3\nclasses=2\nnum=3\n")
    g = analyze(blocks)
    assert g.excluded == {0: "grouped_conv", 1: "grouped_conv", 2: "no_bn", 3: "reaches_yolo"}
    assert prunable_layers(blocks) == []
    with pytest.raises(YoloCompressError, match="conv layer 1 has groups=8"):
        propagate_keep(blocks, {0: [0, 1]})
    with pytest.raises(YoloCompressError, match=r"\[yolo\] at layer 5 needs all 21"):
        propagate_keep(blocks, {3: [0]})
    assert propagate_keep(blocks, {2: [1, 3]}).inputs[3].tolist() == [1, 3]


def test_shortcut_over_a_route_is_a_misaligned_tie():
    # shortcut adds conv 3 (8 ch) to route (conv 1, conv 0): 3.j pairs with 1.j, then 0.(j-4)
    blocks = _cfg(_conv(4), _conv(4), "[route]\nlayers=-1,-2\n", _conv(8), "[shortcut]\nfrom=-2\n")
    g = analyze(blocks)
    assert g.maps[4][5] == ((0, 1), (3, 5))
    assert g.tied_sets == (frozenset({0, 1, 3}),)
    assert g.excluded == {0: "misaligned_tie", 1: "misaligned_tie", 3: "misaligned_tie"}
    # propagation works on channel positions, so a consistent choice still goes through
    assert propagate_keep(blocks, {3: [0, 4], 1: [0], 0: [0]}).outputs[4].tolist() == [0, 4]
    with pytest.raises(YoloCompressError, match=r"\[shortcut\] at layer 4"):
        propagate_keep(blocks, {3: [0, 4], 1: [0], 0: [1]})
