"""`yolocompress pipeline`: baseline -> sparse -> pruned -> finetuned (or distilled, with
`pipeline.recovery: distill`) through the artifacts in runs/<name>/<stage>/best.pt (-> quantized,
the recovered model's FP32 and INT8 ONNX, with `pipeline.quantize: true`), then each stage scored
the same way and reported.

The steps, their order, switches and plots are the registry's (stages.py); each stage skips or
resumes by the rule of inputs.py (a complete stage with the same inputs is reused, one whose
inputs changed is an error until --force; an interrupted training stage resumes from its
last.pt), so re-running after a crash or Ctrl-C continues where it stopped. The report
(runs/<name>/report.json and report.md) holds one row per scored model in pipeline order: stage,
artifact, backend (torch: the .pt, BN folded; onnxruntime: an .onnx, CPU provider), precision,
map50_voc07, map50_all, params, flops (of the model's cfg), latency_ms_b1 / latency_ms_b8 (CPU,
in that backend; batch 8 for ONNX models only), size_bytes, sha256, lineage and the stage's plots.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from .artifacts import build_model, file_sha256, load_artifact, load_parent
from .config import Config
from .data.descriptor import load_descriptor, load_split
from .errors import YoloCompressError
from .eval.evaluate import ModelEvaluator, evaluate_model
from .eval.speed import measure_latency, measure_latency_onnx
from .fileio import atomic_open, remove_stale_temps
from .inputs import artifact_complete, reuse_complete, stage_inputs
from .models.cfg import parse_cfg
from .models.profile import profile_summary
from .stages import STAGES, get_stage, pipeline_stages, resolve, switch_hint, switched_on
from .train.distributed import init_distributed
from .train.run import run_dir, stage_dir, train_built

__all__ = ["PIPELINE", "REPORT_KEYS", "adopt_stage", "adopted_or_trained", "artifact_complete",
           "baseline_step", "run_pipeline", "run_steps", "run_to_sparse", "stage_complete",
           "score_artifact", "write_report", "format_table"]

# the steps that always run (a switched step runs when its config key says so: the recovery
# after pruning by pipeline.recovery, quantized with pipeline.quantize)
PIPELINE = tuple(s.name for s in pipeline_stages() if s.switch is None)
REPORT_KEYS = ("stage", "artifact", "backend", "precision", "map50_voc07", "map50_all", "params",
               "flops", "latency_ms_b1", "latency_ms_b8", "size_bytes")


def stage_complete(config: Config, stage: str) -> bool:
    """Whether runs/<name>/<stage>/best.pt is complete (`artifact_complete`)."""
    return artifact_complete(stage_dir(config, stage) / "best.pt")


# the stages `pipeline.<stage>` may adopt a file as, and the artifact stages each takes
_ADOPTABLE = {"baseline": ("baseline", "imported"), "sparse": ("sparse",)}


def adopt_stage(config: Config, stage: str, force: bool = False,
                parent: str | None = None) -> Path | None:
    """Copy `pipeline.<stage>` (an artifact) in as the experiment's complete `stage`, unless that
    stage is complete with this very file (its sha256) already (`force`: copy anyway; a complete
    stage from anything else is an error, inputs.py); returns the adopted copy, or None if the key
    is not set or the stage was kept. `parent`: the sha256 the file must descend from (a sparse
    model's baseline), checked whether or not the stage is kept."""
    key = f"pipeline.{stage}"
    if getattr(config.pipeline, stage) is None:
        return None
    src = config.require_file(key)
    art = load_artifact(src)
    if art["stage"] not in _ADOPTABLE[stage]:
        raise YoloCompressError(f"{src}: {key} must be a {stage} artifact, this one is "
                                f"'{art['stage']}'")
    if parent is not None and art.get("parent") != parent:
        raise YoloCompressError(f"{src}: {key} was trained from {str(art.get('parent'))[:12]}, "
                                f"not from this experiment's baseline {parent[:12]}")
    folder = stage_dir(config, stage)
    best = folder / "best.pt"
    inputs = stage_inputs(config, stage, source=file_sha256(src))
    if reuse_complete(stage, best, inputs, force):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    with open(src, "rb") as f, atomic_open(best, "wb") as out:
        shutil.copyfileobj(f, out)
    with atomic_open(folder / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({"stage": stage, "adopted_from": str(src), "sha256": file_sha256(best),
                   "inputs": inputs, "best": art.get("metrics", {})}, f, indent=2)
    print(f"{stage}: adopted {src} ({key}) as {best}; `yolocompress {STAGES[stage].command} "
          f"--force` with this experiment trains it instead")
    return best


def adopted_or_trained(config: Config, stage: str, force: bool, train: Callable[[], Path],
                       parent: Path | None = None) -> Path:
    """A pipeline step: `stage` adopted from `pipeline.<stage>` when set (adopt_stage; the file
    must descend from the artifact at `parent`, hashed only then), else `train()`."""
    if getattr(config.pipeline, stage) is None:
        return train()
    adopt_stage(config, stage, force, None if parent is None else file_sha256(parent))
    return stage_dir(config, stage) / "best.pt"


def baseline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """The pipeline's baseline: adopted from `pipeline.baseline` when set, else trained."""
    return adopted_or_trained(config, "baseline", force,
                              lambda: train_built(config, "baseline", force))


def run_steps(config: Config, force: bool = False, latency_iters: int = 30,
              until: str | None = None, redo: str | None = None) -> dict[str, Path]:
    """The registry's pipeline steps switched on in `config`, in order (through `until`):
    {stage: its result}. `force` redoes every step; `redo` the named stage and every one after it
    (the earlier ones are reused)."""
    names = [s.name for s in pipeline_stages()]
    if redo is not None and redo not in names:
        raise YoloCompressError(f"--redo {redo}: not a pipeline stage (one of {', '.join(names)})")
    if redo is not None and config is not None and not switched_on(STAGES[redo], config):
        raise YoloCompressError(f"--redo {redo}: that stage is off in this experiment "
                                f"({switch_hint(STAGES[redo])} runs it)")
    paths: dict[str, Path] = {}
    for stage in pipeline_stages(config):
        force = force or stage.name == redo
        paths[stage.name] = resolve(stage.pipeline_step)(config, paths, force, latency_iters)
        if stage.name == until:
            break
    return paths


def run_to_sparse(config: Config, force: bool = False) -> dict[str, Path]:
    """The steps through the sparse stage: {"baseline": path, "sparse": path}."""
    return run_steps(config, force, until="sparse")


def _torch_model(path: Path, names: Sequence[str]) -> tuple:
    art = load_parent(path, names, role="model")
    model = build_model(art, source=str(path))
    return model, model.blocks, {"backend": "torch", "precision": "fp32", "sha256": art["sha256"],
                                 "parent": art.get("parent"), "lineage": art.get("lineage", [])}


def _onnx_model(path: Path, names: Sequence[str], source: Path | None) -> tuple:
    """An exported model in ONNX Runtime; its cfg and lineage are those of `source`."""
    from .compress.quantize import onnx_precision
    from .onnx_backend import OnnxModel

    if source is None:
        raise YoloCompressError(f"{path}: an ONNX row needs the artifact it was exported from")
    model = OnnxModel(path, names=names)
    art = load_parent(source, names, role="model")
    return model, parse_cfg(art["cfg"], source=f"{source}[cfg]"), {
        "backend": "onnxruntime", "precision": onnx_precision(path), "sha256": file_sha256(path),
        "parent": art["sha256"], "lineage": [*art.get("lineage", []), {
            "stage": art["stage"], "sha256": art["sha256"], "path": str(source)}]}


def score_artifact(config: Config, stage: str, path: Path, latency_iters: int = 30,
                   latency_threads: int | None = 1, source: Path | None = None) -> dict:
    """One report row: VOC mAP@0.5 on the val split, params, FLOPs, CPU latency, size on disk,
    sha256 and lineage of the model at `path`. An artifact (.pt) runs in torch (PR curves into its
    folder, batch-1 latency with BN folded); an exported .onnx in ONNX Runtime, scored as `eval
    MODEL.onnx` scores it, timed at batch 1 and 8, its params / FLOPs / lineage those of `source`,
    the artifact it was exported from."""
    desc = load_descriptor(config.require_file("data.descriptor"))
    onnx = path.suffix.lower() == ".onnx"
    model, blocks, ident = (_onnx_model(path, desc.names, source) if onnx
                            else _torch_model(path, desc.names))
    size = config.model.img_size
    evaluator = ModelEvaluator.from_config(config, desc.names, model.letterbox)
    val = load_split(desc, "val", strict=config.data.strict)
    if onnx:
        res = evaluate_model(model, val, evaluator, progress=False)
    else:
        device = init_distributed(config.train.device).device
        res = evaluate_model(model.to(device), val, evaluator, plots_dir=path.parent,
                             progress=False)
        model.cpu()
    prof = profile_summary(blocks, size, size)
    lat = {}
    kw = {"warmup": max(1, latency_iters // 5), "iters": latency_iters, "threads": latency_threads}
    for batch in ((1, 8) if onnx else (1,)) if latency_iters > 0 else ():
        lat[batch] = (measure_latency_onnx(path, size, batch, **kw) if onnx else
                      measure_latency(model, size, batch, fuse_bn=True, **kw))
    folder = path.parent
    return {
        "stage": stage, "artifact": str(path), "backend": ident["backend"],
        "precision": ident["precision"], "map50_voc07": res["map50_voc07"],
        "map50_all": res["map50_all"], "params": prof["params"], "flops": prof["flops"],
        "latency_ms_b1": lat[1]["ms_median"] if 1 in lat else None,
        "latency_ms_b8": lat[8]["ms_median"] if 8 in lat else None,
        "size_bytes": path.stat().st_size,
        "latency_threads": lat[1]["threads"] if lat else None, "sha256": ident["sha256"],
        "parent": ident["parent"], "lineage": ident["lineage"], "per_class": res["per_class"],
        "plots": [] if onnx else [f"{folder.name}/{p}" for p in get_stage(stage).plots
                                  if (folder / p).is_file()],
    }


def _runtime(row: dict) -> str:
    return f"{row.get('backend', 'torch')} {row.get('precision', 'fp32')}"


def _ms(row: dict, key: str, ref: dict | None) -> str:
    if row.get(key) is None:
        return "-"
    out = f"{row[key]:.1f}"
    if ref is not None and ref is not row and ref.get(key):
        out += f" ({row[key] / ref[key] - 1:+.0%})"
    return out


def _fmt_row(row: dict, base: dict, lat_ref: dict, b8: bool) -> list[str]:
    def rel(key: str) -> str:
        return f" ({row[key] / base[key] - 1:+.0%})" if row is not base and base[key] else ""
    return [row["stage"], _runtime(row), f"{row['map50_voc07']:.4f}", f"{row['map50_all']:.4f}",
            f"{row['params'] / 1e6:.3f}M{rel('params')}", f"{row['flops'] / 1e9:.3f}G{rel('flops')}",
            _ms(row, "latency_ms_b1", lat_ref),
            *([_ms(row, "latency_ms_b8", lat_ref)] if b8 else []),
            f"{row['size_bytes'] / 2 ** 20:.1f} MiB"]


HEADER = ["stage", "runtime", "mAP@0.5 VOC07", "mAP@0.5 all-pt", "params", "FLOPs",
          "CPU ms (b1)", "size"]
HEADER_B8 = [*HEADER[:-1], "CPU ms (b8)", HEADER[-1]]     # when the report has ONNX rows


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The summary table; params / FLOPs changes are relative to the first row (the baseline),
    latency changes to the first row of the same backend (never across runtimes). The batch-8
    column is there when an ONNX row is (torch rows are timed at batch 1 only)."""
    first: dict[str, dict] = {}
    for r in rows:
        first.setdefault(r.get("backend", "torch"), r)
    b8 = any(r.get("backend", "torch") != "torch" for r in rows)
    header = HEADER_B8 if b8 else HEADER
    cells = [header] + [_fmt_row(r, rows[0], first[r.get("backend", "torch")], b8) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(widths[i]) if i < 2 else v.rjust(widths[i])
                               for i, v in enumerate(c)) for c in cells)


def _markdown(config: Config, rows: Sequence[dict]) -> str:
    onnx = any(r.get("backend") == "onnxruntime" for r in rows)
    out = [f"# {config.name}: compression report", "",
           f"Experiment `{config.source}`; mAP on the val split of "
           f"`{config.require_file('data.descriptor')}` at "
           f"{config.model.img_size}x{config.model.img_size}; CPU latency is the median of "
           f"forward passes with {rows[0].get('latency_threads')} thread(s) in the row's runtime "
           "(torch: the artifact with BatchNorm folded, batch 1"
           + ("; onnxruntime: the .onnx in ONNX Runtime's CPU provider, batch 1 and 8" if onnx
              else "") + "); params / FLOPs changes are relative to the baseline, latency "
           "changes to the first row of the same runtime (never across runtimes).", "",
           format_table(rows, markdown=True), ""]
    for r in rows:
        title = r["stage"] if r.get("backend", "torch") == "torch" else \
            f"{r['stage']} ({_runtime(r)})"
        out += [f"## {title}", "", f"- artifact: `{r['artifact']}` (sha256 `{r['sha256'][:16]}`)"]
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
                                "sparse and finetune (or distill) commands one by one (prune "
                                "runs on one process)")
    paths = run_steps(config, force, latency_iters, redo=redo)
    rows, previous = [], None
    for stage, result in paths.items():
        files = [result.parent / f for f in get_stage(stage).report_files] or [result]
        for path in files:     # an .onnx is scored with the artifact the step before made
            print(f"scoring {stage}: {path}")
            rows.append(score_artifact(config, stage, path, latency_iters, latency_threads,
                                       source=previous))
        previous = result
    js, md = write_report(config, rows)
    print(format_table(rows))
    print(f"report: {md} and {js}")
    return rows
