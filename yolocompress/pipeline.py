"""`yolocompress pipeline`: baseline -> sparse -> pruned -> distilled through the artifacts in
runs/<name>/<stage>/best.pt, then each stage scored the same way and reported.

A stage whose artifact is complete (best.pt plus metrics.json) is not run again, and a training
stage interrupted mid-way resumes from its last.pt, so re-running after a crash or Ctrl-C
continues where it stopped. The report (runs/<name>/report.json and report.md) holds, per stage in
pipeline order: stage, artifact, map50_voc07, map50_all, params, flops, latency_ms_b1 (CPU,
batch 1), size_bytes, sha256, lineage and the stage's plots.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .artifacts import build_model, file_sha256, load_artifact
from .compress.distill_stage import run_distill
from .compress.prune_stage import run_prune
from .compress.sparse_stage import HIST_PNG, run_sparse
from .config import Config
from .data.descriptor import load_descriptor, load_split
from .errors import YoloCompressError
from .eval.evaluate import evaluate_model
from .eval.speed import measure_latency
from .fileio import atomic_open
from .models.profile import profile_summary
from .train.distributed import init_distributed
from .train.run import run_dir, run_stage, stage_dir

__all__ = ["PIPELINE", "REPORT_KEYS", "adopt_baseline", "artifact_complete", "run_pipeline",
           "run_to_sparse", "stage_complete", "score_artifact", "write_report", "format_table"]

PIPELINE = ("baseline", "sparse", "pruned", "distilled")
REPORT_KEYS = ("stage", "artifact", "map50_voc07", "map50_all", "params", "flops",
               "latency_ms_b1", "size_bytes")
# plots each stage leaves in its folder (those present are linked from the report)
STAGE_PLOTS = {
    "baseline": ("training_curves.png", "pr_curves.png"),
    "sparse": ("training_curves.png", HIST_PNG, "pr_curves.png"),
    "pruned": ("channels_kept.png", "gamma_thresholds.png", "pr_curves.png"),
    "distilled": ("training_curves.png", "pr_curves.png"),
    "finetuned": ("training_curves.png", "pr_curves.png"),
}


def artifact_complete(path: Path) -> bool:
    """A stage's artifact is complete when it and the metrics.json beside it both exist
    (metrics.json is written last, so a crash in between leaves the stage incomplete)."""
    return path.is_file() and (path.parent / "metrics.json").is_file()


def stage_complete(config: Config, stage: str) -> bool:
    """Whether runs/<name>/<stage>/best.pt is complete (`artifact_complete`)."""
    return artifact_complete(stage_dir(config, stage) / "best.pt")


def adopt_baseline(config: Config, force: bool = False) -> Path | None:
    """Copy `pipeline.baseline` (an artifact) in as the experiment's complete baseline stage,
    unless that stage is complete already (`force`: copy anyway); returns the adopted copy, or
    None if `pipeline.baseline` is not set or the stage was kept."""
    if config.pipeline.baseline is None or (stage_complete(config, "baseline") and not force):
        return None
    src = config.require_file("pipeline.baseline")
    art = load_artifact(src)
    if art["stage"] not in ("baseline", "imported"):
        raise YoloCompressError(f"{src}: pipeline.baseline must be a baseline artifact, this one "
                                f"is '{art['stage']}'")
    folder = stage_dir(config, "baseline")
    folder.mkdir(parents=True, exist_ok=True)
    best = folder / "best.pt"
    with open(src, "rb") as f, atomic_open(best, "wb") as out:
        shutil.copyfileobj(f, out)
    with atomic_open(folder / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({"stage": "baseline", "adopted_from": str(src), "sha256": file_sha256(best),
                   "best": art.get("metrics", {})}, f, indent=2)
    print(f"baseline: adopted {src} (pipeline.baseline) as {best}; `yolocompress train` with "
          f"this experiment trains it from scratch instead")
    return best


def run_to_sparse(config: Config, force: bool = False) -> dict[str, Path]:
    """The first two stages (each skipped when complete; the baseline adopted from
    `pipeline.baseline` when set): {"baseline": path, "sparse": path}."""
    adopted = adopt_baseline(config, force)
    paths = {"baseline": run_stage(config, "baseline", force=force and adopted is None)}
    paths["sparse"] = run_sparse(config, from_artifact=paths["baseline"], force=force)
    return paths


def _run_stages(config: Config, force: bool, latency_iters: int) -> dict[str, Path]:
    paths = run_to_sparse(config, force)
    pruned = stage_dir(config, "pruned") / "best.pt"
    if force or not stage_complete(config, "pruned"):
        run_prune(config, from_artifact=paths["sparse"], out=pruned, latency_iters=latency_iters)
    else:
        print(f"pruned: {pruned} is complete, skipping (use --force to prune again)")
    paths["pruned"] = pruned
    paths["distilled"] = run_distill(config, pruned, paths["sparse"], force=force)
    return paths


def score_artifact(config: Config, stage: str, path: Path, latency_iters: int = 30,
                   latency_threads: int | None = 1) -> dict:
    """One report row: VOC mAP@0.5 on the val split (PR curves into the stage folder), params,
    FLOPs, CPU batch-1 latency, size on disk, sha256 and lineage of the artifact at `path`."""
    art = load_artifact(path)
    model = build_model(art, source=str(path))
    desc = load_descriptor(config.require_file("data.descriptor"))
    if list(art["classes"]) != list(desc.names):
        raise YoloCompressError(f"{path}: classes {art['classes']} differ from the data set's "
                                f"{list(desc.names)}")
    size = config.model.img_size
    device = init_distributed(config.train.device).device
    ev = config.eval
    res = evaluate_model(model.to(device), load_split(desc, "val", strict=config.data.strict),
                         desc.names, size, model.letterbox, ev.metric, ev.batch_size,
                         config.data.workers, ev.conf_thresh, ev.nms_iou, ev.max_det,
                         plots_dir=path.parent, progress=False)
    model.cpu()
    prof = profile_summary(model.blocks, size, size)
    lat = (measure_latency(model, size, 1, warmup=max(1, latency_iters // 5), iters=latency_iters,
                           threads=latency_threads, fuse_bn=True) if latency_iters > 0 else None)
    folder = path.parent
    return {
        "stage": stage, "artifact": str(path), "map50_voc07": res["map50_voc07"],
        "map50_all": res["map50_all"], "params": prof["params"], "flops": prof["flops"],
        "latency_ms_b1": lat["ms_median"] if lat else None, "size_bytes": path.stat().st_size,
        "latency_threads": lat["threads"] if lat else None, "sha256": file_sha256(path),
        "parent": art.get("parent"), "lineage": art.get("lineage", []),
        "per_class": res["per_class"],
        "plots": [f"{folder.name}/{p}" for p in STAGE_PLOTS.get(stage, ())
                  if (folder / p).is_file()],
    }


def _fmt_row(row: dict, base: dict) -> list[str]:
    def rel(key: str) -> str:
        return f" ({row[key] / base[key] - 1:+.0%})" if row is not base and base[key] else ""
    lat = "-" if row["latency_ms_b1"] is None else f"{row['latency_ms_b1']:.1f}"
    if row is not base and row["latency_ms_b1"] and base["latency_ms_b1"]:
        lat += f" ({row['latency_ms_b1'] / base['latency_ms_b1'] - 1:+.0%})"
    return [row["stage"], f"{row['map50_voc07']:.4f}", f"{row['map50_all']:.4f}",
            f"{row['params'] / 1e6:.3f}M{rel('params')}", f"{row['flops'] / 1e9:.3f}G{rel('flops')}",
            lat, f"{row['size_bytes'] / 2 ** 20:.1f} MiB"]


HEADER = ["stage", "mAP@0.5 VOC07", "mAP@0.5 all-pt", "params", "FLOPs", "CPU ms (b1)", "size"]


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The summary table; changes are relative to the first row (the baseline)."""
    cells = [HEADER] + [_fmt_row(r, rows[0]) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(v.ljust(widths[i]) if i == 0 else v.rjust(widths[i])
                               for i, v in enumerate(c)) for c in cells)


