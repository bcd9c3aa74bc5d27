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
- `DynamicComputeTrainer`: a `Trainer` whose evaluation also collects, per image, the MACs spent and the token
  ratio (MSViT: fraction of coarse regions tokenized fine; DiT: token keep ratio), next to the logits.
- `make_compute_metrics`: accuracy (an `evaluate` metric shipped here, so it never needs the Hub) plus mean GMACs
  per image and mean token ratio.
- `freeze_all_but_gates` / `unfreeze_all`: the gate-only phase of the MSViT recipe.
- `prepare_for_remote_code`: make `save_pretrained` folders loadable with `trust_remote_code=True`.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
from transformers import Trainer
from transformers.trainer_pt_utils import nested_detach


# --------------------------------------------------------------------------------------------------------------------
# Model families


def model_family(model_or_config) -> str:
    """`"msvit"` or `"dit_routing"` (or another model_type) for a model or config."""
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", "")


def ratio_metric_name(model_or_config) -> str:
    """Name of the per-image token ratio this model reports: `fine_region_ratio` (MSViT) or `token_keep_ratio`."""
    return "fine_region_ratio" if model_family(model_or_config) == "msvit" else "token_keep_ratio"


def get_model_classes(model_type: str) -> dict[str, Any]:
    """Classes of one of our model types: `config`, `base`, `classification`, `image_processor`."""
    import hf_msvit

    prefixes = {"msvit": "MSViT", "dit_routing": "DiT"}
    if model_type not in prefixes:
        raise ValueError(f"model_type must be one of {sorted(prefixes)}, got {model_type!r}.")
    prefix = prefixes[model_type]
    names = {
        "config": f"{prefix}Config",
        "base": f"{prefix}Model",
        "classification": f"{prefix}ForImageClassification",
        "image_processor": f"{prefix}ImageProcessor",
    }
    return {key: getattr(hf_msvit, name) for key, name in names.items()}


def static_macs(model) -> float | None:
    """MACs per image of the static backbone the model was upcycled from (None if the model cannot say)."""
    model = getattr(model, "module", model)
    fn = getattr(model, "static_macs", None)
    if fn is None:
        return None
    try:
        return float(fn())
    except TypeError:  # pragma: no cover - signature differs
        return None


# --------------------------------------------------------------------------------------------------------------------
# Transforms (no torchvision)


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
    """Turns a batch of a `datasets.Dataset` (images under `image_column`) into `pixel_values` with the image processor.

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


# --------------------------------------------------------------------------------------------------------------------
# Metrics


def dynamic_compute_stats(outputs) -> torch.Tensor | None:
    """`(batch, 2)`: per image, the MACs spent and the token ratio (MSViT fine-region ratio / DiT token keep ratio).

    None if the outputs carry neither.
    """
    macs = outputs.get("macs") if hasattr(outputs, "get") else None
    ratio_source = None
    for key in ("fine_region_mask", "token_keep_ratio"):
        value = outputs.get(key) if hasattr(outputs, "get") else None
        if value is not None:
            ratio_source = value
            break
    if macs is None and ratio_source is None:
        return None
    logits = outputs["logits"]
    batch = logits.shape[0]
    nan = torch.full((batch,), float("nan"), device=logits.device)
    macs = macs.float().reshape(batch) if macs is not None else nan
    ratio = ratio_source.float().reshape(batch, -1).mean(1) if ratio_source is not None else nan
    return torch.stack([macs, ratio], dim=1)


class DynamicComputeTrainer(Trainer):
    """`Trainer` whose predictions are `(logits, stats)` with `stats[:, 0]` = MACs and `stats[:, 1]` = token ratio per
    image, so that `compute_metrics` sees what each image cost. Everything else (training, logging, checkpoints,
    distributed gathering) is the stock `Trainer`.
    """

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        has_labels = bool(self.label_names) and all(inputs.get(k) is not None for k in self.label_names)
        inputs = self._prepare_inputs(inputs)
        labels = None
        if has_labels:
            labels = nested_detach(tuple(inputs.get(name) for name in self.label_names))
            labels = labels[0] if len(labels) == 1 else labels
        with torch.no_grad():
            with self.compute_loss_context_manager():
                if has_labels:
                    loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
                    loss = loss.detach().mean()
                else:
                    loss, outputs = None, model(**inputs)
        if prediction_loss_only:
            return loss, None, None
        logits = outputs["logits"].detach()
        stats = dynamic_compute_stats(outputs)
        predictions = logits if stats is None else (logits, stats.detach())
        return loss, predictions, labels


def _make_accuracy_metric():
    """Accuracy as an `evaluate.Metric` defined here (`evaluate.load("accuracy")` would fetch a script from the Hub)."""
    try:
        import datasets
        import evaluate
    except ImportError:  # pragma: no cover
        return None

    class Accuracy(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="Fraction of predictions equal to the references.",
                citation="",
                inputs_description="predictions, references: lists of integer class ids",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            predictions, references = np.asarray(predictions), np.asarray(references)
            return {"accuracy": float((predictions == references).mean()) if len(references) else float("nan")}

    try:
        return Accuracy(keep_in_memory=True)
    except Exception:  # pragma: no cover - any evaluate-internal problem: fall back to numpy
        return None


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Accuracy through `evaluate` (offline, shipped here), with a numpy fallback."""
    metric = _make_accuracy_metric()
    if metric is not None:
        try:
            return float(metric.compute(predictions=predictions.tolist(), references=references.tolist())["accuracy"])
        except Exception:  # pragma: no cover
            pass
    return float((np.asarray(predictions) == np.asarray(references)).mean())


