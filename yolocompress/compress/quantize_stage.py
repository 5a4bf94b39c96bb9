"""`yolocompress quantize --config X.yaml [--from MODEL] [--out INT8.onnx]`: an artifact
(exported to ONNX first, kept as `--fp32`) or an exported .onnx -> its INT8 ONNX model
(quantize.py), calibrated on the experiment's training split with its `quantize` section.
Defaults: the pipeline's recovered model (runs/<name>/finetuned/best.pt, or distilled/ with
`pipeline.recovery: distill`) -> runs/<name>/quantized/model-{int8,fp32}.onnx.

The pipeline step (`pipeline.quantize: true`) writes those two files from the recovered model,
then metrics.json (written last: the stage's inputs and both files' sha256), so the one skip rule
(inputs.reuse_complete, with model-int8.onnx as the stage's artifact) applies as to a .pt stage,
and a complete stage whose files are not the ones it recorded is an error, never reused.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..artifacts import file_sha256
from ..config import Config
from ..data.descriptor import load_descriptor, load_split
from ..errors import YoloCompressError
from ..fileio import atomic_open, make_dir, refuse_overwrite, remove_stale_temps
from ..inputs import reuse_complete, stage_inputs
from ..stages import recovered_stage
from .quantize import cpu_has_vnni, quantize_onnx, resolve_reduce_range
from .recalibrate import Calibration

__all__ = ["FP32_NAME", "INT8_NAME", "command", "pipeline_step", "quantize_inputs",
           "quantize_model"]

FP32_NAME, INT8_NAME = "model-fp32.onnx", "model-int8.onnx"    # stages.py report_files


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
        model = OnnxModel(fp32, names=desc.names)
        calib = Calibration.from_records(train, section.calibration_images, model.input_size[0],
                                         model.letterbox, config.eval.batch_size)
        return quantize_onnx(fp32, out, calib, section)


def command(config: Config, args) -> Path:
    """The `quantize` sub-command; an existing --out is replaced only with --force."""
    from ..train.run import stage_dir

    source = Path(args.from_artifact or stage_dir(config, recovered_stage(config)) / "best.pt")
    out = Path(args.out or stage_dir(config, "quantized") / INT8_NAME)
    fp32 = None if source.suffix.lower() == ".onnx" else Path(
        args.fp32 or out.with_name(FP32_NAME))
    for path in (out, fp32):
        if path is not None and path.exists() and not args.force:
            raise YoloCompressError(f"{path}: exists; --force replaces it")
    rec = quantize_model(config, source, out, fp32)
    print(rec["reduce_range_why"])
    print(f"calibrated on {rec['calibration_images']} training images ({rec['method']}); kept in "
          f"float: {rec['float_nodes']} nodes (the decode after "
          f"{', '.join(rec['detect_convs'])}"
          f"{' and those convs' if rec['keep_float'] == 'detect' else ''})")
    if rec["activation"] == "lut":
        print(f"activations as table lookups: {rec['lut_activations']} ("
              + ", ".join(f"{kind} {n}" for kind, n in rec["lut_by_kind"].items()) + ")"
              + ("" if rec["lut_activations"] else ": none after an INT8 conv, all stay float"))
    print(f"wrote {out}: {rec['int8_bytes'] / 2 ** 20:.2f} MiB"
          + (f" (FP32 {fp32}: {rec['fp32_bytes'] / 2 ** 20:.2f} MiB)" if fp32 else ""))
    return out


def quantize_inputs(config: Config, source: Path) -> dict:
    """The stage's inputs from the artifact at `source` (inputs.stage_inputs), with the
    reduce_range it resolves to on this CPU in place of null: the INT8 weights depend on it."""
    inputs = stage_inputs(config, "quantized", parent=file_sha256(source))
    inputs["config"]["quantize"]["reduce_range"] = resolve_reduce_range(
        config.quantize.reduce_range, cpu_has_vnni())[0]
    return inputs


def _check_files(folder: Path) -> None:
    """An error unless the complete stage's files are the ones its metrics.json recorded."""
    recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("files", {})
    for name in (FP32_NAME, INT8_NAME):
        path = folder / name
        if not path.is_file() or file_sha256(path) != recorded.get(name):
            why = "is missing" if not path.is_file() else "is not the file the stage wrote"
            raise YoloCompressError(f"{path}: {why} (sha256 in {folder / 'metrics.json'}); "
                                    f"--force redoes the quantized stage")


def pipeline_step(config: Config, paths: dict[str, Path], force: bool, latency_iters: int
                  ) -> Path:
    """The pipeline's stage 4: the recovered artifact -> runs/<name>/quantized/model-fp32.onnx
    and model-int8.onnx, then metrics.json; returns the INT8 file."""
    from ..train.run import stage_dir

    folder = stage_dir(config, "quantized")
    int8, fp32 = folder / INT8_NAME, folder / FP32_NAME
    source = Path(paths[recovered_stage(config)])
    inputs = quantize_inputs(config, source)
    if reuse_complete("quantized", int8, inputs, force):
        _check_files(folder)
        return int8
    make_dir(folder)
    remove_stale_temps(folder)
    (folder / "metrics.json").unlink(missing_ok=True)    # incomplete until the new one is written
    print(f"quantized: {source} -> {int8} ({config.quantize.calibration_images} calibration "
          f"images, {config.quantize.method})")
    rec = quantize_model(config, source, int8, fp32)
    with atomic_open(folder / "metrics.json", "w", encoding="utf-8") as f:
        json.dump({"stage": "quantized", "inputs": inputs,
                   "source": {"path": str(source), "sha256": inputs["parent"]},
                   "files": {name: file_sha256(folder / name) for name in (FP32_NAME, INT8_NAME)},
                   "quantize": rec}, f, indent=2)
    return int8
