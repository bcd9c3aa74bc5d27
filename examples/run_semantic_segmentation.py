#!/usr/bin/env python
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
"""Semantic segmentation with MSViT (upcycled from ViT) or DiT (upcycled from PVTv2), with `Trainer`.

In the style of transformers' `examples/pytorch/semantic-segmentation/run_semantic_segmentation.py`: every
`TrainingArguments` flag works, columns `image` and `label` (a label map), `--do_reduce_labels`, mean IoU and per-class
accuracy (computed here: no metric download). No torchvision or albumentations needed.

Models:
- `--model_type msvit`: `MSViTForSemanticSegmentation` (Segmenter's linear decoder on the mixed-scale tokens, put back
  on the fine grid). Its static counterpart is the same model with every region forced fine: exactly the ViT + decoder.
- `--model_type dit_routing`: transformers' UperNet on a `DiTBackbone` (`DynamicUperNetForSemanticSegmentation`, which
  adds the budget loss to UperNet's loss). Its static counterpart is UperNet on transformers' `PvtV2Backbone`.

The run is a sequence of phases, each one `Trainer` run in its own folder under `--output_dir`:

1. `phase-backbone` (from a ViT / PVTv2 checkpoint or from scratch): the static model learns the task, for
   `--backbone_epochs` at `--backbone_learning_rate`. Without `--model_name_or_path` the backbone starts from random
   weights: it stands in for the pretrained checkpoint you would normally start from.
2. Upcycling: the gates are switched on (MSViT) or the PVTv2 becomes a DiT grid (every weight reused, gates new).
3. `phase-gate`: `--gate_only_epochs` with everything but the gates frozen; the gates learn at `--gate_learning_rate`.
4. `phase-joint`: `--num_train_epochs` of joint fine-tuning (pixel loss + GBaS / budget loss): `--learning_rate` for
   the backbone and decoder, `--gate_learning_rate` for the gates.

Phases, resuming (`--resume_from_checkpoint`), logging and the Hub push (`--push_to_hub`, with a model card) are
`hf_msvit.phases`, shared with `run_image_classification.py`; the arguments have the same names and meanings there.

With no dataset arguments it trains on the built-in segmentation data (digits on crops of photographs, generated
locally by `hf_msvit.data`). Examples:

    python examples/run_semantic_segmentation.py                               # MSViT, built-in data, ~5 min on CPU
    python examples/run_semantic_segmentation.py --model_type dit_routing --output_dir outputs/dit-digits-seg
    python examples/run_semantic_segmentation.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name scene_parse_150 --do_reduce_labels --image_size 512 --gbas_target_ratio 0.5
    torchrun --nproc_per_node 2 examples/run_semantic_segmentation.py        # 2 processes (CPU: gloo, chosen here)
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, field

import datasets
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    PvtV2Config,
    TrainingArguments,
    UperNetConfig,
    UperNetForSemanticSegmentation,
    set_seed,
)
from transformers.models.pvt_v2.modeling_pvt_v2 import PvtV2Backbone

from hf_msvit import (
    DiTBackbone,
    DiTImageProcessor,
    MSViTConfig,
    MSViTForSemanticSegmentation,
    MSViTImageProcessor,
    phases,
)
from hf_msvit import data as builtin_data
from hf_msvit.models.msvit.convert_vit_to_msvit import JOINT_PHASE_NOISE_SCALE
from hf_msvit.segmentation import (
    DynamicUperNetForSemanticSegmentation,
    SegmentationCollator,
    SegmentationMetrics,
    SegmentationTrainer,
    SegmentationTransform,
)
from hf_msvit.training import is_gate_parameter, ratio_metric_name


logger = logging.getLogger(__name__)

PVT_STAGES = ["stage1", "stage2", "stage3", "stage4"]


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A ViT checkpoint (upcycled to MSViT), a PVTv2 checkpoint (upcycled to DiT + UperNet), or an "
            "MSViT / UperNet-on-DiT segmentation checkpoint to train further. Without it the backbone starts from "
            "scratch."
        },
    )
    model_type: str = field(
        default="msvit",
        metadata={"help": "Model for a fresh start: msvit or dit_routing.", "choices": ["msvit", "dit_routing"]},
    )
    image_processor_name: str | None = field(default=None, metadata={"help": "Image processor if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded checkpoints."})
    model_revision: str = field(default="main", metadata={"help": "Checkpoint version (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private checkpoints."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})
    # dynamic compute (defaults in GATE_DEFAULTS / BUDGET_DEFAULTS; a checkpoint's own values unless given)
    gbas_target_ratio: float | None = field(default=None, metadata={"help": "MSViT: target fraction of fine regions."})
    gbas_loss_weight: float | None = field(default=None, metadata={"help": "MSViT: weight of the GBaS loss."})
    gbas_hyperprior_std: float | None = field(default=None, metadata={"help": "MSViT: spread around the target."})
    gate_hidden_size: int | None = field(default=None, metadata={"help": "MSViT: width of the gate MLP."})
    gate_input: str | None = field(default=None, metadata={"help": "MSViT: gate on `pixels` or coarse `embeddings`."})
    gate_noise_scale: float | None = field(
        default=None, metadata={"help": "MSViT: noise of the training decisions (0: inference's decisions)."}
    )
    gate_level_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the level term (the gate's own level at the target)."}
    )
    gate_logit_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the logit penalty (mean squared gate logit)."}
    )
    reinit_gates: bool = field(
        default=False,
        metadata={
            "help": "MSViT checkpoint: a new gate with this script's gate settings (e.g. to upcycle a --backbone_only "
            "run at another target); without it the checkpoint's settings, except those given."
        },
    )
    budget_target: float | None = field(default=None, metadata={"help": "DiT: target compute relative to PVTv2."})
    budget_loss_weight: float | None = field(default=None, metadata={"help": "DiT: weight of the budget loss."})
    sparse_training: bool | None = field(
        default=None,
        metadata={
            "help": "DiT: compute only the stages and edges some token / image takes in a training forward (cheaper "
            "step; a closed stage or edge then moves only through the budget loss). Default here: False (every node)."
        },
    )
    # fresh backbone and heads
    image_size: int | None = field(default=None, metadata={"help": "Input size (default: the canvas size, else 224)."})
    patch_size: int = field(default=8, metadata={"help": "Fresh ViT: fine patch size (coarse regions: twice that)."})
    hidden_size: int = field(default=96, metadata={"help": "Fresh ViT: width."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Fresh ViT: depth."})
    num_attention_heads: int = field(default=3, metadata={"help": "Fresh ViT: attention heads."})
    intermediate_size: int = field(default=192, metadata={"help": "Fresh ViT: MLP width."})
    upernet_hidden_size: int = field(default=32, metadata={"help": "DiT: channels of UperNet's decode heads."})
    # recipe
    backbone_epochs: float = field(
        default=8.0, metadata={"help": "Epochs of the static backbone phase before upcycling (0 to skip)."}
    )
    backbone_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: steps of the backbone phase (overrides --backbone_epochs)."}
    )
    backbone_learning_rate: float = field(default=2e-3, metadata={"help": "Learning rate of the backbone phase."})
    backbone_only: bool = field(
        default=False, metadata={"help": "Stop after the static backbone phase (the static baselines of a study)."}
    )
    gate_only_epochs: float = field(
        default=2.0,
        metadata={"help": "Epochs of gate-only training (all else frozen) before joint fine-tuning; 0 to skip."},
    )
    gate_only_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: steps of the gate-only phase (overrides --gate_only_epochs)."}
    )
    joint_gate_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the gates in the joint phase (default: --gate_learning_rate; 0: frozen)."},
    )
    joint_gate_noise_scale: float | None = field(
        default=None,
        metadata={"help": "MSViT: `gate_noise_scale` of the joint phase (default: 0.5, sampled decisions)."},
    )
    gate_learning_rate: float = field(
        default=1e-2,
        metadata={
            "help": "Learning rate of the gate parameters, in the gate-only phase and in the joint phase (where the "
            "rest trains at --learning_rate)."
        },
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset (default: the built-in data)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation fraction if there is no split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    do_reduce_labels: bool = field(default=False, metadata={"help": "Labels minus 1, 0 (background) -> 255."})
    canvas_size: int = field(default=96, metadata={"help": "Built-in data: canvas side in pixels."})
    background: str = field(
        default="photo",
        metadata={"help": "Built-in data: crops of photographs or blank canvases.", "choices": ["photo", "blank"]},
    )
    digit_copies: int = field(default=2, metadata={"help": "Built-in data: renderings of each handwritten digit."})


# TrainingArguments defaults of this script (the built-in quick run); every one can be changed on the command line.
SCRIPT_TRAINING_DEFAULTS = {
    "output_dir": "outputs/msvit-digits-seg",
    "do_train": True,
    "do_eval": True,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 20,
    "learning_rate": 5e-4,  # joint phase, backbone and decoder
    "weight_decay": 0.05,
    "num_train_epochs": 6.0,  # joint phase
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "remove_unused_columns": False,  # the transform needs the image and label columns
    "batch_eval_metrics": True,  # metrics batch by batch (a confusion matrix)
    "report_to": "none",
}


# --------------------------------------------------------------------------------------------------------------------
# Data


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    """`(DatasetDict with train/validation, id2label, dataset name or None)`; columns `image` and `label`."""
    if data_args.dataset_name is None:
        builtin = builtin_segmentation_data(data_args.canvas_size, data_args.digit_copies, data_args.background)
        dataset = datasets.DatasetDict(builtin)
        id2label = dict(enumerate(builtin_data.SEGMENTATION_LABELS))
        name = None  # the built-in data has no Hub id
    else:
        dataset = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        for old, new in (("pixel_values", "image"), ("annotation", "label")):
            if old in dataset["train"].column_names:
                dataset = dataset.rename_column(old, new)
        id2label, name = hub_id2label(data_args.dataset_name, model_args), data_args.dataset_name
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset = datasets.DatasetDict(train=split["train"], validation=split["test"])
    for split_name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None:
            dataset[split_name] = dataset[split_name].select(range(min(limit, len(dataset[split_name]))))
    return dataset, id2label, name


@functools.lru_cache(maxsize=2)
def builtin_segmentation_data(canvas_size: int, copies: int, background: str = "photo") -> datasets.DatasetDict:
    """The built-in data, generated once per process (the study runs this script several times in one process)."""
    return builtin_data.load_digits_on_canvas_segmentation(
        canvas_size=canvas_size, copies=copies, background=background
    )


def hub_id2label(dataset_name: str, model_args: ModelArguments) -> dict[int, str]:
    """The `id2label.json` a Hub segmentation dataset ships (ADE20k's from huggingface/label-files)."""
    from huggingface_hub import hf_hub_download

    repo_id, filename = (
        ("huggingface/label-files", "ade20k-id2label.json")
        if dataset_name == "scene_parse_150"
        else (dataset_name, "id2label.json")
    )
    path = hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=model_args.cache_dir)
    with open(path) as handle:
        return {int(key): value for key, value in json.load(handle).items()}


