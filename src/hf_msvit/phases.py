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
"""What the two example scripts share: command line, logging, the phases of a run, results and Hub push.

A run of `examples/run_image_classification.py` or `examples/run_semantic_segmentation.py` is a sequence of phases,
each one `Trainer` run in its own folder `<output_dir>/phase-<name>`:

1. `backbone`: the static model (ViT / PVTv2 and its head) learns the task.
2. `gate`: only the gates (`hf_msvit.training.gate_parameter_names`) train, at `--gate_learning_rate`.
3. `joint`: everything trains, the gates at `--gate_learning_rate`, the rest at `--learning_rate`.

A phase that completes writes `DONE_MARKER` next to its `final/` weights. With `--resume_from_checkpoint` a completed
phase is not run again (its final weights are loaded), and the interrupted phase continues from the checkpoint given
(when it lies in that phase's folder) or from the phase's last checkpoint. `PhaseRunner` does this bookkeeping.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Callable

import datasets
import torch
import transformers
from accelerate import PartialState
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from . import hub
from .training import Distillation, freeze_all_but_gates, gate_parameter_names, set_frozen_gate_level, unfreeze_all


logger = logging.getLogger(__name__)

PHASES = ("backbone", "gate", "joint")
DONE_MARKER = "phase_complete.json"
FINAL_SPLITS = (("validation", "eval"), ("test", "test"))  # (split, metric prefix) of the final evaluation


def has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def launch_defaults() -> dict:
    """Several processes (torchrun, accelerate launch) on a machine without GPU: train on CPU in one gloo group.

    Without it, `TrainingArguments` would give every process its own independent run on the full data. Applied as a
    default, so an explicit `--use_cpu` / `--ddp_backend` still wins.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator():
        return {"use_cpu": True, "ddp_backend": "gloo"}
    return {}


def parse_args(dataclass_types: tuple, script_defaults: dict, argv: list[str] | None = None) -> tuple:
    """Command line (or one JSON file) into `dataclass_types` (the last one `TrainingArguments`), over the script's
    `TrainingArguments` defaults and `launch_defaults()`. Plain `TrainingArguments`, so the `training_args.bin` in
    checkpoints loads without the script."""
    parser = HfArgumentParser(dataclass_types)
    defaults = {**script_defaults, **launch_defaults()}
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        with open(argv[0]) as handle:
            return parser.parse_dict({**defaults, **json.load(handle)})
    parser.set_defaults(**defaults)
    return parser.parse_args_into_dataclasses(args=argv)


def check_world_size(training_args: TrainingArguments) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and training_args.world_size != launched:
        raise ValueError(
            f"Launched as {launched} processes, but training would run {training_args.world_size} independent "
            "process(es): each would train alone on the full data. On CPU pass `--use_cpu True --ddp_backend gloo`."
        )


def setup_logging(training_args: TrainingArguments, script_logger: logging.Logger) -> None:
    """Logging as transformers' examples set it up: one format, the process's log level for the script, this
    package, transformers and datasets; one line per process about where it runs."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for each in (script_logger, logging.getLogger("hf_msvit")):
        each.setLevel(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    script_logger.warning(
        "Process rank %s, world size %s, device %s, distributed %s, torch threads %s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        training_args.parallel_mode.value,
        torch.get_num_threads(),
    )


def phase_length(epochs: float, max_steps: int) -> dict:
    """`TrainingArguments` overrides for a phase's length; `max_steps > 0` wins over `epochs`."""
    return {"num_train_epochs": epochs, "max_steps": max_steps}


def runs(length: dict) -> bool:
    """Whether a phase of this length (`phase_length`, or `TrainingArguments`' own fields) trains at all."""
    return length["num_train_epochs"] > 0 or length["max_steps"] > 0


def resume_checkpoint(phase_dir: str, requested) -> str | None:
    """`--resume_from_checkpoint` if it lies in this phase's folder, else the phase's last checkpoint (if any)."""
    if requested and os.path.isdir(str(requested)):
        if os.path.abspath(requested).startswith(os.path.abspath(phase_dir) + os.sep):
            return requested
    return get_last_checkpoint(phase_dir) if os.path.isdir(phase_dir) else None


def restore_completed_phase(model, phase_dir: str) -> dict:
    """Loads the final weights of a phase that completed in an earlier run into `model`; returns its train metrics."""
    logger.info("Phase folder %s is complete: loading its final weights.", phase_dir)
    # from_pretrained applies the checkpoint conversions (e.g. ViT's original key names), then copy in place.
    restored = type(model).from_pretrained(os.path.join(phase_dir, "final"))
    model.load_state_dict(restored.state_dict())
    with open(os.path.join(phase_dir, DONE_MARKER)) as handle:
        return json.load(handle)


