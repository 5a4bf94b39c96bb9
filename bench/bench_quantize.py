"""Stage 4 on one artifact (default: the demo's recovered model): FP32 ONNX vs INT8 ONNX vs INT8
with table-lookup activations (`quantize.activation=lut`) (mAP by `yolocompress eval` on each
.onnx, size, ONNX Runtime latency at batch 1 and 8 side by side),
the calibration methods x what stays float (and the naive all-INT8 control), weight sharing at b bits and global unstructured
magnitude pruning (mAP of the PyTorch model, size of the compact file on disk).

Everything is made afresh in a temp folder (export, quantization, clustering): nothing stale is
reused. Parts (`--parts`): onnx (FP32 / INT8 / INT8-LUT: mAP, size, latency; `--speed-only`
times them without scoring), methods, naive, sharing (`--share-finetune-steps N`: also each b
with its centroids fine-tuned N steps, and the unshared model fine-tuned N steps as the control),
unstructured. Latency protocol as
bench/bench_speed.py: per model `--warmup` untimed then `--iters` timed passes of one fixed
random batch, median; the models interleaved for `--rounds` rounds; load average recorded.
`--write` merges each part, as it finishes, into docs/bench/quantize.json and rewrites the
BENCHMARKS.md section from that file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from yolocompress.artifacts import build_model, load_artifact, save_artifact
from yolocompress.benchmarks import BENCHMARKS_MD, command_line, machine, run_script, write_result
from yolocompress.cli import main as cli
from yolocompress.compress.compact import save_compact
from yolocompress.compress.quantize_stage import quantize_model
from yolocompress.compress.share_finetune import finetune_shared
from yolocompress.compress.unstructured import magnitude_prune
from yolocompress.compress.weight_sharing import share_weights
from yolocompress.config import load_config
from yolocompress.data.descriptor import load_descriptor, load_split
from yolocompress.eval.evaluate import ModelEvaluator, evaluate_model
from yolocompress.eval.speed import measure_latency_onnx
from yolocompress.fileio import atomic_open
from yolocompress.train.run import load_data

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Stage 4: INT8 quantization, weight sharing, unstructured pruning"
FINDINGS = """\
The model: the demo pipeline's distilled model from a fresh-clone run of `scripts/demo.sh` at
d6405bc (the pipeline's stages are unchanged since; copied outside the clone to keep it). The
`onnx` part ran with every other job on the machine paused (load average 0.9 at its start).

Reading it: with table-lookup activations (`quantize.activation: lut`, the default) the INT8
model is 1.69x FP32 at batch 1 and 1.47x at batch 8 (2 threads) for 0.63 mAP points; with the
activations in float it is 1.09x / 1.00x: the dequantize, float mish, quantize chain around every
conv costs what the INT8 convs save. In one ONNX Runtime profile of each model (a one-off run with
SessionOptions.enable_profiling, 23 passes at batch 1, on a busy machine; not a committed
script) QLinearConv took 44 % of the LUT model's kernel time, the lookup (GatherElements, Cast,
Reshape, Transpose) 40 % and Quantize/Dequantize 3 %; of the float-activation model, the float
mish 41 %, QLinearConv 31 %, Q/DQ 17 %. Both keep the box decode (and with keep_float "detect" the detection convs) in float;
the naive control quantizes everything and loses about 40 % of the mAP (its final Concat puts
pixel boxes and probabilities in one 8-bit range). Through `quantize_static` the entropy method
has 128 histogram bins for 128 levels, so its KL search has one candidate (the full range) and it
equals MinMax to the last digit; percentile (99.999), per-tensor weights, ops "all" and the
detection convs in float are all within 0.3 points of the default. A weight-shared or
unstructured-pruned model runs as the FP32 model does (its weights are decoded to float32 dense
tensors), so it has FP32's latency: those rows are size and mAP only. Weight sharing from k-means
alone costs 0.6 points at 6 and 7 bits on this model (0.09 on the previous demo model) and 0.1 at
8 bits; more k-means iterations (300: 29 % less squared weight error), re-estimating the BN
statistics, or k-means weighted by each channel's BN scale (the error of the folded weights) did
not close it (6 bits: 0.6709 with 300 iterations, 0.6685 with the BN statistics re-estimated,
0.6714 weighted with 300 iterations; one-off script, not committed).

