"""Trainer + hooks: call order, gradients at before_optimizer_step, NaN handling, signals, exact
resume, checkpoints/logs, EMA. Also hosts the tiny model/data fixture that test_ddp.py reuses."""
from __future__ import annotations

import copy
import csv
import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from yolocompress.artifacts import artifact_from_model, file_sha256, load_artifact
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.train.distributed import SeededRandomSampler
from yolocompress.train.ema import ModelEMA
from yolocompress.train.engine import HookBase, Trainer
from yolocompress.train.trainer_base import TrainerBase
from yolocompress.train.hooks import (CheckpointHook, EvalHook, LoggerHook, LRSchedule,
                                     plot_training_curves)
from yolocompress.train.optim import build_optimizer

TINY_CFG = """
[net]
width=32
height=32
channels=3

[convolutional]
batch_normalize=1
filters=4
size=3
stride=2
pad=1
activation=leaky

[convolutional]
batch_normalize=1
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
size=1
stride=1
pad=1
filters=7
activation=linear

[yolo]
mask=0
anchors=8,8
classes=2
num=1
"""
CLASSES = ["a", "b"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: extra OpenMP threads only spin against each other on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinySet(Dataset):
    """Deterministic uint8 images plus per-draw noise from torch's GLOBAL RNG (so resume must
    restore it), one box each; the `(image, targets, meta)` sample layout of the real dataset."""

    def __init__(self, n: int = 14, noise: bool = True) -> None:
        self.n, self.noise = n, noise

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        img = torch.randint(0, 240, (3, 32, 32), generator=torch.Generator().manual_seed(i),
                            dtype=torch.uint8)
        if self.noise:
            img = img + torch.randint(0, 16, (3, 32, 32), dtype=torch.uint8)
        targets = torch.tensor([[0, i % 2, 2.0 + i, 3.0, 20.0, 25.0]])
        return img, targets, {"index": i}


def collate(samples):
    targets = []
    for k, (_, t, _) in enumerate(samples):
        t = t.clone()
        t[:, 0] = k
        targets.append(t)
    return torch.stack([s[0] for s in samples]), torch.cat(targets), [s[2] for s in samples]


def criterion(model, batch):
    """Three smooth terms over the raw head output (means over images)."""
    out = model(batch[0])[0]
    return {"box": (out[:, :4] - 0.5).pow(2).mean(), "obj": out[:, 4].pow(2).mean(),
            "cls": (out[:, 5:].mean() - batch[1][:, 1].mean()).pow(2)}


def tiny_model(seed: int = 0) -> Darknet:
    torch.manual_seed(seed)
    return Darknet(parse_cfg(TINY_CFG))


def make_artifact(model, metrics):
    return artifact_from_model(model, "baseline", CLASSES, metrics=metrics)


def build(out_dir, *, model_seed=0, epochs=3, accumulate=2, order="generator", ema=True, hooks=(),
          eval_fn=None, n=14):
    """A tiny training. `order`: how the loader shuffles -- its own `generator` (re-seeded per epoch
    by the trainer), a SeededRandomSampler, or torch's global RNG (no generator)."""
    model = tiny_model(model_seed)
    ds = TinySet(n)
    kw = {"generator": {"shuffle": True, "generator": torch.Generator().manual_seed(5)},
          "sampler": {"sampler": SeededRandomSampler(ds, seed=5)},
          "global": {"shuffle": True}}[order]
    loader = DataLoader(ds, batch_size=2, collate_fn=collate, **kw)
    std = [LRSchedule(burn_in=3, policy="cosine"), CheckpointHook(out_dir, make_artifact),
           LoggerHook(out_dir), EvalHook(eval_fn or (lambda m: {"map50_voc07": 0.5}))]
    return Trainer(model, criterion, build_optimizer(model, lr=0.02), loader, epochs=epochs,
                   accumulate=accumulate, ema=ModelEMA(model, tau=3) if ema else None,
                   hooks=[*std, *hooks], seed=7, progress=False)


def assert_same_training(a: Trainer, b: Trainer) -> None:
    for k, v in a.module.state_dict().items():
        assert torch.equal(v, b.module.state_dict()[k]), k
    for k, v in a.ema.module.state_dict().items():
        assert torch.equal(v, b.ema.module.state_dict()[k]), f"ema {k}"
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"])
    assert (a.iter, a.ema.updates) == (b.iter, b.ema.updates)
    la, lb = (next(h for h in t.hooks if isinstance(h, LoggerHook)).rows for t in (a, b))
    timing = ("images_per_s", "data_wait_share")
    assert [{k: v for k, v in r.items() if k not in timing} for r in la] == \
        [{k: v for k, v in r.items() if k not in timing} for r in lb]


HOOK_METHODS = ("before_train", "before_epoch", "before_step", "after_backward",
                "before_optimizer_step", "after_optimizer_step", "after_step", "after_epoch",
                "after_train")


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []


for _name in HOOK_METHODS:
    setattr(Recorder, _name,
            lambda self, _n=_name: self.calls.append((_n, self.trainer.epoch, self.trainer.iter)))


def test_hook_order_and_counts_with_accumulation(tmp_path):
    rec = Recorder()
    model = tiny_model()
    loader = DataLoader(TinySet(14), batch_size=2, collate_fn=collate)   # 7 micro-batches
    t = Trainer(model, criterion, build_optimizer(model), loader, epochs=2, accumulate=3,
                hooks=[rec], progress=False)
    assert (t.steps_per_epoch, t.max_iter) == (3, 6)
    t.train()
    micro = ["before_step", "after_backward", "after_step"]
    last = ["before_step", "after_backward", "before_optimizer_step", "after_optimizer_step",
            "after_step"]   # the window's last micro-batch: its step comes before its after_step
    epoch = ["before_epoch", *micro * 2, *last, *micro * 2, *last, *last, "after_epoch"]
    assert [c[0] for c in rec.calls] == ["before_train", *epoch * 2, "after_train"]
    # windows of 3, 3 and the partial 1 at the end of each epoch; iter = index of the step
    assert [c[2] for c in rec.calls if c[0] == "before_optimizer_step"] == [0, 1, 2, 3, 4, 5]
    assert [c[1] for c in rec.calls if c[0] == "after_epoch"] == [0, 1]
    assert t.iter == 6 and t.progress == 1.0
    # the trainer's own hooks first (stats before the bar that shows them), then by priority
    assert [type(h).__name__ for h in t.hooks] == ["StatsHook", "Recorder"]
    with_all = Trainer(model, criterion, build_optimizer(model), loader, epochs=1, progress=True,
                       ema=ModelEMA(model), hooks=[CheckpointHook(tmp_path, make_artifact),
                                                   LRSchedule(burn_in=1)])
    assert [type(h).__name__ for h in with_all.hooks] == \
        ["StatsHook", "ProgressHook", "LRSchedule", "EMAHook", "CheckpointHook"]


def test_trainer_base_loop_calls_hooks_and_check_stop_between_epochs():
    events = []

    class Loop(TrainerBase):
        def run_epoch(self):
            self.call_hooks("before_epoch")
            events.append(("run", self.epoch))
            self.iter += 1
            self.position = (self.epoch + 1, 0)
            if self.epoch == fail_at:
                raise RuntimeError("epoch failed")

        def check_stop(self):
            events.append(("check_stop", self.epoch))

    class Rec(HookBase):
        def __init__(self, tag, priority):
            self.tag, self.priority = tag, priority

    for name in ("before_train", "before_epoch", "after_epoch", "after_train"):
        setattr(Rec, name, lambda self, _n=name: events.append((_n, self.tag)))

    fail_at = None
    loop = Loop(epochs=3)
    loop.register_hooks([Rec("late", 90), Rec("early", 5)])
    assert loop.train() is loop.storage and loop.iter == 3
    per_epoch = [("before_epoch", "early"), ("before_epoch", "late")]
    after = [("after_epoch", "early"), ("after_epoch", "late")]
    assert events == [("before_train", "early"), ("before_train", "late"),
                      *per_epoch, ("run", 0), *after, ("check_stop", 0),
                      *per_epoch, ("run", 1), *after, ("check_stop", 1),
                      *per_epoch, ("run", 2), *after,   # none after the last epoch
                      ("after_train", "early"), ("after_train", "late")]

    events.clear()
    resumed = Loop(epochs=3)
    resumed.register_hooks([Rec("only", 50)])
    resumed.position = (1, 0)   # starts at epoch 1 (0-based); after_train runs on errors too
    fail_at = 1
    with pytest.raises(RuntimeError, match="epoch failed"):
        resumed.train()
    assert events == [("before_train", "only"), ("before_epoch", "only"), ("run", 1),
                      ("after_train", "only")]
    with pytest.raises(YoloCompressError, match="int is not a HookBase"):
        resumed.register_hooks([3])
    with pytest.raises(NotImplementedError):
        TrainerBase(epochs=1).train()


def mean_criterion(model, batch):
    """Means over images only, so equal micro-batches average to the full-batch loss."""
    out = model(batch[0])
    return {"sq": out.pow(2).mean(), "lin": 0.3 * out[:, 0].mean()}


class GradProbe(HookBase):
    """Checks the gradients hooks see against gradients computed directly on a copy of the model."""

    def __init__(self, ds, accumulate: int, scale: float) -> None:
        self.ds, self.acc, self.scale = ds, accumulate, scale
        self.checked = {"after_backward": 0, "before_optimizer_step": 0}

    def _reference(self, first: int, count: int) -> list[torch.Tensor]:
        """Gradient of the mean loss over micro-batches first .. first+count-1 (2 images each)."""
        idx = range(2 * first, 2 * (first + count))
        images = torch.stack([self.ds[i][0] for i in idx]).float() / 255
        ref = copy.deepcopy(self.trainer.module)
        sum(mean_criterion(ref, (images, None)).values()).backward()
        return [p.grad for p in ref.parameters()]

    def _compare(self, expected: list[torch.Tensor], factor: float) -> None:
        for p, g in zip(self.trainer.module.parameters(), expected):
            torch.testing.assert_close(p.grad, g * factor, rtol=1e-5, atol=1e-8)

    def after_backward(self) -> None:
        b = self.trainer.batch_idx
        if b % self.acc == 0:   # first micro-batch of a window: a partial sum, still loss-scaled
            self._compare(self._reference(b, 1), self.scale / self.acc)
            self.checked["after_backward"] += 1

    def before_optimizer_step(self) -> None:
        b = self.trainer.batch_idx
        first = b - b % self.acc
        count = b - first + 1   # the epoch's last window is partial and not re-weighted
        self._compare(self._reference(first, count), count / self.acc)
        self.checked["before_optimizer_step"] += 1


@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_before_optimizer_step_sees_true_accumulated_gradient(grad_scale):
    torch.manual_seed(0)   # no BatchNorm: micro-batches and the full batch give the same gradient
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 7, 1))
    ds = TinySet(14, noise=False)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate)   # 7 micro-batches: windows 3, 3, 1
    probe = GradProbe(ds, 3, grad_scale or 1.0)
    t = Trainer(model, mean_criterion, torch.optim.SGD(model.parameters(), lr=0.1), loader, epochs=1,
                accumulate=3, hooks=[probe], progress=False)
    assert not t.scaler.is_enabled()   # amp is off on CPU ...
    if grad_scale is not None:         # ... but the loop must be right with a real GradScaler
        t.scaler = torch.amp.GradScaler("cpu", init_scale=grad_scale)
        assert t.scaler.is_enabled()
    t.train()
    assert probe.checked == {"after_backward": 3, "before_optimizer_step": 3}
    assert not t.step_skipped


