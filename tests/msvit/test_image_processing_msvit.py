"""MSViT image processor: transformers' common image-processor tests plus mode conversions, without torchvision."""

import unittest

import numpy as np
import pytest
from PIL import Image
from transformers import AutoImageProcessor
from transformers.utils import is_torchvision_available
from transformers_tests.test_image_processing_common import (
    ImageProcessingTester,
    ImageProcessingTestMixin,
    PostProcessSemanticSegmentationTestMixin,
)

from hf_msvit import MSViTConfig, MSViTImageProcessor


class MSViTImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {"height": 32, "width": 32})
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("do_normalize", True)
        super().__init__(parent, **kwargs)
        self.num_labels = 3  # for the semantic-segmentation post-processing tests

    def _get_image_processing_classes(self):
        # the common tester infers the model from the test folder among transformers' built-in processors
        return {"pil": MSViTImageProcessor}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.size["height"], self.size["width"]


class MSViTImageProcessingTest(ImageProcessingTestMixin, PostProcessSemanticSegmentationTestMixin, unittest.TestCase):
    image_processor_tester_class = MSViTImageProcessingTester

    @unittest.skip(reason="MSViT ships only a PIL backend, so that it runs without torchvision")
    def test_new_models_require_torchvision_backend(self):
        pass


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16"])
def test_any_pil_mode_becomes_rgb(mode):
    image = Image.fromarray((np.arange(40 * 30) % 255).astype(np.uint8).reshape(30, 40)).convert(mode)
    out = MSViTImageProcessor(size={"height": 64, "width": 64})(image, return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (1, 3, 64, 64)
    assert out["pixel_values"].abs().max() <= 1.0 + 1e-6


def test_registered_with_auto_image_processor(tmp_path):
    assert not is_torchvision_available()
    MSViTConfig(image_size=64).save_pretrained(tmp_path)
    MSViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor) is MSViTImageProcessor and processor.size["height"] == 64
