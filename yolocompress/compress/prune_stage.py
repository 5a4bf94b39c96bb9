"""`yolocompress prune`: stage 2 as a command -- a sparse artifact in, a pruned artifact out.

run_prune: the artifact's model -> `prune.layers` residual units removed (compress.layer_prune;
channels are then pruned on the reduced cfg, so the channel graph, groups and budget search run
unchanged on an ordinary cfg) -> group_layers -> percents (the config's `prune` section, or
find_percents_for_budget, scored on calibration data with `allocation: loss`) -> plan -> prune
(timed on their own) -> the slim Darknet (strict load) -> with `prune.reconstruct`, its convs
refitted to the unpruned model's outputs (compress.reconstruct) -> its BN statistics recalibrated
on `prune.recalibrate` training images (compress.prune_search); then mAP on the val split before
and after (compensation on and off, both recalibrated; and not recalibrated), CPU latency,
and beside the artifact: metrics.json, report.md, channels_kept.png, gamma_thresholds.png.
The artifact has stage `pruned`, the source's sha256 as parent, and `prune` = the plan record
(removed units by source layer name, kept channels per layer name of the reduced cfg, groups,
percents, thresholds, settings incl. compensate, budget), which `prune.replay` re-applies to the
source model (the cfg and the sliced tensors; the refitted convs and the recalibrated statistics
need the calibration images again). A budget is a share of the source model's cost: what the units remove counts.
Skipping follows inputs.py's rule (the source's sha256 and the model/data/train/eval/prune
sections), like every stage.

metrics.json: {stage, inputs, artifact, source, source_stage, img_size, metric_key, settings,
seconds {masks, prune, reconstruct, recalibrate}, budget (None or {metric, target, reduction, method,
evaluations, channel_target}), units [{shortcut, input, convs, stride, part, score}] (source layer names),
before/after {params, flops, layers, <eval metrics>}, compensation {on, off: <eval metrics>},
recalibration {images, off: <eval metrics of the saved setting, not recalibrated>},
reconstruction {images, convs [{layer, features, rows, error_before, error_after, refitted}],
off: <eval metrics of the saved setting not reconstructed, recalibrated>}, latency
[{batch, before, after: eval.speed stats}], groups [{name, title, layers, percent, threshold,
channels_*, params_*, flops_*}], layers [{name, group, filters_*, params_*, flops_*}] (the groups'
convs and every other conv whose params or FLOPs changed)}.
"""
from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import artifact_from_model, build_model, lineage_of, load_parent, save_artifact
from ..config import Config
from ..data.descriptor import load_descriptor, load_split
from ..errors import YoloCompressError
from ..eval.evaluate import METRIC_KEYS
from ..eval.speed import measure_latency
from ..fileio import atomic_open, remove_stale_temps
from ..inputs import reuse_complete, stage_inputs
from ..models.darknet import Darknet
from ..models.profile import profile_blocks
from ..models.roles import describe_layers
from ..report import (plot_channels_kept, plot_gamma_thresholds, prune_report_markdown,
                      prune_summary_rows)
from ..stages import get_stage
from ..train.distributed import init_distributed
from ..train.run import config_evaluator, stage_dir, uses_letterbox
from .groups import GROUPINGS, Group, group_layers
from .importance import NEEDS_GRADIENTS, get_importance
from .latency_table import time_model
from .layer_prune import (least_important, remove_units, residual_units, unit_scores,
                          units_record)
from .prune import find_percents_for_budget, group_scores, keep_from_record, plan, pruned_cost
from .prune_search import ALLOCATIONS, Calibrated, budget_options, build_pruned, latency_table

__all__ = ["run_prune", "plan_from_config", "remove_units_from_config", "command", "pipeline_step"]

PLOTS = {"channels kept per layer": "channels_kept.png",
         "importance per group with its threshold": "gamma_thresholds.png"}
_LABELS = {"bn_gamma_abs": "|γ|", "bn_gamma_norm": "|γ| / layer mean",
           "bn_gamma_rank": "|γ| rank in layer", "bn_taylor": "|γ·dL/dγ|",
           "l1_filter": "filter L1", "l2_filter": "filter L2", "random": "random score"}


