"""Training EOV-Seg: data adapters and augmentation, a synthetic data set, the original's optimizer and schedule,
and the Accelerate training script (`python -m eovseg.training.train`)."""

from . import data
from .data import *  # noqa: F401,F403  (the data adapters; their names are data.__all__)
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
    *data.__all__,
    "SYNTHETIC_CLASS_NAMES",
    "SYNTHETIC_IS_THING",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "get_dataset_categories",
    "make_synthetic_image_label_dataset",
    "make_synthetic_panoptic_dataset",
    "synthetic_categories",
    "training_arguments",
]
