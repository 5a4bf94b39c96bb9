"""Stage 3: attention maps and AT loss by hand, the method's layers by role, teacher/student
matching on a pruned yolov4-nano, DistillCriterion (one student forward, frozen eval teacher,
gradients, autocast, DDP) and a short distillation run that lowers the AT term."""
from __future__ import annotations

import copy
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from yolocompress.compress.distill import (DEFAULT_BETAS, DistillCriterion, DistillDecayHook,
                                           DistillLogHook, at_loss, attention_map, batch_statistics, box_mask,
                                           bounded_box_kd,
                                           default_distill_layers, logit_kd, match_layers,
                                           decay_factor, ref_positions, resolve_layers)
from yolocompress.compress.layer_prune import (masked_units_state, remove_units, residual_units,
                                               source_names)
from yolocompress.compress.prune import make_masks, prune
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.models.heads import HeadSpec
from yolocompress.train.engine import Trainer
from yolocompress.train.loss import YoloLoss
from yolocompress.train.optim import build_optimizer
from yolocompress.train.run import detection_criterion

from conftest import TINY_CFG, cfg_path

SIZE = 64


# ---- attention maps and the loss, by hand ---------------------------------------------------

def test_attention_map_is_the_normalised_channel_mean_of_powers():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]],
                       [[-1.0, 0.0], [1.0, 2.0]]]])             # (1, 2, 2, 2)
    # p=2: mean of squares per position = [1, 2, 5, 2], norm sqrt(34)
    assert torch.allclose(attention_map(f), torch.tensor([[1.0, 2.0, 5.0, 2.0]]) / math.sqrt(34))
    # p=1: mean |F| = [1, 1, 2, 1], norm sqrt(7)
    assert torch.allclose(attention_map(f, p=1),
                          torch.tensor([[1.0, 1.0, 2.0, 1.0]]) / math.sqrt(7))
    # any channel count: 3 copies of the same channels give the same map
    assert torch.allclose(attention_map(f.repeat(1, 3, 1, 1)), attention_map(f))
    # a mask zeroes positions before normalising: [1, 0, 5, 0] / sqrt(26)
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert torch.allclose(attention_map(f, mask=mask),
                          torch.tensor([[1.0, 0, 5.0, 0]]) / math.sqrt(26))
    assert attention_map(f.half()).dtype == torch.float32
    with pytest.raises(YoloCompressError, match="B, C, H, W"):
        attention_map(f[0])


def test_at_loss_is_the_mean_squared_difference_of_the_maps():
    ft = torch.zeros(2, 3, 2, 2)
    ft[:, :, 0, 0] = 1.0                       # Q_t = [1, 0, 0, 0] for both images
    fs = torch.zeros(2, 5, 2, 2)
    fs[0, :, 0, 1] = 2.0                       # image 0: Q_s = [0, 1, 0, 0], ||dQ||^2 = 2
    fs[1, :, 0, 0] = 3.0                       # image 1: Q_s = Q_t, ||dQ||^2 = 0
    # mean over batch of ||dQ||^2 = 1; the method's mean over positions divides by H*W = 4
    assert at_loss(fs, ft).item() == pytest.approx(0.25)
    qs, qt = attention_map(fs), attention_map(ft)
    assert at_loss(fs, ft).item() == pytest.approx((qs - qt).pow(2).mean().item())
    assert at_loss(fs, ft, positions=10.0).item() == pytest.approx(0.1)
    assert at_loss(ft, ft).item() == 0.0
    assert ref_positions(16) == 26 ** 2 and ref_positions(32) == 13 ** 2
    with pytest.raises(YoloCompressError, match="spatial size"):
        at_loss(fs, torch.zeros(2, 3, 4, 4))


def test_box_mask_marks_the_cells_a_box_overlaps_or_centres_in():
    targets = torch.tensor([[0, 1, 10.0, 20.0, 40.0, 30.0],     # image 0
                            [1, 0, 33.0, 33.0, 33.5, 33.5],     # image 1: tiny box, one cell
                            [1, 0, 16.0, 16.0, 32.0, 32.0]])    # image 1: exactly cell (1, 1)
    m = box_mask(targets, 3, (4, 4), (64, 64))                  # stride 16
    want = torch.zeros(3, 4, 4)
    want[0, 1, 0:3] = 1                 # x 10..40 -> columns 0-2, y 20..30 -> row 1
    want[1, 2, 2] = 1
    want[1, 1, 1] = 1
    assert torch.equal(m, want)         # image 2 has no box: all zero
    assert torch.equal(box_mask(torch.zeros(0, 6), 2, (4, 4), (64, 64)), torch.zeros(2, 4, 4))