def test_loss_rule_sums_terms_and_ignores_reported_loss():
    model = tiny_model()
    loader = DataLoader(TinySet(4), batch_size=2, collate_fn=collate)

    def with_reported(m, batch):
        terms = criterion(m, batch)
        return {**terms, "loss": torch.tensor(100.0), "at": 0.5 * terms["obj"]}

    t = Trainer(model, with_reported, build_optimizer(model), loader, epochs=1, progress=False)
    t.train()
    ll = t.last_losses
    assert set(ll) == {"box", "obj", "cls", "at", "loss"}
    assert ll["loss"] == pytest.approx(ll["box"] + ll["obj"] + ll["cls"] + ll["at"], rel=1e-6)
    assert t.storage["train/at"] > 0 and 0.0 <= t.storage["data_wait_share"] <= 1.0

    only = Trainer(tiny_model(), lambda m, b: {"loss": sum(criterion(m, b).values())},
                   build_optimizer(model), loader, epochs=1, progress=False)
    only.train()
    assert set(only.last_losses) == {"loss"}

    for bad, msg in ((lambda m, b: sum(criterion(m, b).values()), "dict of loss terms"),
                     (lambda m, b: {"box": m(b[0])[0]}, "'box' must be a scalar")):
        with pytest.raises(YoloCompressError, match=msg):
            Trainer(tiny_model(), bad, build_optimizer(model), loader, epochs=1, progress=False).train()


