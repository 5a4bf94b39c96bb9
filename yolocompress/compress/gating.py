"""FBS dynamic channel gating (Gao et al., ICLR 2019) over a Darknet model: per image, each gated
conv keeps its ceil(d·C) most salient output channels and boosts them, y = act(π · g · BN(conv x)).

The gated convs are the prunable convs of the channel graph (`graph.analyze`); a shortcut-tied set
shares one gate (predicted from the input of its first conv, reused by the others), so residual
sums see one channel choice. g(x) = relu(W · mean|x| + b) over the conv input's channel means of
|x| (the paper's subsampling ss(x)); π is the k-winners-take-all mask of g. The plan is plain data
(`gate_plan` -> the artifact's `gating` record); `apply_gating` turns a Darknet into the gated one
in place (its state_dict gains `layers.<i>.gate.*`), which is what `artifacts.build_model` does
for a `gating` artifact, so evaluation, predict and ONNX export run the gating unchanged.

Cost (`count_macs`): executed conv MACs per image, from models.profile's dense per-layer MACs
scaled by the executed share of output channels (k/C for a gated conv) and of input channels
(those not identically zero in that image: a channel skipped upstream saves MACs here too, also
through routes, shortcuts, maxpools and upsamples), plus the gates' own W · pool MACs.
`gathered_model` is the same computation with the kept channels gathered (batch 1), for timing.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import YoloCompressError
from ..models.cfg import Block
from ..models.darknet import ConvLayer, Darknet
from ..models.fuse import fuse_batchnorm
from ..models.profile import profile_blocks
from .graph import analyze
from .groups import group_layers

__all__ = ["keep_count", "kwta", "Saliency", "GatedConv", "gate_plan", "apply_gating",
           "gated_convs", "gate_penalty", "MacCount", "count_macs", "gathered_model"]


def keep_count(density: float, channels: int) -> int:
    """ceil(d·C) (rounded to 1e-9 first, so 0.35·20 is 7, not 8), at least 1."""
    return max(1, math.ceil(round(density * channels, 9)))


def kwta(g: torch.Tensor, k: int) -> torch.Tensor:
    """The k-winners-take-all mask of saliencies g (B, C): 1 on each row's k largest, else 0."""
    if not 1 <= k <= g.shape[1]:
        raise YoloCompressError(f"k-WTA keeps {k} of {g.shape[1]} channels: needs 1 <= k <= C")
    idx = g.topk(k, dim=1).indices
    return torch.zeros_like(g).scatter_(1, idx, 1.0)


class Saliency(nn.Module):
    """g(x) = relu(W · mean|x| + b), b initialised to 1 (W to 0: every channel starts at 1).
    `tie` (C,), small, breaks the initial ties (apply_gating: |γ| ranks, as static pruning)."""

    def __init__(self, in_channels: int, channels: int, tie: torch.Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(in_channels, channels)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.bias.fill_(1.0)
            if tie is not None:
                self.fc.bias.add_(tie)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None   # (mask, g) of this forward

    def __getstate__(self):     # copies (EMA, BN folding) do not carry the last forward's graph
        return {**self.__dict__, "last": None}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc(x.abs().mean(dim=(2, 3))))


