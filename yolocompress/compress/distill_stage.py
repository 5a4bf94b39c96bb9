"""`yolocompress distill`: stage 3 as a training stage -- the pruned student and its teacher from
artifacts, the distilled layers from `config.distill`, then `run_stage(config, "distilled", ...)`
with a `DistillCriterion` around the detection loss and a `DistillLogHook`.

The artifact gets stage `distilled`, the student artifact as parent (lineage), the student's
`prune` record (the cfg is still the pruned one) and a `distill` record {teacher (stage, path,
sha256), layers [{name, beta, stride, part}], p, fg_mask, output_kd, kd_temperature, box_kd,
box_kd_margin, teacher_bn, ref_size}.

`run_finetune` is the control it is measured against: the same student, epochs and lr
(`distill.epochs`, `distill.lr`), detection loss only, stage `finetuned`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..artifacts import build_model, file_sha256, load_parent
from ..config import Config
from ..errors import YoloCompressError
from ..train.run import load_data, run_stage, with_stage_budget
from .distill import REF_SIZE, DistillCriterion, DistillLogHook, match_layers, resolve_layers

__all__ = ["run_distill", "run_finetune", "default_teacher", "distill_command",
           "finetune_command", "pipeline_step"]


def default_teacher(student: dict) -> Path:
    """The artifact the student was pruned from (its parent: the stage-1 model), found through
    the student's lineage; it must still be the same file (sha256)."""
    parent = (student.get("lineage") or [None])[-1]
    where = student.get("path", "student")
    if not parent or not parent.get("path"):
        raise YoloCompressError(f"{where}: records no parent artifact to use as the teacher; "
                                f"give the teacher artifact explicitly")
    path = Path(parent["path"])
    if not path.is_file():
        raise YoloCompressError(f"{where}: its parent {path} (the default teacher) is gone; give "
                                f"the teacher artifact explicitly")
    if parent.get("sha256") and file_sha256(path) != parent["sha256"]:
        raise YoloCompressError(f"{path}: changed since the student was pruned from it (sha256 "
                                f"differs); give the teacher artifact explicitly")
    return path


def run_finetune(config: Config, student_artifact: str | os.PathLike, force: bool = False) -> Path:
    """Plain fine-tuning of the pruned `student_artifact` (no teacher) with distill.epochs /
    distill.lr; returns the path of the stage's best.pt (runs/<name>/finetuned/)."""
    config = with_stage_budget(config, config.distill)
    data = load_data(config)
    student_art = load_parent(student_artifact, data.names, "finetuned", role="student")
    student = build_model(student_art, source=student_art["path"])
    extra = {"prune": student_art["prune"]} if student_art.get("prune") is not None else {}
    return run_stage(config, "finetuned", model=student, parent=student_art, extra=extra,
                     force=force, data=data)


def run_distill(config: Config, student_artifact: str | os.PathLike,
                teacher_artifact: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Distill `teacher_artifact` (default: the student's parent) into the pruned
    `student_artifact`; returns the path of the stage's best.pt."""
    config = with_stage_budget(config, config.distill)
    dc = config.distill
    data = load_data(config)
    student_art = load_parent(student_artifact, data.names, "distilled", role="student")
    teacher_art = load_parent(teacher_artifact or default_teacher(student_art), data.names,
                              role="teacher")
    student = build_model(student_art, source=student_art["path"])
    teacher = build_model(teacher_art, source=teacher_art["path"])
    layers = resolve_layers(student.blocks, dc.layers, dc.betas,
                            (dc.beta_backbone, dc.beta_neck, dc.beta_deep))
    names = [n for n, _ in layers]
    infos = match_layers(teacher, student, names)
    record = {
        "teacher": {"stage": teacher_art["stage"], "path": teacher_art["path"],
                    "sha256": teacher_art["sha256"]},
        "layers": [{"name": n, "beta": b, "stride": i.stride, "part": i.part}
                   for (n, b), i in zip(layers, infos)],
        "p": dc.p, "fg_mask": dc.fg_mask, "output_kd": dc.output_kd,
        "kd_temperature": dc.kd_temperature, "box_kd": dc.box_kd,
        "box_kd_margin": dc.box_kd_margin, "teacher_bn": dc.teacher_bn, "ref_size": REF_SIZE,
    }
    extra = {"distill": record}
    if student_art.get("prune") is not None:
        extra["prune"] = student_art["prune"]

    def wrap(criterion):
        return DistillCriterion(criterion, teacher, names, [b for _, b in layers], p=dc.p,
                                fg_mask=dc.fg_mask, output_kd=dc.output_kd,
                                kd_temperature=dc.kd_temperature, teacher_bn=dc.teacher_bn,
                                box_kd=dc.box_kd, box_kd_margin=dc.box_kd_margin)

    return run_stage(config, "distilled", model=student, parent=student_art, teacher=teacher_art,
                     hooks=[DistillLogHook()], criterion_wrapper=wrap, extra=extra, force=force,
                     data=data)


def distill_command(config: Config, args: Any) -> Path:
    """`yolocompress distill`."""
    return run_distill(config, args.student, args.teacher, force=args.force)


def finetune_command(config: Config, args: Any) -> Path:
    """`yolocompress finetune`."""
    return run_finetune(config, args.student, force=args.force)


def pipeline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """The pipeline's distillation: the pruned model, taught by the sparse one."""
    return run_distill(config, paths["pruned"], paths["sparse"], force=force)
