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
"""PyTorch MSViT model: a ViT with a dynamic mixed-scale tokenizer (arXiv 2307.02321)."""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConversionOps, PreTrainedModel, WeightConverter
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .batch_shaping import GeneralizedBatchShaping, gather_across_processes
from .configuration_msvit import MSViTConfig
from .convert_vit_to_msvit import convert_vit_to_msvit


@auto_docstring
@dataclass
class MSViTModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, max_num_tokens, hidden_size)`):
        Final hidden states. Each image's tokens are `[CLS, kept coarse tokens, kept fine tokens]` (each group in
        raster order), padded with zeros up to the longest image of the batch; see `attention_mask`.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The CLS token after the pooler (if the model has one).
    attention_mask (`torch.LongTensor` of shape `(batch_size, max_num_tokens)`):
        1 for the tokens of each image, 0 for padding.
    gate_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Generalized batch-shaping loss of the gate values of this batch (only when the gate ran).
    gate_probs (`torch.FloatTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Probability, per coarse region, that the gate tokenizes it fine (only when the gate ran).
    fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`):
        The decision taken: True where the region entered the encoder as fine tokens.
    num_tokens (`torch.LongTensor` of shape `(batch_size,)`):
        Tokens that entered the encoder per image: CLS + coarse + fine.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates this forward spent on each image (analytic; gate, patch embedding, encoder, pooler).
    """

    attention_mask: torch.LongTensor | None = None
    gate_loss: torch.FloatTensor | None = None
    gate_probs: torch.FloatTensor | None = None
    fine_region_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    macs: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class MSViTImageClassifierOutput(ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
        Classification loss plus `config.gbas_loss_weight * gate_loss`.
    gate_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Generalized batch-shaping loss of the gate values of this batch (only when the gate ran).
    gate_probs (`torch.FloatTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Probability, per coarse region, that the gate tokenizes it fine (only when the gate ran).
    fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`):
        The decision taken: True where the region entered the encoder as fine tokens.
    num_tokens (`torch.LongTensor` of shape `(batch_size,)`):
        Tokens that entered the encoder per image: CLS + coarse + fine.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates this forward spent on each image (analytic, classifier included).
    attention_mask (`torch.LongTensor` of shape `(batch_size, max_num_tokens)`):
        1 for the tokens of each image, 0 for padding (aligned with `hidden_states`).
    """

    gate_loss: torch.FloatTensor | None = None
    gate_probs: torch.FloatTensor | None = None
    fine_region_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    macs: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, C, H, W)` -> `(batch, num_patches, C * patch_size**2)`, patches in raster order, each flattened in the
    `(C, p, p)` order of a `Conv2d` kernel."""
    batch_size, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch_size, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, grid_h * grid_w, channels * patch_size**2)


def expand_region_mask(region_mask: torch.Tensor, scale: int) -> torch.Tensor:
    """`(batch, Hc, Wc)` -> `(batch, Hc * scale * Wc * scale)`: each region's value on its fine patches, raster order."""
    return region_mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2).flatten(1)