def test_logit_kd_is_the_binary_kl_by_hand():
    spec = HeadSpec(name="yolo1", index=1, stride=32, classes=1, mask=(0,),
                    all_anchors=np.array([[8.0, 8.0]], dtype=np.float32))
    s = torch.zeros(1, 6, 1, 1)
    t = torch.zeros(1, 6, 1, 1)
    t[0, 4] = t[0, 5] = math.log(3.0)                   # teacher p = 0.75, student p = 0.5
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # 0.130812
    # objectness KL + class KL weighted by the teacher's objectness 0.75
    assert logit_kd([s], [t], [spec]).item() == pytest.approx(kl * 1.75, rel=1e-5)
    assert logit_kd([t], [t], [spec]).item() == pytest.approx(0.0, abs=1e-7)
    # temperature: T^2 * KL of the tempered probabilities
    pt, ps = torch.sigmoid(torch.tensor(math.log(3.0) / 2)).item(), 0.5
    kl2 = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    assert logit_kd([s], [t], [spec], temperature=2.0).item() == pytest.approx(
        4 * (kl2 + kl2 * 0.75), rel=1e-5)


# ---- which layers ---------------------------------------------------------------------------

def test_default_layers_on_yolov4_are_the_methods_nine():
    # By hand from cfg/models/yolov4.cfg: CSP stage outputs (the 1x1 conv after each stage's
    # concat route) conv10 (s2), conv23 (s4), conv54 (s8), conv85 (s16); conv117 is the s32 1x1
    # before upsample118, conv127 the s16 1x1 before upsample128; conv137/148/159 the 3x3 convs
    # before the detection convs 138/149/160. The authors' code lists them as BN-conv numbers
    # 7, 16, 37, 58, 78, 85, 92, 99, 106 with beta 1e6 (backbone), 1e3 (78, 106), 1e4 (rest).
    got = default_distill_layers(read_cfg(cfg_path("yolov4")))
    assert got == [("conv10", 1e6), ("conv23", 1e6), ("conv54", 1e6), ("conv85", 1e6),
                   ("conv117", 1e3), ("conv127", 1e4), ("conv137", 1e4), ("conv148", 1e4),
                   ("conv159", 1e3)]


@pytest.mark.parametrize("name, want", [
    ("yolov4-nano", ["conv10", "conv20", "conv33", "conv46", "conv69", "conv79", "conv89",
                     "conv100", "conv111"]),
    ("yolov4-tiny", ["conv0", "route8", "route16", "route24", "conv28", "conv32", "conv35"]),
    ("yolov3", ["shortcut4", "shortcut11", "shortcut36", "shortcut61", "conv80", "conv84",
                "conv92", "conv96", "conv104"]),
])
def test_default_layers_on_other_cfgs(name, want):
    blocks = read_cfg(cfg_path(name))
    got = default_distill_layers(blocks)
    assert [n for n, _ in got] == want
    infos = {i.name: i for i in Darknet(blocks).infos}
    backbone, neck, deep = DEFAULT_BETAS
    assert (backbone, neck, deep) == (1e6, 1e4, 1e3)
    for n, beta in got:
        i = infos[n]
        assert beta == (backbone if i.part == "backbone" else neck if i.stride < 32 else deep), n


def test_resolve_layers_overrides_and_errors():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    assert resolve_layers(blocks) == default_distill_layers(blocks)
    assert resolve_layers(blocks, ["conv46", "conv111"]) == [("conv46", 1e6), ("conv111", 1e3)]
    assert resolve_layers(blocks, ["conv46", "conv111"], [2.0, 3.0]) == [("conv46", 2.0),
                                                                        ("conv111", 3.0)]
    assert resolve_layers(blocks, ["conv89"], rule=(1.0, 2.0, 3.0)) == [("conv89", 2.0)]
    for kw, msg in [(dict(names=["conv999"]), "no layer named 'conv999'"),
                    (dict(names=["conv46"], betas=[1.0, 2.0]), "1 layers but 2 betas"),
                    (dict(betas=[1.0]), "without layers"),
                    (dict(names=["conv46", "conv46"]), "named twice"),
                    (dict(names=["conv46"], betas=[-1.0]), ">= 0")]:
        with pytest.raises(YoloCompressError, match=re.escape(msg)):
            resolve_layers(blocks, **kw)


