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
"""DiT's sparse inference path: a transformer stage computing only some tokens of some images.

- `to_map` / `to_tokens`: the token <-> channels-last map views every DiT module uses;
- `TokenSelection`: the tokens a stage computes, as row indices of its flattened map;
- `feed_forward_inference`: PVTv2's MLP on the selected rows, cache-blocked on CPU;
- `block_forward_selected` / `stage_forward_selection`: a block and a stage on a selection (what
  `DiTBlockLayer.forward_selected` and `DiTStage.forward_selected` / `forward_top_tokens` run);
- `run_stage_on_selected_tokens` / `run_on_images`: a stage or a function on the images that need it.

Every function here equals the dense training path (`DiTStage.forward` with a token mask) up to float rounding.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


def to_map(tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`(batch, height * width, C)` tokens as a `(batch, C, height, width)` map in channels-last memory (a view, no
    copy); convolutions keep that layout and `to_tokens` of their output is again a view."""
    height, width = size
    return tokens.view(tokens.shape[0], height, width, tokens.shape[2]).permute(0, 3, 1, 2)


def to_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """`(batch, C, height, width)` map to `(batch, height * width, C)` tokens (a view for a channels-last map)."""
    return feature_map.flatten(2).transpose(1, 2)


# Floats of the intermediate map that one step of `feed_forward_inference` works on, on CPU: small enough to stay in a
# core's cache (2 MiB here), large enough that the per-step overhead of the Python loop stays small. Accelerators take
# the whole map in one step.
FEED_FORWARD_BLOCK_FLOATS = 1 << 19


@dataclass
class FeedForwardBlock:
    """A step of `feed_forward_inference`: the packed rows of `num_images` consecutive images and, for a selection,
    their positions in those images' maps flattened to `(num_images * tokens,)` (`None`: every token, in order)."""

    rows: slice
    num_images: int
    map_index: torch.Tensor | None


