"""examples/run_image_classification.py end to end on tiny settings: phases, metrics, checkpoint, resume, upcycling."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hf_msvit import phases
from hf_msvit.phases import PhaseRunner

from example_script import load_script, script_args


pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture
def recorded_phases(monkeypatch):
    """Records the arguments of every phase run (phase name -> TrainingArguments overrides, gate lr)."""
    calls = {}
    original = PhaseRunner.run

    def recording_run(self, name, model, overrides=None, **trainer_kwargs):
        calls[name] = {**(overrides or {}), **{key: trainer_kwargs.get(key) for key in ("gate_learning_rate",
                                                                                          "distillation")}}
        return original(self, name, model, overrides, **trainer_kwargs)

    monkeypatch.setattr(PhaseRunner, "run", recording_run)
    return calls


def test_default_run_phases_metrics_checkpoint_and_resume(script, tmp_path, capsys):
    out = tmp_path / "run"
    args = script_args(
        out,
        backbone_max_steps=2,
        gate_only_max_steps=2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        save_total_limit=5,
    )
    metrics = script.main(args)
    printed = capsys.readouterr().out

    for key in ("eval_accuracy", "eval_gmacs", "eval_fine_region_ratio", "eval_static_gmacs", "eval_macs_fraction"):
        assert key in metrics, metrics
    assert 0.0 <= metrics["eval_fine_region_ratio"] <= 1.0
    assert "GMACs per image" in printed and "static backbone" in printed and str(out) in printed
    assert "from_pretrained" in printed and "trust_remote_code=True" in printed

    # Where transformers' examples write them: train/eval/all results in --output_dir.
    train_results = json.loads((out / "train_results.json").read_text())
    eval_results = json.loads((out / "eval_results.json").read_text())
    test_results = json.loads((out / "test_results.json").read_text())
    all_results = json.loads((out / "all_results.json").read_text())
    assert eval_results["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    # the built-in data's held-out test split is evaluated once, at the end, beside validation
    assert test_results["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert 0.0 <= test_results["test_fine_region_ratio"] <= 1.0
    assert all_results == {**train_results, **eval_results, **test_results}
    # The training-time (sampled-gate) compute is reported next to the evaluation's, and printed.
    assert 0.0 <= train_results["train_fine_region_ratio"] <= 1.0
    assert train_results["train_macs_fraction"] == pytest.approx(
        train_results["train_gmacs"] / metrics["eval_static_gmacs"]
    )
    ratio_line = next(line for line in printed.splitlines() if line.strip().startswith("fine_region_ratio"))
    assert f"{train_results['train_fine_region_ratio']:.3f}" in ratio_line
    assert f"{metrics['eval_fine_region_ratio']:.3f}" in ratio_line
    state = json.loads((out / "phase-joint" / "checkpoint-4" / "trainer_state.json").read_text())
    assert all("train_fine_region_ratio" in log for log in state["log_history"] if "loss" in log)

    files = set(os.listdir(out))
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "README.md",
        "modeling_msvit.py",
        "configuration_msvit.py",
        "image_processing_msvit.py",
    } <= files, files
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "msvit"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageClassification"}
    assert config["id2label"]["3"] == "3"
    for phase in ("backbone", "gate", "joint"):
        assert (out / f"phase-{phase}" / "phase_complete.json").is_file(), phase
    final = load_file(out / "model.safetensors")

    # Gate-only phase trained only the gate: the backbone and head left it as the upcycled ViT had them.
    gate_phase = load_file(out / "phase-gate" / "final" / "model.safetensors")
    backbone = load_file(out / "phase-backbone" / "final" / "model.safetensors")
    torch.testing.assert_close(gate_phase["classifier.weight"], backbone["classifier.weight"])
    torch.testing.assert_close(gate_phase["msvit.embeddings.cls_token"], backbone["vit.embeddings.cls_token"])
    gate_key = "msvit.embeddings.gate.layers.0.weight"
    assert not torch.allclose(gate_phase[gate_key], final[gate_key], rtol=0, atol=1e-6)  # the joint phase moved it

    # Interrupt the joint phase after its first checkpoint, then resume: completed phases are skipped, the joint phase
    # continues from checkpoint-2 and ends where the uninterrupted run ended.
    joint = out / "phase-joint"
    shutil.rmtree(joint / "checkpoint-4")
    shutil.rmtree(joint / "final")
    (joint / "phase_complete.json").unlink()
    (out / "model.safetensors").unlink()
    gate_marker_mtime = (out / "phase-gate" / "phase_complete.json").stat().st_mtime

    resumed_metrics = script.main(args + ["--resume_from_checkpoint", str(joint / "checkpoint-2")])
    assert (out / "phase-gate" / "phase_complete.json").stat().st_mtime == gate_marker_mtime
    state = json.loads((joint / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == final.keys()
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=1e-4, atol=1e-5, msg=key)
    assert resumed_metrics["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])


@pytest.mark.parametrize("model_type", ["msvit", "dit_routing"])
def test_fresh_run_defaults_per_model_type(script, tmp_path, recorded_phases, model_type):
    """Fresh runs take their backbone lr, backbone warmup and gate lr from FRESH_MODEL_DEFAULTS; the joint phase trains
    the gates at the gate lr (its own optimizer group), the rest at --learning_rate; command-line values win. Phase 0's
    warmup is its own: the later phases keep --warmup_steps."""
    canvas = 32 if model_type == "msvit" else 64
    script.main(script_args(tmp_path / "a", model_type=model_type, canvas_size=canvas, backbone_warmup_steps=None))
    defaults = script.FRESH_MODEL_DEFAULTS[model_type]
    assert recorded_phases["backbone"]["learning_rate"] == defaults.backbone_learning_rate
    assert recorded_phases["gate"]["learning_rate"] == defaults.gate_learning_rate
    assert recorded_phases["joint"]["gate_learning_rate"] == defaults.gate_learning_rate
    assert recorded_phases["backbone"]["warmup_steps"] == defaults.backbone_warmup_steps
    assert "warmup_steps" not in recorded_phases["gate"] and "warmup_steps" not in recorded_phases["joint"]
    assert script.FRESH_MODEL_DEFAULTS["dit_routing"].backbone_learning_rate < 1e-3  # PVTv2 stays at chance at 2e-3
    assert script.FRESH_MODEL_DEFAULTS["msvit"].backbone_warmup_steps > 0  # ViT/16 from scratch: see the study

    recorded_phases.clear()
    given = {"backbone_learning_rate": 1e-3, "gate_learning_rate": 5e-3, "backbone_warmup_steps": 3}
    script.main(script_args(tmp_path / "b", model_type=model_type, canvas_size=canvas, **given))
    assert recorded_phases["backbone"]["learning_rate"] == 1e-3
    warmup = recorded_phases["backbone"]["warmup_steps"]
    assert warmup == 3 and isinstance(warmup, int)  # whole steps, not a fraction
    assert recorded_phases["gate"]["learning_rate"] == recorded_phases["joint"]["gate_learning_rate"] == 5e-3

    with pytest.raises(ValueError, match="backbone_warmup_steps 2.5"):
        script.main(script_args(tmp_path / "c", model_type=model_type, canvas_size=canvas, backbone_warmup_steps=2.5))


def test_upcycle_from_local_vit_checkpoint(script, tmp_path, recorded_phases):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            num_labels=5,
        )
    )
    vit.save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    metrics = script.main(
        script_args(
            out,
            model_name_or_path=tmp_path / "vit",
            ignore_mismatched_sizes=True,
            gbas_target_ratio=0.4,
            gbas_gather_across_processes=True,
            gradient_accumulation_steps=2,
        )
    )
    assert not (out / "phase-backbone").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "msvit" and config["num_hidden_layers"] == 1
    assert config["gbas_target_ratio"] == 0.4 and config["gbas_gather_across_processes"] is True
    assert len(config["id2label"]) == 10
    assert "eval_gmacs" in metrics
    # the gate is new: the model type's gate lr, as for a fresh run (not the gentler lr of a continued checkpoint)
    assert recorded_phases["gate"]["learning_rate"] == script.FRESH_MODEL_DEFAULTS["msvit"].gate_learning_rate
    # new gates learn on inference's decisions, the joint phase samples them; no calibration offset at inference
    assert json.loads((out / "phase-gate" / "final" / "config.json").read_text())["gate_noise_scale"] == 0.0
    assert config["gate_noise_scale"] == script.JOINT_PHASE_NOISE_SCALE == 0.5
    assert config["gate_level_calibration"] is False
    # ... cut at the target: the joint step's decisions (32 regions) send round(0.4 * 32) = 13 fine
    assert config["gate_sampling_level"] == script.JOINT_PHASE_SAMPLING_LEVEL == "target"
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_fine_region_ratio"] == pytest.approx(13 / 32)
    # the backbone weights came from the ViT (the gate phase does not touch them)
    gate_phase = load_file(out / "phase-gate" / "final" / "model.safetensors")
    torch.testing.assert_close(gate_phase["msvit.embeddings.cls_token"], vit.vit.embeddings.cls_token.detach())


def test_config_overrides_and_a_joint_phase_on_the_selected_tokens_with_frozen_gates(script, tmp_path):
    """`--config_overrides` sets any other config field (an unknown name is refused before training); the joint phase
    can train on the selected tokens only with the gates left as the gate-only phase made them, their level set to the
    target."""
    out = tmp_path / "run"
    script.main(script_args(out, config_overrides="gbas_input=samples,gate_level_calibration=false",
                            joint_gate_training_mode="straight_through", joint_gate_learning_rate=0))  # fmt: skip
    config = json.loads((out / "config.json").read_text())
    assert config["gbas_input"] == "samples" and config["gate_level_calibration"] is False
    assert config["gate_training_mode"] == "straight_through"
    gate_phase = load_file(out / "phase-gate" / "final" / "model.safetensors")
    joint_phase = load_file(out / "phase-joint" / "final" / "model.safetensors")
    # frozen: the gate stays as the gate-only phase made it, but for its output bias, shifted once to the target level
    bias = "msvit.embeddings.gate.logit_bias"
    gate_keys = [key for key in gate_phase if ".gate." in key and key != bias]
    assert gate_keys and all(torch.equal(gate_phase[key], joint_phase[key]) for key in gate_keys)
    assert not torch.equal(gate_phase[bias], joint_phase[bias])
    assert not torch.equal(gate_phase["classifier.weight"], joint_phase["classifier.weight"])
    with pytest.raises(ValueError, match="no field of the msvit config: \\['not_a_field'\\]"):
        script.main(script_args(tmp_path / "bad", config_overrides="not_a_field=1"))
    with pytest.raises(ValueError, match="field=value"):
        script.main(script_args(tmp_path / "bad2", config_overrides="gbas_input"))


def test_dit_fresh_and_from_local_pvt_v2(script, tmp_path, monkeypatch):
    warmups = []  # the later phases' warmup of each run: DiT's default is none (MODEL_TYPE_TRAINING_DEFAULTS)
    original_start = PhaseRunner.start.__func__

    def recording_start(cls, args, **fields):
        warmups.append(args.warmup_steps)
        return original_start(cls, args, **fields)

    monkeypatch.setattr(PhaseRunner, "start", classmethod(recording_start))
    out = tmp_path / "dit"
    metrics = script.main(script_args(out, model_type="dit_routing", canvas_size=64, max_steps=2))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dit_routing"
    assert "AutoModelForImageClassification" in config["auto_map"]
    assert "eval_gmacs" in metrics and "eval_token_keep_ratio" in metrics
    train_results = json.loads((out / "train_results.json").read_text())
    assert 0.0 < train_results["train_token_keep_ratio"] <= 1.0 and train_results["train_macs_fraction"] > 0

    from transformers import PvtV2Config, PvtV2ForImageClassification

    pvt = PvtV2ForImageClassification(
        PvtV2Config(
            image_size=64,
            hidden_sizes=[8, 16, 16, 32],
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 1, 1],
            num_labels=10,
        )
    )
    pvt.save_pretrained(tmp_path / "pvt")
    out2 = tmp_path / "dit2"
    metrics = script.main(script_args(out2, model_name_or_path=tmp_path / "pvt", canvas_size=64, budget_target=0.8))
    config = json.loads((out2 / "config.json").read_text())
    assert config["model_type"] == "dit_routing" and config["budget_target"] == 0.8
    assert "eval_token_keep_ratio" in metrics
    # a PVTv2 checkpoint makes the run a DiT one (no --model_type): its defaults too; the command line still wins
    script.main(script_args(tmp_path / "dit3", model_name_or_path=tmp_path / "pvt", canvas_size=64, warmup_steps=0.2,
                            max_steps=1, gate_only_max_steps=1))  # fmt: skip
    assert warmups == [0.0, 0.0, 0.2]
    assert script.parse_arguments(["--output_dir", str(tmp_path)])[-1].warmup_steps == 0.1  # MSViT's


def test_imagefolder_and_dataset_name(script, tmp_path):
    """--train_dir/--validation_dir (imagefolder) and --dataset_name (a local dataset folder), with a fresh model."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    metrics = script.main(
        script_args(
            tmp_path / "a",
            image_size=32,
            train_dir=tmp_path / "images" / "train",
            validation_dir=tmp_path / "images" / "val",
        )
    )
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"} and "eval_accuracy" in metrics

    from hf_msvit.data import load_digits_on_canvas

    data = load_digits_on_canvas(canvas_size=32, digit_size=16, copies=1)
    (tmp_path / "digits").mkdir()
    data["train"].select(range(40)).to_parquet(str(tmp_path / "digits" / "train.parquet"))
    metrics = script.main(
        script_args(tmp_path / "b", image_size=32, dataset_name=tmp_path / "digits", train_val_split=0.25)
    )
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert len(config["id2label"]) == 10 and "eval_fine_region_ratio" in metrics


