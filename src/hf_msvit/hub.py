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
"""Sharing a trained MSViT / DiT (classifier or segmenter) on the Hugging Face Hub, with a generated model card.

    from hf_msvit.hub import push_to_hub
    url = push_to_hub(model, "me/msvit-digits", image_processor=processor, eval_metrics=trainer.evaluate())

What is uploaded (one commit): `model.safetensors`, `config.json` (its `auto_map` names AutoConfig, AutoModel,
AutoModelForImageClassification, and AutoBackbone for DiT), the remote-code files (`configuration_*.py`,
`modeling_*.py`, their siblings, `image_processing_*.py`), `preprocessor_config.json`, and `README.md`: a model card
rendered with `huggingface_hub.ModelCard.from_template` from the Jinja templates in `hf_msvit/model_cards/`
(`model_cards/` at the repository root: one per task, classification's per model type, `CARD_TASKS`), with YAML
metadata and, when the data is a Hub dataset, a `model-index` (accuracy or mean IoU).

`save_for_hub` writes the same folder locally without uploading.

`push_demo_space(repo_id, model_id)` creates a Gradio Space running the compute-knob demo (`hf_msvit.demo`) on a
model already on the Hub: `app.py`, `requirements.txt`, a `README.md` with the Space metadata and a copy of the
`hf_msvit` package, in one commit; the Space variable `HF_MSVIT_MODEL` names the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import huggingface_hub
from huggingface_hub import EvalResult, ModelCard, ModelCardData, SpaceCard, SpaceCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import UperNetForSemanticSegmentation

from .models.msvit.modeling_msvit import MSViTForSemanticSegmentation


TEMPLATE_DIR = "model_cards"  # inside the hf_msvit package; `model_cards/` at the repo root links here
TRANSFORMERS_MIN = "5.23"
TRAINING_SETTINGS = (
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
)


class HubPushError(RuntimeError):
    """Raised by `push_to_hub` / `push_demo_space` when a step fails; `step` names it (`save`, `create_repo`,
    `set_variable` or `upload`)."""

    def __init__(self, step: str, repo_id: str, cause: BaseException):
        self.step = step
        self.repo_id = repo_id
        self.cause = cause
        super().__init__(
            f"Pushing to the Hub repo {repo_id!r} failed at step {step!r}: {type(cause).__name__}: {cause}"
        )


def read_template(name: str) -> str:
    """The model card template `name` (`msvit`, `dit_routing` or `segmentation`), shipped as package data."""
    name = f"{name}.md"
    try:
        return resources.files("hf_msvit").joinpath(TEMPLATE_DIR, name).read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as error:
        raise ValueError(f"No model card template {name!r} in hf_msvit/model_cards/.") from error


def training_settings(training_args=None, extra_settings: dict | None = None) -> dict:
    """The settings a card lists: the main `TrainingArguments` fields, the global batch size, then `extra_settings`."""
    settings = {}
    if training_args is not None:
        for key in TRAINING_SETTINGS:
            value = getattr(training_args, key, None)
            if value is None or (key == "max_steps" and value <= 0) or (key in ("bf16", "fp16") and not value):
                continue
            settings[key] = getattr(value, "value", value)  # enums (lr_scheduler_type) by their value
        world_size = getattr(training_args, "world_size", 1)
        settings["processes (world size)"] = world_size
        settings["global batch size"] = (
            training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * world_size
        )
    settings.update({key: value for key, value in (extra_settings or {}).items() if value is not None})
    return settings


def is_hub_id(name: str | None) -> bool:
    """A name that is not a local path: a Hub id (datasets and checkpoints named by local folders have none)."""
    return bool(name) and not os.path.exists(name)


@dataclass(frozen=True)
class CardTask:
    """What a model card says about one task: the pipeline tag, the metric of its `model-index`, the template
    (`None`: the model type's own, `msvit.md` / `dit_routing.md`) and how it names the built-in or a custom dataset."""

    pipeline_tag: str
    task_name: str
    metric: str
    metric_name: str
    template: str | None
    builtin_data_label: str
    custom_data_label: str


CARD_TASKS = {
    "image-classification": CardTask(
        "image-classification", "Image Classification", "accuracy", "Accuracy", None,
        "digits-on-canvas, built into hf_msvit", "a custom image folder",
    ),
    "image-segmentation": CardTask(
        "image-segmentation", "Image Segmentation", "mean_iou", "Mean IoU", "segmentation",
        "digits-on-canvas segmentation, built into hf_msvit", "custom data",
    ),
}  # fmt: skip
FAMILY_TAGS = {"msvit": ["dynamic-tokenization", "mixed-scale-tokens"], "dit_routing": ["dynamic-token-routing"]}


def is_upernet(model) -> bool:
    return isinstance(model, UperNetForSemanticSegmentation)


def card_task(model) -> CardTask:
    """Segmentation for `MSViTForSemanticSegmentation` and UperNet (on MSViT / DiT), else classification."""
    segmentation = isinstance(model, (UperNetForSemanticSegmentation, MSViTForSemanticSegmentation))
    return CARD_TASKS["image-segmentation" if segmentation else "image-classification"]


def model_family(model) -> str:
    """`msvit` or `dit_routing`: the model type of the dynamic model (of the backbone, for UperNet)."""
    return (model.config.backbone_config if is_upernet(model) else model.config).model_type


def card_metadata(
    model, eval_metrics: dict, base_model=None, dataset_name=None, model_name=None, license=None, builtin_data=False
) -> ModelCardData:
    """`ModelCardData` for the card's YAML header; a `model-index` only when `dataset_name` is a Hub dataset id (as
    transformers' own cards: a result without a dataset would be rejected by the Hub)."""
    task, family = card_task(model), model_family(model)
    dataset_id = dataset_name if is_hub_id(dataset_name) and not builtin_data else None
    value = eval_metrics.get(task.metric)
    eval_results = None
    if value is not None and dataset_id is not None:
        eval_results = [
            EvalResult(
                task_type=task.pipeline_tag, task_name=task.task_name, dataset_type=dataset_id,
                dataset_name=dataset_id, dataset_split="validation", metric_type=task.metric,
                metric_name=task.metric_name, metric_value=float(value),
            )
        ]  # fmt: skip
    remote_code = [] if is_upernet(model) else ["custom_code"]  # UperNet is transformers' own class
    return ModelCardData(
        library_name="transformers",
        pipeline_tag=task.pipeline_tag,
        license=license,
        tags=["vision", task.pipeline_tag, *remote_code, "hf_msvit", family, *FAMILY_TAGS.get(family, [])],
        datasets=[dataset_id] if dataset_id else None,
        metrics=[task.metric],
        base_model=base_model if is_hub_id(base_model) else None,
        model_name=model_name,
        eval_results=eval_results,
    )


def card_results(model, eval_metrics: dict | None) -> dict:
    """`eval_metrics` without their `eval_` prefix, with the static backbone's GMACs and the compute fraction."""
    results = {key.removeprefix("eval_"): value for key, value in (eval_metrics or {}).items()}
    if hasattr(model, "static_macs"):
        results.setdefault("static_gmacs", model.static_macs() / 1e9)
    if "gmacs" in results and results.get("static_gmacs"):
        results.setdefault("macs_fraction", results["gmacs"] / results["static_gmacs"])
    return results


def build_model_card(
    model,
    repo_id: str | None = None,
    eval_metrics: dict | None = None,
    training_args=None,
    base_model: str | None = None,
    dataset_name: str | None = None,
    builtin_data: bool = False,
    extra_settings: dict | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """A `ModelCard` for a trained MSViT / DiT model (classifier, MSViT segmenter or UperNet on their backbones),
    rendered from its task's template (classification: its model type's).

    `eval_metrics` as returned by `Trainer.evaluate` (`eval_` prefixes are optional). `base_model`: the checkpoint the
    model was upcycled from (a Hub id goes into the metadata, a local folder only into the text). `dataset_name`: a Hub
    dataset id goes into the metadata; `builtin_data=True` says the model was trained on `hf_msvit.data`'s built-in
    data, which has no Hub id.
    """
    model = getattr(model, "module", model)
    task, family = card_task(model), model_family(model)
    repo_id = repo_id or f"{family}-model"
    results = card_results(model, eval_metrics)
    model_name = repo_id.split("/")[-1]
    card_data = card_metadata(model, results, base_model, dataset_name, model_name, license, builtin_data)
    return ModelCard.from_template(
        card_data,
        template_str=read_template(task.template or family),
        repo_id=repo_id,
        model_name=model_name,
        config=model.config,
        family=family,
        is_upernet=is_upernet(model),
        results=results,
        num_parameters_m=sum(p.numel() for p in model.parameters()) / 1e6,
        start_checkpoint=base_model,
        dataset_label=task.builtin_data_label if builtin_data else (dataset_name or task.custom_data_label),
        builtin_data=builtin_data,
        training_settings=training_settings(training_args, extra_settings),
        transformers_min=TRANSFORMERS_MIN,
    )


def save_for_hub(model, folder: str, image_processor=None, **card_kwargs) -> list[str]:
    """Writes what `push_to_hub` uploads into `folder`: weights, config with `auto_map`, remote-code files, image
    processor and `README.md`. Returns the sorted file names. `card_kwargs` go to `build_model_card`.
    """
    model = getattr(model, "module", model)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    build_model_card(model, **card_kwargs).save(os.path.join(folder, "README.md"))
    return sorted(os.listdir(folder))


def push_to_hub(
    model,
    repo_id: str,
    image_processor=None,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload dynamic-compute vision model (hf_msvit)",
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


# The Space's entry point; `demo/app.py` in the repository is the same file (a test keeps them equal).
DEMO_APP_PY = '''"""The MSViT / DiT compute-knob demo: `python demo/app.py --model runs/msvit-digits` (or a Hub id).

On a Hugging Face Space (made by `hf_msvit.hub.push_demo_space`) the checkpoint comes from the HF_MSVIT_MODEL
variable. The app's logic lives in `hf_msvit.demo`.
"""

import sys

from hf_msvit.demo import main


if __name__ == "__main__":
    sys.exit(main())
'''
DEMO_REQUIREMENTS = (
    "torch",
    f"transformers>={TRANSFORMERS_MIN},<6",
    "huggingface_hub>=1.0",
    "safetensors",
    "Pillow",
    "numpy",
    "scikit-learn",  # the example images (digits and photographs ship inside its wheel)
)


def demo_space_card(repo_id: str, model_id: str, title: str | None = None) -> SpaceCard:
    """The Space's README: metadata for a Gradio Space (`sdk`, `app_file`, the model it shows) and a short text."""
    try:
        sdk_version = metadata.version("gradio")  # the version the app was tested with here
    except metadata.PackageNotFoundError:
        sdk_version = None
    data = SpaceCardData(
        title=title or f"{model_id.split('/')[-1]} compute knob",
        sdk="gradio",
        sdk_version=sdk_version,
        app_file="app.py",
        models=[model_id],
        license="apache-2.0",
        tags=["hf_msvit", "dynamic-compute", "vision"],
        emoji="🎛️",
        colorFrom="blue",
        colorTo="yellow",
        pinned=False,
    )
    text = (
        f"# {data.title}\n\nThe compute knob of [{model_id}](https://huggingface.co/{model_id}) (hf_msvit): the "
        "gate's decisions, the top-5 labels and the GMACs of one image, live under the `gate_threshold` and "
        "exact-budget sliders, next to the same image through the static backbone.\n\nThe model comes from the "
        "Space variable `HF_MSVIT_MODEL`; `hf_msvit/` is a copy of the package that made this Space.\n"
    )
    return SpaceCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def save_demo_space(folder: str, model_id: str, repo_id: str | None = None, title: str | None = None) -> list[str]:
    """Writes what `push_demo_space` uploads into `folder`; returns the sorted top-level names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "app.py").write_text(DEMO_APP_PY, encoding="utf-8")
    (folder / "requirements.txt").write_text("\n".join(DEMO_REQUIREMENTS) + "\n", encoding="utf-8")
    demo_space_card(repo_id or model_id, model_id, title).save(folder / "README.md")
    package = Path(__file__).parent
    shutil.copytree(package, folder / "hf_msvit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return sorted(os.listdir(folder))


def _check_space_ids(repo_id: str, model_id: str) -> None:
    if model_id and os.path.exists(model_id):
        raise ValueError(
            f"model_id {model_id!r} is a local folder; a Space loads its model from the Hub. Upload it first "
            "(hf_msvit.hub.push_to_hub or --push_to_hub) and pass its Hub id."
        )
    for role, name in (("repo_id (the Space)", repo_id), ("model_id", model_id)):
        try:
            validate_repo_id(name)
        except (HFValidationError, TypeError) as error:
            raise ValueError(f"{role} must be a Hub id such as 'user/name', got {name!r}: {error}") from error


def push_demo_space(
    repo_id: str,
    model_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    title: str | None = None,
    commit_message: str = "Upload the hf_msvit compute-knob demo",
) -> str:
    """Creates (or updates) the Gradio Space `repo_id` showing the Hub model `model_id`; returns the commit URL.

    Steps: write the files to a temporary folder (`save_demo_space`), create the Space (`space_sdk="gradio"`), set
    its variable `HF_MSVIT_MODEL` to `model_id`, upload everything in one commit. Bad ids raise `ValueError` before
    anything is sent; a failed step raises `HubPushError` naming it.
    """
    from .demo import MODEL_ENV

    _check_space_ids(repo_id, model_id)
    with tempfile.TemporaryDirectory(prefix="hf_msvit_space_") as folder:
        _step("save", repo_id, save_demo_space, folder, model_id, repo_id=repo_id, title=title)
        api = huggingface_hub.HfApi(token=token, library_name="hf_msvit", library_version=_version())
        space = {"repo_type": "space", "space_sdk": "gradio", "private": private, "exist_ok": True}
        _step("create_repo", repo_id, api.create_repo, repo_id, **space)
        _step("set_variable", repo_id, api.add_space_variable, repo_id, MODEL_ENV, model_id)
        commit = _step(
            "upload", repo_id, api.upload_folder, repo_id=repo_id, folder_path=folder, repo_type="space",
            commit_message=commit_message,
        )  # fmt: skip
    return getattr(commit, "commit_url", None) or str(commit)


def _step(step: str, repo_id: str, call, /, *args, **kwargs):
    """`call(*args, **kwargs)`, any failure raised as `HubPushError` naming `step`."""
    try:
        return call(*args, **kwargs)
    except Exception as error:
        raise HubPushError(step, repo_id, error) from error


def _version() -> str:
    from . import __version__

    return __version__


__all__ = [
    "HubPushError",
    "CARD_TASKS",
    "CardTask",
    "build_model_card",
    "card_metadata",
    "card_results",
    "card_task",
    "demo_space_card",
    "push_demo_space",
    "push_to_hub",
    "read_template",
    "save_demo_space",
    "save_for_hub",
    "training_settings",
]
