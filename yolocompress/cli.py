"""The `yolocompress` command: one entry point, one sub-command per job.

Errors a user can fix are YoloCompressError: printed as one line `error: ...`, exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import YoloCompressError

__all__ = ["main"]

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def _load_blocks(source: str, classes: int | None):
    """Blocks and input size from a cfg file or an artifact."""
    from .artifacts import load_artifact
    from .models.cfg import parse_cfg, read_cfg, set_classes

    if source.endswith(".pt"):
        art = load_artifact(source)
        blocks, size = parse_cfg(art["cfg"], source=f"{source}[cfg]"), art["input_size"]
    else:
        blocks = read_cfg(source)
        size = [blocks[0].get_int("height", 416), blocks[0].get_int("width", 416)]
    if classes is not None:
        blocks = set_classes(blocks, classes)
    return blocks, size


def cmd_info(args) -> None:
    from .models.darknet import Darknet
    from .models.profile import profile_summary

    blocks, size = _load_blocks(args.source, args.classes)
    if args.img_size:
        size = [args.img_size, args.img_size]
    Darknet(blocks)  # validates heads/classes as a build would
    summary = profile_summary(blocks, *size)
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'idx':>4} {'name':<12} {'part':<9} {'role':<10} {'output':>16} {'params':>11} "
          f"{'BFLOPs':>8}")
    for r in summary["layers"]:
        c, h, w = r["out"]
        print(f"{r['index']:>4} {r['name']:<12} {r['part']:<9} {r['role']:<10} "
              f"{f'{c}x{h}x{w}':>16} {r['params']:>11,} {r['flops'] / 1e9:>8.3f}")
    print(f"{args.source} @ {size[0]}x{size[1]}: {summary['params']:,} params, "
          f"{summary['flops'] / 1e9:.3f} BFLOPs ({summary['flops_conv'] / 1e9:.3f} in convs)")


def cmd_import_darknet(args) -> None:
    from .artifacts import artifact_from_model, save_artifact
    from .fileio import refuse_overwrite
    from .models.cfg import read_cfg
    from .models.darknet import Darknet
    from .models.weights import load_darknet_weights

    refuse_overwrite([args.out], [args.cfg, args.weights, args.names])
    blocks = read_cfg(args.cfg)
    names = _class_names(args.names, args.classes)
    if names is None:
        classes = Darknet(blocks).classes
        names = [f"class{i}" for i in range(classes)]
        print(f"{args.cfg}: no --classes or --names: {classes} classes as the cfg's [yolo] says, "
              f"named class0..class{classes - 1}", file=sys.stderr)
    import torch
    torch.manual_seed(args.seed)
    model = Darknet(blocks, classes=len(names))
    model.initialize()
    metrics = {}
    if args.weights:
        report = load_darknet_weights(model, args.weights)
        print(report.summary())
        metrics["darknet_layers_loaded"] = report.layers_loaded
    size = [args.img_size, args.img_size] if args.img_size else list(model.input_size)
    art = artifact_from_model(model, "imported", names, input_size=size, metrics=metrics,
                              config={"cfg": str(args.cfg), "weights": args.weights,
                                      "seed": args.seed})
    sha = save_artifact(art, args.out)
    print(f"wrote {args.out} (stage imported, {len(names)} classes, sha256 {sha[:12]})")


def _class_names(names: str | None, classes: int | None) -> list[str] | None:
    """Names from --names (one per line), else class0..N-1 for --classes N, else None."""
    if names:
        path = Path(names)
        if not path.is_file():
            raise YoloCompressError(f"{names}: no such names file")
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise YoloCompressError(f"{names}: not a text file of class names (not UTF-8)") from e
        out = [s.strip() for s in text.splitlines() if s.strip()]
        if not out:
            raise YoloCompressError(f"{names}: the names file is empty")
        if "\x00" in text or not all(s.isprintable() for s in out):
            raise YoloCompressError(f"{names}: not a text file of class names (control characters)")
        dup = sorted({n for n in out if out.count(n) > 1})
        if dup:
            raise YoloCompressError(f"{names}: class names repeated: {', '.join(dup)}")
        if classes is not None and classes != len(out):
            raise YoloCompressError(f"{names}: {len(out)} names but --classes {classes}")
        return out
    return None if classes is None else [f"class{i}" for i in range(classes)]


def cmd_export(args) -> None:
    from .artifacts import load_artifact
    from .export import DEFAULT_OPSET, export_darknet, export_onnx

    art = load_artifact(args.artifact)
    if args.format == "darknet":
        cfg, weights = export_darknet(art, args.out, inputs=[args.artifact])
        print(f"wrote {cfg} and {weights}")
    else:
        out = export_onnx(art, args.out, opset=args.opset or DEFAULT_OPSET, inputs=[args.artifact],
                          mish=args.mish or "sigmoid")
        print(f"wrote {out}")
        if args.check:
            from .export import check_onnx
            diff = check_onnx(art, out)
            print(f"ONNX Runtime vs PyTorch: max abs diff {diff:.2e}")


def _load_model(path: str, names=None, threads: int | None = None):
    """(model, class names, input size) of an artifact (.pt, PyTorch) or an exported .onnx file
    (ONNX Runtime, `threads` intra-op threads); `names` given: the model's must equal them."""
    if Path(path).suffix.lower() == ".onnx":
        from .onnx_backend import OnnxModel
        model = OnnxModel(path, threads, names)
        return model, model.names, list(model.input_size)
    from .artifacts import build_model, load_parent
    art = load_parent(path, names, role="model")
    return build_model(art, source=path), art["classes"], art["input_size"]