def _source(path: Path, names: Sequence[str]) -> dict:
    art = load_parent(path, names, "pruned", role="source")
    if art["stage"] in get_stage("pruned").warn_parents:
        print(f"warning: {path} is a '{art['stage']}' artifact, not 'sparse': its BN gammas were "
              "not sparse-trained, so thresholds cut channels that still carry signal")
    return art


def _percents(config: Config, groups: Sequence[Group]) -> list[float]:
    p, names = config.prune.percents, [g.name for g in groups]
    if len(p) == 1:
        return [p[0]] * len(groups)
    if len(p) != len(groups):
        raise YoloCompressError(f"{config.source or 'config'}: prune.percents has {len(p)} values "
                                f"for the {len(groups)} groups {', '.join(names)} of "
                                f"{config.model.cfg}; give one per group or one for all")
    return list(p)


def _costs(blocks, new_blocks, groups, size, source=None
           ) -> tuple[dict, dict, list[dict], list[dict]]:
    """Totals {params, flops, layers} of `source` (default `blocks`) and `new_blocks`, and
    per-group and per-layer (the groups' convs and every other conv whose cost changed) filters,
    params and FLOPs from `blocks` (the cfg channels are pruned on) to `new_blocks`."""
    before, after = profile_blocks(blocks, size, size), profile_blocks(new_blocks, size, size)
    names = [info.name for info in describe_layers(blocks)]
    group_of = {c: g.name for g in groups for c in g.layers}
    layers = []
    for i, (b, a) in enumerate(zip(before, after)):
        changed = b.kind == "convolutional" and (b.params, b.flops) != (a.params, a.flops)
        if i in group_of or changed:
            layers.append({"name": names[i], "group": group_of.get(i, ""),
                           "filters_before": b.out[0], "filters_after": a.out[0],
                           "params_before": b.params, "params_after": a.params,
                           "flops_before": b.flops, "flops_after": a.flops})
    per_group = []
    for g in groups:
        row = {"name": g.name, "title": g.title, "layers": len(g.layers)}
        for when, rows in (("before", before), ("after", after)):
            row[f"channels_{when}"] = sum(rows[c].out[0] for c in g.layers)
            row[f"params_{when}"] = sum(rows[c].params for c in g.layers)
            row[f"flops_{when}"] = sum(rows[c].flops for c in g.layers)
        per_group.append(row)
    first = before if source is None else profile_blocks(source, size, size)
    totals = [{"params": sum(r.params for r in rows), "flops": sum(r.flops for r in rows),
               "layers": len(rows)} for rows in (first, after)]
    return totals[0], totals[1], per_group, layers


def _channel_ratio(config: Config, blocks, source) -> tuple[float, float]:
    """(the share of `blocks`' cost the channels must remove so that the source loses
    budget_ratio of its cost, cost of blocks / cost of source)."""
    pc, size = config.prune, config.model.img_size
    if source is None:
        return pc.budget_ratio, 1.0
    left = (pruned_cost(blocks, {}, pc.budget_target, (size, size))
            / pruned_cost(source, {}, pc.budget_target, (size, size)))
    ratio = 1 - (1 - pc.budget_ratio) / left
    if ratio <= 0:
        raise YoloCompressError(
            f"{config.source or 'config'}: prune.layers={pc.layers} alone removes {1 - left:.1%} "
            f"of the {pc.budget_target}, at least prune.budget_ratio={pc.budget_ratio:g}; remove "
            "fewer units or raise the ratio")
    return ratio, left


