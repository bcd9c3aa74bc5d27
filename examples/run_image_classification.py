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
`--resume_from_checkpoint`, `--push_to_hub`, ...). No torchvision needed.

The run is a sequence of phases, each one `Trainer` run with its own folder under `--output_dir`:

1. `phase-backbone` (only without `--model_name_or_path`): a small static ViT (PVTv2 for DiT) is trained from
   scratch for `--backbone_epochs`. It stands in for the pretrained checkpoint you would normally start from.
2. Upcycling: `MSViTForImageClassification.from_vit_pretrained` / `DiTForImageClassification.from_pvt_v2_pretrained`
   reuses every backbone weight; only the gates (and GBaS priors) are new.
3. `phase-gate`: `--gate_only_epochs` with the backbone and head frozen, only the gates learn (lr `--gate_learning_rate`).
4. `phase-joint`: `--num_train_epochs` of joint fine-tuning of everything (lr `--learning_rate`).

The final model, its image processor and a model card go to `--output_dir` (loadable with the Auto classes after
`import hf_msvit`, or with `trust_remote_code=True` without it). With no dataset arguments the script trains on the
built-in digits-on-canvas dataset (`hf_msvit.data`), which needs no download.

Examples:

    python examples/run_image_classification.py                       # built-in data, from scratch, ~3 min on CPU
    python examples/run_image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name beans --output_dir outputs/msvit-beans --gbas_target_ratio 0.5 --gate_only_epochs 1 \\
        --num_train_epochs 3 --learning_rate 2e-5 --per_device_train_batch_size 32
    torchrun --nproc_per_node 2 examples/run_image_classification.py       # 2 processes; on CPU-only machines
                                                                            # the script picks CPU + gloo itself
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import datasets
import transformers
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_msvit import data as builtin_data
from hf_msvit.training import (
    DynamicComputeTrainer,
    ImageTransform,
    collate_fn,
    freeze_all_but_gates,
    get_model_classes,
    make_compute_metrics,
    prepare_for_remote_code,
    ratio_metric_name,
    static_macs,
    unfreeze_all,
)


logger = logging.getLogger(__name__)

