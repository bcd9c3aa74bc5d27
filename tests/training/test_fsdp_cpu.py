"""FSDP2 on CPU: MSViT and DiT sharded with `fully_shard` train in two processes (torchrun, gloo) as one process does
on the global batch, with ranks that route differently on purpose.

One torchrun launch (fsdp_worker.py) runs every distributed scenario; this module compares its per-rank reports with a
single-process reference computed here from the same models, data and steps (_fsdp_scenarios.py). Accelerate 1.15 does
not apply FSDP on CPU, so the Accelerate configs are checked through Accelerate's own launch parsing and wrap policy.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_scenarios import (
    KINDS,
    NUM_STEPS,
    RESUME_STEP,
    WORLD_SIZE,
    build_model,
    eval_batch,
    evaluation_mode,
    make_optimizer,
    noise_free_gates,
    train_batch,
    train_step,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification
from transformers.testing_utils import get_torch_dist_unique_port

from hf_msvit.distributed import full_parameters, shard_model, sharded_layer_classes


WORKER = Path(__file__).with_name("fsdp_worker.py")
ACCELERATE_CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "accelerate_configs"
LOSS_TOLERANCE = {"rel": 1e-4, "abs": 1e-5}
LOGITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Runs fsdp_worker.py once in 2 processes; returns its output folder and the two rank reports."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    port = str(get_torch_dist_unique_port())
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD_SIZE)]
    command += ["--master_port", port, str(WORKER), str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    # A rank stuck in a collective fails the worker after its process-group timeout (60 s); this is the backstop.
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, timeout=420, cwd=out_dir)
    if result.returncode != 0:
        raise AssertionError(
            f"torchrun failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return out_dir, [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]


def evaluate_locally(model, kind: str) -> list[dict]:
    """Per rank: logits and MACs of one process on that rank's evaluation images."""
    results = []
    with evaluation_mode(model), torch.no_grad():
        for rank in range(WORLD_SIZE):
            outputs = model(pixel_values=eval_batch(kind, rank))
            results.append({"logits": outputs.logits, "macs": outputs.macs})
    return results


@pytest.fixture(scope="module")
def reference() -> dict[str, dict]:
    """One process, the global batch of every step, the same steps and evaluations as the worker."""
    torch.set_num_threads(1)
    runs = {}
    for kind in KINDS:
        model = build_model(kind)
        optimizer = make_optimizer(model)
        run = {"steps": []}
        for step in range(NUM_STEPS):
            if step == RESUME_STEP:
                run["eval_mid"] = evaluate_locally(model, kind)
            run["steps"].append(train_step(model, optimizer, *train_batch(kind, step)))
        run["eval"] = evaluate_locally(model, kind)
        runs[kind] = run
    return runs


def assert_logits_close(actual, expected, message=""):
    torch.testing.assert_close(torch.as_tensor(actual), expected, atol=LOGITS_TOLERANCE, rtol=1e-4, msg=message)


@pytest.mark.parametrize("kind", KINDS)
def test_every_no_split_layer_and_the_root_are_sharded(fsdp_run, kind):
    _, reports = fsdp_run
    assert [r["world_size"] for r in reports] == [2, 2] and [r["backend"] for r in reports] == ["gloo", "gloo"]
    expected_classes = sorted(build_model(kind)._no_split_modules)
    for report in reports:
        sharding = report[kind]["sharding"]
        assert sharding["root_sharded"] and sharding["all_dtensor"], sharding
        assert sharding["sharded_classes"] == expected_classes
        assert sharding["local_numel"] < sharding["numel"]
    # each rank holds its own part: together exactly the model
    assert sum(r[kind]["sharding"]["local_numel"] for r in reports) == reports[0][kind]["sharding"]["numel"]


@pytest.mark.parametrize("kind", KINDS)
def test_training_matches_one_process_on_the_global_batch(fsdp_run, reference, kind):
    """Each rank trains on its half of every batch; the ranks' mean loss equals one process's loss on the whole batch
    at every step (so the parameter updates were the same), and the images' MACs add up to the same routes."""
    _, reports = fsdp_run
    for step, expected in enumerate(reference[kind]["steps"]):
        rank_steps = [r[kind]["steps"][step] for r in reports]
        mean_loss = sum(s["loss"] for s in rank_steps) / WORLD_SIZE
        assert mean_loss == pytest.approx(expected["loss"], **LOSS_TOLERANCE), f"step {step}"
        assert sum(s["macs"] for s in rank_steps) == pytest.approx(expected["macs"], rel=1e-6), f"step {step}"
        # the ranks' images differ on purpose, and so does what they compute
        assert rank_steps[0]["macs"] != rank_steps[1]["macs"], f"step {step}: both ranks routed alike"


