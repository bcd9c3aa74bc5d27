"""examples/run_semantic_segmentation.py for a few steps on the built-in data, MSViT and DiT: phases, metrics, model
folder, model card."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSemanticSegmentation, UperNetForSemanticSegmentation

from hf_msvit import DiTBackbone, MSViTConfig, MSViTForSemanticSegmentation


pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "run_semantic_segmentation.py"

TINY = [
    "--canvas_size", "32", "--digit_copies", "1", "--max_train_samples", "16", "--max_eval_samples", "8",
    "--hidden_size", "32", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "32",
    "--gate_hidden_size", "16", "--upernet_hidden_size", "8", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "8", "--backbone_max_steps", "2", "--gate_only_max_steps", "1", "--max_steps", "2",
    "--logging_steps", "1", "--disable_tqdm", "True", "--use_cpu", "True", "--dataloader_num_workers", "0",
]  # fmt: skip


def load_script():
    spec = importlib.util.spec_from_file_location("run_semantic_segmentation", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_example_trains_msvit_and_dit_on_the_builtin_data(tmp_path):
    script = load_script()
    for model_type, ratio in (("msvit", "fine_region_ratio"), ("dit_routing", "token_keep_ratio")):
        output_dir = tmp_path / model_type
        metrics = script.main([*TINY, "--model_type", model_type, "--output_dir", str(output_dir)])
        for prefix in ("backbone_eval", "eval"):
            assert 0.0 <= metrics[f"{prefix}_mean_iou"] <= 1.0, metrics
            assert f"{prefix}_accuracy_digit 3" in metrics and f"{prefix}_iou_background" in metrics
        assert metrics["eval_gmacs"] > 0 and 0.0 <= metrics[f"eval_{ratio}"] <= 1.0
        assert {"phase-backbone", "phase-gate", "phase-joint"} <= {p.name for p in output_dir.iterdir()}
        assert json.loads((output_dir / "all_results.json").read_text()) == pytest.approx(metrics, nan_ok=True)
        card = (output_dir / "README.md").read_text()
        assert "pipeline_tag: image-segmentation" in card and "mean_iou" in card
        model = AutoModelForSemanticSegmentation.from_pretrained(output_dir).eval()
        if model_type == "msvit":
            assert type(model) is MSViTForSemanticSegmentation
            assert metrics["backbone_eval_fine_region_ratio"] == 1.0  # the backbone phase: the ViT, every region fine
        else:
            assert type(model) is UperNetForSemanticSegmentation and isinstance(model.backbone, DiTBackbone)
        with torch.no_grad():
            assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 11, 32, 32)


def test_push_to_hub_uploads_the_model_folder_with_a_card(tmp_path):
    """`--push_to_hub`: the model folder (weights, code, processor, card) in one `upload_folder` through
    `hf_msvit.hub.push_to_hub`, as the classification example; the Hub API is mocked."""
    from unittest import mock

    import huggingface_hub
    from transformers import TrainingArguments

    from hf_msvit import MSViTImageProcessor, phases

    config = MSViTConfig(image_size=32, patch_size=8, coarse_patch_size=16, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, gate_hidden_size=16, num_labels=3)  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="me/msvit-seg", report_to="none")
    uploaded = []

    def upload_folder(self, **kwargs):
        uploaded.append({"repo_id": kwargs["repo_id"], "files": sorted(os.listdir(kwargs["folder_path"]))})
        return "https://hub/commit"

    with mock.patch.multiple(
        huggingface_hub.HfApi, create_repo=lambda self, repo_id, **kwargs: mock.Mock(), upload_folder=upload_folder
    ):
        model, processor = MSViTForSemanticSegmentation(config), MSViTImageProcessor()
        metrics = {"eval_mean_iou": 0.5, "eval_gmacs": 0.01}
        assert phases.save_and_push(model, args, processor, eval_metrics=metrics, builtin_data=True) is None
    assert len(uploaded) == 1 and uploaded[0]["repo_id"] == "me/msvit-seg"
    expected = {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_msvit.py", "README.md"}
    assert expected <= set(uploaded[0]["files"]) and expected <= {path.name for path in tmp_path.iterdir()}
    card = (tmp_path / "README.md").read_text()
    assert "| mean_iou | 0.5 |" in card and "trust_remote_code=True" in card
    assert "pipeline_tag: image-segmentation" in card
    # the built-in data has no Hub id: named in the text, no dataset and no model-index in the metadata
    assert "built into hf_msvit" in card and "datasets:" not in card and "model-index" not in card


def test_segmentation_card_names_a_hub_dataset_with_its_mean_iou():
    from hf_msvit.hub import build_model_card

    config = MSViTConfig(image_size=32, patch_size=8, coarse_patch_size=16, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=2, intermediate_size=32, gate_hidden_size=16, num_labels=3)  # fmt: skip
    metrics = {"eval_mean_iou": 0.25, "eval_gmacs": 0.01}
    card = build_model_card(MSViTForSemanticSegmentation(config), "me/seg", metrics, dataset_name="scene_parse_150")
    assert card.data.datasets == ["scene_parse_150"] and card.data.pipeline_tag == "image-segmentation"
    result = card.data.eval_results[0]
    assert result.metric_value == 0.25 and result.dataset_name == "scene_parse_150"


def closed_stage_gradient(sparse_training: bool | None) -> torch.Tensor:
    """Gradient of the pixel loss alone (budget weight 0) on the row gate of PVTv2's stage 2 (grid node (1, 1)),
    closed for every token, in a UperNet on PVTv2 upcycled by the example to UperNet on DiT."""
    from transformers import PvtV2Config

    script = load_script()
    labels = {"num_labels": 4, "id2label": {i: str(i) for i in range(4)}, "label2id": {str(i): i for i in range(4)}}
    pvt = PvtV2Config(image_size=32, hidden_sizes=[8, 16, 24, 32], depths=[1] * 4, num_attention_heads=[1, 2, 3, 4],
                      sr_ratios=[4, 2, 1, 1], out_features=script.PVT_STAGES)  # fmt: skip
    model_args = script.ModelArguments(upernet_hidden_size=8, budget_loss_weight=0.0, sparse_training=sparse_training)
    torch.manual_seed(0)
    model = script.upcycle(script.upernet(pvt, model_args, labels), model_args).train()
    gate = model.backbone.row_gates[1][1]
    with torch.no_grad():
        gate.bias[1] = -4.0  # p(compute) ~ 0.02 for every token: the stage runs for none
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(4, 3, 32, 32, generator=generator)
    model(pixels, labels=torch.randint(0, 4, (4, 32, 32), generator=generator)).loss.backward()
    return torch.zeros_like(gate.bias) if gate.bias.grad is None else gate.bias.grad


def test_upcycled_dit_trains_every_node_so_a_closed_stage_can_reopen():
    """The example upcycles DiT with `sparse_training=False`: a stage the gate-only phase closed for every token
    still gets the pixel loss's gradient on its gate. With sparse training it gets none (only the budget loss's,
    which keeps it closed): in the segmentation study's gate-only phase PVTv2's stages 2-4 closed that way for good
    (0.57 test mean IoU at budget 0.8, seed 0, against 0.73 trained densely)."""
    assert load_script().BUDGET_DEFAULTS["sparse_training"] is False
    assert closed_stage_gradient(sparse_training=None).abs().sum() > 0  # the example's default
    assert closed_stage_gradient(sparse_training=True).abs().sum() == 0