# ---- a teacher and its pruned student --------------------------------------------------------

def _nano_pair(percent: float = 0.5, seed: int = 0) -> tuple[Darknet, Darknet]:
    """Random-init yolov4-nano teacher with random BN gammas (BN statistics calibrated on random
    images, so eval mode is sane) and its channel-pruned copy."""
    torch.manual_seed(seed)
    teacher = Darknet(read_cfg(cfg_path("yolov4-nano")))
    teacher.initialize()
    g = torch.Generator().manual_seed(seed)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data = torch.rand(m.weight.shape, generator=g) + 0.05
            m.momentum = None                         # cumulative average over the passes
            m.reset_running_stats()
    teacher.train()
    with torch.no_grad():
        for k in range(3):
            teacher(_images(8, seed=100 + k))
    teacher.eval()
    sd = teacher.state_dict()
    groups_percent = [percent] * 5
    keep = make_masks(teacher.blocks, sd, None, groups_percent, min_channels=2)
    blocks, state = prune(teacher.blocks, sd, keep)
    student = Darknet(blocks)
    student.load_state_dict(state)
    return teacher, student


def _images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] (upsampled noise), so attention maps have structure."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, SIZE // 8, SIZE // 8, generator=g), size=SIZE,
                         mode="bilinear", align_corners=False)


def _targets(n: int) -> torch.Tensor:
    rows = [[b, b % 6, 8.0 + 3 * b, 10.0, 40.0 + 2 * b, 50.0] for b in range(n)]
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def pair():
    return _nano_pair()


def _names(model: Darknet) -> list[str]:
    return [n for n, _ in default_distill_layers(model.blocks)]


def test_pruned_nano_matches_the_teacher_layer_by_layer(pair):
    teacher, student = pair
    names = _names(student)
    assert len(names) == 9 and names == _names(teacher)
    infos = match_layers(teacher, student, names)
    assert [i.name for i in infos] == names
    x = _images(2)
    with torch.no_grad():
        _, ft = teacher(x, features=names)
        _, fs = student(x, features=names)
    for n in names:
        assert fs[n].shape[-2:] == ft[n].shape[-2:], n
    assert any(fs[n].shape[1] < ft[n].shape[1] for n in names)      # really pruned
    with pytest.raises(YoloCompressError, match="'conv999' is not in the teacher"):
        match_layers(teacher, student, ["conv999"])
    other = Darknet(read_cfg(TINY_CFG))             # its conv0 has stride 2, nano's stride 1
    with pytest.raises(YoloCompressError, match="layer 'conv0' is a stride-1 convolutional in "
                                                "the teacher but a stride-2 convolutional"):
        match_layers(teacher, other, ["conv0"])


def test_layer_pruned_student_is_matched_to_the_teacher_layers_by_source_name():
    blocks = read_cfg(cfg_path("yolov4-nano"))
    teacher = Darknet(blocks)
    units = residual_units(blocks)[:2]             # shortcut7 and shortcut17: names shift by 6
    # the teacher with the units' branches zeroed equals the student without them
    teacher.load_state_dict(masked_units_state(blocks, teacher.state_dict(), units))
    s_blocks, s_state = remove_units(blocks, teacher.state_dict(), units)
    student = Darknet(s_blocks)
    student.load_state_dict(s_state)
    names = _names(student)
    t_names = source_names(blocks, units, names)
    assert t_names == _names(teacher) and names[:2] == ["conv7", "conv14"] \
        and t_names[:2] == ["conv10", "conv20"]
    assert [i.name for i in match_layers(teacher, student, names, t_names)] == names
    batch = (_images(2), _targets(2), None)
    terms = DistillCriterion(detection_criterion(YoloLoss(teacher.heads)), teacher, names,
                             [1e6] * len(names), teacher_layers=t_names)(student.train(), batch)
    assert terms["at"].item() == pytest.approx(0.0, abs=1e-6)
    # by the student's names alone: the teacher's layer 7 is shortcut7
    with pytest.raises(YoloCompressError, match="layer 'conv7' is not in the teacher"):
        match_layers(teacher, student, names)