def cmd_predict(args) -> None:
    from .fileio import refuse_overwrite
    from .inference import predict_images

    paths = _expand_images(args.images)
    refuse_overwrite([args.out], [args.artifact, *args.images])
    model, names, input_size = _load_model(args.artifact, threads=args.threads)
    size = args.img_size or input_size[0]
    dets = predict_images(model, names, paths, args.out, size,
                          model.letterbox if args.letterbox is None else args.letterbox,
                          args.conf_thresh, args.iou_thresh, args.max_det)
    total = sum(len(d) for d in dets)
    print(f"{len(paths)} images, {total} detections -> {args.out}/ (detections.json, annotated jpgs)")


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _expand_images(items: list[str]) -> list[Path]:
    """Files as given and the images of folders (sorted), each file once (by its resolved path)."""
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in _IMAGE_SUFFIXES
                            and q.is_file())
        elif p.is_file():
            paths.append(p)
        else:
            raise YoloCompressError(f"{item}: no such image file or folder")
    if not paths:
        raise YoloCompressError(f"no images found in {' '.join(items)}")
    seen: set[str] = set()
    unique = []
    for p in paths:
        if os.path.realpath(p) not in seen:
            seen.add(os.path.realpath(p))
            unique.append(p)
    return unique


def cmd_data_demo(args) -> None:
    from .data.descriptor import load_descriptor, load_split

    desc = load_descriptor(args.data)
    counts = {split: len(load_split(desc, split)) for split in ("train", "val")}
    print(f"demo data set at {desc.root}: {counts['train']} train / {counts['val']} val images, "
          f"classes {', '.join(desc.names)}")


def cmd_stage(args) -> None:
    """A registered stage's command (stages.py): load the experiment, run the stage's entry."""
    from .config import load_config
    from .stages import get_stage, resolve

    config = load_config(args.config, args.overrides)
    resolve(get_stage(args.stage_name).entry)(config, args)


def cmd_pipeline(args) -> None:
    from .config import load_config
    from .pipeline import run_pipeline

    config = load_config(args.config or _PACKAGE_ROOT / "cfg" / "experiments" / "demo.yaml",
                         args.overrides)
    run_pipeline(config, force=args.force, latency_iters=args.latency_iters,
                 latency_threads=args.latency_threads or None, redo=args.redo)


def cmd_bench(args) -> None:
    from .bench.suites import run_ablation, run_compress
    from .config import load_config

    from .benchmarks import BENCHMARKS_MD

    config = load_config(args.config, args.overrides)
    md = None if args.no_write else Path(args.markdown or BENCHMARKS_MD)
    if args.suite == "compress":
        rows = None if args.no_write else Path(args.json or BENCHMARKS_MD.parent / "bench" /
                                                "compress.json")
        run_compress(config, latency_iters=args.latency_iters, md_path=md, json_path=rows,
                     merge=args.merge)
    else:
        run_ablation(config, md_path=md)


