"""Two-process DDP (gloo on CPU) through torchrun: ranks stay identical, only rank 0 writes.

Run as a script (`torchrun ... tests/test_ddp.py OUT`) this file is the worker; under pytest it
launches that worker.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from yolocompress.artifacts import load_artifact


def _worker(out: Path) -> None:
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader

    from test_engine import CLASSES, TinySet, collate, criterion, tiny_model
    from yolocompress.artifacts import artifact_from_model
    from yolocompress.train.distributed import (SeededRandomSampler, cleanup, init_distributed,
                                                is_main, wrap_ddp)
    from yolocompress.train.engine import Trainer
    from yolocompress.train.hooks import CheckpointHook
    from yolocompress.train.optim import build_optimizer

    info = init_distributed("cpu")
    assert info.world_size == 2 and is_main() == (info.rank == 0) == info.is_main
    model = tiny_model(seed=info.rank)   # different init per rank: DDP must broadcast rank 0's
    torch.save(model.state_dict(), out / f"init_rank{info.rank}.pt")
    ds = TinySet(8, noise=False)
    loader = DataLoader(ds, batch_size=2, sampler=SeededRandomSampler(ds, seed=1), collate_fn=collate)
    ddp = wrap_ddp(model, info.device)
    ckpt = CheckpointHook(out / f"ckpt_rank{info.rank}",
                          lambda m, mets: artifact_from_model(m, "baseline", CLASSES, metrics=mets))
    t = Trainer(ddp, criterion, build_optimizer(model, lr=0.05), loader, epochs=1, device=info.device,
                hooks=[ckpt], progress=False)
    t.train()
    torch.save({"params": {k: p.detach() for k, p in model.named_parameters()}, "iter": t.iter,
                "indices": [int(i) for i in loader.sampler]}, out / f"final_rank{info.rank}.pt")
    cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", __file__, str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    r0, r1 = (torch.load(tmp_path / f"final_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iter"] == r1["iter"] == 2                     # 8 images / 2 ranks / batch 2
    assert set(r0["indices"]).isdisjoint(r1["indices"])      # each rank saw its own shard
    init0, init1 = (torch.load(tmp_path / f"init_rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(init0["layers.0.conv.weight"], init1["layers.0.conv.weight"])
    for k, p in r0["params"].items():
        assert torch.equal(p, r1["params"][k]), k            # synced gradients, same updates
    assert not torch.equal(r0["params"]["layers.0.conv.weight"], init0["layers.0.conv.weight"])
    # only rank 0 writes files
    assert not (tmp_path / "ckpt_rank1").exists()
    last = load_artifact(tmp_path / "ckpt_rank0" / "last.pt")
    assert last["train_state"]["iter"] == 2
    for k, p in r0["params"].items():
        assert torch.equal(last["train_state"]["model"][k], p), k


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
