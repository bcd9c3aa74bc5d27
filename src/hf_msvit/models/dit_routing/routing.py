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
"""DiT's routing: which node of the grid an image reaches, which tokens a stage computes, and what that costs.

- `RouteLedger`: reach and cost (paper Eq. 5) of one set of gate decisions, node by node (the `macs`, `downsampled`
  and `stage_keep_ratio` outputs, and the budget loss);
- `dit_route_macs`, `compute_budget_tokens`, `mean_token_keep_ratio`: the same ledger from a config alone;
- `RouteMode` and `Route`: one forward's walk over the grid (which mode, node features, decisions, ledgers), which
  `DiTRoutingEncoder` in `modeling_dit_routing.py` drives.
"""

import enum
from dataclasses import dataclass, field

import torch

from .configuration_dit_routing import DiTConfig
from .layers import DiTBlockLayer, DiTGate, DiTOverlapPatchEmbeddings, DiTStage


def scale_sizes(config: DiTConfig, height: int, width: int) -> list[tuple[int, int]]:
    """`(height, width)` of the map at every scale for an input of `height x width` pixels."""
    sizes = []
    for scale in range(config.num_encoder_blocks):
        height, width = DiTOverlapPatchEmbeddings.output_size(config, scale, height, width)
        sizes.append((height, width))
    return sizes


def reach_or(first, second):
    """OR of two 0/1 reach values (`None`: no such edge); differentiable for (straight-through) tensors."""
    if first is None or second is None:
        return second if first is None else first
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return 1 - (1 - first) * (1 - second)
    return max(first, second)


def fixed_route_decisions(config: DiTConfig, routing_mode: str, scale: int, column: int) -> tuple:
    """`(row, column)` decisions (1/0, `None` where the node has no such gate) of node (scale, column) on the static
    (PVTv2 staircase: stage `i` at column `i`, edge `i -> i + 1` at column `i + 1`) or full route."""
    full = routing_mode == "full"
    # The last node column has no stage after it; the full route opens every stage.
    row = int(full or column == config.static_columns[scale]) if column < config.num_routing_columns else None
    has_edge = scale + 1 < config.num_encoder_blocks
    downsample = int(full or column == config.static_columns[scale] + 1) if has_edge else None
    return row, downsample


