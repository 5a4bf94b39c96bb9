"""Stage 2's data-driven pieces, over the pure core (compress.prune) and the calibration passes
(compress.recalibrate):

    cal = Calibrated.from_config(config, train_records, letterbox, names)
    importance = cal.importance(model, name, seed)     # BN-Taylor takes its gradients here
    score = cal.score(blocks, state, compensate, "loss")   # keep -> loss (or -mAP), recalibrated
    losses = cal.unit_losses(blocks, state, units)         # per residual unit removed alone
    pruned, keep = cal.prune_to_budget(model, config, ratio)   # the prune section's budget search
    records = cal.reconstruct(model, pruned, keep)         # convs refitted to the model's outputs

`cal.full` holds `prune.recalibrate` training images (what every pruned model is recalibrated on),
`cal.search` its first `prune.search_images` (what candidates are recalibrated and scored on and
BN-Taylor's gradients come from), `cal.rebuild` its first `prune.reconstruct` (what the convs
are refitted on; None when off): one deterministic subset, read once.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from ..config import Config
from ..data.records import Record
from ..errors import YoloCompressError
from ..eval.evaluate import METRIC_KEYS, ModelEvaluator, evaluate_model
from ..models.darknet import Darknet
from .graph import analyze
from .groups import GROUPINGS, group_layers
from .importance import NEEDS_GRADIENTS, Importance, get_importance
from .layer_prune import ResidualUnit, remove_units
from .prune import find_percents_for_budget, prune
from .reconstruct import reconstruct
from .recalibrate import Calibration, calib_loss, gamma_gradients, recalibrate_bn

__all__ = ["ALLOCATIONS", "Calibrated", "budget_options", "build_pruned", "latency_table"]

# budget allocation -> does the search score candidates on calibration data
ALLOCATIONS = {"importance": False, "loss": True, "map": True}


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
    evaluator: ModelEvaluator | None = None   # allocation "map": scores on search.records
    rebuild: Calibration | None = None        # None: reconstruction off (prune.reconstruct = 0)

    @classmethod
    def from_config(cls, config: Config, train: Sequence[Record], letterbox: bool,
                    names: Sequence[str]) -> Calibrated:
        pc, size = config.prune, config.model.img_size
        n = max(pc.recalibrate, pc.search_images, pc.reconstruct)
        cal = Calibration.from_records(train, n, size, letterbox, config.eval.batch_size)
        return cls(cal.head(pc.recalibrate) if pc.recalibrate else None,
                   cal.head(pc.search_images),
                   dataclasses.replace(ModelEvaluator.from_config(config, names, letterbox),
                                       workers=0),
                   cal.head(pc.reconstruct) if pc.reconstruct else None)

    def recalibrate(self, model: Darknet) -> Darknet:
        return recalibrate_bn(model, self.full) if self.full is not None else model

    def reconstruct(self, reference: Darknet, pruned: Darknet, keep) -> list[dict]:
        """`pruned`'s convs refitted in place to `reference` (the model it was pruned from, left
        as it is; its outputs with BN recalibrated on `full`, when on) on `rebuild`; the per-conv
        records, [] when off."""
        if self.rebuild is None:
            return []
        ref = self.recalibrate(copy.deepcopy(reference))
        return reconstruct(ref, pruned, keep, self.rebuild)

    def importance(self, model: Darknet, name: str, seed: int = 0) -> Importance:
        gradients = None
        if name in NEEDS_GRADIENTS:
            gradients = gamma_gradients(model, self.search, analyze(model.blocks).prunable)
        return get_importance(name, seed, gradients)

    def score(self, blocks, state, compensate: bool, allocation: str = "loss",
              device: torch.device | str = "cpu") -> Callable:
        """keep -> the pruned model's calibration loss ("loss") or minus its mAP (the experiment's
        eval.metric, "map") on the search images, after recalibrating it on them: lower is
        better."""
        if not ALLOCATIONS.get(allocation):
            raise YoloCompressError(f"prune: allocation '{allocation}' scores no candidates")
        if allocation == "map" and (self.evaluator is None or not self.search.records):
            raise YoloCompressError("prune: allocation 'map' needs the search images' records")

        def value(keep) -> float:
            m = recalibrate_bn(build_pruned(blocks, state, keep, compensate, device), self.search)
            if allocation == "loss":
                return calib_loss(m, self.search)
            return -evaluate_model(m, self.search.records, self.evaluator,
                                   progress=False)[METRIC_KEYS[self.evaluator.metric]]
        return value

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

    def prune_to_budget(self, model: Darknet, config: Config, ratio: float,
                        metric: str = "flops") -> tuple[Darknet, dict]:
        """(the model pruned to `ratio` of `metric` by the prune section's budget search from
        zero percents, reconstructed when `prune.reconstruct` is on (not recalibrated), the
        kept channels per conv)."""
        pc = config.prune
        blocks, state = model.blocks, model.state_dict()
        groups = group_layers(blocks, rules=GROUPINGS[pc.grouping])
        res = find_percents_for_budget(
            blocks, state, groups, [0.0] * len(groups), (metric, ratio),
            **budget_options(config, self, blocks, state,
                             self.importance(model, pc.importance, config.train.seed)))
        pruned = build_pruned(blocks, state, res.keep, pc.compensate)
        if pc.reconstruct:
            if self.rebuild is None:
                raise YoloCompressError("prune.reconstruct is on but the calibration subset was "
                                        "read without it (Calibrated.from_config of a config "
                                        "with prune.reconstruct > 0)")
            self.reconstruct(model, pruned, res.keep)
        return pruned, res.keep


def latency_table(config: Config, blocks):
    """The cached latency table of the prune section's backend and threads (batch 1) at the
    experiment's input size, measured on first use."""
    from ..fileio import user_cache_dir
    from .latency_table import load_or_measure

    size, pc = config.model.img_size, config.prune
    return load_or_measure(blocks, (size, size), user_cache_dir() / "latency",
                           pc.latency_backend, pc.latency_threads, 1)


def budget_options(config: Config, cal: Calibrated | None, blocks, state, importance: Importance
                   ) -> dict:
    """find_percents_for_budget's keyword arguments from the prune section; a latency budget
    measures or loads the latency table. Without calibration data (`cal` None: the sparse stage's
    estimate of the plan) a scored allocation becomes its unscored version: greedy by importance,
    or the evolution's start (one common threshold)."""
    pc, size = config.prune, config.model.img_size
    rounds, score = pc.search_rounds, None
    if ALLOCATIONS[pc.allocation] and pc.budget_method != "scale":
        if cal is not None:
            score = cal.score(blocks, state, pc.compensate, pc.allocation)
        elif pc.budget_method == "evolve":
            rounds, score = 1, (lambda keep: 0.0)
    return dict(method=pc.budget_method, size=(size, size), min_keep=pc.min_keep,
                min_channels=pc.min_channels, round_to=pc.round_to, merge=pc.merge,
                importance=importance, score_step=pc.score_step, score=score,
                evolve_options=dict(rounds=rounds, seed=config.train.seed),
                latency=latency_table(config, blocks) if pc.budget_target == "latency" else None)
