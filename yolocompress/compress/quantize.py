"""Stage 4: static INT8 quantization of an exported ONNX model in ONNX Runtime (QDQ format).

`quantize_onnx(fp32, out, calib, section)` writes an INT8 copy of an `export --format onnx` file:
uint8 activations with ranges calibrated on the fixed `Calibration` subset of training images
(the project's letterbox / resize, as evaluation), int8 weights (per output channel), and in float
what holds the mAP (`float_nodes`): the box decode after the detection convs (quantized, its final
Concat puts pixel boxes and probabilities in one 8-bit range; the INT8 detection convs' outputs
enter it dequantized), with keep_float "detect" those convs too, and a maxpool's Pad with -inf
(odd padding; `export` writes even padding into the MaxPool), which no 8-bit scale holds.
The detection convs are found in the graph, not by name: the convs from which no other conv is
reached (the convs feeding the [yolo] layers); the decode is every node downstream of them.
`ops` "conv" runs only the convs in INT8 (activations float between them), "all" every op ONNX
Runtime quantizes. `activation` "lut" then makes each mish / leaky ReLU after an INT8 conv a
256-entry table lookup on its uint8 codes (quantize_lut.py), "float" leaves it float. `reduce_range` (7-bit weights) is used where the CPU lacks VNNI
(`cpu_has_vnni`, said in one line). The metadata_props travel along, so `eval` / `predict` score
the INT8 file like the FP32 one.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import platform
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ..errors import YoloCompressError
from ..fileio import atomic_open, refuse_overwrite
from .quantize_lut import find_activations, lookup_activations
from .recalibrate import Calibration

__all__ = ["METHODS", "CalibrationReader", "cpu_has_vnni", "float_nodes", "onnx_precision",
           "quantize_onnx", "resolve_reduce_range"]

METHODS = ("minmax", "entropy", "percentile")   # QuantizeConfig.method -> CalibrationMethod
_VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def _import_quantization():
    try:
        import onnx
        quantization = importlib.import_module("onnxruntime.quantization")
    except ImportError as e:
        raise YoloCompressError(f"{e.name or 'onnx'} is not installed (pip install "
                                f"'yolocompress[onnx]')") from e
    return onnx, quantization


def cpu_has_vnni(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether an x86 CPU has 8-bit dot-product instructions (a VNNI flag in `cpuinfo`); None where
    that cannot be read. Non-x86 CPUs count as having them (reduce_range is an x86 saturation fix)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.partition(":")[2].split() for line in text.splitlines()
                  if line.startswith("flags")), None)
    return None if flags is None else any(f in flags for f in _VNNI_FLAGS)


def onnx_precision(path: str | Path) -> str:
    """"int8" if the ONNX file at `path` has quantized ops (QDQ or QLinear*), else "fp32"."""
    onnx, _ = _import_quantization()
    try:
        ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    except Exception as e:  # onnx raises DecodeError / its own types for a bad file
        raise YoloCompressError(f"{path}: not a readable ONNX file ({e})") from e
    return "int8" if ops & {"QuantizeLinear", "QLinearConv", "ConvInteger"} else "fp32"


def resolve_reduce_range(setting: bool | None, vnni: bool | None) -> tuple[bool, str]:
    """(reduce_range, the line that says why) for the config's setting (None: auto)."""
    if setting is not None:
        return setting, f"reduce_range {'on' if setting else 'off'} (quantize.reduce_range)"
    if vnni:
        return False, "CPU has VNNI: full 8-bit weights (reduce_range off)"
    if vnni is None:
        return True, ("cannot tell whether this CPU has VNNI (no /proc/cpuinfo flags): 7-bit "
                      "weights (reduce_range on), the safe side")
    return True, "CPU has no VNNI: 7-bit weights (reduce_range on) against int16 saturation"


def _nonfinite_constants(model, onnx) -> set[str]:
    """Names of the constant float tensors (initializers, Constant nodes) holding inf or nan."""
    from onnx import numpy_helper

    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], a.t) for n in model.graph.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    return {name for name, t in tensors if t.data_type in (onnx.TensorProto.FLOAT,
                                                           onnx.TensorProto.DOUBLE)
            and not np.isfinite(numpy_helper.to_array(t)).all()}


def float_nodes(model, keep_detect: bool = False) -> dict[str, list[str]]:
    """The nodes of an exported ONNX graph that stay in float, by kind (node names):
    "detect": the detection convs, the Conv nodes no other Conv is reached from;
    "decode": every node reading (directly or not) one of their outputs;
    "unbounded": a Pad with an infinite value (the maxpool's -inf padding) and its readers, whose
    range no 8-bit scale holds; "keep": the union of decode, unbounded and, with `keep_detect`,
    detect -- what `quantize_onnx` excludes."""
    import onnx

    nodes = list(model.graph.node)             # ONNX graphs are topologically sorted
    unnamed = [n.op_type for n in nodes if not n.name]
    if unnamed:
        raise YoloCompressError(f"the ONNX graph has unnamed {unnamed[0]} nodes: cannot exclude "
                                f"them from quantization (re-export with `yolocompress export`)")
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for t in n.input:
            consumers.setdefault(t, []).append(i)
    reaches_conv = [False] * len(nodes)
    for i in range(len(nodes) - 1, -1, -1):
        reaches_conv[i] = any(nodes[j].op_type == "Conv" or reaches_conv[j]
                              for t in nodes[i].output for j in consumers.get(t, ()))
    detect = [i for i, n in enumerate(nodes) if n.op_type == "Conv" and not reaches_conv[i]]
    if not detect:
        raise YoloCompressError("the ONNX graph has no Conv layers: nothing to quantize")
    tainted = {t for i in detect for t in nodes[i].output}
    decode = []
    for i, n in enumerate(nodes):
        if i not in detect and any(t in tainted for t in n.input):
            decode.append(n.name)
            tainted.update(n.output)
    infinite = _nonfinite_constants(model, onnx)
    pads = [n for n in nodes if n.op_type == "Pad" and any(t in infinite for t in n.input)]
    unbounded = [n.name for n in pads] + [nodes[j].name for n in pads
                                          for j in consumers.get(n.output[0], ())]
    out = {"detect": [nodes[i].name for i in detect], "decode": decode, "unbounded": unbounded}
    out["keep"] = list(dict.fromkeys(decode + unbounded + (out["detect"] if keep_detect else [])))
    return out


