"""Stage 2, group channel pruning: pure functions over (cfg blocks, state_dict).

    scores  = importance(state, group)                 (compress.importance; |BN gamma| default)
    thresh  = group_thresholds(scores, percents)        each group's percentile of its own scores
    keep    = make_masks(blocks, state, groups, percents, ...)   {conv: kept output channels}
    blocks', state' = prune(blocks, state, keep)        fewer `filters=`, sliced tensors

`plan` bundles masks, thresholds, groups and settings into a JSON-able record that `replay`
re-applies to the unpruned model; `find_percents_for_budget` searches group percents for a
params/FLOPs reduction, by importance lost per cost or, given a `score(keep)` callable (the stage
builds it: prune, BN-recalibrate and take the loss on calibration data), by score lost per cost.

Compensation. Masks assume sparse training has driven the pruned channels' gamma to ~0, so a
pruned channel c of conv k outputs the constant act_k(beta_c) everywhere. `prune` carries that
constant through routes, maxpools, upsamples and shortcut sums (applying each shortcut's own
activation) and folds it into every conv that reads it: sum over the kernel of
W[:, in_channel] * constant is subtracted from the reader's BN running_mean, or added to its conv
bias when it has no BN. The pruned model then equals `masked_model_state` (pruned gammas zeroed)
exactly where the reader is 1x1; a k x k reader with zero padding sees the constant only partly at
the image border, so there the fold is exact in the interior only (its border pixels differ by
the part of the kernel that falls on the padding). With beta = 0 (act(0) = 0) it is exact.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import YoloCompressError
from ..models.cfg import Block, input_layers
from ..models.channels import Produce, apply_activation
from ..models.kinds import kind_of
from ..models.profile import profile_blocks
from ..models.roles import describe_layers
from .bisection import bisect
from .budget_evolve import evolve
from .graph import INPUT, ChannelGraph, KeptChannels, analyze, propagate_keep
from .groups import Group, group_layers
from .importance import Importance, bn_gamma_abs, state_of, tied_scores
from .layer_prune import remove_units, units_from_record

__all__ = ["BUDGET_METHODS", "MERGES", "MaskSettings", "group_scores", "group_thresholds", "make_masks",
           "masked_model_state", "prune", "plan", "prune_record", "keep_from_record", "replay",
           "BudgetResult", "find_percents_for_budget", "pruned_cost", "RECORD_VERSION"]

RECORD_VERSION = 1
BUDGET_METHODS = ("greedy", "scale", "evolve")
Keep = dict[int, np.ndarray]

# How a shortcut-tied set's per-conv masks become one: (votes per channel = members scoring >=
# the threshold, set size, the set's mean score per channel, threshold) -> kept.
MERGES = {
    "majority": lambda votes, n, mean, t: 2 * votes >= n,  # the method's authors: >= half the set
    "union": lambda votes, n, mean, t: votes > 0,          # tanluren: kept by any conv of the set
    "mean": lambda votes, n, mean, t: mean >= t,           # the set scored as one (Torch-Pruning)
}


@dataclass(frozen=True)
class MaskSettings:
    """Per-layer floor = min(filters, max(ceil(min_keep * filters), min_channels)); kept counts
    are then rounded up to a multiple of round_to (at most filters)."""
    min_keep: float = 0.1
    min_channels: int = 8
    round_to: int = 1
    merge: str = "majority"

    def __post_init__(self):
        if not 0 < self.min_keep <= 1:
            raise YoloCompressError(f"prune: min_keep must be in (0, 1], got {self.min_keep}")
        if self.min_channels < 1:
            raise YoloCompressError(f"prune: min_channels must be >= 1, got {self.min_channels}")
        if self.round_to < 1:
            raise YoloCompressError(f"prune: round_to must be >= 1, got {self.round_to}")
        if self.merge not in MERGES:
            raise YoloCompressError(
                f"prune: unknown merge '{self.merge}' (one of {', '.join(MERGES)})")

    def floor(self, n: int) -> int:
        return min(n, max(math.ceil(self.min_keep * n - 1e-9), self.min_channels))

    def count(self, kept: int, n: int) -> int:
        """The kept count after the floor and the rounding."""
        k = max(kept, self.floor(n))
        return min(n, -(-k // self.round_to) * self.round_to)


# ---- masks ----------------------------------------------------------------------------------

def _check_groups(graph: ChannelGraph, groups: Sequence[Group]) -> None:
    convs = set(graph.convs)
    seen: dict[int, str] = {}
    for g in groups:
        for c in g.layers:
            if c not in convs:
                raise YoloCompressError(f"prune: group {g.name} holds layer {c}, not a conv")
            if c in graph.excluded:
                raise YoloCompressError(f"prune: group {g.name} holds conv {c}, which is never "
                                        f"pruned ({graph.excluded[c]})")
            if c in seen:
                raise YoloCompressError(f"prune: conv {c} is in groups {seen[c]} and {g.name}")
            seen[c] = g.name
    for tied in graph.tied_sets:
        names = {seen.get(c) for c in tied}
        if len(names) > 1:
            raise YoloCompressError(
                f"prune: shortcut-tied convs {sorted(tied)} are split over groups "
                f"{sorted(n or '(none)' for n in names)}; a tied set belongs to one group")


def _percents(groups: Sequence[Group], percents: Mapping[str, float] | Sequence[float]
              ) -> dict[str, float]:
    names = [g.name for g in groups]
    if isinstance(percents, Mapping):
        unknown = sorted(set(percents) - set(names))
        missing = [n for n in names if n not in percents]
        if unknown or missing:
            raise YoloCompressError(
                f"prune: percents name groups {sorted(percents)}, the groups are {names}")
        out = {n: float(percents[n]) for n in names}
    else:
        values = list(percents)
        if len(values) != len(names):
            raise YoloCompressError(
                f"prune: {len(values)} percents for {len(names)} groups {names}")
        out = dict(zip(names, map(float, values)))
    for n, p in out.items():
        if not 0 <= p <= 1:
            raise YoloCompressError(f"prune: percent of group {n} must be in [0, 1], got {p}")
    return out


def group_scores(state, groups: Sequence[Group], importance: Importance = bn_gamma_abs
                 ) -> dict[str, dict[int, np.ndarray]]:
    """{group name: {conv: per-channel scores}}."""
    return {g.name: importance(state, g) for g in groups}


def group_thresholds(scores_by_group: Mapping[str, Mapping[int, np.ndarray] | np.ndarray],
                     percents: Mapping[str, float]) -> dict[str, float | None]:
    """Each group's threshold: the score below which its lowest floor(p * n) channels lie (n =
    all channels of the group's convs; +inf for p = 1; None for an empty group). Channels scoring
    >= the threshold pass it."""
    out: dict[str, float | None] = {}
    for name, scores in scores_by_group.items():
        if name not in percents:
            raise YoloCompressError(f"prune: no percent for group {name}")
        parts = list(scores.values()) if isinstance(scores, Mapping) else [scores]
        flat = np.sort(np.concatenate([np.ravel(s) for s in parts])) if parts else np.empty(0)
        if flat.size == 0:
            out[name] = None
            continue
        k = int(math.floor(percents[name] * flat.size + 1e-9))
        out[name] = float(flat[k]) if k < flat.size else math.inf
    return out


def _units(graph: ChannelGraph, layers: Iterable[int]) -> list[tuple[int, ...]]:
    """The convs of a group as pruning units: tied sets whole, other convs alone."""
    units, done = [], set()
    for c in sorted(layers):
        if c not in done:
            unit = tuple(sorted(graph.tied_with(c)))
            done.update(unit)
            units.append(unit)
    return units


def _group_masks(graph: ChannelGraph, scores: Mapping[int, np.ndarray], threshold: float | None,
                 settings: MaskSettings) -> dict[int, np.ndarray]:
    """Boolean keep masks of one group's convs."""
    masks = {}
    for unit in _units(graph, scores):
        if len(unit) > 1:
            votes = sum((scores[c] >= threshold).astype(int) for c in unit)
            rank = tied_scores(scores, unit)
            mask = MERGES[settings.merge](votes, len(unit), rank, threshold)
        else:
            rank = scores[unit[0]]
            mask = rank >= threshold
        want = settings.count(int(mask.sum()), mask.size)
        if want > mask.sum():                      # floor / rounding: add the next best channels
            order = [i for i in np.argsort(-rank, kind="stable") if not mask[i]]
            mask = mask.copy()
            mask[order[:want - int(mask.sum())]] = True
        for c in unit:
            masks[c] = mask
    return masks


