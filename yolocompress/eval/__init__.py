"""Evaluation: VOC (devkit) and COCO metrics behind one evaluator interface."""
from .coco import COCOEvaluator
from .detections import Detections, load_detections_json, save_detections_json
from .evaluator import DatasetEvaluator, DatasetEvaluators
from .voc import VOCEvaluator, plot_pr_curves, voc_ap

__all__ = ["COCOEvaluator", "DatasetEvaluator", "DatasetEvaluators", "Detections", "VOCEvaluator",
           "load_detections_json", "plot_pr_curves", "save_detections_json", "voc_ap"]