def make_compute_metrics(ratio_name: str = "fine_region_ratio", static_macs_per_image: float | None = None):
    """`compute_metrics` for `Trainer`: `accuracy`, `gmacs` (mean GMACs per image), `<ratio_name>` (mean token ratio),
    and, given the static backbone's MACs, `static_gmacs` and `macs_fraction` (gmacs / static_gmacs).

    Works with `DynamicComputeTrainer` predictions `(logits, stats)` and with plain logits (accuracy only).
    """

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, labels = eval_pred.predictions, eval_pred.label_ids
        stats = None
        if isinstance(predictions, (tuple, list)):
            predictions, stats = predictions[0], (predictions[1] if len(predictions) > 1 else None)
        predictions = np.asarray(predictions)
        labels = np.asarray(labels)
        metrics = {"accuracy": accuracy(predictions.argmax(-1), labels)}
        if stats is not None:
            stats = np.asarray(stats, dtype=np.float64)
            metrics["gmacs"] = float(np.nanmean(stats[:, 0]) / 1e9)
            metrics[ratio_name] = float(np.nanmean(stats[:, 1]))
        if static_macs_per_image:
            metrics["static_gmacs"] = float(static_macs_per_image / 1e9)
            if "gmacs" in metrics:
                metrics["macs_fraction"] = metrics["gmacs"] / metrics["static_gmacs"]
        return metrics

    return compute_metrics


# --------------------------------------------------------------------------------------------------------------------
# Gate-only phase

# Parameters that decide the tokenization / routing: MSViT `msvit.embeddings.gate.*` and `msvit.batch_shaping.*`
# (learned GBaS priors); DiT `dit.row_gates.*` and `dit.column_gates.*`.
GATE_PARAMETER_PATTERN = re.compile(r"(^|\.)(gate|\w+_gates|batch_shaping)\.")


def gate_parameter_names(model) -> list[str]:
    """Names of the gate / router parameters of an MSViT or DiT model."""
    return [name for name, _ in model.named_parameters() if GATE_PARAMETER_PATTERN.search(name)]


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


# --------------------------------------------------------------------------------------------------------------------
# Saving for users without hf_msvit


def prepare_for_remote_code(model, image_processor=None) -> None:
    """Registers the model's classes for `auto_map`, so `save_pretrained` copies the modeling files and writes
    `auto_map` (AutoConfig, AutoModel, AutoModelForImageClassification; AutoImageProcessor in the processor config).
    Folders saved afterwards load with `trust_remote_code=True` without this package installed.
    """
    model = getattr(model, "module", model)
    config = model.config
    config.__class__.register_for_auto_class()
    model.__class__.register_for_auto_class("AutoModelForImageClassification")
    base_class = None
    try:
        base_class = get_model_classes(config.model_type)["base"]
    except ValueError:
        pass
    if base_class is not None:
        base_class.register_for_auto_class("AutoModel")
        module_name = base_class.__module__.rsplit(".", 1)[-1]
        auto_map = dict(getattr(config, "auto_map", None) or {})
        auto_map["AutoModel"] = f"{module_name}.{base_class.__name__}"
        config.auto_map = auto_map
    if image_processor is not None:
        image_processor.__class__.register_for_auto_class("AutoImageProcessor")


__all__ = [
    "DynamicComputeTrainer",
    "ImageTransform",
    "accuracy",
    "collate_fn",
    "dynamic_compute_stats",
    "freeze_all_but_gates",
    "gate_parameter_names",
    "get_model_classes",
    "make_compute_metrics",
    "model_family",
    "prepare_for_remote_code",
    "ratio_metric_name",
    "static_macs",
    "unfreeze_all",
]