def _masks(blocks, state, groups, percents, importance, settings):
    graph = analyze(blocks)
    groups = list(groups)
    _check_groups(graph, groups)
    pct = _percents(groups, percents)
    scores = group_scores(state, groups, importance)
    thresholds = group_thresholds(scores, pct)
    keep: Keep = {}
    for g in groups:
        for c, m in _group_masks(graph, scores[g.name], thresholds[g.name], settings).items():
            keep[c] = np.flatnonzero(m)
    propagate_keep(blocks, keep)          # a structural check: raises on a broken choice
    return keep, thresholds, pct


def make_masks(blocks: list[Block], state, groups: Sequence[Group] | None,
               percents: Mapping[str, float] | Sequence[float], *,
               min_keep: float = 0.1, min_channels: int = 8, round_to: int = 1,
               merge: str = "majority", importance: Importance = bn_gamma_abs) -> Keep:
    """{conv: kept output channel indices (sorted)} for every conv of `groups` (default:
    group_layers(blocks)). Per group: channels scoring >= the group's threshold pass; a tied set's
    masks merge (`merge`); each layer (tied set) keeps at least its floor, then a multiple of
    `round_to`, filling up with its best-scored (set-mean) remaining channels."""
    settings = MaskSettings(min_keep, min_channels, round_to, merge)
    groups = group_layers(blocks) if groups is None else groups
    return _masks(blocks, state, groups, percents, importance, settings)[0]