@dataclass
class TokenSelection:
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
    def every_token(cls, batch_size: int, num_tokens: int) -> "TokenSelection":
        # while exporting, no per-image Python list: it would pin the batch size of the exported graph
        return cls(batch_size, num_tokens, [] if torch.compiler.is_exporting() else [num_tokens] * batch_size)

    @classmethod
    def from_indices(cls, indices: torch.Tensor, num_tokens: int) -> "TokenSelection":
        """The tokens `indices` `(batch, count)` of every image: the same count per image, so no padding."""
        batch_size, count = indices.shape
        read_index = indices + torch.arange(batch_size, device=indices.device)[:, None] * num_tokens
        counts = [] if torch.compiler.is_exporting() else [count] * batch_size
        return cls(batch_size, num_tokens, counts, read_index, read_index.view(-1))

    @classmethod
    def from_mask(cls, selected: torch.Tensor, counts: list[int]) -> "TokenSelection":
        """The tokens `selected` `(batch, tokens)` (bool), `counts[i]` of them in image `i`."""
        batch_size, num_tokens = selected.shape
        max_selected = max(counts)
        order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :max_selected]
        read_index = order + torch.arange(batch_size, device=order.device)[:, None] * num_tokens
        valid = torch.arange(max_selected, device=order.device)[None, :] < selected.sum(1, keepdim=True)
        padded = sum(counts) < batch_size * max_selected
        packed_from_padded = valid.view(-1).nonzero().squeeze(1) if padded else None
        packed_index = read_index.view(-1) if packed_from_padded is None else read_index[valid]
        return cls(batch_size, num_tokens, counts, read_index, packed_index, packed_from_padded)

    def feed_forward_plan(self, width: int, block_floats: int | None) -> tuple[int, list[FeedForwardBlock]]:
        """`(channels, blocks)`: the MLP's intermediate channels are processed `channels` at a time, for the images of
        one block at a time, so that the block's intermediate map (`num_images * tokens * channels` floats) stays near
        `block_floats` (`None`: everything in one step). Cached: the blocks of a stage share it."""
        if torch.compiler.is_exporting():  # one step over every image: a per-image Python loop would pin the batch
            return width, [FeedForwardBlock(slice(None), self.batch_size, self.packed_index)]
        if (width, block_floats) not in self._plans:
            limit = block_floats or width * self.num_tokens * self.batch_size
            divisors = [d for d in range(1, width + 1) if width % d == 0]
            fitting = [d for d in divisors if d * self.num_tokens <= limit]
            channels = max(fitting) if fitting else divisors[0]
            group = max(1, limit // (self.num_tokens * channels))
            self._plans[width, block_floats] = channels, self._image_blocks(group)
        return self._plans[width, block_floats]

    def _image_blocks(self, group: int) -> list[FeedForwardBlock]:
        """The packed rows of `group` consecutive images at a time."""
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
            blocks.append(FeedForwardBlock(rows, last - first, map_index))
        return blocks


def feed_forward_inference(mlp, normed: torch.Tensor, residual: torch.Tensor, size, selection: TokenSelection):
    """Inference: `residual += mlp(normed)` for the packed rows `(total_selected, C)` of `selection`, tokens outside
    the selection entering the depth-wise conv as zeros. The same result as the MLP's forward, computed a few images
    and a slice of the intermediate channels at a time (the map of the widest tensor, 4-8 times the hidden size, then
    stays in cache), accumulating the output projection in place."""
    weight_1, bias_1, weight_2 = mlp.dense1.weight, mlp.dense1.bias, mlp.dense2.weight
    conv = mlp.dwconv.dwconv
    block_floats = FEED_FORWARD_BLOCK_FLOATS if normed.device.type == "cpu" else None
    channels, blocks = selection.feed_forward_plan(weight_1.shape[0], block_floats)
    residual += mlp.dense2.bias
    if selection.packed_index is not None:  # the zero map the selected tokens are written into
        scratch = normed.new_empty(max(block.num_images for block in blocks) * selection.num_tokens, channels)
    for block in blocks:
        inputs, output = normed[block.rows], residual[block.rows]
        if block.map_index is not None:  # its channel slices write the same rows
            block_map = scratch[: block.num_images * selection.num_tokens].zero_()
        for start in range(0, weight_1.shape[0], channels):
            part = slice(start, start + channels)
            intermediate = torch.addmm(bias_1[part], inputs, weight_1[part].t())
            if block.map_index is not None:
                intermediate = block_map.index_copy_(0, block.map_index, intermediate)
            feature_map = to_map(intermediate.view(block.num_images, -1, channels), size)
            convolved = nn.functional.conv2d(
                feature_map, conv.weight[part], conv.bias[part], conv.stride, conv.padding, conv.dilation, channels
            )
            convolved = to_tokens(convolved).reshape(-1, channels)
            if block.map_index is not None:
                convolved = convolved.index_select(0, block.map_index)
            activated = mlp.intermediate_act_fn(convolved)
            if torch.is_grad_enabled():  # autograd cannot differentiate `out=`
                output += activated @ weight_2[:, part].t()
            else:  # in place without a temporary; unlike `addmm_`, FlopCounterMode counts it
                torch.addmm(output, activated, weight_2[:, part].t(), out=output)
    return residual


def block_forward_selected(block, rows: torch.Tensor, size: tuple[int, int], selection: TokenSelection) -> None:
    """`DiTBlockLayer.forward_selected`: in place on `rows` (the stage's map flattened to `(batch * tokens, hidden)`),
    computes the tokens of `selection`. Keys/values come from the whole map; the query, attention, output projection
    and MLP linears run on the selected tokens only (attention on a batch padded to the most selected tokens of an
    image; the padding's results are discarded), and the depth-wise conv sees the computed tokens in a zero map."""
    hidden_size = rows.shape[1]
    hidden_states = rows.view(selection.batch_size, -1, hidden_size)
    normed = block.layer_norm_1(hidden_states)
    key, value = block.attention.keys_and_values(normed, *size)
    if selection.read_index is None:
        rows += block.attention.attend(normed, key, value).view(-1, hidden_size)
        feed_forward_inference(block.mlp, block.layer_norm_2(rows), rows, size, selection)
        return
    reads = selection.read_index.view(-1)
    queries = normed.view(-1, hidden_size).index_select(0, reads).view(selection.batch_size, -1, hidden_size)
    attended = rows.index_select(0, reads).view_as(queries) + block.attention.attend(queries, key, value)
    selected = attended.view(-1, hidden_size)
    if selection.packed_from_padded is not None:
        selected = selected.index_select(0, selection.packed_from_padded)
    feed_forward_inference(block.mlp, block.layer_norm_2(selected), selected, size, selection)
    rows.index_copy_(0, selection.packed_index, selected)


def stage_forward_selection(stage, hidden_states, height: int, width: int, selection: TokenSelection, selected=None):
    """Runs `stage`'s blocks on the rows of `selection` and its LayerNorm on the computed rows; the other rows keep
    their input values (and are zeros inside the stage with `stage_input="masked_map"`, `selected` their mask)."""
    hidden_size = hidden_states.shape[-1]
    rows = hidden_states.reshape(-1, hidden_size).clone()
    if stage.masked_input and selected is not None:
        rows *= selected.reshape(-1, 1)
    for block in stage.blocks:
        block.forward_selected(rows, (height, width), selection)
    if selection.packed_index is None:
        return stage.layer_norm(rows).view_as(hidden_states)
    normed = stage.layer_norm(rows.index_select(0, selection.packed_index))
    if stage.masked_input:  # skipped rows hold zeros: restore their input values
        rows.copy_(hidden_states.reshape(-1, hidden_size))
    return rows.index_copy_(0, selection.packed_index, normed).view_as(hidden_states)


def run_stage_on_selected_tokens(stage, features: torch.Tensor, selected: torch.Tensor, size: tuple[int, int]):
    """`stage` on the tokens `selected` `(batch, tokens)` of the images that select any (dense when all of an image's
    tokens are selected); the others pass by identity. One host sync."""
    batch_size, num_tokens = selected.shape
    counts = selected.sum(1).tolist()  # the number of computed tokens is data-dependent
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


def run_on_images(function: Callable, inputs: torch.Tensor, index: torch.Tensor | None, batch_size: int):
    """`function(inputs[index])` scattered into zeros of the full batch (`index` None: the whole batch)."""
    if index is None:
        return function(inputs)
    outputs = function(inputs[index])
    return outputs.new_zeros(batch_size, *outputs.shape[1:]).index_copy(0, index, outputs)
