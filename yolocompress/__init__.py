"""yolocompress: compress YOLOv4 detectors (sparse training, group channel pruning, distillation).

The public API is small; the command line (`yolocompress --help`) covers the workflows.
"""
from .artifacts import build_model, load_artifact, save_artifact
from .config import Config, load_config
from .errors import YoloCompressError
from .eval.evaluate import ModelEvaluator, evaluate_model
from .models.cfg import parse_cfg, read_cfg, write_cfg
from .models.darknet import Darknet
from .models.profile import profile_summary
from .models.weights import load_darknet_weights, save_darknet_weights
from .models.yolo import decode, postprocess

__version__ = "0.1.0"

__all__ = ["Config", "Darknet", "ModelEvaluator", "YoloCompressError", "build_model", "decode",
           "evaluate_model", "load_artifact", "load_config", "load_darknet_weights", "parse_cfg",
           "postprocess", "profile_summary", "read_cfg", "save_artifact", "save_darknet_weights",
           "write_cfg"]
