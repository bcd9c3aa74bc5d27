"""transformers' own common test mixins, run against DiT (model, classification head, backbone)."""

import unittest

import torch
from transformers.models.auto import modeling_auto
from transformers_tests.exporters.test_export import ExportTesterMixin
from transformers_tests.test_backbone_common import BackboneTesterMixin
from transformers_tests.test_configuration_common import ConfigTester
from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor, ids_tensor

from hf_msvit import DiTBackbone, DiTConfig, DiTForImageClassification, DiTModel


# The common tests decide from transformers' *built-in* mapping names which classes get labels and which are base
# models (hf_conventions.md §5.4).
modeling_auto.MODEL_MAPPING_NAMES.setdefault("dit_routing", "DiTModel")
modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.setdefault("dit_routing", "DiTForImageClassification")
modeling_auto.MODEL_FOR_BACKBONE_MAPPING_NAMES.setdefault("dit_routing", "DiTBackbone")


class DiTModelTester:
    def __init__(
        self,
        parent,
        batch_size=3,
        image_size=32,
        num_channels=3,
        hidden_sizes=(8, 16, 24, 32),
        depths=(1, 1, 1, 1),
        num_attention_heads=(1, 2, 3, 4),
        sr_ratios=(4, 2, 1, 1),
        mlp_ratios=(2, 2, 2, 2),
        num_routing_columns=4,
        routing_mode="dynamic",
        compute_budget=None,
        num_labels=3,
        is_training=True,
        use_labels=True,
        out_features=("stage1", "stage2", "stage3", "stage4"),
        attn_implementation="eager",
    ):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_channels = num_channels
        self.hidden_sizes = list(hidden_sizes)
        self.depths = list(depths)
        self.num_attention_heads = list(num_attention_heads)
        self.sr_ratios = list(sr_ratios)
        self.mlp_ratios = list(mlp_ratios)
        self.num_routing_columns = num_routing_columns
        self.routing_mode = routing_mode
        self.compute_budget = compute_budget
        self.num_labels = num_labels
        self.is_training = is_training
        self.use_labels = use_labels
        self.out_features = list(out_features)
        self.attn_implementation = attn_implementation

    def get_config(self, **overrides):
        values = {
            "image_size": self.image_size,
            "num_channels": self.num_channels,
            "hidden_sizes": self.hidden_sizes,
            "depths": self.depths,
            "num_attention_heads": self.num_attention_heads,
            "sr_ratios": self.sr_ratios,
            "mlp_ratios": self.mlp_ratios,
            "num_routing_columns": self.num_routing_columns,
            "routing_mode": self.routing_mode,
            "compute_budget": self.compute_budget,
            "num_labels": self.num_labels,
            # p(open) = 0.5 at init: the random gate weights then route part of the tokens and images, so the common
            # tests exercise the sparse inference path (with 0.9 every gate would start open).
            "gate_init_compute_prob": 0.5,
            "initializer_range": 0.2,
            "out_features": self.out_features,
            "attn_implementation": self.attn_implementation,
        }
        values.update(overrides)
        return DiTConfig(**values)

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels) if self.use_labels else None
        return self.get_config(), pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}

    def create_and_check_model(self, config, pixel_values, labels):
        model = DiTModel(config).eval()
        with torch.no_grad():
            result = model(pixel_values)
        side = self.image_size // 32
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.hidden_sizes[-1], side, side))
        self.parent.assertEqual(result.macs.shape, (self.batch_size,))
        self.parent.assertEqual(result.downsampled.shape, (self.batch_size, 3, self.num_routing_columns + 1))
        self.parent.assertEqual(result.stage_keep_ratio.shape, (self.batch_size, 4, self.num_routing_columns))
        self.parent.assertEqual(result.token_keep_ratio.shape, (self.batch_size,))

    def create_and_check_for_image_classification(self, config, pixel_values, labels):
        model = DiTForImageClassification(config).eval()
        with torch.no_grad():
            result = model(pixel_values, labels=labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))
        self.parent.assertIsNotNone(result.budget_loss)


class DiTModelTest(ModelTesterMixin, unittest.TestCase):
    all_model_classes = (DiTModel, DiTForImageClassification)
    pipeline_model_mapping = {"image-feature-extraction": DiTModel, "image-classification": DiTForImageClassification}
    test_resize_embeddings = False
    test_torch_exportable = False  # learned routing is data-dependent (the static route and budget mode export, below)
    # Attention maps have per-image, per-stage shapes under token routing; DiT does not return them.
    has_attentions = False

    def setUp(self):
        self.model_tester = DiTModelTester(self)
        self.config_tester = ConfigTester(
            self,
            config_class=DiTConfig,
            has_text_modality=False,
            hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 2, 3, 4],
            # A pyramid: one width, head count and depth per scale (PVTv2's names), no single `hidden_size`.
            common_properties=["hidden_sizes", "num_attention_heads", "depths"],
        )

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_image_classification(self):
        self.model_tester.create_and_check_for_image_classification(*self.model_tester.prepare_config_and_inputs())

    @unittest.skip(reason="DiT has no input embeddings table (its input is pixels)")
    def test_inputs_embeds(self):
        pass

    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)

    def test_hidden_states_output(self):
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        side = self.model_tester.image_size // 4
        for model_class in self.all_model_classes:
            for flag_in_config in (False, True):
                if flag_in_config:
                    config.output_hidden_states = True
                    kwargs = {}
                else:
                    kwargs = {"output_hidden_states": True}
                model = model_class(config).eval()
                with torch.no_grad():
                    outputs = model(**inputs_dict, **kwargs)
                hidden_states = outputs.hidden_states
                self.assertEqual(len(hidden_states), 5)  # stem + 4 scales
                self.assertEqual(list(hidden_states[0].shape[-3:]), [8, side, side])
                self.assertEqual(list(hidden_states[-1].shape[-3:]), [32, side // 8, side // 8])
            config.output_hidden_states = False


class DiTStaticRouteExportTest(ExportTesterMixin, unittest.TestCase):
    """transformers' export test on PVTv2's static route."""

    all_model_classes = (DiTModel, DiTForImageClassification)
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = DiTModelTester(self, routing_mode="static")


class DiTComputeBudgetExportTest(ExportTesterMixin, unittest.TestCase):
    """transformers' export test in the exact-budget mode (the same tokens per stage in every image)."""

    all_model_classes = (DiTModel, DiTForImageClassification)
    test_torch_exportable = True

    def setUp(self):
        self.model_tester = DiTModelTester(self, compute_budget=0.8)


class DiTBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (DiTBackbone,)
    config_class = DiTConfig
    has_attentions = False

    def setUp(self):
        self.model_tester = DiTModelTester(self)

    def test_feature_maps_at_strides_4_to_32(self):
        config = self.model_tester.get_config(routing_mode="dynamic")
        model = DiTBackbone(config).eval()
        pixel_values = floats_tensor([2, 3, 64, 64])
        with torch.no_grad():
            outputs = model(pixel_values)
        strides = [64 // fm.shape[-1] for fm in outputs.feature_maps]
        self.assertEqual(strides, [4, 8, 16, 32])
        self.assertEqual([fm.shape[1] for fm in outputs.feature_maps], [8, 16, 24, 32])
        self.assertEqual(model.channels, [8, 16, 24, 32])
        self.assertEqual(outputs.macs.shape, (2,))
