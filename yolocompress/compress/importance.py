"""Channel importance: a callable `(state, layers) -> {conv: per-output-channel scores}`.

`state` is a Darknet state_dict (or the model itself); `layers` a Group or an iterable of conv
indices. Higher scores mean more important. `bn_gamma_abs` (|BN gamma|, network slimming, the
default), `l1_filter` (L1 norm of each filter, Li et al. 2017) and `RandomImportance(seed)` (a
baseline) plug into pruning unchanged; `IMPORTANCES` names them. Scores are per conv: shortcut-tied
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

__all__ = ["Importance", "BNGammaAbs", "L1Filter", "RandomImportance", "bn_gamma_abs",
           "l1_filter", "IMPORTANCES", "get_importance", "tied_scores", "state_of"]


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


class L1Filter:
    """Sum of |w| over each output filter of the conv (in channels x kernel)."""
    name = "l1_filter"

    def __call__(self, state, layers: Iterable[int]) -> dict[int, np.ndarray]:
        sd = state_of(state)
        out = {}
        for c in _convs(layers):
            w = _tensor(sd, f"layers.{c}.conv.weight")
            out[c] = np.abs(w).reshape(w.shape[0], -1).sum(axis=1)
        return out


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

IMPORTANCES = {"bn_gamma_abs": BNGammaAbs, "l1_filter": L1Filter, "random": RandomImportance}


def get_importance(name: str, seed: int = 0) -> Importance:
    """An importance by name; `seed` is used by "random" only."""
    if name not in IMPORTANCES:
        raise YoloCompressError(f"unknown importance '{name}' (one of {', '.join(IMPORTANCES)})")
    return IMPORTANCES[name](seed) if name == "random" else IMPORTANCES[name]()


def tied_scores(scores: Mapping[int, np.ndarray], members: Iterable[int]) -> np.ndarray:
    """One score per channel of a shortcut-tied set: the mean over its convs."""
    return np.mean([scores[c] for c in sorted(members)], axis=0)
