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
"""PyTorch MSViT model: a ViT with a dynamic mixed-scale tokenizer (arXiv 2307.02321).

The encoder is transformers' ViT (its layers and pooler are imported, so ViT checkpoints load by key); what MSViT adds
is the tokenizer: a gate scores every coarse region, and each region enters the encoder either as one coarse token or
as its fine tokens. Only the CLS token and the selected tokens are embedded and encoded at inference.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ConversionOps, PreTrainedModel, WeightConverter
from transformers import initialization as init
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.masking_utils import create_bidirectional_mask, packed_sequence_mask_function
from transformers.modeling_outputs import (
    BackboneOutput,
    BaseModelOutputWithPooling,
    ImageClassifierOutput,
    SemanticSegmenterOutput,
)
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer, ViTPooler
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .batch_shaping import GeneralizedBatchShaping, gather_across_processes
from .configuration_msvit import MSViTConfig, vit_layer_macs, vit_macs
from .convert_vit_to_msvit import convert_vit_to_msvit


# The config fields whose values fork this file (`transformers-mlinter` TRF041); `MSViTConfig`'s docstring says which
# checkpoints take each value.
# trf-ignore: TRF041 config.gate_input, config.gate_training_mode
# trf-ignore: TRF041 config.gbas_input, config.gbas_gather_across_processes, config.gate_sampling_level


# The tokenization arguments of every MSViT forward (`auto_docstring` reads them from here).
MSVIT_TOKENIZATION_ARGS = r"""
    fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Overrides the gate: True tokenizes a region fine, False coarse. All True gives the token set of the ViT the
        model was upcycled from (a head on it computes that ViT's output); all False the coarse-only tokenization. The
        gate does not run.
    gate_threshold (`float`, *optional*):
        Overrides `config.gate_threshold` for this call. Higher values select fewer fine regions.
    fine_region_budget (`int` or `float`, *optional*):
        Overrides `config.fine_region_budget` for this call (inference): tokenize exactly this many regions fine per
        image (an `int` count, or a `float` fraction of the regions), those with the highest gate probabilities. Every
        image then has the same number of tokens.
"""


@auto_docstring
@dataclass
class MSViTModelOutput(BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, max_num_tokens, hidden_size)`):
        Final hidden states. Each image's tokens are `[CLS, kept coarse tokens, kept fine tokens]` (each group in
        raster order), padded with zeros up to the longest image of the batch; see `attention_mask`. In training with
        `gate_training_mode="masked_attention"` every image holds `[CLS, all coarse tokens, all fine tokens]` and
        `attention_mask` marks the kept ones (a dropped token holds the other tokenization of its region).
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The CLS token after the pooler (if the model has one).
    attention_mask (`torch.LongTensor` of shape `(batch_size, max_num_tokens)`):
        1 for the (kept) tokens of each image, 0 for padding (or dropped tokens).
    gate_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Generalized batch-shaping loss of the gate values of this batch (only when the gate ran).
    gate_probs (`torch.FloatTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Probability, per coarse region, that the gate tokenizes it fine (only when the gate ran).
    fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`):
        The decision taken: True where the region entered the encoder as fine tokens.
    num_tokens (`torch.LongTensor` of shape `(batch_size,)`):
        Tokens of the chosen tokenization per image: CLS + coarse + fine.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the chosen tokenization per image (analytic: gate, patch embedding, encoder, pooler):
        what inference with these decisions computes.
    gate_values (`torch.FloatTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Training only: the decisions as 0/1 floats that carry the gate's straight-through gradient. Dense heads pass
        them to `fine_grid_features`, so the gate learns what each region's own tokens do for the pixels it covers.
    """

    attention_mask: torch.LongTensor | None = None
    gate_loss: torch.FloatTensor | None = None
    gate_probs: torch.FloatTensor | None = None
    fine_region_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    macs: torch.FloatTensor | None = None
    gate_values: torch.FloatTensor | None = None


# The gate outputs of every MSViT head (classifier, segmenter, backbone): one definition.
@auto_docstring
@dataclass
class MSViTGateOutput(ModelOutput):
    r"""
    gate_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Generalized batch-shaping loss of the gate values of this batch (only when the gate ran); heads with a loss
        add `config.gbas_loss_weight * gate_loss` to it.
    gate_probs (`torch.FloatTensor` of shape `(batch_size, coarse_height, coarse_width)`, *optional*):
        Probability, per coarse region, that the gate tokenizes it fine (only when the gate ran).
    fine_region_mask (`torch.BoolTensor` of shape `(batch_size, coarse_height, coarse_width)`):
        The decision taken: True where the region entered the encoder as fine tokens.
    num_tokens (`torch.LongTensor` of shape `(batch_size,)`):
        Tokens of the chosen tokenization per image: CLS + coarse + fine.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the chosen tokenization per image (analytic: gate, patch embedding, encoder, and the
        head: the classifier, or the linear decoder on the encoder's tokens; the bilinear upsampling of segmentation
        logits is not counted).
    attention_mask (`torch.LongTensor` of shape `(batch_size, max_num_tokens)`):
        1 for the (kept) tokens of each image, 0 for padding (aligned with `hidden_states`).
    """

    gate_loss: torch.FloatTensor | None = None
    gate_probs: torch.FloatTensor | None = None
    fine_region_mask: torch.BoolTensor | None = None
    num_tokens: torch.LongTensor | None = None
    macs: torch.FloatTensor | None = None
    attention_mask: torch.LongTensor | None = None


@auto_docstring
@dataclass
class MSViTImageClassifierOutput(MSViTGateOutput, ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
        Classification loss plus `config.gbas_loss_weight * gate_loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels)`):
        Classification scores (before SoftMax).
    """


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, C, H, W)` -> `(batch, num_patches, C * patch_size**2)`, patches in raster order, each flattened in the
    `(C, p, p)` order of a `Conv2d` kernel."""
    batch_size, channels, height, width = pixel_values.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = pixel_values.reshape(batch_size, channels, grid_h, patch_size, grid_w, patch_size)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, grid_h * grid_w, channels * patch_size**2)


