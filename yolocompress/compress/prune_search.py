"""Stage 2's data-driven pieces, over the pure core (compress.prune) and the calibration passes
(compress.recalibrate):

    cal = Calibrated.from_config(config, train_records, letterbox)
    importance = cal.importance(model, name, seed)     # BN-Taylor takes its gradients here
    score = cal.score(blocks, state, compensate)       # keep -> calibration loss, recalibrated
    losses = cal.unit_losses(blocks, state, units)     # per residual unit removed alone
    pruned = cal.prune_to_budget(model, config, importance, allocation, ratio, compensate)

`cal.full` holds `prune.recalibrate` training images (what every pruned model is recalibrated on),
`cal.search` its first `prune.search_images` (what candidates are recalibrated and scored on and
BN-Taylor's gradients come from): one deterministic subset, read once.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ..config import Config
from ..data.records import Record
from ..models.darknet import Darknet
from .graph import analyze
from .groups import GROUPINGS, group_layers
from .importance import NEEDS_GRADIENTS, Importance, get_importance
from .layer_prune import ResidualUnit, remove_units
from .prune import find_percents_for_budget, prune
from .recalibrate import Calibration, calib_loss, gamma_gradients, recalibrate_bn

__all__ = ["ALLOCATIONS", "Calibrated", "build_pruned"]

# budget allocation -> does the greedy search score candidates on calibration data
ALLOCATIONS = {"importance": False, "loss": True}


def build_pruned(blocks, state, keep, compensate: bool, device: torch.device | str = "cpu"
                 ) -> Darknet:
    """The slim Darknet of prune(blocks, state, keep), loaded strictly."""
    new_blocks, new_state = prune(blocks, state, keep, compensate=compensate)
    model = Darknet(new_blocks)
    model.load_state_dict(new_state, strict=True)
    return model.to(device)


@dataclasses.dataclass(frozen=True)
class Calibrated:
    full: Calibration | None          # None: recalibration off (prune.recalibrate = 0)
    search: Calibration

    @classmethod
    def from_config(cls, config: Config, train: Sequence[Record], letterbox: bool) -> Calibrated:
        pc, size = config.prune, config.model.img_size
        n = max(pc.recalibrate, pc.search_images)
        cal = Calibration.from_records(train, n, size, letterbox, config.eval.batch_size)
        return cls(cal.head(pc.recalibrate) if pc.recalibrate else None,
                   cal.head(pc.search_images))

    def recalibrate(self, model: Darknet) -> Darknet:
        return recalibrate_bn(model, self.full) if self.full is not None else model

    def importance(self, model: Darknet, name: str, seed: int = 0) -> Importance:
        gradients = None
        if name in NEEDS_GRADIENTS:
            gradients = gamma_gradients(model, self.search, analyze(model.blocks).prunable)
        return get_importance(name, seed, gradients)

    def score(self, blocks, state, compensate: bool, device: torch.device | str = "cpu"
              ) -> Callable:
        """keep -> calibration loss of the pruned model after recalibrating it on `search`."""
        def loss(keep) -> float:
            m = build_pruned(blocks, state, keep, compensate, device)
            return calib_loss(recalibrate_bn(m, self.search), self.search)
        return loss

    def unit_losses(self, blocks, state, units: Sequence[ResidualUnit]) -> list[float]:
        """Per residual unit: the calibration loss of the model with that unit alone removed,
        recalibrated on `search` (layer pruning's `loss` importance; lower = less needed)."""
        out = []
        for u in tqdm(units, desc="unit losses", leave=False):
            new_blocks, new_state = remove_units(blocks, state, [u])
            m = Darknet(new_blocks)
            m.load_state_dict(new_state, strict=True)
            out.append(calib_loss(recalibrate_bn(m, self.search), self.search))
        return out

    def prune_to_budget(self, model: Darknet, config: Config, importance: str, allocation: str,
                        ratio: float, compensate: bool, metric: str = "flops") -> Darknet:
        """The model pruned by the greedy budget search from zero percents (not recalibrated):
        the prune section's floors, grouping and score_step, `importance` and `allocation`."""
        pc, size = config.prune, config.model.img_size
        blocks, state = model.blocks, model.state_dict()
        groups = group_layers(blocks, rules=GROUPINGS[pc.grouping])
        scored = self.score(blocks, state, compensate) if ALLOCATIONS[allocation] else None
        res = find_percents_for_budget(
            blocks, state, groups, [0.0] * len(groups), (metric, ratio), size=(size, size),
            min_keep=pc.min_keep, min_channels=pc.min_channels, round_to=pc.round_to,
            merge=pc.merge, importance=self.importance(model, importance, config.train.seed),
            score=scored, score_step=pc.score_step)
        return build_pruned(blocks, state, res.keep, compensate)
