"""TrainStep alone: accumulation equals one big batch, AMP loss scale is undone before the step,
DDP no_sync on non-final micro-steps, NaN errors name the place and the term; the loss rule."""
from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from yolocompress.errors import YoloCompressError
from yolocompress.train.step import TrainStep, sum_terms

CPU = torch.device("cpu")


def net() -> nn.Module:
    torch.manual_seed(0)   # no BatchNorm: the micro-batch split does not change the gradient
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))


def mean_loss(model, batch):
    """Means over images, so equal micro-batches average to the big batch's loss."""
    out = model(batch[0])
    return {"sq": out.pow(2).mean(), "lin": 0.3 * out[:, 0].mean()}


def images(n: int = 6) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("init_scale", [None, 1024.0])
def test_accumulated_micro_batches_equal_one_big_batch(init_scale):
    x = images(6)
    big = net()
    big_opt = torch.optim.SGD(big.parameters(), lr=0.1, momentum=0.9)
    sum(mean_loss(big, (x,)).values()).backward()
    big_grads = [p.grad.clone() for p in big.parameters()]
    big_opt.step()

    model = net()
    step = TrainStep(model, mean_loss, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     device=CPU, accumulate=3)
    if init_scale is not None:   # a real (CPU) GradScaler: backward sees 1024 * loss / 3
        step.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    for k in range(3):
        step.forward_backward((x[2 * k:2 * k + 2],), sync=k == 2)
    scale = init_scale or 1.0
    for p, g in zip(model.parameters(), big_grads):   # still multiplied by the loss scale
        torch.testing.assert_close(p.grad, g * scale, rtol=1e-5, atol=1e-7 * scale)
    step.unscale()
    for p, g in zip(model.parameters(), big_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert step.apply() is False
    for p, q in zip(model.parameters(), big.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        assert p.grad is None   # zeroed for the next window


def test_grad_clip_bounds_the_step_norm():
    model = net()
    lr = 1.0
    step = TrainStep(model, mean_loss, torch.optim.SGD(model.parameters(), lr=lr), device=CPU,
                     grad_clip=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    step.forward_backward((images(2),))
    step.unscale()
    step.apply()
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert moved.norm().item() == pytest.approx(lr * 1e-3, rel=1e-4)   # plain SGD: |dw| = lr*|g|
    with pytest.raises(YoloCompressError, match="grad_clip must be > 0"):
        TrainStep(model, mean_loss, step.optimizer, device=CPU, grad_clip=0.0)
    with pytest.raises(YoloCompressError, match="accumulate must be >= 1"):
        TrainStep(model, mean_loss, step.optimizer, device=CPU, accumulate=0)


def test_amp_is_off_without_cuda():
    model = net()
    step = TrainStep(model, mean_loss, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU,
                     amp=True)
    assert not step.amp and not step.scaler.is_enabled()


def test_non_finite_loss_names_place_and_term_before_backward():
    model = net()
    step = TrainStep(model, lambda m, b: {**mean_loss(m, b), "obj": torch.tensor(float("nan"))},
                     torch.optim.SGD(model.parameters(), lr=0.1), device=CPU)
    with pytest.raises(YoloCompressError,
                       match=r"^non-finite loss in epoch 2/3 \(micro-batch 1/4\): obj=nan$"):
        step.forward_backward((images(2),), where="epoch 2/3 (micro-batch 1/4)")
    assert all(p.grad is None for p in model.parameters())   # no backward on a bad loss
    assert step.last_losses["obj"] != step.last_losses["obj"]  # the values are kept (nan)

    big = torch.tensor(3e38)   # finite terms whose float32 sum overflows
    over = TrainStep(model, lambda m, b: {"a": big + 0 * m(b[0]).sum(), "b": big},
                     step.optimizer, device=CPU)
    with pytest.raises(YoloCompressError, match=r"^non-finite loss: sum=inf \(terms overflow\)$"):
        over.forward_backward((images(2),))


def test_sum_terms_hand_computed():
    total, logged = sum_terms({"a": torch.tensor(1.5), "b": torch.tensor([2.0]),
                               "loss": torch.tensor(100.0)})   # a criterion's own sum: ignored
    assert total.item() == 3.5 and logged == {"a": 1.5, "b": 2.0, "loss": 3.5}
    total, logged = sum_terms({"loss": torch.tensor(2.25)})      # ... unless it is the only term
    assert total.item() == 2.25 and logged == {"loss": 2.25}
    with pytest.raises(YoloCompressError, match="non-empty dict of loss terms, got Tensor"):
        sum_terms(torch.tensor(1.0))
    with pytest.raises(YoloCompressError, match="non-empty dict of loss terms, got dict"):
        sum_terms({})
    with pytest.raises(YoloCompressError, match=r"loss term 'box' must be a scalar tensor, got \(2,\)"):
        sum_terms({"box": torch.ones(2)})
    with pytest.raises(YoloCompressError, match="loss term 'box' must be a scalar tensor, got float"):
        sum_terms({"box": 1.0})


@pytest.fixture
def one_process_group():
    """A gloo group of one process, so DistributedDataParallel can be built in this test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ddp_reduces_only_on_the_final_micro_step(one_process_group):
    model = net()
    ddp = nn.parallel.DistributedDataParallel(model)
    synced: list[bool] = []

    def crit(m, batch):   # runs inside no_sync() when the step does not reduce
        synced.append(m.require_backward_grad_sync)
        return mean_loss(m, batch)

    step = TrainStep(ddp, crit, torch.optim.SGD(model.parameters(), lr=0.1), device=CPU,
                     accumulate=3)
    x = images(6)
    for k in range(3):
        step.forward_backward((x[2 * k:2 * k + 2],), sync=k == 2)
    assert synced == [False, False, True]
    reference = copy.deepcopy(net())
    sum(mean_loss(reference, (x,)).values()).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
