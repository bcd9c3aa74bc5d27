"""transformers' own common model and config tests, run against MSViT (tiny random config, CPU)."""

import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers_tests.exporters.test_export import ExportTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from hf_msvit import MSViTConfig, MSViTForImageClassification, MSViTModel


# The common tests key some behaviour (labels, training tests) off transformers' built-in mapping names.
modeling_auto.MODEL_MAPPING_NAMES.setdefault("msvit", "MSViTModel")
modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.setdefault("msvit", "MSViTForImageClassification")


class MSViTModelTester:
    def __init__(
        self,
        parent,
        batch_size=4,
        image_size=32,
        patch_size=4,
        coarse_patch_size=8,
        num_channels=3,
        is_training=True,
        use_labels=True,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        type_sequence_label_size=10,
        gate_threshold=0.0,
        fine_region_budget=None,
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.coarse_patch_size = coarse_patch_size
        self.num_channels = num_channels
        self.is_training = is_training
        self.use_labels = use_labels
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.type_sequence_label_size = type_sequence_label_size
        # Threshold 0 tokenizes every region fine in eval, so the sequence length is fixed, as the shape checks of the
        # common tests expect. Mixed token counts are covered by test_msvit_dynamic.py.
        self.gate_threshold = gate_threshold
        self.fine_region_budget = fine_region_budget
        self.seq_length = (image_size // patch_size) ** 2 + 1

    def get_config(self):
        return MSViTConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            coarse_patch_size=self.coarse_patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            gate_hidden_size=16,
            gate_threshold=self.gate_threshold,
            fine_region_budget=self.fine_region_budget,
            num_labels=self.type_sequence_label_size,
            attn_implementation="eager",
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.type_sequence_label_size) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class MSViTModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MSViTModel, MSViTForImageClassification)
    pipeline_model_mapping = {}
    test_resize_embeddings = False
    test_torch_exportable = False  # threshold mode: data-dependent token counts (the budget mode exports, below)
    has_attentions = True

    def setUp(self):
        self.model_tester = MSViTModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=MSViTConfig,
            has_text_modality=False,
            hidden_size=36,
            num_attention_heads=6,
            image_size=64,
        )

    def test_reverse_loading_mapping(self):
        # the checkpoint converter reshapes `logit_bias` (old 0-dim checkpoints) in place; no key is renamed
        super().test_reverse_loading_mapping(check_keys_were_modified=False)

    def test_config(self):
        self.config_tester.run_common_tests()

    @unittest.skip(reason="MSViT takes pixel_values, not inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="MSViT takes pixel_values, not inputs_embeds")
    def test_model_get_set_embeddings(self):
        pass

    def test_model_outputs_equivalence(self):
        # The common version subtracts outputs, which torch refuses for bool tensors (fine_region_mask); same check:
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            for kwargs in ({}, {"output_hidden_states": True}, {"output_attentions": True}):
                with torch.no_grad():
                    as_dict = model(**inputs, return_dict=True, **kwargs)
                    as_tuple = model(**inputs, return_dict=False, **kwargs)
                values = [value for value in as_dict.values() if value is not None]
                self.assertEqual(len(values), len(as_tuple))
                for from_dict, from_tuple in zip(values, as_tuple):
                    if isinstance(from_dict, tuple):
                        self.assertTrue(all(torch.equal(a, b) for a, b in zip(from_dict, from_tuple)))
                    else:
                        self.assertTrue(torch.equal(from_dict, from_tuple))

    def test_model_outputs_shapes(self):
        config, pixel_values, labels = self.model_tester.prepare_config_and_inputs()
        model = MSViTForImageClassification(config).eval()
        with torch.no_grad():
            outputs = model(pixel_values, labels=labels)
        batch = self.model_tester.batch_size
        self.assertEqual(outputs.logits.shape, (batch, self.model_tester.type_sequence_label_size))
        self.assertEqual(outputs.gate_probs.shape, (batch, 4, 4))
        self.assertEqual(outputs.fine_region_mask.shape, (batch, 4, 4))
        self.assertTrue(torch.equal(outputs.num_tokens, torch.full((batch,), self.model_tester.seq_length)))
        self.assertEqual(outputs.macs.shape, (batch,))
        self.assertTrue(torch.isfinite(outputs.loss))


class MSViTBudgetExportTest(ExportTesterMixin, unittest.TestCase):
    """transformers' export test in the fine-region budget mode (every image the same token count)."""

    all_model_classes = (MSViTModel, MSViTForImageClassification)
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = MSViTModelTester(self, fine_region_budget=0.5)


if __name__ == "__main__":
    unittest.main()
