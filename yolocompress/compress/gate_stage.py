"""`yolocompress gate`: FBS dynamic channel gating as a training stage -- `build_gate` gates the
starting model (compress/gating.py: the prunable convs, densities per pruning group), adds the L1
term on the saliencies ("gate") to the detection loss and a `GateLogHook`; train.run trains it.

The artifact gets stage `gated`, the starting artifact as parent and a `gating` record {sets:
[{convs, group, density}], l1} (artifacts.build_model rebuilds the gated model from it). After
training, `measure_gated` runs best.pt over the val split: executed MACs per image (mean, sd,
range, each image's) and each gate's channel usage, written to `gate_macs.json` (with the
artifact's sha256: remeasured only when best.pt changed) and plotted as `channel_usage.png`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..artifacts import build_model, file_sha256, load_artifact
from ..config import Config
from ..data.dataset import DetectionDataset, build_loader
from ..data.records import Record
from ..errors import YoloCompressError
from ..fileio import atomic_open
from ..models.darknet import Darknet
from ..plotting import new_figure, save_figure
from ..train.engine import HookBase
from ..train.run import (DataSplits, StageParts, initial_model, load_data, stage_dir, train_built,
                         uses_letterbox, with_stage_budget)
from .gating import apply_gating, count_macs, gate_penalty, gate_plan, gated_convs
from .groups import GROUPS

__all__ = ["build_gate", "run_gate", "GateLogHook", "measure_gated", "switching", "plot_usage",
           "command", "MACS_JSON", "USAGE_PNG", "SWITCHING"]

MACS_JSON = "gate_macs.json"
USAGE_PNG = "channel_usage.png"


class GateLogHook(HookBase):
    """Epoch means of the saliencies into trainer.storage, for LoggerHook's CSV / TensorBoard:
    "gate/g_mean" (mean g over gates, channels and images) and "gate/g_zero" (share of g = 0,
    channels the L1 term switched off)::

        after_backward(): sums += (mean g, share g == 0) of the micro-batch's forward
        after_epoch():    storage["gate/..."] = sums / count; reset
    """

    priority = 60

    def __init__(self) -> None:
        self._sums = torch.zeros(2)
        self._count = 0

    def after_backward(self) -> None:
        gs = [m.gate_ref.last[1].detach() for m in gated_convs(self.trainer.model)]
        if gs:
            g = torch.cat([x.flatten() for x in gs]).float().cpu()
            self._sums += torch.stack([g.mean(), (g == 0).float().mean()])
            self._count += 1

    def after_epoch(self) -> None:
        if self._count:
            mean, zero = (self._sums / self._count).tolist()
            self.trainer.storage["gate/g_mean"] = mean
            self.trainer.storage["gate/g_zero"] = zero
        self._sums, self._count = torch.zeros(2), 0


def _group_densities(config: Config) -> dict[str, float]:
    d = config.gate.densities
    if d and len(d) != len(GROUPS):
        raise YoloCompressError(f"{config.source or 'config'}: gate.densities has {len(d)} "
                                f"values; give one per pruning group ({', '.join(g.name for g in GROUPS)}) "
                                f"or none")
    return {g.name: v for g, v in zip(GROUPS, d)}


def build_gate(config: Config, data: DataSplits,
               from_artifact: str | os.PathLike | None = None) -> tuple[Config, StageParts]:
    """The gate stage's config (its budget) and parts: the gated model, criterion, log hook."""
    if from_artifact is not None:
        path = Path(from_artifact)
        if path.suffix != ".pt":
            raise YoloCompressError(f"{path}: --from takes an artifact (.pt)")
        if not path.is_file():
            raise YoloCompressError(f"{path}: no such artifact file")
        config = dataclasses.replace(config, model=dataclasses.replace(
            config.model, weights=str(path.resolve())))
    config = with_stage_budget(config, config.gate, len(data.train))
    model, parent = initial_model(config, data.names, "gated")
    record = gate_plan(model.blocks, config.gate.density, _group_densities(config))
    apply_gating(model, record, source=config.source or "config")
    l1 = config.gate.l1

    def wrap(criterion):
        def gated(m, batch):
            terms = dict(criterion(m, batch))
            terms["gate"] = l1 * gate_penalty(m)
            return terms
        return gated

    return config, StageParts(model=model, parent=parent, hooks=[GateLogHook()],
                              criterion_wrapper=wrap, extra={"gating": {**record, "l1": l1}})


def run_gate(config: Config, from_artifact: str | os.PathLike | None = None,
             force: bool = False) -> Path:
    """Train the gated model from `from_artifact` (else model.weights); returns its best.pt."""
    return train_built(config, "gated", force, from_artifact=from_artifact)


