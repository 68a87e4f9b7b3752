"""Evaluation of EOV-Seg: panoptic quality, semantic segmentation (mIoU & co.) and instance mask AP.

Every score is reported **in percent** (a perfect prediction scores 100), as the COCO panoptic API prints and
detectron2 reports them; a score that is undefined (no class to average, no ground truth) is nan (None in JSON).

- plain classes, streaming (`add(prediction, reference)` per image, `compute()` at the end):
  [`PanopticQuality`], [`SemanticSegmentationMetric`], [`InstanceSegmentationMetric`], and the one-shot
  functions `panoptic_quality`, `mean_iou`, `mask_ap`;
- `evaluate` modules, for `evaluate.load(path)` with no network: the folders of `METRIC_PATHS`
  (`eovseg/evaluation/metrics/{panoptic_quality,mean_iou,mask_ap}`);
- [`evaluate_model`] runs a model over a data set and returns these scores; `python -m eovseg.evaluation.evaluate`
  is its command line (several processes under torchrun / accelerate launch);
- [`CocoPanopticFolder`], [`SemanticLabelFolder`]: data sets read from their usual on-disk layouts.
"""

import os as _os

from .folders import CocoPanopticFolder, SemanticLabelFolder
from .instance import InstanceSegmentationMetric, mask_ap
from .panoptic import PanopticQuality, panoptic_quality
from .semantic import SemanticSegmentationMetric, mean_iou


_METRICS_DIR = _os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "metrics")

METRIC_PATHS = {
    "panoptic_quality": _os.path.join(_METRICS_DIR, "panoptic_quality"),
    "mean_iou": _os.path.join(_METRICS_DIR, "mean_iou"),
    "mask_ap": _os.path.join(_METRICS_DIR, "mask_ap"),
}


def __getattr__(name):
    # The runner imports torch and transformers: load it only when asked for.
    if name in ("evaluate_model", "DatasetColumns", "categories_from_config", "dataset_categories", "format_results"):
        from . import evaluate as _runner

        return getattr(_runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CocoPanopticFolder",
    "InstanceSegmentationMetric",
    "METRIC_PATHS",
    "PanopticQuality",
    "SemanticLabelFolder",
    "SemanticSegmentationMetric",
    "DatasetColumns",
    "categories_from_config",
    "dataset_categories",
    "evaluate_model",
    "format_results",
    "mask_ap",
    "mean_iou",
    "panoptic_quality",
]
