"""Issue 16: every stage does what it says on any data-set size -- warm-up capped at a share of
the stage, budgets in optimizer steps, the peak lr each stage prints (and warns about), and the
sparse stage's check of what it achieved against what pruning will remove."""
from __future__ import annotations

import csv
import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from conftest import ROOT, make_mini
from yolocompress.cli import main
from yolocompress.compress.sparse_stage import check_sparsity, sparsity_needs
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.train.distributed import SeededRandomSampler
from yolocompress.train.hooks import LRSchedule
from yolocompress.train.run import (_drop_last, describe_schedule, optimizer_steps_per_epoch,
                                    with_stage_budget)


# --- warm-up and peak lr --------------------------------------------------------------------

def test_burn_in_is_capped_at_a_share_of_the_stage():
    lr = LRSchedule(burn_in=50, policy="cosine", final_ratio=0.1, max_fraction=0.25)
    # a 60-image stage of 15 steps: warm-up floor(0.25 * 15) = 3 steps, then the cosine
    assert lr.burn_in_steps(15) == 3
    assert lr.factor(1, 15) == pytest.approx((1 / 3) ** 4)
    assert lr.factor(2, 15) == pytest.approx((2 / 3) ** 4)
    assert lr.factor(3, 15) == 1.0 and lr.peak(15) == 1.0
    assert lr.factor(15, 15) == pytest.approx(0.1)
    # the demo's stages (62 steps per epoch): sparse 5 epochs, distill 4, baseline 40 keep 50
    assert [lr.burn_in_steps(n) for n in (310, 248, 2480)] == [50, 50, 50]
    # Darknet's uncapped burn-in: 15 steps never leave the warm-up
    darknet = LRSchedule(burn_in=50, policy="cosine", max_fraction=None)
    assert darknet.burn_in_steps(15) == 50
    assert darknet.peak(15) == pytest.approx((15 / 50) ** 4)
    # steps policy: an lr step (at k = 6) inside the warm-up: the warm-up curve rules until k = 9
    # (as in Darknet), then lr x 0.1, so the peak is (9/10)^4
    early = LRSchedule(burn_in=10, policy="steps", steps=(0.5,), scales=0.1)
    assert early.peak(12) == pytest.approx(0.9 ** 4) and early.factor(10, 12) == pytest.approx(0.1)
    with pytest.raises(YoloCompressError, match="max_fraction"):
        LRSchedule(max_fraction=1.0)


def _trainer(epochs: int, per_epoch: int) -> SimpleNamespace:
    return SimpleNamespace(epochs=epochs, steps_per_epoch=per_epoch, max_iter=epochs * per_epoch)


def test_stage_prints_steps_and_peak_lr_and_warns_when_it_is_never_reached():
    capped = LRSchedule(burn_in=50, policy="cosine", max_fraction=0.25)
    lines = describe_schedule("distilled", _trainer(4, 3), capped, 5e-4)
    assert lines == ["distilled: 4 epochs x 3 optimizer steps = 12 steps, burn-in 3 steps, "
                     "peak lr 0.0005"]
    uncapped = LRSchedule(burn_in=50, policy="cosine", max_fraction=None)
    head, warning = describe_schedule("distilled", _trainer(4, 3), uncapped, 5e-4)
    assert "burn-in 50 steps, peak lr 1.66e-06" in head              # 5e-4 * (12/50)^4
    assert warning.startswith("warning: distilled: the lr never reaches the configured 0.0005")
    assert "train.burn_in_max" in warning
    gammas = [torch.nn.Parameter(torch.ones(2))] * 3
    assert describe_schedule("sparse", _trainer(5, 62), capped, 1e-3, (gammas, 10.0))[0] == \
        "sparse: 5 epochs x 62 optimizer steps = 310 steps, burn-in 50 steps, peak lr 0.001 " \
        "(x10 on 3 tensors)"


