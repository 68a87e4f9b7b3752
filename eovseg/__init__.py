"""eovseg: EOV-Seg open-vocabulary panoptic segmentation as a Hugging Face Transformers model."""

from .configuration_eovseg import EovSegConfig
from .modeling_eovseg import EovSegForPanopticSegmentation, EovSegOutput, EovSegPreTrainedModel

__version__ = "0.1.0"

__all__ = ["EovSegConfig", "EovSegForPanopticSegmentation", "EovSegOutput", "EovSegPreTrainedModel"]
