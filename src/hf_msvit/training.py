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
"""Helpers to fine-tune MSViT / DiT with `transformers.Trainer` (used by `examples/run_image_classification.py`).

- `ImageTransform` / `collate_fn`: image transforms without torchvision (PIL + numpy through the image processor).
- `DynamicComputeTrainer`: a `Trainer` that reports what every image cost. In evaluation `compute_metrics` receives
  each image's MACs and token ratio next to its logits; in training the same quantities, averaged over the steps
  between two logs, go into Trainer's logs (`train_fine_region_ratio` / `train_token_keep_ratio`, `train_gmacs`,
  `train_macs_fraction`). With `gate_learning_rate` the gate parameters get their own learning rate.
- `make_compute_metrics`: accuracy plus mean GMACs per image and mean token ratio.
- `freeze_all_but_gates` / `unfreeze_all`: the gate-only phase of the recipe.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from transformers import Trainer

from .distributed import fsdp_modules, full_parameters
from .models.msvit.batch_shaping import gather_across_processes


def ratio_metric_name(model_or_config) -> str:
    """Name of the per-image token ratio a model reports: `fine_region_ratio` (MSViT) or `token_keep_ratio` (DiT);
    a model around a backbone (UperNet) is named by its backbone."""
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "backbone_config", None) or config
    return "fine_region_ratio" if getattr(config, "model_type", None) == "msvit" else "token_keep_ratio"


def static_macs(model) -> float | None:
    """MACs per image of the static backbone the model was upcycled from; None for a model that cannot say."""
    model = getattr(model, "module", model)
    return float(model.static_macs()) if hasattr(model, "static_macs") else None


def _random_resized_crop(image, rng: np.random.Generator, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box sampling with PIL; returns the crop (resizing is left to the processor)."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return image.crop((left, top, left + w, top + h))
    return image


class ImageTransform:
    """Turns a batch of a `datasets.Dataset` (images under `image_column`) into `pixel_values` with the processor.

    The processor converts to RGB, resizes to the model's size, rescales and normalizes, all with PIL/numpy. With
    `augment=True` a random resized crop (scale 0.8-1) comes first; there is no horizontal flip, since flips change
    the meaning of digits and text. Use with `dataset.set_transform(ImageTransform(...))`.
    """

    def __init__(
        self,
        image_processor,
        image_column: str = "image",
        label_column: str = "label",
        augment: bool = False,
        seed: int = 0,
    ):
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.augment = augment
        self.rng = np.random.default_rng(seed)

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = [image.convert("RGB") for image in batch[self.image_column]]
        if self.augment:
            images = [_random_resized_crop(image, self.rng) for image in images]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        out = dict(batch)
        out.pop(self.image_column)
        out["pixel_values"] = list(pixel_values)
        if self.label_column != "labels" and self.label_column in out:
            out["labels"] = out.pop(self.label_column)
        return out


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stacks `pixel_values` and `labels`; other columns (ids, positions) are dropped."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
    return batch


@dataclass
class ComputeSpent:
    """Per image of a batch: `macs` spent and `token_ratio` (MSViT: fraction of coarse regions tokenized fine; DiT:
    fraction of tokens computed over the stages that ran). Both `(batch,)`."""

    macs: torch.Tensor
    token_ratio: torch.Tensor

    @classmethod
    def from_outputs(cls, outputs) -> ComputeSpent | None:
        """Read off an MSViT / DiT output; None for outputs without `macs` (e.g. a static transformers model)."""
        macs = outputs.get("macs")
        if macs is None:
            return None
        fine_region_mask = outputs.get("fine_region_mask")
        if fine_region_mask is not None:
            token_ratio = fine_region_mask.flatten(1).float().mean(1)
        else:
            token_ratio = outputs["token_keep_ratio"]
        return cls(macs=macs.detach().float(), token_ratio=token_ratio.detach().float())

    def per_image(self) -> torch.Tensor:
        """`(batch, 2)`: column 0 the MACs, column 1 the token ratio."""
        return torch.stack([self.macs, self.token_ratio], dim=1)


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of `predictions` equal to `references` (NaN for no references)."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    return float((predictions == references).mean()) if references.size else float("nan")


def compute_metrics_from(
    logits, labels, per_image: np.ndarray | None, ratio_name: str, static_macs_per_image: float | None
) -> dict[str, float]:
    """`accuracy`, plus `gmacs`, `<ratio_name>`, `static_gmacs` and `macs_fraction` given `(images, 2)` MACs/ratios."""
    metrics = {"accuracy": accuracy(np.asarray(logits).argmax(-1), labels)}
    if per_image is not None:
        per_image = np.asarray(per_image, dtype=np.float64)
        metrics["gmacs"] = float(per_image[:, 0].mean() / 1e9)
        metrics[ratio_name] = float(per_image[:, 1].mean())
    if static_macs_per_image:
        metrics["static_gmacs"] = float(static_macs_per_image / 1e9)
        if "gmacs" in metrics:
            metrics["macs_fraction"] = metrics["gmacs"] / metrics["static_gmacs"]
    return metrics


def make_compute_metrics(ratio_name: str = "fine_region_ratio", static_macs_per_image: float | None = None):
    """`compute_metrics` for `Trainer`: `accuracy`, `gmacs` (mean GMACs per image), `<ratio_name>` (mean token ratio),
    and, given the static backbone's MACs, `static_gmacs` and `macs_fraction` (gmacs / static_gmacs).

    Works with `DynamicComputeTrainer` predictions `(logits, per_image)` and with plain logits (accuracy only).
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, per_image = eval_pred.predictions, None
        if isinstance(predictions, (tuple, list)):
            predictions, per_image = predictions
        return compute_metrics_from(predictions, eval_pred.label_ids, per_image, ratio_name, static_macs_per_image)

    return compute_metrics


