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
"""Fine-tune MSViT (upcycled from ViT) or DiT (upcycled from PVTv2) for image classification with `Trainer`.

In the style of transformers' `examples/pytorch/image-classification/run_image_classification.py`: every
`TrainingArguments` flag works (`--per_device_train_batch_size`, `--gradient_accumulation_steps`, `--bf16`,
`--resume_from_checkpoint`, `--push_to_hub`, ...), and the final metrics go to `train_results.json`,
`eval_results.json` and `all_results.json` in `--output_dir`. No torchvision needed.

The run is a sequence of phases, each one `Trainer` run with its own folder under `--output_dir`:

1. `phase-backbone` (only without `--model_name_or_path`): a small static ViT (PVTv2 for DiT) is trained from
   scratch for `--backbone_epochs`. It stands in for the pretrained checkpoint you would normally start from.
2. Upcycling: `MSViTForImageClassification.from_vit_pretrained` / `DiTForImageClassification.from_pvt_v2_pretrained`
   reuses every backbone weight; only the gates (and GBaS priors) are new.
3. `phase-gate`: `--gate_only_epochs` with the backbone and head frozen, only the gates learn (`--gate_learning_rate`).
4. `phase-joint`: `--num_train_epochs` of joint fine-tuning of everything: `--learning_rate` for the backbone and
   head, `--gate_learning_rate` for the gates. New MSViT gates learn on inference's decisions in phase 3 and the
   joint phase samples them (`--joint_gate_noise_scale`, 0.5 by default for new gates), each batch's target fraction
   of regions fine (`--joint_gate_sampling_level target`).

Defaults that depend on the model type when training from scratch (backbone and gate learning rates, gate settings)
live in one place, `FRESH_MODEL_DEFAULTS`; command-line values always win.

The final model, its image processor and a model card go to `--output_dir` (loadable with the Auto classes after
`import hf_msvit`, or with `trust_remote_code=True` without it). With no dataset arguments the script trains on the
built-in digits-on-canvas dataset (`hf_msvit.data`), which needs no download.

Examples:

    python examples/run_image_classification.py                       # built-in data, from scratch, a few min on CPU
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name beans --output_dir outputs/msvit-beans --gbas_target_ratio 0.5 --gate_only_epochs 1 \\
        --num_train_epochs 3 --learning_rate 2e-5 --per_device_train_batch_size 32
    torchrun --nproc_per_node 2 examples/run_image_classification.py       # 2 processes; on CPU-only machines
                                                                            # the script picks CPU + gloo itself
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    set_seed,
)

from hf_msvit import (
    DiTConfig,
    DiTForImageClassification,
    DiTImageProcessor,
    MSViTConfig,
    MSViTForImageClassification,
    MSViTImageProcessor,
    phases,
)
from hf_msvit import data as builtin_data
from hf_msvit.models.msvit.convert_vit_to_msvit import JOINT_PHASE_NOISE_SCALE, JOINT_PHASE_SAMPLING_LEVEL
from hf_msvit.training import (
    Distillation,
    DynamicComputeTrainer,
    ImageTransform,
    collate_fn,
    make_compute_metrics,
    ratio_metric_name,
    static_macs,
)


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecipeDefaults:
    """Defaults of a model trained from scratch (no `--model_name_or_path`) for one model type."""

    backbone_learning_rate: float  # phase 0, the static backbone from scratch
    gate_learning_rate: float  # the gates, in the gate-only and the joint phase
    config: dict = field(default_factory=dict)  # config fields of the upcycled dynamic model
    backbone_epochs: float = 8.0  # phase 0's length
    backbone_warmup_steps: float = 0.0  # phase 0's linear warmup: steps, or a fraction of the phase if < 1


# The one place for per-model-type defaults of a fresh run (command-line values win).
FRESH_MODEL_DEFAULTS = {
    # ViT/16 from scratch: 15 epochs at 5e-4, warming up over a tenth of them, the best mean validation accuracy over
    # 3 seeds of the study's sweep (benchmarks/study/results.md, "The main job's phase 0"). A quarter of the regions
    # fine is a real choice on the built-in data (most regions hold some structure) and halves the compute. The gate
    # as upcycled from any checkpoint (`UPCYCLING_DEFAULTS`).
    "msvit": RecipeDefaults(
        backbone_learning_rate=5e-4,
        gate_learning_rate=1e-2,
        config={"gbas_target_ratio": 0.25},
        backbone_epochs=15.0,
        backbone_warmup_steps=0.1,
    ),
    # PVTv2 from scratch stays at chance at 2e-3 on the built-in data (the loss stays at ln 10); 6e-4 is the best of
    # the study's sweep. DiT's gates read unnormalized features: at 1e-2 they scrambled the route (budget 0.8, the
    # loss rose above chance in the gate-only phase, accuracy 0.64 after joint training); 1e-3 kept 0.83.
    "dit_routing": RecipeDefaults(backbone_learning_rate=6e-4, gate_learning_rate=1e-3),
}
# The gate lr above holds for every upcycling, fresh or from a checkpoint: an upcycled MSViT's gate is new whatever the
# backbone (at 1e-3 its 2 gate-only epochs left it untrained: accuracy 0.796 after the phase vs 0.919 at 1e-2, target
# 0.25, validation, docs/msvit.md). Continuing an MSViT / DiT checkpoint (gates already trained): a gentler lr.
CHECKPOINT_GATE_LEARNING_RATE = 1e-3

UPCYCLERS = {
    "vit": MSViTForImageClassification.from_vit_pretrained,
    "pvt_v2": DiTForImageClassification.from_pvt_v2_pretrained,
}
DYNAMIC_MODEL_TYPES = {"vit": "msvit", "pvt_v2": "dit_routing"}
IMAGE_PROCESSORS = {"msvit": MSViTImageProcessor, "dit_routing": DiTImageProcessor}
CONFIG_CLASSES = {"msvit": MSViTConfig, "dit_routing": DiTConfig}
MSVIT_CONFIG_ARGUMENTS = (
    "gbas_target_ratio", "gbas_loss_weight", "gbas_hyperprior_std", "gbas_gather_across_processes", "gate_threshold",
    "coarse_patch_size", "gate_input", "gate_hidden_size", "gate_num_layers", "gate_noise_scale",
    "gate_level_loss_weight", "gate_logit_loss_weight", "gate_training_mode",
)  # fmt: skip
DIT_CONFIG_ARGUMENTS = (
    "budget_target", "budget_loss_weight", "gate_noise_scale", "budget_decisions", "stage_input", "sparse_training",
)  # fmt: skip

# TrainingArguments defaults of this script (the built-in quick run); every one can be changed on the command line.
SCRIPT_TRAINING_DEFAULTS = {
    "output_dir": "outputs/msvit-digits",
    "do_train": True,
    "do_eval": True,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 2,  # per phase
    "logging_steps": 10,
    "learning_rate": 5e-4,  # joint phase, backbone and head
    # The gate-only and joint phases warm up over their first tenth: chosen on validation over 5 seeds per target
    # (benchmarks/study/results.md, "The upcycled recipe's choice": the seeds spread less at the same accuracy).
    "warmup_steps": 0.1,
    "weight_decay": 0.05,
    "num_train_epochs": 10.0,  # joint phase
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 128,
    "remove_unused_columns": False,  # the transform needs the image column
    "seed": 42,
    "report_to": "none",
}
# `TrainingArguments` defaults of one model type over the script's (the command line still wins). DiT's later phases do
# not warm up: with the warmup its package recipe scored 0.839 against 0.861 on validation at budget 0.8, though 0.826
# against 0.676 at 0.6 (benchmarks/dit_study/results.md, "sparse_warmup"; the rule, fixed before those runs, asked for
# no more than a point lost at either budget).
MODEL_TYPE_TRAINING_DEFAULTS = {"dit_routing": {"warmup_steps": 0.0}}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to start from (local dir or Hub id): a ViT (upcycled to MSViT), a PVTv2 (upcycled to "
            "DiT), or an MSViT/DiT checkpoint to fine-tune further. Without it, a small backbone is trained from "
            "scratch first (see --backbone_epochs)."
        },
    )
    model_type: str = field(
        default="msvit",
        metadata={
            "help": "`msvit` or `dit_routing`: the model to build when training from a fresh config.",
            "choices": ["msvit", "dit_routing"],
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Config to use if not the model's."})
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use if not the model's."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store models downloaded from the Hub."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit id)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private checkpoints."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code from the Hub (other checkpoints)."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialize a classifier whose size does not match the number of labels."}
    )
    # MSViT gate settings (None: the config's, or FRESH_MODEL_DEFAULTS for a fresh model)
    gbas_target_ratio: float | None = field(
        default=None, metadata={"help": "MSViT: target fraction of coarse regions tokenized fine (GBaS prior mean)."}
    )
    gbas_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the GBaS loss in `loss`."}
    )
    gbas_hyperprior_std: float | None = field(
        default=None,
        metadata={"help": "MSViT: spread allowed around gbas_target_ratio for the per-position learned priors."},
    )
    gbas_gather_across_processes: bool | None = field(
        default=None,
        metadata={"help": "MSViT: gather the gate values of all processes before the GBaS loss (global-batch stats)."},
    )
    gate_threshold: float | None = field(
        default=None, metadata={"help": "MSViT: inference threshold on the gate probability."}
    )
    gate_noise_scale: float | None = field(
        default=None, metadata={"help": "MSViT and DiT: noise of the training decisions (0: inference's decisions)."}
    )
    gate_level_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the level term (the gate's own level at the target)."}
    )
    gate_logit_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the logit penalty (mean squared gate logit)."}
    )
    gate_training_mode: str | None = field(
        default=None, metadata={"help": "MSViT: `masked_attention` or `straight_through` (selected tokens only)."}
    )
    joint_gate_training_mode: str | None = field(
        default=None,
        metadata={
            "help": "MSViT: `gate_training_mode` of the joint phase (e.g. `straight_through`: only the selected "
            "tokens, a cheaper step); default: the config's, as in the gate-only phase."
        },
    )
    joint_gate_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Learning rate of the gates in the joint phase (default: --gate_learning_rate; 0: frozen)."},
    )
    joint_gate_noise_scale: float | None = field(
        default=None,
        metadata={
            "help": "MSViT: `gate_noise_scale` of the joint phase (default: 0.5, sampled decisions, for new gates; "
            "the config's for an MSViT checkpoint)."
        },
    )
    joint_gate_sampling_level: str | None = field(
        default=None,
        metadata={
            "help": "MSViT: `gate_sampling_level` of the joint phase: `target` (default for new gates: the batch's "
            "target fraction of regions fine) or `threshold`; the config's for an MSViT checkpoint."
        },
    )
    joint_distillation_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of a distillation term in the joint phase: the KL divergence from the predictions of the "
            "static ViT / PVTv2 the model was upcycled from (trained in this run, or --model_name_or_path), frozen. "
            "0: off. Not for an MSViT / DiT checkpoint (no static model to distil from)."
        },
    )
    joint_distillation_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of both distributions in the distillation term."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Any other config fields of the dynamic model, as transformers' examples take them: "
            "`field=value,field=value` (e.g. `gbas_input=samples,gate_level_calibration=false`)."
        },
    )
    coarse_patch_size: int | None = field(default=None, metadata={"help": "MSViT: side of a coarse region in pixels."})
    gate_input: str | None = field(default=None, metadata={"help": "MSViT: `pixels` or `embeddings`."})
    gate_hidden_size: int | None = field(default=None, metadata={"help": "MSViT: width of the gate MLP."})
    gate_num_layers: int | None = field(default=None, metadata={"help": "MSViT: layers of the gate MLP."})
    # DiT routing settings
    budget_target: float | None = field(
        default=None, metadata={"help": "DiT: target compute relative to the static PVTv2."}
    )
    budget_loss_weight: float | None = field(
        default=None, metadata={"help": "DiT: weight of the budget loss in `loss`."}
    )
    budget_decisions: str | None = field(
        default=None, metadata={"help": "DiT: `deterministic` (what inference takes) or `sampled` (the paper)."}
    )
    stage_input: str | None = field(
        default=None, metadata={"help": "DiT: `full_map` or `masked_map` (the paper's Eq. 4 read literally)."}
    )
    sparse_training: bool | None = field(
        default=None, metadata={"help": "DiT: train only the stages some token runs (a cheaper step; see DiTConfig)."}
    )
    # Fresh backbone (no --model_name_or_path)
    image_size: int | None = field(
        default=None, metadata={"help": "Input size for a fresh model (default: the built-in canvas size, else 224)."}
    )
    patch_size: int = field(
        default=16, metadata={"help": "Fresh ViT: fine patch size (MSViT coarse regions default to 2x this)."}
    )
    # The study's ViT/16: 0.915 on validation in phase 0 against 0.878 for the former 96 x 3, which was no faster on 2
    # cores (the data pipeline dominates; benchmarks/study/results.md, "The main job's phase 0").
    hidden_size: int = field(default=128, metadata={"help": "Fresh ViT: width."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Fresh ViT: depth."})
    num_attention_heads: int = field(default=4, metadata={"help": "Fresh ViT: attention heads."})
    intermediate_size: int = field(default=256, metadata={"help": "Fresh ViT: MLP width."})
    pvt_variant: str | None = field(
        default=None,
        metadata={
            "help": "Fresh DiT: PVTv2 shape of the backbone, 'b0'..'b5' (default: a smaller one, hidden sizes "
            "32/64/96/128 and one block per stage, for quick runs)."
        },
    )
    backbone_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Epochs of static backbone training before upcycling (fresh models only; default per model type: "
            "FRESH_MODEL_DEFAULTS)."
        },
    )
    backbone_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: steps of the backbone phase (overrides --backbone_epochs)."}
    )
    backbone_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the static backbone phase (default per model type: FRESH_MODEL_DEFAULTS)."
        },
    )
    backbone_warmup_steps: float | None = field(
        default=None,
        metadata={
            "help": "Linear warmup of the static backbone phase: steps, or a fraction of the phase if < 1 (default "
            "per model type: FRESH_MODEL_DEFAULTS; --warmup_steps is the later phases')."
        },
    )
    backbone_only: bool = field(
        default=False,
        metadata={
            "help": "Fresh models: stop after the static backbone phase (the trained ViT / PVTv2 is in "
            "<output_dir>/phase-backbone/final), e.g. to train the static baselines of a comparison the same way."
        },
    )
    # Recipe
    gate_only_epochs: float = field(
        default=2.0,
        metadata={"help": "Epochs of gate-only training (backbone frozen) before joint fine-tuning; 0 to skip."},
    )
    gate_only_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: steps of the gate-only phase (overrides --gate_only_epochs)."}
    )
    gate_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the gate parameters, in the gate-only phase and in the joint phase (where the "
            "rest trains at --learning_rate). Default: FRESH_MODEL_DEFAULTS for fresh models (1e-2), 1e-3 when "
            "starting from a checkpoint."
        },
    )


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Dataset on the Hub (or a local `datasets` script/dir). Default: the built-in digits."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_dir: str | None = field(
        default=None, metadata={"help": "Folder of training images (imagefolder layout: one subfolder per class)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of validation images (imagefolder)."})
    train_val_split: float | None = field(
        default=0.15,
        metadata={"help": "Fraction of train split off for validation when there is no validation split."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Truncate the training set (debugging, quick runs)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    image_column_name: str = field(default="image", metadata={"help": "Column with the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column with the labels."})
    augment: bool = field(
        default=False, metadata={"help": "Random resized crop (scale 0.8-1) on training images. No flips."}
    )
    canvas_size: int = field(
        default=96, metadata={"help": "Built-in dataset: canvas side in pixels (a multiple of 32)."}
    )
    digit_copies: int = field(default=2, metadata={"help": "Built-in dataset: renderings of each handwritten digit."})


@dataclass
class Data:
    splits: datasets.DatasetDict  # train / validation, raw images
    name: str | None  # `--dataset_name` (a Hub id or a local dataset folder), None otherwise
    builtin: bool  # the built-in digits-on-canvas data
    id2label: dict[int, str]
    label2id: dict[str, int]


def load_raw_dataset(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    if data_args.dataset_name is not None:
        return datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
    if data_args.train_dir is not None or data_args.validation_dir is not None:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        return datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
    return builtin_data.load_digits_on_canvas(canvas_size=data_args.canvas_size, copies=data_args.digit_copies)


def check_columns(dataset: datasets.DatasetDict, data_args: DataTrainingArguments) -> None:
    for split_name, split in dataset.items():
        for column, flag in ((data_args.image_column_name, "--image_column_name"),
                             (data_args.label_column_name, "--label_column_name")):  # fmt: skip
            if column not in split.column_names:
                raise ValueError(f"Column {column!r} not in split {split_name!r} ({split.column_names}); set {flag}.")


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int) -> Data:
    dataset = load_raw_dataset(data_args, model_args)
    if "validation" not in dataset and "test" in dataset:
        dataset["validation"] = dataset.pop("test")
    if "validation" not in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    check_columns(dataset, data_args)
    for split_name, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and split_name in dataset:
            dataset[split_name] = dataset[split_name].select(range(min(limit, len(dataset[split_name]))))
    feature = dataset["train"].features[data_args.label_column_name]
    names = (
        list(feature.names)
        if hasattr(feature, "names")
        else [str(v) for v in sorted(set(dataset["train"][data_args.label_column_name]))]
    )
    id2label = dict(enumerate(names))
    builtin = data_args.dataset_name is None and data_args.train_dir is None and data_args.validation_dir is None
    return Data(dataset, data_args.dataset_name, builtin, id2label, {name: i for i, name in id2label.items()})


def with_transforms(data: Data, image_processor, data_args: DataTrainingArguments, seed: int) -> dict:
    """The splits with `ImageTransform` applied on the fly (augmentation on `train` only, with `--augment`)."""
    return {
        name: split.with_transform(
            ImageTransform(
                image_processor,
                data_args.image_column_name,
                data_args.label_column_name,
                augment=data_args.augment and name == "train",
                seed=seed,
            )
        )
        for name, split in data.splits.items()
    }


@dataclass
class StartingPoint:
    model_type: str  # of the dynamic model: `msvit` or `dit_routing`
    image_processor: object
    backbone: transformers.PreTrainedModel | None = None  # static ViT / PVTv2 to upcycle (trained first if `fresh`)
    model: transformers.PreTrainedModel | None = None  # an MSViT / DiT checkpoint to fine-tune further
    fresh: bool = False  # built from scratch, no --model_name_or_path


def gate_learning_rate(model_args: ModelArguments, start: StartingPoint) -> float:
    """`--gate_learning_rate` if given; for new gates (upcycling) the model type's default; for a dynamic checkpoint
    continued (its gates trained) the gentler checkpoint default."""
    if model_args.gate_learning_rate is not None:
        return model_args.gate_learning_rate
    if start.model is not None:
        return CHECKPOINT_GATE_LEARNING_RATE
    return FRESH_MODEL_DEFAULTS[start.model_type].gate_learning_rate


def joint_phase(model_args: ModelArguments, start: StartingPoint, teacher=None) -> phases.JointPhase:
    """What the joint phase changes: the `--joint_*` values given; new MSViT gates (upcycled in this run) otherwise
    sample their decisions (`JOINT_PHASE_NOISE_SCALE`) at the target level (`JOINT_PHASE_SAMPLING_LEVEL`).
    `teacher`: the static model upcycled (None when the run started from an MSViT / DiT checkpoint)."""
    noise, level = model_args.joint_gate_noise_scale, model_args.joint_gate_sampling_level
    if start.model is None and start.model_type == "msvit":
        noise = JOINT_PHASE_NOISE_SCALE if noise is None else noise
        level = JOINT_PHASE_SAMPLING_LEVEL if level is None else level
    distillation = None
    if model_args.joint_distillation_weight:
        if teacher is None:
            raise ValueError(
                "--joint_distillation_weight distils from the static ViT / PVTv2 the model is upcycled from, and a "
                "run that continues an MSViT / DiT checkpoint has none: give the static checkpoint as "
                "--model_name_or_path, or leave --joint_distillation_weight at 0."
            )
        distillation = Distillation(
            teacher, model_args.joint_distillation_weight, model_args.joint_distillation_temperature
        )
    return phases.JointPhase(
        model_args.joint_gate_training_mode, model_args.joint_gate_learning_rate, noise, level, distillation
    )


def fresh_default(model_args: ModelArguments, model_type: str, name: str):
    """`--<name>` if given, else the model type's `FRESH_MODEL_DEFAULTS` value (phase 0's settings)."""
    value = getattr(model_args, name)
    return getattr(FRESH_MODEL_DEFAULTS[model_type], name) if value is None else value


def backbone_length(model_args: ModelArguments, model_type: str) -> dict:
    """Phase 0's length overrides: `--backbone_max_steps` if > 0, else the epochs (`fresh_default`)."""
    return phases.phase_length(fresh_default(model_args, model_type, "backbone_epochs"), model_args.backbone_max_steps)


