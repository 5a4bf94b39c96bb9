"""Channel importance: a callable `(state, layers) -> {conv: per-output-channel scores}`.

`state` is a Darknet state_dict (or the model itself); `layers` a Group or an iterable of conv
indices. Higher scores mean more important. `bn_gamma_abs` (|BN gamma|, network slimming),
`bn_gamma_norm` (|gamma| divided by the mean |gamma| of its layer, so layers of different scale
compare, as Torch-Pruning normalises by group), `bn_gamma_rank` (its rank within the layer, so
a common threshold cuts every layer by the same share), `l1_filter` / `l2_filter` (L1 / L2 norm of each
filter, Li et al. 2017), `BNTaylor(sums)` (|gamma * dL/dgamma| summed over calibration batches,
Molchanov et al. 2019: the data pass is compress.recalibrate.gamma_gradients, so this module
stays pure) and `RandomImportance(seed)` (a baseline) plug into pruning unchanged;
`IMPORTANCES` names them. Scores are per conv: shortcut-tied
convs are scored separately and pruning merges their masks; `tied_scores` combines scores over a
tied set (their mean) where one ranking of the set's channels is needed.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
import torch
from torch import nn

from ..errors import YoloCompressError

__all__ = ["Importance", "BNGammaAbs", "BNGammaNorm", "BNGammaRank", "L1Filter", "L2Filter", "BNTaylor",
           "RandomImportance", "bn_gamma_abs", "l1_filter", "IMPORTANCES", "NEEDS_GRADIENTS",
           "get_importance", "tied_scores", "state_of"]


class Importance(Protocol):
    name: str

    def __call__(self, state, layers) -> dict[int, np.ndarray]: ...


def state_of(state: Mapping[str, torch.Tensor] | nn.Module) -> Mapping[str, torch.Tensor]:
    """The state_dict of a model, or the mapping itself."""
    return state.state_dict() if isinstance(state, nn.Module) else state


def _convs(layers) -> list[int]:
    return list(getattr(layers, "layers", layers))


def _tensor(state: Mapping[str, torch.Tensor], key: str) -> np.ndarray:
    if key not in state:
        raise YoloCompressError(f"state_dict has no '{key}' (is it the state of this cfg, and "
                                "does the conv have batch_normalize=1?)")
    return state[key].detach().cpu().double().numpy()


class BNGammaAbs:
    """|gamma| of each conv's BatchNorm: what sparse training drives to zero."""
    name = "bn_gamma_abs"

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        sd = state_of(state)
        return {c: np.abs(_tensor(sd, f"layers.{c}.bn.weight")) for c in _convs(layers)}


class BNGammaNorm:
    """|gamma| / mean |gamma| of the conv's layer (1 everywhere for an all-zero layer)."""
    name = "bn_gamma_norm"

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        out = {}
        for c, g in bn_gamma_abs(state, layers).items():
            mean = g.mean() if g.size else 0.0
            out[c] = g / mean if mean > 0 else np.ones_like(g)
        return out


class BNGammaRank:
    """The rank of |gamma| within the conv's layer, scaled to (0, 1]: (rank + 1) / n, ties by
    channel index. One common threshold then keeps the same share of every layer (a uniform
    width cut, the allocation FBS and uniform-scaling baselines use), each layer dropping its
    lowest-|gamma| channels."""
    name = "bn_gamma_rank"

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        out = {}
        for c, g in bn_gamma_abs(state, layers).items():
            rank = np.empty(g.size)
            rank[np.argsort(g, kind="stable")] = np.arange(1, g.size + 1)
            out[c] = rank / max(g.size, 1)
        return out


class _FilterNorm:
    """The p-norm of each output filter of the conv (over in channels x kernel)."""
    p = 1

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        sd = state_of(state)
        out = {}
        for c in _convs(layers):
            w = _tensor(sd, f"layers.{c}.conv.weight")
            out[c] = np.linalg.norm(w.reshape(w.shape[0], -1), ord=self.p, axis=1)
        return out


class L1Filter(_FilterNorm):
    """Sum of |w| over each output filter of the conv (in channels x kernel)."""
    name, p = "l1_filter", 1


class L2Filter(_FilterNorm):
    """sqrt(sum of w^2) over each output filter of the conv."""
    name, p = "l2_filter", 2


class BNTaylor:
    """Precomputed {conv: sum over batches of |gamma * dL/dgamma|}; the state is not read."""
    name = "bn_taylor"

    def __init__(self, sums: Mapping[int, np.ndarray]):
        self.sums = {int(c): np.asarray(v, dtype=np.float64) for c, v in sums.items()}

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        missing = [c for c in _convs(layers) if c not in self.sums]
        if missing:
            raise YoloCompressError(f"BN-Taylor: no gradients for convs {missing}")
        return {c: self.sums[c] for c in _convs(layers)}


class RandomImportance:
    """Uniform random scores, reproducible per (seed, conv): a baseline for the others."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.name = f"random(seed={self.seed})"

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        sd = state_of(state)
        return {c: np.random.default_rng([self.seed, c]).random(
                    _tensor(sd, f"layers.{c}.conv.weight").shape[0]) for c in _convs(layers)}


bn_gamma_abs = BNGammaAbs()
l1_filter = L1Filter()

IMPORTANCES = {"bn_gamma_abs": BNGammaAbs, "bn_gamma_norm": BNGammaNorm,
               "bn_gamma_rank": BNGammaRank, "l1_filter": L1Filter,
               "l2_filter": L2Filter, "bn_taylor": BNTaylor, "random": RandomImportance}
NEEDS_GRADIENTS = frozenset({"bn_taylor"})     # built from gamma_gradients' sums


def get_importance(name: str, seed: int = 0,
                   gradients: Mapping[int, np.ndarray] | None = None) -> Importance:
    """An importance by name; `seed` is used by "random" only, `gradients` (gamma_gradients'
    sums) by "bn_taylor" only, which needs them."""
    if name not in IMPORTANCES:
        raise YoloCompressError(f"unknown importance '{name}' (one of {', '.join(IMPORTANCES)})")
    if name in NEEDS_GRADIENTS:
        if gradients is None:
            raise YoloCompressError(f"importance '{name}' needs gamma gradients of calibration "
                                    "data")
        return IMPORTANCES[name](gradients)
    return IMPORTANCES[name](seed) if name == "random" else IMPORTANCES[name]()


def tied_scores(scores: Mapping[int, np.ndarray], members: Iterable[int]) -> np.ndarray:
    """One score per channel of a shortcut-tied set: the mean over its convs."""
    return np.mean([scores[c] for c in sorted(members)], axis=0)