@torch.no_grad()
def measure_gated(model: Darknet, records: Sequence[Record], img_size: int, letterbox: bool,
                  batch_size: int = 16, workers: int = 0) -> dict:
    """Executed MACs per image and per-gate channel usage of `model` over `records` (eval mode,
    no augmentation): {images, macs_dense, macs_mean, macs_sd, macs_min, macs_max,
    macs_per_image, usage: {layer name: [share of images keeping each channel]}}."""
    if not records:
        raise YoloCompressError("the val split has no images to measure the gated MACs on")
    dataset = DetectionDataset(records, img_size, augment=None, letterbox=letterbox,
                               drop_difficult=False)
    loader = build_loader(dataset, batch_size, shuffle=False, workers=workers, seed=0)
    model.eval()
    device = next(model.parameters()).device
    with count_macs(model) as c:
        for images, _, _ in tqdm(loader, desc="gate MACs", unit="batch", leave=False):
            model(images.to(device).float().div_(255))
    per = c.per_image
    mean = sum(per) / len(per)
    return {
        "images": c.images, "macs_dense": c.dense, "macs_mean": mean,
        "macs_sd": math.sqrt(sum((v - mean) ** 2 for v in per) / len(per)),
        "macs_min": min(per), "macs_max": max(per), "macs_per_image": per,
        "usage": {model.infos[i].name: (u / c.images).tolist() for i, u in c.usage.items()},
    }


SWITCHING = (0.02, 0.98)   # a channel "switches" when more than 2 % and fewer than 98 % of images keep it


def switching(usage: dict[str, Sequence[float]], bounds: tuple[float, float] = SWITCHING) -> dict:
    """How dynamic the gates are, from measure_gated's `usage`: {switching_share (of all gated
    channels, those kept by a share of images strictly inside `bounds`), gates_switching (gates
    with at least one such channel), gates}."""
    lo, hi = bounds
    dynamic = {g: sum(1 for v in u if lo < v < hi) for g, u in usage.items()}
    total = sum(len(u) for u in usage.values())
    return {"switching_share": sum(dynamic.values()) / total if total else 0.0,
            "gates_switching": sum(1 for n in dynamic.values() if n), "gates": len(usage)}


def plot_usage(result: dict, path: str | os.PathLike) -> Path:
    """Per gate: a histogram of its channels' usage (share of val images keeping the channel),
    plus the distribution of executed MACs per image."""
    usage = result["usage"]
    cols = 6
    rows = math.ceil((len(usage) + 1) / cols)
    fig = new_figure(2.4 * cols, 1.9 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    for ax, (name, shares) in zip(axes, usage.items()):
        ax.hist(shares, bins=20, range=(0, 1), color="tab:blue")
        ax.set_title(f"{name} ({len(shares)} ch)", fontsize=8)
        ax.tick_params(labelsize=6)
    ax = axes[len(usage)]
    ax.hist([v / 1e6 for v in result["macs_per_image"]], bins=30, color="tab:orange")
    ax.axvline(result["macs_dense"] / 1e6, color="k", ls="--", lw=1)
    ax.set_title("executed MMACs per image (dense --)", fontsize=8)
    ax.tick_params(labelsize=6)
    for ax in axes[len(usage) + 1:]:
        ax.axis("off")
    fig.suptitle("channel usage over the val split (x: share of images keeping a channel)")
    return save_figure(fig, path)


def measure_artifact(config: Config, best: Path, data: DataSplits | None = None) -> dict:
    """gate_macs.json beside `best` (remeasured when best.pt's sha256 differs) and its plot."""
    out = best.parent / MACS_JSON
    sha = file_sha256(best)
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("artifact_sha256") == sha:
            return old
    data = data or load_data(config)
    model = build_model(load_artifact(best), source=str(best))
    res = measure_gated(model, data.val, config.model.img_size, uses_letterbox(config, model),
                        config.eval.batch_size, config.data.workers)
    res = {"artifact_sha256": sha, **res}
    plot_usage(res, best.parent / USAGE_PNG)
    with atomic_open(out, "w", encoding="utf-8") as f:
        json.dump(res, f)
    return res


def command(config: Config, args: Any) -> Path:
    """`yolocompress gate`: trains, then measures the executed MACs over the val split."""
    best = run_gate(config, from_artifact=args.from_artifact, force=args.force)
    res = measure_artifact(config, best)
    sw = switching(res["usage"])
    print(f"gate: {res['macs_mean'] / 1e6:.2f} MMACs per image on average over {res['images']} "
          f"val images (sd {res['macs_sd'] / 1e6:.3f}, {res['macs_min'] / 1e6:.2f}-"
          f"{res['macs_max'] / 1e6:.2f}); dense {res['macs_dense'] / 1e6:.2f} "
          f"({res['macs_mean'] / res['macs_dense']:.1%}); {sw['switching_share']:.1%} of the gated "
          f"channels switch between images, in {sw['gates_switching']} of {sw['gates']} gates; "
          f"{stage_dir(config, 'gated') / MACS_JSON}")
    return best