def cmd_eval(args) -> None:
    from .data.descriptor import load_descriptor, load_split
    from .eval.evaluate import evaluate_detections, evaluate_model
    from .fileio import atomic_open, refuse_overwrite

    if args.json:
        refuse_overwrite([args.json], [args.artifact, args.data, args.detections])
    desc = load_descriptor(args.data)
    records = load_split(desc, args.split)
    if args.detections:
        from .eval.detections import load_detections_json
        res = evaluate_detections(records, load_detections_json(args.detections, desc.names),
                                  desc.names, args.metric, args.plots)
    else:
        if not args.artifact:
            raise YoloCompressError("give an ARTIFACT or --detections DETS.json")
        from .eval.evaluate import ModelEvaluator
        model, _, input_size = _load_model(args.artifact, desc.names, args.threads)
        evaluator = ModelEvaluator(desc.names, args.img_size or input_size[0],
                                   model.letterbox, args.metric, args.batch_size, args.workers,
                                   args.conf_thresh, args.iou_thresh)
        res = evaluate_model(model, records, evaluator, plots_dir=args.plots)
    _print_eval(res)
    if args.json:
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=2)


def _print_eval(res: dict) -> None:
    per = res["per_class"]
    width = max(len(n) for n in per)
    print(f"{'class':<{width}}  AP ({res['metric']})")
    for name, ap in per.items():
        print(f"{name:<{width}}  {ap:.4f}")
    extras = ", ".join(f"{k} {v:.4f}" for k, v in res.items()
                       if isinstance(v, float) and k != "map")
    print(f"mAP ({res['metric']}): {res['map']:.4f}   [{extras}]")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as the one line `error: ...` (status 2) of every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _int_type(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what}, got {value}")
        return value
    return parse


_positive = _int_type(1, "must be >= 1")
_non_negative = _int_type(0, "must be >= 0")


def _img_size(text: str) -> int:
    from .config import IMG_SIZE_RULE, valid_img_size

    value = _int_type(1, IMG_SIZE_RULE)(text)
    if not valid_img_size(value):
        raise argparse.ArgumentTypeError(f"{IMG_SIZE_RULE}, got {value}")
    return value


def _out_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    return text


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _add_stage_commands(sub) -> None:
    """One sub-command per registered stage with a `command`: --config, its options, dotted
    overrides, --force."""
    from .stages import STAGES

    for stage in STAGES.values():
        if stage.command is None:
            continue
        s = sub.add_parser(stage.command, help=stage.help)
        s.add_argument("--config", required=True, help=stage.config_help)
        for opt in stage.options:
            s.add_argument(*opt.flags, **opt.kwargs)
        s.add_argument("overrides", nargs="*", help=f"dotted overrides, e.g. {stage.example}")
        s.add_argument("--force", action="store_true",
                       help="run the stage again even if it is complete (replacing its result)")
        s.set_defaults(func=cmd_stage, stage_name=stage.name)


