"""Channel rules of the layer kinds: how a layer's output channels derive from its sources'.

Each rule has three views of the same mapping, used by compress.graph and compress.prune:
`origins` (per channel, the (conv, channel) pairs summed into it), `keep` (boolean kept masks;
raises where a choice would break the layer) and `constant` (the constant a pruned channel
carries; NaN where none). models.kinds gives every kind one rule.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import YoloCompressError
from .block import Block
from .layers import ACTIVATIONS

__all__ = ["Origin", "UNTRACED", "Channels", "Produce", "PassThrough", "Scaled", "NeedsAll",
           "Concat", "Sum", "Untraced", "apply_activation", "route_slice"]

UNTRACED = -2               # producer id of channels a kind cannot trace back to convs

Origin = tuple[tuple[int, int], ...]      # the (producer, channel) pairs summed into one channel


def apply_activation(b: Block, default: str, x: np.ndarray) -> np.ndarray:
    """`b`'s activation (`default` when unset) applied to a numpy array."""
    return ACTIVATIONS[b.get("activation", default)]()(torch.from_numpy(x)).numpy()


class Channels:
    """How a kind's output channels derive from its sources' channels, in three views:
    `origins` (per channel, the conv channels summed into it), `keep` (boolean kept masks; raises
    where a choice breaks the layer) and `constant` (the constant a pruned channel carries; NaN
    where none). Each gets one entry per source, in source order."""
    traceable = True

    def origins(self, b: Block, i: int, ins: Sequence[tuple[Origin, ...]]) -> tuple[Origin, ...]:
        return ins[0]

    def keep(self, b: Block, i: int, srcs: Sequence[int], ins: Sequence[np.ndarray]) -> np.ndarray:
        return ins[0]

    def constant(self, b: Block, ins: Sequence[np.ndarray]) -> np.ndarray:
        return ins[0]


class Produce(Channels):
    """A conv: new channels; compress.graph and compress.prune handle its kept channels."""
    def origins(self, b, i, ins):
        return tuple(((i, c),) for c in range(b.get_int("filters")))


class PassThrough(Channels):
    """Per-channel ops (maxpool with -inf padding, avgpool): channel c out is channel c in, and
    a constant stays that constant."""


class Scaled(PassThrough):
    """[upsample]: nearest neighbour times `scale`."""
    def constant(self, b, ins):
        return ins[0] * b.get_float("scale", 1.0)


class NeedsAll(PassThrough):
    """[yolo]: reads a fixed channel layout, so every input channel must stay."""
    def keep(self, b, i, srcs, ins):
        if not ins[0].all():
            raise YoloCompressError(
                f"{b.where()}: [yolo] at layer {i} needs all {ins[0].size} channels of "
                f"layer {srcs[0]}, but only {int(ins[0].sum())} are kept")
        return ins[0]


class Concat(Channels):
    """[route]: the concatenation of each source's `groups`/`group_id` slice."""
    def origins(self, b, i, ins):
        return tuple(o for m in ins for o in m[slice(*route_slice(b, len(m)))])

    def keep(self, b, i, srcs, ins):
        groups = b.get_int("groups", 1)
        for s, m in zip(srcs, ins):
            counts = m.reshape(groups, -1).sum(axis=1)
            if (counts != counts[0]).any():
                raise YoloCompressError(
                    f"{b.where()}: [route] at layer {i} splits layer {s} into groups={groups}, "
                    f"which needs equally many kept channels per group, got {counts.tolist()}")
        return np.concatenate([m[slice(*route_slice(b, m.size))] for m in ins])

    def constant(self, b, ins):
        return np.concatenate([m[slice(*route_slice(b, m.size))] for m in ins])


class Sum(Channels):
    """[shortcut] (Darknet's shortcut_multilayer): output channel j is the previous layer's
    channel j plus channel j of every `from` map that has one; the output has the previous
    layer's channel count."""
    def origins(self, b, i, ins):
        out = []
        for j, origin in enumerate(ins[0]):
            summed = set(origin).union(*(m[j] for m in ins[1:] if j < len(m)))
            out.append(tuple(sorted(summed)))
        return tuple(out)

    def keep(self, b, i, srcs, ins):
        for s, m in zip(srcs[1:], ins[1:]):
            n = min(m.size, ins[0].size)
            if not np.array_equal(m[:n], ins[0][:n]):
                raise YoloCompressError(
                    f"{b.where()}: [shortcut] at layer {i} adds layers {srcs[0]} and {s} "
                    "whose kept channels differ; shortcut-tied convs must keep one channel set")
        return ins[0]

    def constant(self, b, ins):
        total = ins[0].copy()
        for m in ins[1:]:
            n = min(m.size, total.size)
            total[:n] += m[:n]
        return apply_activation(b, "linear", total)


class Untraced(Channels):
    """[sam], [scale_channels]: products of two maps, so a pruned channel is no constant there;
    every input channel must stay, and the output channels are traced to no conv."""
    traceable = False

    def origins(self, b, i, ins):
        return tuple(((UNTRACED, c),) for c in range(len(ins[-1])))

    def keep(self, b, i, srcs, ins):
        for s, m in zip(srcs, ins):
            if not m.all():
                raise YoloCompressError(
                    f"{b.where()}: [{b.type}] at layer {i} multiplies layer {s}'s channels, so "
                    f"all {m.size} must be kept, but only {int(m.sum())} are")
        return np.ones(len(ins[-1]), dtype=bool)

    def constant(self, b, ins):
        return np.full(len(ins[-1]), np.nan)


def route_slice(b: Block, channels: int) -> tuple[int, int]:
    """Channel range [start, end) that one input of a route with `groups`/`group_id` contributes."""
    groups = b.get_int("groups", 1)
    gid = b.get_int("group_id", 0)
    if groups < 1 or not 0 <= gid < groups:
        raise YoloCompressError(f"{b.where()}: [route] groups={groups} group_id={gid} is invalid")
    if channels % groups:
        raise YoloCompressError(
            f"{b.where()}: [route] groups={groups} does not divide the {channels} input channels")
    part = channels // groups
    return gid * part, (gid + 1) * part