def test_nan_loss_names_term_and_keeps_last_good_checkpoints(tmp_path):
    poison = {"on": False}

    class PoisonAtEpoch2(HookBase):
        def before_epoch(self):
            poison["on"] = self.trainer.epoch == 1

    def crit(m, batch):
        terms = criterion(m, batch)
        if poison["on"]:
            terms["obj"] = terms["obj"] * float("nan")
        return terms

    model = tiny_model()
    loader = DataLoader(TinySet(6), batch_size=2, collate_fn=collate)
    t = Trainer(model, crit, build_optimizer(model), loader, epochs=3, progress=False,
                hooks=[PoisonAtEpoch2(), EvalHook(lambda m: {"map50_voc07": 0.25}),
                       CheckpointHook(tmp_path, make_artifact)])
    sha = {}

    class Remember(HookBase):
        priority = 99

        def after_epoch(self):
            sha.update(last=file_sha256(tmp_path / "last.pt"), best=file_sha256(tmp_path / "best.pt"))

    t.register_hooks([Remember()])
    expected = r"non-finite loss in epoch 2/3 after 3 optimizer steps \(micro-batch 1/3\): obj=nan"
    with pytest.raises(YoloCompressError, match=expected):
        t.train()
    assert file_sha256(tmp_path / "last.pt") == sha["last"]
    assert file_sha256(tmp_path / "best.pt") == sha["best"]
    last = load_artifact(tmp_path / "last.pt")
    assert last["train_state"]["epoch"] == 1 and last["metrics"]["map50_voc07"] == 0.25


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    class Corrupt(HookBase):
        priority = 75   # after evaluation and logging, before CheckpointHook (80)

        def after_epoch(self):
            if self.trainer.epoch == 1:
                with torch.no_grad():
                    self.trainer.module.layers[0].conv.weight[0, 0, 0, 0] = float("inf")

    t = build(tmp_path, epochs=3, hooks=[Corrupt()])
    with pytest.raises(YoloCompressError, match="weights became non-finite in epoch 2"):
        t.train()
    assert load_artifact(tmp_path / "last.pt")["train_state"]["epoch"] == 1