# --------------------------------------------------------------------------------------------------------------------
# Models


# Settings of the gates for models built here (fresh or upcycled from ViT / PVTv2). A small gate for a small
# backbone, a target that fits the built-in data, and a weak GBaS with a tight hyperprior. The gate reads the regions'
# pixels: gating on the coarse token embeddings sends the GBaS gradient into the patch embedding, which on the built-in
# data cut the upcycled ViT/8's all-fine mean IoU from 0.41 to 0.25 in 3 epochs (0.38 with pixel gates, which also put
# twice as many stroke pixels in fine regions). With an MSViT / DiT checkpoint only the values given apply (all of them
# for a new gate, `--reinit_gates`). The gate-only phase takes inference's decisions (noise-free), as
# `from_vit_pretrained` upcycles by default, and GBaS alone holds the level. GBaS pulls every region's gate towards
# the same prior whatever the region holds, while a region's share of the pixel loss is 1/36 of the image's: at weight
# 1 GBaS, not the pixels, set the gates' order (benchmarks/segmentation_gate_probe/results.json, validation: the
# weight 0.1 ranks the digit regions highest and scores best at both targets); at weight 5 with the level term the
# gate put the digits' regions coarse at target 0.5 (git history of the segmentation study's results.json).
# No logit penalty here (the upcycling default is 0.01): the segmentation study measured these gates without it.
GATE_DEFAULTS = {
    "gbas_target_ratio": 0.3, "gbas_loss_weight": 0.1, "gbas_hyperprior_std": 0.05, "gate_hidden_size": 64,
    "gate_input": "pixels", "gate_noise_scale": 0.0, "gate_level_loss_weight": 0.0, "gate_logit_loss_weight": 0.0,
}  # fmt: skip
# DiT trains every node of its grid here (`sparse_training=False`, not the upcycling default): with sparse training a
# stage or edge that closes for a whole batch gets no gradient from the pixel loss, only the budget loss's, which keeps
# it closed. In the segmentation study's gate-only phase (gate lr 1e-2) the first downsampling edge closed that way and
# PVTv2's stages 2-4 stopped running (docs/segmentation.md has the study's numbers with and without).
BUDGET_DEFAULTS = {"budget_target": 0.7, "budget_loss_weight": 10.0, "sparse_training": False}