def _criterion(teacher, names, **kw):
    betas = [b for _, b in resolve_layers(teacher.blocks, names)]
    det = detection_criterion(YoloLoss(teacher.heads))
    return DistillCriterion(det, teacher, names, betas, **kw)


def test_identical_student_gives_zero_and_pruned_student_positive(pair):
    teacher, student = pair
    names = _names(student)
    batch = (_images(4), _targets(4), None)
    same = copy.deepcopy(teacher).train()       # as a student trains: BN on batch statistics
    terms = _criterion(teacher, names, output_kd=1.0)(same, batch)
    assert terms["at"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["kd"].item() == pytest.approx(0.0, abs=1e-3)
    crit = _criterion(teacher, names, output_kd=1.0)
    student.eval()
    terms = crit(student, batch)
    assert terms["at"].item() > 0 and terms["kd"].item() > 0
    assert set(terms) == {"box", "obj", "cls", "at", "kd", "loss"}
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in terms if k != "loss"),
                                                 rel=1e-5)
    # per-layer values live on the criterion, beta-weighted, and sum to "at"
    assert list(crit.last_layer_terms) == names
    assert sum(v.item() for v in crit.last_layer_terms.values()) == pytest.approx(
        terms["at"].item(), rel=1e-5)
    # detection terms are the student's own, from its single forward
    plain = detection_criterion(YoloLoss(student.heads))(student, batch)
    for k in ("box", "obj", "cls"):
        assert terms[k].item() == pytest.approx(plain[k].item(), rel=1e-5)


def test_decay_factor_by_hand():
    assert [decay_factor("none", t) for t in (0, 0.5, 1)] == [1.0, 1.0, 1.0]
    assert [decay_factor("linear", t) for t in (0, 0.25, 1, 1.5)] == [1.0, 0.75, 0.0, 0.0]
    assert decay_factor("cosine", 0.0) == 1.0 and decay_factor("cosine", 0.5) == pytest.approx(0.5)
    assert decay_factor("cosine", 0.25) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    assert decay_factor("cosine", 1.0) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(YoloCompressError, match="decay must be one of"):
        decay_factor("step", 0.5)
    with pytest.raises(YoloCompressError, match="decay must be one of"):
        DistillDecayHook("exp")


def test_scale_weights_every_distillation_term_and_only_those(pair):
    teacher, student = pair
    names = _names(student)
    batch = (_images(4), _targets(4), None)
    student.eval()
    crit = _criterion(teacher, names, output_kd=1.0, box_kd=1.0)
    full = {k: v.item() for k, v in crit(student, batch).items()}
    crit.scale = 0.25
    part = {k: v.item() for k, v in crit(student, batch).items()}
    for k in ("at", "kd", "box_kd"):
        assert full[k] > 0 and part[k] == pytest.approx(0.25 * full[k], rel=1e-5)
    for k in ("box", "obj", "cls"):
        assert part[k] == pytest.approx(full[k], rel=1e-6)
    crit.scale = 0.0                   # the end of a decayed recovery: plain fine-tuning
    end = {k: v.item() for k, v in crit(student, batch).items()}
    assert end["loss"] == pytest.approx(end["box"] + end["obj"] + end["cls"], rel=1e-6)


def test_decay_hook_sets_the_weight_from_the_trainers_progress():
    class Trainer:                     # what the hook reads and writes
        criterion = type("C", (), {"scale": 1.0})()
        progress = 0.0

    hook, trainer = DistillDecayHook("linear"), Trainer()
    hook.trainer = trainer
    for progress, want in ((0.0, 1.0), (0.4, 0.6), (1.0, 0.0)):
        trainer.progress = progress
        hook.before_step()
        assert trainer.criterion.scale == pytest.approx(want)
    assert hook.state_dict() == {}     # a resume recomputes it from the step count


def test_one_student_forward_frozen_eval_teacher_and_gradients(pair):
    teacher, student = pair
    teacher, student = copy.deepcopy(teacher), copy.deepcopy(student)
    names = _names(student)
    crit = _criterion(teacher, names)
    calls = []
    student.register_forward_pre_hook(lambda m, args: calls.append(1))
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    teacher.train()                                # as if someone called train() on everything
    student.train()
    terms = crit(student, (_images(4), _targets(4), None))
    assert len(calls) == 1
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())
    sum(v for k, v in terms.items() if k != "loss").backward()
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # the AT term alone reaches the student's backbone
    student.zero_grad()
    crit(student, (_images(4), _targets(4), None))["at"].backward()
    assert student.layers[10].conv.weight.grad.abs().sum() > 0