@dataclass
class RouteLedger:
    """Reach and cost (paper Eq. 5) of one set of gate decisions, node by node, from the decisions alone.

    Values are Python numbers on a fixed route (no tensors, no host syncs) and `(batch,)` / `(batch, tokens)` 0/1
    tensors on the learned route; in training they are straight-through values, so the cost has gradients.
    """

    config: DiTConfig
    sizes: list[tuple[int, int]]
    macs: torch.Tensor | int = 0
    stage_keep_ratio: torch.Tensor | None = None  # (batch, scales, columns), filled when given
    downsampled: torch.Tensor | None = None  # (batch, scales - 1, columns + 1), filled when given
    reached: dict = field(default_factory=dict)  # (scale, column) -> 0/1 per image: the image reaches that node
    downsampled_from: dict = field(default_factory=dict)  # (scale, column) -> 0/1 per image: downsampled from it

    def record_reach(self, scale: int, column: int):
        """Records and returns the reach of node (scale, column) (`None`: no edge leads there)."""
        if (scale, column) == (0, 0):
            reach = 1
        else:
            reach = reach_or(self.reached.get((scale, column - 1)), self.downsampled_from.get((scale - 1, column)))
        if reach is not None:
            self.reached[(scale, column)] = reach
        return reach

    def record_stage(self, scale: int, column: int, decisions) -> None:
        """Stage (scale, column) computing `decisions` (1/0: every token or none; or `(batch, tokens)`) of its node.

        The per-image part is paid when any token is computed; in training its value is that exact indicator and its
        gradient that of the fraction of tokens computed (straight-through), so whole stages can be learned off.
        """
        height, width = self.sizes[scale]
        reach = self.reached[(scale, column)]
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

    def record_edge(self, scale: int, column: int, decision):
        """Downsampling edge (scale -> scale + 1, column) with column decision `decision`; returns the 0/1 per image
        that take it. At the last column the edge opens for images whose next scale has not been entered yet, so the
        output node (coarsest scale, last column) is always reached."""
        if column == self.config.num_routing_columns:
            entered = self.reached.get((scale + 1, column - 1), 0)
            decision = 1 - (1 - decision) * entered  # = max(decision, 1 - entered) for 0/1 values
        downsampled = self.reached[(scale, column)] * decision
        self.downsampled_from[(scale, column)] = downsampled
        self.macs = self.macs + downsampled * DiTOverlapPatchEmbeddings.macs(
            self.config, scale + 1, *self.sizes[scale]
        )
        if self.downsampled is not None:
            self.downsampled[:, scale, column] = (
                downsampled.detach() if isinstance(downsampled, torch.Tensor) else downsampled
            )
        return downsampled

    def record_gates(self, scale: int, column: int, column_gate: bool = True) -> None:
        """The gates leaving node (scale, column): a row gate on every token, a column gate on the pooled map (not
        evaluated in the exact-budget mode, whose route is fixed: `column_gate=False`)."""
        height, width = self.sizes[scale]
        hidden = self.config.hidden_sizes[scale]
        # the last node column has no row gate, the coarsest scale no column gate
        if column < self.config.num_routing_columns:
            self.macs = self.macs + self.reached[(scale, column)] * DiTGate.macs(height * width, hidden)
        if column_gate and scale + 1 < self.config.num_encoder_blocks:
            self.macs = self.macs + self.reached[(scale, column)] * DiTGate.macs(1, hidden)


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
    ledger = RouteLedger(config, scale_sizes(config, height, width))
    ledger.macs = DiTOverlapPatchEmbeddings.macs(config, 0, height, width)
    for column in range(config.num_routing_columns + 1):
        for scale in range(config.num_encoder_blocks):
            if not ledger.record_reach(scale, column):
                continue
            row, downsample = fixed_route_decisions(config, routing_mode, scale, column)
            if row is not None:
                ledger.record_stage(scale, column, row)
            if downsample is not None:
                ledger.record_edge(scale, column, downsample)
    return int(ledger.macs)


def compute_budget_tokens(config: DiTConfig, height: int, width: int, compute_budget: float) -> list[int]:
    """Tokens per scale that each stage of PVTv2's route computes in the exact-budget mode, so that an image of
    `height x width` costs `compute_budget` times the static route (classifier excluded), as close as whole tokens
    allow. Scale `i` computes the fraction `min(1, f * profile[i])` of its tokens (`config.compute_budget_profile`,
    uniform when unset; a 0 skips the stage), `f` solved by bisection, then single tokens moved to close the rounding
    gap. The row gates that rank the tokens of a stage computing some but not all of them are paid for too."""
    config.check_compute_budget(compute_budget)
    num_tokens = [h * w for h, w in scale_sizes(config, height, width)]
    if compute_budget >= 1.0:
        return num_tokens
    profile = list(config.compute_budget_profile or [1.0] * len(num_tokens))
    cost = _budget_cost_function(config, height, width)
    target = compute_budget * dit_route_macs(config, height, width, "static")

    def tokens_at(fraction):
        fractions = [min(1.0, fraction * p) for p in profile]
        return [0 if p <= 0 else min(n, max(1, round(f * n))) for p, f, n in zip(profile, fractions, num_tokens)]

    low, high = 0.0, 1.0 / min(p for p in profile if p > 0)
    for _ in range(50):  # bisection: the cost grows with the fraction
        middle = (low + high) / 2
        low, high = (middle, high) if cost(tokens_at(middle)) <= target else (low, middle)
    tokens = tokens_at(low)
    while True:  # greedy single-token moves (stages the profile runs) while they bring the cost closer to the target
        moves = [tokens[:s] + [tokens[s] + d] + tokens[s + 1 :] for s in range(len(tokens)) for d in (-1, 1)]
        moves = [m for m in moves if all(k == 0 if p <= 0 else 1 <= k <= n for k, n, p in zip(m, num_tokens, profile))]
        best = min(moves, key=lambda m: abs(cost(m) - target))
        if abs(cost(best) - target) >= abs(cost(tokens) - target):
            break
        tokens = best
    if abs(cost(tokens) - target) > 0.02 * target:
        static = target / compute_budget
        cheapest, dearest = cost(tokens_at(0.0)) / static, cost(tokens_at(high)) / static
        raise ValueError(
            f"compute_budget {compute_budget} is out of reach at {height}x{width} px on PVTv2's route with this "
            f"model's per-scale profile ({profile}): it reaches {cheapest:.3f} (one token per stage: the per-image "
            f"parts and the gates) to {dearest:.3f} of the static cost; ask for a budget in that range."
        )
    return tokens