Centroid fine-tuning (`--share-finetune-steps 62 --share-finetune-lr 5e-5`: one demo epoch, the
codebooks trained with the indices fixed, BN and biases free) and its control, the unshared
model trained the same 62 steps: the control itself falls from 0.6796 to 0.6730, so 62 steps of
training on the augmented training split move this model's val mAP by about as much as 6-bit
sharing costs. Against the control, the fine-tuned shared models are level from 6 bits up
(6 bits 0.6723, -0.07; 7 bits 0.6742; 8 bits 0.6766) and 5 bits is 0.6 below it (0.6667); at 4
bits fine-tuning buys 2.8 points (0.5460 -> 0.5739) and is still 10 below. At the recovery
stage's lr (5e-4, the first run of the same command without --share-finetune-lr) the control
fell to 0.6618, 4 bits rose to 0.5994, 5 bits to 0.6676, and 6 / 7 / 8 bits ended at 0.6671 /
0.6712 / 0.6685: a higher lr helps the coarse codebooks and costs the fine ones what it costs the
unshared model."""

PARTS = ("onnx", "methods", "naive", "sharing", "unstructured")


def _eval_onnx(path: Path, data: Path, threads: int, out: Path) -> dict:
    """mAP of an .onnx through the `yolocompress eval` command itself."""
    if cli(["eval", str(path), "--data", str(data), "--threads", str(threads), "--workers", "2",
            "--json", str(out)]) != 0:
        raise SystemExit(f"eval of {path} failed")
    res = json.loads(out.read_text())
    return {"map50_voc07": res["map50_voc07"], "map50_all": res["map50_all"]}


def _eval_art(art: dict, config, desc, records) -> dict:
    model = build_model(art)
    res = evaluate_model(model, records, ModelEvaluator.from_config(config, desc.names,
                                                                    model.letterbox),
                         progress=False)
    return {"map50_voc07": res["map50_voc07"], "map50_all": res["map50_all"]}


def _quantize(config, artifact: Path, tmp: Path, name: str, fp32: Path | None = None,
              overrides: tuple[str, ...] = ()) -> tuple[Path, dict]:
    cfg = load_config(config.source, list(overrides))
    out = tmp / f"{name}.onnx"
    rec = quantize_model(cfg, fp32 or artifact, out, None if fp32 else tmp / "fp32.onnx")
    return out, rec


def part_onnx(config, artifact, tmp, args, data) -> dict:
    int8, rec = _quantize(config, artifact, tmp, "int8", None, ("quantize.activation=float",))
    fp32 = tmp / "fp32.onnx"
    lut, lut_rec = _quantize(config, artifact, tmp, "int8-lut", fp32, ("quantize.activation=lut",))
    models = {"fp32": fp32, "int8": int8, "int8-lut": lut}
    out = {"quantize": {k: v for k, v in rec.items() if k != "detect_convs"},
           "lut_activations": lut_rec["lut_by_kind"],
           "models": {k: {"size_bytes": p.stat().st_size} for k, p in models.items()}}
    if not args.speed_only:
        for k, p in models.items():
            out["models"][k].update(_eval_onnx(p, data, args.threads, tmp / f"{k}.json"))
    size = tuple(load_artifact(artifact)["input_size"])
    load = {"before": os.getloadavg()}
    times: dict[tuple[str, int], list[float]] = {}
    best: dict[tuple[str, int], float] = {}     # fastest single pass: least hit by other load
    for r in range(args.rounds):
        for batch in args.batches:
            for k, p in models.items():
                res = measure_latency_onnx(p, size, batch, args.warmup, args.iters, args.threads)
                times.setdefault((k, batch), []).append(res["ms_median"])
                best[(k, batch)] = min(best.get((k, batch), res["ms_min"]), res["ms_min"])
                print(f"round {r} batch {batch} {k}: {res['ms_median']:.1f} ms", flush=True)
    load["after"] = os.getloadavg()
    out["latency"] = [{"model": k, "batch": b, "threads": args.threads, "backend": "onnxruntime",
                       "ms": statistics.median(m), "ms_lo": min(m), "ms_hi": max(m),
                       "ms_min": best[(k, b)], "rounds": len(m)} for (k, b), m in times.items()]
    out["load_average"] = load
    out["protocol"] = {"warmup": args.warmup, "iters": args.iters, "rounds": args.rounds}
    return out


def part_methods(config, artifact, tmp, args, data) -> list[dict]:
    fp32 = tmp / "fp32.onnx"
    if not fp32.is_file():
        _quantize(config, artifact, tmp, "int8")
    rows = []
    arms = [(m, k, "conv", True, "lut") for m in ("minmax", "entropy", "percentile")
            for k in ("decode", "detect")]
    arms += [("minmax", "decode", "conv", False, "lut"), ("minmax", "decode", "all", True, "lut"),
             ("minmax", "decode", "conv", True, "float"), ("minmax", "decode", "all", True, "float")]
    for method, keep, ops, per_channel, act in arms:
        path, rec = _quantize(config, artifact, tmp, f"{method}-{keep}-{ops}-{per_channel}-{act}",
                              fp32, (f"quantize.method={method}", f"quantize.keep_float={keep}",
                                     f"quantize.ops={ops}", f"quantize.per_channel={per_channel}",
                                     f"quantize.activation={act}"))
        rows.append({"method": method, "keep_float": keep, "ops": ops, "per_channel": per_channel,
                     "activation": act,
                     "calibration_images": rec["calibration_images"],
                     "size_bytes": path.stat().st_size,
                     **_eval_onnx(path, data, args.threads, tmp / "m.json")})
        print(rows[-1], flush=True)
    return rows


def part_naive(config, artifact, tmp, args, data) -> dict:
    """The known trap: quantize_static on everything, the decode included (a control)."""
    import onnx
    from onnxruntime import quantization as q

    from yolocompress.compress.quantize import CalibrationReader
    from yolocompress.compress.recalibrate import Calibration

    fp32 = tmp / "fp32.onnx"
    if not fp32.is_file():
        _quantize(config, artifact, tmp, "int8")
    records = load_split(load_descriptor(data), "train")
    calib = Calibration.from_records(records, config.quantize.calibration_images,
                                     config.model.img_size, build_model(
                                         load_artifact(artifact)).letterbox)
    out = tmp / "naive.onnx"
    q.quantize_static(str(fp32), str(out), CalibrationReader(calib, "images"),
                      quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {p.key: p.value for p in onnx.load(str(fp32)).metadata_props})
    onnx.save(model, str(out))
    return {"what": "every op quantized, the decode included", "method": "minmax",
            "calibration_images": calib.images, **_eval_onnx(out, data, args.threads,
                                                             tmp / "naive.json")}


def part_sharing(config, artifact, tmp, args, data, desc, records) -> list[dict]:
    """Rows: the artifact, each b of --bits; with --share-finetune-steps N also the artifact
    fine-tuned N steps (the control) and each b with its centroids fine-tuned the same way."""
    art = load_artifact(artifact)
    steps = args.share_finetune_steps
    train = load_data(config) if steps else None
    # the control first: a bad --share-finetune-steps fails before any scoring
    lr = args.share_finetune_lr
    tuned = finetune_shared(art, {}, config, steps=steps, lr=lr, data=train, progress=True)[0]
    rows = [_sharing_row(None, art, artifact.stat().st_size, config, desc, records)]
    if steps:
        save_artifact(tuned, tmp / "finetuned.pt")
        rows.append(_sharing_row(None, tuned, (tmp / "finetuned.pt").stat().st_size, config, desc,
                                 records))
    for bits in args.bits:
        shared, encoded = share_weights(art, bits)
        rows.append(_sharing_row(bits, shared, save_compact(shared, encoded,
                                                            tmp / f"shared{bits}.pt"),
                                 config, desc, records))
        if steps:
            tuned, tuned_encoded = finetune_shared(shared, encoded, config, steps=steps, lr=lr,
                                                   data=train, progress=True)
            rows.append(_sharing_row(bits, tuned, save_compact(tuned, tuned_encoded,
                                                               tmp / f"shared{bits}-ft.pt"),
                                     config, desc, records))
    return rows


def _sharing_row(bits, art, size, config, desc, records) -> dict:
    row = {"bits": bits, "size_bytes": size, **_eval_art(art, config, desc, records)}
    if "share_finetune" in art:
        row["finetune_steps"] = art["share_finetune"]["steps"]
        row["finetune_lr"] = art["share_finetune"]["lr"]
    print(row, flush=True)
    return row


def part_unstructured(config, artifact, tmp, args, data, desc, records) -> list[dict]:
    art = load_artifact(artifact)
    rows = []
    for share in args.shares:
        pruned, encoded = magnitude_prune(art, share)
        size = save_compact(pruned, encoded, tmp / f"sparse{share}.pt")
        rows.append({"share": share, "size_bytes": size,
                     **_eval_art(pruned, config, desc, records)})
        print(rows[-1], flush=True)
    return rows


_LABELS = {"fp32": "FP32 ONNX", "int8": "INT8 ONNX, float activations",
           "int8-lut": "INT8 ONNX, table-lookup activations (default)"}


def _mib(b: int) -> str:
    return f"{b / 2 ** 20:.2f} MiB"


def _finetuned(row: dict) -> str:
    """The sharing table's fine-tuned cell: what trained for how many optimizer steps."""
    if "finetune_steps" not in row:
        return "no"
    what = "every weight (control)" if row["bits"] is None else "centroids"
    return f"{what}, {row['finetune_steps']} steps" + (
        f" at lr {row['finetune_lr']:g}" if "finetune_lr" in row else "")