def backbone_warmup_steps(model_args: ModelArguments, model_type: str) -> int | float:
    """`--backbone_warmup_steps` or the model type's default; whole steps as an int (`TrainingArguments` reads a
    float under 1 as a fraction of the phase)."""
    steps = fresh_default(model_args, model_type, "backbone_warmup_steps")
    if steps < 0 or (steps >= 1 and steps != int(steps)):
        raise ValueError(f"--backbone_warmup_steps {steps}: give a fraction in [0, 1) or a whole number of steps.")
    return steps if steps < 1 else int(steps)


def config_overrides(model_args: ModelArguments, model_type: str, fresh: bool) -> dict:
    """Dynamic-model config fields: the command-line values given, over the fresh-run defaults of `model_type`."""
    names = MSVIT_CONFIG_ARGUMENTS if model_type == "msvit" else DIT_CONFIG_ARGUMENTS
    values = dict(FRESH_MODEL_DEFAULTS[model_type].config) if fresh else {}
    values.update({name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None})
    extra = phases.parse_config_overrides(model_args.config_overrides)
    known = vars(CONFIG_CLASSES[model_type]())
    unknown = sorted(set(extra) - set(known))
    if unknown:
        raise ValueError(f"--config_overrides names no field of the {model_type} config: {unknown}.")
    return {**values, **extra}


