"""`distill.balance`: the attention term's per-layer weights set from the student's starting
point, so that no layer dominates the term and the term starts at a stated share of the
detection loss (instead of the method's fixed betas 1e6 / 1e4 / 1e3).

    betas, measured = balanced_betas(student, teacher, layers, calib, share)

beta_l = share * D / (L * a_l), with D the detection loss and a_l layer l's unweighted AT value
(`at_loss` over REF_SIZE positions, as DistillCriterion computes it), both means over the
calibration images; the student runs as it trains (train mode, BatchNorm on the batch's
statistics, its running statistics left as they are), the teacher as DistillCriterion runs it.
So at the first step every layer contributes share * D / L and the AT term share * D. A layer
where student and teacher already agree (a_l = 0) gets beta 0. The weights depend on the stage's
inputs only (the student artifact, the teacher, a fixed image subset), so a resumed stage
computes the same ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import YoloCompressError
from ..models.darknet import Darknet
from ..train.loss import YoloLoss
from ..train.run import detection_criterion
from .distill import DistillCriterion, batch_statistics
from .recalibrate import Calibration

__all__ = ["balanced_betas"]


@torch.no_grad()
def balanced_betas(student: Darknet, teacher: Darknet, layers: Sequence[str],
                   calib: Calibration, share: float, *, p: float = 2.0, fg_mask: bool = False,
                   teacher_bn: str = "batch", teacher_layers: Sequence[str] | None = None
                   ) -> tuple[list[float], dict]:
    """(one beta per layer, {"detection_loss": D, "at": {layer: a_l}}) for `share` > 0."""
    if not share > 0:
        raise YoloCompressError(f"distill: balance must be > 0, got {share}")
    crit = DistillCriterion(detection_criterion(YoloLoss(student.heads)), teacher, layers,
                            [1.0] * len(layers), p=p, fg_mask=fg_mask, teacher_bn=teacher_bn,
                            teacher_layers=teacher_layers)
    device = next(student.parameters()).device
    det, at = 0.0, [0.0] * len(layers)
    was_training = student.training
    student.train()
    try:
        with batch_statistics(student):
            for images, targets in calib.batches:
                terms = crit(student, (images.to(device).float().div_(255), targets))
                n = images.shape[0]
                det += float(terms["loss"] - terms["at"]) * n
                for k, name in enumerate(layers):
                    at[k] += float(crit.last_layer_terms[name]) * n
    finally:
        student.train(was_training)
    det, at = det / calib.images, [a / calib.images for a in at]
    betas = [share * det / (len(layers) * a) if a > 0 else 0.0 for a in at]
    return betas, {"detection_loss": det, "at": dict(zip(layers, at))}
