"""StatsHook and ProgressHook: epoch means, lr, speed and data-wait share against hand-computed
values (fake clock), counters across a mid-epoch resume, and what the bar is told."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import DataLoader

import yolocompress.train.stats as stats_mod
from yolocompress.train.engine import Trainer
from yolocompress.train.stats import StatsHook

from test_engine import TinySet, collate


class Clock:
    def __init__(self, *times: float) -> None:
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


def fake_trainer(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"position": (0, 0), "storage": {}, "lr": 0.01, "data_time": 0.0,
                              "last_losses": {}, "batch": (), **kw})


def micro_batch(hook: StatsHook, losses: dict, images: int, data_time: float) -> None:
    hook.trainer.last_losses, hook.trainer.data_time = losses, data_time
    hook.trainer.batch = (torch.zeros(images, 3, 2, 2), None)
    hook.before_step()
    hook.after_step()


def test_stats_hand_computed(monkeypatch):
    hook = StatsHook()
    hook.trainer = fake_trainer(lr=0.125)
    # first before_step at 10.0 after 0.5 s of loading: the clock starts at 9.5;
    # after_step at 11.0 -> 1.5 s; second before_step reads no clock; after_step at 13.5 -> 4.0 s
    monkeypatch.setattr(stats_mod.time, "perf_counter", Clock(10.0, 11.0, 13.5))
    hook.before_epoch()
    micro_batch(hook, {"box": 1.0, "obj": 0.5, "loss": 1.5}, images=4, data_time=0.5)
    micro_batch(hook, {"box": 3.0, "obj": 1.5, "loss": 4.5}, images=4, data_time=1.0)
    hook.after_epoch()
    assert hook.trainer.storage == {"train/box": 2.0, "train/obj": 1.0, "train/loss": 3.0,
                                    "lr": 0.125, "images_per_s": 2.0,      # 8 images / 4 s
                                    "data_wait_share": 0.375}             # 1.5 s of 4 s
    assert hook.state() == {"sums": {"box": 4.0, "obj": 2.0, "loss": 6.0}, "count": 2,
                            "images": 8, "wait": 1.5, "time": 4.0, "prev_time": 0.0}


def test_stats_continue_across_a_mid_epoch_resume(monkeypatch):
    hook = StatsHook()
    hook.trainer = fake_trainer()
    monkeypatch.setattr(stats_mod.time, "perf_counter", Clock(0.0, 2.0, 100.0, 101.0))
    hook.before_epoch()
    micro_batch(hook, {"loss": 1.0}, images=2, data_time=0.0)
    hook.on_interrupt()                    # the epoch's clock so far is kept: 2 s
    saved = hook.state()

    resumed = StatsHook()
    resumed.trainer = fake_trainer(position=(0, 1))   # one micro-batch of this epoch done
    resumed.load_state(saved)
    resumed.before_epoch()                 # mid-epoch: counters are not reset
    micro_batch(resumed, {"loss": 3.0}, images=2, data_time=0.0)
    resumed.after_epoch()
    assert resumed.trainer.storage["train/loss"] == 2.0
    assert resumed.trainer.storage["images_per_s"] == 4 / 3.0      # 2 s before + 1 s after
    saved["sums"]["loss"] = -1.0           # load_state copied, not aliased
    assert resumed.state()["sums"] == {"loss": 4.0}

    fresh = StatsHook()
    fresh.trainer = fake_trainer(position=(1, 0))
    fresh.load_state(saved)
    fresh.before_epoch()                   # a new epoch starts from zero
    assert fresh.state()["count"] == 0 and fresh.state()["sums"] == {}
    fresh.load_state(None)
    assert fresh.state()["images"] == 0


class FakeBar:
    made: list["FakeBar"] = []

    def __init__(self, **kw) -> None:
        self.kw, self.updates, self.postfix, self.closed = kw, 0, None, False
        FakeBar.made.append(self)

    def update(self, n: int) -> None:
        self.updates += n

    def set_postfix(self, post: dict, refresh: bool) -> None:
        self.postfix = post

    def close(self) -> None:
        self.closed = True


def test_trainer_stats_and_progress_bar(monkeypatch):
    monkeypatch.setattr(stats_mod, "tqdm", FakeBar)
    FakeBar.made = []
    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 1)
    calls = iter(range(1, 100))

    def crit(m, batch):   # micro-batch k gives a = k, b = 2k (plus a zero that has a gradient)
        k = float(next(calls))
        zero = 0 * m(batch[0]).sum()
        return {"a": zero + k, "b": zero + 2 * k}

    loader = DataLoader(TinySet(6), batch_size=2, collate_fn=collate)   # 3 micro-batches
    t = Trainer(model, crit, torch.optim.SGD(model.parameters(), lr=0.25), loader, epochs=2,
                accumulate=2, progress=True)
    storage = t.train()
    # epoch 2 saw micro-batches 4, 5, 6: means 5 and 10, total 15
    assert {k: storage[k] for k in ("train/a", "train/b", "train/loss", "lr")} == \
        {"train/a": 5.0, "train/b": 10.0, "train/loss": 15.0, "lr": 0.25}
    assert storage["images_per_s"] > 0 and 0.0 <= storage["data_wait_share"] <= 1.0
    assert [b.kw["desc"] for b in FakeBar.made] == ["epoch 1/2", "epoch 2/2"]
    assert all(b.kw["total"] == 3 and b.kw["initial"] == 0 for b in FakeBar.made)
    assert all(b.updates == 3 and b.closed for b in FakeBar.made)
    post = FakeBar.made[-1].postfix
    assert {k: post[k] for k in ("a", "b", "loss", "lr")} == \
        {"a": "5", "b": "10", "loss": "15", "lr": "0.25"}
    assert float(post["img/s"]) > 0

    FakeBar.made = []
    Trainer(model, crit, t.optimizer, loader, epochs=1, progress=False).train()
    assert FakeBar.made == []
