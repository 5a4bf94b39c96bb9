"""Deployment latency of one exported model in every runtime, side by side in one run: our ONNX
export in ONNX Runtime (default mish form, and torch's Softplus + Tanh + Mul as it was before),
OpenCV DNN (its Darknet importer on the exported cfg + weights where this OpenCV has one, else its
ONNX importer on the `--mish op` export, where Mish is one fused activation) and PyTorch (BatchNorm
folded). Random weights (seed 0): speed only.

Protocol (eval/speed.py): per arm `--warmup` untimed then `--iters` timed passes of one fixed random
batch, median; the arms run interleaved, `--rounds` times, so load that comes and goes hits all
of them; reported: the median of the round medians and their min-max spread, plus the load
average before and after. Acceptance (issue 15): ONNX Runtime <= OpenCV DNN at batch 1 and 8.

`--write` puts the rows in docs/bench/speed.json and the table in the `## Deployment latency`
section of docs/BENCHMARKS.md. `--profile` prints, per ONNX Runtime arm at batch 1, the kernel time
per op type (ONNX Runtime's profiler, after its graph optimisations): where the time goes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from yolocompress.artifacts import artifact_from_model
from yolocompress.benchmarks import BENCHMARKS_MD, machine, run_script, write_result
from yolocompress.eval.speed import (measure_latency, measure_latency_onnx,
                                     measure_latency_opencv, opencv_has_darknet)
from yolocompress.export import export_darknet, export_onnx
from yolocompress.fileio import atomic_open
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Deployment latency"
FINDINGS = """\
Why the export writes mish through the logistic: ONNX Runtime has no Mish kernel (opset 18's `Mish`
is a function it expands into Softplus + Tanh + Mul) and its Softplus kernel is scalar code, so in
the Softplus form the 72 Softplus nodes of yolov4 cost about as much as its 110 convs
(`--profile`). The logistic form (Sigmoid, Sub, Mul, Sub, Div, Mul) runs vectorised. OpenCV 5
removed its Darknet importer; its ONNX importer on the `--mish op` export (one Mish layer per
activation, as the Darknet importer built) stands in for it. ONNX Runtime sessions do not spin
their worker threads (onnx_backend.session_options): on this shared machine spinning made 2
threads slower than 1. The default opset stays 17: with the logistic form opsets 17 and 18 write
the same graph (tests/test_export.py), and 18 is needed only for `--mish op`. The decode costs
under 1 % of the time (`--profile`: the Sigmoid/Exp/Reshape/Transpose tail), so it is left as
traced."""


BACKENDS = ("onnxruntime", "opencv", "torch")


def _opencv_arm(art: dict, tmp: Path, size: tuple[int, int]):
    """OpenCV's Darknet importer on the exported cfg + weights, or where this OpenCV has none (5.x)
    its ONNX importer on the `--mish op` export (one Mish layer, as the Darknet importer builds)."""
    if opencv_has_darknet():
        cfg, weights = export_darknet(art, tmp / "model")
        return ("Darknet cfg+weights", "opencv-darknet",
                lambda b, i, w, t: measure_latency_opencv(cfg, size, b, w, i, t, weights=weights))
    op = export_onnx(art, tmp / "op.onnx", opset=18, mish="op")
    return ("ONNX, Mish op (no Darknet importer in this OpenCV)", "opencv-onnx",
            lambda b, i, w, t: measure_latency_opencv(op, size, b, w, i, t))


def _arms(art: dict, model: Darknet, tmp: Path, backends: list[str]):
    """[(label, backend, time(batch, iters, warmup, threads) -> result)] for the exported model."""
    size = tuple(art["input_size"])
    arms = []
    if "onnxruntime" in backends:
        fast = export_onnx(art, tmp / "sigmoid.onnx")
        softplus = export_onnx(art, tmp / "softplus.onnx", mish="softplus")
        arms += [("ours: ONNX, mish via sigmoid", "onnxruntime",
                  lambda b, i, w, t: measure_latency_onnx(fast, size, b, w, i, t)),
                 ("before: ONNX, Softplus+Tanh+Mul", "onnxruntime",
                  lambda b, i, w, t: measure_latency_onnx(softplus, size, b, w, i, t))]
    if "opencv" in backends:
        arms.append(_opencv_arm(art, tmp, size))
    if "torch" in backends:
        arms.append(("artifact, BN folded", "torch",
                     lambda b, i, w, t: measure_latency(model, size, b, warmup=w, iters=i,
                                                        threads=t, fuse_bn=True)))
    return arms


def run(cfg: Path, img_size: int, batches: list[int], threads: int, iters: int, warmup: int,
        rounds: int, backends: list[str], profile_ops: bool = False) -> tuple[list[dict], dict]:
    torch.manual_seed(0)
    model = Darknet(read_cfg(cfg))
    model.initialize()
    art = artifact_from_model(model, "imported", [f"class{i}" for i in range(model.classes)],
                              input_size=[img_size, img_size])
    rows = []
    load = {"before": os.getloadavg()}   # the machine is shared: say how busy it was
    with tempfile.TemporaryDirectory() as tmp:
        arms = _arms(art, model.eval(), Path(tmp), backends)
        for name in ("sigmoid", "softplus") if profile_ops else ():
            print(f"ONNX Runtime kernel time per op type, mish form {name}, batch 1:")
            for op, ms, n in profile(Path(tmp) / f"{name}.onnx", img_size, threads):
                print(f"  {op:<16} {ms:8.1f} ms  ({n} nodes)")
        for r in range(rounds):
            for batch in batches:
                for label, backend, time_it in arms:
                    res = time_it(batch, iters, warmup, threads)
                    rows.append({"cfg": cfg.stem, "round": r, "arm": label, **res})
                    print(f"round {r} batch {batch} {backend:<15} {label:<50} "
                          f"{res['ms_median']:8.1f} ms", flush=True)
    load["after"] = os.getloadavg()
    return rows, load


def profile(path: Path, size: int, threads: int, passes: int = 5) -> list[tuple[str, float, int]]:
    """[(op type, ms per pass, nodes)] of ONNX Runtime's kernel time at batch 1, largest first."""
    import numpy as np
    from collections import Counter
    from yolocompress.onnx_backend import import_onnxruntime, session_options

    ort = import_onnxruntime()
    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    for _ in range(passes):
        sess.run(None, {sess.get_inputs()[0].name: x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    us, count = Counter(), Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            us[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    return [(op, t / passes / 1e3, count[op] // passes) for op, t in us.most_common()]


def summary(rows: list[dict]) -> list[dict]:
    """Per (arm, batch): median of the round medians, min and max of them."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["arm"], r["backend"], r["batch"])
        out.setdefault(key, {"arm": r["arm"], "backend": r["backend"], "batch": r["batch"],
                             "threads": r["threads"], "medians": []})["medians"].append(
            r["ms_median"])
    for s in out.values():
        m = s.pop("medians")
        s.update(ms=statistics.median(m), ms_lo=min(m), ms_hi=max(m), rounds=len(m))
    return list(out.values())


def table(summ: list[dict]) -> str:
    lines = ["| backend | model | batch | threads | ms (median of rounds) | spread | vs OpenCV |",
             "|---|---|---:|---:|---:|---:|---:|"]
    cv = {s["batch"]: s["ms"] for s in summ if s["backend"].startswith("opencv")}
    for s in sorted(summ, key=lambda s: (s["batch"], s["ms"])):
        ratio = f"{s['ms'] / cv[s['batch']]:.2f}x" if s["batch"] in cv else "-"
        lines.append(f"| {s['backend']} | {s['arm']} | {s['batch']} | {s['threads']} | "
                     f"{s['ms']:.0f} | {s['ms_lo']:.0f}-{s['ms_hi']:.0f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cfg", type=Path, default=ROOT / "cfg" / "models" / "yolov4.cfg")
    ap.add_argument("--img-size", type=int, default=416)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--profile", action="store_true", help="ONNX Runtime time per op type")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "speed.json")
    ap.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    args = ap.parse_args()
    rows, load = run(args.cfg, args.img_size, args.batches, args.threads, args.iters, args.warmup,
                     args.rounds, args.backends, args.profile)
    summ = summary(rows)
    print(table(summ))
    print(f"load average (1, 5, 15 min) before {load['before']}, after {load['after']}")
    if args.write:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.json, "w", encoding="utf-8") as f:
            json.dump({"load_average": load, "summary": summ, "rows": rows}, f, indent=1)
        fmt = lambda t: ", ".join(f"{v:.1f}" for v in t)  # noqa: E731
        write_result(SECTION,
                     f"{args.cfg.name} @ {args.img_size}, random weights seed 0; per arm "
                     f"{args.warmup} warm-up + {args.iters} timed passes, median; arms "
                     f"interleaved, {args.rounds} rounds; rows in docs/bench/speed.json",
                     f"{machine('torch', 'onnxruntime', 'opencv-python-headless')}; load average "
                     f"before {fmt(load['before'])}, after {fmt(load['after'])} (shared machine)",
                     f"{table(summ)}\n\n{FINDINGS}", args.markdown)


if __name__ == "__main__":
    run_script(main)
