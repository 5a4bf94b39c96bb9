"""`yolocompress pipeline`: baseline -> sparse -> pruned -> distilled through the artifacts in
runs/<name>/<stage>/best.pt, then each stage scored the same way and reported.

The steps, their order and plots are the registry's (stages.py); each stage skips or resumes by
the rule of inputs.py (a complete stage with the same inputs is reused, one whose inputs changed
is an error until --force; an interrupted training stage resumes from its last.pt), so re-running
after a crash or Ctrl-C continues where it stopped. The report (runs/<name>/report.json and
report.md) holds, per stage in pipeline order: stage, artifact, map50_voc07, map50_all, params, flops, latency_ms_b1 (CPU,
batch 1), size_bytes, sha256, lineage and the stage's plots.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .artifacts import build_model, file_sha256, load_artifact, load_parent
from .config import Config
from .data.descriptor import load_descriptor, load_split
from .errors import YoloCompressError
from .eval.evaluate import ModelEvaluator, evaluate_model
from .eval.speed import measure_latency
from .fileio import atomic_open, remove_stale_temps
from .inputs import artifact_complete, reuse_complete, stage_inputs
from .models.profile import profile_summary
from .stages import get_stage, pipeline_stages, resolve
from .train.distributed import init_distributed
from .train.run import run_dir, stage_dir, train_built

__all__ = ["PIPELINE", "REPORT_KEYS", "adopt_baseline", "artifact_complete", "baseline_step",
           "run_pipeline", "run_steps", "run_to_sparse", "stage_complete", "score_artifact",
           "write_report", "format_table"]

PIPELINE = tuple(s.name for s in pipeline_stages())
REPORT_KEYS = ("stage", "artifact", "map50_voc07", "map50_all", "params", "flops",
               "latency_ms_b1", "size_bytes")


def stage_complete(config: Config, stage: str) -> bool:
    """Whether runs/<name>/<stage>/best.pt is complete (`artifact_complete`)."""
    return artifact_complete(stage_dir(config, stage) / "best.pt")


_ADOPTABLE = ("baseline", "imported")


def adopt_baseline(config: Config, force: bool = False) -> Path | None:
    """Copy `pipeline.baseline` (an artifact) in as the experiment's complete baseline stage,
    unless that stage is complete with this very file (its sha256) already (`force`: copy
    anyway; a complete stage from anything else is an error, inputs.py); returns the adopted
    copy, or None if `pipeline.baseline` is not set or the stage was kept."""
    if config.pipeline.baseline is None:
        return None
    src = config.require_file("pipeline.baseline")
    folder = stage_dir(config, "baseline")
    best = folder / "best.pt"
    inputs = stage_inputs(config, "baseline", source=file_sha256(src))
    if reuse_complete("baseline", best, inputs, force):
        return None
    art = load_artifact(src)
    if art["stage"] not in _ADOPTABLE:
        raise YoloCompressError(f"{src}: pipeline.baseline must be a baseline artifact, this one "
                                f"is '{art['stage']}'")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    with open(src, "rb") as f, atomic_open(best, "wb") as out:
        shutil.copyfileobj(f, out)
    with atomic_open(folder / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({"stage": "baseline", "adopted_from": str(src), "sha256": file_sha256(best),
                   "inputs": inputs, "best": art.get("metrics", {})}, f, indent=2)
    print(f"baseline: adopted {src} (pipeline.baseline) as {best}; `yolocompress train --force` "
          f"with this experiment trains it instead")
    return best


def baseline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """The pipeline's baseline: adopted from `pipeline.baseline` when set, else trained."""
    if config.pipeline.baseline is None:
        return train_built(config, "baseline", force)
    adopt_baseline(config, force)
    return stage_dir(config, "baseline") / "best.pt"


def run_steps(config: Config, force: bool = False, latency_iters: int = 30,
              until: str | None = None, redo: str | None = None) -> dict[str, Path]:
    """The registry's pipeline steps in order (through `until`): {stage: best.pt}. `force` redoes
    every step; `redo` the named stage and every one after it (the earlier ones are reused)."""
    names = [s.name for s in pipeline_stages()]
    if redo is not None and redo not in names:
        raise YoloCompressError(f"--redo {redo}: not a pipeline stage (one of {', '.join(names)})")
    paths: dict[str, Path] = {}
    for stage in pipeline_stages():
        force = force or stage.name == redo
        paths[stage.name] = resolve(stage.pipeline_step)(config, paths, force, latency_iters)
        if stage.name == until:
            break
    return paths


def run_to_sparse(config: Config, force: bool = False) -> dict[str, Path]:
    """The steps through the sparse stage: {"baseline": path, "sparse": path}."""
    return run_steps(config, force, until="sparse")


def score_artifact(config: Config, stage: str, path: Path, latency_iters: int = 30,
                   latency_threads: int | None = 1) -> dict:
    """One report row: VOC mAP@0.5 on the val split (PR curves into the stage folder), params,
    FLOPs, CPU batch-1 latency, size on disk, sha256 and lineage of the artifact at `path`."""
    desc = load_descriptor(config.require_file("data.descriptor"))
    art = load_parent(path, desc.names, role="model")
    model = build_model(art, source=str(path))
    size = config.model.img_size
    device = init_distributed(config.train.device).device
    evaluator = ModelEvaluator.from_config(config, desc.names, model.letterbox)
    res = evaluate_model(model.to(device), load_split(desc, "val", strict=config.data.strict),
                         evaluator, plots_dir=path.parent, progress=False)
    model.cpu()
    prof = profile_summary(model.blocks, size, size)
    lat = (measure_latency(model, size, 1, warmup=max(1, latency_iters // 5), iters=latency_iters,
                           threads=latency_threads, fuse_bn=True) if latency_iters > 0 else None)
    folder = path.parent
    return {
        "stage": stage, "artifact": str(path), "map50_voc07": res["map50_voc07"],
        "map50_all": res["map50_all"], "params": prof["params"], "flops": prof["flops"],
        "latency_ms_b1": lat["ms_median"] if lat else None, "size_bytes": path.stat().st_size,
        "latency_threads": lat["threads"] if lat else None, "sha256": art["sha256"],
        "parent": art.get("parent"), "lineage": art.get("lineage", []),
        "per_class": res["per_class"],
        "plots": [f"{folder.name}/{p}" for p in get_stage(stage).plots
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
                 latency_threads: int | None = 1, redo: str | None = None) -> list[dict]:
    """Run (or resume) every stage, score each artifact, write the report and print the table;
    returns the report rows in pipeline order."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise YoloCompressError("pipeline runs in one process; under torchrun run the train, "
                                "sparse and distill commands one by one (prune runs on one process)")
    paths = run_steps(config, force, latency_iters, redo=redo)
    rows = []
    for stage in PIPELINE:
        print(f"scoring {stage}: {paths[stage]}")
        rows.append(score_artifact(config, stage, paths[stage], latency_iters, latency_threads))
    js, md = write_report(config, rows)
    print(format_table(rows))
    print(f"report: {md} and {js}")
    return rows
