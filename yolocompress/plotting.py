"""Matplotlib without pyplot (no global state, no display): a new figure and an atomic save."""
from __future__ import annotations

import io
import os
from pathlib import Path

from .errors import YoloCompressError
from .fileio import atomic_open

__all__ = ["new_figure", "save_figure"]


def new_figure(width: float, height: float, constrained: bool = True):
    """A matplotlib Figure on the Agg canvas, `width` x `height` inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained" if constrained else None)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | os.PathLike, dpi: int = 100, **kw) -> Path:
    """Write `fig` to `path` atomically, the format from the suffix (.png, .pdf, .svg)."""
    ext = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if not ext:
        raise YoloCompressError(f"{path}: give the plot a file suffix (.png, .pdf, .svg)")
    buf = io.BytesIO()
    fig.savefig(buf, format=ext, dpi=dpi, **kw)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return Path(path)