def dynamic_image_processor(model_type: str, source=None, size=None):
    """Our image processor for `model_type`, copying size/mean/std/resample from `source` (e.g. the ViT's)."""
    keys = ("size", "image_mean", "image_std", "resample", "rescale_factor")
    kwargs = {key: getattr(source, key) for key in keys if getattr(source, key, None) is not None}
    if size is not None:
        height, width = (size, size) if isinstance(size, int) else size
        kwargs["size"] = {"height": height, "width": width}
    return IMAGE_PROCESSORS[model_type](**kwargs)


def fresh_backbone(model_args: ModelArguments, image_size: int, data: Data):
    """A small randomly initialized static backbone: ViT for MSViT, PVTv2 for DiT."""
    common = {
        "num_labels": len(data.id2label),
        "id2label": data.id2label,
        "label2id": data.label2id,
        "image_size": image_size,
    }
    if model_args.model_type == "msvit":
        vit_fields = ("patch_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        config = transformers.ViTConfig(**{name: getattr(model_args, name) for name in vit_fields}, **common)
    elif model_args.pvt_variant:
        config = transformers.PvtV2Config(**DiTConfig.from_variant(model_args.pvt_variant).pvt_v2_shape(), **common)
    else:
        config = transformers.PvtV2Config(
            hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4], **common
        )
    return AutoModelForImageClassification.from_config(config)


