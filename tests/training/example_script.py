"""The example script under test, and its tiny command lines (not a test module)."""

import importlib.util
import sys
from pathlib import Path


SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run_image_classification.py"

# Tiny everything: 32 px canvases, 48 training / 24 eval images, a 1-layer ViT of width 32, CPU, no evaluation during
# training, a log line every step.
TINY = {
    "canvas_size": 32,
    "digit_copies": 1,
    "max_train_samples": 48,
    "max_eval_samples": 24,
    "patch_size": 8,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "gate_hidden_size": 16,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 24,
    "eval_strategy": "no",
    "save_strategy": "no",
    "logging_steps": 1,
    "disable_tqdm": True,
    "use_cpu": True,
    "dataloader_num_workers": 0,
    "backbone_max_steps": 1,
    "gate_only_max_steps": 1,
    "max_steps": 1,
    # one-step phases: a warmup would leave their only step at learning rate 0
    "warmup_steps": 0,
    "backbone_warmup_steps": 0,
}


def script_args(output_dir, **flags) -> list[str]:
    """The command line of a tiny run into `output_dir`: `TINY` updated with `flags` (None drops a flag)."""
    values = {**TINY, **flags, "output_dir": output_dir}
    return [item for name, value in values.items() if value is not None for item in (f"--{name}", str(value))]


def load_script():
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
    spec.loader.exec_module(module)
    return module