def _choose(config: Config, blocks, state, groups, settings: dict, cal: Calibrated | None,
            source=None) -> dict:
    """The plan record: the config's percents, or the budget search's (recorded in "budget";
    a share of `source`'s cost when the units removed from it gave `blocks`)."""
    pc = config.prune
    percents, budget = _percents(config, groups), None
    if pc.budget_target is not None:
        t0 = time.perf_counter()
        ratio, left = _channel_ratio(config, blocks, source)
        res = find_percents_for_budget(
            blocks, state, groups, percents, (pc.budget_target, ratio),
            **budget_options(config, cal, blocks, state, settings["importance"]))
        percents = res.percents
        budget = {"metric": res.metric, "target": pc.budget_ratio,
                  "reduction": 1 - (1 - res.reduction) * left, "channel_target": ratio,
                  "method": pc.budget_method, "allocation": pc.allocation,
                  "evaluations": res.evaluations, "seconds": time.perf_counter() - t0}
        if res.history is not None:
            budget["candidates"] = [{"score": h["score"], "generation": h["generation"]}
                                    for h in res.history]
    record = plan(blocks, state, groups, percents, **settings)
    record["settings"].update(compensate=pc.compensate, grouping=pc.grouping,
                              recalibrate=pc.recalibrate)
    record["budget"] = budget
    return record


def plan_from_config(config: Config, blocks, state, cal: Calibrated | None = None,
                     model: Darknet | None = None, source=None) -> tuple[list[Group], dict, dict]:
    """(groups, plan record, mask settings) of the config's `prune` section on a model: what
    run_prune will cut (the sparse stage's check reads it too). With a calibration subset `cal`
    (and the `model` of blocks/state), gradient importances and a loss-scored budget search use
    it; without, the plan is the importance-only one. `source`: the cfg `blocks` had residual
    units removed from (a budget is a share of its cost)."""
    pc = config.prune
    importance = (cal.importance(model, pc.importance, config.train.seed) if cal is not None
                  else get_importance(pc.importance, config.train.seed))
    settings = dict(min_keep=pc.min_keep, min_channels=pc.min_channels, round_to=pc.round_to,
                    merge=pc.merge, importance=importance)
    groups = group_layers(blocks, rules=GROUPINGS[pc.grouping])
    return groups, _choose(config, blocks, state, groups, settings, cal, source), settings


def remove_units_from_config(config: Config, model: Darknet, cal: Calibrated | None
                             ) -> tuple[Darknet, list[dict]]:
    """The model without its `prune.layers` least important residual units (ranked by
    `prune.layer_importance`), and the record of those units; the model itself when 0."""
    pc = config.prune
    if not pc.layers:
        return model, []
    blocks, state = model.blocks, model.state_dict()
    units = residual_units(blocks)
    if pc.layers > len(units):                 # the error, before any scoring
        least_important(blocks, units, [0.0] * len(units), pc.layers)
    scores = (cal.unit_losses(blocks, state, units) if pc.layer_importance == "loss"
              else unit_scores(blocks, state, units))
    chosen = least_important(blocks, units, scores, pc.layers)
    new_blocks, new_state = remove_units(blocks, state, chosen)
    reduced = Darknet(new_blocks)
    reduced.load_state_dict(new_state, strict=True)
    by_shortcut = {u.shortcut: v for u, v in zip(units, scores)}
    return reduced, units_record(blocks, chosen, by_shortcut)