def load_start_model(model_args: ModelArguments, data: Data) -> StartingPoint:
    """The starting point for `--model_name_or_path`: a ViT / PVTv2 to upcycle, or an MSViT / DiT checkpoint."""
    path = model_args.model_name_or_path
    hub_kwargs = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}
    auto_kwargs = dict(trust_remote_code=model_args.trust_remote_code, **hub_kwargs)
    config = AutoConfig.from_pretrained(model_args.config_name or path, **auto_kwargs)
    try:
        source_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name or path, **auto_kwargs)
    except (OSError, ValueError):
        source_processor = None
    if config.model_type not in (*DYNAMIC_MODEL_TYPES, *IMAGE_PROCESSORS):
        raise ValueError(
            f"--model_name_or_path {path!r} has model_type {config.model_type!r}; expected a ViT ('vit', upcycled to "
            "MSViT), a PVTv2 ('pvt_v2', upcycled to DiT) or an MSViT / DiT checkpoint."
        )
    load_kwargs = {"num_labels": len(data.id2label), "id2label": data.id2label, "label2id": data.label2id}
    if config.model_type in IMAGE_PROCESSORS:  # our own checkpoint, fine-tuned further: its config with our overrides
        for key, value in {**config_overrides(model_args, config.model_type, fresh=False), **load_kwargs}.items():
            setattr(config, key, value)
        load_kwargs = {"config": config}
    model = AutoModelForImageClassification.from_pretrained(
        path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **load_kwargs, **auto_kwargs
    )
    model_type = DYNAMIC_MODEL_TYPES.get(config.model_type, config.model_type)
    processor = dynamic_image_processor(model_type, source_processor, size=model.config.image_size)
    if config.model_type in IMAGE_PROCESSORS:
        return StartingPoint(model_type, processor, model=model)
    return StartingPoint(model_type, processor, backbone=model)


