"""Shared fixtures: paths of the shipped cfgs and a tiny cfg that uses every layer kind."""
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
TINY_CFG = FIXTURES / "tiny.cfg"
MODEL_CFGS = sorted((ROOT / "cfg" / "models").glob("*.cfg"))
PUBLISHED_CFGS = MODEL_CFGS + sorted((FIXTURES / "cfg").glob("*.cfg"))
# hand-written miniatures of yolov7 / yolov3-tiny-prn / yolov4-sam structures (tests/test_kinds.py)
MINI_CFGS = sorted((FIXTURES / "cfg" / "mini").glob("*.cfg"))


def cfg_error(text: str, tmp_path: Path, name: str = "bad.cfg") -> str:
    """The one-line YoloCompressError message that reading cfg `text` (written to tmp_path/name)
    raises."""
    from yolocompress.errors import YoloCompressError
    from yolocompress.models.cfg import read_cfg

    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(YoloCompressError) as e:
        read_cfg(p)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


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


MINI_TRAIN = {"epochs": 2, "batch_size": 4, "nominal_batch": 8, "lr": 0.001, "burn_in": 2,
              "eval_interval": 1, "multi_scale": False}
# one epoch per stage, on the CPU: for tests that chain stages (pipeline, benchmarks)
CHAIN_TRAIN = {**MINI_TRAIN, "epochs": 1, "nominal_batch": 4, "device": "cpu"}


def make_mini(base: Path, train: dict | None = None, n_train: int = 12,
              sections: dict | None = None) -> Path:
    """Write an n_train/6-image demo set at 64 px (`base/demo`), its descriptor (`base/demo.yaml`)
    and an experiment on yolov4-nano (`base/exp.yaml`, runs under `base/runs`; `sections` replace
    or add config sections); returns `base`."""
    import yaml

    from yolocompress.data.synthetic import DEMO_CLASSES, generate_demo

    generate_demo(base / "demo", seed=3, n_train=n_train, n_val=6, img_size=64)
    (base / "demo.yaml").write_text(yaml.safe_dump({
        "format": "voc", "root": "demo", "train": ["demo/train"], "val": ["demo/val"],
        "names": list(DEMO_CLASSES)}))
    (base / "exp.yaml").write_text(yaml.safe_dump({
        "model": {"cfg": str(ROOT / "cfg/models/yolov4-nano.cfg"), "img_size": 64},
        "data": {"descriptor": "demo.yaml", "workers": 0},
        "train": {**(MINI_TRAIN if train is None else train), "out_dir": str(base / "runs")},
        "eval": {"batch_size": 6},
        # the chains here train stage 1 for an epoch or two: nothing to check against pruning
        # (tests/test_small_data.py tests the check)
        "sparse": {"check": 0.0},
        **(sections or {}),
    }))
    return base
