"""Image processing, tokenization and the processor of EOV-Seg."""

from .image_processing_eovseg import EovSegImageProcessor
from .processing_eovseg import EovSegProcessor
from .tokenization_eovseg import build_clip_tokenizer, clip_tokenize

__all__ = ["EovSegImageProcessor", "EovSegProcessor", "build_clip_tokenizer", "clip_tokenize"]
