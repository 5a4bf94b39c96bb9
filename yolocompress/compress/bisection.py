"""One bisection for every budget search (compress.prune's percents, compress.tp_baseline's ratio).

    lo, hi, found = bisect(test, lo, hi, resolution)

`test(x)` compares what x gives with the target: < 0 below it (x becomes lo), > 0 at or past it
(x becomes hi), 0 close enough (the search stops and returns x as `found`). The caller knows
test(lo) < 0 and test(hi) > 0; neither end is evaluated. Midpoints are (lo + hi) / 2 until
hi - lo <= resolution; `found` is None when no test returned 0.
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["bisect"]


def bisect(test: Callable[[float], int], lo: float, hi: float, resolution: float
           ) -> tuple[float, float, float | None]:
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        side = test(mid)
        if side == 0:
            return lo, hi, mid
        if side < 0:
            lo = mid
        else:
            hi = mid
    return lo, hi, None