DONE_MARKER = "phase_complete.json"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to start from (local dir or Hub id): a ViT (upcycled to MSViT), a PVTv2 (upcycled to "
            "DiT), or an MSViT/DiT checkpoint to fine-tune further. Without it, a small backbone is trained from scratch "
            "first (see --backbone_epochs)."
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
    # MSViT gate settings
    gbas_target_ratio: float | None = field(
        default=None,
        metadata={
            "help": "MSViT: target fraction of coarse regions tokenized fine (GBaS hyperprior mean). Default: the config's (0.5), 0.3 for fresh models."
        },
    )
    gbas_loss_weight: float | None = field(
        default=None, metadata={"help": "MSViT: weight of the GBaS loss in `loss`."}
    )
    gbas_hyperprior_std: float | None = field(
        default=None,
        metadata={"help": "MSViT: spread allowed around gbas_target_ratio for the per-position learned priors."},
    )
    gbas_gather_across_processes: bool = field(
        default=False,
        metadata={
            "help": "MSViT: gather gate values of all processes before the GBaS loss (batch statistics of the global batch)."
        },
    )
    gate_threshold: float | None = field(
        default=None, metadata={"help": "MSViT: inference threshold on the gate probability."}
    )
    coarse_patch_size: int | None = field(default=None, metadata={"help": "MSViT: side of a coarse region in pixels."})
    gate_input: str | None = field(default=None, metadata={"help": "MSViT: `pixels` or `embeddings`."})
    gate_hidden_size: int | None = field(
        default=None, metadata={"help": "MSViT: width of the gate MLP (fresh models: 64)."}
    )
    gate_num_layers: int | None = field(default=None, metadata={"help": "MSViT: layers of the gate MLP."})
    # DiT routing settings
    budget_target: float | None = field(
        default=None, metadata={"help": "DiT: target compute relative to the static PVTv2."}
    )
    budget_loss_weight: float | None = field(
        default=None, metadata={"help": "DiT: weight of the budget loss in `loss`."}
    )
    # Fresh backbone (no --model_name_or_path)
    image_size: int | None = field(
        default=None, metadata={"help": "Input size for a fresh model (default: the built-in canvas size, else 224)."}
    )
    patch_size: int = field(
        default=16, metadata={"help": "Fresh ViT: fine patch size (MSViT coarse regions default to 2x this)."}
    )
    hidden_size: int = field(default=96, metadata={"help": "Fresh ViT: width."})
    num_hidden_layers: int = field(default=3, metadata={"help": "Fresh ViT: depth."})
    num_attention_heads: int = field(default=3, metadata={"help": "Fresh ViT: attention heads."})
    intermediate_size: int = field(default=192, metadata={"help": "Fresh ViT: MLP width."})
    backbone_epochs: float = field(
        default=8.0, metadata={"help": "Epochs of static backbone training before upcycling (fresh models only)."}
    )
    backbone_learning_rate: float = field(
        default=2e-3, metadata={"help": "Learning rate of the static backbone phase."}
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
            "help": "Learning rate of the gate-only phase (default: 1e-2 for fresh models, 1e-3 when upcycling a checkpoint)."
        },
    )
    backbone_max_steps: int = field(
        default=-1, metadata={"help": "If > 0: steps of the backbone phase (overrides --backbone_epochs)."}
    )
    backbone_only: bool = field(
        default=False,
        metadata={
            "help": "Fresh models: stop after the static backbone phase (the trained ViT / PVTv2 is in "
            "<output_dir>/phase-backbone/final), e.g. to train the static baselines of a comparison the same way."
        },
    )
    pvt_variant: str | None = field(
        default=None,
        metadata={
            "help": "Fresh DiT: PVTv2 shape of the backbone, 'b0'..'b5' (default: a smaller one, hidden sizes "
            "32/64/96/128 and one block per stage, for quick runs)."
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
class ScriptTrainingArguments(TrainingArguments):
    """`TrainingArguments` with defaults for the built-in quick run (every one can be changed on the command line)."""

    output_dir: str | None = field(
        default="outputs/msvit-digits", metadata={"help": "Where checkpoints and the final model go."}
    )
    do_train: bool = field(default=True, metadata={"help": "Run training."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate on the validation split."})
    eval_strategy: str = field(default="epoch", metadata={"help": "When to evaluate during training."})
    save_strategy: str = field(default="epoch", metadata={"help": "When to save checkpoints."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Checkpoints kept per phase."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X steps."})
    learning_rate: float = field(default=5e-4, metadata={"help": "Learning rate of the joint fine-tuning phase."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    num_train_epochs: float = field(default=10.0, metadata={"help": "Epochs of joint fine-tuning."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device for training."})
    per_device_eval_batch_size: int = field(default=128, metadata={"help": "Batch size per device for evaluation."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the transform needs the image column."}
    )
    seed: int = field(default=42, metadata={"help": "Random seed."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Integrations to report to."})


# ------------------------------------------------------------------------------------------------------------------


def load_data(data_args: DataTrainingArguments, model_args: ModelArguments, seed: int):
    """Returns `(DatasetDict with train/validation, dataset name for the card or None)`."""
    if data_args.dataset_name is not None:
        dataset = datasets.load_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=model_args.cache_dir,
            token=model_args.token,
        )
        name = data_args.dataset_name
    elif data_args.train_dir is not None or data_args.validation_dir is not None:
        data_files = {}
        if data_args.train_dir is not None:
            data_files["train"] = os.path.join(data_args.train_dir, "**")
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = datasets.load_dataset("imagefolder", data_files=data_files, cache_dir=model_args.cache_dir)
        name = None
    else:
        dataset = builtin_data.load_digits_on_canvas(canvas_size=data_args.canvas_size, copies=data_args.digit_copies)
        name = builtin_data.DATASET_NAME

    if "validation" not in dataset and "test" in dataset:
        dataset["validation"] = dataset.pop("test")
    if "validation" not in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]

    for split_name in dataset:
        columns = dataset[split_name].column_names
        for column, flag in (
            (data_args.image_column_name, "--image_column_name"),
            (data_args.label_column_name, "--label_column_name"),
        ):
            if column not in columns:
                raise ValueError(f"Column {column!r} not found in split {split_name!r} ({columns}); set {flag}.")
    if data_args.max_train_samples is not None and "train" in dataset:
        dataset["train"] = dataset["train"].select(range(min(data_args.max_train_samples, len(dataset["train"]))))
    if data_args.max_eval_samples is not None and "validation" in dataset:
        dataset["validation"] = dataset["validation"].select(
            range(min(data_args.max_eval_samples, len(dataset["validation"])))
        )
    return dataset, name


def label_maps(dataset, label_column: str):
    feature = dataset["train"].features[label_column]
    if hasattr(feature, "names"):
        names = list(feature.names)
    else:
        names = [str(v) for v in sorted(set(dataset["train"][label_column]))]
    id2label = {i: name for i, name in enumerate(names)}
    return id2label, {name: i for i, name in id2label.items()}


def gate_overrides(model_args: ModelArguments, model_type: str) -> dict:
    """Config fields set from the command line (only those given)."""
    if model_type == "msvit":
        names = (
            "gbas_target_ratio",
            "gbas_loss_weight",
            "gbas_hyperprior_std",
            "gate_threshold",
            "coarse_patch_size",
            "gate_input",
            "gate_hidden_size",
            "gate_num_layers",
        )
        values = {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}
        values["gbas_gather_across_processes"] = model_args.gbas_gather_across_processes
        return values
    names = ("budget_target", "budget_loss_weight")
    return {name: getattr(model_args, name) for name in names if getattr(model_args, name) is not None}


def dynamic_image_processor(model_type: str, source=None, size: int | None = None):
    """Our image processor for `model_type`, copying size/mean/std/resample from `source` (e.g. the ViT's)."""
    processor_class = get_model_classes(model_type)["image_processor"]
    kwargs = {}
    if source is not None:
        for key in ("size", "image_mean", "image_std", "resample", "rescale_factor"):
            if getattr(source, key, None) is not None:
                kwargs[key] = getattr(source, key)
    if size is not None:
        kwargs["size"] = {"height": size, "width": size}
    return processor_class(**kwargs)


def fresh_backbone(model_args: ModelArguments, image_size: int, id2label, label2id):
    """A small randomly initialized static backbone: ViT for MSViT, PVTv2 for DiT."""
    common = dict(num_labels=len(id2label), id2label=id2label, label2id=label2id, image_size=image_size)
    if model_args.model_type == "msvit":
        config = transformers.ViTConfig(
            patch_size=model_args.patch_size,
            hidden_size=model_args.hidden_size,
            num_hidden_layers=model_args.num_hidden_layers,
            num_attention_heads=model_args.num_attention_heads,
            intermediate_size=model_args.intermediate_size,
            **common,
        )
        return transformers.ViTForImageClassification(config)
    if model_args.pvt_variant:
        shape = get_model_classes("dit_routing")["config"].from_variant(model_args.pvt_variant)
        fields = ("hidden_sizes", "depths", "num_attention_heads", "mlp_ratios", "sr_ratios", "patch_sizes", "strides")
        config = transformers.PvtV2Config(**{name: getattr(shape, name) for name in fields}, **common)
    else:
        config = transformers.PvtV2Config(
            hidden_sizes=[32, 64, 96, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 2, 4], **common
        )
    return transformers.PvtV2ForImageClassification(config)


def upcycle(backbone, model_type: str, overrides: dict):
    classes = get_model_classes(model_type)
    if model_type == "msvit":
        if "coarse_patch_size" not in overrides:
            patch = backbone.config.patch_size
            overrides = {
                **overrides,
                "coarse_patch_size": 2 * (patch[0] if isinstance(patch, (list, tuple)) else patch),
            }
        return classes["classification"].from_vit_pretrained(backbone, **overrides)
    return classes["classification"].from_pvt_v2_pretrained(backbone, **overrides)


def load_start_model(model_args: ModelArguments, id2label, label2id):
    """`(model or None, backbone or None, image processor or None, model_type)` for `--model_name_or_path`."""
    path = model_args.model_name_or_path
    hub_kwargs = dict(cache_dir=model_args.cache_dir, revision=model_args.model_revision, token=model_args.token)
    config = AutoConfig.from_pretrained(
        model_args.config_name or path, trust_remote_code=model_args.trust_remote_code, **hub_kwargs
    )
    label_kwargs = dict(num_labels=len(id2label), id2label=id2label, label2id=label2id)
    try:
        source_processor = AutoImageProcessor.from_pretrained(
            model_args.image_processor_name or path, trust_remote_code=model_args.trust_remote_code, **hub_kwargs
        )
    except (OSError, ValueError):
        source_processor = None
    source_type = config.model_type
    if source_type in ("vit", "pvt_v2"):
        model_type = "msvit" if source_type == "vit" else "dit_routing"
        backbone_class = (
            transformers.ViTForImageClassification
            if source_type == "vit"
            else transformers.PvtV2ForImageClassification
        )
        backbone = backbone_class.from_pretrained(
            path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes, **label_kwargs, **hub_kwargs
        )
        return None, backbone, source_processor, model_type
    if source_type in ("msvit", "dit_routing"):
        for key, value in {**gate_overrides(model_args, source_type), **label_kwargs}.items():
            setattr(config, key, value)
        model = AutoModelForImageClassification.from_pretrained(
            path,
            config=config,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            trust_remote_code=model_args.trust_remote_code,
            **hub_kwargs,
        )
        return model, None, source_processor, source_type
    raise ValueError(
        f"--model_name_or_path {path!r} has model_type {source_type!r}; expected a ViT ('vit', upcycled to MSViT), a "
        "PVTv2 ('pvt_v2', upcycled to DiT) or an MSViT / DiT checkpoint."
    )


# ------------------------------------------------------------------------------------------------------------------


def run_phase(name, model, training_args, overrides, datasets_, image_processor, compute_metrics, resume):
    """One `Trainer` run in `<output_dir>/phase-<name>`. A phase that completed before is skipped on resume.

    Returns `(trainer or None, train metrics)`; the trained weights are in `model` (trained in place).
    """
    phase_dir = os.path.join(training_args.output_dir, f"phase-{name}")
    marker = os.path.join(phase_dir, DONE_MARKER)
    if resume and os.path.isfile(marker):
        logger.info("Phase %r already complete (%s): loading its final weights.", name, phase_dir)
        # from_pretrained applies the checkpoint conversions (e.g. ViT's original key names), then copy in place.
        restored = type(model).from_pretrained(os.path.join(phase_dir, "final"))
        model.load_state_dict(restored.state_dict())
        del restored
        with open(marker) as handle:
            return None, json.load(handle)

    args = dataclasses.replace(
        training_args, output_dir=phase_dir, push_to_hub=False, resume_from_checkpoint=None, **overrides
    )
    trainer = DynamicComputeTrainer(
        model=model,
        args=args,
        train_dataset=datasets_["train"],
        eval_dataset=datasets_.get("validation") if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=image_processor,
        data_collator=collate_fn,
    )
    checkpoint = None
    if resume:
        requested = training_args.resume_from_checkpoint
        if (
            requested
            and os.path.isdir(requested)
            and os.path.abspath(requested).startswith(os.path.abspath(phase_dir) + os.sep)
        ):
            checkpoint = requested
        elif os.path.isdir(phase_dir):
            checkpoint = get_last_checkpoint(phase_dir)
        if checkpoint:
            logger.info("Resuming phase %r from %s", name, checkpoint)
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    trainer.save_model(os.path.join(phase_dir, "final"))
    if trainer.is_world_process_zero():
        trainer.log_metrics(f"train_{name}", metrics)
        with open(marker, "w") as handle:
            json.dump(metrics, handle, indent=2)
    trainer.accelerator.wait_for_everyone()
    return trainer, metrics


def main(argv=None):
    started = time.time()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
        # Several processes on a machine without GPU (torchrun, accelerate launch): train on CPU in one gloo group.
        # Without this, TrainingArguments would give every process its own independent run on the full data.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, ScriptTrainingArguments))
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # Plain `TrainingArguments` from here on, so the `training_args.bin` in checkpoints loads without this script.
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not values["use_cpu"] and not _has_accelerator():
        values["use_cpu"] = True
        values["ddp_backend"] = values["ddp_backend"] or "gloo"
    training_args = TrainingArguments(**values)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)

    env_world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world_size > 1 and training_args.world_size != env_world_size:
        raise RuntimeError(
            f"Launched as {env_world_size} processes, but training would run {training_args.world_size} independent "
            "process(es): each would train alone on the full data. On CPU pass `--use_cpu --ddp_backend gloo` (or set "
            "ACCELERATE_USE_CPU=true)."
        )
    logger.warning(
        "Process rank %s, world size %s, device %s, distributed %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        training_args.parallel_mode.value,
    )
    set_seed(training_args.seed)

    dataset, dataset_name = load_data(data_args, model_args, training_args.seed)
    id2label, label2id = label_maps(dataset, data_args.label_column_name)
    resume = (
        training_args.resume_from_checkpoint is not None
        and str(training_args.resume_from_checkpoint).lower() != "false"
    )
    if not resume and training_args.process_index == 0:
        # A new run: markers of an earlier run in the same folder must not make a later resume skip a phase.
        for phase in ("backbone", "gate", "joint"):
            marker = os.path.join(training_args.output_dir, f"phase-{phase}", DONE_MARKER)
            if os.path.isfile(marker):
                os.remove(marker)

    # ---- model -------------------------------------------------------------------------------------------------
    model, backbone, source_processor = None, None, None
    model_type = model_args.model_type
    if model_args.model_name_or_path is not None:
        model, backbone, source_processor, model_type = load_start_model(model_args, id2label, label2id)
        image_size = None
    else:
        image_size = model_args.image_size or (
            data_args.canvas_size if dataset_name == builtin_data.DATASET_NAME else 224
        )
        backbone = fresh_backbone(model_args, image_size, id2label, label2id)
    image_processor = dynamic_image_processor(model_type, source_processor, size=image_size)
    if image_size is None and backbone is not None:  # follow the backbone's input size
        size = backbone.config.image_size
        image_processor.size = (
            {"height": size, "width": size} if isinstance(size, int) else {"height": size[0], "width": size[1]}
        )

    def with_transforms(augment_train: bool):
        splits = {}
        for split_name, split in dataset.items():
            split = split.with_transform(
                ImageTransform(
                    image_processor,
                    data_args.image_column_name,
                    data_args.label_column_name,
                    augment=augment_train and split_name == "train",
                    seed=training_args.seed,
                )
            )
            splits[split_name] = split
        return splits

    splits = with_transforms(data_args.augment)
    backbone_metrics = None

    # ---- phase 0: static backbone from scratch (only without --model_name_or_path) ------------------------------
    if (
        model is None
        and model_args.model_name_or_path is None
        and (model_args.backbone_epochs > 0 or model_args.backbone_max_steps > 0)
    ):
        trainer, _ = run_phase(
            "backbone",
            backbone,
            training_args,
            dict(
                num_train_epochs=model_args.backbone_epochs,
                max_steps=model_args.backbone_max_steps,
                learning_rate=model_args.backbone_learning_rate,
            ),
            splits,
            image_processor,
            make_compute_metrics(),
            resume,
        )
        if trainer is not None and training_args.do_eval:
            backbone_metrics = trainer.evaluate(metric_key_prefix="backbone_eval")
        del trainer
        gc.collect()
        if model_args.backbone_only:
            path = os.path.join(training_args.output_dir, "phase-backbone", "final")
            print(f"Static backbone trained: {path} (eval: {backbone_metrics})")
            return backbone_metrics or {}

    if model is None:
        overrides = gate_overrides(model_args, model_type)
        if model_args.model_name_or_path is None and model_type == "msvit":
            # A small gate for a small backbone (the default 256-wide gate would cost as much as this encoder), a
            # target that fits the built-in data (the digit covers roughly a quarter of the canvas), and a strong GBaS
            # with a tight hyperprior: with the config defaults the gate of this short run drifts to all-coarse.
            overrides.setdefault("gate_hidden_size", 64)
            overrides.setdefault("gbas_target_ratio", 0.3)
            overrides.setdefault("gbas_loss_weight", 5.0)
            overrides.setdefault("gbas_hyperprior_std", 0.05)
        model = upcycle(backbone.eval(), model_type, overrides)
        del backbone
    prepare_for_remote_code(model, image_processor)
    ratio_name = ratio_metric_name(model)
    compute_metrics = make_compute_metrics(ratio_name, static_macs(model))

    # ---- phase 1: gates only -----------------------------------------------------------------------------------
    trainer = None
    gate_lr = model_args.gate_learning_rate or (1e-2 if model_args.model_name_or_path is None else 1e-3)
    if model_args.gate_only_epochs > 0 or model_args.gate_only_max_steps > 0:
        trainable = freeze_all_but_gates(model)
        logger.info("Gate-only phase: %d trainable tensors (%s, ...)", len(trainable), ", ".join(trainable[:3]))
        trainer, _ = run_phase(
            "gate",
            model,
            training_args,
            dict(
                num_train_epochs=model_args.gate_only_epochs,
                max_steps=model_args.gate_only_max_steps,
                learning_rate=gate_lr,
            ),
            splits,
            image_processor,
            compute_metrics,
            resume,
        )
        unfreeze_all(model)
        del trainer
        gc.collect()

    # ---- phase 2: joint fine-tuning ----------------------------------------------------------------------------
    unfreeze_all(model)
    trainer, train_metrics = None, {}
    if training_args.do_train and (training_args.num_train_epochs > 0 or training_args.max_steps > 0):
        trainer, train_metrics = run_phase(
            "joint", model, training_args, {}, splits, image_processor, compute_metrics, resume
        )
    if trainer is None:  # nothing left to train: a Trainer for evaluation only
        args = dataclasses.replace(training_args, push_to_hub=False, resume_from_checkpoint=None)
        trainer = DynamicComputeTrainer(
            model=model,
            args=args,
            eval_dataset=splits.get("validation"),
            compute_metrics=compute_metrics,
            processing_class=image_processor,
            data_collator=collate_fn,
        )

    # ---- final evaluation, save, card ---------------------------------------------------------------------------
    eval_metrics = {}
    if training_args.do_eval and "validation" in splits:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    from hf_msvit import hub

    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir))
    card_kwargs = dict(
        repo_id=repo_id,
        eval_metrics=eval_metrics,
        training_args=training_args,
        base_model=model_args.model_name_or_path,
        dataset_name=dataset_name,
        extra_settings={
            "gate_only_epochs": model_args.gate_only_epochs,
            "gate_learning_rate": gate_lr,
            "backbone_epochs (from scratch)": model_args.backbone_epochs
            if model_args.model_name_or_path is None
            else None,
            "backbone_eval_accuracy": (backbone_metrics or {}).get("backbone_eval_accuracy"),
        },
    )
    if trainer.is_world_process_zero():
        hub.save_for_hub(model, training_args.output_dir, image_processor=image_processor, **card_kwargs)
    trainer.accelerator.wait_for_everyone()

    push_error = None
    if training_args.push_to_hub and trainer.is_world_process_zero():
        try:
            url = hub.push_to_hub(
                model,
                repo_id,
                image_processor=image_processor,
                token=training_args.hub_token,
                private=training_args.hub_private_repo,
                **{k: v for k, v in card_kwargs.items() if k != "repo_id"},
            )
            print(f"Pushed to {url}")
        except hub.HubPushError as error:
            push_error = error
            print(
                f"\nPUSH FAILED: {error}\nThe local checkpoint in {training_args.output_dir} is intact.",
                file=sys.stderr,
            )

    if trainer.is_world_process_zero():
        print_summary(model, training_args, eval_metrics, ratio_name, time.time() - started, backbone_metrics)
    if push_error is not None:
        raise SystemExit(1)
    return eval_metrics


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def print_summary(model, training_args, eval_metrics, ratio_name, seconds, backbone_metrics=None):
    static = static_macs(model)
    path = os.path.abspath(training_args.output_dir)
    lines = ["", "=" * 78, f"Finished in {seconds:.0f} s."]
    if eval_metrics:
        lines.append(f"  accuracy            {eval_metrics.get('eval_accuracy', float('nan')):.4f}")
        if "eval_gmacs" in eval_metrics:
            line = f"  GMACs per image     {eval_metrics['eval_gmacs']:.5f}"
            if static:
                line += f"  (static backbone: {static / 1e9:.5f}, {eval_metrics['eval_gmacs'] / (static / 1e9):.1%})"
            lines.append(line)
        if f"eval_{ratio_name}" in eval_metrics:
            lines.append(f"  {ratio_name:<20}{eval_metrics[f'eval_{ratio_name}']:.3f}")
        if backbone_metrics and "backbone_eval_accuracy" in backbone_metrics:
            lines.append(
                f"  (static backbone trained in phase 0: accuracy {backbone_metrics['backbone_eval_accuracy']:.4f})"
            )
    lines += [
        f"Checkpoint: {path}",
        "Load it with:",
        "  import hf_msvit; from transformers import AutoModelForImageClassification",
        f"  model = AutoModelForImageClassification.from_pretrained({path!r})",
        "(without hf_msvit installed: add trust_remote_code=True)",
        "=" * 78,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