@contextlib.contextmanager
def _quiet():
    """quantize_static's advice to pre-process (root-logger warnings) and numpy's divide warnings
    on the float tensors it computes ranges for and then leaves unquantized."""
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        logging.disable(logging.NOTSET)


class CalibrationReader:
    """onnxruntime's CalibrationDataReader over a `Calibration`: one float [0, 1] image per call
    (equal shapes: the histogram methods stack them, and a short last batch breaks that)."""

    def __init__(self, calib: Calibration, input_name: str):
        self._batches = [image[None] for b in calib.batches for image in b[0]]
        self._name = input_name
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._batches):
            return None
        images = self._batches[self._next]
        self._next += 1
        return {self._name: np.ascontiguousarray(images.numpy(), dtype=np.float32) / 255}

    def rewind(self) -> None:
        self._next = 0


def quantize_onnx(fp32: str | Path, out: str | Path, calib: Calibration, section) -> dict:
    """Write the INT8 model of the exported `fp32` file to `out` (atomically) with the
    `QuantizeConfig` `section`; returns what was done (method, images, reduce_range and why,
    the float nodes, the detection convs, with activation "lut" the number of activations made
    table lookups, in total and per kind (0: the model has none that can be), sizes in bytes)."""
    onnx, q = _import_quantization()
    fp32, out = Path(fp32), Path(out)
    refuse_overwrite([out], [fp32])
    if calib.images < 1:
        raise YoloCompressError(f"{fp32}: no calibration images: activation ranges cannot be set")
    from ..onnx_backend import OnnxModel
    model_info = OnnxModel(fp32)               # a loadable file of ours (metadata), else one line
    if calib.batches[0][0].shape[-2:] != tuple(model_info.input_size):
        raise YoloCompressError(f"{fp32}: exported for {model_info.input_size} input, calibration "
                                f"images are {tuple(calib.batches[0][0].shape[-2:])}")
    proto = onnx.load(str(fp32))
    floats = float_nodes(proto, section.keep_float == "detect")
    reduce_range, why = resolve_reduce_range(section.reduce_range, cpu_has_vnni())
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[section.method]
    extra = {"CalibPercentile": section.percentile} if section.method == "percentile" else {}
    # an infinite tensor must not even be calibrated (the histogram methods fail on it): leave
    # the op types of the unbounded nodes (Pad, MaxPool: odd Darknet padding) out entirely
    skip = {n.op_type for n in proto.graph.node if n.name in set(floats["unbounded"])}
    # activation "lut": the activations stay out of quantize_static (with ops "all" it would put
    # Q/DQ inside the mish chain) and become table lookups after it
    lut = [n.name for a in find_activations(proto.graph, floats["keep"]) for n in a.nodes] \
        if section.activation == "lut" else []
    op_types = ["Conv"] if section.ops == "conv" else None
    if skip and op_types is None:     # quantize_static's own default list, less those
        from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry
        op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - skip)
    reader = CalibrationReader(calib, model_info.session.get_inputs()[0].name)
    with tempfile.TemporaryDirectory(prefix="yolocompress-quant-") as tmp:
        tmp_out = Path(tmp) / "int8.onnx"
        try:
            with _quiet():
                q.quantize_static(
                    str(fp32), str(tmp_out), reader, quant_format=q.QuantFormat.QDQ,
                    per_channel=section.per_channel, reduce_range=reduce_range,
                    activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                    nodes_to_exclude=floats["keep"] + lut, op_types_to_quantize=op_types,
                    calibrate_method=method, extra_options=extra)
        except (ValueError, RuntimeError) as e:
            raise YoloCompressError(f"{fp32}: ONNX Runtime cannot quantize it "
                                    f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                                    ) from e
        int8 = onnx.load(str(tmp_out))
    looked_up = lookup_activations(int8, floats["keep"]) if section.activation == "lut" else {}
    onnx.helper.set_model_props(int8, {p.key: p.value for p in proto.metadata_props})
    with atomic_open(out, "wb") as f:
        f.write(int8.SerializeToString())
    return {"method": section.method, "calibration_images": calib.images,
            "per_channel": section.per_channel, "ops": section.ops,
            "keep_float": section.keep_float, "activation": section.activation,
            "lut_activations": sum(looked_up.values()) if looked_up else None,
            "lut_by_kind": looked_up, "reduce_range": reduce_range,
            "reduce_range_why": why, "float_nodes": len(floats["keep"]),
            "detect_convs": floats["detect"], "fp32_bytes": fp32.stat().st_size,
            "int8_bytes": out.stat().st_size}
