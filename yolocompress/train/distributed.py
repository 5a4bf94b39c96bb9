"""Process-group helpers for torchrun / DistributedDataParallel, and an epoch-seeded sampler.

Everything degrades to a single process when torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) is absent.
Only rank 0 writes files; hooks ask `is_main()`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

from ..errors import YoloCompressError

__all__ = ["DistInfo", "init_distributed", "is_dist", "get_rank", "get_world_size", "is_main",
           "barrier", "all_reduce_mean", "all_reduce_max", "wrap_ddp", "unwrap", "cleanup",
           "SeededRandomSampler"]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as e:
        raise YoloCompressError(f"environment variable {name}={value!r} is not an integer") from e


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join torchrun's process group (nccl on CUDA, else gloo) or describe a single process.

    `device`: auto (CUDA if available) | cpu | cuda | cuda:N. Under torchrun each rank uses
    cuda:LOCAL_RANK; the timeout is generous because rank 0 evaluates while the others wait.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise YoloCompressError(f"device '{device}' asked for but CUDA is not available")
    if world > 1:
        if use_cuda:
            if local >= torch.cuda.device_count():
                raise YoloCompressError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} "
                                        f"CUDA devices are visible")
            dev = torch.device("cuda", local)
            torch.cuda.set_device(dev)
        else:
            dev = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://",
                                    timeout=datetime.timedelta(seconds=timeout_s))
    elif use_cuda:
        dev = torch.device(device if device.startswith("cuda:") else "cuda")
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("mps" if device == "mps" else "cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    """True on rank 0 or without a process group: the process that writes files and logs."""
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of `tensor` over ranks (a new tensor; the input is unchanged)."""
    out = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max of `tensor` over ranks (a new tensor)."""
    out = tensor.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """The trained model in DDP when world_size > 1, else unchanged.

    Wrap only the model whose parameters are optimised: a distillation teacher is frozen and
    must never be wrapped (it has no gradients to reduce and would only add broadcasts).
    """
    if get_world_size() == 1:
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()


class SeededRandomSampler(DistributedSampler):
    """A sampler whose order is a function of (seed, epoch) only: `set_epoch(e)` before each epoch
    (the Trainer does) makes shuffling reproducible across a resume. Shards by rank when a process
    group is initialised, else yields the whole permutation (rank 0 of 1)."""

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(dataset, num_replicas=get_world_size() if world_size is None else world_size,
                         rank=get_rank() if rank is None else rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