# ---- rebuilding -----------------------------------------------------------------------------

def masked_model_state(blocks: list[Block], state, keep: Mapping[int, Iterable[int]],
                       zero_beta: bool = False) -> dict[str, torch.Tensor]:
    """A copy of the unpruned state with the pruned channels' BN gamma (and beta when
    `zero_beta`) zeroed: the model `prune` must reproduce."""
    sd = {k: v.clone() for k, v in state_of(state).items()}
    kept = propagate_keep(blocks, keep)
    for c in keep:
        drop = _dropped(kept.outputs[c], blocks[c + 1].get_int("filters"))
        if not drop.size:
            continue
        if f"layers.{c}.bn.weight" not in sd:
            raise YoloCompressError(f"{blocks[c + 1].where()}: conv {c} has no BN gamma to zero")
        sd[f"layers.{c}.bn.weight"][drop] = 0
        if zero_beta:
            sd[f"layers.{c}.bn.bias"][drop] = 0
    return sd


def _dropped(kept: np.ndarray, n: int) -> np.ndarray:
    mask = np.ones(n, dtype=bool)
    mask[kept] = False
    return np.flatnonzero(mask)


def _constants(blocks: list[Block], sd, kept: KeptChannels) -> dict[int, np.ndarray]:
    """Per layer output channel: the constant a pruned channel carries there, NaN elsewhere
    (through each kind's channel rule, models.channels)."""
    const = {INPUT: np.full(blocks[0].get_int("channels", 3), np.nan)}
    for i, b in enumerate(blocks[1:]):
        srcs = input_layers(blocks, i)
        rule = kind_of(b).channels
        if isinstance(rule, Produce):
            v = np.full(b.get_int("filters"), np.nan)
            drop = _dropped(kept.outputs[i], v.size)
            if drop.size:
                if not b.get_int("batch_normalize", 0):
                    raise YoloCompressError(
                        f"{b.where()}: conv {i} has no BN, so its pruned channels are not a "
                        "constant to fold into the next layer; prune it with compensate=False")
                beta = sd[f"layers.{i}.bn.bias"].detach().cpu().double().numpy()
                v[drop] = apply_activation(b, "logistic", beta[drop])
            const[i] = v
        else:
            const[i] = rule.constant(b, [const[s] for s in srcs])
    return const


def _fold_offsets(blocks: list[Block], sd, kept: KeptChannels) -> dict[int, torch.Tensor]:
    """conv -> per-output-channel shift of its pre-BN output from dropping its pruned inputs."""
    const = _constants(blocks, sd, kept)
    out = {}
    for r, b in enumerate(blocks[1:]):
        if b.type != "convolutional":
            continue
        values = const[input_layers(blocks, r)[0]]
        drop = _dropped(kept.inputs[r], values.size)
        if not drop.size:
            continue
        if np.isnan(values[drop]).any():       # propagate_keep makes this unreachable
            raise YoloCompressError(f"{b.where()}: conv {r} loses an input that is not constant")
        w = sd[f"layers.{r}.conv.weight"].detach().cpu()
        dropped = w.index_select(1, torch.from_numpy(drop)).double()   # only what is folded
        shift = dropped.sum(dim=(2, 3)) @ torch.from_numpy(values[drop])
        out[r] = shift
    return out


