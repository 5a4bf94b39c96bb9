"""Measure data-loader throughput (images/s) on the demo set at 256 px, for several worker counts.

Prints a markdown table (training augmentation and plain evaluation resize); `--write` puts it, with
the command line and the machine, in the `## Data loading` section of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


from yolocompress.benchmarks import machine, run_script, write_result
from yolocompress.data.dataset import DetectionDataset, build_loader
from yolocompress.data.formats import read_split
from yolocompress.data.synthetic import DEMO_CLASSES, DEMO_VERSION, DEMO_YEAR, ensure_demo
from yolocompress.config import AugmentConfig

SECTION = "## Data loading"


def throughput(dataset: DetectionDataset, workers: int, batch_size: int, batches: int, repeat: int) -> float:
    """Best images/s of `repeat` runs over `batches` batches, each after 2 warm-up batches (worker start-up
    and first allocations excluded)."""
    best = 0.0
    for run in range(repeat):
        loader = build_loader(dataset, batch_size, shuffle=True, workers=workers, seed=run, drop_last=True,
                              pin_memory=False)
        it = iter(loader)
        next(it), next(it)
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        best = max(best, batches * batch_size / (time.perf_counter() - start))
        del it
    return best


def warm_page_cache(records) -> None:
    """Read every image file once, so no run pays for the first disk read (the set is ~25 MB)."""
    for r in records:
        Path(r.image).read_bytes()




def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="demo set root (default: generated into the cache by ensure_demo)")
    ap.add_argument("--img-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per setting; the fastest is reported")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--write", action="store_true", help=f"write the table to docs/BENCHMARKS.md ({SECTION})")
    args = ap.parse_args(argv)

    root = Path(args.root) if args.root else ensure_demo()
    records = read_split("voc", str(root), [f"{DEMO_YEAR}/train"], DEMO_CLASSES)
    warm_page_cache(records)
    modes = [("train: mosaic 0.5, jitter 0.3, HSV, flip", AugmentConfig()), ("eval: resize only", None)]
    table = ["| loader | workers | images/s | ms/image |", "|---|---:|---:|---:|"]
    for name, augment in modes:
        dataset = DetectionDataset(records, args.img_size, augment=augment)
        for w in args.workers:
            ips = throughput(dataset, w, args.batch_size, args.batches, args.repeat)
            table.append(f"| {name} | {w} | {ips:.0f} | {1000 / ips:.2f} |")
            print(table[-1], flush=True)
    print("\n".join(table))
    if args.write:
        write_result(SECTION, f"demo set v{DEMO_VERSION} train split, {len(records)} images of 256x256, "
                     f"{args.img_size} px input, batch {args.batch_size}; fastest of {args.repeat} runs "
                     f"of {args.batches} batches, each after 2 warm-up batches, files in the page "
                     f"cache; uint8 batches, no pinning",
                     f"{machine('torch', 'opencv-python-headless')}. The machine is shared with other "
                     f"jobs, so treat the numbers as indicative", "\n".join(table))


if __name__ == "__main__":
    run_script(main)
