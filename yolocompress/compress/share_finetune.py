"""Centroid fine-tuning of a weight-shared artifact (Deep Compression's third step): train with
every shared conv weight tied to its codebook, the assignments fixed.

The tie is a parametrization (torch.nn.utils.parametrize) of each conv's `weight` as
`codebook[idx]`: the trained parameter is the codebook (k,), `idx` a fixed buffer of the weight's
shape. The forward indexes, so the backward of that indexing (an index_add) gives each centroid
exactly the sum of the gradients of the weights assigned to it, and an optimizer step moves the
centroid and with it all of its members alike: the weights are exactly shared at every step, by
construction. (Re-projecting after each step instead would move every weight by its own update
and then average: the mean, not the sum, of the gradients under SGD, and not even that under
Adam, which normalises each weight's update before the averaging.) BatchNorm parameters and biases
train as usual; a codebook sits in the optimizer's "decay" group, as the conv weight it stands for
(train.optim), so decay shrinks its centroids as it would shrink each member. The summed gradient
of a centroid with n members is about n times a lone weight's: Adam / AdamW normalise that away,
plain SGD steps a centroid that much further (its lr may want dividing accordingly).

Training is the project's one Trainer as train.run.build_trainer assembles it (augmented training
split, detection loss, EMA, LR schedule), with the budget of the recovery stage -- the `distill`
section's epochs / steps / lr / optimizer, as `yolocompress finetune` -- where `steps` and `lr`
override it. As for `distill.steps`, a budget in steps becomes the fewest whole epochs that give at
least that many optimizer steps (train.run.with_stage_budget); the artifact records the steps
trained under "share_finetune". With EMA on, the EMA model is the result: its codebooks are the
average of the trained codebooks, still on the same indices. With no entries, the same training
fine-tunes every weight: the control that shows what the training alone buys.
"""
from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..artifacts import build_model
from ..config import Config
from ..errors import YoloCompressError
from ..train.distributed import init_distributed
from ..train.run import DataSplits, build_trainer, load_data, with_stage_budget
from .compact import encode_shared, shared_indices
from .weight_sharing import BITS

__all__ = ["CodebookWeight", "tie_to_codebooks", "untie_codebooks", "finetune_shared"]


class CodebookWeight(nn.Module):
    """Parametrization weight = codebook[idx]: the parameter is the codebook (k,), `idx` (int64, the
    weight's shape) a fixed buffer; `bits` is the entry's index width."""

    def __init__(self, idx: torch.Tensor, k: int, bits: int) -> None:
        super().__init__()
        self.register_buffer("idx", idx.long())
        self.k, self.bits = k, bits

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook[self.idx]

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The codebook of `weight`: each centroid the mean of its members, in float64 (so exact
        for a weight that is codebook[idx]); a centroid no weight uses is 0."""
        idx = self.idx.flatten()
        sums = torch.zeros(self.k, dtype=torch.float64, device=weight.device).index_add_(
            0, idx, weight.detach().flatten().double())
        counts = torch.bincount(idx, minlength=self.k)
        return torch.where(counts > 0, sums / counts.clamp(min=1), 0).to(weight.dtype)


def tie_to_codebooks(model: nn.Module, encoded: dict[str, dict]) -> None:
    """Parametrize every conv weight named in `encoded` (compact "shared" entries, keys as in the
    state_dict) as its entry's codebook[indices]; the codebook, unused centroids included, becomes
    the trained parameter. The model's weights must be those the entries decode to."""
    modules = dict(model.named_modules())
    for key, entry in encoded.items():
        module_name, _, tensor = key.rpartition(".")
        conv = modules.get(module_name)
        if not isinstance(conv, nn.Conv2d) or tensor != "weight":
            raise YoloCompressError(f"centroid fine-tuning: '{key}' is not a conv weight of the "
                                    f"model")
        if entry.get("kind") != "shared" or int(entry.get("bits", 0)) not in BITS:
            raise YoloCompressError(f"centroid fine-tuning: '{key}' needs a shared entry of "
                                    f"{BITS.start}..{BITS.stop - 1} bits, got kind "
                                    f"{entry.get('kind')!r}, bits {entry.get('bits')!r}")
        weight = conv.weight.detach().clone()
        codebook = entry["codebook"].to(weight)
        parametrize.register_parametrization(
            conv, "weight", CodebookWeight(shared_indices(entry).to(weight.device),
                                           codebook.numel(), int(entry["bits"])), unsafe=True)
        with torch.no_grad():
            conv.parametrizations.weight.original.copy_(codebook)
        if not torch.equal(conv.weight, weight):
            raise YoloCompressError(f"centroid fine-tuning: '{key}' is not its entry's "
                                    f"codebook[indices] (artifact and entries of other models?)")


def untie_codebooks(model: nn.Module) -> dict[str, dict]:
    """Make every tied conv weight a plain parameter again (value codebook[idx]); returns the
    compact entries of those weights, with their codebooks as trained."""
    tied = [(name, m) for name, m in model.named_modules()
            if parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], CodebookWeight)]
    encoded = {}
    for name, m in tied:
        tie = m.parametrizations.weight[0]
        encoded[f"{name}.weight"] = encode_shared(m.parametrizations.weight.original, tie.idx,
                                                  tie.bits)
        parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
    return encoded


def finetune_shared(art: dict, encoded: dict[str, dict], config: Config, *,
                    steps: int | None = None, lr: float | None = None,
                    data: DataSplits | None = None, progress: bool = False
                    ) -> tuple[dict, dict[str, dict]]:
    """(the artifact trained with the conv weights named in `encoded` tied to their codebooks,
    those weights' compact entries with the trained codebooks); the module docstring has the
    rules. `steps` / `lr` override the `distill` budget; steps 0: the inputs as they are. `data`:
    load_data(config) when not given. One process (not under torchrun)."""
    if steps is not None and steps < 0:
        raise YoloCompressError(f"centroid fine-tuning: steps must be >= 0, got {steps}")
    if lr is not None and not lr > 0:
        raise YoloCompressError(f"centroid fine-tuning: lr must be > 0, got {lr}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise YoloCompressError("centroid fine-tuning runs in one process, not under torchrun")
    model = build_model(art)
    tie_to_codebooks(model, encoded)
    if steps == 0:
        return art, encoded
    data = data or load_data(config)
    budget = config.distill
    if steps is not None:
        budget = dataclasses.replace(budget, epochs=None, steps=steps)
    if lr is not None:
        budget = dataclasses.replace(budget, lr=lr)
    config = with_stage_budget(config, budget, len(data.train))
    trainer, _ = build_trainer(config, model, data.train,
                               init_distributed(config.train.device).device, progress=progress)
    storage = trainer.train()
    result = trainer.model_for_eval.cpu()
    trained = untie_codebooks(result)
    state = result.state_dict()
    tc = config.train
    return {**art, "state_dict": {k: state[k].detach().clone() for k in art["state_dict"]},
            "metrics": {k: float(v) for k, v in storage.items() if isinstance(v, (int, float))},
            "share_finetune": {"steps": trainer.iter, "epochs": tc.epochs, "lr": tc.lr,
                               "optimizer": tc.optimizer, "tied_convs": len(trained)}}, trained