def given_settings(model_args: ModelArguments, defaults: dict) -> dict:
    """The fields of `defaults` that were given on the command line."""
    return {name: getattr(model_args, name) for name in defaults if getattr(model_args, name) is not None}


def settings(model_args: ModelArguments, defaults: dict) -> dict:
    return {**defaults, **given_settings(model_args, defaults)}


def build_start_model(model_args: ModelArguments, id2label: dict, image_size: int):
    """`(model, is_static, source image processor or None)`: the static model of phase 1 (an MSViT with every region
    forced fine, or UperNet on PVTv2), or an MSViT / UperNet-on-DiT checkpoint to continue (not static)."""
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    if model_args.model_name_or_path is None:
        return fresh_static_model(model_args, labels, image_size), True, None
    hub = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    remote = {"trust_remote_code": model_args.trust_remote_code, **hub}
    config = AutoConfig.from_pretrained(model_args.model_name_or_path, **remote)
    try:
        source = model_args.image_processor_name or model_args.model_name_or_path
        processor = AutoImageProcessor.from_pretrained(source, **remote)
    except (OSError, ValueError):
        processor = None
    model, is_static = load_checkpoint_model(model_args, config, labels, hub)
    return model, is_static, processor


def load_checkpoint_model(model_args: ModelArguments, config, labels: dict, hub: dict):
    """`(model, is_static)` for `--model_name_or_path` (see `ModelArguments.model_name_or_path`)."""
    path = model_args.model_name_or_path
    if config.model_type == "vit":
        gates = settings(model_args, GATE_DEFAULTS)
        model = MSViTForSemanticSegmentation.from_vit_pretrained(
            path, **labels, coarse_patch_size=2 * config.patch_size, **gates
        )
        return model, True
    if config.model_type == "pvt_v2":
        pvt_config = PvtV2Config.from_pretrained(path, out_features=PVT_STAGES, **hub)
        model = upernet(pvt_config, model_args, labels)
        model.backbone.load_state_dict(PvtV2Backbone.from_pretrained(path, config=pvt_config, **hub).state_dict())
        return model, True
    if config.model_type == "msvit":  # a new gate (--reinit_gates) gets the defaults of a new gate
        gates = settings if model_args.reinit_gates else given_settings
        for name, value in {**labels, **gates(model_args, GATE_DEFAULTS)}.items():
            setattr(config, name, value)
        return load_msvit_checkpoint(path, config, model_args.reinit_gates, hub), False
    if config.model_type == "upernet" and config.backbone_config.model_type == "pvt_v2":  # a --backbone_only run
        return UperNetForSemanticSegmentation.from_pretrained(path, **hub), True
    if config.model_type == "upernet":
        for name, value in given_settings(model_args, BUDGET_DEFAULTS).items():
            setattr(config.backbone_config, name, value)
        return DynamicUperNetForSemanticSegmentation.from_pretrained(path, config=config, **hub), False
    raise ValueError(
        f"--model_name_or_path {path!r} has model_type {config.model_type!r}; expected 'vit' (upcycled to MSViT), "
        "'pvt_v2' (upcycled to DiT), 'msvit' or 'upernet' (a checkpoint of this script)."
    )