class MSViTPatchEmbeddings(nn.Module):
    """The ViT patch embedding (a `Conv2d` with kernel = stride = `patch_size`), applied to already cut patches so that
    only the tokens that enter the encoder are embedded. Fine and coarse tokens share it: a coarse token is the
    embedding of its region downsampled by `coarse_patch_size / patch_size`."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """`patches`: `(..., C * p * p)` as produced by `patchify`."""
        return F.linear(patches, self.projection.weight.flatten(1), self.projection.bias)

    def macs(self, num_patches):
        """MACs of embedding `num_patches` patches."""
        return num_patches * self.projection.weight[0].numel() * self.projection.out_channels


class OneElementLogitBias(ConversionOps):
    """Loads the gate's `logit_bias` as a 1-element tensor: checkpoints written before FSDP2 support (which cannot shard
    0-dim parameters) stored it as a scalar. Its own reverse: new checkpoints keep the 1-element shape."""

    def convert(self, input_dict, source_patterns, target_patterns, **kwargs):
        tensors = next(iter(input_dict.values()))
        tensor = tensors[0] if isinstance(tensors, list) else tensors
        return {target_patterns[0]: tensor.reshape(1)}

    @property
    def reverse_op(self) -> ConversionOps:
        return self


def _load_scalar_logit_bias(module, state_dict, prefix, *args):
    """`load_state_dict` counterpart of `OneElementLogitBias` (e.g. Trainer's resume from checkpoint)."""
    key = prefix + "logit_bias"
    if key in state_dict and state_dict[key].dim() == 0:
        state_dict[key] = state_dict[key].reshape(1)


register_checkpoint_conversion_mapping(
    "msvit",
    [WeightConverter("embeddings.gate.logit_bias", "embeddings.gate.logit_bias", [OneElementLogitBias()])],
    overwrite=True,
)


class MSViTGate(nn.Module):
    """The region gate: an MLP scoring each coarse region; `sigmoid(score)` is the probability of tokenizing it fine."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        # CODEPATH: "pixels" (default, every released config) scores raw regions; "embeddings" the coarse tokens.
        if config.gate_input == "pixels":
            in_features = config.num_channels * config.coarse_patch_size**2
        else:
            in_features = config.hidden_size
        sizes = [in_features] + [config.gate_hidden_size] * (config.gate_num_layers - 1) + [1]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=b > 1) for a, b in zip(sizes[:-1], sizes[1:]))
        # The output bias is the gate's own parameter (initialized to logit(gbas_target_ratio)) rather than the last
        # Linear's, so that the generic Linear initialization cannot reset it. One element, not a scalar: FSDP2 shards
        # no 0-dim parameter (scalars in older checkpoints are reshaped on load).
        self.logit_bias = nn.Parameter(torch.zeros(1))
        self.register_load_state_dict_pre_hook(_load_scalar_logit_bias)
        self.activation = nn.GELU()

    def forward(self, region_features: torch.Tensor) -> torch.Tensor:
        """`(batch, num_regions, in_features)` -> logits `(batch, num_regions)`."""
        hidden = region_features
        for index, layer in enumerate(self.layers):
            if index > 0:
                hidden = self.activation(hidden)
            hidden = layer(hidden)
        return hidden.squeeze(-1) + self.logit_bias

    def macs(self, num_regions):
        """MACs of scoring `num_regions` regions."""
        return num_regions * sum(layer.weight.numel() for layer in self.layers)


def sample_gate(
    logits: torch.Tensor, training: bool, temperature: float, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turns gate logits into decisions. Returns `(probs, soft, hard)`:

    - training: `soft` is a Gumbel-sigmoid sample, `hard = 1[soft >= threshold]` carries the gradient of `soft`
      (straight-through);
    - eval: no noise, `soft = probs` and `hard = 1[probs >= threshold]` (no gradient).
    """
    probs = torch.sigmoid(logits)
    if not training:
        return probs, probs, (probs >= threshold).to(probs.dtype)
    uniform = torch.rand_like(logits).clamp(1e-6, 1.0 - 1e-6)
    soft = torch.sigmoid((logits + torch.log(uniform) - torch.log1p(-uniform)) / temperature)
    hard = (soft >= threshold).to(soft.dtype)
    return probs, soft, hard + soft - soft.detach()


class MSViTEmbeddings(nn.Module):
    """Gate + mixed-scale tokenization: CLS, coarse and fine patch embeddings with their position embeddings.

    Position embeddings: fine tokens use the ViT grid; coarse tokens use it linearly interpolated to the coarse grid
    (for a 2x ratio, bilinear downsampling by 2 is exactly the mean of the 2x2 fine positions a region covers; we use
    that area mean for every ratio).
    """

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.config = config
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = MSViTPatchEmbeddings(config)
        fine_h, fine_w = config.fine_grid
        self.position_embeddings = nn.Parameter(torch.zeros(1, fine_h * fine_w + 1, config.hidden_size))
        self.gate = MSViTGate(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.scale = config.coarse_patch_size // config.patch_size

    def coarse_position_embeddings(self) -> torch.Tensor:
        fine_h, fine_w = self.config.fine_grid
        grid = self.position_embeddings[:, 1:].reshape(1, fine_h, fine_w, -1).permute(0, 3, 1, 2)
        coarse = F.avg_pool2d(grid, kernel_size=self.scale)
        return coarse.flatten(2).transpose(1, 2)[0]

    def forward(
        self,
        pixel_values: torch.Tensor,
        fine_region_mask: torch.Tensor | None = None,
        gate_threshold: float | None = None,
    ) -> dict:
        """Returns a dict with `tokens` `(total_tokens, hidden)` (every image's tokens without CLS, concatenated in
        image order), `lengths` `(batch,)` (tokens per image without CLS), the gate outputs and `embedded` (number
        of patches embedded per image, for MAC accounting)."""
        config = self.config
        batch_size = pixel_values.shape[0]
        coarse_h, coarse_w = config.coarse_grid
        num_regions = coarse_h * coarse_w
        threshold = config.gate_threshold if gate_threshold is None else gate_threshold

        coarse_pixels = F.avg_pool2d(pixel_values, kernel_size=self.scale) if self.scale > 1 else pixel_values
        coarse_patches = patchify(coarse_pixels, config.patch_size)
        coarse_embeddings = None
        gate_logits = gate_probs = gate_soft = None

        if fine_region_mask is None:
            # CODEPATH: "pixels" (default) or "embeddings" (then coarse tokens are embedded for every region).
            if config.gate_input == "pixels":
                gate_inputs = patchify(pixel_values, config.coarse_patch_size)
            else:
                coarse_embeddings = self.patch_embeddings(coarse_patches)
                gate_inputs = coarse_embeddings
            gate_logits = self.gate(gate_inputs)
            gate_probs, gate_soft, gate_values = sample_gate(
                gate_logits, self.training, config.gumbel_temperature, threshold
            )
            fine = gate_values.detach() > 0.5
        else:
            fine = fine_region_mask.reshape(batch_size, num_regions).to(device=pixel_values.device, dtype=torch.bool)
            gate_values = fine.to(pixel_values.dtype)

        keep_coarse = ~fine
        keep_fine = expand_region_mask(fine.reshape(batch_size, coarse_h, coarse_w), self.scale)
        keep = torch.cat([keep_coarse, keep_fine], dim=1)
        lengths = keep.sum(dim=1)

        # Embed only the patches that enter the encoder, straight into their place in the flat token list.
        flat_index = keep.flatten().cumsum(0).reshape(keep.shape) - 1
        total = int(lengths.sum())  # trf-ignore: TRF056 the token count is data-dependent by design
        hidden_size = config.hidden_size
        weight = self.patch_embeddings.projection.weight
        tokens = weight.new_zeros(total, hidden_size)
        if coarse_embeddings is not None:
            coarse_tokens = coarse_embeddings[keep_coarse]
        else:
            coarse_tokens = self.patch_embeddings(coarse_patches[keep_coarse])
        fine_tokens = self.patch_embeddings(patchify(pixel_values, config.patch_size)[keep_fine])
        tokens = tokens.index_copy(0, flat_index[:, :num_regions][keep_coarse], coarse_tokens)
        tokens = tokens.index_copy(0, flat_index[:, num_regions:][keep_fine], fine_tokens)

        positions = torch.cat([self.coarse_position_embeddings(), self.position_embeddings[0, 1:]], dim=0)
        tokens = tokens + positions.expand(batch_size, -1, -1)[keep]
        if gate_values.requires_grad:
            # Straight-through: the values are exactly 1 for kept tokens but carry the gate's gradient.
            fine_values = expand_region_mask(gate_values.reshape(batch_size, coarse_h, coarse_w), self.scale)
            scale = torch.cat([1.0 - gate_values, fine_values], dim=1)
            tokens = tokens * scale[keep][:, None].to(tokens.dtype)

        embedded = lengths + (num_regions - keep_coarse.sum(dim=1) if coarse_embeddings is not None else 0)
        return {
            "tokens": tokens,
            "lengths": lengths,
            "cls": self.cls_token[0, 0] + self.position_embeddings[0, 0],
            "fine": fine.reshape(batch_size, coarse_h, coarse_w),
            "gate_probs": None if gate_probs is None else gate_probs.reshape(batch_size, coarse_h, coarse_w),
            "gate_soft": gate_soft,
            "gate_ran": gate_logits is not None,
            "embedded": embedded,
        }


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class MSViTAttention(nn.Module):
    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.attention_dropout = config.attention_probs_dropout_prob
        self.scaling = self.head_dim**-0.5
        self.is_causal = False

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class MSViTMLP(nn.Module):
    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class MSViTLayer(GradientCheckpointingLayer):
    """A ViT encoder layer (same parameter names as transformers' `ViTLayer`, so ViT weights load as they are)."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.attention = MSViTAttention(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MSViTMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual

        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        return self.dropout(hidden_states) + residual

    @staticmethod
    def macs(config: MSViTConfig, num_tokens):
        """MACs of one layer on a sequence of `num_tokens` tokens: q/k/v/o projections, attention scores and
        weighted sum, MLP. (Norms, activations and residuals are not multiply-accumulates of matrices.)"""
        hidden, intermediate = config.hidden_size, config.intermediate_size
        return num_tokens * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * num_tokens * num_tokens * hidden


class MSViTPooler(nn.Module):
    def __init__(self, config: MSViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.pooler_output_size)
        self.activation = ACT2FN[config.pooler_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))


def partition_by_length(lengths: list[int], mode: str, overhead_tokens: int) -> list[list[int]]:
    """Splits image indices into groups that run through the encoder together, each padded to its longest image.

    - `"pad"`: one group, in batch order;
    - `"per_image"`: one group per image;
    - `"bucket"`: sort by length and choose the split that minimizes `sum_g (len(g) * max_len(g) + overhead_tokens)`
      (an exact dynamic program over the sorted lengths: padding waste against the fixed cost of one more group).
    """
    num_images = len(lengths)
    if mode == "pad" or num_images <= 1:
        return [list(range(num_images))]
    if mode == "per_image":
        return [[index] for index in range(num_images)]
    order = sorted(range(num_images), key=lambda index: lengths[index])
    sorted_lengths = [lengths[index] for index in order]
    best = [0.0] + [math.inf] * num_images  # best[j]: cost of the first j sorted images
    split = [0] * (num_images + 1)
    for end in range(1, num_images + 1):
        for start in range(end):
            cost = best[start] + (end - start) * sorted_lengths[end - 1] + overhead_tokens
            if cost < best[end]:
                best[end], split[end] = cost, start
    groups, end = [], num_images
    while end > 0:
        groups.append(order[split[end] : end])
        end = split[end]
    return groups[::-1]


@auto_docstring
class MSViTPreTrainedModel(PreTrainedModel):
    config: MSViTConfig
    base_model_prefix = "msvit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MSViTEmbeddings", "MSViTLayer"]
    _supports_sdpa = True
    _supports_attention_backend = True
    # Token counts depend on the image: the graph has data-dependent shapes.
    _can_compile_fullgraph = False
    _can_record_outputs = {
        "hidden_states": MSViTLayer,
        "attentions": MSViTAttention,
    }
    _input_embed_layer = "patch_embeddings"
    # The GBaS loss is a per-batch mean: let Trainer divide the whole loss by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MSViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MSViTGate):
            # Start every region near the target fine ratio; GBaS then makes the decisions input-dependent.
            target = self.config.gbas_target_ratio
            init.constant_(module.logit_bias, math.log(target / (1.0 - target)))
        elif isinstance(module, GeneralizedBatchShaping):
            target = self.config.gbas_target_ratio
            init.constant_(module.prior_mean_logits, math.log(target / (1.0 - target)))
            init.zeros_(module.prior_temperature_logits)

    @classmethod
    def from_vit_pretrained(cls, vit, **config_overrides):
        """Upcycles a ViT checkpoint into this class: every backbone weight is reused, only the gate is new.

        Args:
            vit: a local directory or Hub id of a ViT checkpoint, or a loaded `ViTModel` / `ViTForImageClassification`.
            config_overrides: `MSViTConfig` fields to set (e.g. `gbas_target_ratio=0.3`, `coarse_patch_size=32`).
        """
        return convert_vit_to_msvit(vit, cls, **config_overrides)


@auto_docstring
class MSViTModel(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig, add_pooling_layer: bool = True):
        r"""
        add_pooling_layer (`bool`, *optional*, defaults to `True`):
            Whether to add a pooling layer on the CLS token.
        """
        super().__init__(config)
        self.config = config
        self.embeddings = MSViTEmbeddings(config)
        self.layers = nn.ModuleList([MSViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = MSViTPooler(config) if add_pooling_layer else None
        coarse_h, coarse_w = config.coarse_grid
        self.batch_shaping = GeneralizedBatchShaping(
            coarse_h * coarse_w,
            config.gbas_target_ratio,
            config.gbas_hyperprior_std,
            config.gbas_temperature_l1_weight,
        )
        self.post_init()

    def get_input_embeddings(self) -> MSViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def encode(self, tokens: torch.Tensor, lengths: torch.Tensor, cls: torch.Tensor, mode: str, **kwargs):
        """Runs the encoder on every image's `[CLS, tokens]` and returns `(last_hidden_state (batch, max_len, hidden),
        attention_mask (batch, max_len))` in batch order, zero-padded. `mode` is a `token_batching` value: groups of
        images padded to their longest (`"bucket"`, `"pad"`, `"per_image"`) or one packed sequence (`"pack"`)."""
        seq_lengths = lengths + 1
        max_len = int(seq_lengths.max())  # trf-ignore: TRF056 the token count is data-dependent by design
        attention_mask = (torch.arange(max_len, device=tokens.device)[None, :] < seq_lengths[:, None]).long()
        offsets = lengths.cumsum(0) - lengths
        # one zero row at the end: where padded positions gather from
        source = torch.cat([tokens, tokens.new_zeros(1, tokens.shape[-1])], dim=0)
        # CODEPATH: "pack" (measured slower on CPU, kept selectable) concatenates every image into one sequence.
        if mode == "pack":
            return self._encode_packed(source, lengths, offsets, cls, max_len, **kwargs), attention_mask

        groups = partition_by_length(lengths.tolist(), mode, self.config.bucket_overhead_tokens)  # trf-ignore: TRF056
        output = tokens.new_zeros(lengths.shape[0], max_len, tokens.shape[-1])
        for group in groups:
            index = torch.tensor(group, device=tokens.device)
            group_len = int(seq_lengths[index].max())  # trf-ignore: TRF056 see above
            steps = torch.arange(group_len - 1, device=tokens.device)
            valid = steps[None, :] < lengths[index, None]
            gather = torch.where(valid, offsets[index, None] + steps[None, :], tokens.shape[0])
            hidden_states = torch.cat([cls.expand(len(group), 1, -1), source[gather]], dim=1)
            mask_2d = torch.cat([valid.new_ones(len(group), 1), valid], dim=1)
            hidden_states = self._run_layers(hidden_states, None if bool(mask_2d.all()) else mask_2d, None, **kwargs)
            hidden_states = hidden_states * mask_2d[..., None].to(hidden_states.dtype)
            output = output.index_copy(0, index, F.pad(hidden_states, (0, 0, 0, max_len - group_len)))
        return output, attention_mask

    def _encode_packed(self, source, lengths, offsets, cls, max_len, **kwargs):
        """All images in one sequence with a block-diagonal mask (each image attends only to itself)."""
        seq_lengths = lengths + 1
        image_ids = torch.repeat_interleave(torch.arange(lengths.shape[0], device=source.device), seq_lengths)
        starts = seq_lengths.cumsum(0) - seq_lengths
        steps = torch.arange(image_ids.shape[0], device=source.device) - starts[image_ids]
        gather = torch.where(steps > 0, offsets[image_ids] + steps - 1, source.shape[0] - 1)
        packed = torch.where((steps == 0)[:, None], cls[None, :], source[gather])[None]
        packed = self._run_layers(packed, None, image_ids[None], **kwargs)[0]
        output = source.new_zeros(lengths.shape[0], max_len, source.shape[-1])
        return output.index_put((image_ids, steps), packed)

    def _run_layers(self, hidden_states, padding_mask, packed_image_ids, **kwargs):
        hidden_states = self.embeddings.dropout(hidden_states)
        attention_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=hidden_states,
            attention_mask=padding_mask,
            and_mask_function=None if packed_image_ids is None else packed_sequence_mask_function(packed_image_ids),
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
        return self.layernorm(hidden_states)

    def encoder_macs(self, num_tokens):
        """MACs of the encoder layers on sequences of `num_tokens` tokens (CLS included)."""
        return self.config.num_hidden_layers * MSViTLayer.macs(self.config, num_tokens)

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTModelOutput:
        r"""
        fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
            Overrides the gate: True tokenizes a region fine, False coarse. All True gives the token set of the ViT the
            model was upcycled from; all False the coarse-only tokenization. The gate does not run.
        gate_threshold (`float`, *optional*):
            Overrides `config.gate_threshold` for this call. Higher values select fewer fine regions.
        """
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        config = self.config
        expected_dtype = self.embeddings.patch_embeddings.projection.weight.dtype
        if pixel_values.dtype != expected_dtype:
            pixel_values = pixel_values.to(expected_dtype)
        height, width = config.image_hw
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (config.num_channels, height, width):
            raise ValueError(
                f"pixel_values must have shape (batch_size, {config.num_channels}, {height}, {width}), got "
                f"{tuple(pixel_values.shape)}. Resize images with the model's image processor."
            )
        batch_size = pixel_values.shape[0]
        if fine_region_mask is not None:
            expected = (batch_size, *config.coarse_grid)
            if tuple(fine_region_mask.shape) != expected:
                raise ValueError(
                    f"fine_region_mask must have shape (batch_size, coarse_height, coarse_width) = {expected}, got "
                    f"{tuple(fine_region_mask.shape)}."
                )
        if gate_threshold is not None and not 0.0 <= gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must lie in [0, 1], got {gate_threshold}.")

        embedded = self.embeddings(pixel_values, fine_region_mask=fine_region_mask, gate_threshold=gate_threshold)
        lengths = embedded["lengths"]

        # Per-layer outputs (hidden states, attentions) need one call per layer: run one padded batch then.
        records_layers = kwargs.get("output_hidden_states", config.output_hidden_states) or kwargs.get(
            "output_attentions", config.output_attentions
        )
        mode = "pad" if records_layers else config.token_batching
        sequence_output, attention_mask = self.encode(embedded["tokens"], lengths, embedded["cls"], mode, **kwargs)
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None

        gate_loss = None
        if embedded["gate_ran"]:
            gate_values = embedded["gate_soft"]
            # CODEPATH: multi-process training with the GBaS statistics of the global batch (off by default).
            if config.gbas_gather_across_processes and self.training:
                gate_values = gather_across_processes(gate_values)
            gate_loss = self.batch_shaping(gate_values)

        num_tokens = lengths + 1
        macs = self.encoder_macs(num_tokens.double()) + self.embeddings.patch_embeddings.macs(embedded["embedded"].double())
        if embedded["gate_ran"]:
            macs = macs + self.embeddings.gate.macs(config.coarse_grid[0] * config.coarse_grid[1])
        if self.pooler is not None:
            macs = macs + self.pooler.dense.weight.numel()

        return MSViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            attention_mask=attention_mask,
            gate_loss=gate_loss,
            gate_probs=embedded["gate_probs"],
            fine_region_mask=embedded["fine"],
            num_tokens=num_tokens,
            macs=macs.float(),
        )

    def static_macs(self, fine: bool = True) -> float:
        """MACs per image of the static ViT this model comes from (`fine=True`: ViT/`patch_size`, every region
        fine, no gate) or of the coarse-only tokenization (`fine=False`)."""
        fine_h, fine_w = self.config.fine_grid
        coarse_h, coarse_w = self.config.coarse_grid
        patches = fine_h * fine_w if fine else coarse_h * coarse_w
        macs = self.encoder_macs(patches + 1) + self.embeddings.patch_embeddings.macs(patches)
        if self.pooler is not None:
            macs += self.pooler.dense.weight.numel()
        return float(macs)


@auto_docstring(
    custom_intro="""
    MSViT with an image classification head (a linear layer on the final CLS token), e.g. for ImageNet.
    """
)
class MSViTForImageClassification(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.msvit = MSViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for the classification loss, in `[0, ..., config.num_labels - 1]`. The returned `loss` also
            includes `config.gbas_loss_weight * gate_loss` when the gate ran.
        fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
            Overrides the gate: True tokenizes a region fine, False coarse. All True gives the token set of the ViT the
            model was upcycled from; all False the coarse-only tokenization. The gate does not run.
        gate_threshold (`float`, *optional*):
            Overrides `config.gate_threshold` for this call. Higher values select fewer fine regions.

        Example:

        ```python
        >>> import torch
        >>> from hf_msvit import MSViTConfig, MSViTForImageClassification

        >>> config = MSViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)
        >>> model = MSViTForImageClassification(config).eval()
        >>> outputs = model(torch.randn(2, 3, 224, 224), gate_threshold=0.7)
        >>> outputs.fine_region_mask.shape, outputs.num_tokens.shape, outputs.macs.shape
        (torch.Size([2, 7, 7]), torch.Size([2]), torch.Size([2]))
        ```
        """
        outputs: MSViTModelOutput = self.msvit(
            pixel_values, fine_region_mask=fine_region_mask, gate_threshold=gate_threshold, **kwargs
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config, **kwargs)
            if outputs.gate_loss is not None:
                loss = loss + self.config.gbas_loss_weight * outputs.gate_loss

        macs = outputs.macs
        if isinstance(self.classifier, nn.Linear):
            macs = macs + self.classifier.weight.numel()

        return MSViTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_loss=outputs.gate_loss,
            gate_probs=outputs.gate_probs,
            fine_region_mask=outputs.fine_region_mask,
            num_tokens=outputs.num_tokens,
            macs=macs,
            attention_mask=outputs.attention_mask,
        )

    def static_macs(self, fine: bool = True) -> float:
        """MACs per image of the static ViT (`fine=True`) or of the coarse-only tokenization, head included."""
        head = self.classifier.weight.numel() if isinstance(self.classifier, nn.Linear) else 0
        return self.msvit.static_macs(fine) + head


# Saving copies the model files next to the weights, so checkpoints load with trust_remote_code=True without hf_msvit.
MSViTModel.register_for_auto_class("AutoModel")
MSViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = ["MSViTForImageClassification", "MSViTModel", "MSViTPreTrainedModel"]
