"""Image processing, tokenization and the processor of EOV-Seg."""

from .image_processing_eovseg import EovSegImageProcessor
from .image_processing_pil_eovseg import EovSegImageProcessorPil
from .processing_eovseg import EovSegProcessor
from .tokenization_eovseg import build_clip_tokenizer, clip_tokenize

__all__ = ["EovSegImageProcessor", "EovSegImageProcessorPil", "EovSegProcessor", "build_clip_tokenizer", "clip_tokenize"]
