"""`yolocompress quantize --config X.yaml [--from MODEL] [--out INT8.onnx]`: an artifact
(exported to ONNX first, kept as `--fp32`) or an exported .onnx -> its INT8 ONNX model
(quantize.py), calibrated on the experiment's training split with its `quantize` section.
Defaults: runs/<name>/distilled/best.pt -> runs/<name>/quantized/model-{int8,fp32}.onnx.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from ..config import Config
from ..data.descriptor import load_descriptor, load_split
from ..errors import YoloCompressError
from ..fileio import refuse_overwrite
from .quantize import quantize_onnx
from .recalibrate import Calibration

__all__ = ["command", "quantize_model"]


def quantize_model(config: Config, source: str | Path, out: str | Path,
                   fp32_out: str | Path | None = None) -> dict:
    """INT8 ONNX of `source` (an artifact .pt or an exported .onnx) at `out`; an artifact is
    exported to `fp32_out` (a temp file if None) first. Returns quantize_onnx's record."""
    from ..onnx_backend import OnnxModel

    source, out = Path(source), Path(out)
    refuse_overwrite([out, *([fp32_out] if fp32_out else [])], [source])
    if not source.is_file():
        raise YoloCompressError(f"{source}: no such file")
    desc = load_descriptor(config.require_file("data.descriptor"))
    train = load_split(desc, "train", strict=config.data.strict)
    section = config.quantize
    with tempfile.TemporaryDirectory(prefix="yolocompress-fp32-") as tmp:
        if source.suffix.lower() == ".onnx":
            fp32 = source
        else:
            from ..artifacts import load_parent
            from ..export import export_onnx
            art = load_parent(source, desc.names, role="model")
            fp32 = export_onnx(art, fp32_out or Path(tmp) / "fp32.onnx", inputs=[source])
        model = OnnxModel(fp32)
        if list(model.names) != list(desc.names):
            raise YoloCompressError(f"{source}: model classes {model.names} differ from the data "
                                    f"set's {list(desc.names)}")
        calib = Calibration.from_records(train, section.calibration_images, model.input_size[0],
                                         model.letterbox, config.eval.batch_size)
        return quantize_onnx(fp32, out, calib, section)


def command(config: Config, args) -> Path:
    """The `quantize` sub-command; an existing --out is replaced only with --force."""
    from ..train.run import stage_dir

    source = Path(args.from_artifact or stage_dir(config, "distilled") / "best.pt")
    out = Path(args.out or stage_dir(config, "quantized") / "model-int8.onnx")
    fp32 = None if source.suffix.lower() == ".onnx" else Path(
        args.fp32 or out.with_name("model-fp32.onnx"))
    for path in (out, fp32):
        if path is not None and path.exists() and not args.force:
            raise YoloCompressError(f"{path}: exists; --force replaces it")
    rec = quantize_model(config, source, out, fp32)
    print(rec["reduce_range_why"])
    print(f"calibrated on {rec['calibration_images']} training images ({rec['method']}); kept in "
          f"float: {rec['float_nodes']} nodes (the decode after "
          f"{', '.join(rec['detect_convs'])}"
          f"{' and those convs' if rec['keep_float'] == 'detect' else ''})")
    print(f"wrote {out}: {rec['int8_bytes'] / 2 ** 20:.2f} MiB"
          + (f" (FP32 {fp32}: {rec['fp32_bytes'] / 2 ** 20:.2f} MiB)" if fp32 else ""))
    return out