class GatedConv(ConvLayer):
    """A ConvLayer (same conv / bn / act modules, so the same state_dict keys) whose output
    channels are gated. The leader of a gate set owns `gate` and computes (mask, g) per forward;
    followers read the leader's (`gate_ref`, not a submodule). `gather`: execute only the
    non-zero input channels and kept output channels (batch 1, BN folded; gathered_model)."""

    def __init__(self, layer: ConvLayer, gate: Saliency | None, k: int, leader: bool):
        nn.Module.__init__(self)
        self.conv, self.act, self.bn_enabled = layer.conv, layer.act, layer.bn_enabled
        if layer.bn_enabled:
            self.bn = layer.bn
        if leader:
            self.gate = gate
        self.__dict__["gate_ref"] = gate     # plain attribute: one owner in the state_dict
        self.k, self.leader, self.gather = k, leader, False
        with torch.no_grad():
            self.act_zero = float(self.act(torch.zeros(1)))   # what a skipped channel holds

    def gate_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mask, g), each (B, C), of this forward; None for an ungated conv."""
        gate = self.gate_ref
        if gate is None:
            return None
        if self.leader:
            g = gate(x)
            gate.last = (kwta(g.detach(), self.k), g)
        if gate.last is None:
            raise YoloCompressError("a gated conv ran before the first conv of its shortcut-tied "
                                    "set, whose gate it shares")
        return gate.last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gv = self.gate_values(x)
        if self.gather:
            return self._gathered(x, gv)
        y = self.conv(x)
        if self.bn_enabled:
            y = self.bn(y)
        if gv is not None:
            mask, g = gv
            y = y * (mask * g)[:, :, None, None]
        return self.act(y)

    def _gathered(self, x: torch.Tensor, gv) -> torch.Tensor:
        if x.shape[0] != 1 or self.bn_enabled:
            raise YoloCompressError("the gathered forward runs batch 1 on a BN-folded model")
        conv = self.conv
        weight, bias = conv.weight, conv.bias
        if conv.groups == 1:
            live = (x[0].abs().amax(dim=(1, 2)) > 0).nonzero().flatten()
            if 0 < live.numel() < x.shape[1]:     # none live (rare): the full conv, = bias
                x, weight = x.index_select(1, live), weight.index_select(1, live)
        if gv is None:
            return self.act(F.conv2d(x, weight, bias, conv.stride, conv.padding, 1, conv.groups))
        _, g = gv
        kept = g[0].topk(self.k).indices
        y = F.conv2d(x, weight.index_select(0, kept), bias.index_select(0, kept), conv.stride,
                     conv.padding)
        y = self.act(y * g[0, kept].view(1, -1, 1, 1))
        out = y.new_full((1, conv.out_channels, y.shape[2], y.shape[3]), self.act_zero)
        out[:, kept] = y
        return out


@dataclass(frozen=True)
class GateSet:
    convs: tuple[int, ...]          # the conv indices sharing one gate, sorted; the first leads
    density: float
    group: str


def gate_plan(blocks: list[Block], density: float,
              group_densities: Mapping[str, float] | None = None) -> dict:
    """The `gating` record: one gate set per prunable conv or shortcut-tied set, with the density
    of its pruning group (`group_densities`, by group name) or `density`."""
    group_densities = dict(group_densities or {})
    graph = analyze(blocks)
    groups = group_layers(blocks, graph)
    unknown = sorted(set(group_densities) - {g.name for g in groups})
    if unknown:
        raise YoloCompressError(f"gate densities name group '{unknown[0]}', not one of "
                                f"{', '.join(g.name for g in groups)}")
    group_of = {c: g.name for g in groups for c in g.layers}
    sets, seen = [], set()
    for conv in graph.prunable:
        if conv in seen:
            continue
        members = tuple(sorted(graph.tied_with(conv)))
        seen.update(members)
        name = group_of[conv]
        sets.append({"convs": list(members), "group": name,
                     "density": float(group_densities.get(name, density))})
    if not sets:
        raise YoloCompressError(f"{blocks[0].source}: the cfg has no prunable conv to gate")
    return {"sets": sets}


def _check_record(model: Darknet, record: Mapping, source: str) -> list[GateSet]:
    sets = record.get("sets") if isinstance(record, Mapping) else None
    if not isinstance(sets, list) or not sets:
        raise YoloCompressError(f"{source}: gating record must hold a non-empty list 'sets'")
    graph = analyze(model.blocks)
    out, seen = [], set()
    for s in sets:
        convs = tuple(s.get("convs", ())) if isinstance(s, Mapping) else ()
        d = s.get("density") if isinstance(s, Mapping) else None
        if not convs or not all(isinstance(c, int) and c in graph.prunable for c in convs) \
                or set(convs) & seen:
            raise YoloCompressError(f"{source}: gating set {convs} must name prunable convs of "
                                    f"the cfg, each in one set")
        if set(convs) != set(graph.tied_with(convs[0])):
            raise YoloCompressError(f"{source}: gating set {convs} is not the shortcut-tied set "
                                    f"{sorted(graph.tied_with(convs[0]))}")
        if not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise YoloCompressError(f"{source}: gating set {convs} density must be in (0, 1], "
                                    f"got {d!r}")
        seen.update(convs)
        out.append(GateSet(tuple(sorted(convs)), float(d), str(s.get("group", ""))))
    return out


def apply_gating(model: Darknet, record: Mapping, source: str = "<gating>") -> Darknet:
    """Replace the convs of `record`'s sets by GatedConvs (in place) and return the model. A new
    gate's initial tie-break is 1e-2 · |γ| / max|γ| of its set's summed BN gammas."""
    sets = _check_record(model, record, source)
    for s in sets:
        layers = [model.layers[c] for c in s.convs]
        channels = layers[0].conv.out_channels
        gamma = sum(m.bn.weight.detach().abs() for m in layers if m.bn_enabled)
        tie = 1e-2 * gamma / gamma.max().clamp_min(1e-12) if torch.is_tensor(gamma) else None
        gate = Saliency(layers[0].conv.in_channels, channels, tie)
        k = keep_count(s.density, channels)
        for j, (c, m) in enumerate(zip(s.convs, layers)):
            model.layers[c] = GatedConv(m, gate, k, leader=j == 0)
    model.gating = {"sets": [{"convs": list(s.convs), "density": s.density, "group": s.group}
                             for s in sets]}
    return model


def gated_convs(model: nn.Module) -> list[GatedConv]:
    """The gate leaders of a (possibly DDP-wrapped) gated model, in layer order."""
    return [m for m in model.modules() if isinstance(m, GatedConv) and m.leader]


def gate_penalty(model: nn.Module) -> torch.Tensor:
    """The L1 term on g of the last forward: the sum over gate sets of mean g (g >= 0)."""
    leaders = gated_convs(model)
    if not leaders:
        raise YoloCompressError("the model has no gated conv")
    return torch.stack([m.gate_ref.last[1].mean() for m in leaders]).sum()


@dataclass
class MacCount:
    """Per image: executed MACs (`per_image`, (B,)), and per gate leader the kept-channel
    counts summed over images (`usage`), after one or more forwards inside `count_macs`."""
    dense: int = 0                         # MACs of the ungated model at that input size
    per_image: list[float] = field(default_factory=list)
    usage: dict[int, torch.Tensor] = field(default_factory=dict)
    images: int = 0


@contextmanager
def count_macs(model: Darknet) -> Iterator[MacCount]:
    """Count the executed MACs of every forward of `model` inside the block (see module doc)."""
    result = MacCount()
    dense: dict[tuple[int, int], list[int]] = {}
    batch: dict[str, torch.Tensor] = {}
    convs = [(i, m) for i, m in enumerate(model.layers) if isinstance(m, ConvLayer)]

    def hook(i: int, m: ConvLayer):
        def fn(_mod, args, _out):
            x = args[0]
            if i == convs[0][0]:
                size = (x.shape[2], x.shape[3])
                if size not in dense:
                    dense[size] = [p.flops // 2 for p in profile_blocks(model.blocks, *size)]
                batch["dense"] = torch.tensor(dense[size], dtype=torch.float64)
                batch["macs"] = torch.zeros(x.shape[0], dtype=torch.float64)
            conv = m.conv
            full = batch["dense"][i]
            live_in = (x.detach().abs().amax(dim=(2, 3)) > 0).sum(1).double() \
                if conv.groups == 1 else torch.full((x.shape[0],), float(conv.in_channels))
            share_out = 1.0
            gv = getattr(m, "gate_ref", None)
            if gv is not None:
                share_out = m.k / conv.out_channels
                if m.leader:
                    batch["macs"] += conv.in_channels * conv.out_channels   # W · pool(x)
                    mask = gv.last[0].detach()
                    result.usage[i] = result.usage.get(i, 0) + mask.sum(0).cpu()
            batch["macs"] += full * live_in.cpu() / conv.in_channels * share_out
            if i == convs[-1][0]:
                result.per_image.extend(batch["macs"].tolist())
                result.images += x.shape[0]
                result.dense = int(batch["dense"][[j for j, _ in convs]].sum())
        return fn

    handles = [m.register_forward_hook(hook(i, m)) for i, m in convs]
    try:
        yield result
    finally:
        for h in handles:
            h.remove()


def gathered_model(model: Darknet) -> Darknet:
    """A BN-folded eval copy of `model` whose every conv executes only the non-zero input and
    kept output channels of the image (batch 1): the gating's real CPU cost."""
    fused = fuse_batchnorm(model)
    for i, m in enumerate(fused.layers):
        if isinstance(m, ConvLayer):
            if not isinstance(m, GatedConv):
                m = fused.layers[i] = GatedConv(m, None, m.conv.out_channels, leader=False)
            m.gather = True
    return fused
