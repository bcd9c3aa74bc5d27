"""Two processes on CPU (gloo): the example script really trains distributed.

`accelerate launch --cpu --num_processes 2` would silently start ONE process; torchrun with `--use_cpu` and
`--ddp_backend gloo` starts two that form one process group. The test shows both ranks saw different samples and end
with the same weights (gradients were all-reduced), with MSViT's GBaS gathered across processes, and for DiT, whose
skipped stages leave parameters unused on some steps. Every rank logs the training-time compute, a collective.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.testing_utils import get_torch_dist_unique_port

from example_script import script_args


pytest.importorskip("sklearn")
WORKER = Path(__file__).with_name("ddp_worker.py")
ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs" / "multi_cpu.yaml"


def launch(tmp_path, launcher="torchrun", **flags):
    """Runs the worker (the example script, instrumented) in 2 processes with `torchrun` or `accelerate launch`."""
    port = str(get_torch_dist_unique_port())
    report = tmp_path / "report"
    if launcher == "torchrun":
        # explicit --use_cpu (in the tiny args) --ddp_backend gloo, as on a machine that has GPUs
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
        flags = {"ddp_backend": "gloo", **flags}
    else:
        accelerate_bin = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        command = [accelerate_bin, "launch", "--config_file", str(ACCELERATE_CONFIG), "--main_process_port", port]
        # no --use_cpu: the config (and the script, on a machine without GPU) take care of it
        flags = {"use_cpu": None, **flags}
    command += [str(WORKER), str(report), *script_args(tmp_path / "out", **flags)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    if result.returncode != 0:
        raise AssertionError(
            f"{launcher} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)], report


def check_distributed(reports, report_dir, phases):
    assert [r["world_size"] for r in reports] == [2, 2]
    assert [r["backend"] for r in reports] == ["gloo", "gloo"]
    for phase in phases:
        ids0, ids1 = (r["seen"][phase] for r in reports)
        assert ids0 and ids1, phase
        assert not set(ids0) & set(ids1), f"{phase}: both ranks trained on the same samples"
    weights = [load_file(report_dir / f"rank{r}.safetensors") for r in (0, 1)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:  # two processes: equal up to float rounding, far from what disjoint data would give
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_process_cpu_msvit_with_gathered_gbas_accelerate_launch(tmp_path):
    """`accelerate launch --config_file examples/accelerate_configs/multi_cpu.yaml` really starts 2 CPU processes."""
    reports, report_dir = launch(tmp_path, launcher="accelerate", max_steps=2, gbas_gather_across_processes=True)
    check_distributed(reports, report_dir, ["backbone", "gate", "joint"])
    assert reports[0]["gbas_gather_across_processes"] is True
    assert (tmp_path / "out" / "model.safetensors").is_file()
    train_results = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert 0.0 <= train_results["train_fine_region_ratio"] <= 1.0


def test_two_process_cpu_dit_torchrun(tmp_path):
    reports, report_dir = launch(tmp_path, launcher="torchrun", model_type="dit_routing", canvas_size=64, max_steps=2)
    check_distributed(reports, report_dir, ["gate", "joint"])
