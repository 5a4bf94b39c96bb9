"""Optimizer parameter groups (Darknet decays conv weights only), accumulation factor, LR schedule."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from yolocompress.errors import YoloCompressError
from yolocompress.train.engine import HookBase, Trainer
from yolocompress.train.hooks import LRSchedule
from yolocompress.train.optim import accumulate_steps, build_optimizer, param_groups


def conv_bn_model() -> nn.Module:
    # conv+BN (no conv bias), then a detection-style conv with bias, then a frozen conv
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
                          nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 1))
    model[4].requires_grad_(False)
    return model


def test_param_groups_decay_conv_weights_only():
    model = conv_bn_model()
    groups = param_groups(model)
    ids = {k: {id(p) for p in v} for k, v in groups.items()}
    assert ids["decay"] == {id(model[0].weight), id(model[3].weight)}
    assert ids["bn"] == {id(model[1].weight)}
    assert ids["bias"] == {id(model[1].bias), id(model[3].bias)}
    assert sum(len(v) for v in groups.values()) == 5   # frozen params left out, none twice

    opt = build_optimizer(model, "sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert isinstance(opt, torch.optim.SGD)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert {k: g["weight_decay"] for k, g in by_name.items()} == {"decay": 5e-4, "bn": 0.0, "bias": 0.0}
    assert all(g["momentum"] == 0.9 and g["nesterov"] is False and g["lr"] == 0.01
               for g in opt.param_groups)


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_variants_use_momentum_as_beta1(name, cls):
    opt = build_optimizer(conv_bn_model(), name, lr=1e-3, momentum=0.937, weight_decay=0.01)
    assert type(opt) is cls
    assert all(g["betas"] == (0.937, 0.999) for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0, 0.0]


def test_build_optimizer_errors():
    with pytest.raises(YoloCompressError, match="unknown optimizer 'rmsprop'"):
        build_optimizer(conv_bn_model(), "rmsprop")
    with pytest.raises(YoloCompressError, match="lr > 0"):
        build_optimizer(conv_bn_model(), lr=0.0)
    with pytest.raises(YoloCompressError, match="no trainable parameters"):
        build_optimizer(conv_bn_model().requires_grad_(False))


def test_accumulate_steps():
    assert accumulate_steps(64, 16, 1) == 4
    assert accumulate_steps(64, 8, 2) == 4
    assert accumulate_steps(64, 12, 1) == 5     # 5.33 rounds to 5
    assert accumulate_steps(64, 24, 1) == 3     # 2.67 rounds to 3
    assert accumulate_steps(64, 128, 1) == 1    # never below 1
    with pytest.raises(YoloCompressError, match="batch_size must be a positive integer"):
        accumulate_steps(64, 0, 1)


def test_burn_in_and_steps_follow_darknet():
    s = LRSchedule(burn_in=1000, power=4, policy="steps", steps=(0.8, 0.9), scales=0.1)
    assert s.factor(1, 10000) == pytest.approx(1e-12)      # (1/1000)^4: Darknet's first step
    assert s.factor(500, 10000) == pytest.approx(0.0625)   # (1/2)^4
    assert s.factor(999, 10000) == pytest.approx(0.999 ** 4)
    assert s.factor(1000, 10000) == 1.0
    assert s.factor(7999, 10000) == 1.0
    assert s.factor(8000, 10000) == pytest.approx(0.1)
    assert s.factor(8999, 10000) == pytest.approx(0.1)
    assert s.factor(9000, 10000) == pytest.approx(0.01)
    assert s.factor(10000, 10000) == pytest.approx(0.01)
    two = LRSchedule(burn_in=0, steps=(0.5, 0.75), scales=(0.5, 0.2))
    assert [two.factor(k, 8) for k in (1, 3, 4, 5, 6, 8)] == pytest.approx([1, 1, 0.5, 0.5, 0.1, 0.1])


def test_cosine_after_burn_in():
    s = LRSchedule(burn_in=100, power=4, policy="cosine", final_ratio=0.1)
    assert s.factor(50, 1100) == pytest.approx(0.0625)
    assert s.factor(100, 1100) == pytest.approx(1.0)
    assert s.factor(600, 1100) == pytest.approx(0.55)     # half way: 0.1 + 0.9 * 0.5
    assert s.factor(350, 1100) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert s.factor(1100, 1100) == pytest.approx(0.1)


def test_schedule_arguments_are_checked():
    with pytest.raises(YoloCompressError, match="unknown lr policy 'poly'"):
        LRSchedule(policy="poly")
    with pytest.raises(YoloCompressError, match="2 steps but 3 scales"):
        LRSchedule(steps=(0.8, 0.9), scales=(0.1, 0.1, 0.1))
    with pytest.raises(YoloCompressError, match="steps in \\(0, 1\\)"):
        LRSchedule(steps=(80, 90))


def test_schedule_sets_each_group_lr_before_every_optimizer_step():
    seen = []

    class LrProbe(HookBase):   # default priority 50: runs after LRSchedule (10)
        def before_optimizer_step(self):
            seen.append((self.trainer.iter, [g["lr"] for g in self.trainer.optimizer.param_groups]))

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = conv_bn_model()
        opt = build_optimizer(model, lr=0.1)
        opt.param_groups[1]["lr"] = 0.05   # per-group base lrs scale alike
        data = TensorDataset(torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8), torch.zeros(10, 6))
        sched = LRSchedule(burn_in=4, power=2, policy="steps", steps=(0.6,), scales=0.5)
        t = Trainer(model, lambda m, b: {"l": m(b[0]).pow(2).mean()}, opt,
                    DataLoader(data, batch_size=2), epochs=2, hooks=[LrProbe(), sched], progress=False)
        t.train()
    finally:
        torch.set_num_threads(n)
    assert [i for i, _ in seen] == list(range(10))
    for i, lrs in seen:
        f = sched.factor(i + 1, 10)
        assert lrs == pytest.approx([0.1 * f, 0.05 * f, 0.1 * f])
    assert [round(sched.factor(i + 1, 10), 6) for i in range(10)] == \
        [0.0625, 0.25, 0.5625, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5]


def test_lr_mult_moves_parameters_to_their_own_group():
    model = conv_bn_model()
    opt = build_optimizer(model, "adamw", lr=0.01, weight_decay=5e-4,
                          lr_mult=([model[1].weight, model[0].weight], 10.0))
    by_name = {g["name"]: g for g in opt.param_groups}
    # the BN weight was the "bn" group's only member: that group is gone, not left empty
    assert set(by_name) == {"decay", "decay_lr_x10", "bn_lr_x10", "bias"}
    assert by_name["bn_lr_x10"]["params"] == [model[1].weight]
    assert by_name["decay_lr_x10"]["params"] == [model[0].weight]
    assert by_name["decay"]["params"] == [model[3].weight]
    assert by_name["bn_lr_x10"]["lr"] == pytest.approx(0.1) and by_name["decay"]["lr"] == 0.01
    assert (by_name["decay_lr_x10"]["weight_decay"], by_name["bn_lr_x10"]["weight_decay"]) == (5e-4, 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == 5
