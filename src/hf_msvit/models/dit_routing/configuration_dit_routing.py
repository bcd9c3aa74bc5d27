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
GATE_INITS = ("all_open", "static_route")
STAGE_INPUTS = ("full_map", "masked_map")
BUDGET_DECISIONS = ("deterministic", "sampled")

# The fields that define a PVTv2 network (DiT and `PvtV2Config` share their names and meanings): the one list the
# converter, `DiTConfig.pvt_v2_shape()` and everything that builds a PVTv2 twin of a DiT use.
PVT_V2_SHAPE_FIELDS = (
    "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides",
    "num_attention_heads", "mlp_ratios", "hidden_act", "layer_norm_eps", "qkv_bias",
)  # fmt: skip
# The shape plus the input size, regularization and initialization settings that upcycling copies from PVTv2.
PVT_V2_SHARED_FIELDS = PVT_V2_SHAPE_FIELDS + (
    "image_size", "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "drop_path_rate",
)  # fmt: skip
# Shape fields with one value per scale.
PER_SCALE_FIELDS = (
    "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides", "num_attention_heads", "mlp_ratios",
)  # fmt: skip

AUTO_MAP = {
    "AutoConfig": "configuration_dit_routing.DiTConfig",
    "AutoModel": "modeling_dit_routing.DiTModel",
    "AutoModelForImageClassification": "modeling_dit_routing.DiTForImageClassification",
    "AutoBackbone": "modeling_dit_routing.DiTBackbone",
}