def test_gbas_across_processes_matches_one_process(fsdp_run, reference):
    """With `gbas_gather_across_processes=True` every rank's GBaS loss is that of the global batch."""
    _, reports = fsdp_run
    for step, expected in enumerate(reference["msvit"]["steps"]):
        for report in reports:
            actual = report["msvit"]["steps"][step]["gate_loss"]
            assert actual == pytest.approx(expected["gate_loss"], **LOSS_TOLERANCE), f"step {step}"
    # and gathering matters here: half a batch alone gives another GBaS loss
    model = build_model("msvit")
    with noise_free_gates(), torch.no_grad():
        half = model(pixel_values=train_batch("msvit", 0, rank=0)[0]).gate_loss.item()
    assert abs(half - reference["msvit"]["steps"][0]["gate_loss"]) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_training_forward_calls_every_sharded_module_once(fsdp_run, kind):
    """The invariant that keeps training collectives aligned whatever the routes: one all-gather per sharded module
    per forward, on every rank."""
    _, reports = fsdp_run
    for report in reports:
        for step in range(NUM_STEPS):
            counts = report[kind]["calls"][f"train_step{step}"]
            assert set(counts.values()) == {1}, {name: n for name, n in counts.items() if n != 1}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("when", ["eval_mid", "eval"])
def test_guarded_evaluation_with_different_routes_per_rank(fsdp_run, reference, kind, when):
    """Evaluation calls the sharded modules a different number of times on the two ranks (MSViT: length buckets; DiT:
    skipped stages and edges), which plain FSDP2 cannot run; under `full_parameters` both ranks get exactly the
    logits and MACs of one process."""
    _, reports = fsdp_run
    counts = [r[kind]["calls"][when] for r in reports]
    assert counts[0] != counts[1], "the ranks ran the same modules: the scenario does not test the guard"
    for rank, report in enumerate(reports):
        expected = reference[kind][when][rank]
        assert_logits_close(report[kind][when]["logits"], expected["logits"], f"rank {rank}")
        torch.testing.assert_close(torch.as_tensor(report[kind][when]["macs"]), expected["macs"])


@pytest.mark.parametrize("kind", KINDS)
def test_full_state_dict_loads_with_from_pretrained(fsdp_run, reference, kind):
    out_dir, _ = fsdp_run
    folder = out_dir / kind
    modeling_files = {path.name for path in folder.glob("*.py")}
    assert f"modeling_{kind}.py" in modeling_files, modeling_files  # the model's own remote code, not torch's
    assert not any(name.startswith("_fsdp") for name in modeling_files), modeling_files
    model = AutoModelForImageClassification.from_pretrained(folder)
    assert type(model).__name__ == model.config.architectures[0] == type(build_model(kind)).__name__
    for rank, (actual, expected) in enumerate(zip(evaluate_locally(model, kind), reference[kind]["eval"])):
        assert_logits_close(actual["logits"], expected["logits"], f"rank {rank}'s images")


@pytest.mark.parametrize("kind", KINDS)
def test_resume_from_sharded_checkpoint_continues_the_same_run(fsdp_run, kind):
    """A fresh model (another init) and optimizer loaded from the torch.distributed.checkpoint written before step
    RESUME_STEP reproduce the uninterrupted run's losses."""
    _, reports = fsdp_run
    for report in reports:
        uninterrupted = [s["loss"] for s in report[kind]["steps"][RESUME_STEP:]]
        resumed = [s["loss"] for s in report[kind]["resumed_steps"]]
        assert resumed == pytest.approx(uninterrupted, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_mixed_precision_runs_close_to_fp32(fsdp_run, reference, kind):
    """`MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`: a guarded evaluation and a training step
    run, and the step's loss is within bf16 rounding of fp32's."""
    _, reports = fsdp_run
    for report in reports:
        run = report[kind]["bf16"]
        assert "error" not in run, run.get("error")
        assert torch.isfinite(torch.as_tensor(run["eval"]["logits"])).all()
    fp32_loss = sum(r[kind]["steps"][0]["loss"] for r in reports) / WORLD_SIZE
    bf16_loss = sum(r[kind]["bf16"]["step"]["loss"] for r in reports) / WORLD_SIZE
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.02)