def test_batch_statistics_normalises_with_the_batch_and_keeps_the_running_stats(pair):
    teacher = copy.deepcopy(pair[0]).eval()
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    x = _images(4)
    reference = copy.deepcopy(teacher).train()      # plain train mode: batch statistics
    with torch.no_grad():
        want = reference(x, features=["conv46"])[1]["conv46"]
        with batch_statistics(teacher):
            got = teacher(x, features=["conv46"])[1]["conv46"]
        stored = teacher(x, features=["conv46"])[1]["conv46"]
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(stored, want, atol=1e-3)      # the running stats differ here
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())
    bns = [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training and m.track_running_stats for m in bns)   # restored


def test_default_batch_teacher_compares_a_training_student_in_the_same_regime(pair):
    teacher = copy.deepcopy(pair[0])
    names = _names(teacher)
    batch = (_images(4), _targets(4), None)
    same = copy.deepcopy(teacher).train()           # the student as it trains: batch statistics
    stats = {k: v.clone() for k, v in teacher.state_dict().items() if "running" in k}
    with torch.no_grad():
        eval_at = _criterion(teacher, names, teacher_bn="eval")(same, batch)["at"].item()
        batch_at = _criterion(teacher, names)(same, batch)["at"].item()     # the default
    assert batch_at == pytest.approx(0.0, abs=1e-6)
    assert eval_at > 1e-3                          # the BN-regime gap "eval" makes it learn
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in stats.items())
    assert not teacher.training and all(not m.training for m in teacher.modules())


def test_bounded_box_kd_is_the_box_loss_where_the_student_is_worse(pair):
    teacher = pair[0]
    x, targets, size = _images(4), _targets(4), (SIZE, SIZE)
    with torch.no_grad():
        clean = teacher(x, features=["conv10"])[0]
    g = torch.Generator().manual_seed(5)
    noisy = [h + 0.5 * torch.randn(h.shape, generator=g) for h in clean]
    specs = teacher.heads
    assert all(h.iou_loss == "ciou" and h.iou_normalizer == 0.07 for h in specs)
    # margin 10: every pair counts, so it is the detection loss's CIoU box term without its gain
    box = YoloLoss(specs)(clean, targets, size)["box"].item()
    assert bounded_box_kd(clean, clean, specs, targets, size, margin=10.0).item() == \
        pytest.approx(box / 0.07, rel=1e-4)
    assert bounded_box_kd(clean, clean, specs, targets, size).item() == 0.0    # not worse
    # margin 0: a pair counts for whichever side is worse, so the two directions split the pairs
    sum_clean = bounded_box_kd(clean, noisy, specs, targets, size, margin=10.0).item()
    sum_noisy = bounded_box_kd(noisy, clean, specs, targets, size, margin=10.0).item()
    both = (bounded_box_kd(clean, noisy, specs, targets, size).item()
            + bounded_box_kd(noisy, clean, specs, targets, size).item())
    assert max(sum_clean, sum_noisy) <= both + 1e-4 and both <= sum_clean + sum_noisy + 1e-4
    assert 0 < bounded_box_kd(noisy, clean, specs, targets, size).item() < sum_noisy + 1e-4
    # gradients reach the student's outputs only
    student_out = [h.clone().requires_grad_(True) for h in noisy]
    bounded_box_kd(student_out, clean, specs, targets, size).backward()
    assert any(h.grad is not None and h.grad.abs().sum() > 0 for h in student_out)


def test_criterion_box_kd_term(pair):
    teacher, student = pair
    names = _names(student)
    batch = (_images(2), _targets(2), None)
    student.eval()
    terms = _criterion(teacher, names, box_kd=2.0, box_kd_margin=10.0)(student, batch)
    assert terms["box_kd"].item() > 0
    assert terms["loss"].item() == pytest.approx(sum(terms[k].item() for k in terms
                                                     if k != "loss"), rel=1e-5)


def test_fg_mask_restricts_attention_to_boxes(pair):
    teacher, student = pair
    names = _names(student)
    student.eval()
    images = _images(2)
    empty = _criterion(teacher, names, fg_mask=True)(student, (images, torch.zeros(0, 6), None))
    assert empty["at"].item() == 0.0             # no boxes: nothing to compare
    boxes = _criterion(teacher, names, fg_mask=True)(student, (images, _targets(2), None))
    full = _criterion(teacher, names)(student, (images, _targets(2), None))
    assert 0 < boxes["at"].item() and boxes["at"].item() != pytest.approx(full["at"].item())