def _budget_cost_function(config: DiTConfig, height: int, width: int):
    """`cost(tokens)`: MACs of PVTv2's route computing `tokens[i]` tokens at scale `i` (0: the stage is skipped,
    per-image part included; fewer than all: its row gate ranks them)."""
    sizes = scale_sizes(config, height, width)
    static = dit_route_macs(config, height, width, "static")
    parts = [DiTBlockLayer.macs(config, s, *sizes[s]) for s in range(len(sizes))]

    def cost(tokens):
        total = static
        for scale, ((h, w), (per_image, per_token), count) in enumerate(zip(sizes, parts, tokens)):
            depth, skipped = config.depths[scale], h * w - count
            total -= depth * (skipped * per_token + (per_image if count == 0 else 0))
            total += DiTGate.macs(h * w, config.hidden_sizes[scale]) if 0 < count < h * w else 0
        return total

    return cost


class RouteMode(enum.Enum):
    """How one forward walks the grid (`Route.start` picks it from the config, the call's options and train/eval)."""

    FIXED = "fixed"  # routing_mode "static" / "full": the route follows from the config, no gate runs
    TRAINING = "training"  # "dynamic" in training: every node computed densely, times straight-through decisions
    INFERENCE = "inference"  # "dynamic" at inference: only the nodes, images and tokens the route needs
    COMPUTE_BUDGET = "compute_budget"  # inference with a compute budget: PVTv2's route, the top tokens of every stage