def _slice_out(t, out, inp):
    return t.index_select(0, torch.as_tensor(out))


def _slice_conv_weight(t, out, inp):
    return _slice_out(t, out, inp).index_select(1, torch.as_tensor(inp))


# state_dict parameter (after "layers.<i>.") -> slicer(tensor, kept outputs, kept inputs)
SLICERS = {
    "conv.weight": _slice_conv_weight,
    "conv.bias": _slice_out,
    "bn.weight": _slice_out,
    "bn.bias": _slice_out,
    "bn.running_mean": _slice_out,
    "bn.running_var": _slice_out,
    "bn.num_batches_tracked": lambda t, out, inp: t,
}
_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def _with_filters(blocks: list[Block], filters: Mapping[int, int], deep: bool) -> list[Block]:
    """Blocks with new `filters=`: a deep copy, or (deep=False, for costing) a list sharing the
    unchanged blocks."""
    out = copy.deepcopy(blocks) if deep else list(blocks)
    for c, n in filters.items():
        b = blocks[c + 1]
        if b.get_int("filters") == n:
            continue
        if deep:
            out[c + 1].set("filters", n)
        else:
            out[c + 1] = dataclasses.replace(b, options={**b.options, "filters": str(n)})
    return out


def prune(blocks: list[Block], state, keep: Mapping[int, Iterable[int]], compensate: bool = True
          ) -> tuple[list[Block], dict[str, torch.Tensor]]:
    """The slim cfg (deep copy with fewer `filters=`) and its state_dict: every conv's weight
    sliced on kept outputs and kept inputs (routes, shortcuts and pass-through layers followed
    through graph.propagate_keep), BN tensors and biases on kept outputs. With `compensate`, the
    pruned channels' constant act(beta) is folded into their readers (module docstring)."""
    sd = state_of(state)
    kept = propagate_keep(blocks, keep)
    shifts = _fold_offsets(blocks, sd, kept) if compensate else {}
    new_state = {}
    for key, t in sd.items():
        m = _KEY.fullmatch(key)
        if not m or int(m[1]) not in kept.filters or m[2] not in SLICERS:
            raise YoloCompressError(f"prune: unexpected state_dict key '{key}' for this cfg")
        i, name = int(m[1]), m[2]
        if i in shifts and name == "bn.running_mean":     # BN computes (x - mean)
            t = t - shifts[i].to(t.dtype)
        elif i in shifts and name == "conv.bias":
            t = t + shifts[i].to(t.dtype)
        grouped = blocks[i + 1].get_int("groups", 1) > 1    # keeps all inputs (propagate_keep)
        inp = slice(None) if grouped else torch.from_numpy(kept.inputs[i])
        out = torch.from_numpy(kept.outputs[i])
        new_state[key] = SLICERS[name](t.detach(), out, inp).clone()
    return _with_filters(blocks, kept.filters, deep=True), new_state


# ---- records --------------------------------------------------------------------------------

def prune_record(blocks: list[Block], keep: Mapping[int, Iterable[int]], *,
                 groups: Sequence[Group] = (), percents: Mapping[str, float] | None = None,
                 thresholds: Mapping[str, float | None] | None = None,
                 settings: Mapping[str, Any] | None = None) -> dict:
    """A JSON-able plan: {"version", "layers": {layer name: kept channels}, "filters": {layer
    name: [before, after]}, "groups": {name: [layer names]}, "percents", "thresholds" (None for
    an empty group or percent 1), "settings"}. Layer names ("conv54") come from models.roles;
    `replay` needs only "version" and "layers"."""
    names = [info.name for info in describe_layers(blocks)]
    layers = {names[c]: sorted(int(i) for i in keep[c]) for c in sorted(keep)}
    return {
        "version": RECORD_VERSION,
        "layers": layers,
        "filters": {names[c]: [blocks[c + 1].get_int("filters"), len(layers[names[c]])]
                    for c in sorted(keep)},
        "groups": {g.name: [names[c] for c in g.layers] for g in groups},
        "percents": dict(percents or {}),
        "thresholds": {k: (None if v is None or math.isinf(v) else float(v))
                       for k, v in (thresholds or {}).items()},
        "settings": dict(settings or {}),
    }