def load_msvit_checkpoint(path: str, config, reinit_gates: bool, hub: dict) -> MSViTForSemanticSegmentation:
    """An MSViT segmentation checkpoint with `config`; with `reinit_gates` every weight but the gate and the GBaS
    priors, which start anew at `config`'s target (upcycling a backbone-phase checkpoint)."""
    if not reinit_gates:
        return MSViTForSemanticSegmentation.from_pretrained(path, config=config, **hub)
    source = MSViTForSemanticSegmentation.from_pretrained(path, **hub)
    model = MSViTForSemanticSegmentation(config)
    weights = {key: value for key, value in source.state_dict().items() if not is_gate_parameter(key)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not is_gate_parameter(key) for key in missing):
        raise ValueError(f"{path} does not fit the MSViT config: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return model


def fresh_static_model(model_args: ModelArguments, labels: dict, image_size: int):
    """A small randomly initialized static model: MSViT (ViT/`patch_size` + decoder) or UperNet on a small PVTv2."""
    if model_args.model_type == "msvit":
        config = MSViTConfig(
            image_size=image_size, patch_size=model_args.patch_size, coarse_patch_size=2 * model_args.patch_size,
            hidden_size=model_args.hidden_size, num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads, intermediate_size=model_args.intermediate_size,
            **settings(model_args, GATE_DEFAULTS), **labels,
        )  # fmt: skip
        return MSViTForSemanticSegmentation(config)
    pvt_config = PvtV2Config(
        image_size=image_size, hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4],
        out_features=PVT_STAGES,
    )  # fmt: skip
    return upernet(pvt_config, model_args, labels)


