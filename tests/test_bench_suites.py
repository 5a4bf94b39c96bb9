"""`yolocompress bench compress|ablation` on a miniature demo set: arms share one sparse model,
land on the FLOPs budget, reuse finished runs, and write their tables, JSON and plot."""
import json

import pytest

from yolocompress.artifacts import file_sha256, load_artifact
from yolocompress.bench.suites import (ABLATION_HEADING, COMPRESS_HEADING, mean_spread,
                                       run_ablation)
from yolocompress.cli import main
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError

from conftest import CHAIN_TRAIN, make_mini

FAST = ["sparse.epochs=1", "distill.epochs=1", "train.epochs=1"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("mini"), train=CHAIN_TRAIN)


def test_mean_spread_by_hand():
    assert mean_spread([0.2, 0.4, 0.3]) == pytest.approx((0.3, 0.1))
    assert mean_spread([0.5]) == (0.5, 0.0)


def test_compress_bench_arms_share_the_sparse_model_and_hit_the_budget(mini, tmp_path):
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    args = ["bench", "compress", "--config", str(mini / "exp.yaml"), "--latency-iters", "1",
            "--markdown", str(md), *FAST, "bench.budgets=[0.5]",
            "bench.arms=[ours,ours_no_distill,ours_search,global,torch_pruning]"]
    assert main(args) == 0
    bench = mini / "runs" / "exp" / "bench"
    result = json.loads((bench / "compress.json").read_text())
    base, sparse = result["reference"]
    rows = {r["arm"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "ours_no_distill", "ours_search", "global", "torch_pruning"}
    for arm, r in rows.items():
        assert 1 - r["flops"] / base["flops"] == pytest.approx(0.5, abs=0.011), arm
        assert r["budget"] == 0.5 and r["seed"] == 0 and r["pruned_map50_voc07"] is not None
        # every arm descends from the one shared sparse model
        assert any(step["sha256"] == sparse["sha256"] for step in r["lineage"]), arm
    assert rows["ours"]["stage"] == "distilled" and rows["global"]["stage"] == "finetuned"
    # ours and ours_no_distill recover the same pruned model
    assert rows["ours"]["parent"] == rows["ours_no_distill"]["parent"]
    assert load_artifact(bench / "flops50" / "global" / "pruned" / "best.pt")["prune"][
        "percents"].keys() == {"all"}
    # the search arm starts from 0 % in every group; the plain arm from the method's percents
    search = load_artifact(bench / "flops50" / "groups_search" / "pruned" / "best.pt")["prune"]
    assert search["settings"]["grouping"] == "groups" and search["budget"]["method"] == "greedy"
    assert search["percents"] != load_artifact(
        bench / "flops50" / "groups" / "pruned" / "best.pt")["prune"]["percents"]
    text = md.read_text()
    assert COMPRESS_HEADING in text and "## Other\n\nkept" in text
    assert "yolocompress bench compress" in text and "Torch-Pruning" in text
    assert (bench / "compress_map_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    # the plot the markdown shows sits beside it, linked relatively
    assert (tmp_path / "exp-compress_map_vs_flops.png").is_file()
    assert "![mAP vs FLOPs](exp-compress_map_vs_flops.png)" in text

    # re-running reuses every finished piece
    shas = {arm: file_sha256(r["artifact"]) for arm, r in rows.items()}
    assert main(args) == 0
    again = {r["arm"]: r for r in json.loads((bench / "compress.json").read_text())["rows"]}
    assert {arm: r["sha256"] for arm, r in again.items()} == shas


def test_ablation_reports_every_factor_over_seeds(mini, tmp_path):
    md = tmp_path / "ABL.md"
    config = load_config(mini / "exp.yaml", [*FAST, "bench.ablation_seeds=[0,1]",
                                             "bench.ablation_budget=0.5"])
    result = run_ablation(config, md_path=md)
    factors = {f["factor"]: f for f in result["factors"]}
    assert set(factors) == {"sparse rate", "threshold", "recovery"}
    for f in factors.values():
        assert len(f["variants"]) == 2
        for runs in f["variants"].values():
            assert len(runs) == 2 and all(m in r for r in runs for m in f["metrics"])
    assert set(factors["sparse rate"]["variants"]) == {"local_decay", "constant"}
    runs = mini / "runs" / "exp" / "bench" / "ablation"
    seeds = [load_artifact(runs / f"sparse-constant-seed{s}" / "sparse" / "best.pt")
             for s in (0, 1)]
    assert [a["config"]["train"]["seed"] for a in seeds] == [0, 1]
    assert all(a["sparsity"]["schedule"] == "constant" for a in seeds)
    text = md.read_text()
    assert ABLATION_HEADING in text and "± " in text
    assert json.loads((mini / "runs" / "exp" / "bench" / "ablation.json").read_text())["seeds"] == [0, 1]


def test_bench_config_errors(mini):
    with pytest.raises(YoloCompressError, match="arms: must be a non-empty list of"):
        load_config(mini / "exp.yaml", ["bench.arms=[ours,slimming]"])
    with pytest.raises(YoloCompressError, match="budgets: must be a non-empty list of fractions"):
        load_config(mini / "exp.yaml", ["bench.budgets=[1.5]"])
