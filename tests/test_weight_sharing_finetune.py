"""Centroid fine-tuning (compress/share_finetune.py): a centroid's gradient is the sum of its
members' weight gradients (by hand on one conv), the codebook trains with the conv weights'
decay, a short training on the miniature keeps every conv exactly shared on its old assignment
while the centroids, BN and biases move, the result round-trips through the compact file, the
unshared control trains every weight, and bad input is one error line."""
import pytest
import torch
from torch import nn

from yolocompress.artifacts import artifact_from_model, build_model
from yolocompress.compress.compact import (encode_shared, load_compact, save_compact,
                                           shared_indices)
from yolocompress.compress.share_finetune import (finetune_shared, tie_to_codebooks,
                                                  untie_codebooks)
from yolocompress.compress.weight_sharing import conv_weight_keys, share_weights
from yolocompress.config import load_config
from yolocompress.data.synthetic import DEMO_CLASSES
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.train.optim import param_groups
from yolocompress.train.run import optimizer_steps_per_epoch

from conftest import ROOT, make_mini

BITS = 3


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    """The 12/6-image miniature; the recovery budget one step at a high lr, so that two optimizer
    steps (one epoch: 3 batches of 4, accumulate 2) move every centroid."""
    base = make_mini(tmp_path_factory.mktemp("share"), sections={"distill": {"steps": 1,
                                                                            "lr": 0.01}})
    return load_config(base / "exp.yaml")


@pytest.fixture(scope="module")
def art():
    torch.manual_seed(4)
    model = Darknet(read_cfg(ROOT / "cfg/models/yolov4-nano.cfg"), classes=len(DEMO_CLASSES))
    return artifact_from_model(model, "distilled", list(DEMO_CLASSES), input_size=[64, 64])


def _one_conv(codebook, idx, bits):
    conv = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False))
    with torch.no_grad():
        conv[0].weight.copy_(codebook[idx])
    return conv, {"0.weight": encode_shared(codebook, idx, bits)}


def test_centroid_gradient_is_the_sum_of_its_members_gradients():
    codebook = torch.tensor([-0.5, -0.1, 0.2, 0.7])      # centroid 3 is used by no weight
    idx = torch.randint(0, 3, (3, 2, 3, 3), generator=torch.Generator().manual_seed(1))
    assert set(idx.unique().tolist()) == {0, 1, 2}
    plain, encoded = _one_conv(codebook, idx, 2)
    tied, _ = _one_conv(codebook, idx, 2)
    tie_to_codebooks(tied, encoded)
    x, r = torch.randn(2, 2, 5, 5), torch.randn(2, 3, 3, 3)
    out = tied(x)
    assert torch.equal(out, plain(x))                   # the tie changes no value
    (plain(x) * r).sum().backward()
    (out * r).sum().backward()
    grad_w = plain[0].weight.grad
    grad_c = tied[0].parametrizations.weight.original.grad
    assert grad_c.shape == (4,)
    for j in range(3):
        want = grad_w[idx == j].sum()
        assert abs(float(grad_c[j] - want)) <= 1e-5 * float(grad_w.abs().sum())
        assert abs(float(want)) > 1e-3                  # a sum that the mean would not match
    assert float(grad_c[3]) == 0.0
    assert [id(p) for p in param_groups(tied)["decay"]] == [id(tied[0].parametrizations.weight
                                                               .original)]
    back = untie_codebooks(tied)
    assert type(tied[0]) is nn.Conv2d and list(tied.state_dict()) == ["0.weight"]
    assert torch.equal(tied[0].weight, plain[0].weight)
    assert torch.equal(back["0.weight"]["codebook"], codebook)          # unused centroid kept
    assert torch.equal(shared_indices(back["0.weight"]), idx)


