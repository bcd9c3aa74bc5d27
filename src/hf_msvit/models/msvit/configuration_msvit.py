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
"""MSViT model configuration"""

import importlib

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin
from transformers.utils import auto_docstring


# `auto_docstring` looks the config up by folder name among transformers' built-in models and prints an error for
# models that live outside transformers; this tells it where ours is.
_autodoc = importlib.import_module("transformers.utils.auto_docstring")
getattr(_autodoc, "HARDCODED_CONFIG_FOR_MODELS", {}).setdefault("msvit", "MSViTConfig")


GATE_INPUTS = ("pixels", "embeddings")
GBAS_INPUTS = ("probs", "samples")
GATE_TRAINING_MODES = ("masked_attention", "straight_through")
GATE_SAMPLING_LEVELS = ("threshold", "target")
TOKEN_BATCHING_MODES = ("bucket", "pad", "per_image", "pack")
AUTO_MAP = {
    "AutoConfig": "configuration_msvit.MSViTConfig",
    "AutoModel": "modeling_msvit.MSViTModel",
    "AutoModelForImageClassification": "modeling_msvit.MSViTForImageClassification",
    "AutoModelForSemanticSegmentation": "modeling_msvit.MSViTForSemanticSegmentation",
    "AutoBackbone": "modeling_msvit.MSViTBackbone",
}


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"Expected an int or a pair (height, width), got {value!r}.")
        return int(value[0]), int(value[1])
    return int(value), int(value)


def vit_layer_macs(config, num_tokens):
    """MACs of one ViT layer on a sequence of `num_tokens` tokens: q/k/v/o projections, attention scores and weighted
    sum, MLP. (Norms, activations and residuals are not multiply-accumulates of matrices.)"""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    return num_tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * num_tokens * num_tokens * hidden


def vit_macs(config, num_patches: int, with_pooler: bool = False) -> int:
    """MACs per image of a static ViT (transformers' `ViTModel`, or MSViT with a fixed tokenization) embedding and
    encoding `num_patches` patches of `config.patch_size` plus CLS. With `vit_layer_macs`, the one ViT MAC formula of
    the package (here, below the modeling file, because the config sizes its gate with it)."""
    embedding = num_patches * config.num_channels * config.patch_size**2 * config.hidden_size
    encoder = config.num_hidden_layers * vit_layer_macs(config, num_patches + 1)
    pooler = config.hidden_size * getattr(config, "pooler_output_size", config.hidden_size) if with_pooler else 0
    return int(embedding + encoder + pooler)


