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
"""Sharing a trained MSViT / DiT on the Hugging Face Hub, with a generated model card.

    from hf_msvit.hub import push_to_hub
    url = push_to_hub(model, "me/msvit-digits", image_processor=processor, eval_metrics=trainer.evaluate())

What is uploaded (one commit): `model.safetensors`, `config.json` (with `auto_map` for AutoConfig, AutoModel and
AutoModelForImageClassification), the remote-code files (`configuration_*.py`, `modeling_*.py`, their siblings,
`image_processing_*.py`), `preprocessor_config.json`, and `README.md`, a model card rendered from the templates in
`hf_msvit/model_cards/` (`model_cards/` at the repository root) with YAML metadata and a `model-index`.

`save_for_hub` writes the same folder locally without uploading.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import resources

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .training import prepare_for_remote_code, ratio_metric_name, static_macs


TEMPLATE_DIR = "model_cards"  # inside the hf_msvit package; `model_cards/` at the repo root links here
TRANSFORMERS_MIN = "5.23"


class HubPushError(RuntimeError):
    """Raised by `push_to_hub` when a step fails; `step` names it (`save`, `create_repo` or `upload`)."""

    def __init__(self, step: str, repo_id: str, cause: BaseException):
        self.step = step
        self.repo_id = repo_id
        self.cause = cause
        super().__init__(
            f"Pushing to the Hub repo {repo_id!r} failed at step {step!r}: {type(cause).__name__}: {cause}"
        )


def read_template(model_type: str) -> str:
    """The model card template of `model_type` (`msvit` or `dit_routing`), shipped as package data."""
    name = f"{model_type}.md"
    try:
        return resources.files("hf_msvit").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise ValueError(f"No model card template {name!r} in hf_msvit/model_cards/.") from error


def render_template(template: str, values: dict) -> str:
    """Replaces `{{ name }}` placeholders; raises `KeyError` naming any placeholder without a value."""

    def substitute(match):
        key = match.group(1)
        if key not in values:
            raise KeyError(f"model card template placeholder {{{{ {key} }}}} has no value")
        return str(values[key])

    return re.sub(r"\{\{\s*(\w+)\s*\}\}", substitute, template)


def _fmt(value, digits=4):
    if isinstance(value, float):
        return (
            f"{value:.{digits}g}"
            if abs(value) < 1e-3 or abs(value) >= 1e4
            else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        )
    return str(value)


def _metric(eval_metrics: dict, name: str):
    for key in (name, f"eval_{name}"):
        if key in (eval_metrics or {}):
            return eval_metrics[key]
    return None


def build_model_card(
    model,
    repo_id: str | None = None,
    eval_metrics: dict | None = None,
    training_args=None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    extra_settings: dict | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A `ModelCard` for a trained MSViT / DiT classifier.

    Metadata: `library_name: transformers`, `pipeline_tag: image-classification`, tags, `datasets`, `metrics`,
    `base_model` (when known) and a `model-index` with the accuracy (when `eval_metrics` has one). Body: usage code,
    the MACs / token figures from `eval_metrics` (as returned by `Trainer.evaluate` with
    `hf_msvit.training.make_compute_metrics`), the training settings and the limits of the model.
    """
    model = getattr(model, "module", model)
    if dataset_name and os.path.exists(dataset_name):  # a local folder is no Hub dataset id: keep it out of metadata
        dataset_name = None
    config = model.config
    model_type = config.model_type
    repo_id = repo_id or f"{model_type}-model"
    model_name = repo_id.split("/")[-1]
    eval_metrics = dict(eval_metrics or {})
    ratio_name = ratio_metric_name(model)
    accuracy = _metric(eval_metrics, "accuracy")
    gmacs = _metric(eval_metrics, "gmacs")
    ratio = _metric(eval_metrics, ratio_name)
    static = static_macs(model)
    dataset_label = dataset_name or "custom image folder"

    rows = ["| metric | value |", "|---|---|"]
    if accuracy is not None:
        rows.append(f"| accuracy ({dataset_label}, eval split) | {_fmt(float(accuracy))} |")
    if gmacs is not None:
        rows.append(f"| mean GMACs per image | {_fmt(float(gmacs))} |")
    if static is not None:
        rows.append(f"| static backbone GMACs per image | {_fmt(static / 1e9)} |")
        if gmacs is not None and static:
            rows.append(f"| mean compute relative to static | {float(gmacs) / (static / 1e9):.1%} |")
    if ratio is not None:
        label = "mean fine-region ratio" if ratio_name == "fine_region_ratio" else "mean token keep ratio"
        rows.append(f"| {label} | {_fmt(float(ratio), 3)} |")
    num_params = sum(p.numel() for p in model.parameters())
    rows.append(f"| parameters | {num_params / 1e6:.2f} M |")
    if len(rows) == 3 and accuracy is None:
        rows.append("| (not evaluated) | |")
    results_table = "\n".join(rows)

    settings = {}
    if training_args is not None:
        for key in (
            "learning_rate",
            "num_train_epochs",
            "max_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "weight_decay",
            "lr_scheduler_type",
            "seed",
            "bf16",
            "fp16",
        ):
            value = getattr(training_args, key, None)
            if value is None or (key == "max_steps" and value in (-1, 0)) or (key in ("bf16", "fp16") and not value):
                continue
            settings[key] = getattr(value, "value", value)
        world_size = getattr(training_args, "world_size", 1)
        settings["processes (world size)"] = world_size
        settings["global batch size"] = (
            training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
        )
    for key in (
        "gbas_target_ratio",
        "gbas_loss_weight",
        "gbas_gather_across_processes",
        "gate_threshold",
        "budget_target",
        "budget_loss_weight",
    ):
        if hasattr(config, key):
            settings[key] = getattr(config, key)
    for key, value in (extra_settings or {}).items():
        if value is not None:
            settings[key] = value
    training_table = "\n".join(
        ["| setting | value |", "|---|---|"]
        + [f"| {k} | {_fmt(v) if isinstance(v, float) else v} |" for k, v in settings.items()]
    )

    if model_type == "msvit":
        origin = (
            f"Upcycled from [{base_model}](https://huggingface.co/{base_model})."
            if base_model and not os.path.isdir(base_model)
            else (
                f"Upcycled from the ViT checkpoint `{base_model}`."
                if base_model
                else "Upcycled from a small ViT trained from scratch on the same data."
            )
        )
        recipe = (
            "upcycle the ViT (every weight reused, only the gate is new), train the gate with the backbone frozen, then "
            "fine-tune everything jointly (classification loss + `gbas_loss_weight` x GBaS loss)."
        )
        height, width = config.image_hw
        values = dict(
            coarse_patch_size=config.coarse_patch_size,
            patch_size=config.patch_size,
            fine_per_coarse=(config.coarse_patch_size // config.patch_size) ** 2,
            image_size=f"{height}x{width}",
            gbas_target_ratio=config.gbas_target_ratio,
        )
    else:
        origin = (
            f"Upcycled from the PVTv2 checkpoint `{base_model}`."
            if base_model
            else "Upcycled from a small PVTv2 trained from scratch on the same data."
        )
        recipe = (
            "upcycle the PVTv2 (every weight reused, only the routing gates are new), train the gates with the backbone "
            "frozen, then fine-tune everything jointly (classification loss + `budget_loss_weight` x budget loss)."
        )
        values = dict(budget_target=getattr(config, "budget_target", "the target"))
    if dataset_name == "hf-msvit/digits-on-canvas":
        data_limitation = (
            "Trained on a toy dataset (scikit-learn's 8x8 handwritten digits, upscaled and pasted on a larger blank "
            "canvas, generated by `hf_msvit.data`): a demonstration checkpoint, not a general-purpose classifier."
        )
    else:
        data_limitation = f"Only evaluated on {dataset_label}; accuracy and compute on other data will differ."
    values.update(
        model_name=model_name,
        repo_id=repo_id,
        origin=origin,
        results_table=results_table,
        training_table=training_table,
        recipe=recipe,
        data_limitation=data_limitation,
        transformers_min=TRANSFORMERS_MIN,
    )
    body = render_template(read_template(model_type), values)

    eval_results = None
    if accuracy is not None:
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_name or "imagefolder",
                dataset_name=dataset_label,
                dataset_split="validation",
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=float(accuracy),
            )
        ]
    tags = ["vision", "image-classification", "custom_code", "hf_msvit", model_type]
    tags += ["dynamic-tokenization", "mixed-scale-tokens"] if model_type == "msvit" else ["dynamic-token-routing"]
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        license=license,
        tags=tags,
        datasets=[dataset_name] if dataset_name else None,
        metrics=["accuracy"],
        base_model=base_model if base_model and not os.path.isdir(base_model) else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


