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
node `F[i][j + 1]`, and the overlapping patch embedding `patch_embeddings[i][j]` (a copy of PVTv2's patch embedding
into
scale `i + 1`) into node `F[i + 1][j]`. A node sums what reaches it (paper Eq. 4):

    F[i][j] = G * stage(F[i][j-1]) + (1 - G) * F[i][j-1]  +  g * patch_embedding(F[i-1][j])

with `G` the per-token row gate of `grid[i][j-1]` and `g` the per-image column gate of `patch_embeddings[i-1][j]`.

PVTv2's modules come from transformers (`transformers.models.pvt_v2.modeling_pvt_v2`), subclassed where DiT adds
something, so the parameter names the PVTv2 converter maps are PVTv2's own.

Multiply-accumulates: every module that computes something has a static `macs(...)` beside it; `_RouteLedger` sums
them for the route an image took (the `macs` output and the budget loss), and `dit_route_macs` runs the same ledger
over
the static or full route from a config alone.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers.initialization as init
from torch import nn
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.pvt_v2.modeling_pvt_v2 import (
    PvtV2ConvFeedForwardNetwork,
    PvtV2DropPath,
    PvtV2OverlapPatchEmbeddings,
    PvtV2SelfAttention,
)
from transformers.models.vit.modeling_vit import eager_attention_forward
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple

from .configuration_dit_routing import DiTConfig


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


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(batch, height * width, C)` tokens as a `(batch, C, height, width)` map in channels-last memory (a view, no
    copy); convolutions keep that layout and `_to_tokens` of their output is again a view."""
    height, width = size
    return tokens.view(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)


def _to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """`(batch, C, height, width)` map to `(batch, height * width, C)` tokens (a view for a channels-last map)."""
    return feature_map.flatten(2).transpose(1, 2)


class DiTOverlapPatchEmbeddings(PvtV2OverlapPatchEmbeddings):
    """PVTv2's overlapping patch embedding into scale `scale` (strided convolution, then LayerNorm), with its cost."""

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__(config, layer_idx=scale)

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

    Only the difference of the two logits matters (`p(open) = softmax(logits)[1] = sigmoid(l1 - l0)`), so the gate
    projects onto `weight[1] - weight[0]`: one multiply-accumulate per channel and token. Training samples decisions
    with the trained weights (Gumbel noise); inference decides with their EMA copies `ema_weight` / `ema_bias` (Eq. 3),
    kept in float32 whatever the model's dtype. Row gates see every token of a node, column gates the node's
    mean-pooled features. `on_static_route` marks the gates of PVTv2's own route.
    """

    def __init__(self, config: DiTConfig, scale: int, on_static_route: bool):
        super().__init__()
        hidden_size = config.hidden_sizes[scale]
        self.weight = nn.Parameter(torch.empty(2, hidden_size))
        self.bias = nn.Parameter(torch.empty(2))
        self.ema_weight = nn.Buffer(torch.zeros(2, hidden_size, dtype=torch.float32))
        self.ema_bias = nn.Buffer(torch.zeros(2, dtype=torch.float32))
        self.ema_steps = nn.Buffer(torch.zeros((), dtype=torch.long))  # before the first update the gate uses `weight`
        self.momentum = config.gate_ema_momentum
        self.warmup_steps = config.gate_ema_warmup_steps
        self.temperature = config.gumbel_temperature
        self.noise_scale = config.gate_noise_scale
        self.on_static_route = on_static_route

    def forward(self, features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Gate decisions for `features` (`(..., hidden_size)`): hard 0/1 values of shape `(...)`.

        Training: straight-through Gumbel-softmax samples (values 0/1, gradients of the soft sample; with two classes
        the Gumbel noise of the logit difference is logistic). Inference: deterministic, open where p(open) under the
        EMA weights is `>= threshold`.
        """
        if self.training:
            logit = self._open_logit(features, self.weight, self.bias).float()
            uniform = torch.rand_like(logit).clamp(torch.finfo(logit.dtype).tiny, 1.0 - torch.finfo(logit.dtype).eps)
            noise = self.noise_scale * (torch.log(uniform) - torch.log1p(-uniform))
            soft = torch.sigmoid((logit + noise) / self.temperature)
            return ((soft >= 0.5).to(soft.dtype) - soft.detach() + soft).to(features.dtype)
        return (self.open_probability(features) >= threshold).to(features.dtype)

    def open_probability(self, features: torch.Tensor) -> torch.Tensor:
        """Inference: p(open) of `features` `(..., hidden_size)` under the EMA weights, shape `(...)`."""
        weight, bias = self.inference_weights()
        return torch.sigmoid(self._open_logit(features, weight.to(features.dtype), bias.to(features.dtype)))

    def straight_through(self, features: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """The decisions inference would take with the current trained weights (`p >= threshold`), with the gradient of
        `p` (straight-through): what the budget prices with `budget_decisions="deterministic"`."""
        probability = torch.sigmoid(self._open_logit(features, self.weight, self.bias))
        return (probability >= threshold).to(probability.dtype) - probability.detach() + probability

    @staticmethod
    def _open_logit(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`l1 - l0`, the logit of p(open), of the projection `features @ weight.T + bias` onto the two classes."""
        # a matrix-matrix product: onnxruntime's MatmulTransposeFusion miscomputes `transposed @ vector`
        return (features @ (weight[1] - weight[0]).unsqueeze(-1)).squeeze(-1) + (bias[1] - bias[0])

    def inference_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The EMA weights (float32), or the trained weights while no EMA update has happened yet."""
        trained = self.ema_steps > 0
        return torch.where(trained, self.ema_weight, self.weight), torch.where(trained, self.ema_bias, self.bias)

    @torch.no_grad()
    def update_ema(self) -> None:
        """`ema <- m_t * ema + (1 - m_t) * weight` (paper Eq. 3) in float32, `m_t = min(m, t / (t + warmup))` at update
        `t` (the first update copies the weights); called once per training forward."""
        steps = self.ema_steps.float()
        momentum = (steps / (steps + self.warmup_steps).clamp_min(1.0)).clamp(max=self.momentum)
        self.ema_weight.lerp_(self.weight.detach().float(), 1.0 - momentum)
        self.ema_bias.lerp_(self.bias.detach().float(), 1.0 - momentum)
        self.ema_steps.add_(1)

    def _apply(self, fn, recurse=True):
        # A dtype cast of the model (`.to(torch.bfloat16)`, `.half()`) must not round the EMA: in bfloat16 a momentum
        # of
        # 0.999 is 1.0 and the average would never move. Device moves apply as usual.
        ema = {name: self._buffers[name] for name in ("ema_weight", "ema_bias")}
        super()._apply(fn, recurse)
        for name, before in ema.items():
            after = self._buffers[name]
            if after.dtype != torch.float32:
                self._buffers[name] = after.float() if before.is_meta else before.to(after.device)
        return self

    @staticmethod
    def macs(num_tokens, hidden_size: int):
        """Multiply-accumulates of gating `num_tokens` tokens (a column gate gates one pooled token)."""
        return num_tokens * hidden_size


class DiTSelfAttention(PvtV2SelfAttention):
    """PVTv2's spatial-reduction attention (its parameters), with transformers' attention dispatch (sdpa / eager) and
    queries that may be a subset of the tokens: keys and values come from the whole (spatially reduced) map."""

    def __init__(self, config: DiTConfig, scale: int):
        super().__init__(
            config,
            hidden_size=config.hidden_sizes[scale],
            num_attention_heads=config.num_attention_heads[scale],
            spatial_reduction_ratio=config.sr_ratios[scale],
        )
        self.config = config
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False

    def keys_and_values(self, hidden_states: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Keys and values `(batch, heads, kv_tokens, head_dim)` from the full normalized map `(batch, tokens, C)`."""
        if self.spatial_reduction_ratio > 1:
            reduced = self.spatial_reduction(_to_map(hidden_states, (height, width)))
            hidden_states = self.layer_norm(_to_tokens(reduced))
        shape = (hidden_states.shape[0], -1, self.num_attention_heads, self.attention_head_size)
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
            dropout=self.attn_drop.p if self.training else 0.0,
            scaling=self.scaling,
            is_causal=False,
        )
        context = context.reshape(batch_size, num_queries, self.hidden_size)
        return self.proj_drop(self.proj(context))

    def forward(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        key, value = self.keys_and_values(hidden_states, height, width)
        return self.attend(hidden_states, key, value)


class DiTConvFeedForwardNetwork(PvtV2ConvFeedForwardNetwork):
    """PVTv2's MLP (Linear -> depth-wise 3x3 conv -> GELU -> Linear); skipped tokens can enter the conv as zeros."""

    def __init__(self, config: DiTConfig, scale: int):
        hidden_size = config.hidden_sizes[scale]
        super().__init__(config, hidden_size, hidden_features=int(hidden_size * config.mlp_ratios[scale]))

    def forward(self, hidden_states: torch.Tensor, height: int, width: int, token_mask=None) -> torch.Tensor:
        hidden_states = self.dense1(hidden_states)
        if token_mask is not None:
            # Skipped tokens feed zeros to the depth-wise conv, exactly as the gather path (which scatters the computed
            # tokens into a zero map).
            hidden_states = hidden_states * token_mask
        return self.finish(self.depthwise(hidden_states, height, width))

    def depthwise(self, hidden_states: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """PVTv2's depth-wise conv (`self.dwconv`) on the tokens viewed as a channels-last map. Not
        `PvtV2DepthWiseConv.forward`: for a one-image batch its transpose-view makes oneDNN copy the map to NCHW
        first."""
        return _to_tokens(self.dwconv.dwconv(_to_map(hidden_states, (height, width))))

    def finish(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Everything after the depth-wise conv."""
        hidden_states = self.dropout(self.intermediate_act_fn(hidden_states))
        return self.dropout(self.dense2(hidden_states))


class DiTBlockLayer(GradientCheckpointingLayer):
    """One PVTv2 block (pre-LN attention and MLP, residuals; PVTv2's parameter names), able to compute only the tokens
    a row gate selected. Not `PvtV2BlockLayer`: its submodules are DiT's subclasses and its forwards take the gate."""

    def __init__(self, config: DiTConfig, scale: int, drop_path: float = 0.0):
        super().__init__()
        hidden_size = config.hidden_sizes[scale]
        self.layer_norm_1 = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.attention = DiTSelfAttention(config, scale)
        self.drop_path = PvtV2DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
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

    def forward_selected(self, rows: torch.Tensor, size: tuple[int, int], selection: "_TokenSelection") -> None:
        """Inference, in place on `rows` (the stage's map flattened to `(batch * tokens, hidden)`): computes the tokens
        of `selection` (every token, or the ones a row gate selected). Keys/values come from the whole map; the query,
        attention, output projection and MLP linears run on the selected tokens only (attention on a batch padded to
        the most selected tokens of an image; the padding's results are discarded), and the depth-wise conv sees the
        computed tokens in a zero map (`_feed_forward_inference`)."""
        hidden_size = rows.shape[1]
        hidden_states = rows.view(selection.batch_size, -1, hidden_size)
        normed = self.layer_norm_1(hidden_states)
        key, value = self.attention.keys_and_values(normed, *size)
        if selection.read_index is None:
            rows += self.attention.attend(normed, key, value).view(-1, hidden_size)
            _feed_forward_inference(self.mlp, self.layer_norm_2(rows), rows, size, selection)
            return
        reads = selection.read_index.view(-1)
        queries = normed.view(-1, hidden_size).index_select(0, reads).view(selection.batch_size, -1, hidden_size)
        selected = (rows.index_select(0, reads).view_as(queries) + self.attention.attend(queries, key, value)).view(
            -1, hidden_size
        )
        if selection.packed_from_padded is not None:
            selected = selected.index_select(0, selection.packed_from_padded)
        _feed_forward_inference(self.mlp, self.layer_norm_2(selected), selected, size, selection)
        rows.index_copy_(0, selection.packed_index, selected)

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


# Floats of the intermediate map that one step of `_feed_forward_inference` works on, on CPU: small enough to stay in a
# core's cache (2 MiB here), large enough that the per-step overhead of the Python loop stays small. Accelerators take
# the whole map in one step.
_FEED_FORWARD_BLOCK_FLOATS = 1 << 19


@dataclass
class _FeedForwardBlock:
    """A step of `_feed_forward_inference`: the packed rows of `num_images` consecutive images and, for a selection,
    their positions in those images' maps flattened to `(num_images * tokens,)` (`None`: every token, in order)."""

    rows: slice
    num_images: int
    map_index: torch.Tensor | None


@dataclass
class _TokenSelection:
    """The tokens a stage computes at inference, as rows of its map flattened to `(batch * tokens, C)`.

    `read_index` `(batch, max_selected)`: each image's selected rows first, then unselected ones as padding (attention
    runs on this padded batch). `packed_index` `(total_selected,)`: the selected rows, image after image (the MLP and
    the write-back run on these); `packed_from_padded` picks them out of the padded batch (`None`: no padding). All
    three are `None` when every token is computed.
    """

    batch_size: int
    num_tokens: int
    counts: list[int]
    read_index: torch.Tensor | None = None
    packed_index: torch.Tensor | None = None
    packed_from_padded: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict)

    @classmethod
    def every_token(cls, batch_size: int, num_tokens: int) -> "_TokenSelection":
        # while exporting, no per-image Python list: it would pin the batch size of the exported graph
        return cls(batch_size, num_tokens, [] if torch.compiler.is_exporting() else [num_tokens] * batch_size)

    @classmethod
    def from_indices(cls, indices: torch.Tensor, num_tokens: int) -> "_TokenSelection":
        """The tokens `indices` `(batch, count)` of every image: the same count per image, so no padding."""
        batch_size, count = indices.shape
        read_index = indices + torch.arange(batch_size, device=indices.device)[:, None] * num_tokens
        counts = [] if torch.compiler.is_exporting() else [count] * batch_size
        return cls(batch_size, num_tokens, counts, read_index, read_index.view(-1))

    @classmethod
    def from_mask(cls, selected: torch.Tensor, counts: list[int]) -> "_TokenSelection":
        batch_size, num_tokens = selected.shape
        max_selected = max(counts)
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :max_selected]
        read_index = order + torch.arange(batch_size, device=order.device)[:, None] * num_tokens
        valid = torch.arange(max_selected, device=order.device)[None, :] < selected.sum(1, keepdim=True)
        padded = sum(counts) < batch_size * max_selected
        packed_from_padded = valid.view(-1).nonzero().squeeze(1) if padded else None
        packed_index = read_index.view(-1) if packed_from_padded is None else read_index[valid]
        return cls(batch_size, num_tokens, counts, read_index, packed_index, packed_from_padded)

    def feed_forward_plan(self, width: int, block_floats: int | None) -> tuple[int, list[_FeedForwardBlock]]:
        """`(channels, blocks)`: the MLP's intermediate channels are processed `channels` at a time, for the images of
        one block at a time, so that the block's intermediate map (`num_images * tokens * channels` floats) stays near
        `block_floats` (`None`: everything in one step). Cached: the blocks of a stage share it."""
        if torch.compiler.is_exporting():  # one step over every image: a per-image Python loop would pin the batch
            return width, [_FeedForwardBlock(slice(None), self.batch_size, self.packed_index)]
        if (width, block_floats) not in self._plans:
            limit = block_floats or width * self.num_tokens * self.batch_size
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            fitting = [d for d in divisors if d * self.num_tokens <= limit]
            channels = max(fitting) if fitting else divisors[0]
            group = max(1, limit // (self.num_tokens * channels))
            offsets = [0]
            for count in self.counts:
                offsets.append(offsets[-1] + count)
            blocks = []
            for first in range(0, self.batch_size, group):
                last = min(first + group, self.batch_size)
                rows = slice(offsets[first], offsets[last])
                map_index = None
                if self.packed_index is not None:
                    map_index = self.packed_index[rows] - first * self.num_tokens
                blocks.append(_FeedForwardBlock(rows, last - first, map_index))
            self._plans[width, block_floats] = channels, blocks
        return self._plans[width, block_floats]


def _feed_forward_inference(mlp, normed: torch.Tensor, residual: torch.Tensor, size, selection: _TokenSelection):
    """Inference: `residual += mlp(normed)` for the packed rows `(total_selected, C)` of `selection`, tokens outside
    the
    selection entering the depth-wise conv as zeros. The same result as the MLP's forward, computed a few images and a
    slice of the intermediate channels at a time (the map of the widest tensor, 4-8 times the hidden size, then stays
    in cache), accumulating the output projection in place."""
    weight_1, bias_1, weight_2 = mlp.dense1.weight, mlp.dense1.bias, mlp.dense2.weight
    conv = mlp.dwconv.dwconv
    block_floats = _FEED_FORWARD_BLOCK_FLOATS if normed.device.type == "cpu" else None
    channels, blocks = selection.feed_forward_plan(weight_1.shape[0], block_floats)
    residual += mlp.dense2.bias
    if selection.packed_index is not None:  # the zero map the selected tokens are written into
        scratch = normed.new_empty(max(block.num_images for block in blocks) * selection.num_tokens, channels)
    for block in blocks:
        inputs, output = normed[block.rows], residual[block.rows]
        if block.map_index is not None:
            block_map = scratch[
                : block.num_images * selection.num_tokens
            ].zero_()  # its channel slices write the same rows
        for start in range(0, weight_1.shape[0], channels):
            part = slice(start, start + channels)
            intermediate = torch.addmm(bias_1[part], inputs, weight_1[part].t())
            if block.map_index is not None:
                intermediate = block_map.index_copy_(0, block.map_index, intermediate)
            feature_map = _to_map(intermediate.view(block.num_images, -1, channels), size)
            convolved = nn.functional.conv2d(
                feature_map, conv.weight[part], conv.bias[part], conv.stride, conv.padding, conv.dilation, channels
            )
            convolved = _to_tokens(convolved).reshape(-1, channels)
            if block.map_index is not None:
                convolved = convolved.index_select(0, block.map_index)
            activated = mlp.intermediate_act_fn(convolved)
            if torch.is_grad_enabled():  # autograd cannot differentiate `out=`
                output += activated @ weight_2[:, part].t()
            else:  # in place without a temporary; unlike `addmm_`, FlopCounterMode counts it
                torch.addmm(output, activated, weight_2[:, part].t(), out=output)
    return residual


class DiTStage(nn.Module):
    """Transformer stage `B[i][j]` of the grid: a copy of PVTv2 stage `i` (its blocks and its final LayerNorm). Not
    `PvtV2EncoderLayer`: in the grid the patch embedding is a separate edge, and skipped tokens pass by identity."""

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
        self.masked_input = config.stage_input == "masked_map"

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Dense path: every token is computed; with `token_mask` `(batch, tokens)` of 0/1 values the output is
        `mask * stage(x) + (1 - mask) * x`, skipped tokens frozen inside the stage too (at their values, or at zero
        with
        `stage_input="masked_map"`). The reference semantics, and the training path: gradients reach the gates. At
        inference without a mask it runs `forward_selected` on every token (same values, cache-blocked MLP)."""
        if token_mask is None and not (self.training or torch.is_grad_enabled()):
            return self.forward_selected(hidden_states, height, width)
        mask = None if token_mask is None else token_mask.unsqueeze(-1)
        output = hidden_states if mask is None or not self.masked_input else hidden_states * mask
        for block in self.blocks:
            output = block(output, height, width, mask)
        output = self.layer_norm(output)
        if mask is None:
            return output
        return mask * output + (1 - mask) * hidden_states

    def forward_selected(
        self, hidden_states: torch.Tensor, height: int, width: int, selected=None, counts: list[int] | None = None
    ) -> torch.Tensor:
        """Inference: the same result as `forward(hidden_states, ..., token_mask=selected)`, computing only the tokens
        `selected` `(batch, tokens)` (bool; `None`: every token; `counts`: selected tokens per image, if known)."""
        batch_size, num_tokens, hidden_size = hidden_states.shape
        if selected is None:
            selection = _TokenSelection.every_token(batch_size, num_tokens)
        else:
            counts = selected.sum(1).tolist() if counts is None else counts  # trf-ignore: TRF056 data-dependent
            if max(counts) == 0:
                return hidden_states.clone()
            selection = _TokenSelection.from_mask(selected, counts)
        return self._compute_selection(hidden_states, height, width, selection, selected)

    def forward_top_tokens(self, hidden_states: torch.Tensor, height: int, width: int, indices: torch.Tensor):
        """Inference: `forward_selected` for the tokens `indices` `(batch, count)`, the same count in every image (no
        padding, no host sync: the exact-budget mode)."""
        selected = None
        if self.masked_input:
            selected = torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=indices.device)
            selected.scatter_(1, indices, True)
        selection = _TokenSelection.from_indices(indices, hidden_states.shape[1])
        return self._compute_selection(hidden_states, height, width, selection, selected)

    def _compute_selection(self, hidden_states, height: int, width: int, selection: "_TokenSelection", selected):
        """Runs the blocks on the rows of `selection` (skipped rows zero inside the stage with `masked_map`)."""
        hidden_size = hidden_states.shape[-1]
        rows = hidden_states.reshape(-1, hidden_size).clone()
        if self.masked_input and selected is not None:
            rows *= selected.reshape(-1, 1)
        for block in self.blocks:
            block.forward_selected(rows, (height, width), selection)
        if selection.packed_index is None:
            return self.layer_norm(rows).view_as(hidden_states)
        normed = self.layer_norm(rows.index_select(0, selection.packed_index))
        if self.masked_input:  # skipped rows hold zeros: restore their input values
            rows.copy_(hidden_states.reshape(-1, hidden_size))
        return rows.index_copy_(0, selection.packed_index, normed).view_as(hidden_states)

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


def _either(first, second):
    """OR of two 0/1 reach values (`None`: no such edge); differentiable for (straight-through) tensors."""
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return 1 - (1 - first) * (1 - second)
    return max(first, second)


def _fixed_decisions(config: DiTConfig, routing_mode: str, scale: int, column: int) -> tuple:
    """`(row, column)` decisions (1/0, `None` where the node has no such gate) of node (scale, column) on the static
    (PVTv2 staircase: stage `i` at column `i`, edge `i -> i + 1` at column `i + 1`) or full route."""
    full = routing_mode == "full"
    # CODEPATH: every checkpoint; the last node column has no stage after it, the full route opens every stage.
    row = int(full or column == config.static_columns[scale]) if column < config.num_routing_columns else None
    has_edge = scale + 1 < config.num_encoder_blocks
    down = int(full or column == config.static_columns[scale] + 1) if has_edge else None
    return row, down


@dataclass
class _RouteLedger:
    """Reach and cost (paper Eq. 5) of one set of gate decisions, node by node, from the decisions alone.

    Values are Python numbers on a fixed route (no tensors, no host syncs) and `(batch,)` / `(batch, tokens)` 0/1
    tensors on the learned route; in training they are straight-through values, so the cost has gradients.
    """

    config: DiTConfig
    sizes: list[tuple[int, int]]
    macs: torch.Tensor | int = 0
    stage_keep_ratio: torch.Tensor | None = None  # (batch, scales, columns), filled when given
    downsampled: torch.Tensor | None = None  # (batch, scales - 1, columns + 1), filled when given
    reach: dict = field(default_factory=dict)  # (scale, column) -> 0/1 per image
    taken: dict = field(default_factory=dict)  # (scale, column) -> 0/1 per image: downsampled from that node

    def reach_node(self, scale: int, column: int):
        """Records and returns the reach of node (scale, column) (`None`: no edge leads there)."""
        if (scale, column) == (0, 0):
            reach = 1
        else:
            reach = _either(self.reach.get((scale, column - 1)), self.taken.get((scale - 1, column)))
        if reach is not None:
            self.reach[(scale, column)] = reach
        return reach

    def bill_stage(self, scale: int, column: int, decisions) -> None:
        """Stage (scale, column) computing `decisions` (1/0: every token or none; or `(batch, tokens)`) of its node.

        The per-image part is paid when any token is computed; in training its value is that exact indicator and its
        gradient that of the fraction of tokens computed (straight-through), so whole stages can be learned off.
        """
        height, width = self.sizes[scale]
        reach = self.reach[(scale, column)]
        if isinstance(decisions, torch.Tensor):
            num_selected = reach * decisions.float().sum(1)
            keep = num_selected / (height * width)
            active = (num_selected > 0).float() + keep - keep.detach()
        else:  # Python numbers: 1/0 on a fixed route, a fraction of the tokens in the exact-budget mode
            keep = reach * decisions
            num_selected = round(keep * height * width)
            active = int(num_selected > 0)
        self.macs = self.macs + DiTStage.macs(self.config, scale, height, width, num_selected, active)
        if self.stage_keep_ratio is not None:
            self.stage_keep_ratio[:, scale, column] = keep.detach() if isinstance(keep, torch.Tensor) else keep

    def bill_edge(self, scale: int, column: int, decision):
        """Downsampling edge (scale -> scale + 1, column) with column decision `decision`; returns the 0/1 per image
        that take it. At the last column the edge opens for images whose next scale has not been entered yet, so the
        output node (coarsest scale, last column) is always reached."""
        # CODEPATH: every checkpoint; only the last node column forces its edge open.
        if column == self.config.num_routing_columns:
            entered = self.reach.get((scale + 1, column - 1), 0)
            decision = 1 - (1 - decision) * entered  # = max(decision, 1 - entered) for 0/1 values
        taken = self.reach[(scale, column)] * decision
        self.taken[(scale, column)] = taken
        self.macs = self.macs + taken * DiTOverlapPatchEmbeddings.macs(self.config, scale + 1, *self.sizes[scale])
        if self.downsampled is not None:
            self.downsampled[:, scale, column] = taken.detach() if isinstance(taken, torch.Tensor) else taken
        return taken

    def bill_gates(self, scale: int, column: int, column_gate: bool = True) -> None:
        """The gates leaving node (scale, column): a row gate on every token, a column gate on the pooled map (not
        evaluated in the exact-budget mode, whose route is fixed: `column_gate=False`)."""
        height, width = self.sizes[scale]
        hidden = self.config.hidden_sizes[scale]
        # CODEPATH: every checkpoint; the last node column has no row gate.
        if column < self.config.num_routing_columns:
            self.macs = self.macs + self.reach[(scale, column)] * DiTGate.macs(height * width, hidden)
        # CODEPATH: every checkpoint; the coarsest scale has no column gate.
        if column_gate and scale + 1 < self.config.num_encoder_blocks:
            self.macs = self.macs + self.reach[(scale, column)] * DiTGate.macs(1, hidden)


def mean_token_keep_ratio(stage_keep_ratio: torch.Tensor) -> torch.Tensor:
    """`(batch, scales, columns)` per-stage keep ratios -> `(batch,)`: the mean over the stages that ran for each image
    (a stage that did not run is not a stage that kept 0% of its tokens). The one definition of DiT's token keep
    ratio."""
    flat = stage_keep_ratio.flatten(1)
    ran = flat > 0
    return (flat * ran).sum(1) / ran.sum(1).clamp_min(1)


def dit_route_macs(config: DiTConfig, height: int, width: int, routing_mode: str | None = None) -> int:
    """Multiply-accumulates of one image of `height x width` through the static (PVTv2) or full route, from the config
    alone (no weights needed), classifier excluded: the ledger the forward uses, run over the fixed route."""
    routing_mode = routing_mode or config.routing_mode
    if routing_mode not in ("static", "full"):
        raise ValueError("dit_route_macs is analytic only for routing_mode 'static' or 'full'; read `macs` otherwise.")
    ledger = _RouteLedger(config, _scale_sizes(config, height, width))
    ledger.macs = DiTOverlapPatchEmbeddings.macs(config, 0, height, width)
    for column in range(config.num_routing_columns + 1):
        for scale in range(config.num_encoder_blocks):
            if not ledger.reach_node(scale, column):
                continue
            row, down = _fixed_decisions(config, routing_mode, scale, column)
            if row is not None:
                ledger.bill_stage(scale, column, row)
            if down is not None:
                ledger.bill_edge(scale, column, down)
    return int(ledger.macs)


def compute_budget_tokens(config: DiTConfig, height: int, width: int, compute_budget: float) -> list[int]:
    """Tokens per scale that each stage of PVTv2's route computes in the exact-budget mode, so that an image of
    `height x width` costs `compute_budget` times the static route (classifier excluded), as close as whole tokens
    allow: the same fraction of the tokens at every scale, then single tokens moved to close the rounding gap. Below
    1 the row gates that rank the tokens are paid for too."""
    config.check_compute_budget(compute_budget)
    sizes = _scale_sizes(config, height, width)
    num_tokens = [h * w for h, w in sizes]
    static = dit_route_macs(config, height, width, "static")
    if compute_budget >= 1.0:
        return num_tokens
    per_token = [config.depths[s] * DiTBlockLayer.macs(config, s, *sizes[s])[1] for s in range(len(sizes))]
    gates = sum(DiTGate.macs(n, hidden) for n, hidden in zip(num_tokens, config.hidden_sizes))

    def cost(tokens):
        return static + gates - sum(p * (n - k) for p, n, k in zip(per_token, num_tokens, tokens))

    target = compute_budget * static
    fraction = 1.0 - (static + gates - target) / sum(p * n for p, n in zip(per_token, num_tokens))
    tokens = [min(n, max(1, round(fraction * n))) for n in num_tokens]
    while True:  # greedy single-token moves while they bring the cost closer to the target
        moves = [tokens[:s] + [tokens[s] + d] + tokens[s + 1 :] for s in range(len(tokens)) for d in (-1, 1)]
        moves = [m for m in moves if all(1 <= k <= n for k, n in zip(m, num_tokens))]
        best = min(moves, key=lambda m: abs(cost(m) - target))
        if abs(cost(best) - target) >= abs(cost(tokens) - target):
            break
        tokens = best
    if cost(tokens) > 1.02 * target:
        cheapest = cost([1] * len(tokens)) / static
        raise ValueError(
            f"compute_budget {compute_budget} is below what PVTv2's route can cost at {height}x{width} px with one "
            f"token per stage ({cheapest:.3f} of the static cost: the per-image parts and the gates): ask for more."
        )
    return tokens


@dataclass
class _Route:
    """One routing pass over the grid: node features, the row decisions taken, and their ledgers.

    `mode`: `"fixed"` (static / full route, known in advance), `"sample"` (training in dynamic mode: every node
    computed
    densely and multiplied by straight-through decisions), `"sparse"` (inference: only what the route needs) or
    `"budget"` (inference, exact budget: PVTv2's route, `tokens_per_scale` top-scoring tokens per stage).
    `budget_ledger` (training with `budget_decisions="deterministic"`) prices the decisions inference would take.
    """

    mode: str
    ledger: _RouteLedger
    row_threshold: float
    budget_ledger: _RouteLedger | None = None
    tokens_per_scale: list[int] | None = None
    dense_training: bool = True  # "sample" mode: compute every node, or only what some image reaches
    features: dict = field(default_factory=dict)  # (scale, column) -> (batch, tokens, C)
    row_decisions: dict = field(default_factory=dict)  # (scale, column) -> decisions of stage (scale, column)
    reached_index: dict = field(default_factory=dict)  # sparse mode: (scale, column) -> reached images (None: all)
    taken_on_host: dict = field(default_factory=dict)  # sparse mode: (scale, column) -> images taking the edge (list)
    reached_on_host: dict = field(default_factory=dict)  # sparse mode: (scale, column) -> images reaching it (list)

    def node_exists(self, scale: int, column: int, reach) -> bool:
        """Whether node (scale, column) is computed: a fixed route's reached nodes, every node with an incoming edge in
        training, nodes some image reaches at inference (from the edges' decisions, already on the host)."""
        if reach is None or self.mode == "sample":
            return reach is not None and (self.dense_training or _any_in_any_process(reach))
        if not isinstance(reach, torch.Tensor):  # the stem (reach 1) or a fixed route
            if self.mode == "sparse" and reach:
                self.reached_on_host[(scale, column)] = [True] * self.ledger.macs.shape[0]
            return bool(reach)
        row = self.reached_on_host.get((scale, column - 1))
        down = self.taken_on_host.get((scale - 1, column))
        if row is None and down is None:  # neither incoming node was computed
            return False
        reached = [bool(a or b) for a, b in zip(row or [False] * len(down), down or [False] * len(row))]
        if not any(reached):
            return False
        self.reached_on_host[(scale, column)] = reached
        index = None if all(reached) else torch.tensor([i for i, r in enumerate(reached) if r], device=reach.device)
        self.reached_index[(scale, column)] = index
        return True

    def record_edge(self, scale: int, column: int, taken: torch.Tensor) -> None:
        """Sparse mode: which images take edge (scale, column) (one host sync per edge; the reach of every node and
        the sub-batch of every edge follow from these)."""
        self.taken_on_host[(scale, column)] = (taken > 0).tolist()  # trf-ignore: TRF056 data-dependent routing


def _any_in_any_process(values) -> bool:
    """Whether any entry of the 0/1 `values` (a tensor, or a Python number) is set, in this process or any other of
    the job (so that every process computes the same modules in `sparse_training`)."""
    if not isinstance(values, torch.Tensor):
        return bool(values)
    flag = values.detach().gt(0).any().to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def _on_images(function: Callable, inputs: torch.Tensor, index: torch.Tensor | None, batch_size: int):
    """`function(inputs[index])` scattered into zeros of the full batch (`index` None: the whole batch)."""
    if index is None:
        return function(inputs)
    outputs = function(inputs[index])
    return outputs.new_zeros(batch_size, *outputs.shape[1:]).index_copy(0, index, outputs)


def _add(first, second):
    if first is None or second is None:
        return second if first is None else first
    return first + second


def _times(gate, features: torch.Tensor) -> torch.Tensor:
    """`features` `(batch, tokens, C)` times a per-image 0/1 value (a Python 1 leaves them as they are)."""
    if not isinstance(gate, torch.Tensor):
        return features if gate == 1 else gate * features
    return gate.to(features.dtype)[:, None, None] * features


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
            self._init_gate(module)

    def _init_gate(self, gate: DiTGate) -> None:
        """Index 1 = compute/open; the bias sets p(open) (`gate_init`, `gate_init_compute_prob`)."""
        prob = self.config.gate_init_compute_prob
        # CODEPATH: "static_route" (upcycled checkpoints) or "all_open" (models trained from scratch).
        if self.config.gate_init == "static_route":
            # zero weights: every token of a gate starts with the same p, PVTv2's route exactly at inference
            init.zeros_(gate.weight)
            prob = prob if gate.on_static_route else 1.0 - prob
        else:
            init.trunc_normal_(gate.weight, mean=0.0, std=self.config.initializer_range)
        init.zeros_(gate.bias)
        init.constant_(gate.bias[1:], math.log(prob / (1.0 - prob)))
        init.zeros_(gate.ema_weight)
        init.zeros_(gate.ema_bias)
        init.zeros_(gate.ema_steps)

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
        the stem from PVTv2's first patch embedding; gates are new and, unless overridden, start on PVTv2's route
        (`gate_init="static_route"`: the dynamic model starts at exactly PVTv2's function and cost) and train on the
        route inference takes (`gate_noise_scale=0`). With `routing_mode="static"` the result computes exactly the
        PVTv2
        function.
        """
        from .convert_pvt_v2_to_dit_routing import convert_pvt_v2_to_dit

        return convert_pvt_v2_to_dit(cls, pvt, **config_overrides)


@auto_docstring
class DiTModel(DiTPreTrainedModel):
    def __init__(self, config: DiTConfig):
        super().__init__(config)
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        static = config.static_columns
        self.stem = DiTOverlapPatchEmbeddings(config, 0)
        # grid[i][j]: transformer stage from node (i, j) to node (i, j + 1).
        self.grid = nn.ModuleList(
            [nn.ModuleList([DiTStage(config, scale) for _ in range(num_columns)]) for scale in range(num_scales)]
        )
        # patch_embeddings[i][j]: downsampling from node (i, j) to node (i + 1, j) (PVTv2's embedding into scale i +
        # 1).
        self.patch_embeddings = nn.ModuleList(
            [
                nn.ModuleList([DiTOverlapPatchEmbeddings(config, scale + 1) for _ in range(num_columns + 1)])
                for scale in range(num_scales - 1)
            ]
        )
        self.row_gates = nn.ModuleList(
            [
                nn.ModuleList([DiTGate(config, scale, column == static[scale]) for column in range(num_columns)])
                for scale in range(num_scales)
            ]
        )
        self.column_gates = nn.ModuleList(
            [
                nn.ModuleList(
                    [DiTGate(config, scale, column == static[scale] + 1) for column in range(num_columns + 1)]
                )
                for scale in range(num_scales - 1)
            ]
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem.proj

    def static_macs(self, image_size: int | tuple[int, int] | None = None) -> int:
        """MACs per image of the static (PVTv2) route at `image_size` (default: the config's)."""
        return dit_route_macs(self.config, *_pair(image_size or self.config.image_size), "static")

    def full_grid_macs(self, image_size: int | tuple[int, int] | None = None) -> int:
        """MACs per image with every stage, edge and token computed (the paper's "Fully"), at `image_size`."""
        return dit_route_macs(self.config, *_pair(image_size or self.config.image_size), "full")

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTModelOutput:
        r"""
        gate_threshold (`float`, *optional*):
            Overrides `config.gate_threshold` for this call: at inference a row gate computes a token when its
            probability of computing it is `>= gate_threshold`. Higher values compute fewer tokens.
        compute_budget (`float`, *optional*):
            Overrides `config.compute_budget` for this call (inference): every image computes this fraction of the
            static route's cost, PVTv2's route with the tokens the row gates score highest (see `DiTConfig`).
        """
        self._check_pixel_values(pixel_values)
        threshold = self.config.gate_threshold if gate_threshold is None else gate_threshold
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"gate_threshold must lie in [0, 1], got {threshold}.")
        budget = self.config.compute_budget if compute_budget is None else compute_budget
        if budget is not None and self.training:
            raise ValueError("compute_budget is an inference mode: call model.eval() first, or train with the gates.")
        sizes = _scale_sizes(self.config, *pixel_values.shape[-2:])
        stem_features, _, _ = self.stem(pixel_values)
        # The stem map is the first hidden state; route from a view of it so that it stays in the graph.
        stem_map = _to_map(stem_features, sizes[0])
        route = self._start_route(pixel_values, sizes, threshold, budget)
        route.features[(0, 0)] = _to_tokens(stem_map)
        for column in range(self.config.num_routing_columns + 1):
            for scale in range(self.config.num_encoder_blocks):
                self._visit_node(route, scale, column)
        if route.mode == "sample":
            for gate in self._gates():
                gate.update_ema()
        output_hidden_states = kwargs.get("output_hidden_states", self.config.output_hidden_states)
        return self._outputs(route, stem_map if output_hidden_states else None, pixel_values.shape[-2:])

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """A clear `ValueError` for input the grid cannot take (as HF ViT does for a wrong channel count)."""
        config = self.config
        expected = f"(batch_size, {config.num_channels}, height, width)"
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}: the channel dimension "
                f"must "
                f"match num_channels={config.num_channels} in the configuration (the image processor converts "
                "grayscale images to RGB)."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values holds no image: shape {tuple(pixel_values.shape)}, expected {expected}.")
        sizes = _scale_sizes(config, *pixel_values.shape[-2:])
        for scale, ((height, width), ratio) in enumerate(zip(sizes, config.sr_ratios)):
            if min(height, width) < ratio:
                raise ValueError(
                    f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels give a {height}x{width} map at scale "
                    f"{scale}, smaller than its spatial-reduction ratio {ratio}: use larger images."
                )

    def _gates(self):
        return [gate for rows in (self.row_gates, self.column_gates) for gate_row in rows for gate in gate_row]

    def _start_route(self, pixel_values: torch.Tensor, sizes, threshold: float, budget: float | None) -> _Route:
        """An empty route over the grid, its ledger holding the stem's cost (MACs and routing outputs in float32
        whatever
        the model dtype: half precision cannot count to 1e9)."""
        config = self.config
        batch_size, device = pixel_values.shape[0], pixel_values.device
        stem_macs = DiTOverlapPatchEmbeddings.macs(config, 0, *pixel_values.shape[-2:])
        macs = torch.full((batch_size,), float(stem_macs), device=device)
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        ledger = _RouteLedger(
            config,
            sizes,
            macs,
            stage_keep_ratio=macs.new_zeros(batch_size, num_scales, num_columns),
            downsampled=macs.new_zeros(batch_size, max(num_scales - 1, 0), num_columns + 1),
        )
        if budget is not None:
            tokens = compute_budget_tokens(config, *pixel_values.shape[-2:], budget)
            return _Route("budget", ledger, threshold, tokens_per_scale=tokens)
        # CODEPATH: "static" / "full" routes (fixed, no gates) or "dynamic" (default, learned).
        if config.routing_mode != "dynamic":
            return _Route("fixed", ledger, threshold)
        if not self.training:
            return _Route("sparse", ledger, threshold)
        # Training computes every node densely and multiplies by the straight-through decisions: the gates then get
        # gradients also for skipped tokens and closed edges, every parameter is in the graph (DDP and FSDP see the
        # same
        # collectives on every process), and the values equal the sparse inference path exactly.
        # CODEPATH: "deterministic" (default) prices inference's decisions; "sampled" the Gumbel samples.
        budget_ledger = _RouteLedger(config, sizes, macs) if config.budget_decisions == "deterministic" else None
        return _Route("sample", ledger, threshold, budget_ledger, dense_training=not config.sparse_training)

    def _visit_node(self, route: _Route, scale: int, column: int) -> None:
        """Computes node (scale, column) from its row and column parts (Eq. 4), then decides the gates leaving it."""
        reach = route.ledger.reach_node(scale, column)
        if route.budget_ledger is not None:
            route.budget_ledger.reach_node(scale, column)
        if not route.node_exists(scale, column, reach):
            return
        if (scale, column) != (0, 0):
            row_part = self._row_part(route, scale, column)
            route.features[(scale, column)] = _add(row_part, self._column_part(route, scale, column))
        self._leave_node(route, scale, column)

    def _row_part(self, route: _Route, scale: int, column: int):
        """`G * stage(F) + (1 - G) * F` from node (scale, column - 1), or None if that node was not computed."""
        previous = route.features.get((scale, column - 1))
        if previous is None:
            return None
        decisions = route.row_decisions[(scale, column - 1)]
        stage, size = self.grid[scale][column - 1], route.ledger.sizes[scale]
        if isinstance(decisions, int):  # a fixed route, or a budget stage computing every token
            return stage(previous, *size) if decisions else previous
        if route.mode == "budget":
            return stage.forward_top_tokens(previous, *size, decisions)
        if route.mode == "sample":
            reach = route.ledger.reach[(scale, column - 1)]
            if not route.dense_training and not _any_in_any_process(_times(reach, decisions.unsqueeze(-1))):
                return _times(reach, previous)  # no token runs the stage: its gates learn from the budget alone
            return _times(reach, stage(previous, *size, decisions))
        return _run_stage_sparse(stage, previous, decisions > 0, size)

    def _column_part(self, route: _Route, scale: int, column: int):
        """`g * patch_embedding(F)` from node (scale - 1, column), or None if no image takes that edge."""
        above = route.features.get((scale - 1, column)) if scale > 0 else None
        if above is None:
            return None
        taken = route.ledger.taken[(scale - 1, column)]
        patch_embedding, size = self.patch_embeddings[scale - 1][column], route.ledger.sizes[scale - 1]

        def embed(features):
            return patch_embedding(_to_map(features, size))[0]

        if route.mode in ("fixed", "budget"):
            return embed(above) if taken else None
        if route.mode == "sample":
            if not route.dense_training and not _any_in_any_process(taken):
                return None
            return _times(taken, embed(above))
        run = route.taken_on_host[(scale - 1, column)]
        if not any(run):
            return None
        index = None if all(run) else torch.tensor([i for i, r in enumerate(run) if r], device=above.device)
        return _on_images(embed, above, index, len(run))

    def _leave_node(self, route: _Route, scale: int, column: int) -> None:
        """Decides the row and column gates of node (scale, column) and bills what they open (and the gates)."""
        if route.mode == "fixed":
            row, down = _fixed_decisions(self.config, self.config.routing_mode, scale, column)
        elif route.mode == "budget":
            row, down = self._top_token_decisions(route, scale, column)
        else:
            row, down = self._gate_decisions(route, scale, column)
            route.ledger.bill_gates(scale, column)
            if route.budget_ledger is not None:
                self._bill_inference_decisions(route, scale, column)
        if row is not None:
            route.row_decisions[(scale, column)] = row
            route.ledger.bill_stage(scale, column, row)
        if down is not None:
            taken = route.ledger.bill_edge(scale, column, down)
            if route.mode == "sparse":
                route.record_edge(scale, column, taken)

    def _top_token_decisions(self, route: _Route, scale: int, column: int) -> tuple:
        """Exact-budget mode at node (scale, column) of PVTv2's route: the row decision is 1 (every token) or the
        sorted indices `(batch, count)` of the `count` tokens the row gate scores highest (billed as that fraction);
        the downsampling edge is PVTv2's."""
        row, down = _fixed_decisions(self.config, "static", scale, column)
        height, width = route.ledger.sizes[scale]
        count = route.tokens_per_scale[scale]
        if row and count < height * width:
            route.ledger.bill_gates(scale, column, column_gate=False)
            scores = self.row_gates[scale][column].open_probability(route.features[(scale, column)])
            indices = scores.topk(count, dim=1, sorted=False).indices.sort(dim=1).values
            route.row_decisions[(scale, column)] = indices
            route.ledger.bill_stage(scale, column, count / (height * width))
            row = None  # billed and recorded
        return row, down

    def _gate_decisions(self, route: _Route, scale: int, column: int) -> tuple:
        """Row `(batch, tokens)` and column `(batch,)` decisions of node (scale, column), `None` where it has no such
        gate; at inference computed for the images that reach the node only (zeros for the others)."""
        features = route.features[(scale, column)]
        index, batch_size = route.reached_index.get((scale, column)), features.shape[0]
        row = down = None
        # CODEPATH: every checkpoint; the last node column has no row gate.
        if column < self.config.num_routing_columns:
            gate = self.row_gates[scale][column]
            row = _on_images(lambda x: gate(x, route.row_threshold), features, index, batch_size)
        # CODEPATH: every checkpoint; the coarsest scale has no column gate.
        if scale + 1 < self.config.num_encoder_blocks:
            gate = self.column_gates[scale][column]
            down = _on_images(lambda x: gate(x.mean(1)), features, index, batch_size)
        return row, down

    def _bill_inference_decisions(self, route: _Route, scale: int, column: int) -> None:
        """Training: prices, in the budget ledger, the decisions inference would take at this node with the current
        gate weights (straight-through gradients of the gate probabilities)."""
        features, ledger = route.features[(scale, column)], route.budget_ledger
        ledger.bill_gates(scale, column)
        # CODEPATH: every checkpoint; the last node column has no stage after it.
        if column < self.config.num_routing_columns:
            ledger.bill_stage(
                scale, column, self.row_gates[scale][column].straight_through(features, route.row_threshold)
            )
        # CODEPATH: every checkpoint; the coarsest scale has no downsampling edge.
        if scale + 1 < self.config.num_encoder_blocks:
            ledger.bill_edge(scale, column, self.column_gates[scale][column].straight_through(features.mean(1)))

    def _outputs(self, route: _Route, stem_map, image_size) -> DiTModelOutput:
        config, ledger = self.config, route.ledger
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        budget_loss = None
        # CODEPATH: only the dynamic route (default) has a budget.
        if config.routing_mode == "dynamic":
            static_cost = dit_route_macs(config, *image_size, "static")
            budget_loss = ((route.budget_ledger or ledger).macs.mean() / static_cost - config.budget_target) ** 2
        last_hidden_state = route.features[(num_scales - 1, num_columns)]
        hidden_states = None
        if stem_map is not None:
            last_column = [
                _to_map(route.features[(scale, num_columns)], ledger.sizes[scale]) for scale in range(num_scales)
            ]
            hidden_states = (stem_map, *last_column)
        return DiTModelOutput(
            last_hidden_state=_to_map(last_hidden_state, ledger.sizes[-1]).contiguous(),
            pooler_output=last_hidden_state.mean(dim=1),
            hidden_states=hidden_states,
            budget_loss=budget_loss,
            macs=ledger.macs,
            downsampled=ledger.downsampled,
            stage_keep_ratio=ledger.stage_keep_ratio,
            token_keep_ratio=mean_token_keep_ratio(ledger.stage_keep_ratio),
        )


def _run_stage_sparse(stage: DiTStage, features: torch.Tensor, selected: torch.Tensor, size: tuple[int, int]):
    """Inference: `stage` on the tokens `selected` `(batch, tokens)` of the images that select any (dense when all of
    an image's tokens are selected); the others pass by identity. One host sync."""
    batch_size, num_tokens = selected.shape
    counts = selected.sum(1).tolist()  # trf-ignore: TRF056 the number of computed tokens is data-dependent
    run = [image for image, count in enumerate(counts) if count > 0]
    if not run:
        return features
    index = None if len(run) == batch_size else torch.tensor(run, device=features.device)
    inputs, chosen = (features, selected) if index is None else (features[index], selected[index])
    if all(counts[image] == num_tokens for image in run):
        outputs = stage.forward_selected(inputs, *size)
    else:
        outputs = stage.forward_selected(inputs, *size, chosen, [counts[image] for image in run])
    return outputs if index is None else features.index_copy(0, index, outputs)


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
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTImageClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Labels for computing the image classification/regression loss. Indices should be in `[0, ...,
            config.num_labels - 1]`. In dynamic routing `budget_loss_weight * budget_loss` is added to the loss.
        gate_threshold (`float`, *optional*):
            Overrides `config.gate_threshold` for this call: at inference a row gate computes a token when its
            probability of computing it is `>= gate_threshold`. Higher values compute fewer tokens.
        compute_budget (`float`, *optional*):
            Overrides `config.compute_budget` for this call (inference): every image computes this fraction of the
            static route's cost (classifier excluded), PVTv2's route with the tokens the row gates score highest.

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
        outputs: DiTModelOutput = self.dit(
            pixel_values, gate_threshold=gate_threshold, compute_budget=compute_budget, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)
        macs = outputs.macs + self._head_macs()

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

    def static_macs(self, image_size: int | tuple[int, int] | None = None) -> int:
        """MACs per image of the static (PVTv2) route, classifier included."""
        return self.dit.static_macs(image_size) + self._head_macs()

    def full_grid_macs(self, image_size: int | tuple[int, int] | None = None) -> int:
        """MACs per image of the full grid (every stage, edge and token), classifier included."""
        return self.dit.full_grid_macs(image_size) + self._head_macs()

    def _head_macs(self) -> int:
        return self.classifier.weight.numel() if isinstance(self.classifier, nn.Linear) else 0


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
    def forward(
        self,
        pixel_values: torch.Tensor,
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTBackboneOutput:
        r"""
        gate_threshold (`float`, *optional*):
            Overrides `config.gate_threshold` for this call (row gates at inference; higher computes fewer tokens).
        compute_budget (`float`, *optional*):
            Overrides `config.compute_budget` for this call (inference: the exact-budget mode, see `DiTConfig`).

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
        outputs: DiTModelOutput = DiTModel.forward(
            self, pixel_values, gate_threshold, compute_budget, return_dict=True, **kwargs
        )
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
    "compute_budget_tokens",
    "dit_route_macs",
    "mean_token_keep_ratio",
]