def test_several_cpu_processes_default_to_one_gloo_group(monkeypatch):
    """Launched as several processes on a machine without GPU: CPU + gloo by default (else each process would train
    alone on the full data); an explicit --use_cpu / --ddp_backend still wins."""
    monkeypatch.setattr(phases, "has_accelerator", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert phases.launch_defaults() == {"use_cpu": True, "ddp_backend": "gloo"}
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert phases.launch_defaults() == {}


def test_joint_phase_defaults_apply_to_new_msvit_gates_only(script):
    """New MSViT gates sample their joint-phase decisions at the target level; an MSViT checkpoint keeps its config's
    (None: not changed), DiT has no such default, and command-line values win."""
    parse = lambda *argv: script.ModelArguments(**dict(zip(argv[::2], argv[1::2])))  # noqa: E731
    new_gates = script.StartingPoint("msvit", image_processor=None)
    joint = script.joint_phase(parse(), new_gates)
    assert (joint.gate_noise_scale, joint.gate_sampling_level) == (0.5, "target")
    checkpoint = script.StartingPoint("msvit", image_processor=None, model=torch.nn.Linear(1, 1))
    joint = script.joint_phase(parse(), checkpoint)
    assert (joint.gate_noise_scale, joint.gate_sampling_level) == (None, None)
    joint = script.joint_phase(parse(), script.StartingPoint("dit_routing", image_processor=None))
    assert (joint.gate_noise_scale, joint.gate_sampling_level) == (None, None)
    given = parse("joint_gate_noise_scale", 1.0, "joint_gate_sampling_level", "threshold")
    joint = script.joint_phase(given, new_gates)
    assert (joint.gate_noise_scale, joint.gate_sampling_level) == (1.0, "threshold")


def test_joint_phase_distils_from_the_backbone_it_upcycled(script, tmp_path, recorded_phases):
    """`--joint_distillation_weight`: the joint phase (only) distils from the static ViT phase 0 trained, frozen as
    phase 0 left it; a run continuing an MSViT checkpoint has no static model and is refused before training."""
    out = tmp_path / "run"
    script.main(script_args(out, joint_distillation_weight=0.5, joint_distillation_temperature=2.0))
    assert recorded_phases["backbone"]["distillation"] is None and recorded_phases["gate"]["distillation"] is None
    distillation = recorded_phases["joint"]["distillation"]
    assert (distillation.weight, distillation.temperature) == (0.5, 2.0)
    from transformers import AutoModelForImageClassification

    backbone = AutoModelForImageClassification.from_pretrained(out / "phase-backbone" / "final").state_dict()
    teacher = distillation.teacher.state_dict()
    assert backbone.keys() == teacher.keys() and all(torch.equal(backbone[key], teacher[key]) for key in backbone)
    with pytest.raises(ValueError, match="continues an MSViT / DiT checkpoint"):
        script.main(script_args(tmp_path / "continued", model_name_or_path=out, joint_distillation_weight=0.5))
    assert not (tmp_path / "continued" / "phase-joint").exists()
