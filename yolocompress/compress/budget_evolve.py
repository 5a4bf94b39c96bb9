"""Accuracy-driven budget allocation: a (1 + lambda) evolution strategy over group thresholds.

    pct, history = evolve(scores, reduction, score, ratio, rounds=48, population=8)

Each group's threshold is t * m_g on its own (sorted, flattened) importance scores: m = 1
everywhere is one common threshold (what a global ranking of normalised |gamma| does, e.g.
Torch-Pruning's), and t is bisected for every candidate so that its percents remove `ratio` of
the metric. The search starts at m = 1, mutates log m by `sigma` * N(0, 1) per group, keeps the
best of each generation if it beats the parent (lower `score`, e.g. the calibration loss of the
pruned, recalibrated model), and stops after `rounds` scored candidates. Seeded: the same inputs
give the same result. Percents are the share of each group's scores below its threshold, so a
group's mask is exactly "score >= threshold" (compress.prune.group_thresholds).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from tqdm import tqdm

from ..errors import YoloCompressError
from .bisection import bisect

__all__ = ["evolve", "percents_at"]


def percents_at(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float]
                ) -> dict[str, float]:
    """{group: share of its (sorted) scores strictly below its threshold}."""
    return {g: float(np.searchsorted(s, thresholds[g], side="left")) / s.size
            for g, s in scores.items()}


def _on_budget(scores, reduction, ratio, mult) -> dict[str, float]:
    """The percents of thresholds t * mult with the least t (to 1e-9 relative) reaching `ratio`."""
    hi = max(float(s[-1]) / mult[g] for g, s in scores.items()) * (1 + 1e-9) + 1e-12

    def at(t):
        return percents_at(scores, {g: t * mult[g] for g in scores})

    if reduction(at(hi)) < ratio:
        raise YoloCompressError(f"prune: cannot remove {ratio:.1%}: pruning every group down to "
                                "its floor does not")
    _, t, _ = bisect(lambda t: 1 if reduction(at(t)) >= ratio else -1, 0.0, hi, hi * 1e-9)
    return at(t)


def evolve(scores: Mapping[str, np.ndarray], reduction: Callable[[dict[str, float]], float],
           score: Callable[[dict[str, float]], float], ratio: float, rounds: int = 48,
           population: int = 8, sigma: float = 0.3, seed: int = 0
           ) -> tuple[dict[str, float], list[dict]]:
    """(percents of the best candidate, one {"generation", "score", "percents"} per scored
    candidate, the start first). `scores`: {group: its importance scores, any order}."""
    if rounds < 1 or population < 1 or sigma <= 0:
        raise YoloCompressError(f"prune: evolve needs rounds >= 1, population >= 1 and sigma > 0, "
                                f"got {rounds}, {population}, {sigma}")
    flat = {g: np.sort(np.asarray(s, dtype=np.float64).ravel()) for g, s in scores.items()}
    flat = {g: s for g, s in flat.items() if s.size}
    rng = np.random.default_rng(seed)
    names = sorted(flat)
    mult = {g: 1.0 for g in names}
    best_pct = _on_budget(flat, reduction, ratio, mult)
    best = score(best_pct)
    history = [{"generation": 0, "score": best, "percents": best_pct}]
    bar = tqdm(total=rounds, desc="evolve", unit="cand", disable=None, leave=False)
    generation = 0
    try:
        while len(history) < rounds:
            generation += 1
            children = []
            for _ in range(min(population, rounds - len(history))):
                m = {g: mult[g] * float(np.exp(sigma * rng.standard_normal())) for g in names}
                pct = _on_budget(flat, reduction, ratio, m)
                value = score(pct)
                history.append({"generation": generation, "score": value, "percents": pct})
                children.append((value, m, pct))
                bar.update()
                bar.set_postfix(best=f"{min(best, value):.4g}")
            value, m, pct = min(children, key=lambda c: c[0])
            if value < best:
                best, mult, best_pct = value, m, pct
    finally:
        bar.close()
    return best_pct, history