# --- budgets in optimizer steps -------------------------------------------------------------

@pytest.mark.parametrize("n, batch, accumulate, world, expected", [
    (60, 16, 1, 1, 3), (1000, 16, 1, 1, 62), (40, 16, 1, 1, 2), (12, 16, 1, 1, 1),
    (60, 4, 2, 1, 8), (60, 16, 1, 2, 1), (16, 16, 1, 1, 1)])
def test_optimizer_steps_per_epoch(n, batch, accumulate, world, expected):
    assert optimizer_steps_per_epoch(n, batch, accumulate, world) == expected
    if world == 1:        # what the loader of train.run and the Trainer's count give
        data = list(range(n))
        loader = DataLoader(data, batch_size=batch, sampler=SeededRandomSampler(data, world_size=1,
                                                                                rank=0),
                            drop_last=_drop_last(n, batch))
        assert -(-len(loader) // accumulate) == expected


def test_stage_budget_in_steps(tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text("train:\n  epochs: 40\n  batch_size: 16\n  nominal_batch: 16\n"
                   "sparse:\n  steps: 310\n  lr: 0.002\n")
    cfg = load_config(exp)
    assert with_stage_budget(cfg, cfg.sparse, 1000).train.epochs == 5       # 62 steps / epoch
    assert with_stage_budget(cfg, cfg.sparse, 60).train.epochs == 104       # 3 steps / epoch
    assert with_stage_budget(cfg, cfg.sparse, 60).train.lr == 0.002
    assert with_stage_budget(cfg, cfg.distill, 60).train.epochs == 40       # no budget: train's
    # epochs, when set (e.g. an override over a recipe in steps), win over steps
    over = load_config(exp, ["sparse.epochs=3"])
    assert with_stage_budget(over, over.sparse, 60).train.epochs == 3
    with pytest.raises(YoloCompressError, match="training-set size"):
        with_stage_budget(cfg, cfg.sparse)
    for bad, key in (("sparse.steps=0", "sparse.steps"), ("distill.steps=-1", "distill.steps"),
                     ("train.burn_in_max=1", "train.burn_in_max")):
        with pytest.raises(YoloCompressError, match=key):
            load_config(exp, [bad])


def test_demo_recipe_keeps_its_schedule_on_the_demo_and_scales_on_small_sets():
    demo = load_config(ROOT / "cfg/experiments/demo.yaml")
    assert with_stage_budget(demo, demo.sparse, 1000).train.epochs == 5
    assert with_stage_budget(demo, demo.distill, 1000).train.epochs == 4
    assert with_stage_budget(demo, demo.sparse, 60).train.epochs == 104
    assert with_stage_budget(demo, demo.distill, 60).train.epochs == 83


# --- the sparse stage on a 40-image set -----------------------------------------------------

def _set40(base):
    train = {"epochs": 40, "batch_size": 16, "nominal_batch": 16, "optimizer": "sgd",
             "momentum": 0.0, "lr": 0.01, "schedule": "cosine", "scales": 0.01, "burn_in": 50,
             "eval_interval": 0, "multi_scale": False, "device": "cpu"}
    make_mini(base, train=train, n_train=40, sections={
        # plain SGD, s above the detection gradient: each gamma moves by about lr x 10 x s per step
        # (0.2 at the peak), so where it gets is set by the lrs the schedule gives (the sum of the
        # lr factors of 20 steps with a 5-step warm-up is 8.7: 1.7 in all, from gammas of 1)
        "sparse": {"s": 2.0, "gamma_lr_mult": 10, "schedule": "constant"},
        "prune": {"percents": [0.3]},
    })
    return base / "exp.yaml"


def test_sparse_stage_on_40_images_reaches_peak_lr_and_sparsity(tmp_path, capsys):
    exp = _set40(tmp_path)
    # 40 images in batches of 16: 2 optimizer steps per epoch; 20 steps = 10 epochs, warm-up 5
    assert main(["sparse", "--config", str(exp), "name=long", "sparse.steps=20"]) == 0
    out = capsys.readouterr().out
    assert "sparse: 10 epochs x 2 optimizer steps = 20 steps, burn-in 5 steps, peak lr 0.01 " \
           "(x10 on" in out and "never reaches" not in out
    run = tmp_path / "runs" / "long" / "sparse"
    with open(run / "train_log.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    # the lr of the last step of each epoch: the cosine just after its peak at step 5, at step 6
    assert len(lrs) == 10 and max(lrs) == pytest.approx(0.01 * (0.01 + 0.99 * 0.5 * (
        1 + math.cos(math.pi / 15))))
    cfg = load_config(exp, ["name=long"])
    achieved, needed = sparsity_needs(cfg, run / "best.pt")
    assert achieved >= 0.3 and needed == pytest.approx(0.3, abs=0.05)
    assert f"sparse: {achieved:.1%} of the penalised |gamma| below 0.01" in out
    check_sparsity(cfg, run / "best.pt")                          # passes: no error

    # Darknet's burn-in of 50 steps in a 4-step stage: lr stays in the warm-up, warned; the
    # gammas barely move, and the pipeline's check stops before pruning
    assert main(["sparse", "--config", str(exp), "name=short", "sparse.steps=4",
                 "train.burn_in_max=null"]) == 0
    out = capsys.readouterr().out
    assert "warning: sparse: the lr never reaches the configured 0.01: it peaks at 4.1e-07" in out
    short = tmp_path / "runs" / "short" / "sparse" / "best.pt"
    cfg = load_config(exp, ["name=short"])
    with pytest.raises(YoloCompressError, match=r"stage 1 left 0\.0% of the penalised BN gammas "
                       r"below 0\.01, but pruning removes \d+\.\d% of those channels .*"
                       r"train stage 1 longer \(sparse\.steps\).*sparse\.check=0 prunes anyway$"):
        check_sparsity(cfg, short)
    check_sparsity(cfg, short, force=True)                        # a warning only
    assert "warning: " in capsys.readouterr().out
    assert check_sparsity(load_config(exp, ["name=short", "sparse.check=0"]), short)[0] == 0.0


@pytest.mark.parametrize("best_from, expected", [(0.0, 0.9), (0.8, 0.6)])
def test_best_checkpoint_only_from_the_end_of_a_stage(tmp_path, best_from, expected):
    from test_engine import make_artifact, tiny_model

    from yolocompress.artifacts import load_artifact
    from yolocompress.train.hooks import CheckpointHook
    model = tiny_model()
    t = SimpleNamespace(epochs=5, storage={}, model_for_eval=model, module=model,
                        state_dict=lambda: {})
    hook = CheckpointHook(tmp_path, make_artifact, best_from=best_from)
    hook.trainer = t
    for epoch, value in enumerate([0.9, 0.8, 0.7, 0.6, 0.5]):   # the score falls as gammas go
        t.epoch, t.storage["map50_voc07"] = epoch, value
        hook.after_epoch()
    # 0.8 x 5 epochs: only epochs 4 and 5 compete (the sparse stage's BEST_FROM on the demo)
    assert load_artifact(tmp_path / "best.pt")["metrics"]["map50_voc07"] == expected
    with pytest.raises(YoloCompressError, match="best_from"):
        CheckpointHook(tmp_path, make_artifact, best_from=1.5)


def test_sparse_check_is_not_an_input_of_the_sparse_stage(tmp_path):
    from yolocompress.inputs import stage_inputs
    exp = tmp_path / "exp.yaml"
    exp.write_text("sparse:\n  s: 0.01\n")
    a, b, c = (stage_inputs(load_config(exp, o), "sparse")
               for o in ([], ["sparse.check=0"], ["sparse.s=0.02"]))
    assert a == b and a != c        # stopping the pipeline or not changes nothing it trained