def expand_region_mask(region_mask: torch.Tensor, ratio: int) -> torch.Tensor:
    """`(batch, Hc, Wc)` -> `(batch, Hc * ratio * Wc * ratio)`: each region's value on its fine patches, in raster
    order."""
    return region_mask.repeat_interleave(ratio, dim=1).repeat_interleave(ratio, dim=2).flatten(1)


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
    """Loads the gate's `logit_bias` as a 1-element tensor: checkpoints written before FSDP2 support (which cannot
    shard 0-dim parameters) stored it as a scalar. Its own reverse: new checkpoints keep the 1-element shape."""

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


class GateDecisions(NamedTuple):
    """Which regions are tokenized fine, and what the gate said.

    `fine` `(batch, regions)` bool is the decision. When the gate ran: `probs` are `sigmoid(logits)`, `values` the
    decisions as 0/1 floats that carry the straight-through gradient in training (None at inference), and
    `gbas_input` what the batch-shaping loss shapes (`config.gbas_input`).
    """

    fine: torch.Tensor
    probs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    gbas_input: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def sample_gate(
    logits: torch.Tensor,
    temperature: float,
    threshold: float,
    noise_scale: float = 1.0,
    target_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training decisions from gate logits: `(soft, hard)` with `soft` a Gumbel-sigmoid sample and `hard =
    1[soft >= threshold]` carrying the gradient of `soft` (straight-through). At threshold 0.5 and `noise_scale` 1 a
    region is fine with probability `sigmoid(logits)`, whatever the temperature; at `noise_scale` 0 the decision is
    inference's, `sigmoid(logits) >= threshold`. With `target_ratio` (and noise) the cut is instead the batch's
    `target_ratio` fraction of regions with the highest noisy logits (`gate_sampling_level="target"`), and `soft` is
    centred on that cut, so the straight-through gradient is largest where the decisions switch (less its batch mean:
    the decisions only rank)."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1.0 - 1e-6)
    noisy = logits + (torch.log(uniform) - torch.log1p(-uniform)) * noise_scale
    if target_ratio is not None and noise_scale > 0:
        # Ranked decisions ignore a shift of every logit (the cut moves with them): in the backward the cut follows the
        # batch's mean, so the task's gradient can reorder the regions but not move the level (the level term does).
        mean = noisy.mean()
        noisy = noisy - (mean + (batch_cut(noisy.detach(), target_ratio) - mean).detach())
        threshold = 0.5
    soft = torch.sigmoid(noisy / temperature)
    hard = (soft >= threshold).to(soft.dtype)
    return soft, hard + soft - soft.detach()


def batch_cut(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """The score halfway between the `round(ratio * n)`-th highest of `scores` and the next: exactly that many lie
    above it (one unit beyond the extremes when all or none do)."""
    ranked = scores.flatten().sort(descending=True).values
    count = budget_count(float(ratio), ranked.numel())
    if count == 0:
        return ranked[0] + 1
    if count == ranked.numel():
        return ranked[-1] - 1
    return (ranked[count - 1] + ranked[count]) / 2


def budget_count(budget: int | float, num_regions: int) -> int:
    """Regions a `fine_region_budget` selects per image: an `int` count as is, a `float` fraction rounded."""
    return budget if isinstance(budget, int) else round(budget * num_regions)


def top_k_regions(probs: torch.Tensor, budget: int | float) -> torch.Tensor:
    """`(batch, regions)` bool: the `budget` regions with the highest gate probabilities of each image, `budget` a
    count (int) or a fraction of the regions (float in [0, 1], rounded)."""
    index = probs.topk(budget_count(budget, probs.shape[1]), dim=1).indices
    return torch.zeros_like(probs, dtype=torch.bool).scatter_(1, index, True)


@dataclass
class MSViTTokens:
    """What the embeddings hand to the encoder: `tokens` `(batch, max_tokens, hidden)` (CLS not included).

    Selected layout (inference, and straight-through training): each image's kept coarse tokens then its kept fine
    tokens (each group in raster order), zero-padded after `lengths[i]`; `uniform_length` is set when every image has
    the same count (a fine-region budget), which the encoder then knows without reading `lengths`. All layout
    (masked-attention training): every coarse then every fine token, and `key_weights` `(batch, 1 + coarse + fine)`
    the gate-weighted attention keys (1 = kept).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    cls: torch.Tensor
    decisions: GateDecisions
    key_weights: torch.Tensor | None = None
    uniform_length: int | None = None


class MSViTGate(nn.Module):
    """The region gate: an MLP scoring each coarse region; `sigmoid(score)` is the probability of tokenizing the region
    fine."""

    def __init__(self, config: MSViTConfig):
        super().__init__()
        # "pixels" (default, every released config) scores raw regions; "embeddings" the coarse tokens.
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
        # Level calibration: the running (1 - target) quantile of the logits, subtracted so that the target fraction of
        # regions scores above 0 (p >= 0.5). Updated in training, used at inference (as BatchNorm's running stats).
        self.logit_offset = nn.Buffer(torch.zeros(1))
        self.calibration_steps = nn.Buffer(torch.zeros(1))
        self.calibration = config.gate_level_calibration
        self.calibration_momentum = config.gate_calibration_momentum
        self.target_ratio = config.gbas_target_ratio

    def forward(self, region_features: torch.Tensor) -> torch.Tensor:
        """`(batch, num_regions, in_features)` -> logits `(batch, num_regions)`."""
        hidden = region_features
        for index, layer in enumerate(self.layers):
            if index > 0:
                hidden = self.activation(hidden)
            hidden = layer(hidden)
        return hidden.squeeze(-1) + self.logit_bias

    def calibrate(self, logits: torch.Tensor, batch_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Level calibration, as BatchNorm's running statistics: training leaves the logits as they are and folds the
        batch's `(1 - target)` quantile (of `batch_logits`, e.g. gathered from every process) into a running offset;
        inference subtracts it, so a fraction `gbas_target_ratio` of regions from the training distribution scores
        `p >= 0.5`. Without calibration the logits are returned as they are."""
        if not self.calibration:
            return logits
        if not self.training:
            return logits - self.logit_offset.to(logits.dtype)
        values = (logits if batch_logits is None else batch_logits).detach().float().flatten()
        with torch.no_grad():
            quantile = torch.quantile(values, 1.0 - self.target_ratio).reshape(1)
            weight = torch.where(self.calibration_steps > 0, 1.0 - self.calibration_momentum, 1.0)
            self.logit_offset.lerp_(quantile, weight)
            self.calibration_steps.add_(1)
        return logits

    def macs(self, num_regions):
        """MACs of scoring `num_regions` regions."""
        return num_regions * sum(layer.weight.numel() for layer in self.layers)


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
        self.ratio = config.coarse_patch_size // config.patch_size

    def token_position_embeddings(self) -> torch.Tensor:
        """`(coarse + fine, hidden)`: the position embeddings of every coarse token, then of every fine token."""
        fine_h, fine_w = self.config.fine_grid
        grid = self.position_embeddings[:, 1:].reshape(1, fine_h, fine_w, -1).permute(0, 3, 1, 2)
        coarse = F.avg_pool2d(grid, kernel_size=self.ratio).flatten(2).transpose(1, 2)[0]
        return torch.cat([coarse, self.position_embeddings[0, 1:]], dim=0)

    def gate_logits(self, pixel_values: torch.Tensor, coarse_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, num_regions)` logits of the gate, before any calibration (`coarse_embeddings`: the coarse tokens,
        computed here if the gate reads them and they are not given)."""
        config = self.config
        if config.gate_input == "pixels":
            return self.gate(patchify(pixel_values, config.coarse_patch_size))
        if coarse_embeddings is None:
            coarse_pixels = F.avg_pool2d(pixel_values, kernel_size=self.ratio)
            coarse_embeddings = self.patch_embeddings(patchify(coarse_pixels, config.patch_size))
        return self.gate(coarse_embeddings)

    def decide(self, pixel_values, coarse_embeddings, threshold, budget) -> GateDecisions:
        """Runs the gate on every coarse region and decides which are tokenized fine."""
        config = self.config
        logits = self.gate_logits(pixel_values, coarse_embeddings)
        batch_logits = None
        # multi-process training computes the level on the global batch (off by default)
        if self.training and config.gbas_gather_across_processes:
            batch_logits = gather_across_processes(logits.detach())
        logits = self.gate.calibrate(logits, batch_logits)
        probs = torch.sigmoid(logits)
        if self.training:
            level = config.gbas_target_ratio if config.gate_sampling_level == "target" else None
            soft, values = sample_gate(logits, config.gumbel_temperature, threshold, config.gate_noise_scale, level)
            # GBaS shapes the gate probabilities (default) or, as the paper's wording reads, the samples.
            gbas_input = probs if config.gbas_input == "probs" else soft
            fine = values.detach() > 0.5
            return GateDecisions(fine=fine, probs=probs, values=values, gbas_input=gbas_input, logits=logits)
        fine = probs >= threshold if budget is None else top_k_regions(probs, budget)
        return GateDecisions(fine=fine, probs=probs, gbas_input=probs)

    def forward(
        self,
        pixel_values: torch.Tensor,
        fine_region_mask: torch.Tensor | None = None,
        gate_threshold: float | None = None,
        fine_region_budget: int | float | None = None,
    ) -> MSViTTokens:
        config = self.config
        batch_size = pixel_values.shape[0]
        coarse_pixels = F.avg_pool2d(pixel_values, kernel_size=self.ratio)
        coarse_patches = patchify(coarse_pixels, config.patch_size)
        coarse_embeddings = None
        if fine_region_mask is not None:
            fine = fine_region_mask.reshape(batch_size, -1).to(device=pixel_values.device, dtype=torch.bool)
            decisions = GateDecisions(fine=fine)
        else:
            # "embeddings" gates embed the coarse token of every region first (reused below)
            if config.gate_input == "embeddings":
                coarse_embeddings = self.patch_embeddings(coarse_patches)
            threshold = config.gate_threshold if gate_threshold is None else gate_threshold
            decisions = self.decide(pixel_values, coarse_embeddings, threshold, fine_region_budget)
        cls = self.cls_token[0, 0] + self.position_embeddings[0, 0]
        # masked-attention training (default) keeps both tokenizations; otherwise only the selected tokens
        if decisions.values is not None and config.gate_training_mode == "masked_attention":
            return self._embed_all(pixel_values, coarse_patches, coarse_embeddings, decisions, cls)
        uniform_length = None
        if decisions.probs is not None and not self.training and fine_region_budget is not None:
            count = budget_count(fine_region_budget, decisions.fine.shape[1])
            uniform_length = decisions.fine.shape[1] + (self.ratio**2 - 1) * count
        return self._embed_selected(pixel_values, coarse_patches, decisions, cls, uniform_length)

    def _embed_selected(self, pixel_values, coarse_patches, decisions, cls, uniform_length=None) -> MSViTTokens:
        """Embeds only the patches that enter the encoder, each image's at the front of its row: the candidates (every
        coarse region, then every fine patch) are ordered kept-first, kept tokens in raster order; the patches are
        gathered and embedded in one matmul, padding rows zeroed."""
        batch_size, _ = decisions.fine.shape
        coarse_h, coarse_w = self.config.coarse_grid
        keep_fine = expand_region_mask(decisions.fine.reshape(batch_size, coarse_h, coarse_w), self.ratio)
        keep = torch.cat([~decisions.fine, keep_fine], dim=1)
        lengths = keep.sum(dim=1)
        # the token count is data-dependent by design (known in advance with a budget)
        max_length = uniform_length if uniform_length is not None else int(lengths.max())
        # Kept-first, raster order within each group: the smallest `max_length` of unique keys (no stable sort, which
        # ONNX lacks: `aten.sort.stable` has no ONNX function).
        position = torch.arange(keep.shape[1], device=keep.device)
        sort_key = (~keep).long() * keep.shape[1] + position
        order = sort_key.topk(max_length, dim=1, largest=False).indices
        candidates = torch.cat([coarse_patches, patchify(pixel_values, self.config.patch_size)], dim=1)
        patches = candidates.gather(1, order[..., None].expand(-1, -1, candidates.shape[-1]))
        tokens = self.patch_embeddings(patches) + self.token_position_embeddings()[order]
        if decisions.values is not None:
            # Straight-through: the values are exactly 1 for kept tokens but carry the gate's gradient.
            tokens = tokens * self._key_weights(decisions.values)[:, 1:].gather(1, order)[..., None].to(tokens.dtype)
        if uniform_length is None:
            valid = torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]
            tokens = tokens * valid[..., None].to(tokens.dtype)
        return MSViTTokens(
            tokens=tokens,
            lengths=lengths,
            cls=cls,
            decisions=decisions,
            uniform_length=uniform_length,
        )

    def _embed_all(self, pixel_values, coarse_patches, coarse_embeddings, decisions, cls) -> MSViTTokens:
        """Both tokenizations of every region, with the gate decisions as attention-key weights."""
        if coarse_embeddings is None:
            coarse_embeddings = self.patch_embeddings(coarse_patches)
        fine_embeddings = self.patch_embeddings(patchify(pixel_values, self.config.patch_size))
        tokens = torch.cat([coarse_embeddings, fine_embeddings], dim=1) + self.token_position_embeddings()
        fine = decisions.fine
        lengths = (~fine).sum(1) + self.ratio**2 * fine.sum(1)
        return MSViTTokens(
            tokens=tokens,
            lengths=lengths,
            cls=cls,
            decisions=decisions,
            key_weights=self._key_weights(decisions.values),
        )

    def _key_weights(self, values: torch.Tensor) -> torch.Tensor:
        """`(batch, 1 + coarse + fine)`: 1 for CLS, `1 - value` for each coarse token, the region's value for each
        fine token (0/1 forward, the gate's straight-through gradient backward)."""
        coarse_h, coarse_w = self.config.coarse_grid
        fine_values = expand_region_mask(values.reshape(-1, coarse_h, coarse_w), self.ratio)
        return torch.cat([torch.ones_like(values[:, :1]), 1.0 - values, fine_values], dim=1)


def gate_weighted_attention(module, query, key, value, key_weights, scaling, dropout=0.0):
    """Attention in which each key counts with its weight `w` (DynamicViT's masked softmax): `exp(s) * w / sum(exp(s) *
    w)`, every query also attending to itself. With 0/1 weights a kept token attends exactly to the kept tokens (the
    inference result), while the gradient of a dropped key's weight is the attention it would have received: the gate
    sees what the other tokenization of a region would have contributed."""
    scores = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    eye = torch.eye(key.shape[2], device=key.device, dtype=scores.dtype)
    policy = key_weights.to(scores.dtype)[:, None, None, :]
    policy = policy + (1.0 - policy) * eye
    # Shift by the largest score among the keys a query may attend to (exact softmax over them), and cap the others
    # there: a dropped key's weight is 0 in the forward, and its gradient stays finite.
    allowed_max = scores.masked_fill(policy.detach() <= 0.5, float("-inf")).amax(dim=-1, keepdim=True).detach()
    weights = (scores - allowed_max).clamp(max=0.0).exp() * policy
    weights = (weights / weights.sum(dim=-1, keepdim=True)).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MSViTAttention(ViTAttention):
    """transformers' `ViTAttention`, plus the gate-weighted attention of masked-attention training (a `key_weights`
    argument); without it, the ViT attention dispatched through the configured backend."""

    def forward(self, hidden_states, attention_mask=None, key_weights=None, **kwargs: Unpack[TransformersKwargs]):
        if key_weights is None:
            return super().forward(hidden_states, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        dropout = self.attention_dropout if self.training else 0.0
        attn_output, attn_weights = gate_weighted_attention(
            self, query, key, value, key_weights, self.scaling, dropout
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1)), attn_weights


class MSViTLayer(ViTLayer):
    """transformers' `ViTLayer` (same parameter names, so ViT weights load as they are) with `MSViTAttention`."""

    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        self.attention = MSViTAttention(config)

    def forward(self, hidden_states, attention_mask=None, key_weights=None, **kwargs: Unpack[TransformersKwargs]):
        # ViTLayer.forward plus a positional `key_weights`: reentrant activation checkpointing only passes gradients
        # to positional tensors, and the key weights carry the gate's.
        residual = hidden_states
        hidden_states = self.layernorm_before(hidden_states)
        hidden_states, _ = self.attention(hidden_states, attention_mask, key_weights=key_weights, **kwargs)
        hidden_states = self.dropout(hidden_states) + residual
        return self.dropout(self.mlp(self.layernorm_after(hidden_states))) + hidden_states

    @staticmethod
    def macs(config, num_tokens):
        """MACs of one layer on a sequence of `num_tokens` tokens (`vit_layer_macs`)."""
        return vit_layer_macs(config, num_tokens)


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
        target_logit = math.log(self.config.gbas_target_ratio / (1.0 - self.config.gbas_target_ratio))
        if isinstance(module, MSViTEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=self.config.initializer_range)
            init.trunc_normal_(module.cls_token, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, MSViTGate):
            # Every region starts at p(fine) = target; GBaS and the task then make the decisions input-dependent.
            init.constant_(module.logit_bias, target_logit)
            init.zeros_(module.logit_offset)
            init.zeros_(module.calibration_steps)
        elif isinstance(module, GeneralizedBatchShaping):
            init.constant_(module.prior_mean_logits, target_logit)
            if module.prior_temperature_logits is not None:
                temperature = self.config.gbas_prior_temperature
                init.constant_(module.prior_temperature_logits, math.log(temperature / (1.0 - temperature)))

    def _run_msvit(self, pixel_values, fine_region_mask, gate_threshold, fine_region_budget, **kwargs):
        """A head's call of its base model `self.msvit`, as a `MSViTModelOutput` (with `config.return_dict=False` the
        base model would return a tuple to the head too)."""
        return self.msvit(
            pixel_values,
            fine_region_mask=fine_region_mask,
            gate_threshold=gate_threshold,
            fine_region_budget=fine_region_budget,
            return_dict=True,
            **kwargs,
        )

    def routing_loss(self, outputs) -> torch.Tensor | None:
        """What a head adds to its task loss: `config.gbas_loss_weight * gate_loss` (None when the gate did not run).
        A trainer that computes the task loss itself (label smoothing) adds this, as the heads do with `labels`."""
        gate_loss = outputs.get("gate_loss")
        return None if gate_loss is None else self.config.gbas_loss_weight * gate_loss

    def _fold_gate_loss(self, task_loss: torch.Tensor, outputs: "MSViTModelOutput") -> torch.Tensor:
        """A head's loss: its task loss plus `routing_loss` (when the gate ran)."""
        routing = self.routing_loss(outputs)
        return task_loss if routing is None else task_loss + routing

    @staticmethod
    def _gate_outputs(outputs: "MSViTModelOutput", macs: torch.Tensor) -> dict:
        """The fields a head passes through from the base model's `outputs` (`MSViTGateOutput`, hidden states,
        attentions), with `macs` the head's total."""
        return {
            "hidden_states": outputs.hidden_states,
            "attentions": outputs.attentions,
            "gate_loss": outputs.gate_loss,
            "gate_probs": outputs.gate_probs,
            "fine_region_mask": outputs.fine_region_mask,
            "num_tokens": outputs.num_tokens,
            "macs": macs,
            "attention_mask": outputs.attention_mask,
        }

    def static_macs(self) -> float:
        """MACs per image of the static ViT this model comes from (ViT/`patch_size`: every region fine, no gate), the
        model's head included."""
        return self._tokenization_macs(self.config.fine_grid)

    def coarse_only_macs(self) -> float:
        """MACs per image of the coarse-only tokenization (every region one coarse token, no gate), the head
        included."""
        return self._tokenization_macs(self.config.coarse_grid)

    def _tokenization_macs(self, grid: tuple[int, int]) -> float:
        """A head's: its base model's MACs on the `grid` tokenization plus the head's on those tokens."""
        return self.msvit._tokenization_macs(grid) + self._head_macs(grid[0] * grid[1])

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
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        coarse_h, coarse_w = config.coarse_grid
        self.batch_shaping = GeneralizedBatchShaping(
            coarse_h * coarse_w,
            config.gbas_target_ratio,
            config.gbas_hyperprior_std,
            config.gbas_temperature_l1_weight,
            prior_temperature=config.gbas_prior_temperature,
            learn_temperature=config.gbas_learn_prior_temperature,
        )
        self.post_init()

    def get_input_embeddings(self) -> MSViTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    def encode(self, tokens: MSViTTokens, mode: str, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the encoder on every image's `[CLS, tokens]` (selected layout) and returns `(last_hidden_state (batch,
        max_len, hidden), attention_mask (batch, max_len))`, zero-padded. `mode` is a `token_batching` value: groups of
        images padded to their longest (`"bucket"`, `"pad"`, `"per_image"`) or one packed sequence (`"pack"`)."""
        batch_size, max_tokens, _ = tokens.tokens.shape
        sequence = torch.cat([tokens.cls.expand(batch_size, 1, -1), tokens.tokens], dim=1)
        if tokens.uniform_length is not None:  # a fine-region budget: one batch, no padding, no host sync
            mask = sequence.new_ones(batch_size, max_tokens + 1, dtype=torch.long)
            return self._run_layers(sequence, None, None, **kwargs), mask
        attention_mask = torch.arange(max_tokens + 1, device=sequence.device)[None, :] <= tokens.lengths[:, None]
        # "pack" (measured slower on CPU, kept selectable) concatenates every image into one sequence
        if mode == "pack":
            image_ids = torch.arange(batch_size, device=sequence.device)[:, None].expand_as(attention_mask)
            packed = self._run_layers(sequence[attention_mask][None], None, image_ids[attention_mask][None], **kwargs)
            return sequence.new_zeros(sequence.shape).index_put((attention_mask,), packed[0]), attention_mask.long()
        lengths = tokens.lengths.tolist()  # groups are chosen on the host
        groups = partition_by_length(lengths, mode, self.config.bucket_overhead_tokens)
        output = sequence.new_zeros(sequence.shape) if len(groups) > 1 else None
        for group in groups:
            group_len = 1 + max(lengths[index] for index in group)
            index = None if len(groups) == 1 else torch.tensor(group, device=sequence.device)
            hidden_states = (sequence if index is None else sequence[index])[:, :group_len]
            mask_2d = (attention_mask if index is None else attention_mask[index])[:, :group_len]
            hidden_states = self._run_layers(hidden_states, None if bool(mask_2d.all()) else mask_2d, None, **kwargs)
            hidden_states = hidden_states * mask_2d[..., None].to(hidden_states.dtype)
            if index is None:
                return F.pad(hidden_states, (0, 0, 0, max_tokens + 1 - group_len)), attention_mask.long()
            output = output.index_copy(0, index, F.pad(hidden_states, (0, 0, 0, max_tokens + 1 - group_len)))
        return output, attention_mask.long()

    def _encode_all(self, tokens: MSViTTokens, **kwargs):
        """Masked-attention training: `[CLS, every coarse token, every fine token]`, attention keys weighted by the
        gate decisions. Kept tokens compute exactly what the selected layout computes; a dropped token holds the other
        tokenization of its region (attending to the kept tokens), which `fine_grid_features` needs for the gate's
        gradient; `attention_mask` marks the kept ones."""
        batch_size = tokens.tokens.shape[0]
        hidden_states = torch.cat([tokens.cls.expand(batch_size, 1, -1), tokens.tokens], dim=1)
        hidden_states = self.embeddings.dropout(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, None, tokens.key_weights, **kwargs)
        return self.layernorm(hidden_states), (tokens.key_weights.detach() > 0.5).long()

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

    def _check_inputs(self, pixel_values, fine_region_mask, gate_threshold, fine_region_budget) -> None:
        config = self.config
        height, width = config.image_hw
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (config.num_channels, height, width):
            raise ValueError(
                f"pixel_values must have shape (batch_size, {config.num_channels}, {height}, {width}), got "
                f"{tuple(pixel_values.shape)}. Resize images with the model's image processor."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values holds no image (shape {tuple(pixel_values.shape)}); pass at least one.")
        if fine_region_mask is not None:
            expected = (pixel_values.shape[0], *config.coarse_grid)
            if tuple(fine_region_mask.shape) != expected:
                raise ValueError(
                    f"fine_region_mask must have shape (batch_size, coarse_height, coarse_width) = {expected}, got "
                    f"{tuple(fine_region_mask.shape)}."
                )
        if gate_threshold is not None and not 0.0 <= gate_threshold <= 1.0:
            raise ValueError(f"gate_threshold must lie in [0, 1], got {gate_threshold}.")
        if fine_region_budget is not None:
            config.check_fine_region_budget(fine_region_budget)

    def _batching_mode(self, kwargs) -> str:
        """How images of different lengths share the encoder. Per-layer outputs and training run one padded group, so
        that every layer runs once per forward (one hook call per layer; the same collectives on every process under
        DDP/FSDP); otherwise `config.token_batching`."""
        config = self.config
        records_layers = kwargs.get("output_hidden_states", config.output_hidden_states) or kwargs.get(
            "output_attentions", config.output_attentions
        )
        return "pad" if records_layers or self.training else config.token_batching

    def _gate_loss(self, decisions: GateDecisions) -> torch.Tensor | None:
        if decisions.gbas_input is None:
            return None
        gate_values = decisions.gbas_input
        # multi-process training with the GBaS statistics of the global batch (off by default)
        if self.config.gbas_gather_across_processes and self.training:
            gate_values = gather_across_processes(gate_values)
        loss = self.batch_shaping(gate_values)
        if decisions.logits is not None:
            loss = loss + self.config.gate_level_loss_weight * self._level_loss(decisions.logits)
            loss = loss + self.config.gate_logit_loss_weight * decisions.logits.float().pow(2).mean()
        return loss

    def _level_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The level term: `shift^2` (linear beyond one logit), where `shift` is how far the batch's `(1 - target)`
        logit quantile lies from where inference thresholds. Its gradient moves every logit by the same amount (the
        mean logit towards where a shift of the whole distribution puts the quantile at the threshold), leaving the
        spread to GBaS; it does not vanish when the gate saturates, and it is bounded: the quantile of a saturated,
        two-mode gate jumps by tens of logits between batches, and a squared jump swamped every other gradient."""
        config = self.config
        logits = logits.float().flatten()
        threshold = torch.logit(torch.tensor(float(config.gate_threshold)), eps=1e-6)
        shift = (torch.quantile(logits.detach(), 1.0 - config.gbas_target_ratio) - threshold).detach()
        wanted_mean = logits.mean().detach() - shift
        return 2 * F.huber_loss(logits.mean(), wanted_mean, delta=1.0)

    def token_macs(self, tokens: MSViTTokens) -> torch.Tensor:
        """`(batch,)` MACs of the chosen tokenization: encoder, patch embedding, gate (when it ran), pooler."""
        num_tokens = tokens.lengths.double() + 1
        macs = self.config.num_hidden_layers * MSViTLayer.macs(self.config, num_tokens)
        num_embedded = tokens.lengths.double()
        if tokens.decisions.probs is not None:
            num_regions = tokens.decisions.fine.shape[1]
            macs = macs + self.embeddings.gate.macs(num_regions)
            if self.config.gate_input == "embeddings":
                # The gate ran on every region's coarse embedding; the kept ones are embedded again with the tokens.
                num_embedded = num_embedded + num_regions
        macs = macs + self.embeddings.patch_embeddings.macs(num_embedded)
        if self.pooler is not None:
            macs = macs + self.pooler.dense.weight.numel()
        return macs.float()

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring(custom_args=MSVIT_TOKENIZATION_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        fine_region_budget: int | float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTModelOutput:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values.")
        budget = self.config.fine_region_budget if fine_region_budget is None else fine_region_budget
        self._check_inputs(pixel_values, fine_region_mask, gate_threshold, budget)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        tokens = self.embeddings(pixel_values, fine_region_mask, gate_threshold, budget)
        if tokens.key_weights is not None:
            sequence_output, attention_mask = self._encode_all(tokens, **kwargs)
        else:
            mode = self._batching_mode(kwargs)
            sequence_output, attention_mask = self.encode(tokens, mode, **kwargs)
        coarse_h, coarse_w = self.config.coarse_grid
        probs, values = tokens.decisions.probs, tokens.decisions.values
        return MSViTModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=self.pooler(sequence_output) if self.pooler is not None else None,
            attention_mask=attention_mask,
            gate_loss=self._gate_loss(tokens.decisions),
            gate_probs=None if probs is None else probs.reshape(-1, coarse_h, coarse_w),
            fine_region_mask=tokens.decisions.fine.reshape(-1, coarse_h, coarse_w),
            num_tokens=tokens.lengths + 1,
            macs=self.token_macs(tokens),
            gate_values=None if values is None else values.reshape(-1, coarse_h, coarse_w),
        )

    def fine_grid_features(
        self, last_hidden_state: torch.Tensor, fine_region_mask: torch.Tensor, gate_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Puts the encoder's tokens back on the fine patch grid: `(batch, hidden, fine_height, fine_width)`, each fine
        region's tokens at their patches and each coarse token copied onto the fine patches of its region (the
        mixed-scale tokens "restored" for dense heads). Works with both layouts of `last_hidden_state`: the selected
        tokens (`[CLS, kept coarse, kept fine]`, padded) and masked-attention training's `[CLS, all coarse, all fine]`.
        In the masked layout, `gate_values` (the output's straight-through decisions) give each region's gate the
        gradient of choosing the other tokenization for its own patches, `<grad, fine - coarse>` (values unchanged).
        """
        config = self.config
        batch_size = last_hidden_state.shape[0]
        (coarse_h, coarse_w), (fine_h, fine_w) = config.coarse_grid, config.fine_grid
        num_regions = coarse_h * coarse_w
        fine = fine_region_mask.reshape(batch_size, num_regions).bool()
        keep_fine = expand_region_mask(fine.reshape(batch_size, coarse_h, coarse_w), self.embeddings.ratio)
        region_ids = torch.arange(num_regions, device=fine.device).reshape(1, coarse_h, coarse_w)
        region_of_patch = expand_region_mask(region_ids, self.embeddings.ratio)[0]  # (fine patches,)
        if last_hidden_state.shape[1] == 1 + num_regions + fine_h * fine_w:  # every token of both tokenizations
            fine_tokens = last_hidden_state[:, 1 + num_regions :]
            coarse_tokens = last_hidden_state[:, 1:][:, region_of_patch]
            grid = torch.where(keep_fine[..., None], fine_tokens, coarse_tokens)
            if gate_values is not None:
                # Exactly 0 in the forward; backward, each patch's value gets <grad, fine token - its coarse token>.
                # The restoration itself is a hard choice: without this term the gate would not see its own pixels.
                values = expand_region_mask(gate_values.reshape(batch_size, coarse_h, coarse_w), self.embeddings.ratio)
                grid = grid + (fine_tokens - coarse_tokens) * (values - values.detach())[..., None].to(grid.dtype)
        else:
            coarse_rank = (~fine).cumsum(1) - 1
            coarse_position = 1 + coarse_rank[:, region_of_patch]
            fine_position = 1 + (~fine).sum(1, keepdim=True) + keep_fine.cumsum(1) - 1
            position = torch.where(keep_fine, fine_position, coarse_position)
            grid = last_hidden_state.gather(1, position[..., None].expand(-1, -1, last_hidden_state.shape[-1]))
        return grid.transpose(1, 2).reshape(batch_size, -1, fine_h, fine_w)

    def _tokenization_macs(self, grid: tuple[int, int]) -> float:
        return float(vit_macs(self.config, grid[0] * grid[1], with_pooler=self.pooler is not None))


CLASSIFICATION_ARGS = (
    r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Labels for the classification loss, in `[0, ..., config.num_labels - 1]`. The returned `loss` also
        includes `config.gbas_loss_weight * gate_loss` when the gate ran.
"""
    + MSVIT_TOKENIZATION_ARGS
)


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
    @auto_docstring(custom_args=CLASSIFICATION_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        fine_region_budget: int | float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTImageClassifierOutput:
        r"""
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
        outputs = self._run_msvit(pixel_values, fine_region_mask, gate_threshold, fine_region_budget, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])

        loss = None
        if labels is not None:
            loss = self._fold_gate_loss(self.loss_function(labels, logits, self.config, **kwargs), outputs)
        macs = outputs.macs + self._head_macs(outputs.num_tokens - 1)
        return MSViTImageClassifierOutput(loss=loss, logits=logits, **self._gate_outputs(outputs, macs))

    def _head_macs(self, num_tokens) -> int:
        """The classifier reads the CLS token alone, whatever the number of image tokens."""
        return self.classifier.weight.numel() if isinstance(self.classifier, nn.Linear) else 0


@auto_docstring
@dataclass
class MSViTSemanticSegmenterOutput(MSViTGateOutput, SemanticSegmenterOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
        Per-pixel cross-entropy (pixels labelled `config.semantic_loss_ignore_index` ignored) plus
        `config.gbas_loss_weight * gate_loss`.
    logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels, height, width)`):
        Class scores per pixel, at the input size.
    """


SEGMENTATION_ARGS = (
    r"""
    labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
        Ground-truth class per pixel, in `[0, ..., config.num_labels - 1]`, or `config.semantic_loss_ignore_index`
        for pixels to ignore. The returned `loss` also includes `config.gbas_loss_weight * gate_loss`.
"""
    + MSVIT_TOKENIZATION_ARGS
)


@auto_docstring(
    custom_intro="""
    MSViT with Segmenter's linear decoder for semantic segmentation (e.g. ADE20k): every encoder token is mapped to
    class scores, the scores are put back on the fine patch grid (a coarse token's scores fill its region) and
    bilinearly upsampled to the input size.
    """
)
class MSViTForSemanticSegmentation(MSViTPreTrainedModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config)
        self.msvit = MSViTModel(config, add_pooling_layer=False)
        # Linear, so it commutes with copying a coarse token onto its fine patches: each token is decoded once, and a
        # coarse region costs the decoder as little as it costs the encoder.
        self.decode_head = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    @auto_docstring(custom_args=SEGMENTATION_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        fine_region_budget: int | float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTSemanticSegmenterOutput:
        r"""
        Example:

        ```python
        >>> import torch
        >>> from hf_msvit import MSViTConfig, MSViTForSemanticSegmentation

        >>> config = MSViTConfig(hidden_size=192, num_hidden_layers=2, num_attention_heads=3, intermediate_size=768)
        >>> model = MSViTForSemanticSegmentation(config).eval()
        >>> outputs = model(torch.randn(1, 3, 224, 224))
        >>> outputs.logits.shape, outputs.fine_region_mask.shape
        (torch.Size([1, 2, 224, 224]), torch.Size([1, 7, 7]))
        ```
        """
        if labels is not None and self.config.num_labels < 2:
            raise ValueError(
                f"Semantic segmentation needs at least 2 labels, the config has {self.config.num_labels}."
            )
        outputs = self._run_msvit(pixel_values, fine_region_mask, gate_threshold, fine_region_budget, **kwargs)
        token_logits = self.decode_head(outputs.last_hidden_state)
        grid_logits = self.msvit.fine_grid_features(token_logits, outputs.fine_region_mask, outputs.gate_values)
        logits = F.interpolate(grid_logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)

        loss = None
        if labels is not None:
            task_loss = self.loss_function(logits, labels, ignore_index=self.config.semantic_loss_ignore_index)
            loss = self._fold_gate_loss(task_loss, outputs)
        macs = outputs.macs + self._head_macs(outputs.num_tokens - 1)
        return MSViTSemanticSegmenterOutput(loss=loss, logits=logits, **self._gate_outputs(outputs, macs))

    def _head_macs(self, num_tokens):
        """The decoder decodes every image token once (CLS aside)."""
        return num_tokens * self.decode_head.weight.numel()

    @classmethod
    def from_vit_pretrained(cls, vit, **config_overrides):
        """Upcycles a ViT checkpoint: every encoder weight is reused; the gate and the decoder are new.

        Args:
            vit: a local directory or Hub id of a ViT checkpoint, or a loaded `ViTModel` / `ViTForImageClassification`.
            config_overrides: `MSViTConfig` fields to set (e.g. `num_labels=150`, `id2label=...`,
                `gbas_target_ratio=0.3`).
        """
        encoder = MSViTModel.from_vit_pretrained(vit, **config_overrides)
        model = cls(encoder.config)
        weights = {key: value for key, value in encoder.state_dict().items() if not key.startswith("pooler.")}
        model.msvit.load_state_dict(weights)
        return model.to(encoder.dtype).eval()


@auto_docstring
@dataclass
class MSViTBackboneOutput(MSViTGateOutput, BackboneOutput):
    r"""
    feature_maps (`tuple(torch.FloatTensor)`):
        One map per `out_features` layer, `(batch_size, hidden_size, image_height / patch_size, image_width /
        patch_size)`: the layer's tokens after the final layer norm, on the fine patch grid (a coarse token fills its
        region).
    """


@auto_docstring(
    custom_intro="""
    MSViT as a backbone (`AutoBackbone`), e.g. for `UperNetForSemanticSegmentation`: the tokens of the layers named in
    `config.out_features` (`"stem"`, `"stage1"`, ...) as feature maps on the fine patch grid, as DINOv2's backbone
    does for a ViT.
    """
)
class MSViTBackbone(BackboneMixin, MSViTModel):
    def __init__(self, config: MSViTConfig):
        super().__init__(config, add_pooling_layer=False)
        self.num_features = [config.hidden_size] * (config.num_hidden_layers + 1)

    @can_return_tuple
    @filter_output_hidden_states
    @auto_docstring(custom_args=MSVIT_TOKENIZATION_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor,
        fine_region_mask: torch.BoolTensor | None = None,
        gate_threshold: float | None = None,
        fine_region_budget: int | float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MSViTBackboneOutput:
        r"""

        Example:

        ```python
        >>> import torch
        >>> from hf_msvit import MSViTBackbone, MSViTConfig

        >>> config = MSViTConfig(num_hidden_layers=4, hidden_size=192, num_attention_heads=3, intermediate_size=768,
        ...                      out_indices=[2, 4])
        >>> feature_maps = MSViTBackbone(config).eval()(torch.randn(1, 3, 224, 224)).feature_maps
        >>> [tuple(f.shape) for f in feature_maps]
        [(1, 192, 14, 14), (1, 192, 14, 14)]
        ```"""
        kwargs["output_hidden_states"] = True
        outputs: MSViTModelOutput = MSViTModel.forward(
            self,
            pixel_values,
            fine_region_mask=fine_region_mask,
            gate_threshold=gate_threshold,
            fine_region_budget=fine_region_budget,
            return_dict=True,
            **kwargs,
        )
        feature_maps = tuple(
            self.fine_grid_features(self.layernorm(hidden_state), outputs.fine_region_mask, outputs.gate_values)
            for stage, hidden_state in zip(self.stage_names, outputs.hidden_states)
            if stage in self.out_features
        )
        return MSViTBackboneOutput(feature_maps=feature_maps, **self._gate_outputs(outputs, outputs.macs))


# `save_pretrained` copies the code next to the weights (remote code); the config's AUTO_MAP names the classes.
MSViTModel.register_for_auto_class("AutoModel")
MSViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MSViTForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
MSViTBackbone.register_for_auto_class("AutoBackbone")

__all__ = [
    "MSViTBackbone",
    "MSViTForImageClassification",
    "MSViTForSemanticSegmentation",
    "MSViTModel",
    "MSViTPreTrainedModel",
    "vit_macs",
]
