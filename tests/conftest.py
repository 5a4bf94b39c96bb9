"""Shared fixtures: paths of the shipped cfgs and a tiny cfg that uses every layer kind."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_CFG = FIXTURES / "tiny.cfg"
MODEL_CFGS = sorted((ROOT / "cfg" / "models").glob("*.cfg"))
PUBLISHED_CFGS = MODEL_CFGS + sorted((FIXTURES / "cfg").glob("*.cfg"))


def cfg_path(name: str) -> Path:
    for p in PUBLISHED_CFGS:
        if p.stem == name:
            return p
    pytest.skip(f"{name}.cfg is not in the repository")


# Tiny models run far faster on one thread than on torch's default pool on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
