"""Channel dependencies of a Darknet cfg for group channel pruning (pure data over blocks).

`analyze(blocks)` traces every output channel of every layer back to the conv channels that
produce it (each kind's channel rule, models.channels: pass-through layers, [route]
concatenations and `groups`/`group_id` slices, [shortcut] sums over the common channels; [sam]
and [scale_channels] multiply maps, so their channels are traced to no conv) and derives the
shortcut-tied conv sets, each conv's consumers with channel offsets, and which convs may be
pruned (`EXCLUSION_RULES`, one table).
`propagate_keep(blocks, keep)` turns kept output channels per conv into the kept channels of every
layer, the kept input channels and new `filters=` of every conv, and raises a YoloCompressError
where the choice would break a grouped route, a shortcut, a grouped conv or a [yolo] layer.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import YoloCompressError
from ..models.cfg import Block, input_layers
from ..models.channels import UNTRACED, Produce
from ..models.kinds import kind_of
from ..models.roles import describe_layers
from ..models.shapes import layer_shapes

__all__ = ["INPUT", "Origin", "ChannelUse", "ChannelGraph", "Rule", "EXCLUSION_RULES", "analyze",
           "prunable_layers", "KeptChannels", "propagate_keep"]

INPUT = -1                            # the "layer" index of the network input image
Origin = tuple[tuple[int, int], ...]  # the (conv, channel) pairs summed into one channel


@dataclass(frozen=True)
class ChannelUse:
    """Input channels [in_start, in_start + length) of conv `reader` are the conv's channels
    [src_start, src_start + length)."""
    reader: int
    in_start: int
    src_start: int
    length: int


@dataclass(frozen=True)
class ChannelGraph:
    """Channel dependencies of one cfg; build it with `analyze(blocks)`."""
    layers: tuple[Block, ...] = field(repr=False, compare=False)   # blocks[1:]
    maps: tuple[tuple[Origin, ...], ...] = field(repr=False)      # per layer, per output channel
    image_map: tuple[Origin, ...] = field(repr=False)             # the input image's channels
    # conv -> every layer whose input holds some of its channels (through routes, pass-through
    # layers and shortcut sums), sorted
    readers: Mapping[int, tuple[int, ...]] = field(repr=False)
    # conv -> the convs reading its channels, with offsets, in reader order
    consumers: Mapping[int, tuple[ChannelUse, ...]] = field(repr=False)
    tied_sets: tuple[frozenset[int], ...]      # disjoint shortcut-tied conv sets (>= 2 convs each)
    misaligned: frozenset[int]                 # convs of ties that do not pair channel j with j
    detect: frozenset[int]                     # the convs feeding a [yolo] layer
    # convs whose channels reach a layer the table cannot trace, or are summed with its channels
    untraced: frozenset[int] = frozenset()

    def input_map(self, index: int) -> tuple[Origin, ...]:
        """Origins of the input channels of a conv/maxpool/upsample/yolo layer."""
        return self.maps[index - 1] if index else self.image_map

    def tied_with(self, conv: int) -> frozenset[int]:
        """The shortcut-tied set holding `conv` (just {conv} when it is not tied)."""
        return next((s for s in self.tied_sets if conv in s), frozenset({conv}))

    @property
    def convs(self) -> list[int]:
        return [i for i, b in enumerate(self.layers) if b.type == "convolutional"]

    @cached_property
    def excluded(self) -> dict[int, str]:
        """Conv -> the first rule of EXCLUSION_RULES that excludes it from pruning."""
        out = {}
        for i in self.convs:
            rule = next((name for name, r in EXCLUSION_RULES.items() if r.applies(self, i)), None)
            if rule is not None:
                out[i] = rule
        return out

    @cached_property
    def prunable(self) -> tuple[int, ...]:
        """Convs no rule excludes, sorted; tied ones only as a whole tied set."""
        return tuple(i for i in self.convs if i not in self.excluded)


@dataclass(frozen=True)
class Rule:
    explanation: str
    applies: Callable[[ChannelGraph, int], bool]     # (graph, conv index) -> excluded?


def _feeds(g: ChannelGraph, conv: int, test: Callable[[Block], bool]) -> bool:
    return any(test(g.layers[r]) for r in g.readers[conv])


def _is_spp_pool(b: Block) -> bool:
    return (b.type == "maxpool" and b.get_int("stride", 1) == 1
            and b.get_int("size", b.get_int("stride", 1)) > 2)


def _grouped(b: Block, kind: str) -> bool:
    return b.type == kind and b.get_int("groups", 1) > 1


def _excluded_on_its_own(g: ChannelGraph, conv: int) -> bool:
    return any(r.applies(g, conv) for name, r in EXCLUSION_RULES.items()
               if name != "tied_to_excluded")


# The convs never pruned, in reporting order: a conv reports the first rule that applies to it.
EXCLUSION_RULES: dict[str, Rule] = {
    "detection": Rule(
        "feeds a [yolo] layer: its filters are anchors x (5 + classes) and it has no BN",
        lambda g, i: i in g.detect),
    "no_bn": Rule(
        "has no batch_normalize, so no BN gamma to rank its channels by",
        lambda g, i: not g.layers[i].get_int("batch_normalize", 0)),
    "before_spp": Rule(
        "the conv before SPP's maxpools: its output reaches a stride-1 [maxpool] of size > 2",
        lambda g, i: _feeds(g, i, _is_spp_pool)),
    "grouped_route": Rule(
        "feeds a [route] with groups > 1, which takes a fixed fraction of its channels",
        lambda g, i: _feeds(g, i, lambda b: _grouped(b, "route"))),
    "before_upsample": Rule(
        "its output is upsampled (reaches an [upsample])",
        lambda g, i: _feeds(g, i, lambda b: b.type == "upsample")),
    "reaches_yolo": Rule(
        "its output reaches a [yolo] layer with no conv in between",
        lambda g, i: _feeds(g, i, lambda b: b.type == "yolo")),
    "grouped_conv": Rule(
        "is a grouped conv (groups > 1) or feeds one, whose channel groups tie input to output",
        lambda g, i: _grouped(g.layers[i], "convolutional")
        or _feeds(g, i, lambda b: _grouped(b, "convolutional"))),
    "untraced": Rule(
        "its channels reach a layer whose channels the layer table cannot trace ([sam] and "
        "[scale_channels] multiply maps, so a pruned channel is no constant there)",
        lambda g, i: i in g.untraced),
    "misaligned_tie": Rule(
        "a [shortcut] adds its channel j to a channel other than j of another conv (e.g. through "
        "a route), or adds maps of different channel counts, so its tied set cannot share one "
        "channel set",
        lambda g, i: i in g.misaligned),
    "tied_to_excluded": Rule(
        "shortcut-tied to a conv another rule excludes; a tied set is pruned whole or not at all",
        lambda g, i: any(_excluded_on_its_own(g, j) for j in g.tied_with(i) if j != i)),
}


def _channel_maps(blocks: list[Block]) -> dict[int, tuple[Origin, ...]]:
    maps = {INPUT: tuple(((INPUT, c),) for c in range(blocks[0].get_int("channels", 3)))}
    for i, b in enumerate(blocks[1:]):
        ins = [maps[s] for s in input_layers(blocks, i)]
        maps[i] = kind_of(b).channels.origins(b, i, ins)
        if any(len(o) > 1 and any(c == INPUT for c, _ in o) for o in maps[i]):
            raise YoloCompressError(
                f"{b.where()}: [{b.type}] at layer {i} adds the network input itself; "
                "channel pruning does not support that")
    return maps


def _find(parent: dict, x):
    """Union-find root of x (path halving); unseen x becomes its own root."""
    while parent.setdefault(x, x) != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def _ties(blocks: list[Block], maps) -> tuple[tuple[frozenset[int], ...], frozenset[int]]:
    """Shortcut-tied conv sets, and the convs of sets that do not pair channel j with channel j."""
    pairs: dict = {}          # channel level: the pairs summed into one channel form a class
    for i in range(len(blocks) - 1):
        for origin in maps[i]:
            traced = [p for p in origin if p[0] >= 0]
            for pair in traced[1:]:
                pairs[_find(pairs, pair)] = _find(pairs, traced[0])
    classes: dict = defaultdict(set)
    for pair in list(pairs):
        classes[_find(pairs, pair)].add(pair)
    convs: dict = {}          # conv level: convs sharing a class are tied
    for members in classes.values():
        first, *rest = sorted({c for c, _ in members})
        for c in rest:
            convs[_find(convs, c)] = _find(convs, first)
    per_set: dict = defaultdict(list)
    for members in classes.values():
        per_set[_find(convs, next(iter(members))[0])].append(members)
    tied, misaligned = [], set()
    for set_classes in per_set.values():
        members = set().union(*({c for c, _ in m} for m in set_classes))
        filters = {blocks[c + 1].get_int("filters") for c in members}
        # one channel set: every class is channel j of every member, for all j of the members
        aligned = (len(filters) == 1 and len(set_classes) == filters.pop()
                   and all(len({ch for _, ch in m}) == 1 and {c for c, _ in m} == members
                           for m in set_classes))
        if not aligned:
            misaligned |= members
        if len(members) > 1:
            tied.append(frozenset(members))
    return tuple(sorted(tied, key=min)), frozenset(misaligned)


def _consumers(blocks: list[Block], maps) -> dict[int, list[ChannelUse]]:
    out: dict[int, list[ChannelUse]] = defaultdict(list)
    for r, b in enumerate(blocks[1:]):
        if b.type != "convolutional":
            continue
        runs: dict[int, list[list[int]]] = defaultdict(list)   # conv -> [in_start, src_start, n]
        for p, origin in enumerate(maps[r - 1]):
            for c, ch in origin:
                if c < 0:            # the image, or channels no conv produces
                    continue
                last = runs[c][-1] if runs[c] else None
                if last and last[0] + last[2] == p and last[1] + last[2] == ch:
                    last[2] += 1
                else:
                    runs[c].append([p, ch, 1])
        for c, rs in runs.items():
            out[c].extend(ChannelUse(r, *run) for run in rs)
    return out


def analyze(blocks: list[Block]) -> ChannelGraph:
    """Trace the channels of a parsed cfg; raises YoloCompressError on an inconsistent cfg."""
    layer_shapes(blocks)                  # validates channel counts, group divisibility, sizes
    maps = _channel_maps(blocks)
    layers = tuple(blocks[1:])
    holders = {j: {c for origin in m for c, _ in origin if c >= 0} for j, m in maps.items()}
    readers: dict[int, set[int]] = {i: set() for i, b in enumerate(layers)
                                    if b.type == "convolutional"}
    for i in range(len(layers)):
        for s in input_layers(blocks, i):
            for c in holders[s]:
                readers[c].add(i)
    consumers = _consumers(blocks, maps)
    tied, misaligned = _ties(blocks, maps)
    untraced = {c for c, rs in readers.items()
                if any(not kind_of(layers[r]).channels.traceable for r in rs)}
    untraced |= {c for m in maps.values() for o in m if any(p == UNTRACED for p, _ in o)
                 for p, _ in o if p >= 0}
    detect = frozenset(info.index for info in describe_layers(blocks) if info.role == "detect")
    return ChannelGraph(
        layers=layers,
        maps=tuple(maps[i] for i in range(len(layers))),
        image_map=maps[INPUT],
        readers={c: tuple(sorted(rs)) for c, rs in readers.items()},
        consumers={c: tuple(consumers.get(c, ())) for c in readers},
        tied_sets=tied,
        misaligned=misaligned,
        detect=detect,
        untraced=frozenset(untraced),
    )


def prunable_layers(blocks: list[Block]) -> list[int]:
    """Indices of the convs channel pruning may slim, sorted (see EXCLUSION_RULES)."""
    return list(analyze(blocks).prunable)


@dataclass(frozen=True)
class KeptChannels:
    """What a keep choice means for every layer; indices refer to the unpruned cfg's channels."""
    outputs: tuple[np.ndarray, ...]    # per layer: kept output channel indices, sorted
    inputs: dict[int, np.ndarray]      # per conv: kept input channel indices, sorted
    filters: dict[int, int]            # per conv: the new `filters=`


