"""examples/run_image_classification.py end to end on tiny settings: phases, metrics, checkpoint, resume, upcycling."""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file



pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run_image_classification.py"

TINY = [
    "--canvas_size",
    "32",
    "--digit_copies",
    "1",
    "--max_train_samples",
    "48",
    "--max_eval_samples",
    "24",
    "--patch_size",
    "8",
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "1",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "32",
    "--gate_hidden_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "24",
    "--eval_strategy",
    "no",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "True",
    "--use_cpu",
    "True",
    "--dataloader_num_workers",
    "0",
]


def load_script():
    spec = importlib.util.spec_from_file_location("run_image_classification", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def test_default_run_phases_metrics_checkpoint_and_resume(script, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + [
        "--output_dir",
        str(out),
        "--backbone_max_steps",
        "2",
        "--gate_only_max_steps",
        "2",
        "--max_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--save_total_limit",
        "5",
    ]
    metrics = script.main(args)
    printed = capsys.readouterr().out

    for key in ("eval_accuracy", "eval_gmacs", "eval_fine_region_ratio", "eval_static_gmacs", "eval_macs_fraction"):
        assert key in metrics, metrics
    assert 0.0 <= metrics["eval_fine_region_ratio"] <= 1.0
    assert "GMACs per image" in printed and "static backbone" in printed and str(out) in printed
    assert "from_pretrained" in printed and "trust_remote_code=True" in printed

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
    assert not torch.equal(
        gate_phase["msvit.embeddings.gate.layers.0.weight"], final["msvit.embeddings.gate.layers.0.weight"]
    )

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


def test_upcycle_from_local_vit_checkpoint(script, tmp_path):
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
        TINY
        + [
            "--output_dir",
            str(out),
            "--model_name_or_path",
            str(tmp_path / "vit"),
            "--ignore_mismatched_sizes",
            "True",
            "--gbas_target_ratio",
            "0.4",
            "--gbas_gather_across_processes",
            "True",
            "--gate_only_max_steps",
            "1",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
            "--gradient_accumulation_steps",
            "2",
        ]
    )
    assert not (out / "phase-backbone").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "msvit" and config["num_hidden_layers"] == 1
    assert config["gbas_target_ratio"] == 0.4 and config["gbas_gather_across_processes"] is True
    assert len(config["id2label"]) == 10
    assert "eval_gmacs" in metrics
    # the backbone weights came from the ViT (the gate phase does not touch them)
    gate_phase = load_file(out / "phase-gate" / "final" / "model.safetensors")
    torch.testing.assert_close(gate_phase["msvit.embeddings.cls_token"], vit.vit.embeddings.cls_token.detach())


def test_dit_fresh_and_from_local_pvt_v2(script, tmp_path):
    out = tmp_path / "dit"
    metrics = script.main(
        TINY
        + [
            "--output_dir",
            str(out),
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
        ]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "dit_routing"
    assert "AutoModelForImageClassification" in config["auto_map"]
    assert "eval_gmacs" in metrics and "eval_token_keep_ratio" in metrics

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
    metrics = script.main(
        TINY
        + [
            "--output_dir",
            str(out2),
            "--model_name_or_path",
            str(tmp_path / "pvt"),
            "--canvas_size",
            "64",
            "--budget_target",
            "0.8",
            "--gate_only_max_steps",
            "1",
            "--max_steps",
            "1",
            "--save_strategy",
            "no",
        ]
    )
    config = json.loads((out2 / "config.json").read_text())
    assert config["model_type"] == "dit_routing" and config["budget_target"] == 0.8
    assert "eval_token_keep_ratio" in metrics


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
    common = TINY + [
        "--image_size",
        "32",
        "--backbone_max_steps",
        "1",
        "--gate_only_max_steps",
        "1",
        "--max_steps",
        "1",
        "--save_strategy",
        "no",
    ]
    metrics = script.main(
        common
        + [
            "--output_dir",
            str(tmp_path / "a"),
            "--train_dir",
            str(tmp_path / "images" / "train"),
            "--validation_dir",
            str(tmp_path / "images" / "val"),
        ]
    )
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog"} and "eval_accuracy" in metrics

    from hf_msvit.data import load_digits_on_canvas

    data = load_digits_on_canvas(canvas_size=32, digit_size=16, copies=1)
    (tmp_path / "digits").mkdir()
    data["train"].select(range(40)).to_parquet(str(tmp_path / "digits" / "train.parquet"))
    metrics = script.main(
        common
        + [
            "--output_dir",
            str(tmp_path / "b"),
            "--dataset_name",
            str(tmp_path / "digits"),
            "--train_val_split",
            "0.25",
        ]
    )
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert len(config["id2label"]) == 10 and "eval_fine_region_ratio" in metrics
