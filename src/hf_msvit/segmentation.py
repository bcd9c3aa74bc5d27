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
"""Semantic segmentation with MSViT and DiT (used by `examples/run_semantic_segmentation.py`).

- `DynamicUperNetForSemanticSegmentation`: transformers' `UperNetForSemanticSegmentation` whose `loss` also holds the
  dynamic backbone's auxiliary loss (DiT's budget loss, MSViT's GBaS loss), and whose output says what each image cost.
  transformers' UperNet drops everything but the backbone's feature maps, so without it the gates would train on the
  pixel loss alone and drift away from their compute target.
- `SegmentationTransform` / `SegmentationCollator`: image + label map -> `pixel_values` + `labels` (no torchvision).
- `SegmentationTrainer` / `SegmentationMetrics`: evaluation image by image into a confusion matrix (mean IoU, per-class
  accuracy, computed here: no metric download), plus mean GMACs per image and the token ratio.

Model cards come from `hf_msvit.hub.build_model_card` (the `segmentation.md` template), as the classifiers' do.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import UperNetConfig, UperNetForSemanticSegmentation
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.utils.generic import can_return_tuple

from .training import ComputeSpent, DynamicComputeTrainer


# Backbone output field -> backbone config field holding its weight in the training loss.
AUXILIARY_LOSS_WEIGHTS = {"gate_loss": "gbas_loss_weight", "budget_loss": "budget_loss_weight"}


@dataclass
class DynamicSegmenterOutput(SemanticSegmenterOutput):
    """`SemanticSegmenterOutput` plus what the dynamic backbone decided and spent.

    `loss` holds the pixel loss(es) of UperNet plus the backbone's weighted auxiliary loss; `gate_loss` (MSViT) and
    `budget_loss` (DiT) are that auxiliary loss unweighted. `macs` `(batch,)`: the backbone's MACs per image plus those
    of UperNet's decode head (convolutions, counted from their output shapes; the auxiliary head, a training device,
    and the bilinear upsampling are not counted); `backbone_macs` the backbone's alone. `fine_region_mask` (MSViT) or
    `token_keep_ratio` (DiT) as the backbone returned them.
    """

    gate_loss: torch.FloatTensor | None = None
    budget_loss: torch.FloatTensor | None = None
    macs: torch.FloatTensor | None = None
    backbone_macs: torch.FloatTensor | None = None
    fine_region_mask: torch.BoolTensor | None = None
    token_keep_ratio: torch.FloatTensor | None = None


def backbone_auxiliary_loss(backbone_outputs, backbone_config) -> torch.Tensor | None:
    """The backbone's auxiliary losses (`AUXILIARY_LOSS_WEIGHTS`), each times its config weight; None if none."""
    terms = [
        getattr(backbone_config, weight_name) * backbone_outputs[name]
        for name, weight_name in AUXILIARY_LOSS_WEIGHTS.items()
        if backbone_outputs.get(name) is not None
    ]
    return sum(terms) if terms else None