def _keep_masks(blocks: list[Block], keep: Mapping[int, Iterable[int]]) -> dict[int, np.ndarray]:
    source, n_layers = blocks[0].source, len(blocks) - 1
    masks = {}
    for conv, chans in keep.items():
        if isinstance(conv, bool) or not isinstance(conv, (int, np.integer)) \
                or not 0 <= conv < n_layers:
            raise YoloCompressError(
                f"{source}: keep names layer {conv!r}, not one of layers 0..{n_layers - 1}")
        b = blocks[conv + 1]
        if b.type != "convolutional":
            raise YoloCompressError(
                f"{b.where()}: keep names layer {conv}, a [{b.type}], not a conv")
        n = b.get_int("filters")
        idx = np.asarray(list(chans))
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise YoloCompressError(
                f"{b.where()}: keep for conv {conv} must be a non-empty list of channel indices")
        bad = idx[(idx < 0) | (idx >= n)]
        if bad.size:
            raise YoloCompressError(
                f"{b.where()}: keep for conv {conv} has channel {int(bad[0])}, outside its "
                f"{n} filters")
        if np.unique(idx).size != idx.size:
            raise YoloCompressError(f"{b.where()}: keep for conv {conv} repeats a channel")
        mask = np.zeros(n, dtype=bool)
        mask[idx] = True
        masks[conv] = mask
    return masks


