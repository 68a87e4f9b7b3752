"""transformers' ProcessorTesterMixin on EovSegProcessor (image processor + open_clip's CLIP tokenizer), as
transformers subclasses it for its image-text processors. Run with `pytest -m transformers_common`."""

import unittest

import pytest
from tests.test_processing_common import ProcessorTesterMixin

from eovseg import EovSegProcessor
from eovseg.processing.image_processing_eovseg import EovSegImageProcessor
from eovseg.processing.tokenization_eovseg import build_clip_tokenizer

pytestmark = pytest.mark.transformers_common


class EovSegProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = EovSegProcessor

    @classmethod
    def _setup_image_processor(cls):
        return EovSegImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})

    @classmethod
    def _setup_tokenizer(cls):
        return build_clip_tokenizer()