def conv_macs_per_image(module: nn.Conv2d, output: torch.Tensor) -> int:
    """Multiply-accumulates of one image through `module`, from its output shape."""
    kernel_h, kernel_w = module.kernel_size
    return output[0].numel() * (module.in_channels // module.groups) * kernel_h * kernel_w


@dataclass
class _ForwardRecord:
    backbone_outputs: object = None
    head_macs: int = 0


@contextlib.contextmanager
def _record_backbone_and_head(model: UperNetForSemanticSegmentation):
    """Within the block, keeps the backbone's output and sums the decode head's convolution MACs (forward hooks)."""
    record = _ForwardRecord()

    def keep_backbone_output(module, args, output):
        record.backbone_outputs = output

    def add_conv_macs(module, args, output):
        record.head_macs += conv_macs_per_image(module, output)

    handles = [model.backbone.register_forward_hook(keep_backbone_output)]
    convolutions = [module for module in model.decode_head.modules() if isinstance(module, nn.Conv2d)]
    handles += [module.register_forward_hook(add_conv_macs) for module in convolutions]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


class DynamicUperNetForSemanticSegmentation(UperNetForSemanticSegmentation):
    """transformers' UperNet (same modules and weights: checkpoints load in either class) on an MSViT or DiT backbone,
    with the backbone's auxiliary loss folded into `loss` and the per-image compute in the output
    (`DynamicSegmenterOutput`). Use it for training; for inference plain `UperNetForSemanticSegmentation` computes the
    same logits."""

    # The auxiliary losses are per-batch means: let Trainer divide the loss by the gradient-accumulation steps.
    accepts_loss_kwargs = False

    @can_return_tuple
    def forward(self, pixel_values=None, labels=None, **kwargs) -> DynamicSegmenterOutput:
        with _record_backbone_and_head(self) as record:
            outputs = super().forward(pixel_values, labels=labels, return_dict=True, **kwargs)
        backbone_outputs = record.backbone_outputs
        loss = outputs.loss
        auxiliary = backbone_auxiliary_loss(backbone_outputs, self.config.backbone_config)
        if loss is not None and auxiliary is not None:
            loss = loss + auxiliary
        backbone_macs = backbone_outputs.get("macs")
        return DynamicSegmenterOutput(
            loss=loss,
            logits=outputs.logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            gate_loss=backbone_outputs.get("gate_loss"),
            budget_loss=backbone_outputs.get("budget_loss"),
            macs=None if backbone_macs is None else backbone_macs + record.head_macs,
            backbone_macs=backbone_macs,
            fine_region_mask=backbone_outputs.get("fine_region_mask"),
            token_keep_ratio=backbone_outputs.get("token_keep_ratio"),
        )

    @classmethod
    def from_backbone(cls, backbone, heads_from: UperNetForSemanticSegmentation | None = None, **config_kwargs):
        """UperNet around an already built backbone, e.g. one upcycled with `DiTBackbone.from_pvt_v2_pretrained` or
        `MSViTBackbone.from_vit_pretrained`. The decode heads are new, or copied from `heads_from` (a UperNet with the
        same head shapes: the static model the backbone was upcycled from). `config_kwargs` set `UperNetConfig`
        fields (`num_labels`, `hidden_size`, ...)."""
        config = copy.deepcopy(heads_from.config) if heads_from is not None else UperNetConfig()
        config.backbone_config = backbone.config
        for name, value in config_kwargs.items():
            setattr(config, name, value)
        model = cls(config)
        model.backbone.load_state_dict(backbone.state_dict())
        if heads_from is not None:
            model.decode_head.load_state_dict(heads_from.decode_head.state_dict())
            if model.auxiliary_head is not None and heads_from.auxiliary_head is not None:
                model.auxiliary_head.load_state_dict(heads_from.auxiliary_head.state_dict())
        return model.to(next(backbone.parameters()).dtype)


# --------------------------------------------------------------------------------------------------------------------
# Data


class SegmentationTransform:
    """Turns a batch of a `datasets.Dataset` (images under `image_column`, label maps under `label_column`) into
    `pixel_values` and `labels` with the model's image processor: images to RGB, resized and normalized; label maps
    resized with nearest-neighbour sampling and kept as integers (reduced by one with `do_reduce_labels`). No
    augmentation: flips would change the meaning of digits. Use with `dataset.with_transform(...)`."""

    def __init__(self, image_processor, image_column="image", label_column="label", do_reduce_labels=None):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.kwargs = {} if do_reduce_labels is None else {"do_reduce_labels": do_reduce_labels}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [image.convert("RGB") for image in batch[self.image_column]]
        maps = [np.asarray(label_map) for label_map in batch[self.label_column]]  # class ids, also from palette images
        processed = self.image_processor(images, segmentation_maps=maps, return_tensors="pt", **self.kwargs)
        return {"pixel_values": list(processed["pixel_values"]), "labels": list(processed["labels"])}


@dataclass
class SegmentationCollator:
    """Stacks `pixel_values` and `labels`. With `all_fine_grid` (an MSViT's `config.coarse_grid`) every batch also
    carries an all-True `fine_region_mask`: the MSViT then computes exactly the static ViT it was upcycled from, which
    is how the example trains and evaluates the static ViT with the same decoder."""

    all_fine_grid: tuple[int, int] | None = None

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = {
            "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
            "labels": torch.stack([torch.as_tensor(example["labels"]) for example in examples]).long(),
        }
        if self.all_fine_grid is not None:
            batch["fine_region_mask"] = torch.ones(len(examples), *self.all_fine_grid, dtype=torch.bool)
        return batch


# --------------------------------------------------------------------------------------------------------------------
# Evaluation


class SegmentationTrainer(DynamicComputeTrainer):
    """`DynamicComputeTrainer` (training-time compute in the logs, the gates' own learning rate) whose predictions
    are `(class map (batch, height, width), stats (batch, 2))`, with `stats` the MACs and the token ratio of each image
    (`hf_msvit.training.ComputeSpent`): the argmax is taken at once, so evaluation never holds the logits of the whole
    set."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        loss = outputs.get("loss")
        loss = None if loss is None else loss.detach().mean()
        if prediction_loss_only:
            return loss, None, None
        spent = ComputeSpent.from_outputs(outputs)
        if spent is None:  # a static transformers model: it does not report its compute
            stats = torch.full((outputs["logits"].shape[0], 2), float("nan"), device=outputs["logits"].device)
        else:
            stats = spent.per_image()
        return loss, (outputs["logits"].argmax(1), stats.detach()), labels


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_labels: int, ignore_index: int):
    """`(num_labels, num_labels)` counts, rows the true class, columns the predicted one; `ignore_index` pixels left
    out (as are labels outside `[0, num_labels)`)."""
    labels, predicted = labels.reshape(-1).long(), predicted.reshape(-1).long()
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_labels)
    index = labels[valid] * num_labels + predicted[valid].clamp(0, num_labels - 1)
    return torch.bincount(index, minlength=num_labels**2).reshape(num_labels, num_labels)


def segmentation_scores(confusion: np.ndarray, id2label: dict[int, str] | None = None) -> dict[str, float]:
    """The metrics of `evaluate`'s `mean_iou` from a confusion matrix: `mean_iou`, `mean_accuracy` (mean per-class
    accuracy), `overall_accuracy`, and `iou_<label>` / `accuracy_<label>` per class (NaN for a class absent from both
    the labels and the predictions; the means skip NaNs)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    label_area, predicted_area = confusion.sum(1), confusion.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / (label_area + predicted_area - intersection)
        accuracy = intersection / label_area
    scores = {
        "mean_iou": float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan"),
        "mean_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else float("nan"),
        "overall_accuracy": float(intersection.sum() / max(confusion.sum(), 1.0)),
    }
    names = id2label or {index: str(index) for index in range(len(iou))}
    scores.update({f"iou_{names[index]}": float(value) for index, value in enumerate(iou)})
    scores.update({f"accuracy_{names[index]}": float(value) for index, value in enumerate(accuracy)})
    return scores


