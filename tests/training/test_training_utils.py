"""hf_msvit.training: metrics offline, stats next to logits, gate-only freezing, gradient accumulation scaling."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from _training_tiny import tiny_msvit, tiny_processor

from hf_msvit import DiTConfig, DiTForImageClassification
from hf_msvit.training import (
    DynamicComputeTrainer,
    ImageTransform,
    collate_fn,
    freeze_all_but_gates,
    gate_parameter_names,
    make_compute_metrics,
    unfreeze_all,
)


def test_compute_metrics_offline_with_and_without_stats(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    labels = np.array([0, 1, 1, 1])
    stats = np.array([[1e9, 0.5], [3e9, 0.25], [2e9, 0.0], [2e9, 0.25]])
    metrics = make_compute_metrics("fine_region_ratio", static_macs_per_image=4e9)(
        EvalPrediction((logits, stats), labels)
    )
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["gmacs"] == pytest.approx(2.0)
    assert metrics["fine_region_ratio"] == pytest.approx(0.25)
    assert metrics["static_gmacs"] == pytest.approx(4.0)
    assert metrics["macs_fraction"] == pytest.approx(0.5)
    plain = make_compute_metrics()(EvalPrediction(logits, labels))
    assert plain == {"accuracy": pytest.approx(0.75)}


def test_evaluate_reports_macs_and_ratio_matching_the_model(tmp_path):
    from datasets import Dataset
    from PIL import Image

    model = tiny_msvit(num_labels=3).eval()
    processor = tiny_processor()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(10)]
    labels = [i % 3 for i in range(10)]
    data = Dataset.from_dict({"image": images, "label": labels})
    data.set_transform(ImageTransform(processor))
    args = TrainingArguments(
        str(tmp_path), per_device_eval_batch_size=4, remove_unused_columns=False, report_to="none", use_cpu=True
    )
    trainer = DynamicComputeTrainer(
        model=model,
        args=args,
        eval_dataset=data,
        data_collator=collate_fn,
        compute_metrics=make_compute_metrics("fine_region_ratio", model.static_macs()),
    )
    metrics = trainer.evaluate()
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values)
    assert metrics["eval_gmacs"] == pytest.approx(out.macs.mean().item() / 1e9, rel=1e-5)
    assert metrics["eval_fine_region_ratio"] == pytest.approx(out.fine_region_mask.float().mean().item(), abs=1e-6)
    expected_acc = (out.logits.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected_acc)
    assert metrics["eval_static_gmacs"] == pytest.approx(model.static_macs() / 1e9)


def test_transform_has_no_flip_and_maps_labels():
    from PIL import Image

    processor = tiny_processor()
    image = Image.new("L", (40, 40))
    image.paste(255, (0, 0, 10, 40))  # a bar on the left
    batch = ImageTransform(processor)({"image": [image], "label": [7]})
    assert batch["labels"] == [7] and "image" not in batch
    pixels = batch["pixel_values"][0]
    assert pixels.shape == (3, 32, 32)
    assert pixels[:, :, :4].mean() > pixels[:, :, -4:].mean()  # left stays left
    collated = collate_fn([{"pixel_values": pixels, "labels": 7}] * 2)
    assert collated["pixel_values"].shape == (2, 3, 32, 32) and collated["labels"].tolist() == [7, 7]


def test_freeze_all_but_gates_msvit():
    model = tiny_msvit()
    names = freeze_all_but_gates(model)
    assert names == sorted(gate_parameter_names(model))
    assert names and all(n.startswith(("msvit.embeddings.gate.", "msvit.batch_shaping.")) for n in names)
    assert any(n.startswith("msvit.batch_shaping.") for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(names)
    assert not model.classifier.weight.requires_grad
    unfreeze_all(model)
    assert all(p.requires_grad for p in model.parameters())


def test_freeze_all_but_gates_dit():
    config_class, model_class = DiTConfig, DiTForImageClassification
    model = model_class(
        config_class(
            image_size=64,
            hidden_sizes=[8, 16, 16, 32],
            depths=[1, 1, 1, 1],
            num_attention_heads=[1, 1, 1, 1],
            num_labels=3,
        )
    )
    names = freeze_all_but_gates(model)
    assert names and all("gates." in n for n in names), names
    assert not model.classifier.weight.requires_grad


def test_gradient_accumulation_scales_the_aux_loss_like_the_task_loss(tmp_path):
    """With GA=2 every micro-batch's full loss (CE + GBaS) is divided by 2: the gradient Trainer accumulates is the
    gradient of `model(**batch).loss / 2`, gate terms included (no GA-times-too-large auxiliary loss)."""
    model = tiny_msvit(num_labels=3, gbas_loss_weight=1.0)
    args = TrainingArguments(
        str(tmp_path),
        gradient_accumulation_steps=2,
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args)
    assert trainer.model_accepts_loss_kwargs is False
    trainer.current_gradient_accumulation_steps = 2
    batch = {
        "pixel_values": torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)),
        "labels": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
    }

    model.zero_grad()
    torch.manual_seed(123)
    trainer.training_step(model, dict(batch))
    via_trainer = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    model.train()
    torch.manual_seed(123)
    out = model(**batch)
    assert out.gate_loss is not None and out.gate_loss.item() > 0
    (out.loss / 2).backward()
    manual = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert via_trainer.keys() == manual.keys()
    gate_names = [n for n in manual if "gate" in n or "batch_shaping" in n]
    assert gate_names
    for name in manual:
        torch.testing.assert_close(via_trainer[name], manual[name], rtol=1e-5, atol=1e-7)
