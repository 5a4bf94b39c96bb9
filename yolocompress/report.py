"""Stage reports: markdown and PNG plots, written atomically.

Pruning (stage 2): `plot_channels_kept` (filters before/after per pruned layer, coloured by
group), `plot_gamma_thresholds` (each group's importance distribution with its threshold),
`prune_summary_rows` and `prune_report_markdown` over the metrics dict `compress.prune_stage`
writes to metrics.json (its layout is documented in that module).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .errors import YoloCompressError
from .plotting import new_figure, save_figure

__all__ = ["plot_channels_kept", "plot_gamma_thresholds", "prune_summary_rows",
           "prune_report_markdown"]


def plot_channels_kept(layers: Sequence[Mapping], png_path: str | os.PathLike) -> Path:
    """Bar chart of `filters_before` (pale) and `filters_after` (solid, group colour) for each
    row {"name", "group", "filters_before", "filters_after"} with a group, in the given order."""
    rows = [r for r in layers if r.get("group")]
    if not rows:
        raise YoloCompressError(f"{png_path}: no pruned layer to plot")
    groups = list(dict.fromkeys(r["group"] for r in rows))
    colours = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    x = np.arange(len(rows))
    fig = new_figure(max(7.0, 0.12 * len(rows) + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x, [r["filters_before"] for r in rows], color="0.85", width=0.8, label="before")
    for g in groups:
        idx = [i for i, r in enumerate(rows) if r["group"] == g]
        ax.bar(x[idx], [rows[i]["filters_after"] for i in idx], color=colours[g], width=0.8,
               label=f"{g} kept")
    step = max(1, len(rows) // 40)          # at most ~40 readable tick labels
    ax.set_xticks(x[::step], [r["name"] for r in rows][::step], rotation=90, fontsize=7)
    ax.set_ylabel("filters")
    ax.set_yscale("log")
    ax.set_title("Channels kept per pruned layer")
    ax.legend(fontsize=8, ncol=min(6, len(groups) + 1))
    return save_figure(fig, png_path)


def plot_gamma_thresholds(scores: Mapping[str, np.ndarray], thresholds: Mapping[str, float | None],
                          png_path: str | os.PathLike, percents: Mapping[str, float] | None = None,
                          label: str = "|γ|") -> Path:
    """One histogram per group of its channel scores (log axis; zeros and tiny values in the
    first bin) with its threshold as a red line (none when the threshold is None: empty group
    or percent 1)."""
    names = [n for n, s in scores.items() if np.size(s)]
    if not names:
        raise YoloCompressError(f"{png_path}: no group has scores to plot")
    missing = [n for n in names if n not in thresholds]
    if missing:
        raise YoloCompressError(f"{png_path}: no threshold for group {missing[0]}")
    flat = {n: np.abs(np.ravel(scores[n]).astype(float)) for n in names}
    top = max(float(v.max()) for v in flat.values())
    positive = [float(v[v > 0].min()) for v in flat.values() if (v > 0).any()]
    lo = max(min(positive) if positive else 1e-6, top * 1e-6, 1e-12)
    hi = max(top, lo * 10) * 1.05
    edges = np.geomspace(lo, hi, 50)
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    from matplotlib.ticker import NullFormatter

    fig = new_figure(4.0 * cols, 3.0 * rows)
    for k, n in enumerate(names):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.hist(np.clip(flat[n], lo, hi), bins=edges, color="C0")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())    # minor labels overlap on short ranges
        thr = thresholds[n]
        title = f"{n} ({flat[n].size} channels)"
        if percents and n in percents:
            title += f", p = {percents[n]:.3g}"
        if thr is not None and math.isfinite(thr):
            ax.axvline(max(thr, lo), color="red", linestyle="--", linewidth=1.2,
                       label=f"threshold {thr:.3g}")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(f"{label} (first bin: everything below)", fontsize=8)
        ax.set_ylabel("channels", fontsize=8)
    return save_figure(fig, png_path)


def _change(before: float, after: float) -> str:
    return f"{after / before - 1:+.1%}" if before else "n/a"


def prune_summary_rows(metrics: Mapping) -> list[tuple[str, str, str, str]]:
    """(quantity, before, after, change) rows: params, BFLOPs, the headline mAP (after: the
    saved model, BN-recalibrated where the run did; plus rows for the other compensation
    setting and for the saved one not recalibrated or, where the run reconstructed, not
    reconstructed), CPU latency per batch size."""
    b, a = metrics["before"], metrics["after"]
    key = metrics["metric_key"]
    rows = [("params", f"{b['params']:,}", f"{a['params']:,}", _change(b["params"], a["params"])),
            ("BFLOPs", f"{b['flops'] / 1e9:.3f}", f"{a['flops'] / 1e9:.3f}",
             _change(b["flops"], a["flops"]))]
    if metrics.get("units"):
        rows.append(("layers (residual units removed)", str(b["layers"]), str(a["layers"]),
                     f"-{len(metrics['units'])} units"))
    if key in b:
        comp = metrics["compensation"]
        on = "on" if metrics["settings"]["compensate"] else "off"
        other = "off" if on == "on" else "on"
        rows.append((f"{key} (compensation {on})", f"{b[key]:.4f}", f"{comp[on][key]:.4f}",
                     f"{comp[on][key] - b[key]:+.4f}"))
        rows.append((f"{key} (compensation {other})", "", f"{comp[other][key]:.4f}",
                     f"{comp[other][key] - b[key]:+.4f}"))
        recal = metrics.get("recalibration") or {}
        if recal.get("images"):
            rows.append((f"{key} (compensation {on}, BN not recalibrated)", "",
                         f"{recal['off'][key]:.4f}", f"{recal['off'][key] - b[key]:+.4f}"))
        rec = metrics.get("reconstruction") or {}
        if rec.get("images"):
            rows.append((f"{key} (compensation {on}, not reconstructed)", "",
                         f"{rec['off'][key]:.4f}", f"{rec['off'][key] - b[key]:+.4f}"))
    for lat in metrics.get("latency", []):
        tb, ta = lat["before"]["ms_median"], lat["after"]["ms_median"]
        rows.append((f"CPU latency b{lat['batch']} (ms, median)", f"{tb:.2f}", f"{ta:.2f}",
                     f"{_change(tb, ta)} (x{tb / ta:.2f})"))
    return rows


def _table(header: Sequence[str], rows: Sequence[Sequence], align: str) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if c == "r" else "---" for c in align) + "|"]
    out += ["| " + " | ".join(str(v) for v in r) + " |" for r in rows]
    return out


def prune_report_markdown(metrics: Mapping, plots: Mapping[str, str] | None = None) -> str:
    """report.md for a pruning run: settings, summary, per-group and per-layer tables, and the
    plots ({caption: file name relative to the report})."""
    s = metrics["settings"]
    t = metrics["seconds"]
    lines = [f"# Pruning report: {metrics['artifact']}", "",
             f"From `{metrics['source']}` (stage {metrics['source_stage']}) at "
             f"{metrics['img_size']}x{metrics['img_size']} px. Importance {s['importance']}, "
             f"tied-set merge {s['merge']}, per-layer floor max({s['min_keep']:g} x filters, "
             f"{s['min_channels']}), kept counts rounded to a multiple of {s['round_to']}, "
             f"compensation {'on' if s['compensate'] else 'off'}. Masks chosen in "
             f"{t['masks']:.2f} s, model rebuilt in {t['prune']:.2f} s."]
    if s.get("reconstruct"):
        lines[-1] += (f" Convs refitted to the unpruned model's outputs on {s['reconstruct']} "
                      f"training images in {t['reconstruct']:.1f} s.")
    budget = metrics.get("budget")
    if budget:
        lines += ["", f"Budget mode: remove {budget['target']:.1%} of the {budget['metric']} "
                      f"({budget['method']}); reached {budget['reduction']:.2%} after "
                      f"{budget['evaluations']} cost evaluations."]
    units = metrics.get("units") or []
    if units:
        lines += ["", f"Layer pruning: {len(units)} residual units removed before the channels "
                      f"(lowest {s.get('layer_importance', 'bn_gamma_mean')} first); layer "
                      "names below are the pruned cfg's, these the source's:", ""]
        lines += _table(("shortcut", "input", "convs", "stride", "part", "score"),
                        [(u["shortcut"], u["input"], ", ".join(u["convs"]), u["stride"],
                          u["part"], "-" if u["score"] is None else f"{u['score']:.4g}")
                         for u in units], "lllrlr")
    lines += ["", "## Summary", ""]
    lines += _table(("", "before", "after", "change"), prune_summary_rows(metrics), "lrrr")
    lines += ["", "## Groups", ""]
    lines += _table(
        ("group", "layers", "percent", "threshold", "channels", "params", "MFLOPs"),
        [(f"{g['name']}: {g['title']}", g["layers"], f"{g['percent']:.4g}",
          "-" if g["threshold"] is None else f"{g['threshold']:.4g}",
          f"{g['channels_before']} -> {g['channels_after']}",
          f"{g['params_before']:,} -> {g['params_after']:,}",
          f"{g['flops_before'] / 1e6:.1f} -> {g['flops_after'] / 1e6:.1f}")
         for g in metrics["groups"]], "lrrrrrr")
    lines += ["", "Threshold: channels scoring below it are pruned (before the per-layer floor); "
                  "'-' for an empty group or percent 1."]
    for caption, name in (plots or {}).items():
        lines += ["", f"![{caption}]({name})"]
    lines += ["", "## Layers", "", "The groups' convs, and every other conv whose params or FLOPs "
                                     "changed (group '-': its inputs were pruned).", ""]
    lines += _table(
        ("layer", "group", "filters", "params", "MFLOPs"),
        [(r["name"], r["group"] or "-", f"{r['filters_before']} -> {r['filters_after']}",
          f"{r['params_before']:,} -> {r['params_after']:,}",
          f"{r['flops_before'] / 1e6:.2f} -> {r['flops_after'] / 1e6:.2f}")
         for r in metrics["layers"]], "llrrr")
    return "\n".join(lines) + "\n"
