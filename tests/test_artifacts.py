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
    with pytest.raises(YoloCompressError) as e:
        load_artifact(tmp_path / "evil.pt")
    assert str(e.value) == (f"{tmp_path / 'evil.pt'}: not a plain-data artifact: it holds a pickled "
                            f"Python object ({__name__}.Evil), which is refused for safety (only "
                            f"tensors, numbers, strings, lists and dicts are loaded)")
    for name, data in (("junk", b"\x80\x02junk"), ("text", b"hello world\n"), ("empty", b""),
                       ("noise", bytes(range(256)) * 8), ("zip", b"PK\x05\x06" + b"\x00" * 18)):
        (tmp_path / f"{name}.pt").write_bytes(data)
        with pytest.raises(YoloCompressError, match=rf"{name}.pt: not a readable artifact \(corrupt"):
            load_artifact(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("key, value, message", [
    ("input_size", [100, 100], r"input_size must be \[height, width\], each must be a positive multiple "
                               r"of 32; got \[100, 100\]"),
    ("input_size", "416", "input_size must be"),
    ("input_size", [416], "input_size must be"),
    ("input_size", [416.0, 416.0], "input_size must be"),
    ("classes", [], "classes must be a non-empty list of names"),
    ("classes", [1, 2], "classes must be a non-empty list of names"),
    ("cfg", 7, "cfg must be Darknet cfg text, got a int"),
    ("state_dict", {"a": 1}, "state_dict must map names to tensors"),
])
def test_malformed_plain_fields_are_one_line_errors(tmp_path, key, value, message):
    _, art = _art()
    torch.save({**art, key: value}, tmp_path / "bad.pt")
    with pytest.raises(YoloCompressError, match=rf"^{tmp_path / 'bad.pt'}: {message}"):
        load_artifact(tmp_path / "bad.pt")


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
