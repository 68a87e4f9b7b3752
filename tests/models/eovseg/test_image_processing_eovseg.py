"""transformers' ImageProcessingTestMixin and PostProcessSemanticSegmentationTestMixin on both image-processor
backends of EOV-Seg (`EovSegImageProcessor`, torchvision, and `EovSegImageProcessorPil`, PIL), as transformers
subclasses them for EoMT and Mask2Former. Run with `pytest -m transformers_common`."""

import math
import unittest

import pytest
import torch
from conftest import image_processor_classes
from PIL import Image
from tests.test_image_processing_common import (
    ImageProcessingTester,
    ImageProcessingTestMixin,
    PostProcessSemanticSegmentationTestMixin,
)

from eovseg import EovSegOutput

pytestmark = pytest.mark.transformers_common


class EovSegImageProcessingTester(ImageProcessingTester):
    def __init__(self, **kwargs):
        # post-processing inputs: fake model outputs
        kwargs.setdefault("num_labels", 6)
        kwargs.setdefault("num_queries", 4)
        kwargs.setdefault("height", 16)
        kwargs.setdefault("width", 24)
        # image processor: small sizes keep the 7-image batches cheap
        kwargs.setdefault("size", {"shortest_edge": 32, "longest_edge": 64})
        kwargs.setdefault("size_divisibility", 32)
        super().__init__(**kwargs)

    def _get_image_processing_classes(self):
        # transformers finds a model's backends in its own name tables; eovseg's live in the package
        return image_processor_classes()

    def expected_output_image_shape(self, images):
        """The shortest-edge rule (longer side capped) per image, then the batch padded to its largest height and
        width rounded up to `size_divisibility`."""
        shortest, longest = self.size["shortest_edge"], self.size["longest_edge"]
        heights, widths = [], []
        for image in images:
            if isinstance(image, Image.Image):
                width, height = image.size
            elif isinstance(image, torch.Tensor):  # the mixins' tensors are channels-first
                height, width = image.shape[-2:]
            else:  # and their arrays channels-last
                height, width = image.shape[:2]
            scale = shortest / min(height, width)
            if max(height, width) * scale > longest:
                scale = longest / max(height, width)
            heights.append(int(height * scale + 0.5))
            widths.append(int(width * scale + 0.5))
        step = self.size_divisibility
        return self.num_channels, math.ceil(max(heights) / step) * step, math.ceil(max(widths) / step) * step

    def prepare_post_process_semantic_segmentation_inputs(self):
        outputs = EovSegOutput(
            class_queries_logits=torch.randn(self.batch_size, self.num_queries, self.num_labels + 1),
            masks_queries_logits=torch.randn(self.batch_size, self.num_queries, self.height // 4, self.width // 4),
            image_sizes=torch.tensor([[self.height, self.width]] * self.batch_size),
        )
        expected = {"num_labels": self.num_labels, "height": self.height, "width": self.width}
        return {"outputs": outputs}, expected


class EovSegImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = EovSegImageProcessingTester

    def test_both_backends_are_there(self):
        self.assertEqual(set(self.image_processing_classes), {"torchvision", "pil"})

    # The skip transformers makes for EoMT, for the same reason: the images are RGB.
    @unittest.skip(reason="Not supported")
    def test_call_numpy_4_channels(self):
        pass

    def test_backends_equivalence_with_segmentation_maps(self):
        """As transformers' EoMT test: both backends on an image with its label map (pixel values close, at least
        99.9% of the mask labels equal)."""
        from conftest import url_to_local_path

        image = Image.open(url_to_local_path("ADE_val_00000001.jpg"))
        label_map = Image.open(url_to_local_path("ADE_val_00000001.png"))
        encodings = {
            name: cls(**self.image_processor_dict)(image, segmentation_maps=label_map, return_tensors="pt")
            for name, cls in self.image_processing_classes.items()
        }
        reference = encodings.pop("torchvision")
        for encoding in encodings.values():
            self._assert_tensors_equivalence(reference.pixel_values, encoding.pixel_values, atol=1e-1, mean_atol=1e-3)
            self.assertEqual(reference.mask_labels[0].shape, encoding.mask_labels[0].shape)
            match = (reference.mask_labels[0] == encoding.mask_labels[0]).float().mean().item()
            self.assertGreaterEqual(match, 0.999)
            self.assertTrue(torch.equal(reference.class_labels[0], encoding.class_labels[0]))
