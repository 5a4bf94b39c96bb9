"""yolocompress.benchmarks: BENCHMARKS.md sections and the bench scripts' error handling."""
import subprocess
import sys
from pathlib import Path

import pytest

from yolocompress.benchmarks import run_script, write_section
from yolocompress.errors import YoloCompressError

ROOT = Path(__file__).resolve().parents[1]


def test_write_section_replaces_only_its_own_section(tmp_path):
    md = tmp_path / "B.md"
    md.write_text("# Benchmarks\n\n## A\n\nold a\n\n## B\n\nkeep b\n")
    write_section(md, "## A", "## A\n\nnew a\n")
    write_section(md, "## C", "## C\n\nc\n")
    assert md.read_text() == "# Benchmarks\n\n## A\n\nnew a\n\n## B\n\nkeep b\n\n## C\n\nc\n"


def test_run_script_turns_bad_input_into_one_line_and_status_2(capsys):
    def main():
        raise YoloCompressError("x.pt: no such artifact file")

    with pytest.raises(SystemExit) as e:
        run_script(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: x.pt: no such artifact file\n"


def test_run_script_leaves_bugs_as_tracebacks():
    def main():
        raise KeyError("a bug, not bad input")

    with pytest.raises(KeyError):
        run_script(main)


@pytest.mark.parametrize("args", [["--sparse", "missing.pt"],
                                  ["--sparse", "missing.pt", "--config", "missing.yaml"]])
def test_bench_prune_rejects_bad_input_before_timing(tmp_path, args):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_prune.py"), *args],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: missing.")


@pytest.mark.parametrize("args, problem", [
    (["--sparse", "missing.pt", "--config", "missing.yaml"], "error: missing.yaml"),
    (["--sparse", "missing.pt", "--config", str(ROOT / "cfg/experiments/demo.yaml")],
     "error: missing.pt"),
    (["--sparse", "missing.pt", "--config", str(ROOT / "cfg/experiments/demo.yaml"),
      "--layers", "0"], "error: --layers must be >= 1")])
def test_bench_layer_latency_rejects_bad_input_in_one_line(tmp_path, args, problem):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_layer_latency.py"), *args,
                        "--out", "runs", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(problem)
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "runs").exists()


def test_time_side_by_side_interleaves_the_models_round_by_round(monkeypatch):
    import yolocompress.artifacts as artifacts
    import yolocompress.eval.speed as speed
    import yolocompress.export as export
    from yolocompress.benchmarks import time_side_by_side

    calls = []
    monkeypatch.setattr(artifacts, "load_artifact", lambda p: {"path": p})
    monkeypatch.setattr(export, "export_onnx", lambda art, out: (art["path"], out))

    def fake(onnx, size, batch, warmup, iters, threads):
        calls.append((onnx[0], size, batch, iters, threads))
        return {"ms_median": float(len(calls))}

    monkeypatch.setattr(speed, "measure_latency_onnx", fake)
    ms = time_side_by_side({"a": "a.pt", "b": "b.pt"}, 64, threads=2, rounds=3, iters=7, batch=8)
    assert [c[0] for c in calls] == ["a.pt", "b.pt"] * 3
    assert {c[1:] for c in calls} == {(64, 8, 7, 2)}
    assert ms == {"a": [1.0, 3.0, 5.0], "b": [2.0, 4.0, 6.0]}


@pytest.mark.parametrize("extra, problem", [
    ([], "error: missing.pt"),
    (["--round-to", "8", "8"], "error: --round-to must be distinct ints >= 1"),
    (["--round-to", "0", "8"], "error: --round-to must be distinct ints >= 1"),
    (["--budget", "1.2"], "error: --budget must be in (0, 1)")])
def test_bench_round_to_rejects_bad_input_in_one_line(tmp_path, extra, problem):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_round_to.py"), "--sparse",
                        "missing.pt", "--config", str(ROOT / "cfg/experiments/demo.yaml"), *extra,
                        "--out", "runs", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(problem)
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "runs").exists()


def test_command_line_is_a_shell_line_that_gives_back_the_arguments(monkeypatch):
    import shlex

    from yolocompress.benchmarks import command_line

    argv = ["bench/x.py", "--json", "a b.json", "bench.budgets=[0.65]", "it's"]
    monkeypatch.setattr(sys, "argv", argv)
    line = command_line()
    assert line.startswith("python bench/x.py ")
    assert shlex.split(line) == ["python", *argv]


def test_bench_layer_prune_rejects_a_missing_model_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_layer_prune.py"), "--sparse",
                        "missing.pt", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: missing.pt: no such artifact file\n"
    assert not (tmp_path / "out.json").exists()
