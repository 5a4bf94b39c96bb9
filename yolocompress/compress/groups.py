"""Partition of a cfg's prunable convs into pruning groups by feature scale and module kind.

`group_layers(blocks)` returns one `Group` per rule of `GROUPS` (in table order, possibly empty):
each prunable conv (graph.prunable) goes to the first rule that matches its `Place`, which is
derived from the cfg structure (models.roles: part and stride; the neck's position relative to its
[upsample] layers), never from layer numbers. A shortcut-tied set goes whole to the group of its
first conv. On yolov4 the table gives the method's five groups (see GROUPS).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import YoloCompressError
from ..models.cfg import Block
from ..models.roles import LayerInfo, describe_layers
from .graph import ChannelGraph, analyze

__all__ = ["Place", "GroupRule", "GROUPS", "GLOBAL", "GROUPINGS", "Group", "layer_places", "group_layers"]


@dataclass(frozen=True)
class Place:
    """Where a layer sits: models.roles' part and stride, plus `path`, the neck's stretch:
    "backbone"; "pre_upsample" (before the first [upsample]: SPP and the deepest-scale convs);
    "top_down" (from the first [upsample] up to the first head layer after the last [upsample]);
    "bottom_up" (everything later: PAN's downsampling path, and the heads)."""
    part: str          # backbone | neck | head
    stride: int
    path: str


@dataclass(frozen=True)
class GroupRule:
    name: str
    title: str
    applies: Callable[[Place], bool]


# First matching rule wins. On yolov4.cfg this reproduces the authors' cuts at layers 56/86/117/137
# (G1 = layers < 56, G2 = 56..85, G3 = 86..116, G4 = 117..136, G5 = 137..) except conv55, the
# stride-8 -> 16 downsampling conv: their cut at 56 puts it in G1 while their cut at 86 puts the
# matching stride-16 -> 32 downsampling conv86 in G3; a stride rule treats both alike (with the
# stage they open).
GROUPS: tuple[GroupRule, ...] = (
    GroupRule("G1", "stem + CSP stages 1-3 (backbone, stride <= 8)",
              lambda p: p.path == "backbone" and p.stride <= 8),
    GroupRule("G2", "CSP stage 4 (backbone, stride 16)",
              lambda p: p.path == "backbone" and p.stride <= 16),
    GroupRule("G3", "CSP stage 5 + SPP (backbone stride >= 32, neck before the first upsample)",
              lambda p: p.path == "backbone" or (p.part == "neck" and p.path == "pre_upsample")),
    GroupRule("G4", "PAN top-down (neck from the first upsample to the finest-scale output)",
              lambda p: p.part == "neck" and p.path == "top_down"),
    GroupRule("G5", "PAN bottom-up + heads (the rest)",
              lambda p: True),
)


# One group, so one threshold over every prunable conv: network slimming's global threshold
# (tanluren's and SpursLipu's forks), the control the group rule is measured against.
GLOBAL: tuple[GroupRule, ...] = (
    GroupRule("all", "every prunable conv (one global threshold)", lambda p: True),
)

GROUPINGS = {"groups": GROUPS, "global": GLOBAL}   # config prune.grouping -> rule table


@dataclass(frozen=True)
class Group:
    name: str
    title: str
    layers: tuple[int, ...]        # prunable conv indices, sorted


def _paths(infos: list[LayerInfo]) -> list[str]:
    ups = [i.index for i in infos if i.kind == "upsample"]
    first_up = ups[0] if ups else len(infos)
    last_up = ups[-1] if ups else len(infos)
    end_top_down = next((i.index for i in infos if i.index > last_up and i.part == "head"),
                        len(infos))
    out = []
    for info in infos:
        if info.part == "backbone":
            out.append("backbone")
        elif info.index < first_up:
            out.append("pre_upsample")
        elif info.index < end_top_down:
            out.append("top_down")
        else:
            out.append("bottom_up")
    return out


def layer_places(blocks: list[Block]) -> list[Place]:
    """The Place of every layer of `blocks`."""
    infos = describe_layers(blocks)
    return [Place(info.part, info.stride, path)
            for info, path in zip(infos, _paths(infos))]


def group_layers(blocks: list[Block], graph: ChannelGraph | None = None,
                 rules: tuple[GroupRule, ...] = GROUPS) -> list[Group]:
    """One Group per rule, in rule order; every prunable conv is in exactly one group."""
    graph = graph or analyze(blocks)
    places = layer_places(blocks)
    which = {}
    for conv in graph.prunable:
        which[conv] = next((k for k, r in enumerate(rules) if r.applies(places[conv])), None)
        if which[conv] is None:
            b = blocks[conv + 1]
            raise YoloCompressError(f"{b.where()}: no pruning group rule matches conv {conv} "
                                    f"({places[conv]}); end the rules with a catch-all")
    for tied in graph.tied_sets:
        if tied <= which.keys():
            for conv in tied:
                which[conv] = which[min(tied)]
    return [Group(r.name, r.title, tuple(sorted(c for c, k in which.items() if k == n)))
            for n, r in enumerate(rules)]
