"""Stage 1 sparse training: schedule formulas, the penalty's exact placement (once per optimizer
step, unscaled, listed gammas only), its effect, logs/histograms, exact resume, the `sparse`
config section and the `yolocompress sparse` command end to end."""
from __future__ import annotations

import copy
import csv
import math
import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader

from yolocompress.artifacts import build_model, file_sha256, load_artifact
from yolocompress.cli import main
from yolocompress.compress.sparse_stage import penalised_layers
from yolocompress.compress.sparsity import (HIST_EDGES, SCHEDULES, ConstantRate, CosineRate,
                                            LinearRate, LocalDecayRate, SparsityHook, StepRate,
                                            TargetRate, _histogram, build_schedule,
                                            plot_gamma_histograms)
from yolocompress.config import SparseConfig, load_config
from yolocompress.data.synthetic import DEMO_CLASSES
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.train.engine import HookBase, Trainer

from conftest import ROOT, make_mini
from test_engine import TinySet, collate, criterion, tiny_model

S = 1e-3
PRUNABLE = [1]      # tiny_model: layer 1 (BN, stride 4) is penalised, layer 0 (BN, stride 2) not


# --- schedules ------------------------------------------------------------------------------

def test_scalar_schedules_follow_their_formulas():
    assert [ConstantRate(S).rate(p) for p in (0.0, 0.5, 1.0)] == [S, S, S]
    step = StepRate(S, at=0.5, factor=0.1)
    assert [step.rate(p) for p in (0.0, 0.499, 0.5, 1.0)] == [S, S, S * 0.1, S * 0.1]
    cos, lin = CosineRate(S, warmup=0.1, final_ratio=0.1), LinearRate(S, 0.1, 0.1)
    for sched in (cos, lin):   # warm-up is a straight line from 0 to s
        assert sched.rate(0.0) == 0.0
        assert sched.rate(0.05) == pytest.approx(S / 2)
        assert sched.rate(0.1) == pytest.approx(S)
        assert sched.rate(1.0) == pytest.approx(S * 0.1)
    # t = (p - 0.1) / 0.9: p = 0.325 -> t = 0.25, p = 0.55 -> t = 0.5
    assert cos.rate(0.325) == pytest.approx(S * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert cos.rate(0.55) == pytest.approx(S * 0.55)
    assert lin.rate(0.325) == pytest.approx(S * (1 - 0.9 * 0.25))
    assert lin.rate(0.55) == pytest.approx(S * 0.55)
    assert CosineRate(S, warmup=0.0).rate(0.0) == pytest.approx(S)


def test_local_decay_protects_global_top_share_after_switch_and_reranks():
    sched = LocalDecayRate(S, switch_at=0.4, protect=0.35, decay=0.01)
    g = torch.tensor([0.5, -0.9, 0.01, 0.3, 0.0, 1.2, 0.05, -0.7, 0.2, 0.8,
                      0.02, 0.6, 0.4, 0.03, -1.0, 0.1, 0.15, 0.25, 0.07, 0.35])
    top7 = {1, 5, 7, 9, 11, 14, 0}            # the 7 largest |γ| (35 % of 20), signs ignored
    for epoch in range(4):                    # epochs 0-3 of 10: before 40 %
        sched.start_epoch(epoch, 10, g)
        assert sched.rate(epoch / 10) == S and sched.protected is None
    sched.start_epoch(4, 10, g)
    r = sched.rate(0.4)
    assert torch.is_tensor(r) and r.shape == (20,)
    assert set(torch.nonzero(sched.protected).flatten().tolist()) == top7
    expected = torch.tensor([S * 0.01 if i in top7 else S for i in range(20)], dtype=torch.float32)
    assert torch.equal(r, expected)
    # next epoch, other gammas: the protected set follows the new ranking
    g2 = g.flip(0)
    sched.start_epoch(5, 10, g2)
    assert set(torch.nonzero(sched.protected).flatten().tolist()) == {19 - i for i in top7}
    # state round trip carries the mask
    other = LocalDecayRate(S)
    other.load_state_dict(copy.deepcopy(sched.state_dict()))
    assert torch.equal(other.rate(0.5), sched.rate(0.5))


def test_target_rate_moves_s_toward_the_target_path():
    sched = TargetRate(S, fraction=0.5, threshold=1e-2, target_epoch=4, up=2.0, down=0.5,
                       tolerance=0.02, max_ratio=8.0)

    def gammas(share_below: float) -> torch.Tensor:
        n_low = round(100 * share_below)
        return torch.cat([torch.full((n_low,), 1e-3), torch.full((100 - n_low,), 0.5)])

    sched.start_epoch(0, 10, gammas(0.1))           # f0 = 0.1; no change before training
    assert sched.f0 == pytest.approx(0.1) and sched.rate(0.0) == S
    assert sched.path(2, 10) == pytest.approx(0.3) and sched.path(6, 10) == pytest.approx(0.5)
    sched.start_epoch(1, 10, gammas(0.1))           # lagging the path (0.2): s up
    assert sched.rate(0.1) == pytest.approx(2 * S)
    sched.start_epoch(2, 10, gammas(0.31))          # on the path (0.3, within tolerance): kept
    assert sched.rate(0.2) == pytest.approx(2 * S)
    sched.start_epoch(3, 10, gammas(0.9))           # ahead of it (0.4): s down
    assert sched.rate(0.3) == pytest.approx(S)
    for epoch in range(4, 10):                      # far behind for long: bounded by max_ratio
        sched.start_epoch(epoch, 10, gammas(0.0))
    assert sched.rate(1.0) == pytest.approx(8 * S)
    restored = TargetRate(S, fraction=0.5, target_epoch=4)
    restored.load_state_dict(sched.state_dict())
    assert (restored.rate(0.0), restored.f0) == (sched.rate(0.0), sched.f0)


def test_schedules_reject_bad_parameters():
    for make in (lambda: ConstantRate(-1e-3), lambda: StepRate(S, at=1.0),
                 lambda: LocalDecayRate(S, protect=1.5), lambda: CosineRate(S, warmup=1.0),
                 lambda: TargetRate(0.0), lambda: TargetRate(S, target_epoch=0)):
        with pytest.raises(YoloCompressError, match="sparse"):
            make()


# --- the penalty in the training loop -------------------------------------------------------

class GradSnapshot(HookBase):
    """Copies every parameter's gradient as the optimizer will see it (after the sparsity hook)."""

    priority = 90

    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def before_optimizer_step(self) -> None:
        self.steps.append({n: p.grad.clone() for n, p in self.trainer.module.named_parameters()
                           if p.grad is not None})


def _frozen_run(hooks: list[HookBase]) -> tuple[GradSnapshot, Trainer]:
    """7 micro-batches, accumulate 3 (windows 3, 3, 1), an enabled GradScaler, lr 0 (the weights
    never move, so every step's data gradient is the same with and without the penalty)."""
    model = tiny_model()
    loader = DataLoader(TinySet(14), batch_size=2, collate_fn=collate)
    snap = GradSnapshot()
    t = Trainer(model, criterion, torch.optim.SGD(model.parameters(), lr=0.0), loader, epochs=1,
                accumulate=3, hooks=[*hooks, snap], progress=False)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    t.train()
    return snap, t


@pytest.mark.parametrize("schedule", [ConstantRate(0.05),
                                      LocalDecayRate(0.05, switch_at=0.0, protect=0.5)])
def test_penalty_added_once_per_step_unscaled_on_listed_gammas_only(schedule):
    plain, _ = _frozen_run([])
    hook = SparsityHook(PRUNABLE, schedule)
    sparse, t = _frozen_run([hook])
    assert len(plain.steps) == len(sparse.steps) == 3 and t.scaler.get_scale() == 2.0 ** 12
    gamma = t.module.layers[1].bn.weight.detach()
    rate = schedule.rate(0.0)
    penalty = rate * torch.sign(gamma)
    if torch.is_tensor(rate):   # half the channels protected: two distinct rates
        assert sorted(set(rate.tolist())) == pytest.approx([0.05 * 0.01, 0.05])
    for a, b in zip(sparse.steps, plain.steps):
        assert a.keys() == b.keys()
        for name in a:
            if name == "layers.1.bn.weight":
                assert not torch.equal(b[name], torch.zeros_like(b[name]))
                # exactly data gradient + s·sign(γ): not s/accumulate, not 3s, not s·scale
                assert torch.equal(a[name], b[name] + penalty), name
            else:
                assert torch.equal(a[name], b[name]), name


def test_zero_gamma_gets_no_penalty_and_missing_grad_is_skipped():
    model = tiny_model()
    with torch.no_grad():
        model.layers[1].bn.weight[:3] = 0.0
    hook = SparsityHook([0, 1], ConstantRate(0.5))

    class T:
        module, progress = model, 0.0
    hook.trainer = T()
    hook.before_train()
    model.layers[1].bn.weight.grad = torch.zeros(8)   # layer 0's grad stays None
    hook.before_optimizer_step()
    assert model.layers[0].bn.weight.grad is None
    assert model.layers[1].bn.weight.grad.tolist() == [0.0] * 3 + [0.5] * 5


def _train(hooks: list[HookBase], epochs: int = 4, lr: float = 0.1) -> Trainer:
    model = tiny_model()
    loader = DataLoader(TinySet(16), batch_size=2, collate_fn=collate)   # 8 steps per epoch
    t = Trainer(model, criterion, torch.optim.SGD(model.parameters(), lr=lr), loader,
                epochs=epochs, hooks=hooks, progress=False)
    t.train()
    return t


def test_l1_of_penalised_gammas_falls_much_faster_and_is_logged(tmp_path):
    s, steps, lr = 0.05, 32, 0.1
    plain = _train([])
    hook = SparsityHook(PRUNABLE, ConstantRate(s), plot_path=tmp_path / "g.png")
    sparse = _train([hook])
    l1 = {k: float(t.module.layers[1].bn.weight.detach().abs().mean()) for k, t in
          (("plain", plain), ("sparse", sparse))}
    # the penalty alone moves every gamma (init 1, sign unchanged) by lr·s per step: 0.16 in all
    assert l1["sparse"] < l1["plain"] - 0.8 * lr * s * steps
    # unpenalised layer 0 keeps a similar L1 (the trajectories differ only through the data loss)
    l0 = [float(t.module.layers[0].bn.weight.detach().abs().mean()) for t in (plain, sparse)]
    assert abs(l0[0] - l0[1]) < 0.2 * (l1["plain"] - l1["sparse"])
    # logs: what the storage says is what the model holds
    st, g = sparse.storage, sparse.module.layers[1].bn.weight.detach().abs()
    assert st["sparse/s"] == s and st["sparse/l1"] == pytest.approx(l1["sparse"])
    assert st["sparse/frac_below_1e-2"] == pytest.approx(float((g < 1e-2).float().mean()))
    q = torch.quantile(g, torch.tensor([0.1, 0.5, 0.9])).tolist()
    assert [st[f"sparse/s4/q{p}"] for p in (10, 50, 90)] == pytest.approx(q)
    assert not any(k.startswith("sparse/s2/") for k in st)    # layer 0 is not penalised
    hist = hook.histogram
    assert hist["epochs"] == [1, 2, 3, 4] and all(sum(c) == 8 for c in hist["counts"])
    assert hook.record["layers"] == ["conv1"] and hook.record["stats"]["epoch"] == 4
    assert hook.record["schedule"] == "constant" and hook.record["s"] == s
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"   # drawn after training


def test_histogram_bins_and_plot_checks_its_input(tmp_path):
    # 10 log bins per decade from 1e-5; the first bin holds 0 and everything below
    counts = _histogram(torch.tensor([0.0, 1e-6, 0.0123, 0.5, 0.5, 1000.0]))
    assert len(counts) == len(HIST_EDGES) - 1 == 70 and sum(counts) == 6
    assert {i: c for i, c in enumerate(counts) if c} == {0: 2, 30: 1, 46: 2, 69: 1}
    with pytest.raises(YoloCompressError, match="one row of 70 counts per epoch"):
        plot_gamma_histograms({"edges": HIST_EDGES, "epochs": [1, 2], "counts": [counts]},
                              tmp_path / "bad.png")


class StateAt(HookBase):
    """Copies the trainer's full state at the end of epoch `epoch` or on an interrupt (as
    CheckpointHook would write it into last.pt)."""

    priority = 90

    def __init__(self, epoch: int) -> None:
        self.epoch, self.state = epoch, None

    def after_epoch(self) -> None:
        if self.trainer.epoch + 1 == self.epoch:
            self.state = copy.deepcopy(self.trainer.state_dict())

    def on_interrupt(self) -> None:
        self.state = copy.deepcopy(self.trainer.state_dict())


class Interrupt(HookBase):
    """SIGINT during micro-batch 3 of the third epoch (the one local_decay starts protecting in)."""

    def after_backward(self) -> None:
        if self.trainer.epoch == 2 and self.trainer.batch_idx == 3:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("cut", ["epoch_end", "mid_epoch"])
@pytest.mark.parametrize("make", [lambda: LocalDecayRate(0.05, switch_at=0.5, protect=0.5),
                                  lambda: TargetRate(0.01, fraction=0.3, threshold=0.95)],
                         ids=["local_decay", "target"])
def test_resume_is_exact(make, cut):
    full_hook = SparsityHook(PRUNABLE, make())
    full = _train([full_hook])
    grab = StateAt(2)
    if cut == "mid_epoch":   # the resumed epoch must not be re-ranked / re-adapted
        with pytest.raises(KeyboardInterrupt):
            _train([SparsityHook(PRUNABLE, make()), grab, Interrupt()])
        assert (grab.state["epoch"], grab.state["epoch_batches"]) == (2, 4)
    else:
        _train([SparsityHook(PRUNABLE, make()), grab])
    resumed_hook = SparsityHook(PRUNABLE, make())
    model = tiny_model(seed=1)          # other weights: the checkpoint must restore them
    loader = DataLoader(TinySet(16), batch_size=2, collate_fn=collate)
    t = Trainer(model, criterion, torch.optim.SGD(model.parameters(), lr=0.1), loader, epochs=4,
                hooks=[resumed_hook], progress=False)
    t.load_state_dict(grab.state)
    t.train()
    for k, v in full.module.state_dict().items():
        assert torch.equal(v, t.module.state_dict()[k]), k
    a, b = full_hook.state_dict(), resumed_hook.state_dict()
    assert a["hist_counts"] == b["hist_counts"] and a["started"] == b["started"] == 3
    if isinstance(full_hook.schedule, TargetRate):
        assert a["schedule_state"] == b["schedule_state"]
        assert a["schedule_state"]["current"] != 0.01          # it did adapt
    else:
        assert torch.equal(a["schedule_state"]["protected"], b["schedule_state"]["protected"])
    with pytest.raises(YoloCompressError, match="penalised 1 layers"):
        SparsityHook([0, 1], make()).load_state_dict(a)


def test_hook_rejects_layers_without_batchnorm():
    with pytest.raises(YoloCompressError, match="at least one layer"):
        SparsityHook([], ConstantRate(S))
    with pytest.raises(YoloCompressError, match="layer 2 is not a convolution with batch_norm"):
        _train([SparsityHook([2], ConstantRate(S))], epochs=1)   # the detection conv
    with pytest.raises(YoloCompressError, match="layer 9 does not exist"):
        _train([SparsityHook([9], ConstantRate(S))], epochs=1)


# --- config ---------------------------------------------------------------------------------

def test_sparse_config_defaults_overrides_and_validation(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("sparse:\n  schedule: target\n  target_epoch: 3\n")
    c = load_config(exp, ["sparse.s=1e-4", "train.epochs=5"])
    assert (c.sparse.schedule, c.sparse.s, c.sparse.target_epoch) == ("target", 1e-4, 3)
    assert c.to_dict()["sparse"]["include_excluded"] is False
    d = SparseConfig()
    assert (d.schedule, d.s, d.switch_at, d.protect, d.decay) == \
        ("local_decay", 1e-3, 0.4, 0.35, 0.01)
    sched = build_schedule(c.sparse, 5)
    assert isinstance(sched, TargetRate) and sched.describe()["target_epoch"] == 3
    assert sched.s == 1e-4
    for bad, match in (("sparse.protect=1.5", "protect"), ("sparse.schedule=exp", "schedule"),
                       ("sparse.s=0", "sparse.s"), ("sparse.target_epoch=0", "target_epoch"),
                       ("sparse.sparsity=1", "unknown key")):
        with pytest.raises(YoloCompressError, match=match):
            load_config(exp, [bad])
    with pytest.raises(YoloCompressError, match="beyond the training's 2 epochs"):
        build_schedule(c.sparse, 2)


def test_every_config_schedule_builds_with_its_parameters():
    for name, cls in SCHEDULES.items():
        sched = build_schedule(SparseConfig(schedule=name, s=2e-3), 10)
        assert type(sched) is cls and sched.describe()["schedule"] == name and sched.s == 2e-3
    local = build_schedule(SparseConfig(switch_at=0.2, protect=0.5, decay=0.1), 10)
    assert (local.switch_at, local.protect, local.decay) == (0.2, 0.5, 0.1)
    step = build_schedule(SparseConfig(schedule="step", step_at=0.3, step_factor=0.5), 10)
    assert (step.at, step.factor) == (0.3, 0.5)
    cos = build_schedule(SparseConfig(schedule="cosine", warmup=0.2, final_ratio=0.3), 10)
    assert (cos.warmup, cos.final_ratio) == (0.2, 0.3)


# --- the command ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """A 12/6-image demo set at 64 px, its descriptor, and an experiment on yolov4-nano
    (the fixture of test_train_run.py)."""
    return make_mini(tmp_path_factory.mktemp("mini"))


def test_sparse_command_end_to_end(mini, capsys):
    exp = str(mini / "exp.yaml")
    assert main(["train", "--config", exp, "train.epochs=1"]) == 0
    baseline = mini / "runs" / "exp" / "baseline" / "best.pt"
    args = ["sparse", "--config", exp, "--from", str(baseline), "sparse.switch_at=0.5",
            "sparse.s=0.01"]
    assert main(args) == 0
    run = mini / "runs" / "exp" / "sparse"
    for name in ("best.pt", "last.pt", "metrics.json", "train_log.csv", "gamma_histograms.png"):
        assert (run / name).is_file(), name
    art = load_artifact(run / "best.pt")
    assert art["config"]["train"]["ema"] is False       # sparse.ema defaults to off
    assert art["stage"] == "sparse" and art["parent"] == file_sha256(baseline)
    assert art["lineage"][-1] == {"stage": "baseline", "sha256": file_sha256(baseline),
                                  "path": str(baseline.resolve())}
    assert art["config"]["model"]["weights"] == str(baseline.resolve())
    rec = art["sparsity"]
    assert (rec["schedule"], rec["s"], rec["switch_at"]) == ("local_decay", 0.01, 0.5)
    model = build_model(art)
    layers = penalised_layers(model)                        # graph.prunable_layers
    assert rec["layers"] == [f"conv{i}" for i in layers]
    assert set(rec["stats"]) >= {"epoch", "s", "frac_below_1e-2", "l1", "s8/q50", "s32/q90"}
    # the record describes the saved weights: mean |γ| of the penalised gammas in the artifact
    gammas = torch.cat([model.layers[i].bn.weight.detach().abs() for i in layers])
    assert rec["stats"]["l1"] == pytest.approx(float(gammas.mean()), rel=1e-5)
    with open(run / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["sparse/s"]) == 0.01     # epoch 1: before the switch
    assert float(rows[1]["sparse/s"]) == pytest.approx(0.01 * (1 - 0.35 * 0.99), rel=1e-2)
    # TensorBoard: the |γ| histogram of each epoch, over every penalised channel
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0}).Reload()
    hists = events.Histograms("sparse/gamma_abs")
    assert [h.step for h in hists] == [1, 2]
    assert hists[-1].histogram_value.num == len(gammas)
    capsys.readouterr()
    assert main(args) == 0                                             # complete: not run again
    assert "is complete, skipping" in capsys.readouterr().out

    # sparse.gamma_lr_mult: the penalised gammas train in a group of their own at lr x m
    assert main([*args, "name=boost", "sparse.gamma_lr_mult=10", "sparse.epochs=1"]) == 0
    opt = load_artifact(mini / "runs" / "boost" / "sparse" / "last.pt",
                        check=False)["train_state"]["optimizer"]
    groups = {g["name"]: g for g in opt["param_groups"]}
    assert len(groups["bn_lr_x10"]["params"]) == len(layers)
    assert groups["bn_lr_x10"]["initial_lr"] == pytest.approx(10 * groups["bn"]["initial_lr"])


def test_sparse_command_errors(mini, capsys):
    exp = str(mini / "exp.yaml")
    assert main(["sparse", "--config", exp, "--from", str(mini / "demo.yaml")]) == 2
    assert "--from takes an artifact (.pt)" in capsys.readouterr().err
    assert main(["sparse", "--config", exp, "--from", str(mini / "missing.pt")]) == 2
    assert "no such artifact file" in capsys.readouterr().err
    assert main(["sparse", "--config", exp, "sparse.schedule=target", "sparse.target_epoch=9"]) == 2
    assert "beyond the training's 2 epochs" in capsys.readouterr().err


def test_penalised_layers_prunable_or_every_bn_conv():
    from yolocompress.compress.graph import prunable_layers
    model = Darknet(read_cfg(ROOT / "cfg/models/yolov4-nano.cfg"), classes=len(DEMO_CLASSES))
    every = penalised_layers(model, include_excluded=True)
    assert every == [i for i, b in enumerate(model.blocks[1:])
                     if b.type == "convolutional" and b.get_int("batch_normalize", 0)]
    default = penalised_layers(model)
    assert default == prunable_layers(model.blocks) and set(default) < set(every)