def markdown(res: dict) -> str:
    out = []
    if "onnx" in res:
        o = res["onnx"]
        lat = {(r["model"], r["batch"]): r for r in o["latency"]}
        out += ["| model | mAP@0.5 VOC07 | all-point | size | " + " | ".join(
            f"ms b{b} ({lat[('fp32', b)]['threads']} thr)" for b in sorted({b for _, b in lat}))
                + " |", "|---|---:|---:|---:|" + "---:|" * len({b for _, b in lat})]
        for k, m in o["models"].items():
            cells = [f"{lat[(k, b)]['ms']:.1f} ({lat[(k, b)]['ms_lo']:.1f}-"
                     f"{lat[(k, b)]['ms_hi']:.1f}, {lat[('fp32', b)]['ms'] / lat[(k, b)]['ms']:.2f}x)"
                     + (f"; fastest {lat[(k, b)]['ms_min']:.1f} "
                        f"({lat[('fp32', b)]['ms_min'] / lat[(k, b)]['ms_min']:.2f}x)"
                        if "ms_min" in lat[(k, b)] else "")
                     for b in sorted({b for _, b in lat})]
            out.append(f"| {_LABELS.get(k, k.upper() + ' ONNX')} | "
                       f"{m.get('map50_voc07', float('nan')):.4f} | "
                       f"{m.get('map50_all', float('nan')):.4f} | {_mib(m['size_bytes'])} | "
                       + " | ".join(cells) + " |")
        la = o["load_average"]
        out += ["", f"ONNX Runtime {o['protocol']}, CPU provider, latency median of round "
                    f"medians (min-max, speed-up vs FP32"
                    f"{'; fastest single pass' if 'ms_min' in o['latency'][0] else ''}); load "
                    f"average before "
                    f"{', '.join(f'{v:.1f}' for v in la['before'])}, after "
                    f"{', '.join(f'{v:.1f}' for v in la['after'])}. Quantization: "
                    f"{o['quantize']['method']}, {o['quantize']['calibration_images']} training "
                    f"images, keep_float {o['quantize']['keep_float']}, INT8 ops "
                    f"{o['quantize']['ops']}, per-channel "
                    f"{o['quantize']['per_channel']}; {o['quantize']['reduce_range_why']}."
                + (" Float activations: `quantize.activation=float`; table lookups: "
                   "`quantize.activation=lut`, "
                   + ", ".join(f"{n} {kind}" for kind, n in o["lut_activations"].items())
                   + " activations as table lookups." if "lut_activations" in o else ""), ""]
    if "methods" in res:
        out += ["| calibration | kept in float | INT8 ops | per-channel | activations | "
                "mAP@0.5 VOC07 | all-point |", "|---|---|---|---|---|---:|---:|"]
        out += [f"| {r['method']} | {r['keep_float']} | {r['ops']} | {r['per_channel']} | "
                f"{r.get('activation', 'float')} | {r['map50_voc07']:.4f} | "
                f"{r['map50_all']:.4f} |" for r in res["methods"]] + [""]
    if "naive" in res:
        n = res["naive"]
        out += [f"Control, {n['what']} ({n['method']}, {n['calibration_images']} images): "
                f"mAP@0.5 VOC07 {n['map50_voc07']:.4f}, all-point {n['map50_all']:.4f}.", ""]
    if "sharing" in res:
        out += ["| weight sharing | fine-tuned | mAP@0.5 VOC07 | all-point | size on disk |",
                "|---|---|---:|---:|---:|"]
        out += [f"| {'none (artifact .pt)' if r['bits'] is None else str(r['bits']) + ' bits'} | "
                f"{_finetuned(r)} | {r['map50_voc07']:.4f} | {r['map50_all']:.4f} | "
                f"{_mib(r['size_bytes'])} |" for r in res["sharing"]] + [""]
    if "unstructured" in res:
        out += ["| unstructured L1, share of conv weights zeroed | mAP@0.5 VOC07 | all-point | "
                "size on disk (sparse) |", "|---:|---:|---:|---:|"]
        out += [f"| {r['share']:.0%} | {r['map50_voc07']:.4f} | {r['map50_all']:.4f} | "
                f"{_mib(r['size_bytes'])} |" for r in res["unstructured"]]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path,
                    default=Path("/tmp/ci/main/runs/demo/finetuned/best.pt"))
    ap.add_argument("--config", type=Path, default=ROOT / "cfg" / "experiments" / "demo.yaml")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--speed-only", action="store_true", help="onnx part: latency, no mAP")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6, 7, 8])
    ap.add_argument("--share-finetune-lr", type=float, default=None, metavar="LR",
                    help="sharing part: the fine-tunes' peak lr (default the distill section's)")
    ap.add_argument("--share-finetune-steps", type=int, default=0, metavar="N",
                    help="sharing part: also fine-tune each b's centroids N optimizer steps (the "
                         "distill section's optimizer and lr; whole epochs, as distill.steps), "
                         "and the unshared model N steps as the control (0: off)")
    ap.add_argument("--shares", type=float, nargs="+",
                    default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "quantize.json")
    ap.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the BENCHMARKS.md section from the JSON file")
    args = ap.parse_args()
    config = load_config(args.config)
    data = config.require_file("data.descriptor")
    if args.render:
        _write(args, data, {})
        return
    desc = load_descriptor(data)
    records = load_split(desc, "val")
    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as t:
        tmp = Path(t)
        for part in args.parts:
            extra = (desc, records) if part in ("sharing", "unstructured") else ()
            res[part] = globals()[f"part_{part}"](config, args.artifact, tmp, args, data, *extra)
            if args.write:      # each part as it finishes
                _write(args, data, {part: res[part]})
    print(markdown(res))


def _write(args, data: Path, res: dict) -> None:
    """Merge `res` into the JSON file and rewrite the BENCHMARKS.md section from all of it."""
    old = json.loads(args.json.read_text()) if args.json.is_file() else {}
    old.update({"artifact": str(args.artifact), "machine": machine("onnxruntime", "torch"), **res})
    commands = old.setdefault("commands", {})       # part -> the command that measured it
    commands.update({part: command_line() for part in res})
    with atomic_open(args.json, "w", encoding="utf-8") as f:
        json.dump(old, f, indent=1)
    write_result(SECTION, f"{args.artifact}, val split of {data.name} (200 images); rows in "
                          f"docs/bench/quantize.json", machine("onnxruntime", "torch"),
                 f"{markdown(old)}\n\n{FINDINGS}", args.markdown,
                 command="`; `".join(dict.fromkeys(commands[p] for p in PARTS if p in commands)))


if __name__ == "__main__":
    run_script(main)
