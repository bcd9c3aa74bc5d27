"""transformers' own common image-processing test mixins, run against DiT's image processor."""

import unittest

from transformers_tests.test_image_processing_common import (
    ImageProcessingTester,
    ImageProcessingTestMixin,
    PostProcessSemanticSegmentationTestMixin,
)

from hf_msvit import DiTImageProcessor


class DiTImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 18, "width": 18})
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("do_normalize", True)
        super().__init__(parent, batch_size=3, max_resolution=80, **kwargs)
        self.num_labels = 3  # for the semantic-segmentation post-processing tests

    def _get_image_processing_classes(self):
        # The common helper infers the processor from the test folder's name among transformers' built-in models.
        return {"pil": DiTImageProcessor}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.size["height"], self.size["width"]


class DiTImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = DiTImageProcessingTester

    @unittest.skip(reason="hf_msvit ships a PIL backend only: no torchvision dependency (DESIGN.md)")
    def test_new_models_require_torchvision_backend(self):
        pass