class SegmentationMetrics:
    """`compute_metrics` for `SegmentationTrainer`: mean IoU, per-class accuracy (`segmentation_scores`), mean GMACs
    per image (`gmacs`) and mean token ratio (`ratio_name`: `fine_region_ratio` for MSViT, `token_keep_ratio` for DiT).

    Accumulates a confusion matrix, so it works with `batch_eval_metrics=True` (called per batch, memory independent
    of the evaluation set) as well as with one call on the whole set.
    """

    def __init__(self, id2label: dict[int, str], ignore_index: int = 255, ratio_name: str = "fine_region_ratio"):
        self.id2label = {int(key): value for key, value in id2label.items()}
        self.ignore_index = ignore_index
        self.ratio_name = ratio_name
        self._reset()

    def _reset(self):
        self.confusion = torch.zeros(len(self.id2label), len(self.id2label), dtype=torch.long)
        self.stats = []

    def __call__(self, eval_pred, compute_result: bool = True) -> dict[str, float]:
        predicted, stats = eval_pred.predictions
        predicted, labels = torch.as_tensor(predicted).cpu(), torch.as_tensor(eval_pred.label_ids).cpu()
        self.confusion += confusion_matrix(predicted, labels, len(self.id2label), self.ignore_index)
        self.stats.append(torch.as_tensor(stats, dtype=torch.float64).cpu().reshape(-1, 2))
        if not compute_result:
            return {}
        stats = torch.cat(self.stats).numpy()
        metrics = segmentation_scores(self.confusion.numpy(), self.id2label)
        if not np.isnan(stats[:, 0]).all():
            metrics["gmacs"] = float(np.nanmean(stats[:, 0]) / 1e9)
        if not np.isnan(stats[:, 1]).all():
            metrics[self.ratio_name] = float(np.nanmean(stats[:, 1]))
        self._reset()
        return metrics


__all__ = [
    "AUXILIARY_LOSS_WEIGHTS",
    "DynamicSegmenterOutput",
    "DynamicUperNetForSemanticSegmentation",
    "SegmentationCollator",
    "SegmentationMetrics",
    "SegmentationTrainer",
    "SegmentationTransform",
    "backbone_auxiliary_loss",
    "confusion_matrix",
    "conv_macs_per_image",
    "segmentation_scores",
]