def build_start(model_args: ModelArguments, data: Data, data_args: DataTrainingArguments) -> StartingPoint:
    if model_args.model_name_or_path is not None:
        return load_start_model(model_args, data)
    image_size = model_args.image_size or (data_args.canvas_size if data.builtin else 224)
    backbone = fresh_backbone(model_args, image_size, data)
    processor = dynamic_image_processor(model_args.model_type, size=image_size)
    return StartingPoint(model_args.model_type, processor, backbone=backbone, fresh=True)


def upcycle(start: StartingPoint, model_args: ModelArguments):
    """The MSViT / DiT built from the static backbone: every weight reused, only the gates are new."""
    overrides = config_overrides(model_args, start.model_type, start.fresh)
    if start.model_type == "msvit" and "coarse_patch_size" not in overrides:
        patch = start.backbone.config.patch_size
        overrides["coarse_patch_size"] = 2 * (patch[0] if isinstance(patch, (list, tuple)) else patch)
    return UPCYCLERS[start.backbone.config.model_type](start.backbone.eval(), **overrides)


def train_backbone(start: StartingPoint, runner: phases.PhaseRunner, model_args: ModelArguments) -> dict:
    """Phase 0: the static backbone from scratch. Returns its eval metrics (`backbone_eval_*`), if evaluated."""
    overrides = {
        **backbone_length(model_args, start.model_type),
        "learning_rate": fresh_default(model_args, start.model_type, "backbone_learning_rate"),
        "warmup_steps": backbone_warmup_steps(model_args, start.model_type),
    }
    runner.run("backbone", start.backbone, overrides)
    return runner.evaluate(start.backbone, "backbone_eval", phase="backbone")