@dataclass
class Route:
    """One routing pass over the grid: node features, the row decisions taken, and their ledgers.

    `budget_ledger` (training with `budget_decisions="deterministic"`) prices the decisions inference would take;
    `tokens_per_scale` (`RouteMode.COMPUTE_BUDGET`) the tokens every stage on PVTv2's route computes.
    """

    mode: RouteMode
    ledger: RouteLedger
    row_threshold: float
    budget_ledger: RouteLedger | None = None
    tokens_per_scale: list[int] | None = None
    dense_training: bool = True  # TRAINING: compute every node, or only what some image reaches
    features: dict = field(default_factory=dict)  # (scale, column) -> (batch, tokens, C)
    row_decisions: dict = field(default_factory=dict)  # (scale, column) -> decisions of stage (scale, column)
    reached_index: dict = field(default_factory=dict)  # INFERENCE: (scale, column) -> reached images (None: all)
    downsampled_on_host: dict = field(default_factory=dict)  # INFERENCE: (scale, column) -> images taking the edge
    reached_on_host: dict = field(default_factory=dict)  # INFERENCE: (scale, column) -> images reaching the node

    @classmethod
    def start(cls, config: DiTConfig, pixel_values: torch.Tensor, threshold: float, budget, training: bool) -> "Route":
        """An empty route over the grid, its ledger holding the stem's cost (MACs and routing outputs in float32
        whatever the model dtype: half precision cannot count to 1e9)."""
        batch_size, image_size = pixel_values.shape[0], pixel_values.shape[-2:]
        sizes = scale_sizes(config, *image_size)
        stem_macs = DiTOverlapPatchEmbeddings.macs(config, 0, *image_size)
        macs = torch.full((batch_size,), float(stem_macs), device=pixel_values.device)
        num_scales, num_columns = config.num_encoder_blocks, config.num_routing_columns
        ledger = RouteLedger(
            config,
            sizes,
            macs,
            stage_keep_ratio=macs.new_zeros(batch_size, num_scales, num_columns),
            downsampled=macs.new_zeros(batch_size, max(num_scales - 1, 0), num_columns + 1),
        )
        if budget is not None:
            tokens = compute_budget_tokens(config, *image_size, budget)
            return cls(RouteMode.COMPUTE_BUDGET, ledger, threshold, tokens_per_scale=tokens)
        if config.routing_mode != "dynamic":
            return cls(RouteMode.FIXED, ledger, threshold)
        if not training:
            return cls(RouteMode.INFERENCE, ledger, threshold)
        # Training computes every node densely and multiplies by the straight-through decisions: the gates then get
        # gradients also for skipped tokens and closed edges, every parameter is in the graph (DDP and FSDP see the
        # same collectives on every process), and the values equal the sparse inference path exactly.
        budget_ledger = RouteLedger(config, sizes, macs) if config.budget_decisions == "deterministic" else None
        return cls(RouteMode.TRAINING, ledger, threshold, budget_ledger, dense_training=not config.sparse_training)

    def node_exists(self, scale: int, column: int, reached) -> bool:
        """Whether node (scale, column) is computed: a fixed route's reached nodes, every node with an incoming edge in
        training, nodes some image reaches at inference (from the edges' decisions, already on the host)."""
        if reached is None or self.mode is RouteMode.TRAINING:
            return reached is not None and (self.dense_training or any_in_any_process(reached))
        if not isinstance(reached, torch.Tensor):  # the stem (reached 1) or a fixed route
            if self.mode is RouteMode.INFERENCE and reached:
                self.reached_on_host[(scale, column)] = [True] * self.ledger.macs.shape[0]
            return bool(reached)
        by_row = self.reached_on_host.get((scale, column - 1))
        by_column = self.downsampled_on_host.get((scale - 1, column))
        if by_row is None and by_column is None:  # neither incoming node was computed
            return False
        none = [False] * len(by_row or by_column)
        images = [bool(a or b) for a, b in zip(by_row or none, by_column or none)]
        if not any(images):
            return False
        self.reached_on_host[(scale, column)] = images
        index = None if all(images) else torch.tensor([i for i, r in enumerate(images) if r], device=reached.device)
        self.reached_index[(scale, column)] = index
        return True

    def copy_edge_to_host(self, scale: int, column: int, downsampled: torch.Tensor) -> None:
        """INFERENCE: which images take edge (scale, column) (one host sync per edge; the reach of every node and the
        sub-batch of every edge follow from these)."""
        self.downsampled_on_host[(scale, column)] = (downsampled > 0).tolist()


def any_in_any_process(values) -> bool:
    """Whether any entry of the 0/1 `values` (a tensor, or a Python number) is set, in this process or any other of
    the job (so that every process computes the same modules in `sparse_training`)."""
    if not isinstance(values, torch.Tensor):
        return bool(values)
    flag = values.detach().gt(0).any().to(torch.int32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag)


def node_sum(first, second):
    """`row_part + column_part` of a node (paper Eq. 4), either `None` when no edge of its kind is computed."""
    if first is None or second is None:
        return second if first is None else first
    return first + second


def scale_by_image(values, features: torch.Tensor) -> torch.Tensor:
    """`features` `(batch, tokens, C)` times a per-image 0/1 value (a Python 1 leaves them as they are)."""
    if not isinstance(values, torch.Tensor):
        return features if values == 1 else values * features
    return values.to(features.dtype)[:, None, None] * features
