"""eovseg: EOV-Seg open-vocabulary panoptic segmentation as a Hugging Face Transformers model.

Importing the package registers the model with the Transformers Auto classes (`AutoConfig`, `AutoModel`,
`AutoModelForImageSegmentation`, `AutoModelForUniversalSegmentation`, `AutoImageProcessor`, `AutoProcessor`) and the
`open-vocabulary-segmentation` pipeline.
"""

from .auto_registration import register
from .configuration_eovseg import EovSegConfig
from .modeling_eovseg import EovSegForPanopticSegmentation, EovSegOutput, EovSegPreTrainedModel
from .processing import EovSegImageProcessor, EovSegImageProcessorPil, EovSegProcessor

__version__ = "0.1.0"

register()

__all__ = [
    "EovSegConfig",
    "EovSegForPanopticSegmentation",
    "EovSegImageProcessor",
    "EovSegImageProcessorPil",
    "EovSegOutput",
    "EovSegPreTrainedModel",
    "EovSegProcessor",
]