@dataclass
class TrainSummary:
    backbone_eval: dict = field(default_factory=dict)  # `backbone_eval_*` of phase 0
    phases: dict = field(default_factory=dict)  # train metrics per phase name (`gate`, `joint`)
    gate_learning_rate: float | None = None


def train(start: StartingPoint, runner: phases.PhaseRunner, model_args: ModelArguments):
    """All phases. Returns `(model, TrainSummary)`; `model` is None after `--backbone_only`."""
    summary = TrainSummary()
    if start.fresh and phases.runs(backbone_length(model_args, start.model_type)):
        summary.backbone_eval = train_backbone(start, runner, model_args)
    if start.fresh and model_args.backbone_only:
        return None, summary
    model = start.model if start.model is not None else upcycle(start, model_args)
    teacher = start.backbone if model_args.joint_distillation_weight else None  # kept only to distil from
    start.backbone = None
    summary.gate_learning_rate = gate_learning_rate(model_args, start)
    gate_length = phases.phase_length(model_args.gate_only_epochs, model_args.gate_only_max_steps)
    joint = joint_phase(model_args, start, teacher)
    summary.phases = runner.train_gates_then_jointly(model, gate_length, summary.gate_learning_rate, joint)
    return model, summary


def card_arguments(model_args: ModelArguments, data: Data, summary: TrainSummary) -> dict:
    """What `hub.build_model_card` needs besides the model, the metrics and the `TrainingArguments`."""
    return {
        "base_model": model_args.model_name_or_path,
        "dataset_name": data.name,
        "builtin_data": data.builtin,
        "extra_settings": {
            "gate_only_epochs": model_args.gate_only_epochs,
            "gate_learning_rate": summary.gate_learning_rate,
            "backbone_epochs (from scratch)": (
                None
                if model_args.model_name_or_path
                else fresh_default(model_args, model_args.model_type, "backbone_epochs")
            ),
            "backbone_eval_accuracy": summary.backbone_eval.get("backbone_eval_accuracy"),
        },
    }


