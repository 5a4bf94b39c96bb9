"""Least-squares reconstruction (compress.reconstruct): exact where the pruned channels are linear
combinations of kept ones, a no-op on an unpruned model, the intercept in the BN's running mean,
outputs closer to the reference after it, and errors on a mismatched pair."""
from __future__ import annotations

import pytest
import torch

from yolocompress.compress import reconstruct as rc
from yolocompress.compress.graph import analyze
from yolocompress.compress.prune_search import build_pruned
from yolocompress.compress.recalibrate import Calibration, recalibrate_bn
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.darknet import Darknet

_HEAD = "[yolo]\nmask=0,1,2\nanchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n"
_LINEAR = ("[net]\nwidth=16\nheight=16\nchannels=3\n"
           "[convolutional]\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=linear\n"
           "[convolutional]\nfilters=21\nsize=3\nstride=1\npad=1\nactivation=linear\n" + _HEAD)
_RESIDUAL = ("[net]\nwidth=32\nheight=32\nchannels=3\n"
             "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
             "[convolutional]\nbatch_normalize=1\nfilters=16\nsize=3\nstride=2\npad=1\nactivation=mish\n"
             "[convolutional]\nbatch_normalize=1\nfilters=8\nsize=1\nstride=1\npad=1\nactivation=mish\n"
             "[convolutional]\nbatch_normalize=1\nfilters=16\nsize=3\nstride=1\npad=1\nactivation=mish\n"
             "[shortcut]\nfrom=-3\nactivation=linear\n"
             "[route]\nlayers=-1,-4\n"
             "[convolutional]\nfilters=21\nsize=1\nstride=1\npad=1\nactivation=linear\n" + _HEAD)


def _calib(size: int, batches=(4, 4), seed=1) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    t = torch.tensor([[0, 1, 4.0, 4.0, 10.0, 12.0]])
    return Calibration(tuple((torch.randint(0, 256, (n, 3, size, size), generator=g,
                                            dtype=torch.uint8), t) for n in batches))


def _outputs(model: Darknet, calib: Calibration) -> list[torch.Tensor]:
    with torch.no_grad():
        return [o for x, _ in calib.batches for o in model.eval()(x.float() / 255)]


def _distance(a, b) -> float:
    return float(sum(((u - v) ** 2).sum() for u, v in zip(a, b)))


def _residual_model() -> Darknet:
    torch.manual_seed(0)
    m = Darknet(parse_cfg(_RESIDUAL, source="r.cfg"))
    m.initialize()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.5)
                mod.bias.normal_(0, 0.2)
    return recalibrate_bn(m, _calib(32)).eval()


def test_pruned_channel_that_is_a_combination_of_kept_ones_is_reconstructed_exactly(monkeypatch):
    """conv0's channel 3 = 0.5 ch0 - 2 ch1 (weights and bias), linear activations: dropping it,
    the head conv refitted without ridge reproduces the reference's outputs exactly, with
    W'[:, c] = W[:, c] + a_c W[:, 3] by hand."""
    monkeypatch.setattr(rc, "RIDGE", 0.0)
    torch.manual_seed(0)
    ref = Darknet(parse_cfg(_LINEAR, source="l.cfg")).eval()
    with torch.no_grad():
        c0 = ref.layers[0].conv
        c0.weight[3] = 0.5 * c0.weight[0] - 2 * c0.weight[1]
        c0.bias[3] = 0.5 * c0.bias[0] - 2 * c0.bias[1]
    keep = {0: [0, 1, 2]}
    pruned = build_pruned(ref.blocks, ref.state_dict(), keep, compensate=False)
    calib = _calib(16)
    assert _distance(_outputs(ref, calib), _outputs(pruned, calib)) > 1.0
    records = rc.reconstruct(ref, pruned, keep, calib, progress=False)
    assert [r["layer"] for r in records] == [0, 1]
    assert not records[0]["refitted"] and records[0]["error_before"] < 1e-10   # kept rows exact
    assert records[1]["refitted"] and records[1]["error_before"] > 0.01
    assert records[1]["error_after"] < 1e-8
    assert records[1]["rows"] == 2 * 4 * 16 * 16 and records[1]["features"] == 3 * 9
    w = ref.layers[1].conv.weight
    by_hand = w[:, :3].clone()
    by_hand[:, 0] += 0.5 * w[:, 3]
    by_hand[:, 1] -= 2 * w[:, 3]
    assert torch.allclose(pruned.layers[1].conv.weight, by_hand, atol=1e-4)
    assert torch.allclose(pruned.layers[1].conv.bias, ref.layers[1].conv.bias, atol=1e-4)
    assert _distance(_outputs(ref, calib), _outputs(pruned, calib)) < 1e-6


def test_unpruned_model_is_left_as_it_is():
    ref = _residual_model()
    copy = Darknet(ref.blocks)
    copy.load_state_dict(ref.state_dict())
    records = rc.reconstruct(ref, copy, {}, _calib(32), progress=False)
    assert len(records) == 5 and not any(r["refitted"] for r in records)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in copy.state_dict().items())


def test_pruned_residual_model_gets_closer_to_its_reference_on_unseen_images():
    ref = _residual_model()
    keep = {c: list(range(0, ref.blocks[c + 1].get_int("filters"), 2))
            for c in analyze(ref.blocks).prunable}
    pruned = build_pruned(ref.blocks, ref.state_dict(), keep, compensate=False)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    unseen = _calib(32, (6,), seed=7)
    far = _distance(_outputs(ref, unseen), _outputs(pruned, unseen))
    records = rc.reconstruct(ref, pruned, keep, _calib(32), progress=False)
    assert sum(r["refitted"] for r in records) >= 3
    assert all(r["error_after"] <= r["error_before"] for r in records)
    assert _distance(_outputs(ref, unseen), _outputs(pruned, unseen)) < 0.8 * far
    assert all(torch.equal(v, ref_state[k]) for k, v in ref.state_dict().items())  # untouched
    # a refitted BN conv moved its intercept into the running mean; the variance is the
    # reference's on the kept channels
    i = next(r["layer"] for r in records if r["refitted"] and pruned.layers[r["layer"]].bn_enabled)
    sel = torch.tensor(keep.get(i, range(ref.layers[i].conv.out_channels)))
    assert torch.equal(pruned.layers[i].bn.running_var, ref.layers[i].bn.running_var[sel])
    assert not torch.equal(pruned.layers[i].bn.running_mean, before[f"layers.{i}.bn.running_mean"])
    assert not pruned.training and not ref.training


def test_mismatched_models_are_errors():
    ref = _residual_model()
    keep = {0: [0, 1, 2, 3]}
    pruned = build_pruned(ref.blocks, ref.state_dict(), keep, compensate=False)
    with pytest.raises(YoloCompressError, match="layer 0 keeps 2 channels but the pruned conv "
                                                "has 4"):
        rc.reconstruct(ref, pruned, {0: [0, 1]}, _calib(32), progress=False)
    other = Darknet(parse_cfg(_LINEAR, source="l.cfg"))
    with pytest.raises(YoloCompressError, match="the pruned model has 3 layers, its reference 8"):
        rc.reconstruct(ref, other, {}, _calib(32), progress=False)