@dataclasses.dataclass
class PhaseRunner:
    """Runs the phases of one run, each a `Trainer` in `<output_dir>/phase-<name>` training the model in place.

    Every Trainer of the run is a `trainer_class` on the `train` / `validation` splits, with the run's image processor,
    `data_collator` and `compute_metrics_for(model)`; the keyword arguments of `run` / `evaluate` (e.g.
    `gate_learning_rate`, another `data_collator`) go to it. `resume` is True when `--resume_from_checkpoint` was
    given (see `start`).
    """

    training_args: TrainingArguments
    trainer_class: type[Trainer]
    splits: dict  # split name -> dataset, transforms applied
    image_processor: object
    data_collator: Callable
    compute_metrics_for: Callable  # model -> `compute_metrics`
    resume: bool = False

    @classmethod
    def start(cls, training_args: TrainingArguments, **fields) -> PhaseRunner:
        """The runner of a run; a new (not resumed) run forgets the done markers an earlier run left in the folder, so
        that a later resume does not skip a phase."""
        resume = str(training_args.resume_from_checkpoint).lower() not in ("none", "false")
        if not resume and training_args.process_index == 0:
            for name in PHASES:
                marker = os.path.join(training_args.output_dir, f"phase-{name}", DONE_MARKER)
                if os.path.isfile(marker):
                    os.remove(marker)
        return cls(training_args, resume=resume, **fields)

    def trainer(self, model, args: TrainingArguments, **kwargs) -> Trainer:
        kwargs = {"data_collator": self.data_collator, **kwargs}
        return self.trainer_class(
            model=model,
            args=args,
            train_dataset=self.splits.get("train"),
            eval_dataset=self.splits.get("validation") if args.do_eval else None,
            compute_metrics=self.compute_metrics_for(model),
            processing_class=self.image_processor,
            **kwargs,
        )

    def args(self, phase: str | None = None, **overrides) -> TrainingArguments:
        """The run's `TrainingArguments` for one Trainer (in the phase's folder, or `--output_dir`): no Hub push of
        its own (the script pushes once, at the end, through `hf_msvit.hub`), resuming decided per phase."""
        if phase is not None:
            overrides["output_dir"] = self.phase_dir(phase)
        return dataclasses.replace(self.training_args, push_to_hub=False, resume_from_checkpoint=None, **overrides)

    def phase_dir(self, name: str) -> str:
        return os.path.join(self.training_args.output_dir, f"phase-{name}")

    def run(self, name: str, model, overrides: dict | None = None, **trainer_kwargs) -> dict:
        """Trains `model` in place in phase `name` (`overrides`: `TrainingArguments` fields); returns the train
        metrics. A phase that completed before is skipped on resume."""
        phase_dir = self.phase_dir(name)
        if self.resume and os.path.isfile(os.path.join(phase_dir, DONE_MARKER)):
            return restore_completed_phase(model, phase_dir)
        trainer = self.trainer(model, self.args(name, **(overrides or {})), **trainer_kwargs)
        checkpoint = resume_checkpoint(phase_dir, self.training_args.resume_from_checkpoint) if self.resume else None
        if checkpoint:
            logger.info("Resuming phase %r from %s", name, checkpoint)
        metrics = dict(trainer.train(resume_from_checkpoint=checkpoint).metrics)
        trainer.save_model(os.path.join(phase_dir, "final"))
        if trainer.is_world_process_zero():
            trainer.log_metrics(f"train_{name}", metrics)
            with open(os.path.join(phase_dir, DONE_MARKER), "w") as handle:
                json.dump(metrics, handle, indent=2)
        trainer.accelerator.wait_for_everyone()
        del trainer
        gc.collect()
        return metrics

    def evaluate(self, model, prefix: str, phase: str | None = None, split: str = "validation", **kwargs) -> dict:
        """`<prefix>_*` metrics of `model` on `split` ({} without that split or without `--do_eval`)."""
        if not (self.training_args.do_eval and split in self.splits):
            return {}
        trainer = self.trainer(model, self.args(phase), **kwargs)
        metrics = trainer.evaluate(self.splits[split], metric_key_prefix=prefix)
        metrics.pop("epoch", None)  # an evaluation-only Trainer: its epoch would read 0
        trainer.log_metrics(prefix, metrics)
        return metrics

    def evaluate_final(self, model) -> dict[str, dict]:
        """`{"eval": ..., "test": ...}`: validation for choices, the test split (when the data has one, as the
        built-in data) for the reported numbers."""
        return {prefix: self.evaluate(model, prefix, split=split) for split, prefix in FINAL_SPLITS}

    def train_gates_then_jointly(self, model, gate_length: dict, gate_learning_rate: float, joint=None) -> dict:
        """The gate-only phase (if `gate_length` runs) and the joint phase (with `--do_train` and a length); returns
        the train metrics per phase name. Gates train at `gate_learning_rate`; `joint` (a `JointPhase`) may change
        an MSViT's training mode and the gates' learning rate in the joint phase (0: the gates stay as they are)."""
        joint = joint or JointPhase()
        phases = {}
        if runs(gate_length):
            trainable = freeze_all_but_gates(model)
            logger.info("Gate-only phase: %d trainable tensors (%s, ...)", len(trainable), ", ".join(trainable[:3]))
            try:
                phases["gate"] = self.run("gate", model, {**gate_length, "learning_rate": gate_learning_rate})
            finally:
                unfreeze_all(model)
        args = self.training_args
        if args.do_train and runs({"num_train_epochs": args.num_train_epochs, "max_steps": args.max_steps}):
            for field_name in ("gate_training_mode", "gate_noise_scale", "gate_sampling_level"):
                if getattr(joint, field_name) is not None and model.config.model_type == "msvit":
                    setattr(model.config, field_name, getattr(joint, field_name))
            joint_lr = gate_learning_rate if joint.gate_learning_rate is None else joint.gate_learning_rate
            if joint_lr == 0 and model.config.model_type == "msvit":  # frozen: its level is set once, here
                batches = self.trainer(model, self.args("joint")).get_train_dataloader()
                shift = set_frozen_gate_level(model, batches)
                logger.info("Frozen gate: its level set to the target (logit shift %.3f).", shift)
            for name in gate_parameter_names(model) if joint_lr == 0 else []:
                model.get_parameter(name).requires_grad_(False)
            try:
                extra = {"distillation": joint.distillation} if joint.distillation is not None else {}
                phases["joint"] = self.run("joint", model, gate_learning_rate=joint_lr or None, **extra)
            finally:
                unfreeze_all(model)
        return phases

    def save_results(self, model, results: dict[str, dict]) -> None:
        """`<name>_results.json` for each `results` entry (`train`, `eval`, `test`) and `all_results.json` in
        `--output_dir`, as transformers' examples write them."""
        os.makedirs(self.training_args.output_dir, exist_ok=True)
        trainer = self.trainer(model, self.args())
        for name, metrics in results.items():
            if metrics:
                trainer.log_metrics(name, metrics)
                trainer.save_metrics(name, metrics)


