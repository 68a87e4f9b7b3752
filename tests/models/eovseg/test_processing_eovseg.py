"""transformers' ProcessorTesterMixin on EovSegProcessor (image processor + open_clip's CLIP tokenizer), as
transformers subclasses it for its image-text processors. Run with `pytest -m transformers_common`."""

import unittest

import pytest
import torch
from tests.test_processing_common import ProcessorTesterMixin

from eovseg import EovSegProcessor
from eovseg.processing.image_processing_eovseg import EovSegImageProcessor
from eovseg.processing.tokenization_eovseg import build_clip_tokenizer
from eovseg.vocabulary import build_prompts

pytestmark = pytest.mark.transformers_common


def _text_is_the_vocabulary_prompts(test):
    """The mixin's "text" case compares processor(text=x) with tokenizer(x); EOV-Seg's processor tokenizes the
    vocabulary's prompts (every synonym in each of the 14 templates), so the tokenizer's side is given those."""
    processor = test.get_processor()
    names = test.prepare_text_inputs(batch_size=2)
    expected = processor.tokenizer(build_prompts(names), padding="longest", return_tensors="pt")["input_ids"]
    test.assertTrue(torch.equal(processor(text=names, return_tensors="pt")["input_ids"], expected))


class EovSegProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = EovSegProcessor
    # the mixin's defaults (117, 112) exceed the CLIP text tower's context of 77 tokens, which the processor refuses
    images_text_kwargs_max_length = 77
    images_text_kwargs_override_max_length = 72

    @classmethod
    def _setup_image_processor(cls):
        return EovSegImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})

    @classmethod
    def _setup_tokenizer(cls):
        return build_clip_tokenizer()

    def test_subprocessor_defaults_0_text(self):
        # the mixin's test_subprocessor_defaults, text case (see _text_is_the_vocabulary_prompts)
        _text_is_the_vocabulary_prompts(self)

    def prepare_text_inputs(self, batch_size=None, modalities=None):
        """EOV-Seg's text is a vocabulary: a list of class names (a single string names a built-in vocabulary), so
        one text input is a one-class vocabulary and a batch of n texts an n-class one (the mixin's phrases)."""
        names = ["lower newer", "upper older longer string"] + [f"lower newer {i}" for i in range(2, batch_size or 1)]
        return names[:1] if batch_size is None else names[:batch_size]
