"""Weight sharing and unstructured pruning: bit packing round trips, k-means on a hand case, at
most 2^b values per conv, the compact file decodes to exactly the clustered / pruned weights, its
payload follows the size formula, and the requested pruning share is hit exactly."""
import math

import numpy as np
import pytest
import torch

from yolocompress.artifacts import artifact_from_model, build_model
from yolocompress.compress.compact import (entry_bytes, load_compact, pack_bits, save_compact,
                                           unpack_bits)
from yolocompress.compress.unstructured import magnitude_prune
from yolocompress.compress.weight_sharing import conv_weight_keys, kmeans_1d, share_weights
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import Darknet

from conftest import TINY_CFG


@pytest.fixture
def art():
    torch.manual_seed(2)
    return artifact_from_model(Darknet(read_cfg(TINY_CFG), classes=2), "baseline", ["a", "b"])


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_bits_round_trip(bits):
    values = np.random.default_rng(bits).integers(0, 1 << bits, size=1001)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_pack_bits_layout_and_range():
    assert pack_bits([1, 2, 3], 2).tolist() == [0b111001]     # 01, 10, 11 from bit 0 up
    with pytest.raises(YoloCompressError, match="must be in"):
        pack_bits([4], 2)


def test_kmeans_hand_case():
    x = torch.tensor([0.0, 0.1, 0.2, 10.0, 10.1, 10.2])
    c, idx = kmeans_1d(x, 2)
    assert c.tolist() == pytest.approx([0.1, 10.1])
    assert idx.tolist() == [0, 0, 0, 1, 1, 1]
    c, idx = kmeans_1d(torch.tensor([3.0, -1.0, 3.0]), 4)     # few distinct values: kept exactly
    assert c.tolist() == [-1.0, 3.0] and idx.tolist() == [1, 0, 1]


@pytest.mark.parametrize("bits", [2, 4])
def test_shared_round_trip_and_size_formula(art, tmp_path, bits):
    shared, encoded = share_weights(art, bits)
    keys = conv_weight_keys(art)
    assert sorted(encoded) == sorted(keys) and len(keys) == 9
    for k in keys:
        w = shared["state_dict"][k]
        assert torch.unique(w).numel() <= 2 ** bits
        assert w.shape == art["state_dict"][k].shape
        # every weight sits on its nearest centroid
        c = encoded[k]["codebook"]
        err = (art["state_dict"][k].flatten()[:, None] - c[None]).abs()
        assert torch.equal(w.flatten(), c[err.argmin(1)])
        n = w.numel()
        assert entry_bytes(encoded[k]) == math.ceil(n * bits / 8) + 4 * c.numel()
    size = save_compact(shared, encoded, tmp_path / "s.pt")
    back = load_compact(tmp_path / "s.pt")
    assert all(torch.equal(back["state_dict"][k], v) for k, v in shared["state_dict"].items())
    build_model(back)                           # loads into a Darknet as an artifact
    payload = sum(entry_bytes(e) for e in encoded.values())
    dense = sum(art["state_dict"][k].numel() * 4 for k in keys)
    assert payload < dense * bits / 32 + 4 * 2 ** bits * len(keys) + 1
    assert size >= payload


def test_sharing_errors(art, tmp_path):
    with pytest.raises(YoloCompressError, match="bits must be 1..8"):
        share_weights(art, 9)
    not_compact = tmp_path / "a.pt"
    torch.save(art, not_compact)
    with pytest.raises(YoloCompressError, match="not a compact model file"):
        load_compact(not_compact)
    (tmp_path / "g.pt").write_bytes(b"garbage")
    with pytest.raises(YoloCompressError, match="not a compact model file"):
        load_compact(tmp_path / "g.pt")


@pytest.mark.parametrize("share", [0.1, 0.5, 0.9])
def test_unstructured_hits_the_share_exactly(art, tmp_path, share):
    pruned, encoded = magnitude_prune(art, share)
    keys = conv_weight_keys(art)
    before = torch.cat([art["state_dict"][k].flatten() for k in keys])
    after = torch.cat([pruned["state_dict"][k].flatten() for k in keys])
    assert (before != 0).all()                   # so every zero is a pruned weight
    assert int((after == 0).sum()) == round(share * before.numel())
    cut = after == 0
    assert before[cut].abs().max() <= before[~cut].abs().min()   # global, by magnitude
    assert torch.equal(after[~cut], before[~cut])
    others = [k for k in art["state_dict"] if k not in keys]
    assert all(torch.equal(pruned["state_dict"][k], art["state_dict"][k]) for k in others)
    save_compact(pruned, encoded, tmp_path / "p.pt")
    back = load_compact(tmp_path / "p.pt")
    assert all(torch.equal(back["state_dict"][k], pruned["state_dict"][k]) for k in keys)
    nnz = int((~cut).sum())
    assert sum(entry_bytes(e) for e in encoded.values()) == sum(
        math.ceil(art["state_dict"][k].numel() / 8) for k in keys) + 4 * nnz


def test_unstructured_share_out_of_range(art):
    with pytest.raises(YoloCompressError, match=r"share must be in \[0, 1\)"):
        magnitude_prune(art, 1.0)
