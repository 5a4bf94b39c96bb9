"""ONNX Runtime as an inference backend for exported models (`export --format onnx`).

The one place that says how an ONNX Runtime session is set up (`session_options`): CPU provider,
`threads` intra-op threads (None: ONNX Runtime's default, one per core), one inter-op thread,
sequential execution, graph optimisation ORT_ENABLE_ALL (constant folding, Conv+activation and
Conv+Add fusion, the NCHWc blocked layout), and worker threads that sleep instead of spinning
between ops: on a CPU shared with other work, spinning made 2 threads twice as slow as 1
(yolov4-nano @256: 68 ms spinning vs 37 ms not, 35 ms with 1 thread; OpenCV DNN 37 ms).
`predict`, `eval` and the latency measurement all use it.

What an exported model needs to be scored like its artifact travels in the file's
`metadata_props` (`METADATA_KEYS`, written by `metadata_props`, read by `OnnxModel`): the class
names, the input size (H, W) and whether the input is letterboxed. `OnnxModel(path)(x)` maps a float
(B, 3, H, W) batch in [0, 1] to the decoded rows (B, N, 5+C) that `models.yolo.decode` gives for
the artifact, so `inference.detect_batch` runs both the same way.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import YoloCompressError

if TYPE_CHECKING:
    import torch

__all__ = ["METADATA_KEYS", "OnnxModel", "import_onnxruntime", "metadata_props", "session",
           "session_options"]

# metadata_props key -> what it holds (JSON text)
METADATA_KEYS = {
    "yolocompress.classes": "class names, a JSON list of strings",
    "yolocompress.input_size": "input [height, width] in pixels",
    "yolocompress.letterbox": "true if the input is letterboxed (the cfg's letter_box=1)",
}


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise YoloCompressError("onnxruntime is not installed (pip install 'yolocompress[onnx]')"
                                ) from e
    return onnxruntime


def session_options(threads: int | None = None):
    """The SessionOptions every session of this package uses (see the module docstring)."""
    ort = import_onnxruntime()
    if threads is not None and threads < 1:
        raise YoloCompressError(f"onnxruntime: threads must be >= 1, got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or 0
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def session(path: str | os.PathLike, threads: int | None = None):
    """A CPU InferenceSession of the ONNX file at `path` with `session_options(threads)`."""
    ort = import_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise YoloCompressError(f"{path}: no such ONNX file")
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise YoloCompressError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})"
                                ) from e


def metadata_props(names: Sequence[str], input_size: Sequence[int], letterbox: bool
                   ) -> dict[str, str]:
    """The metadata_props an export writes (keys: METADATA_KEYS)."""
    return {"yolocompress.classes": json.dumps(list(names)),
            "yolocompress.input_size": json.dumps([int(v) for v in input_size]),
            "yolocompress.letterbox": json.dumps(bool(letterbox))}


def _read_metadata(path: Path, meta: dict[str, str]) -> tuple[list[str], tuple[int, int], bool]:
    missing = [k for k in METADATA_KEYS if k not in meta]
    if missing:
        raise YoloCompressError(f"{path}: no '{missing[0]}' in its metadata_props: not exported by "
                                f"`yolocompress export --format onnx` (re-export the artifact)")
    try:
        names, size, letterbox = (json.loads(meta[k]) for k in METADATA_KEYS)
    except json.JSONDecodeError as e:
        raise YoloCompressError(f"{path}: metadata_props are not valid JSON ({e})") from e
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise YoloCompressError(f"{path}: metadata 'yolocompress.classes' must be a non-empty list "
                                f"of names")
    if not (isinstance(size, list) and len(size) == 2
            and all(isinstance(v, int) and v > 0 for v in size)):
        raise YoloCompressError(f"{path}: metadata 'yolocompress.input_size' must be [height, "
                                f"width], got {size}")
    if not isinstance(letterbox, bool):
        raise YoloCompressError(f"{path}: metadata 'yolocompress.letterbox' must be true or false")
    return names, (size[0], size[1]), letterbox


class OnnxModel:
    """An exported model in ONNX Runtime: `names`, `input_size`, `letterbox` from its metadata
    (`names` given: its names must equal them); calling it maps a float (B, 3, H, W) batch at
    `input_size` to decoded rows (B, N, 5+C)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 names: Sequence[str] | None = None):
        self.path = Path(path)
        self.session = session(self.path, threads)
        meta: dict[str, Any] = self.session.get_modelmeta().custom_metadata_map
        self.names, self.input_size, self.letterbox = _read_metadata(self.path, meta)
        if names is not None and list(self.names) != list(names):
            raise YoloCompressError(f"{self.path}: model classes {self.names} differ from the "
                                    f"data set's {list(names)}")
        self.classes = len(self.names)
        self._input = self.session.get_inputs()[0].name

    def eval(self) -> OnnxModel:
        """Nothing to switch (an exported model is always in inference mode); as nn.Module.eval."""
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        if tuple(x.shape[-2:]) != self.input_size:
            raise YoloCompressError(f"{self.path}: exported for {self.input_size[0]}x"
                                    f"{self.input_size[1]} input, got {x.shape[-2]}x{x.shape[-1]} "
                                    f"(re-export at that size, or leave --img-size out)")
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {self._input: x})[0])
