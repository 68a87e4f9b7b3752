"""Image processor of EOV-Seg on transformers' PIL backend: the original's resize (PIL's bilinear on 8-bit images,
as detectron2's test transform), hence the numbers of the released weights. Everything but the resize is shared with
the torchvision backend ([`EovSegImageProcessor`]) through [`EovSegImageProcessingMixin`]."""

from __future__ import annotations

import numpy as np
from transformers.image_processing_backends import PilBackend

from .image_processing_eovseg import EovSegImageProcessingMixin, EovSegImageProcessorKwargs


__all__ = ["EovSegImageProcessorPil"]


class EovSegImageProcessorPil(EovSegImageProcessingMixin, PilBackend):
    r"""
    Image processor of EOV-Seg on transformers' PIL backend: images are resized by PIL, bit for bit as the original
    EOV-Seg. Arguments, outputs and post-processing are those of [`EovSegImageProcessingMixin`], shared with
    [`EovSegImageProcessor`] (torchvision backend).

    This is the backend `AutoImageProcessor.from_pretrained` and `EovSegProcessor.from_pretrained` choose for an
    EOV-Seg folder unless `backend="torchvision"` is given: converted checkpoints keep the original's numbers on
    every image, downscaled ones included.
    """

    valid_kwargs = EovSegImageProcessorKwargs

    def _backend_image(self, image: np.ndarray) -> np.ndarray:
        return image.transpose(2, 0, 1)
