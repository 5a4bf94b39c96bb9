"""Torch-Pruning as a peer baseline for the benchmark (a comparison method, not ours).

`tp_prune(model, flops_reduction, img_size)` prunes a deep copy of a Darknet with Torch-Pruning's
global MetaPruner over the convs `graph.analyze` lets channel pruning slim, bisecting the global
pruning ratio until the Darknet FLOPs (models.profile) drop by `flops_reduction` +- `tolerance`,
and returns an ordinary Darknet (new `filters=`, strict state_dict) plus a JSON-able info dict.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from tqdm import tqdm

from ..errors import YoloCompressError
from ..models.cfg import Block
from ..models.darknet import Darknet
from ..models.profile import profile_summary
from .bisection import bisect
from .graph import analyze

__all__ = ["IMPORTANCES", "tp_prune", "ignored_layers", "rebuild_darknet"]

# Importance name -> factory(torch_pruning module). Both keep Torch-Pruning's defaults: scores are
# averaged over a dependency group (e.g. shortcut-tied convs) and divided by the group's mean
# before the global ranking, as the peer method ships.
IMPORTANCES: dict[str, Callable] = {
    "bn_scale": lambda tp: tp.importance.BNScaleImportance(),           # |BN gamma| (slimming)
    "magnitude": lambda tp: tp.importance.MagnitudeImportance(p=1),     # L1 norm of the filters
}

# Global ratios tried in order until one reaches the target; bisection then runs between it and
# the one before. Not a plain bisection over [0, 1): near ratio 1 the reduction falls again,
# because Torch-Pruning skips whole any group whose every channel falls below the threshold.
_RATIO_GRID = (0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99)


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as e:
        raise YoloCompressError("the Torch-Pruning baseline needs the torch-pruning package "
                                "(pip install torch-pruning)") from e
    return torch_pruning


def _ignored_indices(blocks: list[Block]) -> list[int]:
    graph = analyze(blocks)
    prunable = set(graph.prunable)
    return [i for i in graph.convs if i not in prunable]


def ignored_layers(model: Darknet) -> list[nn.Module]:
    """The conv layers Torch-Pruning must keep whole: every conv graph.EXCLUSION_RULES excludes
    (detection convs, convs before SPP / upsample / grouped routes, ...), so both methods prune
    the same candidate set. Shortcut ties are left to Torch-Pruning's dependency graph."""
    return [model.layers[i] for i in _ignored_indices(model.blocks)]


def _slim_blocks(blocks: list[Block], module: Darknet) -> list[Block]:
    """A copy of `blocks` with each conv's `filters=` set to the module's conv out channels."""
    out = copy.deepcopy(blocks)
    for i, b in enumerate(out[1:]):
        if b.type == "convolutional":
            b.set("filters", module.layers[i].conv.out_channels)
    return out


def rebuild_darknet(pruned: Darknet) -> Darknet:
    """An ordinary Darknet equal to a Darknet whose modules Torch-Pruning slimmed in place (its
    `blocks` still give the old `filters=`): new blocks, the pruned state_dict loaded strictly."""
    model = Darknet(_slim_blocks(pruned.blocks, pruned))
    model.load_state_dict(pruned.state_dict(), strict=True)
    device = next(pruned.parameters()).device
    return model.to(device).train(pruned.training)


def _size(img_size) -> tuple[int, int]:
    hw = (img_size, img_size) if isinstance(img_size, int) else \
        tuple(img_size) if isinstance(img_size, (tuple, list)) else ()
    if len(hw) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                               for v in hw):
        raise YoloCompressError(f"tp_prune: img_size must be a positive int or (h, w), "
                                f"got {img_size!r}")
    return hw


class _Trial:
    """One Torch-Pruning run at a global ratio on a fresh copy of the model."""

    def __init__(self, tp, model: Darknet, importance: str, size: tuple[int, int],
                 round_to: int | None):
        self.tp, self.model, self.importance, self.round_to = tp, model, importance, round_to
        self.ignored = _ignored_indices(model.blocks)
        c = model.net.get_int("channels", 3)
        self.example = torch.zeros(1, c, *size, device=next(model.parameters()).device)
        self.size = size
        self.before = profile_summary(model.blocks, *size)
        self.total_channels = 0          # channels Torch-Pruning ranks (set by the first run)
        self.evaluations = 0

    def __call__(self, ratio: float) -> tuple[float, Darknet]:
        """(FLOPs reduction, pruned copy) at `ratio`."""
        m = copy.deepcopy(self.model).eval()    # eval: tracing must not move BN running stats
        for p in m.parameters():
            p.requires_grad_(True)              # tracing follows grad_fn
        with torch.enable_grad():
            pruner = self.tp.pruner.MetaPruner(
                m, self.example, importance=IMPORTANCES[self.importance](self.tp),
                global_pruning=True, pruning_ratio=ratio, round_to=self.round_to,
                ignored_layers=[m.layers[i] for i in self.ignored],
                forward_fn=lambda module, x: module(x))
        pruner.step()
        self.total_channels = pruner.initial_total_channels
        self.evaluations += 1
        flops = profile_summary(_slim_blocks(m.blocks, m), *self.size)["flops"]
        return 1 - flops / self.before["flops"], m


