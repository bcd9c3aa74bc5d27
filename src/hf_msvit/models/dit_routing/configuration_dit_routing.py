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
"""DiT (dynamic token routing, arXiv 2308.03409) model configuration"""

import importlib

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.utils import auto_docstring


# `auto_docstring` looks the config up by folder name among transformers' built-in models and prints an error for
# models that live outside transformers; this tells it where ours is.
_autodoc = importlib.import_module("transformers.utils.auto_docstring")
for _name in ("dit_routing", "dit-routing"):
    getattr(_autodoc, "HARDCODED_CONFIG_FOR_MODELS", {}).setdefault(_name, "DiTConfig")


ROUTING_MODES = ("dynamic", "static", "full")
PER_SCALE_FIELDS = (
    "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios",
)  # fmt: skip

AUTO_MAP = {
    "AutoConfig": "configuration_dit_routing.DiTConfig",
    "AutoModel": "modeling_dit_routing.DiTModel",
    "AutoModelForImageClassification": "modeling_dit_routing.DiTForImageClassification",
    "AutoBackbone": "modeling_dit_routing.DiTBackbone",
}

# PVTv2-B0..B5 shapes (whai362/PVT `classification/pvt_v2.py`), with the PVTv2 drop-path rates (dit.md §4.1, §7.10).
_NARROW, _WIDE = [32, 64, 160, 256], [64, 128, 320, 512]
DIT_VARIANTS = {
    "b0": {"hidden_sizes": _NARROW, "depths": [2, 2, 2, 2], "mlp_ratios": [8, 8, 4, 4], "drop_path_rate": 0.1},
    "b1": {"hidden_sizes": _WIDE, "depths": [2, 2, 2, 2], "mlp_ratios": [8, 8, 4, 4], "drop_path_rate": 0.1},
    "b2": {"hidden_sizes": _WIDE, "depths": [3, 4, 6, 3], "mlp_ratios": [8, 8, 4, 4], "drop_path_rate": 0.1},
    "b3": {"hidden_sizes": _WIDE, "depths": [3, 4, 18, 3], "mlp_ratios": [8, 8, 4, 4], "drop_path_rate": 0.3},
    "b4": {"hidden_sizes": _WIDE, "depths": [3, 8, 27, 3], "mlp_ratios": [8, 8, 4, 4], "drop_path_rate": 0.3},
    "b5": {"hidden_sizes": _WIDE, "depths": [3, 6, 40, 3], "mlp_ratios": [4, 4, 4, 4], "drop_path_rate": 0.3},
}


