"""`yolocompress distill`: stage 3 as a training stage -- `build_distill` makes the pruned student
and its teacher from artifacts, the distilled layers from `config.distill`, a `DistillCriterion`
around the detection loss and a `DistillLogHook`; `run_distill` trains it (train_built).

The artifact gets stage `distilled`, the student artifact as parent (lineage), the student's
`prune` record (the cfg is still the pruned one) and a `distill` record {teacher (stage, path,
sha256), layers [{name, teacher (the layer's name in the teacher: after layer pruning, the
source cfg's name), beta, stride, part}], p, fg_mask, output_kd, kd_temperature, box_kd,
box_kd_margin, teacher_bn, decay, ref_size, balance (null, or {share, images, detection_loss,
at: the unweighted start value per layer} when distill.balance set the betas)}.

`run_finetune` (`build_finetune`) is the control it is measured against: the same student,
budget and lr (`distill.epochs` or `.steps`, `distill.lr`), detection loss only, stage `finetuned`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..artifacts import build_model, file_sha256, load_parent
from ..config import Config
from ..errors import YoloCompressError
from ..train.run import DataSplits, StageParts, train_built, uses_letterbox, with_stage_budget
from .distill import (REF_SIZE, DistillCriterion, DistillDecayHook, DistillLogHook, match_layers,
                      resolve_layers)
from .distill_balance import balanced_betas
from .layer_prune import source_names, units_from_record
from .recalibrate import Calibration

__all__ = ["run_distill", "run_finetune", "build_distill", "build_finetune", "default_teacher",
           "distill_command", "finetune_command", "pipeline_step", "finetune_step"]


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
    return train_built(config, "finetuned", force, student=student_artifact)


def run_distill(config: Config, student_artifact: str | os.PathLike,
                teacher_artifact: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Distill `teacher_artifact` (default: the student's parent) into the pruned
    `student_artifact`; returns the path of the stage's best.pt."""
    return train_built(config, "distilled", force, student=student_artifact,
                       teacher=teacher_artifact)


def _student(data: DataSplits, path: str | os.PathLike, stage: str) -> tuple[dict, dict]:
    """(student artifact, the `prune` record its children carry on: the cfg is still pruned)."""
    art = load_parent(path, data.names, stage, role="student")
    return art, ({"prune": art["prune"]} if art.get("prune") is not None else {})


def build_finetune(config: Config, data: DataSplits, student: str | os.PathLike
                   ) -> tuple[Config, StageParts]:
    config = with_stage_budget(config, config.distill, len(data.train))
    student_art, extra = _student(data, student, "finetuned")
    model = build_model(student_art, source=student_art["path"])
    return config, StageParts(model=model, parent=student_art, extra=extra)


def build_distill(config: Config, data: DataSplits, student: str | os.PathLike,
                  teacher: str | os.PathLike | None = None) -> tuple[Config, StageParts]:
    """The student, the frozen teacher, the distilled layers and the DistillCriterion."""
    config = with_stage_budget(config, config.distill, len(data.train))
    dc = config.distill
    student_art, extra = _student(data, student, "distilled")
    teacher_art = load_parent(teacher or default_teacher(student_art), data.names,
                              role="teacher")
    student_model = build_model(student_art, source=student_art["path"])
    teacher_model = build_model(teacher_art, source=teacher_art["path"])
    layers = resolve_layers(student_model.blocks, dc.layers, dc.betas,
                            (dc.beta_backbone, dc.beta_neck, dc.beta_deep))
    names = [n for n, _ in layers]
    units = (student_art.get("prune") or {}).get("units")
    t_names = (source_names(teacher_model.blocks,
                            units_from_record(teacher_model.blocks, units), names)
               if units else names)
    infos = match_layers(teacher_model, student_model, names, t_names)
    balance = None
    if dc.balance is not None:
        calib = Calibration.from_records(data.train, dc.balance_images, config.model.img_size,
                                         uses_letterbox(config, student_model),
                                         config.eval.batch_size)
        betas, measured = balanced_betas(student_model, teacher_model, names, calib, dc.balance,
                                         p=dc.p, fg_mask=dc.fg_mask, teacher_bn=dc.teacher_bn,
                                         teacher_layers=t_names)
        layers = list(zip(names, betas))
        balance = {"share": dc.balance, "images": calib.images, **measured}
    extra["distill"] = {
        "teacher": {"stage": teacher_art["stage"], "path": teacher_art["path"],
                    "sha256": teacher_art["sha256"]},
        "layers": [{"name": n, "teacher": tn, "beta": b, "stride": i.stride, "part": i.part}
                   for (n, b), tn, i in zip(layers, t_names, infos)],
        "p": dc.p, "fg_mask": dc.fg_mask, "output_kd": dc.output_kd,
        "kd_temperature": dc.kd_temperature, "box_kd": dc.box_kd,
        "box_kd_margin": dc.box_kd_margin, "teacher_bn": dc.teacher_bn, "decay": dc.decay,
        "ref_size": REF_SIZE, "balance": balance,
    }

    def wrap(criterion):
        return DistillCriterion(criterion, teacher_model, names, [b for _, b in layers], p=dc.p,
                                fg_mask=dc.fg_mask, output_kd=dc.output_kd,
                                kd_temperature=dc.kd_temperature, teacher_bn=dc.teacher_bn,
                                box_kd=dc.box_kd, box_kd_margin=dc.box_kd_margin,
                                teacher_layers=t_names)

    return config, StageParts(model=student_model, parent=student_art, teacher=teacher_art,
                              hooks=[DistillLogHook()] + ([DistillDecayHook(dc.decay)]
                                                       if dc.decay != "none" else []),
                              criterion_wrapper=wrap, extra=extra)


def distill_command(config: Config, args: Any) -> Path:
    """`yolocompress distill`."""
    return run_distill(config, args.student, args.teacher, force=args.force)


def finetune_command(config: Config, args: Any) -> Path:
    """`yolocompress finetune`."""
    return run_finetune(config, args.student, force=args.force)


def pipeline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """The pipeline's recovery with `pipeline.recovery: distill`: the pruned model, taught by the
    sparse one."""
    return run_distill(config, paths["pruned"], paths["sparse"], force=force)


def finetune_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int) -> Path:
    """The pipeline's recovery by default (`pipeline.recovery: finetune`): the pruned model
    fine-tuned on the detection loss."""
    return run_finetune(config, paths["pruned"], force=force)
