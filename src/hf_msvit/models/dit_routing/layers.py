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
"""DiT's layers: PVTv2's modules (`transformers.models.pvt_v2.modeling_pvt_v2`), subclassed where DiT adds something,
so the parameter names the PVTv2 converter maps are PVTv2's own, and the routing gate.

Every module that computes something has a static `macs(...)` beside it: the one place of its cost formula, summed by
`routing.RouteLedger` for the route an image took.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.pvt_v2.modeling_pvt_v2 import (
    PvtV2ConvFeedForwardNetwork,
    PvtV2DropPath,
    PvtV2OverlapPatchEmbeddings,
    PvtV2SelfAttention,
)
from transformers.models.vit.modeling_vit import eager_attention_forward

from .configuration_dit_routing import DiTConfig
from .sparse_inference import (
    TokenSelection,
    block_forward_selected,
    stage_forward_selection,
    to_map,
    to_tokens,
)


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


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
        # A dtype cast of the model (`.to(torch.bfloat16)`, `.half()`) must not round the EMA: in bfloat16 a
        # momentum of 0.999 is 1.0 and the average would never move. Device moves apply as usual.
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
            reduced = self.spatial_reduction(to_map(hidden_states, (height, width)))
            hidden_states = self.layer_norm(to_tokens(reduced))
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
        return to_tokens(self.dwconv.dwconv(to_map(hidden_states, (height, width))))

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

    def forward_selected(self, rows: torch.Tensor, size: tuple[int, int], selection: TokenSelection) -> None:
        """Inference, in place on `rows` (the stage's map flattened to `(batch * tokens, hidden)`): computes only the
        tokens of `selection` (`block_forward_selected`)."""
        block_forward_selected(self, rows, size, selection)

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
        with `stage_input="masked_map"`). The reference semantics, and the training path: gradients reach the gates.
        At inference without a mask it runs `forward_selected` on every token (same values, cache-blocked MLP)."""
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
        batch_size, num_tokens, _ = hidden_states.shape
        if selected is None:
            selection = TokenSelection.every_token(batch_size, num_tokens)
        else:
            counts = selected.sum(1).tolist() if counts is None else counts
            if max(counts) == 0:
                return hidden_states.clone()
            selection = TokenSelection.from_mask(selected, counts)
        return stage_forward_selection(self, hidden_states, height, width, selection, selected)

    def forward_top_tokens(self, hidden_states: torch.Tensor, height: int, width: int, indices: torch.Tensor):
        """Inference: `forward_selected` for the tokens `indices` `(batch, count)`, the same count in every image (no
        padding, no host sync: the exact-budget mode)."""
        selected = None
        if self.masked_input:
            selected = torch.zeros(hidden_states.shape[:2], dtype=torch.bool, device=indices.device)
            selected.scatter_(1, indices, True)
        selection = TokenSelection.from_indices(indices, hidden_states.shape[1])
        return stage_forward_selection(self, hidden_states, height, width, selection, selected)

    @staticmethod
    def macs(config: DiTConfig, scale: int, height: int, width: int, num_selected, active):
        """Multiply-accumulates of the stage for one image: `active` (0/1: the stage ran for the image) times the
        per-image part plus `num_selected` (computed tokens) times the per-token part, summed over its blocks."""
        per_image, per_token = DiTBlockLayer.macs(config, scale, height, width)
        return config.depths[scale] * (active * per_image + num_selected * per_token)