def test_at_is_float32_under_autocast(pair):
    teacher, student = pair
    names = _names(student)
    student.eval()
    batch = (_images(2), _targets(2), None)
    ref = _criterion(teacher, names)(student, batch)["at"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _criterion(teacher, names)(student, batch)["at"]
    assert low.dtype == torch.float32 and math.isfinite(low.item())
    assert low.item() == pytest.approx(ref.item(), rel=0.1)


def test_ddp_wrapped_student_gives_the_same_terms_and_gradients(pair, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    teacher, student = pair
    names = _names(student)
    batch = (_images(2), _targets(2), None)
    plain = copy.deepcopy(student).train()
    ref = _criterion(teacher, names)(plain, batch)
    ref["at"].backward()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        wrapped = DistributedDataParallel(copy.deepcopy(student).train())
        got = _criterion(teacher, names)(wrapped, batch)
        got["at"].backward()
    finally:
        dist.destroy_process_group()
    assert got["at"].item() == pytest.approx(ref["at"].item(), rel=1e-5)
    for k in ("box", "obj", "cls"):
        assert got[k].item() == pytest.approx(ref[k].item(), rel=1e-5)
    w = wrapped.module.layers[10].conv.weight.grad
    assert torch.allclose(w, plain.layers[10].conv.weight.grad, rtol=1e-4, atol=1e-8)


def test_spatial_size_mismatch_is_a_clear_error(pair):
    teacher, student = pair
    names = _names(student)

    class Shrunk(Darknet):       # a teacher whose conv46 comes out at half the resolution
        def forward(self, x, features=()):
            heads, feats = super().forward(x, features)
            feats["conv46"] = F.avg_pool2d(feats["conv46"], 2)
            return heads, feats

    bad = Shrunk(teacher.blocks)
    bad.load_state_dict(teacher.state_dict())
    with pytest.raises(YoloCompressError, match=re.escape("layer 'conv46' is (4, 4) in the "
                                                          "student but (2, 2) in the teacher")):
        _criterion(bad, names)(student.eval(), (_images(2), _targets(2), None))


def test_criterion_rejects_bad_settings(pair):
    teacher, _ = pair
    det = detection_criterion(YoloLoss(teacher.heads))
    for kw, msg in [(dict(layers=[], betas=[]), "no layers"),
                    (dict(layers=["conv10"], betas=[1.0, 2.0]), "1 layers but 2 betas"),
                    (dict(layers=["conv10"], betas=[1.0], p=0), "p must be > 0"),
                    (dict(layers=["conv10"], betas=[1.0], output_kd=-1.0), "output_kd"),
                    (dict(layers=["conv10"], betas=[1.0], kd_temperature=0), "kd_temperature"),
                    (dict(layers=["conv10"], betas=[1.0], teacher_bn="train"), "teacher_bn"),
                    (dict(layers=["conv10"], betas=[1.0], box_kd=-1.0), "box_kd")]:
        with pytest.raises(YoloCompressError, match=msg):
            DistillCriterion(det, teacher, **kw)


# ---- a short distillation run ---------------------------------------------------------------

def test_short_distillation_run_lowers_the_at_loss():
    teacher, student = _nano_pair(percent=0.6, seed=1)
    names = _names(student)
    batches = [(_images(4, seed=k), _targets(4), None) for k in range(4)]
    crit = _criterion(teacher, names)

    def at_now() -> float:       # mean AT over the training batches, student as in training
        probe = copy.deepcopy(student).train()           # keeps the BN statistics untouched
        with torch.no_grad():
            return float(np.mean([crit(probe, b)["at"].item() for b in batches]))

    before = at_now()
    trainer = Trainer(student, crit, build_optimizer(student, "adam", lr=2e-3, weight_decay=0.0),
                      batches, epochs=8, hooks=[DistillLogHook()], seed=0, progress=False)
    storage = trainer.train()
    after = at_now()
    assert trainer.iter == 32
    assert after < 0.5 * before, (before, after)
    # the log hook's per-layer epoch means add up to the epoch mean of "at"
    per_layer = [storage[f"at/{n}"] for n in names]
    assert sum(per_layer) == pytest.approx(storage["train/at"], rel=1e-4)
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_wrapped_criterion_contract(pair):
    teacher, student = pair
    names = _names(student)
    batch = (_images(2), _targets(2), None)
    only_loss = DistillCriterion(lambda m, b: {"loss": m(b[0])[0].square().mean()}, teacher,
                                 names, [1.0] * len(names))
    terms = only_loss(student.eval(), batch)        # a lone "loss" is a term: kept as "det"
    assert set(terms) == {"det", "at", "loss"}
    assert terms["loss"].item() == pytest.approx(terms["det"].item() + terms["at"].item(),
                                                 rel=1e-5)
    other = DistillCriterion(lambda m, b: {"x": m(b[0] * 2)[0].mean()}, teacher, names,
                             [1.0] * len(names))
    with pytest.raises(YoloCompressError, match="on the batch images only"):
        other(student, batch)


# ---- the stage ------------------------------------------------------------------------------

def distill_experiment(tmp_path, teacher, student, distill: dict, **student_record):
    """(exp.yaml, teacher path, student path): an experiment on a tiny generated set with the
    `distill` section, the teacher as a sparse artifact and the student as the pruned artifact
    made from it (with `student_record`, e.g. prune=...)."""
    import yaml

    from yolocompress.artifacts import artifact_from_model, save_artifact
    from yolocompress.data.synthetic import DEMO_CLASSES, generate_demo
    names = list(DEMO_CLASSES)
    generate_demo(tmp_path / "demo", seed=3, n_train=8, n_val=4, img_size=SIZE)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump({
        "format": "voc", "root": "demo", "train": ["demo/train"], "val": ["demo/val"],
        "names": names}))
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump({
        "model": {"cfg": str(cfg_path("yolov4-nano")), "img_size": SIZE},
        "data": {"descriptor": "demo.yaml", "workers": 0},
        "train": {"epochs": 1, "batch_size": 4, "nominal_batch": 4, "burn_in": 1,
                  "eval_interval": 1, "multi_scale": False, "out_dir": str(tmp_path / "runs")},
        "distill": distill}))
    t_path, s_path = tmp_path / "sparse.pt", tmp_path / "pruned.pt"
    sha = save_artifact(artifact_from_model(teacher, "sparse", names), t_path)
    save_artifact(artifact_from_model(student, "pruned", names, parent=sha,
                                      lineage=[{"stage": "sparse", "sha256": sha,
                                                "path": str(t_path)}], **student_record), s_path)
    return tmp_path / "exp.yaml", t_path, s_path


