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
"""PyTorch DiT model: PVTv2 rebuilt as a dynamic routing grid (Ma et al., arXiv 2308.03409).

The grid has `num_encoder_blocks` rows (scales at strides 4..32) and `num_routing_columns + 1` node columns. Node
`F[i][j]` feeds the transformer stage `grid[i][j]` (a copy of PVTv2 stage `i`: its blocks and its final LayerNorm) into
node `F[i][j + 1]`, and the overlapping patch embedding `patch_embeddings[i][j]` (a copy of PVTv2's patch embedding into
scale `i + 1`) into node `F[i + 1][j]`. A node sums what reaches it (paper Eq. 4):

    F[i][j] = G * stage(F[i][j-1]) + (1 - G) * F[i][j-1]  +  g * patch_embedding(F[i-1][j])

with `G` the per-token row gate of `grid[i][j-1]` and `g` the per-image column gate of `patch_embeddings[i-1][j]`.

Multiply-accumulates: every module that computes something has a static `macs(...)` beside it; `DiTModel` sums those
for the route an image took (`macs` output), the budget loss uses the same sum, and `dit_route_macs` gives the
analytic cost of the static and full routes from a config alone.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers.initialization as init
from torch import nn
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple

from .configuration_dit_routing import DiTConfig


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@auto_docstring
@dataclass
class DiTModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height, width)`):
        The last node of the coarsest scale, `F[num_encoder_blocks - 1][num_routing_columns]`, as a feature map.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        `last_hidden_state` averaged over its positions (what the classification head reads).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The stem embedding (node `(0, 0)`), then the last node column at every scale, each as a map
        `(batch_size, hidden_sizes[i], height_i, width_i)` (strides 4, 4, 8, 16, 32).
    budget_loss (`torch.FloatTensor` of shape `()`, *optional*):
        `(mean_over_batch(cost) / static_cost - budget_target) ** 2`, differentiable through the gate decisions.
        Only in `routing_mode="dynamic"`.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the route each image took (matmuls, convolutions and attention, gates included).
        At inference this is exactly what the forward computed for the image.
    downsampled (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks - 1, num_routing_columns + 1)`):
        1 where the image was downsampled from scale `i` to `i + 1` at node column `j` (edge reached and gate open).
    stage_keep_ratio (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks, num_routing_columns)`):
        Fraction of the tokens of node `(i, j)` that transformer stage `(i, j)` computed for the image (0 where the
        stage did not run).
    token_keep_ratio (`torch.FloatTensor` of shape `(batch_size,)`):
        Per image, the fraction of tokens computed, averaged over the transformer stages that ran for it (PVTv2's own
        route gives 1.0); see `mean_token_keep_ratio`.
    """

    budget_loss: torch.FloatTensor | None = None
    macs: torch.FloatTensor | None = None
    downsampled: torch.FloatTensor | None = None
    stage_keep_ratio: torch.FloatTensor | None = None
    token_keep_ratio: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class DiTImageClassifierOutput(ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Classification loss plus `budget_loss_weight * budget_loss` (dynamic routing).
    logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels)`):
        Classification scores (before SoftMax).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The stem embedding, then the last node column at every scale, each `(batch_size, hidden_sizes[i], height_i,
        width_i)`.
    budget_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The budget loss (dynamic routing only), also folded into `loss` when labels are given.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the route each image took, classifier included.
    downsampled (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks - 1, num_routing_columns + 1)`):
        1 where the image was downsampled from scale `i` to `i + 1` at node column `j`.
    stage_keep_ratio (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks, num_routing_columns)`):
        Fraction of the tokens of node `(i, j)` that transformer stage `(i, j)` computed for the image.
    token_keep_ratio (`torch.FloatTensor` of shape `(batch_size,)`):
        Per image, the fraction of tokens computed, averaged over the transformer stages that ran for it (PVTv2's own
        route gives 1.0); see `mean_token_keep_ratio`.
    """

    budget_loss: torch.FloatTensor | None = None
    macs: torch.FloatTensor | None = None
    downsampled: torch.FloatTensor | None = None
    stage_keep_ratio: torch.FloatTensor | None = None
    token_keep_ratio: torch.FloatTensor | None = None


@auto_docstring
@dataclass
class DiTBackboneOutput(BackboneOutput):
    r"""
    feature_maps (`tuple(torch.FloatTensor)`):
        The last node column at the scales of `out_features`, `(batch_size, hidden_sizes[i], height_i, width_i)`.
    budget_loss (`torch.FloatTensor` of shape `()`, *optional*):
        The budget loss (dynamic routing only); add `budget_loss_weight * budget_loss` to the task loss.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the route each image took.
    downsampled (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks - 1, num_routing_columns + 1)`):
        1 where the image was downsampled from scale `i` to `i + 1` at node column `j`.
    stage_keep_ratio (`torch.FloatTensor` of shape `(batch_size, num_encoder_blocks, num_routing_columns)`):
        Fraction of the tokens of node `(i, j)` that transformer stage `(i, j)` computed for the image.
    token_keep_ratio (`torch.FloatTensor` of shape `(batch_size,)`):
        Per image, the fraction of tokens computed, averaged over the transformer stages that ran for it (PVTv2's own
        route gives 1.0); see `mean_token_keep_ratio`.
    """

    budget_loss: torch.FloatTensor | None = None
    macs: torch.FloatTensor | None = None
    downsampled: torch.FloatTensor | None = None
    stage_keep_ratio: torch.FloatTensor | None = None
    token_keep_ratio: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks (PVTv2's, same parameter names)
# ----------------------------------------------------------------------------------------------------------------------


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class DiTOverlapPatchEmbeddings(nn.Module):
    """PVTv2's overlapping patch embedding into scale `scale`: strided convolution, then LayerNorm."""

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__()
        patch_size = config.patch_sizes[scale]
        num_channels = config.num_channels if scale == 0 else config.hidden_sizes[scale - 1]
        self.proj = nn.Conv2d(
            num_channels,
            config.hidden_sizes[scale],
            kernel_size=patch_size,
            stride=config.strides[scale],
            padding=patch_size // 2,
        )
        self.layer_norm = nn.LayerNorm(config.hidden_sizes[scale], eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        embeddings = self.proj(pixel_values)
        _, _, height, width = embeddings.shape
        embeddings = embeddings.flatten(2).transpose(1, 2)
        embeddings = self.layer_norm(embeddings)
        return embeddings, height, width

    @staticmethod
    def output_size(config: DiTConfig, scale: int, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the embedding into `scale` of an input of `height x width`."""
        kernel, stride = config.patch_sizes[scale], config.strides[scale]
        return _conv_out(height, kernel, stride, kernel // 2), _conv_out(width, kernel, stride, kernel // 2)

    @staticmethod
    def macs(config: DiTConfig, scale: int, height: int, width: int) -> int:
        """Multiply-accumulates of one image's embedding into `scale` from an input of `height x width`."""
        out_h, out_w = DiTOverlapPatchEmbeddings.output_size(config, scale, height, width)
        in_channels = config.num_channels if scale == 0 else config.hidden_sizes[scale - 1]
        kernel = config.patch_sizes[scale]
        return out_h * out_w * config.hidden_sizes[scale] * in_channels * kernel * kernel


class DiTGate(nn.Module):
    """A routing gate: one linear projection to two logits (index 1 = compute / open), paper Eq. 1.

    The trained weights are used (with Gumbel noise) in training; the EMA copies `ema_weight`/`ema_bias` (Eq. 3) at
    inference. Row gates see every token of a node, column gates the node's mean-pooled features.
    """

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__()
        hidden_size = config.hidden_sizes[scale]
        self.weight = nn.Parameter(torch.empty(2, hidden_size))
        self.bias = nn.Parameter(torch.empty(2))
        # Zero-initialized EMA with a step count, read bias-corrected (`ema / (1 - m**steps)`, as Adam does): after the
        # first update it equals the weights; before any update (a new or converted model) the gate uses `weight`.
        self.ema_weight = nn.Buffer(torch.zeros(2, hidden_size))
        self.ema_bias = nn.Buffer(torch.zeros(2))
        self.ema_steps = nn.Buffer(torch.zeros(()))
        self.momentum = config.gate_ema_momentum
        self.temperature = config.gumbel_temperature

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Gate decisions for `features` (`(..., hidden_size)`): hard 0/1 values of shape `(...)`.

        Training: straight-through Gumbel-softmax samples (values 0/1, gradients of the soft sample). Inference:
        deterministic `argmax` under the EMA weights.
        """
        if self.training:
            logits = nn.functional.linear(features, self.weight, self.bias)
            return nn.functional.gumbel_softmax(logits, tau=self.temperature, hard=True)[..., 1]
        weight, bias = self.inference_weights()
        logits = nn.functional.linear(features, weight, bias)
        return (logits[..., 1] > logits[..., 0]).to(features.dtype)

    def inference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bias-corrected EMA weights, or the trained weights while no EMA update has happened yet."""
        correction = (1.0 - self.momentum**self.ema_steps).clamp_min(1e-12)
        trained = self.ema_steps > 0
        weight = torch.where(trained, self.ema_weight / correction, self.weight)
        bias = torch.where(trained, self.ema_bias / correction, self.bias)
        return weight, bias

    @torch.no_grad()
    def update_ema(self) -> None:
        """`ema <- m * ema + (1 - m) * weight` (paper Eq. 3); called once per training forward."""
        self.ema_weight.lerp_(self.weight.detach(), 1.0 - self.momentum)
        self.ema_bias.lerp_(self.bias.detach(), 1.0 - self.momentum)
        self.ema_steps.add_(1)

    @staticmethod
    def macs(num_tokens, hidden_size: int):
        """Multiply-accumulates of gating `num_tokens` tokens (a column gate gates one pooled token)."""
        return num_tokens * hidden_size * 2


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DiTSelfAttention(nn.Module):
    """PVTv2's spatial-reduction attention. Queries may be a subset of the tokens; keys and values always come from the
    whole (spatially reduced) map, in which skipped tokens carry their identity values (paper Eq. 4)."""

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_sizes[scale]
        self.num_attention_heads = config.num_attention_heads[scale]
        self.attention_head_size = self.hidden_size // self.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.dropout_prob = config.attention_probs_dropout_prob
        self.query = nn.Linear(self.hidden_size, self.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(self.hidden_size, self.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(self.hidden_size, self.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(self.hidden_size, self.hidden_size)
        self.proj_drop = nn.Dropout(config.hidden_dropout_prob)
        self.spatial_reduction_ratio = config.sr_ratios[scale]
        if self.spatial_reduction_ratio > 1:
            self.spatial_reduction = nn.Conv2d(
                self.hidden_size,
                self.hidden_size,
                kernel_size=self.spatial_reduction_ratio,
                stride=self.spatial_reduction_ratio,
            )
            self.layer_norm = nn.LayerNorm(self.hidden_size, eps=config.layer_norm_eps)

    def keys_and_values(self, hidden_states: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Keys and values `(batch, heads, kv_tokens, head_dim)` from the full normalized map `(batch, tokens, C)`."""
        batch_size, _, num_channels = hidden_states.shape
        if self.spatial_reduction_ratio > 1:
            hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, num_channels, height, width)
            hidden_states = self.spatial_reduction(hidden_states).flatten(2).transpose(1, 2)
            hidden_states = self.layer_norm(hidden_states)
        shape = (batch_size, -1, self.num_attention_heads, self.attention_head_size)
        key = self.key(hidden_states).view(shape).transpose(1, 2)
        value = self.value(hidden_states).view(shape).transpose(1, 2)
        return key, value

    def attend(self, query_states: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention of `query_states` `(batch, q_tokens, C)` (not yet projected) over `key`/`value`; projected out."""
        batch_size, num_queries, _ = query_states.shape
        query = self.query(query_states).view(batch_size, num_queries, self.num_attention_heads, -1).transpose(1, 2)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, _ = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.dropout_prob if self.training else 0.0,
            scaling=self.scaling,
        )
        context = context.reshape(batch_size, num_queries, self.hidden_size)
        return self.proj_drop(self.proj(context))

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key, value = self.keys_and_values(hidden_states, height, width)
        return self.attend(hidden_states, key, value)


class DiTDepthWiseConv(nn.Module):
    """Depth-wise 3x3 convolution of PVTv2's MLP (it carries the positional information)."""

    def __init__(self, config: DiTConfig, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch_size, _, num_channels = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, num_channels, height, width)
        return self.dwconv(hidden_states).flatten(2).transpose(1, 2)


class DiTConvFeedForwardNetwork(nn.Module):
    """PVTv2's MLP: Linear -> depth-wise 3x3 conv -> GELU -> Linear."""

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__()
        hidden_size = config.hidden_sizes[scale]
        intermediate_size = int(hidden_size * config.mlp_ratios[scale])
        self.dense1 = nn.Linear(hidden_size, intermediate_size)
        self.dwconv = DiTDepthWiseConv(config, intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.dense2 = nn.Linear(intermediate_size, hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int, token_mask=None) -> torch.Tensor:
        hidden_states = self.dense1(hidden_states)
        if token_mask is not None:
            # Skipped tokens feed zeros to the depth-wise conv, exactly as the gather path (which scatters the
            # computed tokens into a zero map).
            hidden_states = hidden_states * token_mask
        hidden_states = self.dwconv(hidden_states, height, width)
        return self.finish(hidden_states)

    def finish(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Everything after the depth-wise conv."""
        hidden_states = self.dropout(self.intermediate_act_fn(hidden_states))
        return self.dropout(self.dense2(hidden_states))


class DiTDropPath(nn.Module):
    """Stochastic depth per sample (identity at inference)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1 - self.drop_prob
        shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
        return hidden_states.div(keep_prob) * torch.floor(random_tensor + keep_prob)


class DiTBlockLayer(GradientCheckpointingLayer):
    """One PVTv2 block (pre-LN attention and MLP, residuals), able to compute only the tokens a row gate selected."""

    def __init__(self, config: DiTConfig, scale: int, drop_path: float = 0.0):
        super().__init__()
        hidden_size = config.hidden_sizes[scale]
        self.layer_norm_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = DiTSelfAttention(config, scale)
        self.drop_path = DiTDropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.layer_norm_2 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp = DiTConvFeedForwardNetwork(config, scale)

    def forward(self, hidden_states: torch.Tensor, height: int, width: int, token_mask=None) -> torch.Tensor:
        """Dense path. `token_mask` `(batch, tokens, 1)` (0/1 values) keeps skipped tokens at their input values."""
        attention_output = self.drop_path(self.attention(self.layer_norm_1(hidden_states), height, width))
        if token_mask is not None:
            attention_output = attention_output * token_mask
        hidden_states = hidden_states + attention_output
        mlp_output = self.drop_path(self.mlp(self.layer_norm_2(hidden_states), height, width, token_mask))
        if token_mask is not None:
            mlp_output = mlp_output * token_mask
        return hidden_states + mlp_output

    def forward_selected(
        self,
        rows: torch.Tensor,
        height: int,
        width: int,
        read_index: torch.Tensor,
        write_index: torch.Tensor,
        intermediate_map: torch.Tensor,
    ) -> torch.Tensor:
        """Gather path (inference), in place on `rows`: the stage's map flattened to `(batch * tokens + 1, hidden)`,
        whose last row is scratch. Only the selected tokens are computed by the query, output projection and MLP
        linears; keys/values come from the whole map; the depth-wise conv sees the computed tokens in a zero map.

        `read_index` `(batch, max_selected)` holds each image's selected rows first, then unselected ones as padding;
        `write_index` is the same with the padding sent to the scratch row. All images run as one batch: padding rows
        are computed and their results land in the scratch row. `intermediate_map` `(batch * tokens + 1, mlp_hidden)`
        is zero outside the selected rows (shared by the stage's blocks, which write the same rows)."""
        batch_size, max_selected = read_index.shape
        num_rows, hidden_size = rows.shape
        num_tokens = (num_rows - 1) // batch_size
        hidden_states = rows[:-1].view(batch_size, num_tokens, hidden_size)
        reads, writes = read_index.reshape(-1), write_index.reshape(-1)
        attention = self.attention
        normed = self.layer_norm_1(hidden_states)
        key, value = attention.keys_and_values(normed, height, width)
        queries = normed.reshape(-1, hidden_size).index_select(0, reads).view(batch_size, max_selected, hidden_size)
        selected = rows.index_select(0, reads).view(batch_size, max_selected, hidden_size)
        selected = selected + attention.attend(queries, key, value)

        mlp = self.mlp
        intermediate = mlp.dense1(self.layer_norm_2(selected))
        width_mlp = intermediate.shape[-1]
        intermediate_map.index_copy_(0, writes, intermediate.reshape(-1, width_mlp))
        intermediate_map[-1].zero_()
        convolved = mlp.dwconv(intermediate_map[:-1].view(batch_size, num_tokens, width_mlp), height, width)
        intermediate = convolved.reshape(-1, width_mlp).index_select(0, reads).view_as(intermediate)
        selected = selected + mlp.finish(intermediate)
        return rows.index_copy_(0, writes, selected.reshape(-1, hidden_size))

    @staticmethod
    def macs(config: DiTConfig, scale: int, height: int, width: int) -> tuple[int, int]:
        """`(per_image, per_token)` multiply-accumulates of one block on a `height x width` map.

        `per_image` is paid once per image the block runs for (spatial reduction, keys/values from the whole map,
        depth-wise conv); `per_token` once per computed token (query, attention, output projection, MLP linears).
        """
        hidden = config.hidden_sizes[scale]
        intermediate = int(hidden * config.mlp_ratios[scale])
        ratio = config.sr_ratios[scale]
        num_tokens = height * width
        if ratio > 1:
            kv_tokens = _conv_out(height, ratio, ratio, 0) * _conv_out(width, ratio, ratio, 0)
            reduction = kv_tokens * hidden * hidden * ratio * ratio
        else:
            kv_tokens, reduction = num_tokens, 0
        per_image = reduction + 2 * kv_tokens * hidden * hidden + num_tokens * intermediate * 9
        per_token = 2 * hidden * hidden + 2 * kv_tokens * hidden + 2 * hidden * intermediate
        return per_image, per_token


class DiTStage(nn.Module):
    """Transformer stage `B[i][j]` of the grid: a copy of PVTv2 stage `i` (its blocks and its final LayerNorm).

    Tokens a row gate skips keep their input values (identity edge); the others get the stage output.
    """

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__()
        drop_path_decays = torch.linspace(0, config.drop_path_rate, sum(config.depths), device="cpu").tolist()
        offset = sum(config.depths[:scale])
        self.blocks = nn.ModuleList(
            [
                DiTBlockLayer(config, scale, drop_path=drop_path_decays[offset + block_idx])
                for block_idx in range(config.depths[scale])
            ]
        )
        self.layer_norm = nn.LayerNorm(config.hidden_sizes[scale], eps=config.layer_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense path: every token is computed; with `token_mask` `(batch, tokens)` of 0/1 values the output is
        `mask * stage(x) + (1 - mask) * x`, skipped tokens frozen inside the stage too (the reference semantics, and
        the training path: gradients reach the straight-through gate values)."""
        mask = None if token_mask is None else token_mask.unsqueeze(-1)
        output = hidden_states
        for block in self.blocks:
            output = block(output, height, width, mask)
        output = self.layer_norm(output)
        if mask is None:
            return output
        return mask * output + (1 - mask) * hidden_states

    def forward_selected(self, hidden_states: torch.Tensor, height: int, width: int, selected: torch.Tensor):
        """Gather path (inference): the same result as `forward(hidden_states, ..., token_mask=selected)`, computing
        only the selected tokens `selected` `(batch, tokens)` (bool), all images in one padded batch."""
        batch_size, num_tokens, hidden_size = hidden_states.shape
        counts = selected.sum(1)
        max_selected = int(counts.max())  # trf-ignore: TRF056 the number of computed tokens is data-dependent
        # each image's selected rows of the flattened map first, then unselected ones (padding: read, then discarded
        # into the scratch row `batch * tokens`)
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :max_selected]
        valid = torch.arange(max_selected, device=selected.device)[None, :] < counts[:, None]
        read_index = order + torch.arange(batch_size, device=order.device)[:, None] * num_tokens
        write_index = torch.where(valid, read_index, batch_size * num_tokens)
        rows = torch.cat([hidden_states.reshape(-1, hidden_size), hidden_states.new_zeros(1, hidden_size)])
        width_mlp = self.blocks[0].mlp.dense1.out_features
        intermediate_map = hidden_states.new_zeros(batch_size * num_tokens + 1, width_mlp)
        for block in self.blocks:
            rows = block.forward_selected(rows, height, width, read_index, write_index, intermediate_map)
        normed = self.layer_norm(rows.index_select(0, read_index.reshape(-1)))
        output = torch.cat([hidden_states.reshape(-1, hidden_size), hidden_states.new_zeros(1, hidden_size)])
        return output.index_copy_(0, write_index.reshape(-1), normed)[:-1].view_as(hidden_states)

    @staticmethod
    def macs(config: DiTConfig, scale: int, height: int, width: int, num_selected, active):
        """Multiply-accumulates of the stage for one image: `active` (0/1: the stage ran for the image) times the
        per-image part plus `num_selected` (computed tokens) times the per-token part, summed over its blocks."""
        per_image, per_token = DiTBlockLayer.macs(config, scale, height, width)
        return config.depths[scale] * (active * per_image + num_selected * per_token)


def _scale_sizes(config: DiTConfig, height: int, width: int) -> list[tuple[int, int]]:
    sizes = []
    for scale in range(config.num_encoder_blocks):
        height, width = DiTOverlapPatchEmbeddings.output_size(config, scale, height, width)
        sizes.append((height, width))
    return sizes


def mean_token_keep_ratio(stage_keep_ratio: torch.Tensor) -> torch.Tensor:
    """`(batch, scales, columns)` per-stage keep ratios -> `(batch,)`: the mean over the stages that ran for each image
    (a stage that did not run is not a stage that kept 0% of its tokens). The one definition of DiT's token keep ratio."""
    flat = stage_keep_ratio.flatten(1)
    ran = flat > 0
    return (flat * ran).sum(1) / ran.sum(1).clamp_min(1)


def dit_route_macs(config: DiTConfig, height: int, width: int, routing_mode: str | None = None) -> int:
    """Analytic multiply-accumulates of one image of `height x width` through the static (PVTv2) or full route, from
    the config alone (no weights needed), classifier excluded. Uses the same per-module formulas as the forward."""
    routing_mode = routing_mode or config.routing_mode
    if routing_mode not in ("static", "full"):
        raise ValueError("dit_route_macs is analytic only for routing_mode 'static' or 'full'; read `macs` otherwise.")
    columns = 1 if routing_mode == "static" else config.num_routing_columns
    edges = 1 if routing_mode == "static" else config.num_routing_columns + 1
    sizes = _scale_sizes(config, height, width)
    total = DiTOverlapPatchEmbeddings.macs(config, 0, height, width)
    for scale, (h, w) in enumerate(sizes):
        # Full route: every row is entered at column 0, so all its `num_routing_columns` stages and `+ 1` edges run.
        total += columns * DiTStage.macs(config, scale, h, w, h * w, 1)
        # CODEPATH: every checkpoint; the coarsest scale has no downsampling edge.
        if scale + 1 < config.num_encoder_blocks:
            total += edges * DiTOverlapPatchEmbeddings.macs(config, scale + 1, h, w)
    return int(total)


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


@auto_docstring
class DiTPreTrainedModel(PreTrainedModel):
    config: DiTConfig
    base_model_prefix = "dit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlockLayer", "DiTOverlapPatchEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    # Data-dependent routing (which images/tokens a stage computes) breaks full graphs; `torch.compile` works with
    # graph breaks.
    _can_compile_fullgraph = False
    # The budget loss is a per-batch mean: let Trainer divide the whole loss by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, 0, math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DiTGate):
            # Index 1 = compute/open; the bias makes p(open) = gate_init_compute_prob at the start (the paper starts
            # with every mask entry at 1).
            init.trunc_normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            prob = self.config.gate_init_compute_prob
            init.zeros_(module.bias)
            init.constant_(module.bias[1:], math.log(prob / (1.0 - prob)))
            init.zeros_(module.ema_weight)
            init.zeros_(module.ema_bias)
            init.zeros_(module.ema_steps)

    @classmethod
    def from_pvt_v2_pretrained(cls, pvt, **config_overrides):
        """Upcycles a PVTv2 checkpoint into this DiT class.

        Args:
            pvt (`str`, `os.PathLike` or `PreTrainedModel`):
                A local directory or Hub id of a PVTv2 checkpoint (`model_type="pvt_v2"`), or a loaded
                `PvtV2Model` / `PvtV2ForImageClassification` / `PvtV2Backbone`.
            config_overrides:
                DiT config fields to set (e.g. `routing_mode="static"`, `num_routing_columns=4`, `budget_target=0.9`).

        Every copy of grid stage `i` starts from PVTv2 stage `i`, every patch embedding into scale `i` from PVTv2's,
        the stem from PVTv2's first patch embedding; gates are new. With `routing_mode="static"` the result computes
        exactly the PVTv2 function.
        """
        from .convert_pvt_v2_to_dit_routing import convert_pvt_v2_to_dit

        return convert_pvt_v2_to_dit(cls, pvt, **config_overrides)


@auto_docstring
class DiTModel(DiTPreTrainedModel):
    def __init__(self, config: DiTConfig):
        super().__init__(config)
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        self.stem = DiTOverlapPatchEmbeddings(config, 0)
        # grid[i][j]: transformer stage from node (i, j) to node (i, j + 1).
        self.grid = nn.ModuleList(
            [nn.ModuleList([DiTStage(config, scale) for _ in range(num_columns)]) for scale in range(num_scales)]
        )
        # patch_embeddings[i][j]: downsampling from node (i, j) to node (i + 1, j) (PVTv2's embedding into scale i + 1).
        self.patch_embeddings = nn.ModuleList(
            [
                nn.ModuleList([DiTOverlapPatchEmbeddings(config, scale + 1) for _ in range(num_columns + 1)])
                for scale in range(num_scales - 1)
            ]
        )
        self.row_gates = nn.ModuleList(
            [
                nn.ModuleList([DiTGate(config, scale) for _ in range(num_columns)])
                for scale in range(num_scales)
            ]
        )
        self.column_gates = nn.ModuleList(
            [
                nn.ModuleList([DiTGate(config, scale) for _ in range(num_columns + 1)])
                for scale in range(num_scales - 1)
            ]
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem.proj

    def static_macs(self, image_size: int | tuple[int, int] | None = None, routing_mode: str = "static") -> int:
        """MACs per image of the static (PVTv2) route, or of the `"full"` grid, at `image_size` (default: config's)."""
        height, width = _pair(self.config.image_size if image_size is None else image_size)
        return dit_route_macs(self.config, height, width, routing_mode)

    def _row_decisions(self, scale: int, column: int, features, reach, sample: bool):
        """Per-token row decisions `(batch, tokens)` for stage (scale, column), computed for the images reaching it."""
        batch_size, num_tokens, _ = features.shape
        gate = self.row_gates[scale][column]
        if sample:
            return gate(features)
        reached = reach > 0
        if bool(reached.all()):
            return gate(features)
        index = reached.nonzero().squeeze(1)
        return features.new_zeros(batch_size, num_tokens).index_copy(0, index, gate(features[index]))

    def _column_decisions(self, scale: int, column: int, features, reach, sample: bool):
        """Per-image column decisions `(batch,)` for the downsampling edge (scale -> scale + 1, column)."""
        batch_size = features.shape[0]
        gate = self.column_gates[scale][column]
        if sample:
            return gate(features.mean(1))
        reached = reach > 0
        if bool(reached.all()):
            return gate(features.mean(1))
        index = reached.nonzero().squeeze(1)
        return features.new_zeros(batch_size).index_copy(0, index, gate(features[index].mean(1)))

    @can_return_tuple
    @auto_docstring
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> DiTModelOutput:
        config = self.config
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        dynamic = config.routing_mode == "dynamic"
        # Training in dynamic mode runs every node densely and multiplies by the straight-through gate values: the
        # gates then get gradients also for skipped tokens and closed edges, every parameter is in the graph (no
        # `find_unused_parameters` needed under DDP), and the values equal the sparse inference path exactly.
        sample = dynamic and self.training
        output_hidden_states = kwargs.get("output_hidden_states", config.output_hidden_states)

        batch_size = pixel_values.shape[0]
        sizes = _scale_sizes(config, pixel_values.shape[-2], pixel_values.shape[-1])
        # MAC counts and routing outputs in float32 whatever the model dtype (half precision cannot count to 1e9).
        zeros = pixel_values.new_zeros(batch_size, dtype=torch.float32)

        stem_features, _, _ = self.stem(pixel_values)
        # The stem map is the first hidden state; route from a view of it so that it stays in the graph.
        stem_map = _to_map(stem_features, sizes[0])
        stem_features = stem_map.flatten(2).transpose(1, 2)
        macs = zeros + DiTOverlapPatchEmbeddings.macs(config, 0, pixel_values.shape[-2], pixel_values.shape[-1])
        keep_ratio = zeros.new_zeros(batch_size, num_scales, num_columns)
        column_taken = zeros.new_zeros(batch_size, max(num_scales - 1, 0), num_columns + 1)

        if dynamic:
            features, macs = self._route_dynamic(stem_features, sizes, macs, keep_ratio, column_taken, sample)
        else:
            features, macs = self._route_fixed(stem_features, sizes, macs, keep_ratio, column_taken)

        budget_loss = None
        if dynamic:
            static_cost = dit_route_macs(config, pixel_values.shape[-2], pixel_values.shape[-1], "static")
            budget_loss = (macs.mean() / static_cost - config.budget_target) ** 2

        last_hidden_state = features[num_scales - 1][num_columns]
        height, width = sizes[-1]
        last_map = last_hidden_state.transpose(1, 2).reshape(batch_size, -1, height, width)
        hidden_states = None
        if output_hidden_states:
            hidden_states = (stem_map,) + tuple(
                _to_map(features[scale][num_columns], sizes[scale]) for scale in range(num_scales)
            )
        return DiTModelOutput(
            last_hidden_state=last_map,
            pooler_output=last_hidden_state.mean(dim=1),
            hidden_states=hidden_states,
            budget_loss=budget_loss,
            macs=macs,
            downsampled=column_taken,
            stage_keep_ratio=keep_ratio,
            token_keep_ratio=mean_token_keep_ratio(keep_ratio),
        )

    def _route_fixed(self, stem_features, sizes, macs, keep_ratio, column_taken):
        """Static (PVTv2 staircase: stage `i` at column `i`, edge `i -> i + 1` at column `i + 1`) or full route. The
        route is known in advance: whole batch, every token, no gates, no host syncs (compiles to one graph)."""
        config = self.config
        full = config.routing_mode == "full"
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        features = [[None] * (num_columns + 1) for _ in range(num_scales)]
        for column in range(num_columns + 1):
            for scale in range(num_scales):
                height, width = sizes[scale]
                node = stem_features if scale == 0 and column == 0 else None
                previous = features[scale][column - 1] if column > 0 else None
                if previous is not None:
                    # CODEPATH: static route runs one stage per scale (PVTv2); "full" runs every stage.
                    if full or column - 1 == config.static_columns[scale]:
                        node = self.grid[scale][column - 1](previous, height, width)
                        macs = macs + DiTStage.macs(config, scale, height, width, height * width, 1)
                        keep_ratio[:, scale, column - 1] = 1.0
                    else:
                        node = previous
                above = features[scale - 1][column] if scale > 0 else None
                # CODEPATH: static route takes one downsampling edge per scale (PVTv2); "full" takes every edge.
                if above is not None and (full or column == config.static_columns[scale - 1] + 1):
                    embeddings, _, _ = self.patch_embeddings[scale - 1][column](_to_map(above, sizes[scale - 1]))
                    macs = macs + DiTOverlapPatchEmbeddings.macs(config, scale, *sizes[scale - 1])
                    column_taken[:, scale - 1, column] = 1.0
                    node = embeddings if node is None else node + embeddings
                features[scale][column] = node
        return features, macs

    def _route_dynamic(self, stem_features, sizes, macs, keep_ratio, column_taken, sample):
        """Learned route: per-token row gates, per-image column gates, unreached nodes and closed edges skipped (at
        inference) or multiplied by their straight-through 0/1 decisions (training)."""
        config = self.config
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        zeros = stem_features.new_zeros(stem_features.shape[0])  # reach values: 0/1 in the model dtype
        features = [[None] * (num_columns + 1) for _ in range(num_scales)]
        reach = [[None] * (num_columns + 1) for _ in range(num_scales)]
        row_gates = [[None] * num_columns for _ in range(num_scales)]
        column_gates = [[None] * (num_columns + 1) for _ in range(num_scales - 1)]
        for column in range(num_columns + 1):
            for scale in range(num_scales):
                height, width = sizes[scale]
                hidden = config.hidden_sizes[scale]
                # --- node (scale, column): row part + column part -------------------------------------------------
                if scale == 0 and column == 0:
                    node, node_reach = stem_features, zeros + 1
                else:
                    node, node_reach = None, zeros
                    if column > 0 and features[scale][column - 1] is not None:
                        previous, previous_reach = features[scale][column - 1], reach[scale][column - 1]
                        decisions = row_gates[scale][column - 1]
                        stage = self.grid[scale][column - 1]
                        row_part, num_selected, active = self._run_stage(
                            stage, previous, previous_reach, decisions, height, width, sample
                        )
                        node, node_reach = row_part, previous_reach
                        macs = macs + DiTStage.macs(config, scale, height, width, num_selected, active)
                        keep_ratio[:, scale, column - 1] = num_selected / (height * width)
                    if scale > 0 and features[scale - 1][column] is not None:
                        col_part, taken = self._run_patch_embedding(
                            scale - 1, column, features[scale - 1][column], reach[scale - 1][column],
                            column_gates[scale - 1][column], sample, sizes[scale - 1],
                        )  # fmt: skip
                        if col_part is not None:
                            edge_macs = DiTOverlapPatchEmbeddings.macs(config, scale, *sizes[scale - 1])
                            macs = macs + taken.float() * edge_macs
                            column_taken[:, scale - 1, column] = taken
                            node = col_part if node is None else node + col_part
                            node_reach = 1 - (1 - node_reach) * (1 - taken)
                if node is None or not (sample or bool((node_reach > 0).any())):
                    continue
                features[scale][column], reach[scale][column] = node, node_reach
                # --- gates leaving the node --------------------------------------------------------------------------
                if column < num_columns:
                    row_gates[scale][column] = self._row_decisions(scale, column, node, node_reach, sample)
                    macs = macs + node_reach.float() * DiTGate.macs(height * width, hidden)
                if scale + 1 < num_scales:
                    decisions = self._column_decisions(scale, column, node, node_reach, sample)
                    macs = macs + node_reach.float() * DiTGate.macs(1, hidden)
                    if column == num_columns:
                        # The output node (last scale, last column) must be reached (dit.md §7.9): at the last column,
                        # open the edge for images whose next row has not been entered yet.
                        below = reach[scale + 1][column - 1] if column > 0 else None
                        not_entered = 1.0 if below is None else (1 - below)
                        decisions = torch.maximum(decisions, zeros + not_entered)
                    column_gates[scale][column] = decisions

        if sample:
            for gate_row in list(self.row_gates) + list(self.column_gates):
                for gate in gate_row:
                    gate.update_ema()
        return features, macs

    def _run_stage(self, stage, features, reach, decisions, height, width, sample):
        """Row part of the next node: `reach * (G * stage(F) + (1 - G) * F)`. Returns it with the number of computed
        tokens per image and whether the stage ran for each image (for the MAC count)."""
        # Counted in float32 (exact token counts); straight-through gradients pass through `.float()`.
        num_selected = reach.float() * decisions.float().sum(1)
        active = reach.float() * (num_selected > 0).float()
        if sample:
            output = stage(features, height, width, decisions)
            return reach[:, None, None] * output, num_selected, active
        run = active > 0
        if not bool(run.any()):
            return features, num_selected, active
        selected = decisions > 0
        all_images = bool(run.all())
        index = None if all_images else run.nonzero().squeeze(1)
        inputs = features if all_images else features[index]
        chosen = selected if all_images else selected[index]
        if bool(chosen.all()):
            outputs = stage(inputs, height, width)
        else:
            outputs = stage.forward_selected(inputs, height, width, chosen)
        return (outputs if all_images else features.index_copy(0, index, outputs)), num_selected, active

    def _run_patch_embedding(self, scale, column, features, reach, decisions, sample, size):
        """Column part of node (scale + 1, column): `g * reach * P(F)`, computed only for images that take the edge.
        Returns `(part or None, taken)` with `taken` `(batch,)` 0/1 (straight-through in training)."""
        taken = reach * decisions
        patch_embedding = self.patch_embeddings[scale][column]
        if sample:
            embeddings, _, _ = patch_embedding(_to_map(features, size))
            return taken[:, None, None] * embeddings, taken
        run = taken > 0
        if not bool(run.any()):
            return None, taken
        if bool(run.all()):
            embeddings, _, _ = patch_embedding(_to_map(features, size))
            return embeddings, taken
        index = run.nonzero().squeeze(1)
        embeddings, _, _ = patch_embedding(_to_map(features[index], size))
        full = embeddings.new_zeros(features.shape[0], *embeddings.shape[1:])
        return full.index_copy(0, index, embeddings), taken


def _to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(batch, height * width, C)` tokens to a `(batch, C, height, width)` map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)


@auto_docstring(
    custom_intro="""
    DiT with an image classification head: the last node of the coarsest scale, averaged over positions, then a linear
    layer (PVTv2's head), e.g. for ImageNet.
    """
)
class DiTForImageClassification(DiTPreTrainedModel):
    def __init__(self, config: DiTConfig) -> None:
        super().__init__(config)
        self.num_labels = config.num_labels
        self.dit = DiTModel(config)
        self.classifier = (
            nn.Linear(config.hidden_sizes[-1], config.num_labels) if config.num_labels > 0 else nn.Identity()
        )
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for computing the image classification/regression loss. Indices should be in `[0, ...,
            config.num_labels - 1]`. In dynamic routing `budget_loss_weight * budget_loss` is added to the loss.

        Examples:

        ```python
        >>> import torch
        >>> from transformers import AutoImageProcessor, PvtV2ForImageClassification
        >>> from hf_msvit import DiTForImageClassification

        >>> model = DiTForImageClassification.from_pvt_v2_pretrained("OpenGVLab/pvt_v2_b2", routing_mode="static")
        >>> processor = AutoImageProcessor.from_pretrained("OpenGVLab/pvt_v2_b2")
        >>> outputs = model(torch.randn(1, 3, 224, 224))
        >>> outputs.logits.shape, outputs.macs  # macs: what this image cost, about 4.0e9 for b2 at 224x224
        ```
        """
        outputs: DiTModelOutput = self.dit(pixel_values, return_dict=True, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        macs = outputs.macs
        if isinstance(self.classifier, nn.Linear):
            macs = macs + self.classifier.in_features * self.classifier.out_features

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
            if outputs.budget_loss is not None:
                loss = loss + self.config.budget_loss_weight * outputs.budget_loss

        return DiTImageClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            budget_loss=outputs.budget_loss,
            macs=macs,
            downsampled=outputs.downsampled,
            stage_keep_ratio=outputs.stage_keep_ratio,
            token_keep_ratio=outputs.token_keep_ratio,
        )

    def static_macs(self, image_size: int | tuple[int, int] | None = None, routing_mode: str = "static") -> int:
        """MACs per image of the static (PVTv2) route, or of the `"full"` grid, classifier included."""
        head = self.classifier.weight.numel() if isinstance(self.classifier, nn.Linear) else 0
        return self.dit.static_macs(image_size, routing_mode) + head


@auto_docstring(
    custom_intro="""
    DiT backbone: the last node column at strides 4, 8, 16, 32 (`stage1` ... `stage4`; `stem` is the stem embedding),
    for dense heads such as UperNet, DETR or Mask2Former.
    """
)
class DiTBackbone(BackboneMixin, DiTModel):
    def __init__(self, config: DiTConfig):
        super().__init__(config)
        self.num_features = [config.hidden_sizes[0]] + list(config.hidden_sizes)

    @can_return_tuple
    @filter_output_hidden_states
    @auto_docstring
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> DiTBackboneOutput:
        r"""
        Examples:

        ```python
        >>> import torch
        >>> from hf_msvit import DiTBackbone, DiTConfig

        >>> config = DiTConfig.from_variant("b0", out_features=["stage1", "stage2", "stage3", "stage4"])
        >>> model = DiTBackbone(config).eval()
        >>> feature_maps = model(torch.randn(1, 3, 224, 224)).feature_maps
        >>> [tuple(f.shape[-2:]) for f in feature_maps]
        [(56, 56), (28, 28), (14, 14), (7, 7)]
        ```"""
        kwargs["output_hidden_states"] = True
        outputs: DiTModelOutput = DiTModel.forward(self, pixel_values, return_dict=True, **kwargs)
        feature_maps = tuple(
            outputs.hidden_states[idx] for idx, stage in enumerate(self.stage_names) if stage in self.out_features
        )
        return DiTBackboneOutput(
            feature_maps=feature_maps,
            hidden_states=outputs.hidden_states,
            budget_loss=outputs.budget_loss,
            macs=outputs.macs,
            downsampled=outputs.downsampled,
            stage_keep_ratio=outputs.stage_keep_ratio,
            token_keep_ratio=outputs.token_keep_ratio,
        )


# `save_pretrained` copies the code next to the weights (remote code); the config's AUTO_MAP names the classes.
DiTModel.register_for_auto_class("AutoModel")
DiTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
DiTBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "DiTBackbone",
    "DiTForImageClassification",
    "DiTModel",
    "DiTPreTrainedModel",
    "dit_route_macs",
    "mean_token_keep_ratio",
]
