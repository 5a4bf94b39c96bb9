"""Artifact contract: atomic save, weights_only load, format and cfg/state_dict checks, lineage."""
import pytest
import torch

from yolocompress.artifacts import (FORMAT, artifact_from_model, build_model, file_sha256,
                                    load_artifact, save_artifact)
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet

from conftest import TINY_CFG


def _art(**kw):
    m = Darknet(read_cfg(TINY_CFG))
    return m, artifact_from_model(m, "baseline", ["a", "b"], metrics={"map50_voc07": 0.5}, **kw)


def test_round_trip_and_plain_weights_only_load(tmp_path):
    m, art = _art()
    p = tmp_path / "best.pt"
    sha = save_artifact(art, p)
    assert sha == file_sha256(p)
    raw = torch.load(p, weights_only=True)
    assert raw["format"] == FORMAT and raw["stage"] == "baseline"
    loaded = load_artifact(p)
    m2 = build_model(loaded)
    x = torch.randn(1, 3, 64, 64)
    m.eval(), m2.eval()
    assert all(torch.equal(a, b) for a, b in zip(m(x), m2(x)))
    assert loaded["classes"] == ["a", "b"] and loaded["input_size"] == [64, 64]
    assert not list(tmp_path.glob("*.tmp"))


def test_lineage_parent_is_sha_of_parent_file(tmp_path):
    _, art = _art()
    sha = save_artifact(art, tmp_path / "a.pt")
    _, child = _art(parent=sha, lineage=[{"stage": "baseline", "sha256": sha}])
    save_artifact(child, tmp_path / "b.pt")
    assert load_artifact(tmp_path / "b.pt")["parent"] == sha


def test_corrupt_and_foreign_files_are_one_line_errors(tmp_path):
    _, art = _art()
    p = tmp_path / "a.pt"
    save_artifact(art, p)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(p.read_bytes()[:300])
    for bad, pattern in [(cut, "corrupt or truncated"), (tmp_path / "none.pt", "no such")]:
        with pytest.raises(YoloCompressError, match=pattern) as e:
            load_artifact(bad)
        assert "\n" not in str(e.value)
    torch.save({"x": 1}, tmp_path / "foreign.pt")
    with pytest.raises(YoloCompressError, match="not a yolocompress artifact"):
        load_artifact(tmp_path / "foreign.pt")
    torch.save({**art, "format": "yolocompress/0"}, tmp_path / "old.pt")
    with pytest.raises(YoloCompressError, match="format 'yolocompress/0' is not supported"):
        load_artifact(tmp_path / "old.pt")


class Evil:
    """Any class outside torch's weights_only allow-list."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"format": FORMAT, "obj": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(YoloCompressError, match="corrupt or truncated|not a readable"):
        load_artifact(tmp_path / "evil.pt")


def test_cfg_state_dict_disagreement(tmp_path):
    _, art = _art()
    sd = dict(art["state_dict"])
    sd["layers.0.conv.weight"] = torch.zeros(4, 3, 3, 3)
    torch.save({**art, "state_dict": sd}, tmp_path / "shape.pt")
    with pytest.raises(YoloCompressError, match=r"layers.0.conv.weight has shape \(4, 3, 3, 3\)"):
        load_artifact(tmp_path / "shape.pt")
    sd = dict(art["state_dict"])
    del sd["layers.1.bn.weight"]
    torch.save({**art, "state_dict": sd}, tmp_path / "missing.pt")
    with pytest.raises(YoloCompressError, match="missing layers.1.bn.weight"):
        load_artifact(tmp_path / "missing.pt")
    torch.save({**art, "classes": ["a"]}, tmp_path / "classes.pt")
    with pytest.raises(YoloCompressError, match="2 classes but the artifact names 1"):
        load_artifact(tmp_path / "classes.pt")
