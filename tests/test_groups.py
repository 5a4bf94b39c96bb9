"""Pruning groups: the method's five yolov4 groups, sensible groups on the other cfgs, tied sets."""
import pytest

from yolocompress.compress.graph import analyze
from yolocompress.compress.groups import GROUPS, GroupRule, group_layers, layer_places
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg, read_cfg

from conftest import PUBLISHED_CFGS, TINY_CFG, cfg_path

ALL_CFGS = PUBLISHED_CFGS + [TINY_CFG]


def _groups(name):
    return {g.name: g.layers for g in group_layers(read_cfg(cfg_path(name)))}


def test_yolov4_reproduces_the_methods_five_groups():
    blocks = read_cfg(cfg_path("yolov4"))
    prunable = analyze(blocks).prunable
    groups = {g.name: g.layers for g in group_layers(blocks)}
    # The authors cut at layers 56/86/117/137 (0-based, "idx < cut"); the stride-8 -> 16
    # downsampling conv55 goes with the stage it opens, like conv86 does in their cuts.
    cuts = {"G1": (0, 55), "G2": (55, 86), "G3": (86, 117), "G4": (117, 137), "G5": (137, 162)}
    for name, (lo, hi) in cuts.items():
        assert groups[name] == tuple(c for c in prunable if lo <= c < hi), name
    authors_g1 = tuple(c for c in prunable if c < 56)
    assert set(authors_g1) ^ set(groups["G1"]) == {55}
    assert groups["G1"][-1] == 54 and groups["G3"][-1] == 116 and groups["G4"][0] == 120
    assert groups["G5"][0] == 137


def test_nano_has_yolov4s_topology_groups():
    g = _groups("yolov4-nano")
    assert g["G2"] == (34, 35, 37, 38, 39, 41, 42, 44, 46)
    assert g["G3"] == (47, 48, 50, 51, 52, 54, 56, 57, 58, 66, 67, 68)
    assert g["G4"] == (72, 74, 75, 76, 77, 78, 82, 84, 85, 86, 87, 88)
    assert g["G5"] == (89, 93, 95, 96, 97, 98, 99, 100, 104, 106, 107, 108, 109, 110, 111)
    assert g["G1"][-1] == 33


def test_yolov4_tiny_and_yolov3_groups():
    t = _groups("yolov4-tiny")
    assert t == {"G1": (0, 1, 4, 5, 7, 12, 13, 15), "G2": (20, 21, 23), "G3": (26, 27),
                 "G4": (), "G5": (28, 35)}
    v3 = _groups("yolov3")              # FPN only: top-down at strides 16 and 8, three heads
    assert v3["G4"] == (87, 88, 89, 90, 91, 99, 100, 101, 102, 103)
    assert v3["G5"] == (80, 92, 104)
    assert v3["G3"] == (62, 63, 64, 66, 67, 69, 70, 72, 73, 75, 76, 77, 78, 79)


@pytest.mark.parametrize("path", ALL_CFGS, ids=lambda p: p.stem)
def test_groups_partition_the_prunable_convs(path):
    blocks = read_cfg(path)
    graph = analyze(blocks)
    groups = group_layers(blocks, graph)
    assert [g.name for g in groups] == [r.name for r in GROUPS]
    members = [c for g in groups for c in g.layers]
    assert sorted(members) == list(graph.prunable)
    which = {c: g.name for g in groups for c in g.layers}
    for tied in graph.tied_sets:
        assert len({which[c] for c in tied}) == 1
    places = layer_places(blocks)
    for g in groups:
        for c in g.layers:
            p = places[c]
            if g.name in ("G1", "G2"):
                assert p.part == "backbone" and p.stride <= (8 if g.name == "G1" else 16)
            elif g.name == "G4":
                assert p.part == "neck" and p.path == "top_down"


# layer 1 (backbone) and layer 5 (neck, after the first [yolo]) are tied by shortcut 6
_SPLIT_TIE = """
[net]
width=32
height=32
channels=3
[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky
[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky
[convolutional]
filters=21
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1,2
anchors=4,5, 8,10, 12,9
classes=2
num=3
[route]
layers=-3
[convolutional]
batch_normalize=1
filters=8
size=1
stride=1
pad=1
activation=leaky
[shortcut]
from=-5
activation=linear
[convolutional]
filters=21
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1,2
anchors=4,5, 8,10, 12,9
classes=2
num=3
"""


def test_tied_set_goes_to_the_group_of_its_first_conv():
    blocks = parse_cfg(_SPLIT_TIE, source="split.cfg")
    graph = analyze(blocks)
    assert graph.tied_sets == (frozenset({1, 5}),)
    places = layer_places(blocks)
    assert places[1].part == "backbone" and places[5].part == "neck"
    groups = {g.name: g.layers for g in group_layers(blocks, graph)}
    assert groups["G1"] == (0, 1, 5) and groups["G3"] == ()


def test_rules_without_a_catch_all_are_an_error():
    rules = (GroupRule("only", "backbone", lambda p: p.part == "backbone"),)
    with pytest.raises(YoloCompressError, match="no pruning group rule matches conv 18"):
        group_layers(read_cfg(TINY_CFG), rules=rules)