def test_checkpoint_best_follows_metric_and_logger_writes_csv_and_plot(tmp_path):
    values = iter([0.3, 0.5, 0.4])
    t = build(tmp_path, epochs=3, eval_fn=lambda m: {"map50_voc07": next(values)})
    t.train()
    best, last = load_artifact(tmp_path / "best.pt"), load_artifact(tmp_path / "last.pt")
    assert best["metrics"]["map50_voc07"] == 0.5 and "train_state" not in best
    assert last["metrics"]["map50_voc07"] == 0.4 and last["train_state"]["epoch"] == 3
    assert last["train_state"]["hooks"]["CheckpointHook"] == {"best": 0.5}
    # artifacts hold the EMA weights (what is evaluated); train_state holds the raw model
    ema_w = t.ema.module.state_dict()["layers.0.conv.weight"]
    assert torch.equal(last["state_dict"]["layers.0.conv.weight"], ema_w)
    assert torch.equal(last["train_state"]["model"]["layers.0.conv.weight"],
                       t.module.state_dict()["layers.0.conv.weight"])
    with open(tmp_path / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert [float(r["map50_voc07"]) for r in rows] == [0.3, 0.5, 0.4]
    assert [int(r["iter"]) for r in rows] == [4, 8, 12]   # ceil(7 / 2) steps per epoch
    for r in rows:
        assert 0.0 <= float(r["data_wait_share"]) <= 1.0 and float(r["images_per_s"]) > 0
        assert float(r["train/loss"]) == pytest.approx(
            sum(float(r[f"train/{k}"]) for k in ("box", "obj", "cls")), rel=1e-6)
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(YoloCompressError, match="not a training log"):
        (tmp_path / "empty.csv").write_text("")
        plot_training_curves(tmp_path / "empty.csv", tmp_path / "x.png")


def test_best_is_written_before_last_so_a_kill_between_them_resumes(tmp_path, monkeypatch):
    import yolocompress.train.hooks as hooks_mod
    order = []
    real = hooks_mod.save_artifact
    monkeypatch.setattr(hooks_mod, "save_artifact",
                        lambda art, path: order.append(os.path.basename(path)) or real(art, path))
    values = iter([0.3, 0.5, 0.4])
    build(tmp_path, epochs=3, eval_fn=lambda m: {"map50_voc07": next(values)}).train()
    # last.pt records `best`; the best.pt it refers to must already be on disk
    assert order == ["best.pt", "last.pt", "best.pt", "last.pt", "last.pt"]


def test_a_score_is_never_carried_into_an_epoch_that_was_not_evaluated(tmp_path):
    # eval after epochs 2 and 4; only epochs from 0.7 * 4 compete for best.pt: epoch 3 must not
    # win with epoch 2's score (it was the weights of epoch 2 that scored 0.9)
    values = iter([{"map50_voc07": 0.9, "coco_map": 0.5}, {"map50_voc07": 0.1}])
    model = tiny_model()
    loader = DataLoader(TinySet(8), batch_size=2, collate_fn=collate)
    ev = EvalHook(lambda m: next(values), every=2)
    t = Trainer(model, criterion, build_optimizer(model, lr=0.02), loader, epochs=4,
                hooks=[CheckpointHook(tmp_path, make_artifact, best_from=0.7),
                       LoggerHook(tmp_path), ev], progress=False)
    t.train()
    rows = next(h for h in t.hooks if isinstance(h, LoggerHook)).rows
    assert [r.get("map50_voc07") for r in rows] == [None, 0.9, None, 0.1]
    # a score the last evaluation did not return is gone too
    assert [r.get("coco_map") for r in rows] == [None, 0.5, None, None]
    assert load_artifact(tmp_path / "best.pt")["metrics"]["map50_voc07"] == 0.1
    assert ev.state_dict() == {"keys": ["map50_voc07"]}     # a resumed run still drops them
    fresh = EvalHook(lambda m: {}, every=2)
    fresh.load_state_dict(ev.state_dict())
    assert fresh.keys == {"map50_voc07"}


def test_checkpoint_without_metric_writes_final_best(tmp_path):
    t = build(tmp_path, epochs=2, eval_fn=lambda m: {"coco_map": 0.1})
    t.train()
    assert load_artifact(tmp_path / "best.pt")["metrics"]["coco_map"] == 0.1


@pytest.mark.parametrize("order", ["generator", "sampler", "global"])
def test_resume_at_epoch_boundary_is_bit_exact(tmp_path, order):
    saved = {}

    class Snapshot(HookBase):
        priority = 95

        def after_epoch(self):
            if self.trainer.epoch == 0:
                saved["last"] = (tmp_path / "a" / "last.pt").read_bytes()

    straight = build(tmp_path / "a", order=order, hooks=[Snapshot()])
    straight.train()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "last.pt").write_bytes(saved["last"])
    state = load_artifact(tmp_path / "b" / "last.pt")["train_state"]   # weights_only=True load
    assert (state["epoch"], state["epoch_batches"], state["iter"]) == (1, 0, 4)
    resumed = build(tmp_path / "b", order=order, model_seed=123)
    resumed.load_state_dict(state)
    resumed.train()
    assert_same_training(straight, resumed)


