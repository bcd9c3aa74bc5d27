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
"""Upcycling PVTv2 checkpoints (`model_type="pvt_v2"`) into DiT.

The grid is built from PVTv2's modules, with the same parameter names, so the conversion is a key mapping:

| PVTv2 key                                  | DiT key (every column `j`)                   |
|--------------------------------------------|----------------------------------------------|
| `encoder.layers.0.patch_embedding.*`       | `stem.*`                                     |
| `encoder.layers.{i}.patch_embedding.*`     | `patch_embeddings.{i-1}.{j}.*` (i >= 1)      |
| `encoder.layers.{i}.blocks.*`              | `grid.{i}.{j}.blocks.*`                      |
| `encoder.layers.{i}.layer_norm.*`          | `grid.{i}.{j}.layer_norm.*`                  |
| `classifier.*`                             | `classifier.*` (classification model only)   |

Gates (`row_gates`, `column_gates`) are new. Unless told otherwise (`UPCYCLING_DEFAULTS`) they start on PVTv2's route
(`gate_init="static_route"`), so the upcycled dynamic model starts at exactly PVTv2's function and cost, training
takes the decisions inference takes (`gate_noise_scale=0`) and computes only the stages some token runs
(`sparse_training=True`).
"""

import re

import torch
from transformers import AutoConfig, PreTrainedModel, PvtV2Config, PvtV2ForImageClassification, PvtV2Model

from .configuration_dit_routing import PVT_V2_SHARED_FIELDS, DiTConfig


# Upcycling starts on PVTv2's route and trains on the route inference takes (no Gumbel noise): measured on the built-in
# data, the Gumbel-sampled training forward left the evaluated cost 0.01-0.04 under every budget, noise-free training
# hit it. Sparse training: a step costs 1.6x PVTv2's instead of 5x, at the same accuracy at budget 0.8 (docs/dit.md).
UPCYCLING_DEFAULTS = {"gate_init": "static_route", "gate_noise_scale": 0.0, "sparse_training": True}

_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(patch_embedding|blocks|layer_norm)\.(.+)$")


def _load_pvt_v2(pvt, want_classifier: bool) -> PreTrainedModel:
    if isinstance(pvt, PreTrainedModel):
        model = pvt
    else:
        config = AutoConfig.from_pretrained(pvt)
        if getattr(config, "model_type", None) != "pvt_v2":
            raise ValueError(
                f"{pvt!r} is a {getattr(config, 'model_type', type(config).__name__)!r} checkpoint; DiT upcycles only "
                "PVTv2 checkpoints (model_type 'pvt_v2', e.g. 'OpenGVLab/pvt_v2_b2')."
            )
        architectures = config.architectures or []
        has_head = any("Classification" in name for name in architectures)
        model_class = PvtV2ForImageClassification if want_classifier and has_head else PvtV2Model
        model = model_class.from_pretrained(pvt)
    if not isinstance(model.config, PvtV2Config):
        raise ValueError(
            f"Expected a PVTv2 model (PvtV2Model, PvtV2ForImageClassification, PvtV2Backbone), got "
            f"{type(model).__name__} with a {type(model.config).__name__}."
        )
    if model.config.linear_attention:
        raise ValueError("PVTv2 checkpoints with linear_attention=True ('-Li' variants) are not supported by DiT.")
    return model


def dit_config_from_pvt_v2(pvt_config: PvtV2Config, **config_overrides) -> DiTConfig:
    """A `DiTConfig` with the shapes (and labels) of `pvt_config`; keyword arguments override any field."""
    values = {name: getattr(pvt_config, name) for name in PVT_V2_SHARED_FIELDS}
    if isinstance(values["image_size"], (list, tuple)):
        values["image_size"] = list(values["image_size"])
    values["id2label"] = dict(pvt_config.id2label)
    values["label2id"] = dict(pvt_config.label2id)
    values.update(config_overrides)
    return DiTConfig(**values)


def pvt_v2_state_dict_to_dit(state_dict: dict[str, torch.Tensor], config: DiTConfig, prefix: str) -> dict:
    """Maps a PVTv2 state dict (keys with or without the `pvt_v2.` prefix) to DiT keys under `prefix`."""
    converted = {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("pvt_v2.")
        if key.startswith("classifier."):
            converted[key] = tensor
            continue
        match = _LAYER_KEY.match(key)
        if match is None:
            raise ValueError(f"Unexpected PVTv2 parameter {key!r}; is this a PVTv2 checkpoint?")
        scale, kind, rest = int(match.group(1)), match.group(2), match.group(3)
        if kind == "patch_embedding":
            if scale == 0:
                converted[f"{prefix}stem.{rest}"] = tensor
            else:
                for column in range(config.num_routing_columns + 1):
                    converted[f"{prefix}patch_embeddings.{scale - 1}.{column}.{rest}"] = tensor.clone()
        else:
            for column in range(config.num_routing_columns):
                converted[f"{prefix}grid.{scale}.{column}.{kind}.{rest}"] = tensor.clone()
    return converted


def convert_pvt_v2_to_dit(dit_class, pvt, **config_overrides):
    """Builds `dit_class` (DiTModel, DiTForImageClassification or DiTBackbone) from a PVTv2 checkpoint or model."""
    want_classifier = "Classification" in dit_class.__name__
    pvt_model = _load_pvt_v2(pvt, want_classifier)
    config = dit_config_from_pvt_v2(pvt_model.config, **{**UPCYCLING_DEFAULTS, **config_overrides})
    dit_model = dit_class(config)
    prefix = f"{dit_class.base_model_prefix}." if want_classifier else ""
    state_dict = pvt_v2_state_dict_to_dit(pvt_model.state_dict(), config, prefix)
    if not want_classifier or not isinstance(getattr(dit_model, "classifier", None), torch.nn.Linear):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
    missing, unexpected = dit_model.load_state_dict(state_dict, strict=False)
    new_parameters = ("row_gates.", "column_gates.", "classifier.")
    missing = [k for k in missing if not any(part in k for part in new_parameters)]
    if missing or unexpected:
        raise ValueError(
            f"PVTv2 -> DiT conversion did not match: missing {missing[:8]}, unexpected {unexpected[:8]}. Do the PVTv2 "
            "config and the DiT overrides agree on the shapes?"
        )
    return dit_model.eval() if not pvt_model.training else dit_model


__all__ = ["convert_pvt_v2_to_dit", "dit_config_from_pvt_v2", "pvt_v2_state_dict_to_dit"]