def run_prune(config: Config, from_artifact: str | os.PathLike | None = None,
              out: str | os.PathLike | None = None, latency_iters: int = 20,
              latency_batches: Sequence[int] = (1, 8), latency_threads: int | None = 1,
              force: bool = False) -> Path:
    """Prune `from_artifact` (default runs/<name>/sparse/best.pt) per `config.prune`; returns
    the path of the pruned artifact (default runs/<name>/pruned/best.pt; the report goes beside
    it). latency_iters=0 skips the latency measurement; latency_threads=None times with
    torch's current thread count (1, the default, is the most repeatable on a shared machine).
    A complete artifact at `out` with the same inputs is kept (`force`: prune again)."""
    src = Path(from_artifact) if from_artifact else stage_dir(config, "sparse") / "best.pt"
    out = Path(out) if out else stage_dir(config, "pruned") / "best.pt"
    desc = load_descriptor(config.require_file("data.descriptor"))
    names = list(desc.names)
    art = _source(src, names)
    inputs = stage_inputs(config, "pruned", parent=art["sha256"])
    if reuse_complete("pruned", out, inputs, force):
        return out
    remove_stale_temps(out.parent)
    val = load_split(desc, "val", strict=config.data.strict)
    model = build_model(art, source=str(src))
    pc, size = config.prune, config.model.img_size
    cal = None
    if pc.recalibrate or pc.reconstruct or (pc.budget_target and ALLOCATIONS[pc.allocation]) \
            or pc.importance in NEEDS_GRADIENTS or (pc.layers and pc.layer_importance == "loss"):
        cal = Calibrated.from_config(config, load_split(desc, "train", strict=config.data.strict),
                                     uses_letterbox(config, model), names)

    t0 = time.perf_counter()
    base, units = remove_units_from_config(config, model, cal)
    if units:
        print(f"removed {len(units)} residual units: " + ", ".join(
            f"{u['shortcut']} ({', '.join(u['convs'])})" for u in units))
    blocks, state = base.blocks, base.state_dict()
    groups, record, settings = plan_from_config(config, blocks, state, cal, base,
                                                source=model.blocks if units else None)
    record["units"] = units
    record["settings"].update(layers=pc.layers, layer_importance=pc.layer_importance,
                              reconstruct=pc.reconstruct)
    keep = keep_from_record(blocks, record)
    t1 = time.perf_counter()
    pruned = build_pruned(blocks, state, keep, pc.compensate)
    new_blocks = pruned.blocks
    t2 = time.perf_counter()
    slimmed = sum(len(k) < blocks[c + 1].get_int("filters") for c, k in keep.items())
    print(f"pruned {slimmed} of {len(keep)} prunable convs in {t2 - t0:.2f} s (masks "
          f"{t1 - t0:.2f} s, rebuild {t2 - t1:.2f} s)")
    # for the report only: the saved setting not reconstructed, before recalibration, and the
    # other compensation (reconstructed alike)
    plain = copy.deepcopy(pruned) if pc.reconstruct else None
    refits = _reconstruct(cal, base, pruned, keep)
    t3 = time.perf_counter()
    stale = copy.deepcopy(pruned)
    other = build_pruned(blocks, state, keep, not pc.compensate)
    _reconstruct(cal, base, other, keep, quiet=True)
    if cal is not None and cal.full is not None:
        for m in (pruned, other, plain):
            if m is not None:
                cal.recalibrate(m)
    t4 = time.perf_counter()

    latency = [{"batch": b, **{when: measure_latency(m, size, b, warmup=max(1, latency_iters // 5),
                                                     iters=latency_iters, threads=latency_threads,
                                                     fuse_bn=True)
                               for when, m in (("before", model), ("after", pruned))}}
               for b in (latency_batches if latency_iters > 0 else ())]
    if pc.budget_target == "latency":
        record["budget"]["check"] = _latency_check(config, blocks, new_blocks)
    device = init_distributed(config.train.device).device
    scores = config_evaluator(config, val, names, uses_letterbox(config, model))

    def evaluate(m: Darknet) -> dict:
        res = scores(m.to(device))
        m.cpu()
        return res

    on, off = ("on", "off") if pc.compensate else ("off", "on")
    compensation = {on: evaluate(pruned), off: evaluate(other)}
    recalibration = {"images": cal.full.images if cal and cal.full else 0,
                     "off": evaluate(stale) if cal and cal.full else compensation[on]}
    cost_before, cost_after, group_rows, layer_rows = _costs(blocks, new_blocks, groups, size,
                                                             model.blocks)
    for row in group_rows:
        row.update(percent=record["percents"][row["name"]],
                   threshold=record["thresholds"][row["name"]])
    metrics = {
        "stage": "pruned", "inputs": inputs, "artifact": str(out), "source": str(src),
        "source_stage": art["stage"], "img_size": size, "metric_key": METRIC_KEYS[config.eval.metric],
        "settings": record["settings"], "seconds": {"masks": t1 - t0, "prune": t2 - t1,
                                                     "reconstruct": t3 - t2,
                                                     "recalibrate": t4 - t3},
        "budget": record["budget"], "units": units, "before": {**cost_before, **evaluate(model)},
        "after": {**cost_after, **compensation[on]}, "compensation": compensation,
        "recalibration": recalibration,
        "reconstruction": {"images": pc.reconstruct, "convs": refits,
                           "off": evaluate(plain) if plain is not None else compensation[on]},
        "latency": latency, "groups": group_rows, "layers": layer_rows,
    }

    flat = {**metrics["after"], f"map_compensation_{off}": compensation[off]["map"],
            "map_not_recalibrated": recalibration["off"]["map"]}
    save_artifact(artifact_from_model(pruned, "pruned", names, input_size=[size, size],
                                      config=config.to_dict(), metrics=flat,
                                      parent=art["sha256"], lineage=lineage_of(art),
                                      prune=record, inputs=inputs), out)
    _write_report(out.parent, metrics, group_scores(state, groups, settings["importance"]),
                  record, _LABELS[pc.importance])
    _print_summary(metrics, out)
    return out


def _reconstruct(cal: Calibrated | None, base: Darknet, pruned: Darknet, keep,
                 quiet: bool = False) -> list[dict]:
    """`prune.reconstruct` on `pruned` (its convs refitted to `base`'s outputs), printed."""
    if cal is None or cal.rebuild is None:
        return []
    t0 = time.perf_counter()
    refits = cal.reconstruct(base, pruned, keep)
    if not quiet and refits:
        before = np.mean([r["error_before"] for r in refits])
        after = np.mean([r["error_after"] for r in refits])
        print(f"reconstructed {sum(r['refitted'] for r in refits)} of {len(refits)} convs on "
              f"{cal.rebuild.images} images in {time.perf_counter() - t0:.1f} s (output error "
              f"relative to the unpruned conv's variance, mean over convs: {before:.3f} -> "
              f"{after:.3f})")
    return refits


def _latency_check(config: Config, blocks, new_blocks) -> dict:
    """A latency budget's result, timed: the unpruned and the rebuilt cfg in the table's backend
    (batch 1), against what the table predicted."""
    pc, size = config.prune, config.model.img_size
    table = latency_table(config, blocks)
    kw = dict(backend=pc.latency_backend, threads=pc.latency_threads, batch=1)
    before, after = (time_model(b, (size, size), **kw) for b in (blocks, new_blocks))
    check = {**kw, "before_ms": before, "after_ms": after, "reduction": 1 - after / before,
             "predicted_before_ms": table.predict(blocks),
             "predicted_after_ms": table.predict(new_blocks)}
    print(f"latency budget: {before:.1f} -> {after:.1f} ms measured ({1 - after / before:.1%} "
          f"less; target {pc.budget_ratio:.1%}, table predicted "
          f"{1 - check['predicted_after_ms'] / check['predicted_before_ms']:.1%}), "
          f"{pc.latency_backend}, {pc.latency_threads} threads, batch 1")
    return check


def _write_report(folder: Path, metrics: dict, scores: dict, record: dict, label: str) -> None:
    with atomic_open(folder / "metrics.json", "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    files = list(PLOTS.values())
    plot_channels_kept(metrics["layers"], folder / files[0])
    flat = {g: np.concatenate(list(s.values())) if s else np.empty(0) for g, s in scores.items()}
    plot_gamma_thresholds(flat, record["thresholds"], folder / files[1], record["percents"], label)
    with atomic_open(folder / "report.md", "w", encoding="utf-8") as f:
        f.write(prune_report_markdown(metrics, PLOTS))


def _print_summary(metrics: dict, out: Path) -> None:
    rows = [("", "before", "after", "change"), *prune_summary_rows(metrics)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(v.ljust(widths[0]) if i == 0 else v.rjust(widths[i])
                        for i, v in enumerate(r)))
    print(f"pruned: {out} (report: {out.parent / 'report.md'})")


def command(config: Config, args: Any) -> Path:
    """`yolocompress prune`."""
    return run_prune(config, from_artifact=args.from_artifact, out=args.out,
                     latency_iters=args.latency_iters, latency_batches=args.latency_batches,
                     latency_threads=args.latency_threads or None, force=args.force)


def pipeline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    return run_prune(config, from_artifact=paths["sparse"],
                     out=stage_dir(config, "pruned") / "best.pt", latency_iters=latency_iters,
                     force=force)