def _search(trial: _Trial, target: float, tolerance: float) -> tuple[float, float, Darknet]:
    """(ratio, reduction, pruned copy) with |reduction - target| <= tolerance."""
    tried: dict[float, float] = {}
    bar = tqdm(desc="tp_prune", unit="try", disable=None, leave=False)

    def run(ratio):
        red, m = trial(ratio)
        tried[ratio] = red
        bar.update()
        bar.set_postfix(ratio=f"{ratio:.4f}", flops_reduction=f"{red:.3f}")
        return red, m

    try:
        lo, hi = 0.0, None
        for ratio in _RATIO_GRID:
            red, m = run(ratio)
            if abs(red - target) <= tolerance:
                return ratio, red, m
            if red > target:
                hi = ratio
                break
            lo = ratio
        if hi is None:
            best = max(tried, key=tried.get)
            raise YoloCompressError(
                f"tp_prune: cannot remove {target:.1%} of the FLOPs: the most Torch-Pruning "
                f"removed over the {trial.evaluations} ratios tried is {tried[best]:.1%} (ratio "
                f"{best:g}); too few prunable channels")
        resolution = 0.5 / max(trial.total_channels, 1)   # the ratio one ranked channel is worth
        last: dict[str, Darknet] = {}          # the model of the latest run, the one found

        def side(ratio):
            red, last["model"] = run(ratio)
            return 0 if abs(red - target) <= tolerance else -1 if red < target else 1

        _, _, found = bisect(side, lo, hi, resolution)
        if found is not None:
            return found, tried[found], last["model"]
        best = min(tried, key=lambda r: abs(tried[r] - target))
        raise YoloCompressError(
            f"tp_prune: no global ratio removes {target:.1%} +- {tolerance:.1%} of the FLOPs; "
            f"the closest is {tried[best]:.1%} (ratio {best:.5f}); one channel moves the FLOPs "
            "by more than the tolerance there, so raise the tolerance")
    finally:
        bar.close()


def tp_prune(model: Darknet, flops_reduction: float, img_size: int | tuple[int, int],
             importance: str = "bn_scale", tolerance: float = 0.01, round_to: int | None = None,
             ) -> tuple[Darknet, dict]:
    """Prune a copy of `model` with Torch-Pruning so that `flops_reduction` of its FLOPs at
    `img_size` go (within `tolerance`, absolute); the input model is not modified.

    Returns (pruned Darknet, info) with info = {"ratio", "importance", "flops_before",
    "flops_after", "params_before", "params_after", "reduction", "evaluations"}: the global
    pruning ratio found, the totals of models.profile before and after, the FLOPs reduction
    reached and the number of Torch-Pruning runs the search took."""
    if not isinstance(model, Darknet):
        raise YoloCompressError(f"tp_prune: expected a Darknet model, got {type(model).__name__}")
    if not 0 < flops_reduction < 1:
        raise YoloCompressError(
            f"tp_prune: flops_reduction must be in (0, 1), got {flops_reduction}")
    if not 0 < tolerance < 1:
        raise YoloCompressError(f"tp_prune: tolerance must be in (0, 1), got {tolerance}")
    if importance not in IMPORTANCES:
        raise YoloCompressError(f"tp_prune: unknown importance '{importance}' "
                                f"(one of {', '.join(IMPORTANCES)})")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise YoloCompressError(f"tp_prune: round_to must be None or an int >= 1, got {round_to!r}")
    size = _size(img_size)
    trial = _Trial(_torch_pruning(), model, importance, size, round_to)
    ratio, reduction, pruned = _search(trial, flops_reduction, tolerance)
    result = rebuild_darknet(pruned).train(model.training)
    before = trial.before
    after = profile_summary(result.blocks, *size)
    return result, {
        "ratio": float(ratio),
        "importance": importance,
        "flops_before": int(before["flops"]),
        "flops_after": int(after["flops"]),
        "params_before": int(before["params"]),
        "params_after": int(after["params"]),
        "reduction": float(reduction),
        "evaluations": trial.evaluations,
    }
