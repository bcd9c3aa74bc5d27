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
into scale `i + 1`) into node `F[i + 1][j]`. A node sums what reaches it (paper Eq. 4):

    F[i][j] = G * stage(F[i][j-1]) + (1 - G) * F[i][j-1]  +  g * patch_embedding(F[i-1][j])

with `G` the per-token row gate of `grid[i][j-1]` and `g` the per-image column gate of `patch_embeddings[i-1][j]`.

This file holds the outputs, `DiTRoutingEncoder` (one walk over the grid) and the models. The layers are in
`layers.py`, the routing state and its MAC ledger in `routing.py`, the sparse inference path in `sparse_inference.py`.
"""

import math
from dataclasses import dataclass

import torch
import transformers.initialization as init
from torch import nn
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_dit_routing import DiTConfig
from .layers import DiTGate, DiTOverlapPatchEmbeddings, DiTStage
from .routing import (
    Route,
    RouteMode,
    any_in_any_process,
    compute_budget_tokens,
    dit_route_macs,
    fixed_route_decisions,
    mean_token_keep_ratio,
    node_sum,
    scale_by_image,
    scale_sizes,
)
from .sparse_inference import run_on_images, run_stage_on_selected_tokens, to_map, to_tokens


# The config fields whose values fork this file (`transformers-mlinter` TRF041); `DiTConfig`'s docstring says which
# checkpoints take each value.
# trf-ignore: TRF041 config.routing_mode, config.gate_init


# The routing outputs of every DiT model: one definition for the three output classes.
@auto_docstring
@dataclass
class DiTRoutingOutput(ModelOutput):
    r"""
    budget_loss (`torch.FloatTensor` of shape `()`, *optional*):
        `(mean_over_batch(cost) / static_cost - budget_target) ** 2`, differentiable through the gate decisions.
        Only in `routing_mode="dynamic"`; heads fold `budget_loss_weight * budget_loss` into `loss`.
    macs (`torch.FloatTensor` of shape `(batch_size,)`):
        Multiply-accumulates of the route each image took (matmuls, convolutions and attention, gates included; the
        classifier too for `DiTForImageClassification`). At inference this is exactly what the forward computed.
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
class DiTModelOutput(DiTRoutingOutput, BaseModelOutputWithPooling):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, hidden_size, height, width)`):
        The last node of the coarsest scale, `F[num_encoder_blocks - 1][num_routing_columns]`, as a feature map.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        `last_hidden_state` averaged over its positions (what the classification head reads).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The stem embedding (node `(0, 0)`), then the last node column at every scale, each as a map
        `(batch_size, hidden_sizes[i], height_i, width_i)` (strides 4, 4, 8, 16, 32).
    """


@auto_docstring
@dataclass
class DiTImageClassifierOutput(DiTRoutingOutput, ImageClassifierOutput):
    r"""
    loss (`torch.FloatTensor` of shape `(1,)`, *optional*, returned when `labels` is provided):
        Classification loss plus `budget_loss_weight * budget_loss` (dynamic routing).
    logits (`torch.FloatTensor` of shape `(batch_size, config.num_labels)`):
        Classification scores (before SoftMax).
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned when `output_hidden_states=True`):
        The stem embedding, then the last node column at every scale, each `(batch_size, hidden_sizes[i], height_i,
        width_i)`.
    """


@auto_docstring
@dataclass
class DiTBackboneOutput(DiTRoutingOutput, BackboneOutput):
    r"""
    feature_maps (`tuple(torch.FloatTensor)`):
        The last node column at the scales of `out_features`, `(batch_size, hidden_sizes[i], height_i, width_i)`.
    """


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class DiTFeatureMap(nn.Module):
    """A node's tokens `(batch, height * width, C)` as its feature map `(batch, C, height, width)` (a view, no
    parameters): the stem and the last node column pass through it, so `output_hidden_states` records them."""

    def forward(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return to_map(tokens, size)


class DiTRoutingEncoder:
    """One walk over `DiTModel`'s grid (paper Eq. 4): node by node, column after column, computes each node from its
    row part (the stage on its left) and its column part (the patch embedding above), then decides the gates that
    leave it and records their cost in the route's ledgers.

    It holds no parameters: `DiTModel` owns the stages, patch embeddings and gates (their names are the checkpoint
    keys, PVTv2's converter maps onto them), and builds an encoder over them for every forward.
    """

    def __init__(self, model: "DiTModel", route: Route):
        self.config = model.config
        self.grid, self.patch_embeddings = model.grid, model.patch_embeddings
        self.row_gates, self.column_gates = model.row_gates, model.column_gates
        self.route = route

    def __call__(self, stem_features: torch.Tensor) -> Route:
        """Routes `stem_features` (node (0, 0)'s tokens) through the grid; returns the route, every node filled."""
        self.route.features[(0, 0)] = stem_features
        for column in range(self.config.num_routing_columns + 1):
            for scale in range(self.config.num_encoder_blocks):
                self.visit_node(scale, column)
        return self.route

    def visit_node(self, scale: int, column: int) -> None:
        """Computes node (scale, column) from its row and column parts (Eq. 4), then decides the gates leaving it."""
        route = self.route
        reached = route.ledger.record_reach(scale, column)
        if route.budget_ledger is not None:
            route.budget_ledger.record_reach(scale, column)
        if not route.node_exists(scale, column, reached):
            return
        if (scale, column) != (0, 0):
            row_part = self.row_part(scale, column)
            route.features[(scale, column)] = node_sum(row_part, self.column_part(scale, column))
        self.leave_node(scale, column)

    def row_part(self, scale: int, column: int):
        """`G * stage(F) + (1 - G) * F` from node (scale, column - 1), or None if that node was not computed."""
        route = self.route
        previous = route.features.get((scale, column - 1))
        if previous is None:
            return None
        decisions = route.row_decisions[(scale, column - 1)]
        stage, size = self.grid[scale][column - 1], route.ledger.sizes[scale]
        if isinstance(decisions, int):  # a fixed route, or a budget stage computing every token
            return stage(previous, *size) if decisions else previous
        if route.mode is RouteMode.COMPUTE_BUDGET:
            return stage.forward_top_tokens(previous, *size, decisions)
        if route.mode is RouteMode.TRAINING:
            reached = route.ledger.reached[(scale, column - 1)]
            if not route.dense_training and not any_in_any_process(scale_by_image(reached, decisions.unsqueeze(-1))):
                return scale_by_image(reached, previous)  # no token runs the stage: its gates learn from the budget
            return scale_by_image(reached, stage(previous, *size, decisions))
        return run_stage_on_selected_tokens(stage, previous, decisions > 0, size)

    def column_part(self, scale: int, column: int):
        """`g * patch_embedding(F)` from node (scale - 1, column), or None if no image takes that edge."""
        route = self.route
        above = route.features.get((scale - 1, column)) if scale > 0 else None
        if above is None:
            return None
        downsampled = route.ledger.downsampled_from[(scale - 1, column)]
        patch_embedding, size = self.patch_embeddings[scale - 1][column], route.ledger.sizes[scale - 1]

        def embed(features):
            return patch_embedding(to_map(features, size))[0]

        if route.mode in (RouteMode.FIXED, RouteMode.COMPUTE_BUDGET):
            return embed(above) if downsampled else None
        if route.mode is RouteMode.TRAINING:
            if not route.dense_training and not any_in_any_process(downsampled):
                return None
            return scale_by_image(downsampled, embed(above))
        images = route.downsampled_on_host[(scale - 1, column)]
        if not any(images):
            return None
        index = None if all(images) else torch.tensor([i for i, d in enumerate(images) if d], device=above.device)
        return run_on_images(embed, above, index, len(images))

    def leave_node(self, scale: int, column: int) -> None:
        """Decides the row and column gates of node (scale, column) and records what they open (and the gates)."""
        route = self.route
        if route.mode is RouteMode.FIXED:
            row, downsample = fixed_route_decisions(self.config, self.config.routing_mode, scale, column)
        elif route.mode is RouteMode.COMPUTE_BUDGET:
            row, downsample = self.top_token_decisions(scale, column)
        else:
            row, downsample = self.gate_decisions(scale, column)
            route.ledger.record_gates(scale, column)
            if route.budget_ledger is not None:
                self.record_inference_decisions(scale, column)
        if row is not None:
            route.row_decisions[(scale, column)] = row
            route.ledger.record_stage(scale, column, row)
        if downsample is not None:
            downsampled = route.ledger.record_edge(scale, column, downsample)
            if route.mode is RouteMode.INFERENCE:
                route.copy_edge_to_host(scale, column, downsampled)

    def top_token_decisions(self, scale: int, column: int) -> tuple:
        """Exact-budget mode at node (scale, column) of PVTv2's route: the row decision is 1 (every token) or the
        sorted indices `(batch, count)` of the `count` tokens the row gate scores highest (recorded as that fraction);
        the downsampling edge is PVTv2's."""
        route = self.route
        row, downsample = fixed_route_decisions(self.config, "static", scale, column)
        height, width = route.ledger.sizes[scale]
        count = route.tokens_per_scale[scale]
        if row and count == 0:  # the model's profile skips this scale's stage
            row = 0
        if row and count < height * width:
            route.ledger.record_gates(scale, column, column_gate=False)
            scores = self.row_gates[scale][column].open_probability(route.features[(scale, column)])
            indices = scores.topk(count, dim=1, sorted=False).indices.sort(dim=1).values
            route.row_decisions[(scale, column)] = indices
            route.ledger.record_stage(scale, column, count / (height * width))
            row = None  # recorded
        return row, downsample

    def gate_decisions(self, scale: int, column: int) -> tuple:
        """Row `(batch, tokens)` and column `(batch,)` decisions of node (scale, column), `None` where it has no such
        gate; at inference computed for the images that reach the node only (zeros for the others)."""
        route = self.route
        features = route.features[(scale, column)]
        index, batch_size = route.reached_index.get((scale, column)), features.shape[0]
        row = downsample = None
        if column < len(self.row_gates[scale]):  # the last node column has no row gate
            gate = self.row_gates[scale][column]
            row = run_on_images(lambda x: gate(x, route.row_threshold), features, index, batch_size)
        if scale < len(self.column_gates):  # the coarsest scale has no column gate
            gate = self.column_gates[scale][column]
            downsample = run_on_images(lambda x: gate(x.mean(1)), features, index, batch_size)
        return row, downsample

    def record_inference_decisions(self, scale: int, column: int) -> None:
        """Training: prices, in the budget ledger, the decisions inference would take at this node with the current
        gate weights (straight-through gradients of the gate probabilities)."""
        route = self.route
        features, ledger = route.features[(scale, column)], route.budget_ledger
        ledger.record_gates(scale, column)
        if column < len(self.row_gates[scale]):  # the last node column has no row gate
            row_gate = self.row_gates[scale][column]
            ledger.record_stage(scale, column, row_gate.straight_through(features, route.row_threshold))
        if scale < len(self.column_gates):  # the coarsest scale has no column gate
            ledger.record_edge(scale, column, self.column_gates[scale][column].straight_through(features.mean(1)))


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
    # The stem and the last node column at every scale, as maps (the last node column is a sum, not a module's output:
    # both pass through `DiTFeatureMap`).
    _can_record_outputs = {"hidden_states": OutputRecorder(DiTFeatureMap, capture_initial_hidden_state=False)}
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
        PVTv2 function.
        """
        from .convert_pvt_v2_to_dit_routing import convert_pvt_v2_to_dit

        return convert_pvt_v2_to_dit(cls, pvt, **config_overrides)

    @torch.no_grad()
    def calibrate_compute_budget(self, pixel_values: torch.Tensor, gate_threshold=None, batch_size: int = 64):
        """Sets `config.compute_budget_profile` to the fraction of each scale's tokens that this model's learned route
        computes on `pixel_values` (threshold mode, mean over the images; stages of one scale add up, at most 1) and
        returns it: the exact-budget mode then spreads its tokens over the scales as the trained gates do. Like
        BatchNorm's statistics, a few hundred images of the training distribution are enough."""
        was_training, budget = self.training, self.config.compute_budget
        self.eval()
        self.config.compute_budget = None
        try:
            keep = torch.cat(
                [
                    self(pixel_values[start : start + batch_size], gate_threshold=gate_threshold).stage_keep_ratio
                    for start in range(0, pixel_values.shape[0], batch_size)
                ]
            )
        finally:
            self.config.compute_budget = budget
            self.train(was_training)
        profile = [round(value, 4) for value in keep.sum(2).mean(0).clamp(max=1.0).tolist()]
        self.config.compute_budget_profile = profile
        return profile

    def routing_loss(self, outputs) -> torch.Tensor | None:
        """What a head adds to its task loss: `config.budget_loss_weight * budget_loss` (None outside dynamic
        routing). A trainer that computes the task loss itself (label smoothing) adds this, as the heads do."""
        budget_loss = outputs.get("budget_loss")
        return None if budget_loss is None else self.config.budget_loss_weight * budget_loss

    @staticmethod
    def _routing_outputs(outputs: DiTModelOutput, macs: torch.Tensor) -> dict:
        """The fields a head passes through from the base model's `outputs` (`DiTRoutingOutput`, hidden states), with
        `macs` the head's total."""
        return {
            "hidden_states": outputs.hidden_states,
            "budget_loss": outputs.budget_loss,
            "macs": macs,
            "downsampled": outputs.downsampled,
            "stage_keep_ratio": outputs.stage_keep_ratio,
            "token_keep_ratio": outputs.token_keep_ratio,
        }


# The routing arguments of every DiT forward (`auto_docstring` reads them from here).
DIT_ROUTING_ARGS = r"""
    gate_threshold (`float`, *optional*):
        Overrides `config.gate_threshold` for this call: at inference a row gate computes a token when its probability
        of computing it is `>= gate_threshold`. Higher values compute fewer tokens.
    compute_budget (`float`, *optional*):
        Overrides `config.compute_budget` for this call (inference): every image computes this fraction of the static
        route's cost (a head excluded), PVTv2's route with the tokens the row gates score highest (see `DiTConfig`).
"""
CLASSIFICATION_ARGS = (
    r"""
    labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
        Labels for computing the image classification/regression loss. Indices should be in `[0, ...,
        config.num_labels - 1]`. In dynamic routing `budget_loss_weight * budget_loss` is added to the loss.
"""
    + DIT_ROUTING_ARGS
)


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
        # patch_embeddings[i][j]: downsampling from node (i, j) to node (i + 1, j) (PVTv2's embedding into scale i+1).
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
        self.feature_map = DiTFeatureMap()
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem.proj

    def static_macs(self) -> int:
        """MACs per image of the static (PVTv2) route at the config's image size (other sizes: `dit_route_macs`)."""
        return dit_route_macs(self.config, *_pair(self.config.image_size), "static")

    def full_grid_macs(self) -> int:
        """MACs per image with every stage, edge and token computed (the paper's "Fully"), at the config's size."""
        return dit_route_macs(self.config, *_pair(self.config.image_size), "full")

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring(custom_args=DIT_ROUTING_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor,
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTModelOutput:
        self._check_pixel_values(pixel_values)
        threshold = self.config.gate_threshold if gate_threshold is None else gate_threshold
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"gate_threshold must lie in [0, 1], got {threshold}.")
        budget = self.config.compute_budget if compute_budget is None else compute_budget
        if budget is not None and self.training:
            raise ValueError("compute_budget is an inference mode: call model.eval() first, or train with the gates.")
        route = Route.start(self.config, pixel_values, threshold, budget, self.training)
        stem_features, _, _ = self.stem(pixel_values)
        # The stem map is the first hidden state; route from a view of it so that it stays in the graph.
        stem_map = self.feature_map(stem_features, route.ledger.sizes[0])
        DiTRoutingEncoder(self, route)(to_tokens(stem_map))
        if route.mode is RouteMode.TRAINING:
            for gate in self._gates():
                gate.update_ema()
        return self._outputs(route, pixel_values.shape[-2:])

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """A clear `ValueError` for input the grid cannot take (as HF ViT does for a wrong channel count)."""
        config = self.config
        expected = f"(batch_size, {config.num_channels}, height, width)"
        if pixel_values.ndim != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}: the channel dimension "
                f"must match num_channels={config.num_channels} in the configuration (the image processor converts "
                "grayscale images to RGB)."
            )
        if pixel_values.shape[0] == 0:
            raise ValueError(f"pixel_values holds no image: shape {tuple(pixel_values.shape)}, expected {expected}.")
        sizes = scale_sizes(config, *pixel_values.shape[-2:])
        for scale, ((height, width), ratio) in enumerate(zip(sizes, config.sr_ratios)):
            if min(height, width) < ratio:
                raise ValueError(
                    f"pixel_values of {tuple(pixel_values.shape[-2:])} pixels give a {height}x{width} map at scale "
                    f"{scale}, smaller than its spatial-reduction ratio {ratio}: use larger images."
                )

    def _gates(self):
        return [gate for rows in (self.row_gates, self.column_gates) for gate_row in rows for gate in gate_row]

    def _outputs(self, route: Route, image_size) -> DiTModelOutput:
        """The model output of a finished route; the last node column passes through `feature_map` (hidden states)."""
        config, ledger = self.config, route.ledger
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        budget_loss = None
        if config.routing_mode == "dynamic":  # only the learned route has a budget
            static_cost = dit_route_macs(config, *image_size, "static")
            budget_loss = ((route.budget_ledger or ledger).macs.mean() / static_cost - config.budget_target) ** 2
        last_column = [self.feature_map(route.features[(s, num_columns)], ledger.sizes[s]) for s in range(num_scales)]
        last_hidden_state = route.features[(num_scales - 1, num_columns)]
        return DiTModelOutput(
            last_hidden_state=last_column[-1].contiguous(),
            pooler_output=last_hidden_state.mean(dim=1),
            budget_loss=budget_loss,
            macs=ledger.macs,
            downsampled=ledger.downsampled,
            stage_keep_ratio=ledger.stage_keep_ratio,
            token_keep_ratio=mean_token_keep_ratio(ledger.stage_keep_ratio),
        )


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
    @auto_docstring(custom_args=CLASSIFICATION_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTImageClassifierOutput:
        r"""
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
        # `return_dict=True`: with `config.return_dict=False` the base model would return a tuple to the head too.
        outputs: DiTModelOutput = self.dit(
            pixel_values, gate_threshold=gate_threshold, compute_budget=compute_budget, return_dict=True, **kwargs
        )
        logits = self.classifier(outputs.pooler_output)
        macs = outputs.macs + self._head_macs()

        loss = None
        if labels is not None:
            loss = self.loss_function(labels, logits, self.config)
            routing = self.routing_loss(outputs)
            loss = loss if routing is None else loss + routing

        return DiTImageClassifierOutput(loss=loss, logits=logits, **self._routing_outputs(outputs, macs))

    def static_macs(self) -> int:
        """MACs per image of the static (PVTv2) route, classifier included."""
        return self.dit.static_macs() + self._head_macs()

    def full_grid_macs(self) -> int:
        """MACs per image of the full grid (every stage, edge and token), classifier included."""
        return self.dit.full_grid_macs() + self._head_macs()

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
    @auto_docstring(custom_args=DIT_ROUTING_ARGS)
    def forward(
        self,
        pixel_values: torch.Tensor,
        gate_threshold: float | None = None,
        compute_budget: float | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DiTBackboneOutput:
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
        outputs: DiTModelOutput = DiTModel.forward(
            self, pixel_values, gate_threshold, compute_budget, return_dict=True, **kwargs
        )
        feature_maps = tuple(
            outputs.hidden_states[idx] for idx, stage in enumerate(self.stage_names) if stage in self.out_features
        )
        return DiTBackboneOutput(feature_maps=feature_maps, **self._routing_outputs(outputs, outputs.macs))


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