def save_for_hub(model, folder: str, image_processor=None, **card_kwargs) -> list[str]:
    """Writes what `push_to_hub` uploads into `folder`: weights, config with `auto_map`, remote-code files, image
    processor and `README.md`. Returns the sorted file names. `card_kwargs` go to `build_model_card`.
    """
    model = getattr(model, "module", model)
    prepare_for_remote_code(model, image_processor)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    card = build_model_card(model, **card_kwargs)
    card.save(os.path.join(folder, "README.md"))
    return sorted(os.listdir(folder))


def push_to_hub(
    model,
    repo_id: str,
    image_processor=None,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload dynamic-compute image classifier (hf_msvit)",
    revision: str | None = None,
    **card_kwargs,
) -> str:
    """Uploads a trained model to `repo_id` in one commit and returns the commit URL.

    Everything is written to a temporary folder first, so nothing local is modified. On failure raises
    `HubPushError` naming the failed step (`save`, `create_repo` or `upload`).
    """
    card_kwargs.setdefault("repo_id", repo_id)
    with tempfile.TemporaryDirectory(prefix="hf_msvit_push_") as folder:
        try:
            save_for_hub(model, folder, image_processor=image_processor, **card_kwargs)
        except Exception as error:
            raise HubPushError("save", repo_id, error) from error
        api = huggingface_hub.HfApi(token=token, library_name="hf_msvit", library_version=_version())
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
        except Exception as error:
            raise HubPushError("create_repo", repo_id, error) from error
        try:
            commit = api.upload_folder(
                repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision
            )
        except Exception as error:
            raise HubPushError("upload", repo_id, error) from error
    return getattr(commit, "commit_url", None) or str(commit)


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


__all__ = ["HubPushError", "build_model_card", "push_to_hub", "read_template", "render_template", "save_for_hub"]