def upernet(backbone_config, model_args: ModelArguments, labels: dict) -> UperNetForSemanticSegmentation:
    channels = model_args.upernet_hidden_size
    config = UperNetConfig(
        backbone_config=backbone_config, hidden_size=channels, auxiliary_channels=channels, **labels
    )
    return UperNetForSemanticSegmentation(config)


def upcycle(model, model_args: ModelArguments):
    """The dynamic model of phases 2-3: an MSViT as it is (its gate now decides), a UperNet on PVTv2 -> on DiT."""
    if isinstance(model, (MSViTForSemanticSegmentation, DynamicUperNetForSemanticSegmentation)):
        return model
    budget = settings(model_args, BUDGET_DEFAULTS)
    backbone = DiTBackbone.from_pvt_v2_pretrained(model.backbone, out_features=PVT_STAGES, **budget)
    return DynamicUperNetForSemanticSegmentation.from_backbone(backbone, heads_from=model)


def image_processor_for(model, source=None, image_size: int | None = None):
    """Our processor for the model's family, with size / mean / std / resample from `source` (the checkpoint's)."""
    is_msvit = isinstance(model, MSViTForSemanticSegmentation)
    processor_class = MSViTImageProcessor if is_msvit else DiTImageProcessor
    kwargs = {key: getattr(source, key) for key in ("image_mean", "image_std", "resample") if hasattr(source, key)}
    size = image_size or (model.config.image_hw if is_msvit else model.config.backbone_config.image_size)
    height, width = (size, size) if isinstance(size, int) else size
    return processor_class(size={"height": height, "width": width}, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Phases and main


def all_fine_collator(model) -> SegmentationCollator:
    """The backbone phase's collator: an MSViT runs with every region forced fine (exactly its static ViT)."""
    is_msvit = isinstance(model, MSViTForSemanticSegmentation)
    return SegmentationCollator(all_fine_grid=model.config.coarse_grid if is_msvit else None)


def train(model, is_static: bool, model_args: ModelArguments, runner: phases.PhaseRunner):
    """All phases. Returns `(final model, train metrics per phase, backbone_eval_* metrics)`."""
    backbone_length = phases.phase_length(model_args.backbone_epochs, model_args.backbone_max_steps)
    done, backbone_eval = {}, {}
    if is_static and phases.runs(backbone_length):
        collator = all_fine_collator(model)
        overrides = {**backbone_length, "learning_rate": model_args.backbone_learning_rate}
        done["backbone"] = runner.run("backbone", model, overrides, data_collator=collator)
        backbone_eval = runner.evaluate(model, "backbone_eval", phase="backbone", data_collator=collator)
    if model_args.backbone_only:
        return model, done, backbone_eval
    model = upcycle(model, model_args)
    gate_length = phases.phase_length(model_args.gate_only_epochs, model_args.gate_only_max_steps)
    noise = model_args.joint_gate_noise_scale
    joint = phases.JointPhase(
        gate_learning_rate=model_args.joint_gate_learning_rate,
        gate_noise_scale=JOINT_PHASE_NOISE_SCALE if noise is None else noise,  # the gates are new: sampled decisions
    )
    done.update(runner.train_gates_then_jointly(model, gate_length, model_args.gate_learning_rate, joint))
    return model, done, backbone_eval


def main(argv=None) -> dict:
    arguments = (ModelArguments, DataTrainingArguments, TrainingArguments)
    model_args, data_args, training_args = phases.parse_args(arguments, SCRIPT_TRAINING_DEFAULTS, argv)
    phases.setup_logging(training_args, logger)
    phases.check_world_size(training_args)
    set_seed(training_args.seed)

    dataset, id2label, dataset_name = load_data(data_args, model_args, training_args.seed)
    image_size = model_args.image_size or (data_args.canvas_size if data_args.dataset_name is None else 224)
    model, is_static, source_processor = build_start_model(model_args, id2label, image_size)
    processor = image_processor_for(model, source_processor, model_args.image_size)
    transform = SegmentationTransform(processor, do_reduce_labels=data_args.do_reduce_labels)
    runner = phases.PhaseRunner.start(
        training_args, trainer_class=SegmentationTrainer, image_processor=processor,
        splits={name: split.with_transform(transform) for name, split in dataset.items()},
        data_collator=SegmentationCollator(),
        compute_metrics_for=lambda model: SegmentationMetrics(id2label, ratio_name=ratio_metric_name(model)),
    )  # fmt: skip

    model, done, backbone_eval = train(model, is_static, model_args, runner)
    final = {} if model_args.backbone_only else runner.evaluate_final(model)
    eval_metrics, test_metrics = final.get("eval", {}), final.get("test", {})
    train_metrics = phases.last_phase_metrics(done)
    results = {"train": train_metrics, "eval": {**backbone_eval, **eval_metrics}, "test": test_metrics}
    runner.save_results(model, results)
    push_error = phases.save_and_push(
        model, training_args, processor, eval_metrics=eval_metrics, base_model=model_args.model_name_or_path,
        dataset_name=dataset_name, builtin_data=dataset_name is None,
        extra_settings={"gate_only_epochs": model_args.gate_only_epochs,
                        "gate_learning_rate": model_args.gate_learning_rate},
    )  # fmt: skip
    metrics = {**train_metrics, **backbone_eval, **eval_metrics, **test_metrics}
    if training_args.process_index == 0:
        print_summary(metrics, training_args.output_dir)
    if push_error is not None:
        raise SystemExit(1)
    return metrics


SUMMARY_KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "gmacs", "fine_region_ratio", "token_keep_ratio")


def print_summary(metrics: dict, output_dir: str):
    rows = [f"  {key:<36}{value:.4f}" for key, value in metrics.items() if key.endswith(SUMMARY_KEYS)]
    print("\n".join(["", "=" * 78, *rows, f"Model: {os.path.abspath(output_dir)}", "=" * 78]))


if __name__ == "__main__":
    main()