@auto_docstring(checkpoint="hf-msvit/msvit-small-patch16-224")
@strict
class MSViTConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    coarse_patch_size (`int`, *optional*, defaults to 32):
        Side of a coarse region in pixels. Each region enters the encoder either as one coarse token or as
        `(coarse_patch_size / patch_size) ** 2` fine tokens. Must be an integer multiple (>= 2) of `patch_size`.
    gate_input (`str`, *optional*, defaults to `"pixels"`):
        What the gate sees of a coarse region: `"pixels"` (the region's normalized pixels, flattened) or
        `"embeddings"` (the coarse token embedding, i.e. the patch embedding of the downsampled region).
    gate_hidden_size (`int`, *optional*):
        Width of the hidden layers of the gate MLP. Defaults to the widest gate (between 8 and 256) whose MACs stay
        within `gate_cost_fraction` of the static ViT's MACs per region, so the gate scales with the backbone.
    gate_cost_fraction (`float`, *optional*, defaults to 0.02):
        Budget of the default `gate_hidden_size`: the gate's MACs per region as a fraction of the static ViT's.
    gate_num_layers (`int`, *optional*, defaults to 4):
        Number of linear layers of the gate MLP (the paper uses a 4-layer MLP).
    gate_threshold (`float`, *optional*, defaults to 0.5):
        At inference a region is tokenized fine when its gate probability is `>= gate_threshold`. Can also be passed
        to `forward` for one call. Higher thresholds give fewer fine regions (less compute).
    gumbel_temperature (`float`, *optional*, defaults to 1.0):
        Temperature of the Gumbel-sigmoid used to sample gate decisions in training (a region is fine with
        probability `sigmoid(logit)` whatever the temperature; it scales the straight-through gradient).
    gate_noise_scale (`float`, *optional*, defaults to 1.0):
        Scale of the logistic (Gumbel-sigmoid) noise of the training decisions: 1 samples a region fine with
        probability `sigmoid(logit)`; 0 takes the deterministic decisions inference takes (`p >= gate_threshold`), with
        the straight-through gradient of `sigmoid(logit / gumbel_temperature)`, so training sees the token mix
        inference computes. As DiT's field of the same name.
    gate_sampling_level (`str`, *optional*, defaults to `"threshold"`):
        Where sampled training decisions (`gate_noise_scale > 0`) are cut. `"threshold"`: a region is fine when its
        noisy probability is `>= gate_threshold`; the logistic noise then pulls the training ratio towards 0.5 wherever
        logits sit near the threshold. `"target"`: the batch's `gbas_target_ratio` fraction of regions with the
        highest noisy logits is fine (the straight-through gradient centred on that cut and blind to a shift of every
        logit, as the ranked decisions are), so the backbone trains on the token mix inference computes (the level
        term holds inference's threshold at that level) while which regions go fine still varies. Noise-free
        decisions are inference's either way.
    gate_level_loss_weight (`float`, *optional*, defaults to 0.0):
        Weight of the level term folded into the gate loss: the squared distance of the batch's `(1 -
        gbas_target_ratio)` quantile of the gate logits from `logit(gate_threshold)`. It holds the gate's own level
        where inference thresholds (a `gbas_target_ratio` fraction of regions at `p >= gate_threshold`), so the
        calibration offset stays small; unlike GBaS on probabilities its gradient does not vanish when the gate
        saturates (a gate started at bias -20 still moves).
    gate_logit_loss_weight (`float`, *optional*, defaults to 0.0):
        Weight of the logit penalty folded into the gate loss: the mean squared gate logit, as the router z-loss of
        ST-MoE keeps router logits small. Decisions need logits within a few units of the threshold; without it an
        upcycled gate's logits drifted to -57.8 on some seeds (Adam keeps moving weights whose gradient the saturated
        sigmoid has all but cut; the study's level table), and the gate's gradient then rivalled the backbone's under
        the shared gradient-norm clipping. 0.01 when upcycled (`UPCYCLING_DEFAULTS`).
    gate_level_calibration (`bool`, *optional*, defaults to `True`):
        Calibrate the gate's level for inference, as BatchNorm keeps running statistics: training tracks a running
        average of the batch's `(1 - gbas_target_ratio)` quantile of the gate logits, and inference subtracts it, so
        the target fraction of regions (on data like the training data) scores `p >= gate_threshold = 0.5`. Training
        itself is unchanged. GBaS alone landed 0.05-0.07 above a 0.25 target on the built-in data (docs/msvit.md).
    gate_calibration_momentum (`float`, *optional*, defaults to 0.9):
        Momentum of the running level offset (`offset <- m * offset + (1 - m) * batch quantile`).
    gate_training_mode (`str`, *optional*, defaults to `"masked_attention"`):
        How the gate gets its task gradient in training. `"masked_attention"`: both tokenizations of every region are
        in the sequence and the attention keys are weighted by the sampled 0/1 decisions (DynamicViT's masked
        softmax): the forward equals the selected tokenization, and a dropped tokenization's gradient says what it
        would have contributed. `"straight_through"`: only the selected tokens are encoded, scaled by the decisions
        (cheaper: no extra tokens; the gradient only sees the kept tokens).
    fine_region_budget (`int` or `float`, *optional*):
        Inference option: tokenize exactly this many regions fine per image (`int` count, or `float` fraction of the
        regions, rounded), those with the highest gate probabilities, instead of thresholding. Every image then has
        the same token count (no padding, fixed latency). Also a `forward` argument.
    gbas_target_ratio (`float`, *optional*, defaults to 0.5):
        Target fraction of coarse regions tokenized fine: the mean of the Gaussian hyperprior of the generalized
        batch-shaping (GBaS) loss.
    gbas_hyperprior_std (`float`, *optional*, defaults to 0.2):
        Standard deviation of the Gaussian hyperprior: how far the learned per-position fine ratios may spread around
        `gbas_target_ratio`.
    gbas_loss_weight (`float`, *optional*, defaults to 1.0):
        Weight of the GBaS loss when it is folded into `loss`. The loss is multiplied by the number of regions, so the
        pull on each gate does not depend on how many regions there are.
    gbas_input (`str`, *optional*, defaults to `"probs"`):
        What GBaS shapes: `"probs"`, the gate probabilities (deterministic, the values inference thresholds), or
        `"samples"`, the Gumbel-sigmoid samples of training. Samples are noisier than any prior with temperature
        below 1 allows, which biases the learned ratio low for targets under 0.5.
    gbas_prior_temperature (`float`, *optional*, defaults to 1.0):
        Temperature of the Relaxed-Bernoulli priors (their initial value if learned). At 1 the gate logits are
        shaped to a logistic spread around `logit(target)`, so `gate_threshold` moves the ratio smoothly; lower values
        ask for nearly binary gates.
    gbas_learn_prior_temperature (`bool`, *optional*, defaults to `False`):
        Learn one prior temperature per position (then `gbas_prior_temperature` must be below 1).
    gbas_temperature_l1_weight (`float`, *optional*, defaults to 0.0):
        Weight of an L1 penalty on the learned temperatures (favours peaky, nearly binary priors; as the GBaS
        notebook). Only with `gbas_learn_prior_temperature=True`.
    gbas_gather_across_processes (`bool`, *optional*, defaults to `False`):
        In distributed training, gather the gate values of all processes before computing the GBaS loss, so that the
        batch statistics match single-process training on the global batch.
    token_batching (`str`, *optional*, defaults to `"bucket"`):
        How images with different token counts share a batch in the encoder: `"bucket"` (sort by length and run
        groups of similar length, each padded to its longest), `"pad"` (one batch padded to the longest image),
        `"per_image"` (one image at a time) or `"pack"` (all images in one sequence with a block-diagonal attention
        mask). Outputs are the same; only speed differs (see benchmarks/RESULTS.md).
    bucket_overhead_tokens (`int`, *optional*, defaults to 256):
        For `token_batching="bucket"`: the fixed cost of running one more bucket, in tokens. Buckets are chosen to
        minimize `sum(images * longest + bucket_overhead_tokens)`; larger values give fewer, more padded buckets.
    pooler_output_size (`int`, *optional*):
        Dimensionality of the pooler layer. If None, defaults to `hidden_size`.
    pooler_act (`str`, *optional*, defaults to `"tanh"`):
        The activation function used by the pooler.
    semantic_loss_ignore_index (`int`, *optional*, defaults to 255):
        Label value that the semantic segmentation loss ignores (pixels without a class).
    out_features (`list[str]`, *optional*):
        If used as backbone (`MSViTBackbone`), the layers whose output becomes a feature map: `"stem"` (the embedded
        tokens) and `"stage1"` ... `"stage{num_hidden_layers}"`. Defaults to the last layer.
    out_indices (`list[int]`, *optional*):
        If used as backbone, the indices of those layers in `stage_names` (an alternative to `out_features`).

    Example:

    ```python
    >>> from hf_msvit import MSViTConfig, MSViTModel

    >>> configuration = MSViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
    ... intermediate_size=1536)
    >>> model = MSViTModel(configuration)
    ```"""

    model_type = "msvit"
    # Extra outputs that Trainer must not hand to `compute_metrics` as predictions.
    keys_to_ignore_at_inference = [
        "gate_loss",
        "gate_probs",
        "fine_region_mask",
        "num_tokens",
        "macs",
        "attention_mask",
        "hidden_states",
        "attentions",
    ]

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    pooler_output_size: int | None = None
    pooler_act: str = "tanh"
    coarse_patch_size: int = 32
    gate_input: str = "pixels"
    gate_hidden_size: int | None = None
    gate_cost_fraction: float | int = 0.02
    gate_num_layers: int = 4
    gate_threshold: float | int = 0.5
    gumbel_temperature: float | int = 1.0
    gate_noise_scale: float | int = 1.0
    gate_sampling_level: str = "threshold"
    gate_level_loss_weight: float | int = 0.0
    gate_logit_loss_weight: float | int = 0.0
    gate_level_calibration: bool = True
    gate_calibration_momentum: float | int = 0.9
    gate_training_mode: str = "masked_attention"
    fine_region_budget: int | float | None = None
    gbas_target_ratio: float | int = 0.5
    gbas_hyperprior_std: float | int = 0.2
    gbas_loss_weight: float | int = 1.0
    gbas_input: str = "probs"
    gbas_prior_temperature: float | int = 1.0
    gbas_learn_prior_temperature: bool = False
    gbas_temperature_l1_weight: float | int = 0.0
    gbas_gather_across_processes: bool = False
    token_batching: str = "bucket"
    bucket_overhead_tokens: int = 256
    semantic_loss_ignore_index: int = 255
    _out_features: list[str] | None = None
    _out_indices: list[int] | None = None

    def __post_init__(self, **kwargs):
        self.pooler_output_size = self.pooler_output_size or self.hidden_size
        if self.gate_hidden_size is None:
            self.gate_hidden_size = self.default_gate_hidden_size()
        # The one place that writes `auto_map`: every checkpoint names all our classes, so `AutoModel` also loads a
        # classification checkpoint with trust_remote_code=True. (`register_for_auto_class` in the modeling file only
        # makes `save_pretrained` copy the code; it adds no entry beyond these.)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(AUTO_MAP)
        # Checked here as well as by `@strict` so that building a bad config raises a plain `ValueError`.
        self.validate_architecture()
        self.stage_names = ["stem"] + [f"stage{idx}" for idx in range(1, self.num_hidden_layers + 1)]
        self.set_output_features_output_indices(
            out_indices=kwargs.pop("out_indices", None), out_features=kwargs.pop("out_features", None)
        )
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks that the values fit together; raises `ValueError` naming the field to fix."""
        self._validate_shape()
        for name, choices in (
            ("gate_input", GATE_INPUTS),
            ("token_batching", TOKEN_BATCHING_MODES),
            ("gbas_input", GBAS_INPUTS),
            ("gate_training_mode", GATE_TRAINING_MODES),
            ("gate_sampling_level", GATE_SAMPLING_LEVELS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        learned_temperature_ok = not self.gbas_learn_prior_temperature or self.gbas_prior_temperature < 1
        checks = (
            ("gate_num_layers", self.gate_num_layers >= 1, "positive"),
            ("gate_hidden_size", self.gate_hidden_size >= 1, "positive"),
            ("gbas_prior_temperature", self.gbas_prior_temperature > 0, "positive"),
            ("gbas_prior_temperature", learned_temperature_ok, "below 1 when learned"),
            ("gate_calibration_momentum", 0 <= self.gate_calibration_momentum < 1, "in [0, 1)"),
            ("gate_cost_fraction", 0 < self.gate_cost_fraction < 1, "in (0, 1)"),
            ("gate_threshold", 0.0 <= self.gate_threshold <= 1.0, "in [0, 1]"),
            ("gbas_target_ratio", 0.0 < self.gbas_target_ratio < 1.0, "in (0, 1)"),
            ("gbas_hyperprior_std", self.gbas_hyperprior_std > 0, "positive"),
            ("gumbel_temperature", self.gumbel_temperature > 0, "positive"),
            ("gate_noise_scale", self.gate_noise_scale >= 0, ">= 0"),
            ("gate_level_loss_weight", self.gate_level_loss_weight >= 0, ">= 0"),
            ("gate_logit_loss_weight", self.gate_logit_loss_weight >= 0, ">= 0"),
            ("bucket_overhead_tokens", self.bucket_overhead_tokens >= 0, ">= 0"),
        )
        for name, valid, wanted in checks:
            if not valid:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)}.")
        if self.fine_region_budget is not None:
            self.check_fine_region_budget(self.fine_region_budget)

    def _validate_shape(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.patch_size < 1 or self.coarse_patch_size % self.patch_size != 0:
            raise ValueError(
                f"coarse_patch_size ({self.coarse_patch_size}) must be an integer multiple of patch_size "
                f"({self.patch_size})."
            )
        if self.coarse_patch_size // self.patch_size < 2:
            raise ValueError(
                f"coarse_patch_size ({self.coarse_patch_size}) must be at least twice patch_size ({self.patch_size}), "
                "otherwise there is nothing to choose between."
            )
        height, width = _pair(self.image_size)
        if height % self.coarse_patch_size or width % self.coarse_patch_size:
            raise ValueError(
                f"image_size ({height}x{width}) must be divisible by coarse_patch_size ({self.coarse_patch_size}); "
                f"use an image size that is a multiple of {self.coarse_patch_size}."
            )

    def check_fine_region_budget(self, budget) -> None:
        """Raises `ValueError` unless `budget` is a region count (`int`, 0..regions) or a fraction (`float`, 0..1)."""
        num_regions = self.coarse_grid[0] * self.coarse_grid[1]
        count_ok = isinstance(budget, int) and not isinstance(budget, bool) and 0 <= budget <= num_regions
        fraction_ok = isinstance(budget, float) and 0.0 <= budget <= 1.0
        if not (count_ok or fraction_ok):
            raise ValueError(
                f"fine_region_budget must be a number of regions (int in [0, {num_regions}]) or a fraction of them "
                f"(float in [0, 1]), got {budget!r}."
            )

    def default_gate_hidden_size(self) -> int:
        """The widest gate MLP (8..256) whose MACs per region stay within `gate_cost_fraction` of what the static ViT
        spends per region (embedding + encoder), for the configured `gate_input` and `gate_num_layers`."""
        fine_h, fine_w = self.fine_grid
        static = vit_macs(self, fine_h * fine_w)
        hidden = self.hidden_size
        coarse_h, coarse_w = self.coarse_grid
        budget = self.gate_cost_fraction * static / (coarse_h * coarse_w)
        in_features = self.num_channels * self.coarse_patch_size**2 if self.gate_input == "pixels" else hidden
        width = 256
        # gate MACs per region: in*w + (layers - 2)*w*w + w (the output layer has one unit)
        while width > 8 and in_features * width + max(self.gate_num_layers - 2, 0) * width * width + width > budget:
            width -= 8
        return width

    @property
    def image_hw(self) -> tuple[int, int]:
        """`image_size` as `(height, width)`."""
        return _pair(self.image_size)

    @property
    def coarse_grid(self) -> tuple[int, int]:
        """Number of coarse regions along height and width."""
        height, width = self.image_hw
        return height // self.coarse_patch_size, width // self.coarse_patch_size

    @property
    def fine_grid(self) -> tuple[int, int]:
        """Number of fine patches along height and width."""
        height, width = self.image_hw
        return height // self.patch_size, width // self.patch_size


__all__ = ["MSViTConfig"]