@pytest.mark.parametrize("kind", KINDS)
def test_noise_free_gates_make_training_deterministic(kind):
    """The reference comparison relies on `noise_free_gates` removing all gate noise: two training forwards under
    different seeds agree with it and differ without it. If this fails, the models sample their gates some other way
    and `_fsdp_scenarios.noise_free_gates` must follow."""
    model = build_model(kind)
    pixel_values, labels = train_batch(kind, 0)

    def loss(seed, patched):
        torch.manual_seed(seed)
        with torch.no_grad(), noise_free_gates() if patched else contextlib.nullcontext():
            return model(pixel_values=pixel_values, labels=labels).loss.item()

    assert loss(1, patched=True) == loss(2, patched=True)
    assert loss(1, patched=False) != loss(2, patched=False)


def test_old_checkpoint_with_scalar_logit_bias_loads(tmp_path):
    """`MSViTGate.logit_bias` is a 1-element tensor (FSDP2 shards no 0-dim parameter); checkpoints that stored it as a
    scalar still load, with `from_pretrained` and with `load_state_dict`, and give the same logits."""
    model = build_model("msvit").eval()
    pixel_values = eval_batch("msvit", 1)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values).logits
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state_dict = load_file(weights)
    key = "msvit.embeddings.gate.logit_bias"
    assert state_dict[key].shape == (1,)
    state_dict[key] = state_dict[key].reshape(())  # how it was saved before
    save_file(state_dict, weights, metadata={"format": "pt"})

    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert loaded.msvit.embeddings.gate.logit_bias.shape == (1,)
    fresh = build_model("msvit", seed=1).eval()
    fresh.load_state_dict(state_dict)
    with torch.no_grad():
        for reloaded in (loaded, fresh):
            torch.testing.assert_close(reloaded(pixel_values=pixel_values).logits, expected)
    loaded.save_pretrained(tmp_path / "again")
    assert load_file(tmp_path / "again" / "model.safetensors")[key].shape == (1,)


def assert_wraps_exactly_the_no_split_layers(plugin, model):
    """Accelerate's FSDP2 wrap policy built from `plugin` picks the modules of the model's `_no_split_modules`."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    wraps = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = {name for name, module in model.named_modules() if wraps(module)}
    expected = {name for name, module in model.named_modules() if type(module).__name__ in model._no_split_modules}
    assert wrapped == expected and wrapped


@pytest.mark.parametrize("config_name, kind", [("fsdp.yaml", "msvit"), ("fsdp_dit_routing.yaml", "dit_routing")])
def test_accelerate_fsdp_config_wraps_the_no_split_layers(monkeypatch, config_name, kind):
    """The environment `accelerate launch --config_file <config>` gives its processes selects FSDP version 2 and
    names exactly the model's `_no_split_modules` classes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ACCELERATE_CONFIGS / config_name), "train.py"])
    args, _, _ = _validate_launch_command(args)
    for name, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(name, value)
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()
    model = build_model(kind)
    assert sorted(plugin.transformer_cls_names_to_wrap) == sorted(sharded_layer_classes(model))
    assert_wraps_exactly_the_no_split_layers(plugin, model)


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_fsdp_flag_wraps_the_no_split_layers(tmp_path, kind):
    """`--fsdp` alone: Trainer asks Accelerate for FSDP2 with transformer-based wrapping of `_no_split_modules`."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--fsdp", "--use_cpu", "True"])
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.transformer_cls_names_to_wrap is None  # falls back to the model's `_no_split_modules`
    assert_wraps_exactly_the_no_split_layers(plugin, build_model(kind))


def test_helpers_say_what_is_missing():
    with pytest.raises(ValueError, match="init_process_group"):
        shard_model(build_model("msvit"))
    with pytest.raises(ValueError, match="_no_split_modules"):
        sharded_layer_classes(torch.nn.Linear(2, 2))


def test_full_parameters_on_an_unsharded_model_is_plain_inference():
    model = build_model("msvit").eval()
    pixel_values = eval_batch("msvit", 1)
    with full_parameters(model):
        outputs = model(pixel_values=pixel_values)
    assert not outputs.logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(outputs.logits, model(pixel_values=pixel_values).logits)
