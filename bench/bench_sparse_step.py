"""Stage-1 overhead: what the L1 penalty on BN gammas adds to a training step.

Times a plain training step of the demo model (forward, YOLOv4 loss, backward, AdamW step; batch
and input size from the experiment, random images with a few boxes each) and the SparsityHook's
per-step work (the schedule's rate plus `grad += s * sign(gamma)` on every penalised BN), each the
median of many repeats, and reports the ratio. `--write` puts the table in the `## Sparse-step
overhead` section of docs/BENCHMARKS.md. Target: <= 5 % of a plain step.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from yolocompress.benchmarks import machine, run_script, write_result
from yolocompress.compress.sparse_stage import penalised_layers
from yolocompress.compress.sparsity import SparsityHook, build_schedule
from yolocompress.config import load_config
from yolocompress.models.cfg import read_cfg, set_classes
from yolocompress.models.darknet import Darknet
from yolocompress.train.loss import YoloLoss
from yolocompress.train.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Sparse-step overhead"


def _targets(batch: int, size: int, classes: int, g: torch.Generator) -> torch.Tensor:
    rows = []
    for b in range(batch):
        for _ in range(3):
            x, y = torch.rand(2, generator=g) * size * 0.7
            w, h = 16 + torch.rand(2, generator=g) * size * 0.25
            rows.append([b, int(torch.randint(classes, (1,), generator=g)), x, y, x + w, y + h])
    return torch.tensor(rows, dtype=torch.float32)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--steps", type=int, default=12, help="timed plain training steps")
    ap.add_argument("--hook-calls", type=int, default=200, help="timed penalty applications")
    ap.add_argument("--write", action="store_true", help=f"write to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    size, batch, classes = config.model.img_size, config.train.batch_size, 6
    torch.manual_seed(0)
    model = Darknet(set_classes(read_cfg(config.require_file("model.cfg")), classes)).train()
    loss_fn = YoloLoss(model.heads)
    opt = build_optimizer(model, config.train.optimizer, config.train.lr, config.train.momentum,
                          config.train.weight_decay)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g)
    targets = _targets(batch, size, classes, g)

    def step() -> None:
        out = model(images)
        loss_fn(out, targets, (size, size))["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=False)     # keep grads allocated for the hook timing below

    step()                                   # warm-up (and allocates every grad)
    plain = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)

    rows = []
    for name in ("constant", "local_decay"):
        sc = load_config(args.config, [f"sparse.schedule={name}"]).sparse
        schedule = build_schedule(sc, config.train.epochs)
        hook = SparsityHook(penalised_layers(model), schedule)
        hook.trainer = SimpleNamespace(progress=0.75, module=model, epoch=int(0.75 * 40),
                                       epochs=40)
        hook.before_train()
        schedule.start_epoch(30, 40, hook._gammas(hook._bns))   # past the switch: per-channel s
        calls = []
        for _ in range(args.hook_calls):
            t0 = time.perf_counter()
            hook.before_optimizer_step()
            calls.append(time.perf_counter() - t0)
        rows.append((name, len(hook.layers), sum(bn.weight.numel() for bn in hook._bns),
                     statistics.median(calls)))

    step_ms = statistics.median(plain) * 1e3
    table = ["| schedule | penalised convs | channels | penalty per step (ms) | plain step (ms) | "
             "overhead (target <= 5 %) |", "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {layers} | {ch} | {t * 1e3:.3f} | {step_ms:.0f} | {t * 1e3 / step_ms:.2%} |"
              for n, layers, ch, t in rows]
    print("\n".join(table))
    if args.write:
        write_result(SECTION, f"{Path(args.config).name}: {config.model.cfg} at {size} px, batch "
                     f"{batch}, {config.train.optimizer}; medians of {args.steps} steps and "
                     f"{args.hook_calls} penalty applications, {torch.get_num_threads()} threads",
                     machine("torch"), "\n".join(table))


if __name__ == "__main__":
    run_script(main)