def summary_lines(model, eval_metrics: dict, train_metrics: dict, backbone_eval: dict) -> list[str]:
    """Accuracy, token ratio and GMACs of training (sampled gates, last logging window) and evaluation."""
    ratio = ratio_metric_name(model)
    static = static_macs(model)

    columns = ((train_metrics, "train"), (eval_metrics, "eval"), (eval_metrics, "test"))

    def row(label, key, fmt):
        values = [metrics.get(f"{prefix}_{key}") for metrics, prefix in columns]
        return f"  {label:<22}" + "".join(f"{'-' if v is None else format(v, fmt):>14}" for v in values)

    lines = [f"  {'':<22}{'train':>14}{'eval':>14}{'test':>14}", row("accuracy", "accuracy", ".4f")]
    lines.append(row(ratio, ratio, ".3f"))
    lines += [row("GMACs per image", "gmacs", ".5f"), row("compute vs static", "macs_fraction", ".1%")]
    if static:
        lines.append(f"  (static backbone: {static / 1e9:.5f} GMACs per image)")
    if "backbone_eval_accuracy" in backbone_eval:
        lines.append(f"  (static backbone trained in phase 0: accuracy {backbone_eval['backbone_eval_accuracy']:.4f})")
    return lines


def print_summary(model, training_args, eval_metrics, summary: TrainSummary, seconds: float) -> None:
    path = os.path.abspath(training_args.output_dir)
    lines = ["", "=" * 78, f"Finished in {seconds:.0f} s (torch threads per process: {torch.get_num_threads()})."]
    lines += summary_lines(model, eval_metrics, phases.last_phase_metrics(summary.phases), summary.backbone_eval)
    lines += [
        "  train: training forward passes (sampled gates), mean over the last logging window of the last phase",
        f"Checkpoint: {path} (metrics: all_results.json)",
        "Load it with:",
        "  import hf_msvit; from transformers import AutoModelForImageClassification",
        f"  model = AutoModelForImageClassification.from_pretrained({path!r})",
        "(without hf_msvit installed: add trust_remote_code=True)",
        "=" * 78,
    ]
    print("\n".join(lines))


