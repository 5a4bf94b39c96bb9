"""`yolocompress bench compress|ablation` on a miniature demo set: arms share one sparse model,
land on the FLOPs budget, reuse finished runs, and write their tables, JSON and plot."""
import json
import os

import pytest

from yolocompress.artifacts import file_sha256, load_artifact, save_artifact
from yolocompress.bench.suites import (ABLATION_HEADING, COMPRESS_HEADING, PUBLISHED,
                                       compress_plan, mean_sd, merge_published, paired,
                                       paired_rows, paired_table, run_ablation)
from yolocompress.bench.arms import ARMS, arm_folder, run_arm
from yolocompress.compress.scratch_stage import trained_epochs
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.profile import profile_summary
from yolocompress.cli import main
from yolocompress.config import load_config
from yolocompress.errors import YoloCompressError
from yolocompress.pipeline import run_to_sparse

from conftest import CHAIN_TRAIN, make_mini

FAST = ["sparse.epochs=1", "distill.epochs=1", "train.epochs=1", "prune.search_rounds=4"]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini(tmp_path_factory.mktemp("mini"), train=CHAIN_TRAIN)


def test_mean_sd_and_paired_by_hand():
    assert mean_sd([0.2, 0.4, 0.3]) == pytest.approx((0.3, 0.1))
    assert mean_sd([0.5]) == (0.5, 0.0)
    # differences 0.02, 0.04, 0.00: mean 0.02, sd 0.02, t = 0.02 / (0.02 / sqrt 3)
    d = paired([0.62, 0.64, 0.60], [0.60, 0.60, 0.60])
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02) and d["sd"] == pytest.approx(0.02)
    assert d["t"] == pytest.approx(3 ** 0.5)
    assert paired([0.7], [0.6])["t"] is None


RECOVERIES = {"ours": "finetune", "ours_distill": "distill", "torch_pruning": "finetune"}


def _row(budget, method, seed, m):
    return {"budget": budget, "method": method, "seed": seed, "map50_voc07": m,
            "recovery": RECOVERIES.get(method)}


def test_paired_rows_pair_by_seed_against_torch_pruning():
    rows = [_row(0.5, "torch_pruning", 0, 0.50), _row(0.5, "torch_pruning", 1, 0.60),
            _row(0.5, "ours", 1, 0.63), _row(0.5, "ours", 0, 0.52), _row(0.5, "ours", 2, 0.9),
            _row(0.5, "scratch", 0, 0.40), _row(0.65, "ours", 0, 0.3)]
    pairs = {(d["budget"], d["method"]): d for d in paired_rows(rows)}
    # seed 2 has no Torch-Pruning run and the -65 % budget none at all: left out
    assert set(pairs) == {(0.5, "ours"), (0.5, "scratch")}
    assert pairs[0.5, "ours"]["seeds"] == [0, 1]
    assert pairs[0.5, "ours"]["mean"] == pytest.approx(0.025)
    assert pairs[0.5, "scratch"]["mean"] == pytest.approx(-0.10) and pairs[0.5, "scratch"]["t"] is None
    assert "+2.5 ± 0.7" in paired_table(paired_rows(rows))


def test_merge_published_joins_one_benchmark_only():
    head = {"experiment": "e", "recovery_epochs": 6, "command": "c2", "recoveries": RECOVERIES,
            "baseline": {"sha256": "b"}, "sparse": {"sha256": "s"}}
    old = {**head, "command": "c1", "rows": [_row(0.65, "ours", 0, 0.70),
                                             _row(0.65, "torch_pruning", 0, 0.68),
                                             _row(0.5, "ours", 0, 0.10)]}
    new = {**head, "rows": [_row(0.5, "torch_pruning", 0, 0.75), _row(0.5, "ours", 0, 0.78)]}
    out = merge_published(old, new, "old.json")
    assert [(r["budget"], r["method"], r["map50_voc07"]) for r in out["rows"]] == [
        (0.5, "ours", 0.78), (0.5, "torch_pruning", 0.75), (0.65, "ours", 0.70),
        (0.65, "torch_pruning", 0.68)]
    assert [(d["budget"], round(d["mean"], 6)) for d in out["paired"]] == [(0.5, 0.03), (0.65, 0.02)]
    assert out["commands"] == ["c1", "c2"] and merge_published(out, new, "x")["commands"] == [
        "c1", "c2"]
    for key, value in (("experiment", "f"), ("recovery_epochs", 4)):
        with pytest.raises(YoloCompressError, match=f"old.json: its {key} is"):
            merge_published({**old, key: value}, new, "old.json")
    with pytest.raises(YoloCompressError, match="its baseline model is x, this run's b"):
        merge_published({**old, "baseline": {"sha256": "x"}}, new, "old.json")
    # `ours` rows of a run where it distilled do not join a run where it fine-tunes
    distilled = {**old, "rows": [{**r, "recovery": "distill"} for r in old["rows"]]}
    with pytest.raises(YoloCompressError, match="its ours rows were recovered by distill, this "
                                                "run's ours by finetune"):
        merge_published(distilled, new, "old.json")
    with pytest.raises(YoloCompressError, match="an unrecorded recovery"):
        merge_published({**old, "rows": [{**old["rows"][0], "recovery": None}]}, new, "old.json")


