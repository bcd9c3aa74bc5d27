# Copyright 2026 The hf_msvit Authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Upcycling a ViT checkpoint (transformers' `vit`) into MSViT.

MSViT keeps ViT's parameter names, so the conversion is a prefix rename (`vit.` -> `msvit.`). Only the gate and the
learned GBaS priors are new; with every region forced fine, the converted model computes exactly the ViT.

Unless told otherwise (`UPCYCLING_DEFAULTS`), an upcycled gate learns on the decisions inference takes
(`gate_noise_scale=0`) with the level term holding its own level at the target (`gate_level_loss_weight=1`) and GBaS
at weight 0.3 (at 1 it ordered the gates more than the task did: lower accuracy at every target, on validation), a
logit penalty of 0.01 keeps its logits within reach of the threshold (without it one seed in three drifted to logits
of -57.8 and scored 0.894 on validation, 0.925 with it), and inference subtracts no calibration offset; the examples'
joint phase then samples the decisions (`JOINT_PHASE_NOISE_SCALE`), the classification example keeping each batch's
target fraction fine (`JOINT_PHASE_SAMPLING_LEVEL`). Why: docs/msvit.md, "The level and the training decisions", and
the study's MSViT rows.
"""

from transformers import AutoConfig, PreTrainedModel, ViTConfig, ViTForImageClassification, ViTModel

from .configuration_msvit import MSViTConfig


# ViT config fields that MSViT shares under the same name.
SHARED_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "initializer_range",
    "layer_norm_eps",
    "image_size",
    "patch_size",
    "num_channels",
    "qkv_bias",
    "pooler_output_size",
    "pooler_act",
    "id2label",
    "label2id",
)
UPCYCLING_DEFAULTS = {
    "gate_noise_scale": 0.0, "gate_level_loss_weight": 1.0, "gate_level_calibration": False, "gbas_loss_weight": 0.3,
    "gate_logit_loss_weight": 0.01,
}  # fmt: skip
# The joint phase's training decisions once the gate has learned where to look: sampled, so the backbone is fine-tuned
# on token mixes around the gate's level, not on one decision boundary (the examples' default). Half the Gumbel noise:
# cut at the threshold, the sampled ratio drifted 0.08 from a 0.25 target at 1 (logistic noise pulls it to 0.5).
JOINT_PHASE_NOISE_SCALE = 0.5
# Where the classification example cuts those samples: the batch's target fraction of regions with the highest noisy
# logits, so the backbone trains on inference's ratio (cut at the threshold, the noise pulled the main job's training
# ratio to 0.305 for a 0.25 target). The segmentation example cuts at the threshold: its gates trained at 0.25 / 0.50.
JOINT_PHASE_SAMPLING_LEVEL = "target"
# Parameters MSViT adds to a ViT: they are initialized, not converted.
NEW_PARAMETER_PREFIXES = ("embeddings.gate.", "batch_shaping.")


def msvit_config_from_vit_config(vit_config: ViTConfig, **overrides) -> MSViTConfig:
    """An `MSViTConfig` with the backbone of `vit_config` and the MSViT settings in `overrides`."""
    patch_size = vit_config.patch_size
    if isinstance(patch_size, (list, tuple)):
        if len(set(patch_size)) != 1:
            raise ValueError(f"MSViT needs square patches, the ViT has patch_size={patch_size}.")
        patch_size = patch_size[0]
    values = {name: getattr(vit_config, name) for name in SHARED_FIELDS if hasattr(vit_config, name)}
    values["patch_size"] = patch_size
    values["id2label"] = {int(k): v for k, v in vit_config.id2label.items()}
    values["label2id"] = dict(vit_config.label2id)
    values.update({**UPCYCLING_DEFAULTS, **overrides})
    return MSViTConfig(**values)


def _load_vit(vit) -> PreTrainedModel:
    if isinstance(vit, (ViTModel, ViTForImageClassification)):
        return vit
    if isinstance(vit, PreTrainedModel):
        raise ValueError(
            f"Expected a ViT checkpoint (transformers ViTModel or ViTForImageClassification, model_type 'vit'), got a "
            f"{type(vit).__name__} (model_type {getattr(vit.config, 'model_type', None)!r})."
        )
    if not isinstance(vit, str):
        raise TypeError(f"`vit` must be a directory, a Hub id or a loaded ViT model, got {type(vit).__name__}.")
    config = AutoConfig.from_pretrained(vit)
    if config.model_type != "vit":
        raise ValueError(
            f"Expected a ViT checkpoint (model_type 'vit', e.g. google/vit-base-patch16-224) at {vit!r}, but its "
            f"config has model_type {config.model_type!r}."
        )
    architectures = config.architectures or []
    vit_class = ViTForImageClassification if "ViTForImageClassification" in architectures else ViTModel
    return vit_class.from_pretrained(vit)


def _backbone_state_dict(vit: PreTrainedModel) -> dict:
    """The ViT weights under MSViT base-model names (without the `msvit.` prefix), plus `classifier.*` if present."""
    state = vit.state_dict()
    if isinstance(vit, ViTForImageClassification):
        converted = {key[len("vit.") :]: value for key, value in state.items() if key.startswith("vit.")}
        converted.update({key: value for key, value in state.items() if key.startswith("classifier.")})
        return converted
    return dict(state)


def convert_vit_to_msvit(vit, msvit_class, **config_overrides):
    """Builds `msvit_class` (MSViTModel or MSViTForImageClassification) from a ViT; see `from_vit_pretrained`."""
    vit = _load_vit(vit)
    config = msvit_config_from_vit_config(vit.config, **config_overrides)
    if hasattr(vit.config, "_attn_implementation"):
        config._attn_implementation = vit.config._attn_implementation
    model = msvit_class(config)
    source = _backbone_state_dict(vit)

    prefix = "" if model.base_model_prefix not in dict(model.named_children()) else model.base_model_prefix + "."
    target_keys = set(model.state_dict())
    state = {}
    for key, value in source.items():
        target = key if key.startswith("classifier.") else prefix + key
        if target in target_keys:
            state[target] = value
    vit_layers = vit.config.num_hidden_layers
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = tuple(prefix + p for p in NEW_PARAMETER_PREFIXES) + ("classifier.", prefix + "pooler.")
    not_converted = [key for key in missing if not key.startswith(allowed_missing)]
    if not_converted or unexpected:
        raise ValueError(
            f"Could not map the {vit_layers}-layer ViT onto MSViT: missing {not_converted[:5]}, unexpected "
            f"{list(unexpected)[:5]}."
        )
    return model.to(vit.dtype).eval()