def _markdown(config: Config, rows: Sequence[dict]) -> str:
    out = [f"# {config.name}: compression report", "",
           f"Experiment `{config.source}`; mAP on the val split of "
           f"`{config.require_file('data.descriptor')}` at "
           f"{config.model.img_size}x{config.model.img_size}; CPU latency is the median of "
           f"batch-1 forward passes with {rows[0].get('latency_threads')} thread(s); changes are "
           "relative to the baseline.", "", format_table(rows, markdown=True), ""]
    for r in rows:
        out += [f"## {r['stage']}", "", f"- artifact: `{r['artifact']}` (sha256 `{r['sha256'][:16]}`)"]
        for step in r["lineage"]:
            out.append(f"- from {step['stage']}: `{step['path']}` (sha256 `{step['sha256'][:16]}`)")
        out.append("- AP per class: " + ", ".join(f"{k} {v:.3f}" for k, v in r["per_class"].items()))
        out += [""] + [f"![{p}]({p})" for p in r["plots"]] + [""]
    return "\n".join(out)


def write_report(config: Config, rows: Sequence[dict]) -> tuple[Path, Path]:
    """runs/<name>/report.json ({"experiment", "stages": rows}) and report.md, atomically."""
    folder = run_dir(config)
    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "report.json", folder / "report.md"
    with atomic_open(js, "w", encoding="utf-8") as f:
        json.dump({"experiment": config.name, "config": config.source, "stages": list(rows)},
                  f, indent=2)
    with atomic_open(md, "w", encoding="utf-8") as f:
        f.write(_markdown(config, rows))
    return js, md


def run_pipeline(config: Config, force: bool = False, latency_iters: int = 30,
                 latency_threads: int | None = 1) -> list[dict]:
    """Run (or resume) every stage, score each artifact, write the report and print the table;
    returns the report rows in pipeline order."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise YoloCompressError("pipeline runs in one process; under torchrun run the train, "
                                "sparse and distill commands one by one (prune runs on one process)")
    paths = _run_stages(config, force, latency_iters)
    rows = []
    for stage in PIPELINE:
        print(f"scoring {stage}: {paths[stage]}")
        rows.append(score_artifact(config, stage, paths[stage], latency_iters, latency_threads))
    js, md = write_report(config, rows)
    print(format_table(rows))
    print(f"report: {md} and {js}")
    return rows