def test_compress_plan_runs_every_seed_then_scratch(mini):
    config = load_config(mini / "exp.yaml", ["bench.budgets=[0.35,0.5]", "bench.seeds=[0,1]",
                                             "bench.scratch_seeds=[3]",
                                             "bench.arms=[scratch,ours,torch_pruning]"])
    assert compress_plan(config) == [
        (0.35, "ours", 0), (0.35, "torch_pruning", 0), (0.5, "ours", 0), (0.5, "torch_pruning", 0),
        (0.35, "ours", 1), (0.35, "torch_pruning", 1), (0.5, "ours", 1), (0.5, "torch_pruning", 1),
        (0.35, "scratch", 3), (0.5, "scratch", 3)]


def test_ours_follows_the_pipeline_recovery_in_the_folder_of_the_arm_it_equals(mini):
    default = load_config(mini / "exp.yaml")
    distill = load_config(mini / "exp.yaml", ["pipeline.recovery=distill"])
    assert default.pipeline.recovery == "finetune"
    assert [ARMS["ours"].recovery_of(c) for c in (default, distill)] == ["finetune", "distill"]
    assert [arm_folder(c, ARMS["ours"]) for c in (default, distill)] == ["ours_finetune",
                                                                         "ours_distill"]
    # an arm with a fixed recovery, or one no other arm equals, keeps its own folder
    assert arm_folder(distill, ARMS["ours_finetune"]) == "ours_finetune"
    assert ARMS["ours_iterative"].recovery_of(distill) == "distill"
    assert arm_folder(default, ARMS["ours_iterative"]) == "ours_iterative"
    assert arm_folder(default, ARMS["torch_pruning"]) == "torch_pruning"


def test_recover_runs_the_named_recovery_with_the_teacher_only_for_distillation(monkeypatch):
    import yolocompress.bench.arms as arms

    calls = []
    monkeypatch.setattr(arms, "run_distill", lambda c, s, t: calls.append(("distill", s, t)) or "d")
    monkeypatch.setattr(arms, "run_finetune", lambda c, s: calls.append(("finetune", s)) or "f")
    assert arms.recover("cfg", "distill", "p.pt", "t.pt") == "d"
    assert arms.recover("cfg", "finetune", "p.pt", "t.pt") == "f"
    assert calls == [("distill", "p.pt", "t.pt"), ("finetune", "p.pt")]
    with pytest.raises(ValueError, match="unknown recovery 'scratch'"):
        arms.recover("cfg", "scratch", "p.pt", "t.pt")


