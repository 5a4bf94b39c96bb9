"""Stage 1, dynamic sparse training: an L1 subgradient s_i(t)·sign(γ_i) on the BatchNorm gammas of
the prunable convs (network slimming), with the sparse rate s_i(t) given by a schedule.

`SparsityHook(layers, schedule)` is a Trainer hook; `SCHEDULES` names the rate schedules
(`build_schedule` makes one from the `sparse` config section); `plot_gamma_histograms` draws the
hook's per-epoch |γ| histograms. Base rate s = 1e-3 as the method's authors; from COCO-pretrained
YOLOv4 weights users report that 1e-4 is safer (REFERENCE.md, "The method").
"""
from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import YoloCompressError
from ..plotting import new_figure, save_figure
from ..models.darknet import ConvLayer, Darknet
from ..train.distributed import is_main, unwrap
from ..train.engine import HookBase

if TYPE_CHECKING:
    from ..config import SparseConfig

__all__ = ["SparseSchedule", "ConstantRate", "StepRate", "LocalDecayRate", "CosineRate",
           "LinearRate", "TargetRate", "SCHEDULES", "build_schedule", "SparsityHook",
           "HIST_EDGES", "THRESHOLD", "plot_gamma_histograms"]

THRESHOLD = 1e-2                      # |γ| below this counts as "near zero": logs, stage check
HIST_EDGES = torch.logspace(-5, 2, 71, dtype=torch.float64).tolist()   # 10 bins per decade


class SparseSchedule(abc.ABC):
    """The sparse rate over training. The hook drives a schedule like this::

        for epoch in range(epochs):
            schedule.start_epoch(epoch, epochs, gammas)  # |γ| of every penalised channel, 1-D, in
                                                          # hook order: re-rank, adapt (once/epoch)
            for each optimizer step:
                r = schedule.rate(progress)   # float, or a Tensor with one rate per channel
                grad(γ) += r · sign(γ)

    `progress` is the fraction of all optimizer steps done before the current one
    (Trainer.progress). On a resume `start_epoch` is not called again for an epoch already
    started, so whatever it decided lives in `state_dict()`.
    """

    name = ""
    params: tuple[str, ...] = ()      # constructor arguments besides s, recorded in the artifact

    def __init__(self, s: float) -> None:
        if not (math.isfinite(s) and s >= 0):
            raise YoloCompressError(f"sparse rate s must be a finite number >= 0, got {s}")
        self.s = float(s)

    def start_epoch(self, epoch: int, epochs: int, gammas: torch.Tensor) -> None:
        """Called before the first step of every epoch; the default schedule does not adapt."""

    @abc.abstractmethod
    def rate(self, progress: float) -> float | torch.Tensor:
        """The rate of the optimizer step at `progress`."""

    def describe(self) -> dict[str, Any]:
        """{schedule, s, <params>}: what the artifact records."""
        return {"schedule": self.name, "s": self.s, **{k: getattr(self, k) for k in self.params}}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _fraction(name: str, value: float, low_open: bool = False, high_open: bool = False) -> float:
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise YoloCompressError(f"sparse schedule: {name} must be in {'(' if low_open else '['}0, "
                                f"1{')' if high_open else ']'}, got {value}")
    return float(value)


class ConstantRate(SparseSchedule):
    """Network slimming: s at every step."""

    name = "constant"

    def rate(self, progress: float) -> float:
        return self.s


class StepRate(SparseSchedule):
    """s until `at` of training, then s·factor (tanluren's "global decay")."""

    name = "step"
    params = ("at", "factor")

    def __init__(self, s: float, at: float = 0.5, factor: float = 0.1) -> None:
        super().__init__(s)
        self.at = _fraction("step_at", at, low_open=True, high_open=True)
        if not factor >= 0:
            raise YoloCompressError(f"sparse schedule: step_factor must be >= 0, got {factor}")
        self.factor = float(factor)

    def rate(self, progress: float) -> float:
        return self.s if progress < self.at else self.s * self.factor


