"""Stage-3 loss balance: how large the attention term is, and how hard it pulls, next to the
detection loss, for each teacher BatchNorm regime.

On one batch of training images (no augmentation) it runs `DistillCriterion` on the pruned student
(train mode, as it trains) with the teacher in each `distill.teacher_bn` regime, and reports the
detection loss, the AT term (total and its largest layer; and for a student identical to the
teacher, which only the BatchNorm regime can set apart), and the ratio of the AT term's gradient
norm to the detection loss's over the student's conv weights, per part of the network (backbone,
neck, head). A ratio far above 1 means the AT term alone steers that part under Adam-type
optimizers. `--write` puts the table in the `## Distillation loss balance` section of
docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from yolocompress.artifacts import build_model, load_artifact
from yolocompress.benchmarks import machine, run_script, write_result
from yolocompress.compress.distill import TEACHER_BN, DistillCriterion, resolve_layers
from yolocompress.config import load_config
from yolocompress.data.dataset import DetectionDataset, build_loader
from yolocompress.train.loss import YoloLoss
from yolocompress.train.run import detection_criterion, load_data

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Distillation loss balance"
PARTS = ("backbone", "neck", "head")


def _grad_norms(loss: torch.Tensor, weights: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    flat = [w for ws in weights.values() for w in ws]
    grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
    out, k = {}, 0
    for part, ws in weights.items():
        gs = [g for g in grads[k:k + len(ws)] if g is not None]
        out[part] = float(torch.sqrt(sum(g.square().sum() for g in gs))) if gs else 0.0
        k += len(ws)
    return out


def _shown(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--teacher", default=str(ROOT / "runs/demo/sparse/best.pt"))
    ap.add_argument("--student", default=str(ROOT / "runs/demo/pruned/best.pt"))
    ap.add_argument("--images", type=int, default=16, help="training images in the batch")
    ap.add_argument("--write", action="store_true", help=f"write to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)

    config = load_config(args.config)
    dc = config.distill
    teacher_art = load_artifact(args.teacher)
    teacher = build_model(teacher_art, source=args.teacher)
    student = build_model(load_artifact(args.student), source=args.student).train()
    layers = resolve_layers(student.blocks, dc.layers, dc.betas,
                            (dc.beta_backbone, dc.beta_neck, dc.beta_deep))
    names, betas = [n for n, _ in layers], [b for _, b in layers]
    data = load_data(config)
    ds = DetectionDataset(data.train[:args.images], config.model.img_size, None, letterbox=False)
    images, targets, *rest = next(iter(build_loader(ds, args.images, shuffle=False, workers=0,
                                                    seed=0)))
    batch = (images.float() / 255, targets, *rest)
    weights: dict[str, list[torch.Tensor]] = {p: [] for p in PARTS}
    for info, layer in zip(student.infos, student.layers):
        conv = getattr(layer, "conv", None)
        if conv is not None and info.part in weights:
            weights[info.part].append(conv.weight)

    rows = []
    for mode in TEACHER_BN:
        state = {k: v.clone() for k, v in student.state_dict().items()}
        crit = DistillCriterion(detection_criterion(YoloLoss(student.heads)), teacher, names,
                                betas, p=dc.p, fg_mask=dc.fg_mask, teacher_bn=mode)
        terms = crit(student, batch)
        det = terms["loss"] - terms["at"]          # the criterion built here adds no other term
        g_det, g_at = _grad_norms(det, weights), _grad_norms(terms["at"], weights)
        student.load_state_dict(state)      # undo the train-mode forward's running-stat update
        top = max(crit.last_layer_terms.items(), key=lambda kv: float(kv[1]))
        with torch.no_grad():
            twin = float(crit(copy.deepcopy(teacher).train(), batch)["at"])
        rows.append((mode, det.item(), terms["at"].item(), top[0], float(top[1]), twin,
                     [g_at[p] / g_det[p] if g_det[p] else float("nan") for p in PARTS]))

    table = ["| teacher_bn | detection loss | AT (sum of beta-weighted layers) | largest layer | "
             "AT of a student identical to the teacher | "
             + " | ".join(f"AT / detection gradient, {p} convs" for p in PARTS) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(PARTS)]
    table += [f"| {m} | {d:.1f} | {a:.1f} | {n} ({v:.1f}) | {t:.1f} | "
              + " | ".join(f"{r:.2g}" for r in rs) + " |" for m, d, a, n, v, t, rs in rows]
    print("\n".join(table))
    if args.write:
        write_result(SECTION, f"{Path(args.config).name}: teacher {_shown(args.teacher)} "
                     f"(stage {teacher_art['stage']}), student "
                     f"{_shown(args.student)}, {len(names)} layers, the student in train mode "
                     f"on {args.images} training images at {config.model.img_size} px",
                     machine("torch"), "\n".join(table))


if __name__ == "__main__":
    run_script(main)