def parse_arguments(argv=None, model_type: str | None = None) -> tuple:
    """`(ModelArguments, DataTrainingArguments, TrainingArguments)` from the command line, over the script's defaults
    and those of `model_type` (`MODEL_TYPE_TRAINING_DEFAULTS`; the dynamic model type the run trains)."""
    defaults = {**SCRIPT_TRAINING_DEFAULTS, **MODEL_TYPE_TRAINING_DEFAULTS.get(model_type, {})}
    return phases.parse_args((ModelArguments, DataTrainingArguments, TrainingArguments), defaults, argv)


def main(argv=None) -> dict:
    started = time.time()
    model_args, data_args, training_args = parse_arguments(argv)
    phases.setup_logging(training_args, logger)
    phases.check_world_size(training_args)
    set_seed(training_args.seed)

    data = load_data(data_args, model_args, training_args.seed)
    start = build_start(model_args, data, data_args)
    if start.model_type in MODEL_TYPE_TRAINING_DEFAULTS:  # known now (a checkpoint's type decides it)
        training_args = parse_arguments(argv, start.model_type)[-1]
    runner = phases.PhaseRunner.start(
        training_args, trainer_class=DynamicComputeTrainer, image_processor=start.image_processor,
        splits=with_transforms(data, start.image_processor, data_args, training_args.seed), data_collator=collate_fn,
        compute_metrics_for=lambda model: make_compute_metrics(ratio_metric_name(model), static_macs(model)),
    )  # fmt: skip

    model, summary = train(start, runner, model_args)
    if model is None:  # --backbone_only
        path = os.path.join(training_args.output_dir, "phase-backbone", "final")
        print(f"Static backbone trained: {path} (eval: {summary.backbone_eval})")
        return summary.backbone_eval
    final = runner.evaluate_final(model)
    runner.save_results(model, {"train": phases.last_phase_metrics(summary.phases), **final})
    eval_metrics = {**final["eval"], **final["test"]}
    card = card_arguments(model_args, data, summary)
    push_error = phases.save_and_push(model, training_args, start.image_processor, eval_metrics=eval_metrics, **card)
    if training_args.process_index == 0:
        print_summary(model, training_args, eval_metrics, summary, time.time() - started)
    if push_error is not None:
        raise SystemExit(1)
    return eval_metrics


if __name__ == "__main__":
    main()