def test_compress_bench_arms_share_the_sparse_model_and_hit_the_budget(mini, tmp_path, capsys):
    md = tmp_path / "BENCH.md"
    md.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    published = tmp_path / "bench" / "compress.json"
    args = ["bench", "compress", "--config", str(mini / "exp.yaml"), "--latency-iters", "1",
            "--markdown", str(md), "--json", str(published), *FAST, "bench.budgets=[0.5]",
            "bench.seeds=[0]", "bench.scratch_seeds=[0]",
            "bench.arms=[ours,ours_finetune,ours_distill,torch_pruning,global,scratch]"]
    assert main(args) == 0
    bench = mini / "runs" / "exp" / "bench"
    result = json.loads((bench / "compress.json").read_text())
    base, sparse = result["baseline"], result["sparse"]
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"ours", "ours_finetune", "ours_distill", "torch_pruning", "global",
                         "scratch"}
    for method, r in rows.items():
        assert 1 - r["flops"] / base["flops"] == pytest.approx(0.5, abs=0.011), method
        assert r["budget"] == 0.5 and r["seed"] == 0 and r["map50_pruned"] is not None
        # every arm descends from the one shared sparse model
        assert any(step["sha256"] == sparse["sha256"] for step in r["lineage"]), method
    # ours is the pipeline's defaults: recovered by fine-tuning (pipeline.recovery), which is the
    # ours_finetune arm's run itself, trained once
    assert rows["ours"]["stage"] == rows["global"]["stage"] == "finetuned"
    assert rows["ours"]["recovery"] == "finetune" and rows["ours_distill"]["stage"] == "distilled"
    assert rows["ours"]["artifact"] == rows["ours_finetune"]["artifact"]
    assert rows["ours"]["map50_voc07"] == rows["ours_finetune"]["map50_voc07"]
    assert "ours-seed0" not in os.listdir(bench / "flops50")
    # ours, its recoveries and scratch share the pruned model (scratch: its architecture)
    assert (rows["ours"]["parent"] == rows["ours_distill"]["parent"]
            == rows["scratch"]["parent"])
    ours_pruned = load_artifact(bench / "flops50" / "ours" / "pruned" / "best.pt")
    assert ours_pruned["prune"]["budget"]["method"] == "evolve"     # the pipeline's default
    slim = load_artifact(bench / "flops50" / "global" / "pruned" / "best.pt")["prune"]
    assert slim["percents"].keys() == {"all"} and slim["settings"]["importance"] == "bn_gamma_abs"
    assert slim["settings"]["reconstruct"] == 0
    # scratch: the pruned cfg from random init, for baseline + sparse + recovery epochs (1 each)
    scratch = load_artifact(rows["scratch"]["artifact"])
    assert scratch["stage"] == "scratch" and scratch["cfg"] == ours_pruned["cfg"]
    assert rows["scratch"]["epochs"] == scratch["scratch"]["epochs"] == 3
    assert rows["ours"]["epochs"] == rows["torch_pruning"]["epochs"] == result["recovery_epochs"] == 1
    assert {d["method"] for d in result["paired"]} == {"ours", "ours_finetune", "ours_distill",
                                                        "global", "scratch"}
    out = json.loads(published.read_text())
    assert out["baseline"]["map50_voc07"] == base["map50_voc07"]
    assert all(set(r) == set(PUBLISHED) for r in out["rows"]) and len(out["rows"]) == 6
    assert out["recoveries"]["ours"] == "finetune"
    text = md.read_text()
    assert COMPRESS_HEADING in text and "## Other\n\nkept" in text
    assert "yolocompress bench compress" in text and "Torch-Pruning" in text
    assert "minus Torch-Pruning" in text
    assert (bench / "compress_map_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    # the plot the markdown shows sits beside it, linked relatively
    assert (tmp_path / "exp-compress_map_vs_flops.png").is_file()
    assert "![mAP vs FLOPs](exp-compress_map_vs_flops.png)" in text

    # re-running reuses every finished piece
    shas = {method: file_sha256(r["artifact"]) for method, r in rows.items()}
    assert main(args) == 0
    again = {r["method"]: r for r in json.loads((bench / "compress.json").read_text())["rows"]}
    assert {method: r["sha256"] for method, r in again.items()} == shas

    # --merge: the rows already in --json that this run does not make are kept (a row of another
    # budget from an earlier session), its own rows replace theirs, the pairs are re-done
    kept = {**out["rows"][0], "budget": 0.65, "map50_voc07": 0.123}
    stale = {**out["rows"][0], "map50_voc07": 0.999}
    published.write_text(json.dumps({**out, "rows": [kept, stale]}))
    assert main([*args, "--merge"]) == 0
    merged = json.loads(published.read_text())
    assert len(merged["rows"]) == 7 and kept in merged["rows"] and stale not in merged["rows"]
    assert merged["rows"][-1] == kept                          # sorted by budget, then method
    assert [r["budget"] for r in merged["rows"]] == [0.5] * 6 + [0.65]
    assert merged["commands"][-1] == merged["command"]
    assert {(d["budget"], d["method"]) for d in merged["paired"]} == {
        (0.5, m) for m in ("ours", "ours_finetune", "ours_distill", "global", "scratch")}
    assert "rows joined from" in md.read_text()
    # ... and only from the same sparse model: refused before any arm runs, the file untouched
    other = {**merged, "sparse": {**merged["sparse"], "sha256": "f" * 64}}
    published.write_text(json.dumps(other))
    before = published.read_text()
    assert main([*args, "--merge"]) == 2
    assert "its sparse model is ffffffffffff" in capsys.readouterr().err
    assert published.read_text() == before
    # ... nor `ours` rows of a run in which the pipeline's recovery was another
    other = {**merged, "rows": [{**r, "recovery": "distill"} if r["method"] == "ours" else r
                                for r in merged["rows"]]}
    published.write_text(json.dumps(other))
    before = published.read_text()
    assert main([*args, "--merge"]) == 2
    assert "its ours rows were recovered by distill" in capsys.readouterr().err
    assert published.read_text() == before


def test_iterative_arm_prunes_in_steps_within_the_same_epochs(mini):
    config = load_config(mini / "exp.yaml", [*FAST, "distill.epochs=3", "bench.iterative_steps=2"])
    paths = run_to_sparse(config)
    root = mini / "runs" / "exp" / "bench-iterative"
    row = run_arm(config, root, ARMS["ours_iterative"], paths["sparse"], 0.5, 0, latency_iters=0)
    base = load_artifact(paths["sparse"])
    flops = row["flops"] / profile_summary(parse_cfg(base["cfg"]), 64, 64)["flops"]
    assert 1 - flops == pytest.approx(0.5, abs=0.011)
    # step 1 leaves sqrt(0.5) of the FLOPs and is fine-tuned 1 epoch (3 // 2); step 2 prunes
    # that fine-tuned model; the distillation gets the 2 epochs left
    step1 = load_artifact(root / "ours_iterative-seed0" / "step1" / "pruned" / "best.pt")
    assert step1["prune"]["budget"]["target"] == pytest.approx(1 - 0.5 ** 0.5)
    ft = load_artifact(root / "ours_iterative-seed0" / "step1" / "finetuned" / "best.pt")
    assert ft["config"]["train"]["epochs"] == 1 and ft["config"]["train"]["seed"] == 0
    assert [s["stage"] for s in load_artifact(row["artifact"])["lineage"]][-3:] == [
        "pruned", "finetuned", "pruned"]
    assert row["stage"] == "finetuned" and row["epochs"] == 3     # pipeline.recovery
    with pytest.raises(YoloCompressError, match="iterative_steps=4: the recovery's 3 epochs"):
        run_arm(load_config(mini / "exp.yaml", [*FAST, "distill.epochs=3",
                                                "bench.iterative_steps=4"]),
                root, ARMS["ours_iterative"], paths["sparse"], 0.5, 1, latency_iters=0)


def test_trained_epochs_counts_the_lineage_and_refuses_what_it_cannot_count(mini, tmp_path):
    paths = run_to_sparse(load_config(mini / "exp.yaml", FAST))    # reused when complete
    sparse = paths["sparse"]
    assert trained_epochs(paths["baseline"]) == 1
    assert trained_epochs(sparse) == 2                 # baseline 1 + sparse 1
    art = load_artifact(sparse)
    gone = {**art, "lineage": [{**art["lineage"][0], "path": str(tmp_path / "nope.pt")}]}
    save_artifact(gone, tmp_path / "gone.pt")
    with pytest.raises(YoloCompressError, match="nope.pt is gone.*bench.scratch_epochs"):
        trained_epochs(tmp_path / "gone.pt")
    changed = {**art, "lineage": [{**art["lineage"][0], "sha256": "0" * 64}]}
    save_artifact(changed, tmp_path / "changed.pt")
    with pytest.raises(YoloCompressError, match="changed since"):
        trained_epochs(tmp_path / "changed.pt")
    imported = {**art, "lineage": [{**art["lineage"][0], "stage": "imported"}]}
    save_artifact(imported, tmp_path / "imported.pt")
    with pytest.raises(YoloCompressError, match="imported model.*epochs are unknown"):
        trained_epochs(tmp_path / "imported.pt")


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