_THREADS_HELP = "ONNX Runtime intra-op threads for an .onnx model (default: one per core)"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="yolocompress", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="per-layer shapes, params and FLOPs of a cfg or artifact")
    s.add_argument("source", help="Darknet .cfg or artifact .pt")
    s.add_argument("--img-size", type=_img_size, help="square input size (default: the cfg's [net])")
    s.add_argument("--classes", type=_positive, help="rewrite the heads for this many classes")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("import-darknet", help="Darknet cfg [+ weights] -> artifact")
    s.add_argument("cfg")
    s.add_argument("weights", nargs="?", help="Darknet .weights (full or partial, e.g. .conv.137)")
    s.add_argument("--classes", type=_positive, help="number of classes (heads are rewritten; "
                                                      "default: the cfg's, named class0..N-1)")
    s.add_argument("--names", help="file with one class name per line")
    s.add_argument("--img-size", type=_img_size, help="input size stored in the artifact")
    s.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    s.add_argument("--out", required=True, type=_out_path, help="artifact path (.pt)")
    s.set_defaults(func=cmd_import_darknet)

    s = sub.add_parser("predict", help="detect objects in images (artifact or exported .onnx)")
    s.add_argument("artifact", help="artifact .pt (PyTorch) or exported .onnx (ONNX Runtime)")
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--out", required=True, type=_out_path,
                   help="folder for annotated images <id>.jpg and detections.json (id: the file "
                        "stem; <stem>-2, -3, ... where stems repeat)")
    s.add_argument("--img-size", type=_img_size, help="input size (default: the artifact's)")
    s.add_argument("--conf-thresh", type=_unit_interval, default=0.25)
    s.add_argument("--iou-thresh", type=_unit_interval, default=0.45)
    s.add_argument("--max-det", type=_positive, default=300)
    s.add_argument("--letterbox", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the aspect ratio (default: as the cfg's letter_box says)")
    s.add_argument("--threads", type=_positive, help=_THREADS_HELP)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("data", help="data-set utilities")
    dsub = s.add_subparsers(dest="data_command", required=True)
    d = dsub.add_parser("demo", help="generate (once) and summarise the built-in demo data set")
    d.add_argument("--data", default=str(_PACKAGE_ROOT / "data" / "demo.yaml"),
                   help="demo descriptor (default: data/demo.yaml)")
    d.set_defaults(func=cmd_data_demo)

    _add_stage_commands(sub)

    s = sub.add_parser("pipeline", help="baseline -> sparse -> prune -> fine-tune (distill with "
                                        "pipeline.recovery=distill; -> quantize with "
                                        "pipeline.quantize=true), then the report")
    s.add_argument("--config", help="experiment YAML (default: the built-in demo, "
                                    "cfg/experiments/demo.yaml)")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.out_dir=/tmp/runs")
    s.add_argument("--force", action="store_true", help="run every stage again")
    s.add_argument("--redo", metavar="STAGE", help="run STAGE and every stage after it again, "
                                                   "reusing the ones before (e.g. after changing "
                                                   "the sparse section: --redo sparse)")
    s.add_argument("--latency-iters", type=int, default=30,
                   help="timed CPU forward passes per artifact (0: skip latency)")
    s.add_argument("--latency-threads", type=int, default=1,
                   help="threads while timing, torch's or ONNX Runtime's intra-op ones for the "
                        ".onnx rows (default 1; 0: the runtime's default)")
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("bench", help="compression benchmark against peers, and the ablation")
    bsub = s.add_subparsers(dest="suite", required=True)
    for suite, text in (("compress", "every arm at every FLOPs budget of the `bench` section"),
                        ("ablation", "sparse rate, threshold and recovery factors over seeds")):
        b = bsub.add_parser(suite, help=text)
        b.add_argument("--config", required=True, help="experiment YAML with a `bench` section, "
                                                       "e.g. cfg/experiments/bench-cpu.yaml")
        b.add_argument("overrides", nargs="*", help="dotted overrides, e.g. bench.budgets=[0.5]")
        b.add_argument("--latency-iters", type=int, default=30,
                       help="timed batch-1 CPU passes per model (0: skip)")
        b.add_argument("--markdown", help="write the results section here "
                                          "(default docs/BENCHMARKS.md)")
        if suite == "compress":
            b.add_argument("--json", help="write the rows here (default docs/bench/compress.json)")
            b.add_argument("--merge", action="store_true",
                           help="keep the rows already in --json that this run does not make "
                                "(same baseline and sparse model): a suite grown over sessions")
        b.add_argument("--no-write", action="store_true",
                       help="do not touch any BENCHMARKS.md (or, for compress, its JSON rows)")
        b.set_defaults(func=cmd_bench)

    s = sub.add_parser("eval", help="VOC / COCO mAP of an artifact, an exported .onnx or a "
                                    "detections file")
    s.add_argument("artifact", nargs="?", help="artifact .pt (PyTorch) or exported .onnx "
                                               "(ONNX Runtime)")
    s.add_argument("--data", required=True, help="data descriptor YAML")
    s.add_argument("--split", default="val")
    s.add_argument("--metric", choices=["voc07", "voc12", "coco"], default="voc07")
    s.add_argument("--detections", help="COCO-results JSON (image_id = file stem) made elsewhere")
    s.add_argument("--img-size", type=_img_size)
    s.add_argument("--batch-size", type=_positive, default=16)
    s.add_argument("--workers", type=_non_negative, default=2)
    s.add_argument("--conf-thresh", type=_unit_interval, default=0.005)
    s.add_argument("--iou-thresh", type=_unit_interval, default=0.45)
    s.add_argument("--plots", type=_out_path, help="folder for the PR-curve plot")
    s.add_argument("--json", type=_out_path, help="write {metric, map, per_class, ...} here")
    s.add_argument("--threads", type=_positive, help=_THREADS_HELP)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("export", help="artifact -> Darknet cfg+weights or ONNX")
    s.add_argument("artifact")
    s.add_argument("--format", choices=["darknet", "onnx"], required=True)
    s.add_argument("--out", required=True, type=_out_path,
                   help="output path (darknet: stem of .cfg/.weights)")
    s.add_argument("--opset", type=_positive, help="ONNX opset (default: export.DEFAULT_OPSET, 17)")
    s.add_argument("--mish", help="how mish is written: 'sigmoid' (default) x*n/(2-n), "
                                  "n = s*(2-s), s = sigmoid(x), fast in ONNX Runtime; 'op' the "
                                  "ONNX Mish op (opset >= 18); 'softplus' Softplus+Tanh+Mul")
    s.add_argument("--check", action="store_true", help="compare ONNX Runtime with PyTorch")
    s.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except YoloCompressError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
