"""Calibration passes (compress.recalibrate): BN recalibration is the cumulative average of the
batch statistics, the subset is fixed, the loss and BN-Taylor sums agree with hand computations,
and none of them leaves the model changed beyond what it promises."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from yolocompress.compress.recalibrate import (Calibration, calib_loss, gamma_gradients,
                                               recalibrate_bn)
from yolocompress.config import load_config
from yolocompress.data.dataset import DetectionDataset
from yolocompress.errors import YoloCompressError
from yolocompress.models.cfg import parse_cfg
from yolocompress.models.darknet import Darknet
from yolocompress.train.loss import YoloLoss
from yolocompress.train.run import load_data

from conftest import make_mini

_CFG = ("[net]\nwidth=32\nheight=32\nchannels=3\n"
        "[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\nstride=1\npad=1\nactivation=leaky\n"
        "[convolutional]\nbatch_normalize=1\nfilters=3\nsize=1\nstride=1\npad=1\nactivation=mish\n"
        "[convolutional]\nfilters=21\nsize=1\nstride=1\npad=1\nactivation=linear\n"
        "[yolo]\nmask=0,1,2\nanchors=4,5, 8,10, 12,9\nclasses=2\nnum=3\n")


def _model():
    torch.manual_seed(0)
    m = Darknet(parse_cfg(_CFG, source="t.cfg"))
    m.initialize()
    return m.eval()


def _calib(sizes=(3, 5)):
    g = torch.Generator().manual_seed(1)
    targets = torch.tensor([[0, 1, 4.0, 4.0, 20.0, 24.0]])
    return Calibration(tuple((torch.randint(0, 256, (n, 3, 32, 32), generator=g,
                                            dtype=torch.uint8), targets) for n in sizes))


def test_recalibration_is_the_mean_of_the_batch_statistics():
    model, cal = _model(), _calib()
    bn0 = model.layers[0].bn
    momentum = bn0.momentum
    with torch.no_grad():
        outs = [model.layers[0].conv(x.float() / 255) for x, _ in cal.batches]
    want_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    want_var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(1, unbiased=True)
                            for o in outs]).mean(0)
    assert recalibrate_bn(model, cal) is model
    assert torch.allclose(bn0.running_mean, want_mean, atol=1e-6)
    assert torch.allclose(bn0.running_var, want_var, atol=1e-6)
    assert not torch.allclose(want_var, torch.ones(4))               # the stored ones changed
    assert bn0.momentum == momentum and not model.training            # both restored
    assert all(p.grad is None for p in model.parameters())
    again = recalibrate_bn(_model(), cal)                             # deterministic, no history
    assert torch.equal(again.layers[1].bn.running_var, model.layers[1].bn.running_var)


def test_calib_loss_is_the_image_weighted_mean_of_the_loss():
    model, cal = _model(), _calib()
    loss = YoloLoss(model.heads)
    with torch.no_grad():
        per = [float(loss(model(x.float() / 255), t, (32, 32))["loss"]) for x, t in cal.batches]
    assert calib_loss(model, cal) == pytest.approx((3 * per[0] + 5 * per[1]) / 8, rel=1e-6)
    assert not model.training


def test_gamma_gradients_sum_abs_gamma_times_grad_over_batches():
    model, cal = _model(), _calib()
    stats = model.layers[0].bn.running_mean.clone()
    want = np.zeros(3)
    loss = YoloLoss(model.heads)
    for x, t in cal.batches:
        model.zero_grad()
        loss(model(x.float() / 255), t, (32, 32))["loss"].backward()
        g = model.layers[1].bn.weight
        want += (g * g.grad).abs().detach().double().numpy()
    model.zero_grad(set_to_none=True)
    got = gamma_gradients(model, cal, [0, 1])
    assert set(got) == {0, 1} and np.allclose(got[1], want, rtol=1e-5) and (got[1] > 0).all()
    assert torch.equal(model.layers[0].bn.running_mean, stats)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(YoloCompressError, match="conv 2 has no BatchNorm"):
        gamma_gradients(model, cal, [2])


def test_calibration_subset_is_evenly_spaced_and_read_without_augmentation(tmp_path):
    config = load_config(make_mini(tmp_path) / "exp.yaml")
    train = load_data(config).train
    cal = Calibration.from_records(train, 4, 64, letterbox=False, batch_size=3)
    assert [b[0].shape[0] for b in cal.batches] == [3, 1] and cal.images == 4
    picked = [train[i] for i in (0, 4, 7, 11)]           # linspace(0, 11, 4), rounded
    ds = DetectionDataset(picked, 64, augment=None)
    assert torch.equal(cal.batches[1][0][0], ds[3][0])
    assert torch.equal(cal.batches[0][0][1], ds[1][0])
    assert cal.head(2).images == 3 and cal.head(100).images == 4
    assert Calibration.from_records(train, 100, 64, False).images == 12
    with pytest.raises(YoloCompressError, match="at least one image"):
        Calibration.from_records(train, 0, 64, False)