def plan(blocks: list[Block], state, groups: Sequence[Group] | None,
         percents: Mapping[str, float] | Sequence[float], *, min_keep: float = 0.1,
         min_channels: int = 8, round_to: int = 1, merge: str = "majority",
         importance: Importance = bn_gamma_abs) -> dict:
    """make_masks + its thresholds as a prune_record."""
    settings = MaskSettings(min_keep, min_channels, round_to, merge)
    groups = group_layers(blocks) if groups is None else list(groups)
    keep, thresholds, pct = _masks(blocks, state, groups, percents, importance, settings)
    return prune_record(blocks, keep, groups=groups, percents=pct, thresholds=thresholds,
                        settings={**dataclasses.asdict(settings), "importance": importance.name})


def keep_from_record(blocks: list[Block], record: Mapping) -> Keep:
    """The record's {conv index: kept channels} for `blocks` (the unpruned cfg)."""
    if not isinstance(record, Mapping) or record.get("version") != RECORD_VERSION \
            or not isinstance(record.get("layers"), Mapping):
        raise YoloCompressError(
            f"prune record: expected a dict with version {RECORD_VERSION} and 'layers'")
    index = {info.name: info.index for info in describe_layers(blocks)}
    keep = {}
    for name, chans in record["layers"].items():
        if name not in index:
            raise YoloCompressError(f"{blocks[0].source}: prune record names layer '{name}', "
                                    "which this cfg does not have")
        keep[index[name]] = np.asarray(chans, dtype=np.int64)
    return keep


def replay(blocks: list[Block], state, record: Mapping, compensate: bool = True
           ) -> tuple[list[Block], dict[str, torch.Tensor]]:
    """Apply a prune record to the unpruned model: its residual units removed first (record
    "units", compress.layer_prune; its "layers" then name layers of the reduced cfg), then
    prune(blocks, state, keep_from_record(...))."""
    if isinstance(record, Mapping) and record.get("units"):
        blocks, state = remove_units(blocks, state, units_from_record(blocks, record["units"]))
    return prune(blocks, state, keep_from_record(blocks, record), compensate)


# ---- budget ---------------------------------------------------------------------------------

METRICS = ("params", "flops", "latency")


def pruned_cost(blocks: list[Block], keep: Mapping[int, Iterable[int]], metric: str,
                size: tuple[int, int] | None = None, latency: Any = None) -> float:
    """Total params or Darknet FLOPs of the pruned cfg (models.profile), or its predicted ms
    (`latency`: a compress.latency_table.LatencyTable of `blocks`), without building it."""
    if metric not in METRICS:
        raise YoloCompressError(f"prune: unknown budget metric '{metric}' (one of "
                                f"{', '.join(METRICS)})")
    kept = propagate_keep(blocks, keep)
    slim = _with_filters(blocks, kept.filters, deep=False)
    if metric == "latency":
        if latency is None:
            raise YoloCompressError("prune: a latency budget needs a latency table")
        return latency.predict(slim)
    rows = profile_blocks(slim, *(size or (None, None)))
    return sum(getattr(r, metric) for r in rows)


@dataclass(frozen=True)
class BudgetResult:
    percents: dict[str, float]
    keep: Keep
    metric: str
    target: float          # requested reduction of the metric (fraction removed)
    reduction: float       # reached: the least pruning found that removes >= target
    evaluations: int
    history: list | None = None   # method evolve: every scored candidate


