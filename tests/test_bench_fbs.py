"""bench/bench_fbs.py on a miniature demo set: FBS and the static `ours` arm start from the same
sparse model, train the same epochs, land on the same average MACs, are timed, and reuse their
runs; bad input is one line."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from yolocompress.artifacts import file_sha256, load_artifact
from yolocompress.compress.gate_stage import switching
from yolocompress.config import load_config
from yolocompress.pipeline import run_to_sparse

from conftest import CHAIN_TRAIN, make_mini

ROOT = Path(__file__).resolve().parents[1]
FAST = ["sparse.epochs=1", "distill.epochs=1", "train.epochs=1", "prune.search_rounds=4"]


def _script():
    spec = importlib.util.spec_from_file_location("bench_fbs", ROOT / "bench" / "bench_fbs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fbs_and_static_share_the_start_the_epochs_and_the_macs(tmp_path):
    mini = make_mini(tmp_path, train=CHAIN_TRAIN)
    sparse = run_to_sparse(load_config(mini / "exp.yaml", FAST))["sparse"]
    out, md = tmp_path / "fbs.json", tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    args = ["--config", str(mini / "exp.yaml"), "--sparse", str(sparse), "--densities", "0.5",
            "--seeds", "0", "--root", str(tmp_path / "fbs"), "--rounds", "1", "--json", str(out),
            *FAST]
    bench = _script()
    assert bench.main([*args, "--latency-iters", "1", "--write", "--markdown", str(md)]) == 0
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"fbs", "static"} and "refused" not in doc
    fbs, static = rows["fbs"], rows["static"]
    assert doc["sparse"]["sha256"] == file_sha256(sparse)
    # both start from the sparse model and train the recovery's epochs
    for r in (fbs, static):
        art = load_artifact(r["artifact"])
        assert any(s["sha256"] == doc["sparse"]["sha256"] for s in art["lineage"]), r["method"]
        assert r["epochs"] == doc["training"]["epochs"] == 1
        assert r["latency_ms_b1"] > 0 and r["ort_ms_b1"] > 0
    assert load_artifact(fbs["artifact"])["stage"] == "gated"
    assert load_artifact(static["artifact"])["stage"] == "finetuned"   # pipeline.recovery
    # the static budget is the MAC share FBS saves on average, and the prune lands on it
    assert static["flops_budget"] == pytest.approx(1 - fbs["macs"] / fbs["macs_dense"], abs=1e-4)
    assert fbs["macs_dense"] == doc["sparse"]["macs"]
    assert static["macs"] / doc["sparse"]["macs"] == pytest.approx(fbs["macs"] / fbs["macs_dense"],
                                                                   abs=0.03)
    assert fbs["latency_ms_b1_masked"] > 0 and doc["sparse"]["ort_ms_b1"] > 0
    # how dynamic the gates are, from the run's own gate_macs.json
    usage = json.loads((Path(fbs["artifact"]).parent / "gate_macs.json").read_text())["usage"]
    assert {k: fbs[k] for k in ("switching_share", "gates_switching", "gates")} == switching(usage)
    assert fbs["gates"] == len(usage) > 0
    text = md.read_text()
    assert bench.HEADING in text and "## Other\n\nkept" in text and "static (ours)" in text
    # a re-run trains nothing again
    shas = {m: file_sha256(r["artifact"]) for m, r in rows.items()}
    assert bench.main([*args, "--latency-iters", "0"]) == 0
    again = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert {m: file_sha256(r["artifact"]) for m, r in again.items()} == shas


def test_table_pools_seeds_by_hand():
    doc = {"sparse": {"macs": 200e6, "map50_voc07": 0.8},
           "rows": [{"method": "fbs", "density": 0.5, "seed": s, "macs": 50e6, "macs_sd": 2e6,
                     "map50_voc07": m} for s, m in ((0, 0.5), (1, 0.7))]
           + [{"method": "static", "density": 0.5, "seed": 0, "macs": 52e6, "flops_budget": 0.75,
               "map50_voc07": 0.6, "map50_pruned": 0.1}]}
    text = _script().table(doc)
    assert "| FBS | 0.5 | 0,1 | 50.0 | 25.0% | 0.6000 ± 0.1414 |" in text
    assert "| static (ours), same MACs | 0.5 | 0 | 52.0 | 26.0% | 0.6000 | 0.1000 |" in text
    assert "switch" not in text          # rows written before the script counted switching
    for r, (share, n) in zip(doc["rows"], ((0.01, 2), (0.03, 4))):
        r.update(switching_share=share, gates_switching=n, gates=65)
    assert "MACs sd 2.0 M; 2.0% of channels switch, in <= 4 of 65 gates |" in _script().table(doc)


def test_switching_counts_channels_strictly_between_the_bounds():
    usage = {"conv1": [0.0, 0.5, 1.0, 0.02], "conv5": [0.98, 0.97], "conv9": [1.0, 1.0]}
    # conv1: 0.5 switches (0.02 is on the bound); conv5: 0.97; conv9: none
    assert switching(usage) == {"switching_share": 2 / 8, "gates_switching": 2, "gates": 3}
    assert switching(usage, (0.0, 1.0)) == {"switching_share": 4 / 8, "gates_switching": 2,
                                            "gates": 3}
    assert switching({}) == {"switching_share": 0.0, "gates_switching": 0, "gates": 0}


@pytest.mark.parametrize("extra, problem", [
    (["--config", "missing.yaml"], "error: missing.yaml"),
    (["--config", str(ROOT / "cfg/experiments/demo.yaml")], "error: missing.pt"),
    (["--config", str(ROOT / "cfg/experiments/demo.yaml"), "--densities", "0"],
     "error: --densities must be fractions in (0, 1]"),
    (["--config", str(ROOT / "cfg/experiments/demo.yaml"), "--seeds", "0", "0"],
     "error: --densities and --seeds must not repeat")])
def test_bench_fbs_rejects_bad_input_in_one_line(tmp_path, extra, problem):
    r = subprocess.run([sys.executable, str(ROOT / "bench/bench_fbs.py"), "--sparse", "missing.pt",
                        *extra, "--root", "runs", "--json", "out.json"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(problem)
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "runs").exists()