@dataclass
class Distillation:
    """Soft-label distillation from a frozen `teacher`: `weight * temperature**2 * KL(teacher || student)` over the
    class distributions at `temperature` (Hinton et al.; DeiT's soft distillation adds it to the task loss the same
    way). The teacher sees the student's `pixel_values`; it runs without gradients and never trains."""

    teacher: torch.nn.Module
    weight: float = 1.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.weight <= 0 or self.temperature <= 0:
            raise ValueError(
                f"Distillation needs a positive weight and temperature, got {self.weight} and {self.temperature} "
                "(leave distillation out to train without a teacher)."
            )
        self.teacher.eval().requires_grad_(False)

    def to(self, device) -> Distillation:
        self.teacher.to(device)
        return self

    def loss(self, logits: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 2:
            raise ValueError(
                f"Distillation compares one class distribution per image, (batch, classes) logits; got shape "
                f"{tuple(logits.shape)}. Per-pixel (segmentation) logits are not supported: train without it."
            )
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=pixel_values).logits
        t = self.temperature
        student, teacher = (torch.log_softmax(x.float() / t, dim=-1) for x in (logits, teacher_logits))
        kl = torch.nn.functional.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return self.weight * t * t * kl


class DynamicComputeTrainer(Trainer):
    """`Trainer` that reports what each image cost, and optionally trains the gates at their own learning rate.

    - Evaluation: the predictions handed to `compute_metrics` are `(logits, per_image)` with `per_image[:, 0]` the
      MACs and `per_image[:, 1]` the token ratio of every image (`ComputeSpent`), gathered across processes like the
      logits. Use `make_compute_metrics`.
    - Training: the MACs and token ratio of the training forward passes (sampled gates) are averaged over the steps
      between two logs and logged as `train_<ratio>`, `train_gmacs` and `train_macs_fraction`, with MSViT's
      `train_gate_loss` (the model's `gate_loss`, before `gbas_loss_weight`). The metrics returned by `train()` carry
      the values of the last logging window.
    - `gate_learning_rate`: the gate parameters (`gate_parameter_names`) form their own optimizer groups with this
      learning rate (same schedule and weight decay as the rest).
    - Label smoothing (`label_smoothing_factor`) or `compute_loss_func`: the Trainer computes the task loss itself,
      and the model's `routing_loss` (MSViT's weighted gate loss, DiT's budget loss) is added to it.
    - FSDP2: evaluation forwards run under `hf_msvit.distributed.full_parameters`, so processes whose images take
      different routes still run the same collectives.
    - `distillation` (a `Distillation`): in training, the KL divergence from a frozen teacher's predictions (e.g. the
      static model the dynamic one was upcycled from) is added to the loss, as DynamicViT distils from its backbone.
    """

    def __init__(self, *args, gate_learning_rate: float | None = None, distillation: Distillation | None = None,
                 **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.gate_learning_rate = gate_learning_rate
        self.distillation = distillation.to(self.args.device) if distillation is not None else None
        self._static_macs = static_macs(self.model)
        self._ratio_name = ratio_metric_name(self.model)
        self._train_sums = None  # MACs, ratio and images of the current logging window
        self._last_train_compute: dict[str, float] = {}

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not fsdp_modules(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        with full_parameters(model):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # With label smoothing (or `compute_loss_func`) the Trainer takes the labels and computes the task loss itself,
        # so the model folds no routing loss into it: add it here, or the gates lose their level and budget terms.
        own_task_loss = (self.label_smoother is not None or self.compute_loss_func is not None) and "labels" in inputs
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        routing_loss = getattr(self.model, "routing_loss", None)
        routing = routing_loss(outputs) if own_task_loss and routing_loss is not None else None
        if routing is not None:
            loss = loss + routing
        if self.distillation is not None and model.training:
            loss = loss + self.distillation.loss(outputs["logits"], inputs["pixel_values"])
        spent = ComputeSpent.from_outputs(outputs)
        if spent is not None and model.training:
            self._add_to_train_window(spent, outputs.get("gate_loss"))
        elif spent is not None and return_outputs:  # evaluation: what `compute_metrics` gets besides the logits
            outputs = {"loss": loss, "logits": outputs["logits"], "per_image_compute": spent.per_image()}
        return (loss, outputs) if return_outputs else loss

    def _add_to_train_window(self, spent: ComputeSpent, gate_loss: torch.Tensor | None) -> None:
        images = spent.macs.new_tensor(len(spent.macs))
        # the gate loss per forward (NaN when the gate did not run, e.g. a DiT): a gate that saturates shows here first
        gate_loss = images.new_tensor(float("nan")) if gate_loss is None else gate_loss.detach().float()
        sums = torch.stack([spent.macs.sum(), spent.token_ratio.sum(), images, gate_loss, images.new_tensor(1.0)])
        sums = sums.to(torch.float64)
        self._train_sums = sums if self._train_sums is None else self._train_sums + sums

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_runtime" in logs:  # a training log (evaluation logs hold `eval_*` keys)
            logs.update(self._train_compute_metrics())
        super().log(logs, start_time)

    def _train_compute_metrics(self) -> dict[str, float]:
        """Means over the logging window, summed over all processes (every rank logs, so this collective is safe)."""
        if self._train_sums is None:
            return dict(self._last_train_compute)
        macs, ratio, images, gate_loss, forwards = self.accelerator.reduce(
            self._train_sums.to(self.args.device), "sum"
        ).tolist()
        self._train_sums = None
        metrics = {f"train_{self._ratio_name}": ratio / images, "train_gmacs": macs / images / 1e9}
        if not math.isnan(gate_loss):
            metrics["train_gate_loss"] = gate_loss / forwards
        if self._static_macs:
            metrics["train_macs_fraction"] = metrics["train_gmacs"] / (self._static_macs / 1e9)
        self._last_train_compute = metrics
        return dict(metrics)

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.gate_learning_rate is None:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        model = self.model if model is None else model
        gate_ids = {id(p) for name, p in model.named_parameters() if is_gate_parameter(name)}
        for group in list(optimizer.param_groups):
            gates = [p for p in group["params"] if id(p) in gate_ids]
            if gates:
                group["params"] = [p for p in group["params"] if id(p) not in gate_ids]
                optimizer.add_param_group({**group, "params": gates, "lr": self.gate_learning_rate})
        return optimizer


# Parameters that decide the tokenization / routing: MSViT `msvit.embeddings.gate.*` and `msvit.batch_shaping.*`
# (learned GBaS priors); DiT `dit.row_gates.*` and `dit.column_gates.*`.
GATE_PARAMETER_PATTERN = re.compile(r"(^|\.)(gate|\w+_gates|batch_shaping)\.")


def is_gate_parameter(name: str) -> bool:
    """Whether the parameter (or state-dict entry) `name` belongs to a gate / router or the GBaS priors."""
    return GATE_PARAMETER_PATTERN.search(name) is not None


def gate_parameter_names(model) -> list[str]:
    """Names of the gate / router parameters of an MSViT or DiT model."""
    return [name for name, _ in model.named_parameters() if is_gate_parameter(name)]


def freeze_all_but_gates(model) -> list[str]:
    """Freezes the backbone (and head): only the gates and GBaS priors train. Returns the trainable names.

    Raises `ValueError` if the model has no gate parameters (a static model would not train at all).
    """
    names = set(gate_parameter_names(model))
    if not names:
        raise ValueError(f"{type(model).__name__} has no gate parameters to train in a gate-only phase.")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)
    return sorted(names)


def unfreeze_all(model) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def set_frozen_gate_level(model, batches, max_batches: int = 100) -> float:
    """Puts the level of an MSViT gate that is about to be frozen at its target: shifts the gate's output bias so that
    a `gbas_target_ratio` fraction of the regions of `batches` (dicts with `pixel_values`, e.g. the training
    dataloader; the first `max_batches`, gathered across processes) scores `p >= gate_threshold`. Returns the logit
    shift subtracted.

    A frozen gate keeps the level its gate-only phase left (the level term no longer moves it); shifted once here, the
    joint phase trains on the decisions inference will take, with no calibration offset needed at inference."""
    embeddings, config = model.base_model.embeddings, model.config
    with full_parameters(model), torch.no_grad():
        logits = [embeddings.gate_logits(batch["pixel_values"].to(model.device)).flatten()
                  for batch in itertools.islice(batches, max_batches)]  # fmt: skip
        logits = gather_across_processes(torch.cat(logits).float())
        threshold = torch.logit(torch.tensor(float(config.gate_threshold)), eps=1e-6)
        shift = torch.quantile(logits, 1.0 - config.gbas_target_ratio) - threshold.to(logits.device)
        embeddings.gate.logit_bias.data.sub_(shift.to(embeddings.gate.logit_bias.dtype))
    return float(shift)


__all__ = [
    "ComputeSpent",
    "DynamicComputeTrainer",
    "GATE_PARAMETER_PATTERN",
    "ImageTransform",
    "accuracy",
    "collate_fn",
    "compute_metrics_from",
    "freeze_all_but_gates",
    "gate_parameter_names",
    "is_gate_parameter",
    "make_compute_metrics",
    "set_frozen_gate_level",
    "ratio_metric_name",
    "static_macs",
    "unfreeze_all",
]