class _Search:
    """Masks per (group, percent), cached; the metric's reduction of a full choice."""

    def __init__(self, blocks, state, groups, importance, settings, metric, ratio, size,
                 latency=None):
        self.blocks, self.metric, self.ratio, self.size = blocks, metric, ratio, size
        self.latency = latency
        self.graph = analyze(blocks)
        _check_groups(self.graph, groups)
        self.groups = [g for g in groups if g.layers]
        self.scores = group_scores(state, self.groups, importance)
        self.settings = settings
        self.base = pruned_cost(blocks, {}, metric, size, latency)
        self.cache: dict = {}
        self.evaluations = 0

    def masks(self, name: str, p: float) -> tuple[dict[int, np.ndarray], float]:
        """(kept channels of the group's convs, their total score)."""
        key = (name, round(p, 9))
        if key not in self.cache:
            scores = self.scores[name]
            thr = group_thresholds({name: scores}, {name: p})[name]
            masks = _group_masks(self.graph, scores, thr, self.settings)
            kept = {c: np.flatnonzero(m) for c, m in masks.items()}
            total = float(sum(scores[c][m].sum() for c, m in masks.items()))
            self.cache[key] = kept, total
        return self.cache[key]

    def keep(self, pct: Mapping[str, float]) -> Keep:
        out: Keep = {}
        for g in self.groups:
            out.update(self.masks(g.name, pct[g.name])[0])
        return out

    def reduction(self, pct: Mapping[str, float]) -> float:
        self.evaluations += 1
        return 1 - pruned_cost(self.blocks, self.keep(pct), self.metric, self.size,
                               self.latency) / self.base

    def bisect(self, make, lo: float, hi: float) -> tuple[float, float]:
        """(lo, hi) 1e-7 apart around where reduction(make(x)) first reaches the target, given
        it does not at lo and does at hi."""
        lo, hi, _ = bisect(lambda x: 1 if self.reduction(make(x)) >= self.ratio else -1,
                           lo, hi, 1e-7)
        return lo, hi

    def raise_to(self, pct: dict[str, float], name: str, goal: float, current: float
                 ) -> dict[str, float] | None:
        """pct with group `name` raised to the least percent (to 1e-7) whose reduction reaches
        `goal`; to 1 where none does but 1 still removes more than `current`; else None."""
        top = {**pct, name: 1.0}
        red = self.reduction(top)
        if red < goal:
            return top if red > current else None
        _, hi, _ = bisect(lambda x: 1 if self.reduction({**pct, name: x}) >= goal else -1,
                          pct[name], 1.0, 1e-7)
        return {**pct, name: hi}

    def next_change(self, pct: dict[str, float], name: str, step: float
                    ) -> dict[str, float] | None:
        """pct with group `name` raised by `step` (repeatedly, up to 1) until its masks change."""
        now = self.masks(name, pct[name])[0]
        p = pct[name]
        while p < 1:
            p = min(1.0, p + step)
            if any(k.size != now[c].size for c, k in self.masks(name, p)[0].items()):
                return {**pct, name: p}
        return None

    def result(self, pct: dict[str, float]) -> BudgetResult:
        return BudgetResult({n: float(v) for n, v in pct.items()}, self.keep(pct), self.metric,
                            self.ratio, self.reduction(pct), self.evaluations)


