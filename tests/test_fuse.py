"""BatchNorm folding: the fused copy computes what the model computes in eval mode."""
import torch

from yolocompress.models.cfg import read_cfg
from yolocompress.models.darknet import ConvLayer, Darknet
from yolocompress.models.fuse import fuse_batchnorm

from conftest import ROOT, TINY_CFG


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 2 - 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.3)


def test_fused_equals_eval_model_and_leaves_the_original_alone():
    for cfg, size in ((TINY_CFG, 32), (ROOT / "cfg/models/yolov4-nano.cfg", 64)):
        torch.manual_seed(0)
        model = Darknet(read_cfg(cfg))
        _randomise_bn(model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fused = fuse_batchnorm(model)
        x = torch.rand(2, 3, size, size)
        with torch.no_grad():
            ref = model.eval()(x)
            out = fused(x)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        assert not any(".bn." in k for k in fused.state_dict())
        assert all(not m.bn_enabled for m in fused.layers if isinstance(m, ConvLayer))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert any(m.bn_enabled for m in model.layers if isinstance(m, ConvLayer))