@dataclasses.dataclass
class JointPhase:
    """What the joint phase changes: an MSViT's `gate_training_mode` (e.g. `straight_through`, the selected tokens
    only: a cheaper step), `gate_noise_scale` and `gate_sampling_level` (None: as in the gate-only phase), and the
    gates' learning rate (None: the gate-only phase's; 0: frozen), and a `Distillation` from a teacher."""

    gate_training_mode: str | None = None
    gate_learning_rate: float | None = None
    gate_noise_scale: float | None = None
    gate_sampling_level: str | None = None
    distillation: Distillation | None = None  # a teacher's predictions added to the loss (the joint phase only)


def last_phase_metrics(phases: dict[str, dict]) -> dict:
    """What `train_results.json` holds: the metrics of the last phase that ran (including the training-time compute:
    `train_<ratio>`, `train_gmacs`, `train_macs_fraction`), those of the earlier gate-only phase prefixed."""
    names = [name for name in ("gate", "joint") if name in phases]
    metrics = dict(phases[names[-1]]) if names else {}
    for name in names[:-1]:
        metrics.update({f"{name}_phase_{key}": value for key, value in phases[name].items()})
    return metrics


def save_and_push(model, training_args: TrainingArguments, image_processor, **card_kwargs) -> hub.HubPushError | None:
    """Model, image processor, code and card (`hub.build_model_card(**card_kwargs)`) into `--output_dir`; with
    `--push_to_hub` the same to the Hub (`hub.push_to_hub`, repo `--hub_model_id` or the folder's name). A failed
    push is returned (and reported); the local checkpoint stays intact."""
    repo_id = training_args.hub_model_id or os.path.basename(os.path.normpath(training_args.output_dir))
    card_kwargs = {"repo_id": repo_id, "training_args": training_args, **card_kwargs}
    if training_args.process_index == 0:
        hub.save_for_hub(model, training_args.output_dir, image_processor=image_processor, **card_kwargs)
    PartialState().wait_for_everyone()
    if not (training_args.push_to_hub and training_args.process_index == 0):
        return None
    try:
        url = hub.push_to_hub(
            model, image_processor=image_processor, token=training_args.hub_token,
            private=training_args.hub_private_repo, **card_kwargs,
        )  # fmt: skip
    except hub.HubPushError as error:
        intact = f"The local checkpoint in {training_args.output_dir} is intact."
        print(f"\nPUSH FAILED: {error}\n{intact}", file=sys.stderr)
        return error
    print(f"Pushed to {url}")
    return None


def parse_config_overrides(text: str | None) -> dict:
    """`"a=1,b=true,c=samples"` -> `{"a": 1, "b": True, "c": "samples"}` (JSON scalars, else strings)."""
    values = {}
    for item in filter(None, (text or "").split(",")):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--config_overrides takes `field=value,field=value`; got {item!r} in {text!r}.")
        try:
            values[name.strip()] = json.loads(value.strip())
        except json.JSONDecodeError:
            values[name.strip()] = value.strip()
    return values


__all__ = [
    "DONE_MARKER",
    "JointPhase",
    "PHASES",
    "PhaseRunner",
    "check_world_size",
    "has_accelerator",
    "last_phase_metrics",
    "parse_config_overrides",
    "launch_defaults",
    "parse_args",
    "phase_length",
    "restore_completed_phase",
    "resume_checkpoint",
    "runs",
    "save_and_push",
    "setup_logging",
]