@auto_docstring(checkpoint="hf-msvit/dit-b2-224")
@strict
class DiTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    num_encoder_blocks (`int`, *optional*, defaults to 4):
        Number of scales (rows of the routing grid), i.e. of PVTv2 stages. Every per-scale list has this length.
    sr_ratios (`list[int]`, *optional*, defaults to `[8, 4, 2, 1]`):
        Spatial reduction ratio of the attention keys/values at each scale (PVTv2).
    patch_sizes (`list[int]`, *optional*, defaults to `[7, 3, 3, 3]`):
        Kernel size of the overlapping patch embedding into each scale (the stem for scale 0).
    strides (`list[int]`, *optional*, defaults to `[4, 2, 2, 2]`):
        Stride of the overlapping patch embedding into each scale.
    num_attention_heads (`list[int]`, *optional*, defaults to `[1, 2, 5, 8]`):
        Number of attention heads at each scale.
    mlp_ratios (`list[int]`, *optional*, defaults to `[8, 8, 4, 4]`):
        Ratio of the MLP hidden size to the hidden size at each scale.
    num_routing_columns (`int`, *optional*, defaults to 4):
        Number of transformer-stage columns of the routing grid (`M` in the paper). Every scale holds this many copies
        of its PVTv2 stage; there are `M + 1` node columns. The paper's grid is 4x4 (`M = 4`). Must be at least
        `num_encoder_blocks`, so that the PVTv2 staircase (the static route) fits.
    routing_mode (`str`, *optional*, defaults to `"dynamic"`):
        `"dynamic"`: learned row (per-token) and column (per-image) gates. `"static"`: the plain PVTv2 path (stage `i`
        at column `i`, every token computed, all other edges closed); an upcycled model then equals its PVTv2.
        `"full"`: every gate open, every token computed (the paper's "Fully" ablation, about 4x the static cost).
    gumbel_temperature (`float`, *optional*, defaults to 1.0):
        Temperature of the straight-through Gumbel-softmax that samples gate decisions in training.
    gate_ema_momentum (`float`, *optional*, defaults to 0.999):
        Momentum `m` of the EMA copies of the gate weights (`w_ema <- m * w_ema + (1 - m) * w`, paper Eq. 3), updated
        at every training forward and used for the deterministic decisions at inference.
    gate_init_compute_prob (`float`, *optional*, defaults to 0.9):
        Initial probability that a gate opens (a token is computed, an image is downsampled); sets the gate biases.
        The paper starts with every mask entry at 1.
    budget_target (`float`, *optional*, defaults to 1.0):
        Target `mu` of the budget loss: the wanted expected cost of the routed grid, relative to the cost of the static
        PVTv2 route at the same input size. The paper's DiT-B1..B4 sit at about 0.95, DiT-B5 at about 0.87.
    budget_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight `lambda_C` of the budget loss when it is folded into `loss` (dynamic mode only).
    drop_path_rate (`float`, *optional*, defaults to 0.0):
        Stochastic depth rate, spread linearly over the blocks of one PVTv2 pass (the same rate for every copy of a
        block in the grid).
    out_features (`list[str]`, *optional*):
        If used as backbone, list of features to output. Can be any of `"stem"` (the stem embedding) and `"stage1"` ...
        `"stage4"` (the last node column at strides 4, 8, 16, 32). Defaults to the last stage.
    out_indices (`list[int]`, *optional*):
        If used as backbone, list of indices of features to output.

    Example:

    ```python
    >>> from hf_msvit import DiTConfig, DiTForImageClassification

    >>> configuration = DiTConfig.from_variant("b2", routing_mode="dynamic", budget_target=0.95)
    >>> model = DiTForImageClassification(configuration)
    ```"""

    model_type = "dit_routing"
    # Extra outputs that Trainer must not hand to `compute_metrics` as predictions.
    keys_to_ignore_at_inference = [
        "budget_loss",
        "macs",
        "downsampled",
        "stage_keep_ratio",
        "token_keep_ratio",
        "hidden_states",
        "attentions",
        "pooler_output",
    ]

    image_size: int | list[int] | tuple[int, int] = 224
    num_channels: int = 3
    num_encoder_blocks: int = 4
    depths: list[int] | tuple[int, ...] = (2, 2, 2, 2)
    sr_ratios: list[int] | tuple[int, ...] = (8, 4, 2, 1)
    hidden_sizes: list[int] | tuple[int, ...] = (32, 64, 160, 256)
    patch_sizes: list[int] | tuple[int, ...] = (7, 3, 3, 3)
    strides: list[int] | tuple[int, ...] = (4, 2, 2, 2)
    num_attention_heads: list[int] | tuple[int, ...] = (1, 2, 5, 8)
    mlp_ratios: list[int] | tuple[int, ...] = (8, 8, 4, 4)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    drop_path_rate: float | int = 0.0
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    num_routing_columns: int = 4
    routing_mode: str = "dynamic"
    gumbel_temperature: float | int = 1.0
    gate_ema_momentum: float | int = 0.999
    gate_init_compute_prob: float | int = 0.9
    budget_target: float | int = 1.0
    budget_loss_weight: float | int = 1.0
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        for name in PER_SCALE_FIELDS[:-1]:
            setattr(self, name, [int(v) for v in getattr(self, name)])
        self.mlp_ratios = list(self.mlp_ratios)
        # The one place that writes `auto_map`: every checkpoint names all our classes, so `AutoModel`/`AutoBackbone`
        # also load a classification checkpoint with trust_remote_code=True. (`register_for_auto_class` in the modeling
        # file only makes `save_pretrained` copy the code; it adds no entry beyond these.)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        # Checked here as well as by `@strict` so that building a bad config raises a plain `ValueError`.
        self.validate_architecture()
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_encoder_blocks + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks that the values fit together; raises `ValueError` naming the field to fix."""
        num_scales = self.num_encoder_blocks
        if num_scales < 1:
            raise ValueError(f"num_encoder_blocks must be >= 1, got {num_scales}.")
        for name in PER_SCALE_FIELDS:
            values = getattr(self, name)
            if len(values) != num_scales:
                raise ValueError(
                    f"{name} has {len(values)} entries but num_encoder_blocks is {num_scales}; "
                    "give one value per scale."
                )
            if any(v <= 0 for v in values):
                raise ValueError(f"{name} must hold positive values, got {list(values)}.")
        for scale, (hidden, heads) in enumerate(zip(self.hidden_sizes, self.num_attention_heads)):
            if hidden % heads != 0:
                raise ValueError(
                    f"hidden_sizes[{scale}] ({hidden}) must be divisible by num_attention_heads[{scale}] ({heads})."
                )
        if self.routing_mode not in ROUTING_MODES:
            raise ValueError(f"routing_mode must be one of {ROUTING_MODES}, got {self.routing_mode!r}.")
        if self.num_routing_columns < num_scales:
            raise ValueError(
                f"num_routing_columns ({self.num_routing_columns}) must be >= num_encoder_blocks ({num_scales}): the "
                "static route runs stage i at column i, so the grid needs at least one column per scale."
            )
        if self.gumbel_temperature <= 0:
            raise ValueError(f"gumbel_temperature must be positive, got {self.gumbel_temperature}.")
        if not 0.0 <= self.gate_ema_momentum < 1.0:
            raise ValueError(f"gate_ema_momentum must lie in [0, 1), got {self.gate_ema_momentum}.")
        if not 0.0 < self.gate_init_compute_prob < 1.0:
            raise ValueError(f"gate_init_compute_prob must lie in (0, 1), got {self.gate_init_compute_prob}.")
        if self.budget_target <= 0:
            raise ValueError(
                f"budget_target must be positive (relative to the static PVTv2 cost), got {self.budget_target}."
            )
        if self.budget_loss_weight < 0:
            raise ValueError(f"budget_loss_weight must be >= 0, got {self.budget_loss_weight}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}.")

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "DiTConfig":
        """The DiT variant `"b0"` ... `"b5"` with the PVTv2-B0..B5 shapes; keyword arguments override any field."""
        key = name.lower().removeprefix("dit-").removeprefix("dit_")
        if key not in DIT_VARIANTS:
            raise ValueError(f"Unknown DiT variant {name!r}; choose one of {sorted(DIT_VARIANTS)}.")
        values = {name: list(v) if isinstance(v, list) else v for name, v in DIT_VARIANTS[key].items()}
        values.update(overrides)
        return cls(**values)

    @property
    def num_scales(self) -> int:
        return self.num_encoder_blocks

    @property
    def static_columns(self) -> list[int]:
        """Column of the one stage per scale that the static (PVTv2) route runs: stage `i` at column `i`."""
        return list(range(self.num_encoder_blocks))


__all__ = ["DiTConfig"]
