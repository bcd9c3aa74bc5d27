"""Two processes on CPU (gloo) with torchrun: the example script really trains distributed.

`accelerate launch --cpu --num_processes 2` would silently start ONE process; torchrun with `--use_cpu` and
`--ddp_backend gloo` starts two that form one process group. The test shows both ranks saw different samples and end
with identical weights (gradients were all-reduced), with MSViT's GBaS gathered across processes, and for DiT, whose
skipped stages leave parameters unused on some steps.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.testing_utils import get_torch_dist_unique_port

from test_run_image_classification import TINY


pytest.importorskip("sklearn")
WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs" / "multi_cpu.yaml"


def launch(tmp_path, extra, launcher="torchrun"):
    """Runs the worker (the example script, instrumented) in 2 processes with `torchrun` or `accelerate launch`."""
    port = str(get_torch_dist_unique_port())
    report = tmp_path / "report"
    if launcher == "torchrun":
        # explicit --use_cpu (in TINY) --ddp_backend gloo, as on a machine that has GPUs
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        extra = ["--ddp_backend", "gloo", *extra]
    else:
        accelerate_bin = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [accelerate_bin, "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", port]
        # no --use_cpu: the config (and the script, on a machine without GPU) take care of it
        tiny = [a for i, a in enumerate(TINY) if a != "--use_cpu" and (i == 0 or TINY[i - 1] != "--use_cpu")]
    command += [
        str(WORKER),
        str(report),
        *(TINY if launcher == "torchrun" else tiny),
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    if result.returncode != 0:
        raise AssertionError(
            f"{launcher} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    reports = [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]
    return reports


def check_distributed(reports, phases):
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    for phase in phases:
        ids0, ids1 = (r["seen"][phase] for r in reports)
        assert ids0 and ids1, phase
        assert not set(ids0) & set(ids1), f"{phase}: both ranks trained on the same samples"
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"], "ranks ended with different weights"


def test_two_process_cpu_msvit_with_gathered_gbas_accelerate_launch(tmp_path):
    """`accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml` really starts 2 CPU processes."""
    reports = launch(
        tmp_path,
        launcher="accelerate",
        extra=[
            "--backbone_max_steps",
            "1",
            "--gate_only_max_steps",
            "1",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--gbas_gather_across_processes",
            "True",
        ],
    )
    check_distributed(reports, ["backbone", "gate", "joint"])
    assert reports[0]["gbas_gather_across_processes"] is True
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_two_process_cpu_dit_torchrun(tmp_path):
    reports = launch(
        tmp_path,
        launcher="torchrun",
        extra=[
            "--model_type",
            "dit_routing",
            "--canvas_size",
            "64",
            "--backbone_max_steps",
            "1",
            "--gate_only_max_steps",
            "1",
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
        ],
    )
    check_distributed(reports, ["gate", "joint"])
