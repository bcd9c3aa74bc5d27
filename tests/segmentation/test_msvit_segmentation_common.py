"""transformers' own common model and backbone tests, run against MSViTForSemanticSegmentation and MSViTBackbone."""

import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers_tests.exporters.test_export import ExportTesterMixin
from transformers_tests.test_backbone_common import BackboneTesterMixin
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor

from hf_msvit import MSViTBackbone, MSViTConfig, MSViTForSemanticSegmentation


# The common tests give labels to the classes listed in transformers' built-in mapping names.
modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault("msvit", "MSViTForSemanticSegmentation")
modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES.setdefault("msvit", "MSViTBackbone")


class MSViTSegmentationTester:
    def __init__(self, parent, batch_size=3, image_size=32, num_labels=4, gate_threshold=0.0, fine_region_budget=None):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = 3
        self.num_labels = num_labels
        self.hidden_size = 32
        self.num_hidden_layers = 2
        self.num_attention_heads = 4
        self.is_training = True
        # Threshold 0 tokenizes every region fine in eval: fixed sequence length, as the common shape checks expect.
        # Mixed tokenizations are covered by test_msvit_segmentation.py.
        self.gate_threshold = gate_threshold
        self.fine_region_budget = fine_region_budget
        self.seq_length = (image_size // 4) ** 2 + 1
        self.out_features = ["stem", "stage1", "stage2"]

    def get_config(self, **overrides):
        values = {
            "image_size": self.image_size, "patch_size": 4, "coarse_patch_size": 8, "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "intermediate_size": 37, "gate_hidden_size": 16, "gate_threshold": self.gate_threshold,
            "fine_region_budget": self.fine_region_budget, "num_labels": self.num_labels,
            "out_features": self.out_features, "attn_implementation": "eager",
        }  # fmt: skip
        values.update(overrides)
        return MSViTConfig(**values)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values, None

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_backbone(self, config, pixel_values, labels):
        model = MSViTBackbone(config).eval()
        with torch.no_grad():
            outputs = model(pixel_values)
        side = self.image_size // 4
        self.parent.assertEqual(len(outputs.feature_maps), len(config.out_features))
        for feature_map in outputs.feature_maps:
            self.parent.assertEqual(tuple(feature_map.shape), (self.batch_size, 32, side, side))
        self.parent.assertEqual(model.channels, [32] * len(config.out_features))


class MSViTForSemanticSegmentationCommonTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MSViTForSemanticSegmentation,)
    pipeline_model_mapping = {}
    test_resize_embeddings = False
    test_torch_exportable = False  # threshold mode: data-dependent token counts (the budget mode exports, below)
    has_attentions = True

    def setUp(self):
        self.model_tester = MSViTSegmentationTester(self)

    def test_reverse_loading_mapping(self):
        # MSViT's registered conversion reshapes old checkpoints' gate bias; it renames no key.
        super().test_reverse_loading_mapping(check_keys_were_modified=False)

    @unittest.skip(reason="MSViT takes pixel_values, not inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="MSViT takes pixel_values, not inputs_embeds")
    def test_model_get_set_embeddings(self):
        pass

    def test_model_outputs_equivalence(self):
        # The common version subtracts outputs, which torch refuses for bool tensors (fine_region_mask); same check:
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = MSViTForSemanticSegmentation(config).eval()
        for kwargs in ({}, {"output_hidden_states": True}, {"output_attentions": True}):
            with torch.no_grad():
                as_dict = model(**inputs, return_dict=True, **kwargs)
                as_tuple = model(**inputs, return_dict=False, **kwargs)
            values = [value for value in as_dict.values() if value is not None]
            self.assertEqual(len(values), len(as_tuple))
            for from_dict, from_tuple in zip(values, as_tuple):
                pairs = zip(from_dict, from_tuple) if isinstance(from_dict, tuple) else [(from_dict, from_tuple)]
                self.assertTrue(all(torch.equal(a, b) for a, b in pairs))


class MSViTSegmentationBudgetExportTest(ExportTesterMixin, unittest.TestCase):
    """transformers' export test in the fine-region budget mode (every image the same token count)."""

    all_model_classes = (MSViTForSemanticSegmentation,)
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = MSViTSegmentationTester(self, fine_region_budget=5)


class MSViTBackboneCommonTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (MSViTBackbone,)
    config_class = MSViTConfig
    has_attentions = True

    def setUp(self):
        self.model_tester = MSViTSegmentationTester(self)

    def test_feature_maps_on_the_fine_grid(self):
        self.model_tester.create_and_check_backbone(*self.model_tester.prepare_config_and_inputs())


if __name__ == "__main__":
    unittest.main()