class LocalDecayRate(SparseSchedule):
    """The method's dynamic rule as its authors released it. In epochs e < switch_at·epochs every
    channel gets s. From then on, at the start of every epoch the channels are ranked by |γ| and
    the top `protect` share -- ranked GLOBALLY over all penalised gammas, as the authors' code
    does, so layers with large gammas keep more channels -- get s·decay; the rest keep s."""

    name = "local_decay"
    params = ("switch_at", "protect", "decay")

    def __init__(self, s: float, switch_at: float = 0.4, protect: float = 0.35,
                 decay: float = 0.01) -> None:
        super().__init__(s)
        self.switch_at = _fraction("switch_at", switch_at, high_open=True)
        self.protect = _fraction("protect", protect)
        self.decay = _fraction("decay", decay)
        self.protected: torch.Tensor | None = None   # bool per channel; None before the switch
        self._rates: torch.Tensor | None = None

    def start_epoch(self, epoch: int, epochs: int, gammas: torch.Tensor) -> None:
        if epoch < self.switch_at * epochs:
            self._set(None)
            return
        n = gammas.numel()
        k = min(n, round(self.protect * n))
        order = torch.sort(gammas.detach().abs().flatten(), descending=True, stable=True).indices
        mask = torch.zeros(n, dtype=torch.bool, device=gammas.device)
        mask[order[:k]] = True
        self._set(mask)

    def _set(self, mask: torch.Tensor | None) -> None:
        self.protected, self._rates = mask, None
        if mask is not None:
            self._rates = torch.full(mask.shape, self.s, dtype=torch.float32, device=mask.device)
            self._rates[mask] = self.s * self.decay

    def rate(self, progress: float) -> float | torch.Tensor:
        return self.s if self._rates is None else self._rates

    def state_dict(self) -> dict:
        return {"protected": None if self.protected is None else self.protected.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self._set(state["protected"])


class CosineRate(SparseSchedule):
    """Linear warm-up from 0 to s over `warmup` of training, then a half cosine down to
    s·final_ratio at the end: s·(r + (1 − r)·(1 + cos(π·t))/2) with
    t = (progress − warmup)/(1 − warmup)."""

    name = "cosine"
    params = ("warmup", "final_ratio")

    def __init__(self, s: float, warmup: float = 0.1, final_ratio: float = 0.1) -> None:
        super().__init__(s)
        self.warmup = _fraction("warmup", warmup, high_open=True)
        self.final_ratio = _fraction("final_ratio", final_ratio)

    def _decay(self, t: float) -> float:
        return self.final_ratio + (1 - self.final_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    def rate(self, progress: float) -> float:
        if progress < self.warmup:
            return self.s * progress / self.warmup
        t = min(1.0, (progress - self.warmup) / (1 - self.warmup))
        return self.s * self._decay(t)


class LinearRate(CosineRate):
    """As `cosine`, but the decay after warm-up is a straight line: s·(1 − (1 − r)·t)."""

    name = "linear"

    def _decay(self, t: float) -> float:
        return 1 - (1 - self.final_ratio) * t


class TargetRate(SparseSchedule):
    """Adapts s once per epoch so that `fraction` of the penalised gammas fall below `threshold`
    by epoch `target_epoch` (None: the last). The path is a straight line from the fraction f0
    measured when training starts to `fraction` at `target_epoch` (flat after it). At the start of
    epoch e >= 1 with measured fraction f and path value p(e): f < p − tolerance (lagging) →
    s ·= up; f > p + tolerance (ahead) → s ·= down; s stays within [s·min_ratio, s·max_ratio]."""

    name = "target"
    params = ("fraction", "threshold", "target_epoch", "up", "down", "tolerance", "min_ratio",
              "max_ratio")

    def __init__(self, s: float, fraction: float = 0.5, threshold: float = 1e-2,
                 target_epoch: int | None = None, up: float = 1.5, down: float = 1 / 1.5,
                 tolerance: float = 0.02, min_ratio: float = 0.01,
                 max_ratio: float = 100.0) -> None:
        super().__init__(s)
        if s <= 0:
            raise YoloCompressError("sparse schedule 'target' needs s > 0 (it scales s)")
        self.fraction = _fraction("target_fraction", fraction, low_open=True, high_open=True)
        if not threshold > 0:
            raise YoloCompressError(f"sparse schedule: target_threshold must be > 0, got "
                                    f"{threshold}")
        if target_epoch is not None and target_epoch < 1:
            raise YoloCompressError(f"sparse schedule: target_epoch must be >= 1 or null, got "
                                    f"{target_epoch}")
        if not (up > 1 and 0 < down < 1 and 0 <= tolerance < 1 and 0 < min_ratio <= 1 <= max_ratio):
            raise YoloCompressError(f"sparse schedule 'target' needs up > 1, 0 < down < 1, "
                                    f"0 <= tolerance < 1 and min_ratio <= 1 <= max_ratio; got "
                                    f"{up}, {down}, {tolerance}, {min_ratio}, {max_ratio}")
        self.threshold, self.target_epoch = float(threshold), target_epoch
        self.up, self.down, self.tolerance = float(up), float(down), float(tolerance)
        self.min_ratio, self.max_ratio = float(min_ratio), float(max_ratio)
        self.current = self.s
        self.f0: float | None = None

    def path(self, epoch: int, epochs: int) -> float:
        """Target share of gammas below threshold at the start of `epoch` (f0 at epoch 0)."""
        end = self.target_epoch or epochs
        f0 = self.f0 if self.f0 is not None else 0.0
        return f0 + (self.fraction - f0) * min(1.0, epoch / end)

    def start_epoch(self, epoch: int, epochs: int, gammas: torch.Tensor) -> None:
        f = float((gammas.detach().abs() < self.threshold).float().mean())
        if self.f0 is None:
            self.f0 = f
        if epoch == 0:
            return
        p = self.path(epoch, epochs)
        if f < p - self.tolerance:
            self.current = min(self.current * self.up, self.s * self.max_ratio)
        elif f > p + self.tolerance:
            self.current = max(self.current * self.down, self.s * self.min_ratio)

    def rate(self, progress: float) -> float:
        return self.current

    def state_dict(self) -> dict:
        return {"current": self.current, "f0": self.f0}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.f0 = float(state["current"]), state["f0"]


SCHEDULES: dict[str, type[SparseSchedule]] = {c.name: c for c in (
    ConstantRate, StepRate, LocalDecayRate, CosineRate, LinearRate, TargetRate)}


def build_schedule(sc: "SparseConfig", epochs: int) -> SparseSchedule:
    """The schedule the `sparse` config section names, for a training of `epochs` epochs."""
    if sc.schedule == "target" and sc.target_epoch is not None and sc.target_epoch > epochs:
        raise YoloCompressError(f"sparse.target_epoch={sc.target_epoch} is beyond the training's "
                                f"{epochs} epochs")
    params = {"constant": {}, "step": {"at": sc.step_at, "factor": sc.step_factor},
              "local_decay": {"switch_at": sc.switch_at, "protect": sc.protect, "decay": sc.decay},
              "cosine": {"warmup": sc.warmup, "final_ratio": sc.final_ratio},
              "linear": {"warmup": sc.warmup, "final_ratio": sc.final_ratio},
              "target": {"fraction": sc.target_fraction, "threshold": sc.target_threshold,
                         "target_epoch": sc.target_epoch}}
    if sc.schedule not in SCHEDULES:
        raise YoloCompressError(f"unknown sparse schedule '{sc.schedule}' (one of "
                                f"{', '.join(SCHEDULES)})")
    return SCHEDULES[sc.schedule](sc.s, **params[sc.schedule])


class SparsityHook(HookBase):
    """Adds s_i(t)·sign(γ_i) to the gradient of the BN weight of each conv in `layers` (indices
    into `model.layers`, each a conv with batch_normalize) in `before_optimizer_step`: ONCE per
    optimizer step, on the accumulated gradients after GradScaler.unscale_ (so neither gradient
    accumulation nor AMP loss scaling changes the penalty), before gradient clipping. A gamma of
    exactly 0 gets sign 0 (torch.sign); a layer whose gradient is None is skipped. Under DDP the
    gradients are already averaged over ranks and every rank adds the same penalty, so the ranks
    stay identical.

    After every epoch it puts into `trainer.storage`: `sparse/s` (mean over channels of the rate
    used at the epoch's last step), `sparse/frac_below_1e-2` and `sparse/l1` (share below 1e-2 and
    mean of the penalised |γ|), and per output stride `sparse/s<stride>/q10|q50|q90` (quantiles of
    |γ|); it appends the |γ| histogram over `HIST_EDGES` to `histogram`, fills `record["stats"]`
    and, with `plot_path`, draws `plot_gamma_histograms` after training (rank 0). These statistics
    describe `trainer.model_for_eval` -- the weights that are saved and later pruned (with EMA on,
    the EMA, which lags the trained weights) -- while schedules see the trained weights.
    """

    priority = 50

    def __init__(self, layers: Sequence[int], schedule: SparseSchedule,
                 plot_path: str | os.PathLike | None = None) -> None:
        layers = [int(i) for i in layers]
        if not layers:
            raise YoloCompressError("SparsityHook needs at least one layer to penalise")
        if len(set(layers)) != len(layers):
            raise YoloCompressError(f"SparsityHook: layer indices repeat: {layers}")
        self.layers, self.schedule = layers, schedule
        self.plot_path = None if plot_path is None else Path(plot_path)
        self.record: dict[str, Any] = {**schedule.describe(), "layers": [], "stats": {}}
        self.hist_epochs: list[int] = []
        self.hist_counts: list[list[int]] = []
        self._started = -1            # the epoch whose start_epoch ran (no re-ranking on resume)
        self._last_rate: float | torch.Tensor = 0.0    # of the latest step, for the logs
        self._bns: list[torch.nn.BatchNorm2d] = []

    @property
    def histogram(self) -> dict[str, list]:
        """{"edges", "epochs" (1-based), "counts" (one row per epoch)}, the input of
        `plot_gamma_histograms`."""
        return {"edges": list(HIST_EDGES), "epochs": list(self.hist_epochs),
                "counts": [list(c) for c in self.hist_counts]}

    def _bn_layers(self, model: torch.nn.Module) -> list[torch.nn.BatchNorm2d]:
        if not isinstance(model, Darknet):
            raise YoloCompressError(f"SparsityHook needs a Darknet model, got "
                                    f"{type(model).__name__}")
        layers, out = model.layers, []
        for i in self.layers:
            if not 0 <= i < len(layers):
                raise YoloCompressError(f"SparsityHook: layer {i} does not exist (the model has "
                                        f"{len(layers)} layers)")
            layer = layers[i]
            if not isinstance(layer, ConvLayer) or not layer.bn_enabled:
                raise YoloCompressError(f"SparsityHook: layer {i} is not a convolution with "
                                        f"batch_normalize (it has no BN gamma to penalise)")
            out.append(layer.bn)
        return out

    @staticmethod
    def _gammas(bns: Sequence[torch.nn.BatchNorm2d]) -> torch.Tensor:
        return torch.cat([bn.weight.detach().abs().flatten() for bn in bns])

    def before_train(self) -> None:
        model = self.trainer.module
        self._bns = self._bn_layers(model)
        self.record["layers"] = [model.infos[i].name for i in self.layers]

    def before_epoch(self) -> None:
        t = self.trainer
        if t.epoch != self._started:
            self.schedule.start_epoch(t.epoch, t.epochs, self._gammas(self._bns))
            self._started = t.epoch

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        rate = self.schedule.rate(self.trainer.progress)
        if torch.is_tensor(rate):
            sizes = [bn.weight.numel() for bn in self._bns]
            if rate.numel() != sum(sizes):
                raise YoloCompressError(f"sparse schedule '{self.schedule.name}' gave "
                                        f"{rate.numel()} rates for {sum(sizes)} channels")
            self._last_rate = rate
            rate = rate.to(self._bns[0].weight.device)   # a no-op but after a resume
            for bn, r in zip(self._bns, torch.split(rate.flatten(), sizes)):
                if bn.weight.grad is not None:
                    bn.weight.grad.add_(r.to(bn.weight.grad.dtype) * torch.sign(bn.weight))
        else:
            self._last_rate = float(rate)
            for bn in self._bns:
                if bn.weight.grad is not None:
                    bn.weight.grad.add_(torch.sign(bn.weight), alpha=float(rate))

    @torch.no_grad()
    def after_epoch(self) -> None:
        t = self.trainer
        model = unwrap(t.model_for_eval)
        bns = self._bn_layers(model)
        g = self._gammas(bns).float().cpu()
        s = self._last_rate
        stats = {"s": float(s.float().mean()) if torch.is_tensor(s) else s,
                 "frac_below_1e-2": float((g < THRESHOLD).float().mean()),
                 "l1": float(g.mean())}
        strides = [model.infos[i].stride for i in self.layers]
        for stride in sorted(set(strides)):
            sel = torch.cat([bn.weight.detach().abs().flatten().float().cpu()
                             for bn, st in zip(bns, strides) if st == stride])
            q = torch.quantile(sel, torch.tensor([0.1, 0.5, 0.9])).tolist()
            stats.update({f"s{stride}/q10": q[0], f"s{stride}/q50": q[1], f"s{stride}/q90": q[2]})
        t.storage.update({f"sparse/{k}": v for k, v in stats.items()})
        t.storage["hist/sparse/gamma_abs"] = g      # TensorBoard histogram (LoggerHook)
        self.record["stats"] = {"epoch": t.epoch + 1, **stats}
        self.hist_epochs.append(t.epoch + 1)
        self.hist_counts.append(_histogram(g))

    def after_train(self) -> None:
        if self.plot_path is not None and self.hist_counts and is_main():
            plot_gamma_histograms(self.histogram, self.plot_path)

    def state_dict(self) -> dict:
        return {"layers": list(self.layers), "schedule": self.schedule.name,
                "schedule_state": self.schedule.state_dict(), "started": self._started,
                "hist_epochs": list(self.hist_epochs),
                "hist_counts": [list(c) for c in self.hist_counts]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["layers"]) != self.layers or state["schedule"] != self.schedule.name:
            raise YoloCompressError(
                f"checkpoint's sparse training penalised {len(state['layers'])} layers with "
                f"schedule '{state['schedule']}', this one {len(self.layers)} layers with "
                f"'{self.schedule.name}'")
        self.schedule.load_state_dict(state["schedule_state"])
        self._started = int(state["started"])
        self.hist_epochs = [int(e) for e in state["hist_epochs"]]
        self.hist_counts = [[int(c) for c in row] for row in state["hist_counts"]]


def _histogram(values: torch.Tensor) -> list[int]:
    """Counts of `values` in the HIST_EDGES bins; the first bin also holds everything below it
    (0 included), the last everything above."""
    edges = torch.tensor(HIST_EDGES, dtype=torch.float64)
    v = values.double().clamp(edges[0], edges[-1])
    idx = torch.bucketize(v, edges[1:-1], right=True)
    return torch.bincount(idx, minlength=len(edges) - 1).tolist()


def plot_gamma_histograms(hist: dict[str, list], png_path: str | os.PathLike) -> Path:
    """Heatmap of the |γ| distribution over epochs (x: epoch, y: |γ| on a log axis, colour: share of
    the penalised channels in the bin), with the 1e-2 line; written atomically as a PNG."""
    edges, epochs, counts = hist["edges"], hist["epochs"], hist["counts"]
    if not epochs or len(counts) != len(epochs) or any(len(c) != len(edges) - 1 for c in counts):
        raise YoloCompressError(f"{png_path}: gamma histogram needs one row of {len(edges) - 1} "
                                f"counts per epoch, got {len(counts)} rows for {len(epochs)} "
                                f"epochs")
    c = torch.tensor(counts, dtype=torch.float64)
    share = (c / c.sum(1, keepdim=True).clamp(min=1)).T.numpy()
    x = [epochs[0] - 0.5] + [e + 0.5 for e in epochs]
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(x, edges, share, cmap="viridis", shading="flat")
    ax.set_yscale("log")
    ax.axhline(THRESHOLD, color="white", linestyle="--", linewidth=1, label="|γ| = 1e-2")
    ax.set_xlabel("epoch")
    ax.set_ylabel("|γ| (bottom bin: everything below)")
    ax.set_title("BN gamma distribution of the penalised layers")
    ax.legend(loc="upper right", fontsize=8)
    fig.colorbar(mesh, ax=ax, label="share of channels")
    return save_figure(fig, png_path)
