"""distill.balance: per-layer AT weights from the student's start (compress/distill_balance.py)."""
from __future__ import annotations

import copy

import pytest
import torch

from yolocompress.compress.distill import DistillCriterion, batch_statistics
from yolocompress.compress.distill_balance import balanced_betas
from yolocompress.compress.recalibrate import Calibration
from yolocompress.errors import YoloCompressError
from yolocompress.train.loss import YoloLoss
from yolocompress.train.run import detection_criterion

from test_distill import SIZE, _images, _names, _nano_pair, _targets, distill_experiment


@pytest.fixture(scope="module")
def pair():
    return _nano_pair()


def _calib(n: int = 6, per_batch: int = 3) -> Calibration:
    images = (_images(n, seed=7) * 255).round().to(torch.uint8)
    targets = _targets(n)
    batches = []
    for start in range(0, n, per_batch):
        rows = targets[(targets[:, 0] >= start) & (targets[:, 0] < start + per_batch)].clone()
        rows[:, 0] -= start
        batches.append((images[start:start + per_batch], rows))
    return Calibration(tuple(batches))


def _terms(student, teacher, names, betas, calib):
    """Image-weighted means over calib of the detection loss and each beta-weighted layer term,
    the student training on batch statistics."""
    crit = DistillCriterion(detection_criterion(YoloLoss(student.heads)), teacher, names, betas)
    det, layer = 0.0, dict.fromkeys(names, 0.0)
    student.train()
    with torch.no_grad(), batch_statistics(student):
        for images, targets in calib.batches:
            terms = crit(student, (images.float() / 255, targets))
            det += float(terms["loss"] - terms["at"]) * len(images)
            for k, v in crit.last_layer_terms.items():
                layer[k] += float(v) * len(images)
    return det / calib.images, {k: v / calib.images for k, v in layer.items()}


def test_balanced_betas_give_every_layer_the_same_share_of_the_stated_total(pair):
    teacher, student = pair
    student = copy.deepcopy(student).eval()
    names, calib = _names(student), _calib()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    betas, measured = balanced_betas(student, teacher, names, calib, 0.1)
    # the student is left as it was: eval mode, running statistics untouched
    assert not student.training
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())
    det, unweighted = _terms(student, teacher, names, [1.0] * len(names), calib)
    assert measured["detection_loss"] == pytest.approx(det, rel=1e-5)
    assert measured["at"] == pytest.approx(unweighted, rel=1e-5)
    assert betas == pytest.approx([0.1 * det / (len(names) * unweighted[n]) for n in names])
    # with these betas each layer starts at share * D / L, the term at share * D
    _, weighted = _terms(student, teacher, names, betas, calib)
    assert list(weighted.values()) == pytest.approx([0.1 * det / len(names)] * len(names),
                                                    rel=1e-4)
    assert sum(weighted.values()) == pytest.approx(0.1 * det, rel=1e-4)
    # the layers' starting values differ by orders of magnitude, so the weights do too
    assert max(betas) / min(betas) > 10


def test_layers_where_student_and_teacher_agree_get_no_weight_and_share_must_be_positive(pair):
    teacher = pair[0]
    names = _names(teacher)
    twin = copy.deepcopy(teacher)
    betas, measured = balanced_betas(twin, teacher, names, _calib(), 0.5)
    assert betas == [0.0] * len(names) and all(v < 1e-10 for v in measured["at"].values())
    for bad in (0.0, -1.0):
        with pytest.raises(YoloCompressError, match="balance must be > 0"):
            balanced_betas(twin, teacher, names, _calib(), bad)


def test_distill_stage_records_the_balanced_betas_it_trains_with(pair, tmp_path):
    from yolocompress.compress.distill_stage import build_distill
    from yolocompress.config import load_config
    from yolocompress.train.run import load_data, uses_letterbox
    teacher, student = pair
    exp, _, s_path = distill_experiment(tmp_path, teacher, student,
                                        {"layers": ["conv46", "conv100"], "balance": 0.2,
                                         "balance_images": 5})
    config = load_config(exp)
    data = load_data(config)
    _, parts = build_distill(config, data, s_path)
    record = parts.extra["distill"]
    calib = Calibration.from_records(data.train, 5, SIZE, uses_letterbox(config, student),
                                     config.eval.batch_size)
    want, measured = balanced_betas(copy.deepcopy(student), teacher, ["conv46", "conv100"],
                                    calib, 0.2)
    assert [x["beta"] for x in record["layers"]] == pytest.approx(want, rel=1e-5)
    assert record["balance"]["share"] == 0.2 and record["balance"]["images"] == 5
    assert record["balance"]["detection_loss"] == pytest.approx(measured["detection_loss"],
                                                                rel=1e-5)
    crit = parts.criterion_wrapper(detection_criterion(YoloLoss(student.heads)))
    assert crit.betas == pytest.approx(want, rel=1e-5)
    # off by default: the method's betas, no balance record
    _, plain = build_distill(load_config(exp, ["distill.balance=null"]), data, s_path)
    assert plain.extra["distill"]["balance"] is None
    assert [x["beta"] for x in plain.extra["distill"]["layers"]] == [1e6, 1e4]


@pytest.mark.parametrize("override, problem", [
    (["distill.balance=0"], "balance: must be > 0 or null"),
    (["distill.betas=[1.0,2.0]"], "balance: replaces betas: give one of the two"),
    (["distill.balance_images=0"], "balance_images: must be >= 1")])
def test_balance_settings_are_checked(pair, tmp_path, override, problem):
    from yolocompress.config import load_config
    exp, _, _ = distill_experiment(tmp_path, *pair, {"layers": ["conv46", "conv100"],
                                                     "balance": 0.2})
    with pytest.raises(YoloCompressError, match=problem):
        load_config(exp, override)
