"""Training EOV-Seg: data adapters and augmentation, a synthetic data set, the original's optimizer and schedule,
and the Accelerate training script (`python -m eovseg.training.train`)."""

from .data import (
    DatasetFormatError,
    EovSegDataCollator,
    ImageLabelDataset,
    LargeScaleJitter,
    MixedSegmentationDataset,
    PanopticSegmentationDataset,
    ResizeShortestEdge,
    SemanticSegmentationDataset,
)
from ..synthetic import (
    SYNTHETIC_CLASS_NAMES,
    SYNTHETIC_IS_THING,
    get_dataset_categories,
    make_synthetic_image_label_dataset,
    make_synthetic_panoptic_dataset,
    synthetic_categories,
)
from .trainer_utils import build_lr_scheduler, build_optimizer, build_param_groups, training_arguments

__all__ = [
    "DatasetFormatError",
    "EovSegDataCollator",
    "ImageLabelDataset",
    "LargeScaleJitter",
    "MixedSegmentationDataset",
    "PanopticSegmentationDataset",
    "ResizeShortestEdge",
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_IS_THING",
    "SemanticSegmentationDataset",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "get_dataset_categories",
    "make_synthetic_image_label_dataset",
    "make_synthetic_panoptic_dataset",
    "synthetic_categories",
    "training_arguments",
]
