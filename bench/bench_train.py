"""Training throughput of an experiment (default: the demo): images/s and the share of step time
spent waiting for data, over one epoch without evaluation.

`--write` puts the table, with the command line and the machine, in the `## Training throughput`
section of docs/BENCHMARKS.md. Target: data wait < 10 % of step time.
"""
from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from yolocompress.benchmarks import machine, run_script, write_result
from yolocompress.config import load_config
from yolocompress.train.run import load_data, run_stage

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Training throughput"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "cfg/experiments/demo.yaml"))
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--images", type=int, default=320, help="training images used (one epoch)")
    ap.add_argument("--write", action="store_true", help=f"write to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)

    rows = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            config = load_config(args.config, [f"data.workers={workers}", "train.epochs=1",
                                               "train.eval_interval=0", f"train.out_dir={tmp}"])
            data = load_data(config)
            data.train = data.train[:args.images]
            data.val = data.val[:1]
            run_stage(config, "baseline", data=data)
            with open(Path(tmp) / (config.name or "experiment") / "baseline" / "train_log.csv") as f:
                row = list(csv.DictReader(f))[-1]
        rows.append((workers, float(row["images_per_s"]), float(row["data_wait_share"])))

    c = load_config(args.config)
    table = ["| workers | batch | img size | images/s | data wait (share of step time) |",
             "|---:|---:|---:|---:|---:|"]
    table += [f"| {w} | {c.train.batch_size} | {c.model.img_size} | {ips:.1f} | {wait:.1%} |"
              for w, ips, wait in rows]
    print("\n".join(table))
    if args.write:
        write_result(SECTION, f"{Path(args.config).name}, {args.images} training images, one "
                     f"epoch, augmentation as configured, no evaluation; target: data wait < 10 %",
                     machine("torch"), "\n".join(table))


if __name__ == "__main__":
    run_script(main)