@pytest.mark.parametrize("signum, order", [(signal.SIGINT, "generator"), (signal.SIGTERM, "global")])
def test_signal_saves_last_then_resume_is_exact(tmp_path, signum, order):
    class Kill(HookBase):
        def after_backward(self):
            if self.trainer.epoch == 1 and self.trainer.batch_idx == 2:
                os.kill(os.getpid(), signum)

    before = signal.getsignal(signum)
    interrupted = build(tmp_path / "a", accumulate=1, order=order, hooks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert signal.getsignal(signum) is before
    state = load_artifact(tmp_path / "a" / "last.pt")["train_state"]
    # the micro-batch that was running finished and was stepped on
    assert (state["epoch"], state["epoch_batches"], state["iter"]) == (1, 3, 10)

    straight = build(tmp_path / "b", accumulate=1, order=order)
    straight.train()
    resumed = build(tmp_path / "a", accumulate=1, order=order, model_seed=99)
    resumed.load_state_dict(state)
    resumed.train()
    assert_same_training(straight, resumed)


def test_worker_death_after_a_stop_signal_still_saves_last_and_resumes(tmp_path):
    """SIGTERM to the process group also kills DataLoader workers; torch then raises a
    RuntimeError mid-backward. With a stop pending, that is an interrupt, not a crash."""
    class DieMidStep(HookBase):
        def after_backward(self):
            if self.trainer.epoch == 1 and self.trainer.batch_idx == 2:
                self.trainer.request_stop()   # what the SIGTERM handler does
                raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

    interrupted = build(tmp_path / "a", accumulate=1, hooks=[DieMidStep()])
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    state = load_artifact(tmp_path / "a" / "last.pt")["train_state"]
    # the micro-batch that died is not stepped on: state as of the optimizer step before it
    assert (state["epoch"], state["epoch_batches"], state["iter"]) == (1, 2, 9)
    # the half-done micro-batch already drew its noise from the global RNG, so the resumed run
    # is not bit-exact here (unlike a signal between steps); it redoes that batch and finishes
    resumed = build(tmp_path / "a", accumulate=1, model_seed=99)
    resumed.load_state_dict(state)
    resumed.train()
    assert resumed.iter == 21 and load_artifact(tmp_path / "a" / "last.pt")["train_state"]["epoch"] == 3


def test_runtime_error_without_a_stop_is_raised(tmp_path):
    class Boom(HookBase):
        def after_backward(self):
            raise RuntimeError("real bug")

    with pytest.raises(RuntimeError, match="real bug"):
        build(tmp_path, hooks=[Boom()]).train()


def test_load_state_dict_rejects_mismatched_training(tmp_path):
    t = build(tmp_path, epochs=2)
    t.train()
    state = load_artifact(tmp_path / "last.pt")["train_state"]
    with pytest.raises(YoloCompressError, match="2 epochs done but this training has only 1 epochs"):
        build(tmp_path / "x", epochs=1).load_state_dict(state)
    with pytest.raises(YoloCompressError, match="disagree on EMA"):
        build(tmp_path / "x", ema=False).load_state_dict(state)
    no_ckpt = build(tmp_path / "x")
    no_ckpt.hooks = [h for h in no_ckpt.hooks if not isinstance(h, CheckpointHook)]
    with pytest.raises(YoloCompressError, match="state for hook\\(s\\) CheckpointHook"):
        no_ckpt.load_state_dict(state)


def test_ema_hand_computed():
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.BatchNorm1d(1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9, tau=2.0)
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)   # d1 = 0.9 (1 - e^-0.5) = 0.3541224
    assert ema.current_decay() == pytest.approx(0.3541224063)
    assert ema.module[0].weight.item() == pytest.approx(2.2917551875)      # d1*1 + (1-d1)*3
    assert ema.module[1].running_mean.item() == pytest.approx(1.2917551875)  # floating buffers too
    assert ema.module[1].num_batches_tracked.item() == 7                  # integer buffers copied
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    ema.update(model)   # d2 = 0.9 (1 - e^-1) = 0.5689085
    assert ema.module[0].weight.item() == pytest.approx(3.4592564981)
    assert not ema.module[0].weight.requires_grad and not ema.module.training
    clone = ModelEMA(model, decay=0.5)
    clone.load_state_dict(ema.state_dict())
    assert (clone.updates, clone.decay, clone.tau) == (2, 0.9, 2.0)
    assert torch.equal(clone.module[0].weight, ema.module[0].weight)
    with pytest.raises(YoloCompressError, match="0 < decay < 1"):
        ModelEMA(model, decay=1.0)


def test_seeded_sampler_is_a_function_of_seed_and_epoch():
    ds = TinySet(10)
    a, b = SeededRandomSampler(ds, seed=3), SeededRandomSampler(ds, seed=3)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(5)
    assert list(a) != list(b)
    shards = [list(SeededRandomSampler(ds, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(10))