def propagate_keep(blocks: list[Block], keep: Mapping[int, Iterable[int]]) -> KeptChannels:
    """Kept channels of every layer for `keep` = {conv: kept output channel indices}.

    Convs not in `keep` keep all channels. Only structure is checked here (which convs *should*
    be pruned is `prunable_layers`' business): each input of a grouped route must keep equally
    many channels in each group, a shortcut's inputs must keep the same channel positions, and
    grouped convs and [yolo] layers must keep all their channels.
    """
    layer_shapes(blocks)
    masks = _keep_masks(blocks, keep)
    out = {INPUT: np.ones(blocks[0].get_int("channels", 3), dtype=bool)}
    inputs, filters = {}, {}
    for i, b in enumerate(blocks[1:]):
        srcs = input_layers(blocks, i)
        rule = kind_of(b).channels
        if isinstance(rule, Produce):
            n = b.get_int("filters")
            out[i] = masks.get(i, np.ones(n, dtype=bool))
            groups = b.get_int("groups", 1)
            if groups > 1 and not (out[srcs[0]].all() and out[i].all()):
                raise YoloCompressError(
                    f"{b.where()}: conv layer {i} has groups={groups}: it and the layer feeding "
                    "it must keep all their channels")
            inputs[i] = np.flatnonzero(out[srcs[0]])
            filters[i] = int(out[i].sum())
        else:
            out[i] = rule.keep(b, i, srcs, [out[s] for s in srcs])
    return KeptChannels(
        outputs=tuple(np.flatnonzero(out[i]) for i in range(len(blocks) - 1)),
        inputs=inputs, filters=filters)