def test_run_distill_stage_end_to_end(tmp_path, pair):
    from yolocompress.artifacts import (artifact_from_model, file_sha256, load_artifact,
                                        save_artifact)
    from yolocompress.compress.distill_stage import run_distill
    from yolocompress.config import load_config
    from yolocompress.data.synthetic import DEMO_CLASSES
    teacher, student = pair
    names = list(DEMO_CLASSES)
    _, t_path, s_path = distill_experiment(
        tmp_path, teacher, student,
        {"layers": ["conv46", "conv100"], "output_kd": 0.5, "teacher_bn": "batch", "box_kd": 1.0,
         "decay": "cosine"}, prune={"version": 1})
    sha = file_sha256(t_path)
    best = load_artifact(run_distill(load_config(tmp_path / "exp.yaml"), s_path))
    assert best["stage"] == "distilled" and best["parent"] == file_sha256(s_path)
    assert best["prune"] == {"version": 1} and best["lineage"][-1]["stage"] == "pruned"
    record = best["distill"]
    assert record["teacher_bn"] == "batch" and record["box_kd"] == 1.0
    assert record["decay"] == "cosine"
    assert record["teacher"]["sha256"] == sha               # the default teacher: the parent
    assert [(x["name"], x["beta"]) for x in record["layers"]] == [("conv46", 1e6),
                                                                 ("conv100", 1e4)]
    log = (tmp_path / "runs" / "exp" / "distilled" / "train_log.csv").read_text()
    assert all(k in log.splitlines()[0] for k in ("train/at", "train/kd", "train/box_kd",
                                                  "at/conv46"))
    save_artifact(artifact_from_model(teacher, "sparse", names, metrics={"x": 1.0}), t_path)
    with pytest.raises(YoloCompressError, match="changed since the student was pruned"):
        run_distill(load_config(tmp_path / "exp.yaml"), s_path, force=True)
