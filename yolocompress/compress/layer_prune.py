"""Layer pruning: whole residual units out of a Darknet cfg, as pure functions over (blocks, state).

    units  = residual_units(blocks)                  the removable units, found from the layer graph
    scores = unit_scores(state, units)               mean |BN gamma| of each unit's last conv
    chosen = least_important(units, scores, n)       the n lowest
    blocks', state' = remove_units(blocks, state, chosen)

A residual unit is a [shortcut] `x + f(x)` with its branch f: the chain of convs between the layer
`x` (the shortcut's single `from`) and the shortcut. It is removable when f is stride-1 convs each
reading only the layer before it and read only by the layer after it, the shortcut's activation
is linear and its output has x's shape: then removing it makes every reader of the shortcut read
x, which equals the unit with f's output zeroed (`masked_units_state`). `remove_units` drops the
sections, renumbers every `layers=`/`from=` entry of the later sections (relative entries stay
relative, absolute ones absolute) and renumbers the state_dict; layer names ("conv54") after a
removed unit shift with their index.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import YoloCompressError
from ..models.cfg import Block, input_layers
from ..models.kinds import kind_of
from ..models.layers import ACTIVATIONS
from ..models.roles import describe_layers, layer_consumers
from ..models.shapes import layer_shapes
from .importance import state_of

__all__ = ["ResidualUnit", "residual_units", "unit_scores", "least_important",
           "masked_units_state", "remove_units", "index_map", "source_names", "units_record",
           "units_from_record"]


@dataclass(frozen=True)
class ResidualUnit:
    """Layers `input + 1 .. shortcut` (the branch convs, then the shortcut) of one unit."""
    input: int                    # the layer the shortcut adds the branch to (its `from`)
    shortcut: int

    @property
    def layers(self) -> range:
        return range(self.input + 1, self.shortcut + 1)

    @property
    def convs(self) -> range:
        return range(self.input + 1, self.shortcut)

    @property
    def last_conv(self) -> int:
        return self.shortcut - 1


def _unit_at(blocks: list[Block], k: int, users: list[list[int]], shapes) -> ResidualUnit | None:
    """The removable unit ending at shortcut layer k, or None."""
    b = blocks[k + 1]
    if b.type != "shortcut" or b.get("activation", "linear") != "linear":
        return None
    srcs = input_layers(blocks, k)
    if len(srcs) != 2 or srcs[1] < 0 or srcs[1] >= k - 1:
        return None
    x = srcs[1]
    for j in range(x + 1, k):
        c = blocks[j + 1]
        if (c.type != "convolutional" or c.get_int("stride", 1) != 1
                or input_layers(blocks, j) != [j - 1] or users[j] != [j + 1]):
            return None
    return ResidualUnit(x, k) if shapes[x] == shapes[k] else None


def residual_units(blocks: list[Block]) -> list[ResidualUnit]:
    """Every removable residual unit of the cfg, in cfg order (module docstring)."""
    users, shapes = layer_consumers(blocks), layer_shapes(blocks)
    units = (_unit_at(blocks, k, users, shapes) for k in range(len(blocks) - 1))
    return [u for u in units if u is not None]


def _checked(blocks: list[Block], units: Sequence[ResidualUnit]) -> list[ResidualUnit]:
    removable = {u.shortcut: u for u in residual_units(blocks)}
    names = [info.name for info in describe_layers(blocks)]
    out = []
    for u in units:
        if removable.get(u.shortcut) != u:
            what = names[u.shortcut] if 0 <= u.shortcut < len(names) else f"layer {u.shortcut}"
            raise YoloCompressError(f"{blocks[0].source}: {what} is not a removable residual "
                                    "unit (layer pruning removes a [shortcut] and the convs "
                                    "that feed only it)")
        out.append(u)
    if len({u.shortcut for u in out}) != len(out):
        raise YoloCompressError(f"{blocks[0].source}: a residual unit is named twice")
    return sorted(out, key=lambda u: u.shortcut)


def unit_scores(blocks: list[Block], state, units: Sequence[ResidualUnit]) -> list[float]:
    """Per unit: the mean |BN gamma| of its last conv (tanluren's layer_prune.py criterion)."""
    sd = state_of(state)
    out = []
    for u in units:
        key = f"layers.{u.last_conv}.bn.weight"
        if key not in sd:
            raise YoloCompressError(f"{blocks[u.last_conv + 1].where()}: conv {u.last_conv} "
                                    "has no BN gamma to rank its residual unit by")
        out.append(float(sd[key].detach().abs().double().mean()))
    return out


def least_important(blocks: list[Block], units: Sequence[ResidualUnit],
                    scores: Sequence[float], n: int) -> list[ResidualUnit]:
    """The n units of lowest score (ties: the earlier unit first), in cfg order."""
    if n < 0:
        raise YoloCompressError(f"prune: the number of residual units to remove must be >= 0, "
                                f"got {n}")
    if n > len(units):
        raise YoloCompressError(
            f"{blocks[0].source}: prune.layers={n}, but the cfg has "
            + (f"only {len(units)} removable residual units" if units
               else "no removable residual unit (a [shortcut] with linear activation over a "
                    "chain of stride-1 convs that nothing else reads)"))
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")[:n]
    return sorted((units[i] for i in order), key=lambda u: u.shortcut)


def masked_units_state(blocks: list[Block], state, units: Sequence[ResidualUnit]
                       ) -> dict[str, torch.Tensor]:
    """A copy of the state with each unit's last conv's BN gamma and beta zeroed, so its output
    is act(0) = 0 and the shortcut adds nothing: the model `remove_units` must reproduce."""
    sd = {k: v.clone() for k, v in state_of(state).items()}
    for u in _checked(blocks, units):
        b = blocks[u.last_conv + 1]
        act = b.get("activation", "logistic")
        if f"layers.{u.last_conv}.bn.weight" not in sd or \
                float(ACTIVATIONS[act]()(torch.zeros(1))) != 0.0:
            raise YoloCompressError(f"{b.where()}: conv {u.last_conv} ({act}, batch_normalize="
                                    f"{b.get_int('batch_normalize', 0)}) cannot be masked to "
                                    "output 0 by zeroing its BN gamma and beta")
        sd[f"layers.{u.last_conv}.bn.weight"].zero_()
        sd[f"layers.{u.last_conv}.bn.bias"].zero_()
    return sd


def index_map(blocks: list[Block], units: Sequence[ResidualUnit]) -> dict[int, int]:
    """Old layer index -> new one for every layer kept, and for each removed shortcut the new
    index of what its readers read instead (its unit's input, through adjacent removed units)."""
    removed = {j for u in units for j in u.layers}
    new, n = {}, 0
    for i in range(len(blocks) - 1):
        if i not in removed:
            new[i] = n
            n += 1
    for u in sorted(units, key=lambda u: u.shortcut):     # an input is mapped before its reader
        new[u.shortcut] = new[u.input]
    return new


def remove_units(blocks: list[Block], state, units: Sequence[ResidualUnit]
                 ) -> tuple[list[Block], dict[str, torch.Tensor]]:
    """The cfg without the units' sections (deep copy, later `layers=`/`from=` renumbered) and
    the state_dict without their tensors, later layers renumbered."""
    units = _checked(blocks, units)
    new = index_map(blocks, units)
    removed = {j for u in units for j in u.layers}
    out = [copy.deepcopy(blocks[0])]
    for i, b in enumerate(blocks[1:]):
        if i in removed:
            continue
        b = copy.deepcopy(b)
        key = kind_of(b).refs
        if key is not None:
            refs = b.get_ints(key)
            srcs = input_layers(blocks, i)[-len(refs):]
            moved = [new[s] - new[i] if r < 0 else new[s] for r, s in zip(refs, srcs)]
            if moved != refs:
                b.set(key, ",".join(map(str, moved)))
        out.append(b)
    new_state = {}
    for k, v in state_of(state).items():
        head, _, rest = k.partition(".")
        idx, _, name = rest.partition(".")
        if head != "layers" or not idx.isdigit():
            raise YoloCompressError(f"layer pruning: unexpected state_dict key '{k}'")
        if int(idx) not in removed:
            new_state[f"layers.{new[int(idx)]}.{name}"] = v.detach().clone()
    return out, new_state


def source_names(blocks: list[Block], units: Sequence[ResidualUnit], names: Sequence[str]
                 ) -> list[str]:
    """The names in `blocks` of the layers that `names` name in the cfg without `units`."""
    units = _checked(blocks, units)
    removed = {j for u in units for j in u.layers}
    infos = describe_layers(blocks)
    kept = [i for i in range(len(infos)) if i not in removed]
    by_new = {f"{kind_of(blocks[i + 1]).short}{k}": infos[i].name for k, i in enumerate(kept)}
    missing = [n for n in names if n not in by_new]
    if missing:
        raise YoloCompressError(f"{blocks[0].source}: no layer {missing[0]!r} in the cfg without "
                                f"its residual units ({len(kept)} layers)")
    return [by_new[n] for n in names]


def units_record(blocks: list[Block], units: Sequence[ResidualUnit],
                 scores: Mapping[int, float] | None = None) -> list[dict]:
    """JSON-able: per removed unit, the names of its shortcut, input and convs (of `blocks`), its
    stride and score."""
    infos = describe_layers(blocks)
    return [{"shortcut": infos[u.shortcut].name, "input": infos[u.input].name,
             "convs": [infos[c].name for c in u.convs], "stride": infos[u.shortcut].stride,
             "part": infos[u.shortcut].part,
             "score": None if scores is None else float(scores[u.shortcut])}
            for u in units]


def units_from_record(blocks: list[Block], record: Sequence[Mapping]) -> list[ResidualUnit]:
    """The units a `units_record` names, checked to be removable units of `blocks`."""
    index = {info.name: info.index for info in describe_layers(blocks)}
    by_shortcut = {u.shortcut: u for u in residual_units(blocks)}
    out = []
    for row in record:
        name = row.get("shortcut") if isinstance(row, Mapping) else None
        if name not in index or index[name] not in by_shortcut:
            raise YoloCompressError(f"{blocks[0].source}: prune record removes unit {name!r}, "
                                    "not a removable residual unit of this cfg")
        out.append(by_shortcut[index[name]])
    return _checked(blocks, out)