def find_percents_for_budget(blocks: list[Block], state, groups: Sequence[Group] | None = None,
                             base_percents: Mapping[str, float] | Sequence[float] | None = None,
                             target: tuple[str, float] = ("params", 0.5), *,
                             method: str = "greedy", step: float = 0.05,
                             size: tuple[int, int] | None = None, min_keep: float = 0.1,
                             min_channels: int = 8, round_to: int = 1, merge: str = "majority",
                             importance: Importance = bn_gamma_abs,
                             score: Callable[[Keep], float] | None = None,
                             score_step: float = 0.05, evolve_options: Mapping | None = None,
                             latency: Any = None) -> BudgetResult:
    """Group percents whose masks remove at least `target` = (metric, fraction) of the model's
    params, FLOPs (at `size`, default the [net] size) or predicted latency (`latency`: a
    compress.latency_table.LatencyTable of `blocks`), with the least pruning found.

    method "scale": percents = min(1, t * base) with t found by bisection. method "greedy":
    starting from `base_percents` (default all 0; scaled down first if they already reach the
    target), repeatedly raise by `step` the percent of the group whose raise loses the least
    total score (|gamma|) per unit of cost removed; the raise that reaches the target is bisected
    to land on it. Either overshoots the target by at most one threshold step (one channel, or
    one channel of a tied set). Costs come from kept counts (models.profile), no modules built.

    With `score` (method "greedy" only; lower is better, e.g. the calibration loss of the
    recalibrated pruned model), greedy starts from `base_percents` as given and each round
    raises, per group, the percent just far enough to remove `score_step` more of the metric
    (the last round: just to the target), scores every such candidate and takes the one whose
    score rises least per cost removed: about G * target / score_step score calls for G groups.

    method "evolve" (needs `score`; `base_percents` are ignored, groups start from one common
    threshold): compress.budget_evolve over per-group thresholds, `evolve_options` its keyword
    arguments (rounds, population, sigma, seed); the result's `history` lists every candidate."""
    metric, ratio = target
    if metric not in METRICS:
        raise YoloCompressError(f"prune: unknown budget metric '{metric}' (one of "
                                f"{', '.join(METRICS)})")
    if not 0 < ratio < 1:
        raise YoloCompressError(f"prune: budget reduction must be in (0, 1), got {ratio}")
    if method not in BUDGET_METHODS:
        raise YoloCompressError(f"prune: unknown budget method '{method}' (one of "
                                f"{', '.join(BUDGET_METHODS)})")
    if not 0 < step <= 1:
        raise YoloCompressError(f"prune: budget step must be in (0, 1], got {step}")
    if score is not None and (method == "scale" or not 0 < score_step < 1):
        raise YoloCompressError(f"prune: a scored budget search needs method greedy or evolve "
                                f"and a score_step in (0, 1), got {method}, {score_step}")
    if method == "evolve" and score is None:
        raise YoloCompressError("prune: budget method 'evolve' needs a score (calibration data)")
    settings = MaskSettings(min_keep, min_channels, round_to, merge)
    groups = group_layers(blocks) if groups is None else list(groups)
    base = _percents(groups, [0.0] * len(groups) if base_percents is None else base_percents)
    s = _Search(blocks, state, groups, importance, settings, metric, ratio, size, latency)
    names = [g.name for g in s.groups]
    most = s.reduction({**base, **{n: 1.0 for n in names}})
    if most < ratio:
        raise YoloCompressError(
            f"prune: cannot remove {ratio:.1%} of the {metric}: pruning every group down to its "
            f"floor removes {most:.1%}")

    if method == "evolve":
        pct, history = evolve({n: np.concatenate(list(s.scores[n].values())) for n in names},
                              s.reduction, lambda p: score(s.keep({**base, **p})), ratio,
                              **(evolve_options or {}))
        return dataclasses.replace(s.result({**base, **pct}), history=history)

    def scaled(t):
        return {**base, **{n: min(1.0, t * base[n]) for n in names}}

    if method == "scale" or s.reduction(base) >= ratio:
        positive = [base[n] for n in names if base[n] > 0]
        if not positive:
            raise YoloCompressError("prune: budget method 'scale' needs a non-zero base percent")
        t_max = 1 / min(positive)
        if s.reduction(scaled(t_max)) < ratio:
            raise YoloCompressError(
                f"prune: scaling the base percents cannot remove {ratio:.1%} of the {metric}; "
                "give every group a non-zero base percent or use method 'greedy'")
        lo, hi = s.bisect(scaled, 0.0, t_max)
        if method == "scale":
            return s.result(scaled(hi))
        base = scaled(lo)                     # greedy goes on from just below the target
    if score is not None:
        return _scored_greedy(s, names, base, score, score_step)
    pct, current = dict(base), s.reduction(base)
    while current < ratio:
        best = None                           # (score lost per cost removed, group, percents)
        for n in names:
            cand = s.next_change(pct, n, step)
            red = s.reduction(cand) if cand else current
            if red > current:
                rate = (s.masks(n, pct[n])[1] - s.masks(n, cand[n])[1]) / (red - current)
                if best is None or rate < best[0]:
                    best = (rate, n, cand, red)
        if best is None:                      # not expected: `most` >= ratio was checked
            raise YoloCompressError(f"prune: no group can be pruned further toward {ratio:.1%}")
        _, n, cand, current = best
        if current >= ratio:
            prev = dict(pct)
            pct = {**prev, n: s.bisect(lambda v: {**prev, n: v}, prev[n], cand[n])[1]}
        else:
            pct = cand
    return s.result(pct)


def _scored_greedy(s: _Search, names: Sequence[str], base: dict[str, float],
                   score: Callable[[Keep], float], score_step: float) -> BudgetResult:
    pct, current = dict(base), s.reduction(base)
    value = score(s.keep(pct))
    while current < s.ratio:
        goal = min(s.ratio, current + score_step)
        best = None                           # (score rise per cost removed, pct, red, value)
        for n in names:
            cand = s.raise_to(pct, n, goal, current)
            if cand is None:
                continue
            red, v = s.reduction(cand), score(s.keep(cand))
            rate = (v - value) / (red - current)
            if best is None or rate < best[0]:
                best = (rate, cand, red, v)
        if best is None:                      # not expected: `most` >= ratio was checked
            raise YoloCompressError(f"prune: no group can be pruned further toward {s.ratio:.1%}")
        _, pct, current, value = best
    return s.result(pct)
