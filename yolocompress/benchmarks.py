"""Helpers shared by the benchmarks in bench/: the machine description and docs/BENCHMARKS.md sections."""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import YoloCompressError
from .fileio import atomic_open

__all__ = ["add_result_args", "machine", "write_section", "write_result", "run_script",
           "time_side_by_side", "side_by_side_notes", "uptime", "command_line", "BENCHMARKS_MD"]


def machine(*packages: str) -> str:
    """e.g. "nproc 2, AMD EPYC ...; Python 3.11.7, numpy 2.4.6" plus the versions of `packages`."""
    from importlib.metadata import PackageNotFoundError, version

    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"Python {platform.python_version()}"]
    for name in ("numpy", *packages):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"nproc {nproc}, {model}; " + ", ".join(parts)


def command_line() -> str:
    """The command that is running, as a shell line to copy: `python <script> <args>`."""
    return shlex.join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def uptime() -> str:
    """`uptime`'s line: the load a latency was measured under."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def time_side_by_side(paths: dict, size: int, threads: int, rounds: int,
                      iters: int, batch: int = 1) -> dict[str, list[float]]:
    """{name: ONNX Runtime medians in ms, one per round} of each artifact in `paths` ({name: .pt})
    exported to ONNX, the models timed in `rounds` interleaved rounds (so that a change in the
    machine's load hits every model alike)."""
    from .artifacts import load_artifact
    from .eval.speed import measure_latency_onnx
    from .export import export_onnx

    with tempfile.TemporaryDirectory(prefix="side_by_side_") as tmp:
        onnx = {k: export_onnx(load_artifact(p), Path(tmp) / f"{i}.onnx")
                for i, (k, p) in enumerate(paths.items())}
        ms: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(rounds):
            for k, p in onnx.items():
                ms[k].append(measure_latency_onnx(p, size, batch, warmup=3, iters=iters,
                                                  threads=threads)["ms_median"])
    return ms


def side_by_side_notes(timing: dict, json_path) -> str:
    """The part of a section's notes that says how `time_side_by_side` ran: threads, rounds,
    iterations, the load before and after (`timing`: threads, rounds, iters, uptime_before,
    uptime_after), and where the rows are."""
    return (f"ONNX Runtime, {timing['threads']} threads, {timing['rounds']} interleaved rounds of "
            f"{timing['iters']}; `uptime` {timing['uptime_before']} before, "
            f"{timing['uptime_after']} after; rows in {json_path}")


BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def add_result_args(ap: argparse.ArgumentParser) -> None:
    """The options every experiment bench script ends with: --json (required), --write (also
    the BENCHMARKS.md section), --markdown (which file) and the config overrides."""
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--write", action="store_true", help="also write the BENCHMARKS.md section")
    ap.add_argument("--markdown", type=Path, default=BENCHMARKS_MD)
    ap.add_argument("overrides", nargs="*")


def write_result(heading: str, notes: str, machine_line: str, body: str,
                 path: str | os.PathLike = BENCHMARKS_MD, command: str | None = None) -> None:
    """Write a benchmark section: heading, the command that ran (default: command_line())
    with `notes`, the machine, then `body` (usually a markdown table)."""
    command = command or command_line()
    write_section(path, heading, f"{heading}\n\nCommand: `{command}` ({notes}).\n\n"
                                 f"Machine: {machine_line}.\n\n{body}\n")
    print(f"wrote {path}")


def write_section(path: str | os.PathLike, heading: str, text: str) -> None:
    """Replace the section starting with `heading` (up to the next `## `) in `path`, or append it."""
    path = Path(path)
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = text.rstrip("\n") + "\n\n"          # a blank line before the next heading
    new = (pattern.sub(lambda _: text, old, count=1) if pattern.search(old)
           else old.rstrip("\n") + "\n\n" + text)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(new.rstrip("\n") + "\n")


def run_script(main: Callable[[], object]) -> None:
    """Run a bench script's `main` the way the CLI runs a command: bad input (a missing artifact,
    a broken config) ends it with one `error: ...` line and exit status 2, not a traceback."""
    try:
        main()
    except YoloCompressError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