# PVTv2-B0..B5 shapes (whai362/PVT `classification/pvt_v2.py`) with PVTv2's own drop-path rates.
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
    gate_noise_scale (`float`, *optional*, defaults to 1.0):
        Scale of the Gumbel noise of the training decisions (1: the paper's Gumbel-softmax samples; 0: training takes
        the deterministic decisions inference takes, `p >= 0.5`, with straight-through gradients of the soft sample, so
        the budget binds on the route evaluation computes). `from_pvt_v2_pretrained` uses 0 unless told otherwise.
    gate_ema_momentum (`float`, *optional*, defaults to 0.999):
        Momentum `m` of the EMA copies of the gate weights (`w_ema <- m_t * w_ema + (1 - m_t) * w`, paper Eq. 3),
        updated at every training forward and used for the deterministic decisions at inference. The EMA is kept in
        float32 whatever the model's dtype.
    gate_ema_warmup_steps (`int`, *optional*, defaults to 10):
        Warm-up of the EMA momentum: update `t` (from 0) uses `m_t = min(m, t / (t + gate_ema_warmup_steps))`, so the
        first update copies the weights and a short run's EMA follows the trained gates instead of lagging behind them
        (`m_t` reaches 0.9 after 90 updates and 0.99 after 990 with the default 10). 0 turns the warm-up off.
    gate_init (`str`, *optional*, defaults to `"all_open"`):
        How new gates start. `"all_open"`: every gate opens with probability `gate_init_compute_prob` (the paper,
        which starts with every mask entry at 1; for training from scratch). `"static_route"`: the gates of PVTv2's
        staircase (stage `i` at column `i`, edge `i -> i + 1` at column `i + 1`) open with probability
        `gate_init_compute_prob`, all others with `1 - gate_init_compute_prob`, and gate weights start at zero: an
        upcycled model starts at exactly PVTv2's route and cost. `from_pvt_v2_pretrained` uses `"static_route"` unless
        told otherwise.
    gate_init_compute_prob (`float`, *optional*, defaults to 0.9):
        Initial probability that an open gate opens (a token is computed, an image is downsampled); sets the gate
        biases (see `gate_init`).
    gate_threshold (`float`, *optional*, defaults to 0.5):
        At inference a row gate computes a token when its probability of computing it (under the EMA weights) is
        `>= gate_threshold` (0.5: the more likely choice). Higher values compute fewer tokens. Can also be passed to
        `forward`. Column gates always take the more likely choice.
    stage_input (`str`, *optional*, defaults to `"full_map"`):
        What a transformer stage sees of the tokens its row gate skips. `"full_map"`: their identity values supply the
        keys/values (attention context as in the PVTv2 stage it was upcycled from); the MLP runs on computed tokens
        only, so its depth-wise conv sees zeros at skipped positions. `"masked_map"`: the paper's Eq. 4 read literally,
        the stage runs on the masked map `G * F` (skipped tokens are zeros inside the stage). Skipped tokens keep their
        input values in the node either way, and both cost the same.
    budget_target (`float`, *optional*, defaults to 1.0):
        Target `mu` of the budget loss: the wanted cost of the routed grid, relative to the cost of the static PVTv2
        route at the same input size. The paper's DiT-B1..B4 sit at about 0.95, DiT-B5 at about 0.87.
    budget_loss_weight (`float`, *optional*, defaults to 10.0):
        Weight `lambda_C` of the budget loss when it is folded into `loss` (dynamic mode only). The paper does not give
        it; the squared loss is weak near its target, and on the built-in data weight 1 let budget 0.6 drift to 0.55
        where 10 held it at 0.59 (`docs/dit.md`).
    budget_decisions (`str`, *optional*, defaults to `"deterministic"`):
        Which decisions the budget loss prices in training. `"deterministic"`: the decisions inference would take with
        the current gate weights (`p >= gate_threshold` for rows, the likelier choice for columns; straight-through
        gradients of the probabilities), so the budget binds on what evaluation computes. `"sampled"`: the Gumbel
        samples the training forward used (the paper); their cost is an expectation over samples, which differs from
        what the deterministic inference computes when many probabilities sit between 0 and 1.
    sparse_training (`bool`, *optional*, defaults to `False`):
        What a training forward of the dynamic route computes. `False`: every node of the grid, densely (the paper):
        the straight-through gradients then also reach the gates of closed stages and edges, but a step costs several
        times PVTv2's. `True`: only the nodes some image of the batch reaches and the stages some token runs through
        (still densely within a stage, so the row gates of a running stage get their full gradient): a step costs
        about what the route costs; closed stages and edges then move only through the budget loss. Every process
        computes the same stages (the choice is reduced over processes); under DDP set `find_unused_parameters=True`.
    compute_budget (`float`, *optional*):
        Inference option: every image computes exactly this fraction of the static (PVTv2) route's cost (within 2%, as
        `macs` reports it) instead of thresholding the row gates. The images follow PVTv2's route and every stage on it
        computes the same number of tokens in every image, those its row gate scores highest, the same fraction at
        every scale. Equal work per image: rectangular batches, no host syncs, a fixed latency, exportable graphs.
        Also a `forward` argument. In `(0, 1]`; 1 is PVTv2's function exactly.
    compute_budget_profile (`list[float]`, *optional*):
        How the exact-budget mode spreads its tokens over the scales: scale `i` computes `min(1, f * profile[i])` of
        its tokens, `f` set by the budget (0 skips the scale's stage). Unset: the same fraction at every scale.
        `model.calibrate_compute_budget(pixel_values)` sets it to what the trained gates compute per scale, so the
        budget mode keeps the trained model's allocation (a model trained at a budget learns a very uneven one).
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
    gate_noise_scale: float | int = 1.0
    gate_ema_momentum: float | int = 0.999
    gate_ema_warmup_steps: int = 10
    gate_init: str = "all_open"
    gate_init_compute_prob: float | int = 0.9
    gate_threshold: float | int = 0.5
    stage_input: str = "full_map"
    budget_target: float | int = 1.0
    budget_loss_weight: float | int = 10.0
    budget_decisions: str = "deterministic"
    sparse_training: bool = False
    compute_budget: float | int | None = None
    compute_budget_profile: list[float] | None = None
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        for name in PER_SCALE_FIELDS:  # lists (JSON round trip); integers except the MLP ratios
            values = list(getattr(self, name))
            setattr(self, name, values if name == "mlp_ratios" else [int(v) for v in values])
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
        self._validate_shape()
        self._validate_routing()

    def _validate_shape(self):
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
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {self.drop_path_rate}.")

    def _validate_routing(self):
        for name, choices in (
            ("routing_mode", ROUTING_MODES),
            ("gate_init", GATE_INITS),
            ("stage_input", STAGE_INPUTS),
            ("budget_decisions", BUDGET_DECISIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.num_routing_columns < self.num_encoder_blocks:
            raise ValueError(
                f"num_routing_columns ({self.num_routing_columns}) must be >= num_encoder_blocks "
                f"({self.num_encoder_blocks}): the static route runs stage i at column i, so the grid needs at least "
                "one column per scale."
            )
        checks = (
            ("gumbel_temperature", self.gumbel_temperature > 0, "positive"),
            ("gate_noise_scale", self.gate_noise_scale >= 0, ">= 0"),
            ("gate_ema_momentum", 0.0 <= self.gate_ema_momentum < 1.0, "in [0, 1)"),
            ("gate_ema_warmup_steps", self.gate_ema_warmup_steps >= 0, ">= 0"),
            ("gate_init_compute_prob", 0.0 < self.gate_init_compute_prob < 1.0, "in (0, 1)"),
            ("gate_threshold", 0.0 <= self.gate_threshold <= 1.0, "in [0, 1]"),
            ("budget_target", self.budget_target > 0, "positive (relative to the static PVTv2 cost)"),
            ("budget_loss_weight", self.budget_loss_weight >= 0, ">= 0"),
        )
        for name, valid, wanted in checks:
            if not valid:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)}.")
        if self.compute_budget is not None:
            self.check_compute_budget(self.compute_budget)
        profile = self.compute_budget_profile
        if profile is not None and (
            len(profile) != self.num_encoder_blocks or not all(0.0 <= p <= 1.0 for p in profile) or max(profile) <= 0
        ):
            raise ValueError(
                f"compute_budget_profile must hold one fraction in [0, 1] per scale ({self.num_encoder_blocks}), not "
                f"all 0, got {profile}: set it with model.calibrate_compute_budget(pixel_values)."
            )

    @staticmethod
    def check_compute_budget(budget) -> None:
        """Raises `ValueError` unless `budget` is a fraction of the static cost in `(0, 1]`."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget <= 1.0:
            raise ValueError(
                f"compute_budget must be a fraction of the static (PVTv2) route's cost in (0, 1], got {budget!r}."
            )

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "DiTConfig":
        """The DiT variant `"b0"` ... `"b5"` with the PVTv2-B0..B5 shapes; keyword arguments override any field."""
        key = name.lower().removeprefix("dit-").removeprefix("dit_")
        if key not in DIT_VARIANTS:
            raise ValueError(f"Unknown DiT variant {name!r}; choose one of {sorted(DIT_VARIANTS)}.")
        values = {name: _plain(v) for name, v in DIT_VARIANTS[key].items()}
        values.update(overrides)
        return cls(**values)

    @property
    def static_columns(self) -> list[int]:
        """Column of the one stage per scale that the static (PVTv2) route runs: stage `i` at column `i`."""
        return list(range(self.num_encoder_blocks))

    @property
    def linear_attention(self) -> bool:
        """Read by transformers' PVTv2 blocks, which DiT reuses: DiT has no linear-attention ("-Li") variant."""
        return False

    def pvt_v2_shape(self) -> dict:
        """The `PvtV2Config` keyword arguments of the PVTv2 network this DiT is a grid of (`PVT_V2_SHAPE_FIELDS`), e.g.
        `PvtV2Config(**DiTConfig.from_variant("b0").pvt_v2_shape(), image_size=96, num_labels=10)`."""
        return {name: _plain(getattr(self, name)) for name in PVT_V2_SHAPE_FIELDS}


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


__all__ = ["PVT_V2_SHAPE_FIELDS", "DiTConfig"]