def test_finetuned_centroids_stay_shared_on_their_assignment_and_round_trip(mini, art, tmp_path):
    shared, encoded = share_weights(art, BITS)
    ft, ft_encoded = finetune_shared(shared, encoded, mini, steps=1)
    keys = conv_weight_keys(art)
    assert sorted(ft_encoded) == sorted(keys)
    assert ft["share_finetune"]["steps"] == optimizer_steps_per_epoch(12, 4, 2) == 2
    assert ft["share_finetune"]["tied_convs"] == len(keys) and ft["share_finetune"]["lr"] == 0.01
    assert list(ft["state_dict"]) == list(shared["state_dict"])
    for k in keys:
        w, old, new = ft["state_dict"][k], encoded[k], ft_encoded[k]
        assert torch.unique(w).numel() <= 2 ** BITS
        assert torch.equal(shared_indices(new), shared_indices(old))        # only values moved
        assert torch.equal(w, new["codebook"][shared_indices(old)])
        assert not torch.equal(new["codebook"], old["codebook"]), k         # every conv trained
    others = [k for k in shared["state_dict"] if k not in keys
              and shared["state_dict"][k].is_floating_point() and "running" not in k]
    assert others and all(not torch.equal(ft["state_dict"][k], shared["state_dict"][k])
                          for k in others)              # BN weights / biases train too
    save_compact(ft, ft_encoded, tmp_path / "ft.pt")
    back = load_compact(tmp_path / "ft.pt")
    assert back["share_finetune"] == ft["share_finetune"]
    assert all(torch.equal(back["state_dict"][k], v) for k, v in ft["state_dict"].items())
    build_model(back)


def test_control_fine_tunes_every_weight(mini, art):
    shared, _ = share_weights(art, BITS)
    ft, encoded = finetune_shared(shared, {}, mini, steps=1)
    assert encoded == {} and ft["share_finetune"]["tied_convs"] == 0
    assert all(torch.unique(ft["state_dict"][k]).numel() > 2 ** BITS
               for k in conv_weight_keys(art))         # no longer shared: untied training


def test_zero_steps_is_the_input(mini, art):
    shared, encoded = share_weights(art, BITS)
    out, out_encoded = finetune_shared(shared, encoded, mini, steps=0)
    assert out is shared and out_encoded is encoded


def _error(fn) -> str:
    with pytest.raises(YoloCompressError) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_input_is_one_error_line(mini, art):
    shared, encoded = share_weights(art, 2)
    key = conv_weight_keys(art)[0]
    assert "bits must be 1..8, got 0" in _error(lambda: share_weights(art, 0))
    assert "bits must be 1..8, got 9" in _error(lambda: share_weights(art, 9))
    assert "steps must be >= 0, got -1" in _error(
        lambda: finetune_shared(shared, encoded, mini, steps=-1))
    assert "lr must be > 0, got 0.0" in _error(
        lambda: finetune_shared(shared, encoded, mini, steps=1, lr=0.0))
    bad = {key: {**encoded[key], "bits": 9}}
    assert "needs a shared entry of 1..8 bits" in _error(
        lambda: finetune_shared(shared, bad, mini, steps=1))
    assert "is not a conv weight" in _error(
        lambda: finetune_shared(shared, {"layers.0.bn.weight": encoded[key]}, mini, steps=1))
    assert "is not its entry's codebook[indices]" in _error(
        lambda: finetune_shared(art, encoded, mini, steps=1))       # the unshared weights


def test_bench_sharing_rows_and_table(mini, art, tmp_path):
    import importlib.util
    from types import SimpleNamespace

    from yolocompress.artifacts import save_artifact
    from yolocompress.data.descriptor import load_descriptor, load_split

    spec = importlib.util.spec_from_file_location("bench_quantize",
                                                  ROOT / "bench" / "bench_quantize.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    save_artifact(art, tmp_path / "a.pt")
    desc = load_descriptor(mini.require_file("data.descriptor"))

    def rows(steps, lr=None):
        return bench.part_sharing(mini, tmp_path / "a.pt", tmp_path, SimpleNamespace(
            bits=[BITS], share_finetune_steps=steps, share_finetune_lr=lr), None, desc,
            load_split(desc, "val"))

    assert "steps must be >= 0, got -1" in _error(lambda: rows(-1))
    got = rows(1, lr=2e-4)
    assert [(r["bits"], r.get("finetune_steps"), r.get("finetune_lr")) for r in got] == [
        (None, None, None), (None, 2, 2e-4), (BITS, None, None), (BITS, 2, 2e-4)]
    table = bench.markdown({"sharing": got}).splitlines()
    assert table[0].startswith("| weight sharing | fine-tuned |")
    assert [line.split(" | ")[1] for line in table[2:6]] == [
        "no", "every weight (control), 2 steps at lr 0.0002", "no",
        "centroids, 2 steps at lr 0.0002"]
    assert table[5].startswith(f"| {BITS} bits | centroids, 2 steps at lr 0.0002 |")
    # without --share-finetune-lr: the distill section's
    assert {r.get("finetune_lr") for r in rows(1)} == {None, mini.distill.lr}
