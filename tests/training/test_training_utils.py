"""hf_msvit.training: metrics offline, compute next to logits, training-time compute in the logs, the gates' own
learning rate, gate-only freezing, gradient accumulation scaling."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_msvit.training import (
    Distillation,
    DynamicComputeTrainer,
    ImageTransform,
    collate_fn,
    freeze_all_but_gates,
    gate_parameter_names,
    make_compute_metrics,
    set_frozen_gate_level,
    unfreeze_all,
)

from tiny_models import tiny_dit, tiny_msvit, tiny_processor


def image_dataset(processor, num_images=10, num_labels=3, size=32):
    """Random RGB images with labels `i % num_labels`, transformed on the fly."""
    from datasets import Dataset
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(num_images)]
    data = Dataset.from_dict({"image": images, "label": [i % num_labels for i in range(num_images)]})
    data.set_transform(ImageTransform(processor))
    return data, images


def trainer_for(model, tmp_path, train_dataset=None, eval_dataset=None, distillation=None, **kwargs):
    args = TrainingArguments(
        str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        remove_unused_columns=False,
        report_to="none",
        use_cpu=True,
        **kwargs,
    )
    return DynamicComputeTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collate_fn,
        compute_metrics=make_compute_metrics("fine_region_ratio", model.static_macs()),
        distillation=distillation,
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
    model = tiny_msvit(num_labels=3).eval()
    processor = tiny_processor()
    data, images = image_dataset(processor)
    metrics = trainer_for(model, tmp_path, eval_dataset=data).evaluate()
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model(pixel_values)
    assert metrics["eval_gmacs"] == pytest.approx(out.macs.mean().item() / 1e9, rel=1e-5)
    assert metrics["eval_fine_region_ratio"] == pytest.approx(out.fine_region_mask.float().mean().item(), abs=1e-6)
    labels = torch.tensor([data[i]["labels"] for i in range(len(data))])
    expected_acc = (out.logits.argmax(-1) == labels).float().mean().item()
    assert metrics["eval_accuracy"] == pytest.approx(expected_acc)
    assert metrics["eval_static_gmacs"] == pytest.approx(model.static_macs() / 1e9)


def test_training_logs_the_compute_of_the_training_forward_passes(tmp_path):
    """Every training log carries the mean token ratio, GMACs, MACs fraction and gate loss of the forward passes since
    the previous log (gates sampled as in training), and `train()`'s metrics those of the last window."""
    model = tiny_msvit(num_labels=3)
    data, _ = image_dataset(tiny_processor(), num_images=16)
    outputs = []
    model.register_forward_hook(lambda module, inputs, output: outputs.append(output) if module.training else None)
    trainer = trainer_for(model, tmp_path, train_dataset=data, max_steps=4, logging_steps=2)
    result = trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and len(outputs) == 4
    static_gmacs = model.static_macs() / 1e9
    for log, window in zip(logs, (outputs[:2], outputs[2:])):
        ratio = torch.cat([o.fine_region_mask.flatten(1).float().mean(1) for o in window]).mean().item()
        gmacs = torch.cat([o.macs for o in window]).mean().item() / 1e9
        assert log["train_fine_region_ratio"] == pytest.approx(ratio)
        assert log["train_gmacs"] == pytest.approx(gmacs, rel=1e-6)
        assert log["train_macs_fraction"] == pytest.approx(gmacs / static_gmacs, rel=1e-6)
        gate_loss = torch.stack([o.gate_loss for o in window]).mean().item()
        assert gate_loss > 0 and log["train_gate_loss"] == pytest.approx(gate_loss, rel=1e-5)
    assert result.metrics["train_fine_region_ratio"] == logs[-1]["train_fine_region_ratio"]
    eval_logs = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert all("train_fine_region_ratio" not in log for log in eval_logs)


def test_gates_train_at_their_own_learning_rate(tmp_path):
    """With `gate_learning_rate` the gate parameters form their own optimizer groups (same weight decay split),
    every other parameter keeps `learning_rate`, and the scheduler decays both."""
    model = tiny_msvit(num_labels=3)
    data, _ = image_dataset(tiny_processor(), num_images=8)
    trainer = trainer_for(model, tmp_path, train_dataset=data, learning_rate=1e-4, weight_decay=0.1, max_steps=2)
    trainer.gate_learning_rate = 1e-2
    trainer.create_optimizer_and_scheduler(num_training_steps=2)
    gate_ids = {id(p) for name, p in model.named_parameters() if name in set(gate_parameter_names(model))}
    groups = [group for group in trainer.optimizer.param_groups if group["params"]]
    for group in groups:
        is_gate = {id(p) in gate_ids for p in group["params"]}
        assert len(is_gate) == 1, "a group mixes gate and other parameters"
        assert group["lr"] == (1e-2 if is_gate.pop() else 1e-4)
    assert {group["weight_decay"] for group in groups} == {0.0, 0.1}
    assert sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    trainer.optimizer.step()
    trainer.lr_scheduler.step()
    assert sorted({group["lr"] for group in groups}) == [1e-4 / 2, 1e-2 / 2]  # linear decay, 1 of 2 steps


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
    model = tiny_dit()
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


@pytest.mark.parametrize("gate_input", ["pixels", "embeddings"])
def test_a_frozen_gate_gets_its_level_set_on_the_training_batches(gate_input):
    """A gate whose level drifted off the target gets the shift that puts a `gbas_target_ratio` fraction of
    the regions of the given batches at `p >= 0.5`: inference (uncalibrated) and noise-free training decisions then
    take the target fraction on those images, and the shift returned is what was subtracted."""
    model = tiny_msvit(gbas_target_ratio=0.25, gate_input=gate_input, gate_level_calibration=False,
                       gate_noise_scale=0.0)  # fmt: skip
    gate = model.msvit.embeddings.gate
    with torch.no_grad():  # a trained gate: logits that differ between regions, a level off the target
        for layer in gate.layers:
            layer.weight.normal_(0.0, 0.5)
        gate.logit_bias.add_(3.0)
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(8, 3, 32, 32, generator=generator)} for _ in range(4)]
    pixels = torch.cat([batch["pixel_values"] for batch in batches])
    with torch.no_grad():
        before = model.eval()(pixels).fine_region_mask.float().mean().item()
    bias = gate.logit_bias.item()
    shift = set_frozen_gate_level(model, batches)
    assert abs(before - 0.25) > 0.1 and gate.logit_bias.item() == pytest.approx(bias - shift)
    with torch.no_grad():
        inference = model.eval()(pixels).fine_region_mask.float().mean().item()
        training = model.train()(pixels).fine_region_mask.float().mean().item()
    assert inference == pytest.approx(0.25, abs=1 / pixels.shape[0]) and training == inference


@pytest.mark.parametrize("make_model", [tiny_msvit, tiny_dit])
def test_label_smoothing_keeps_the_routing_loss(make_model, tmp_path):
    """With label smoothing the Trainer takes the labels and computes the task loss itself; the model's gate / budget
    loss must still be in the loss, or the gates train without their level (an MSViT gate went all fine)."""
    from transformers.trainer_pt_utils import LabelSmoother

    model = make_model(num_labels=3).train()
    data, _ = image_dataset(tiny_processor("msvit" if make_model is tiny_msvit else "dit_routing"))
    batch = collate_fn([data[i] for i in range(4)])
    trainer = trainer_for(model, tmp_path, label_smoothing_factor=0.1)
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    outputs = model(pixel_values=batch["pixel_values"])
    routing = model.routing_loss(outputs)
    assert routing is not None and routing.abs() > 1e-4
    expected = LabelSmoother(0.1)(outputs, batch["labels"]) + routing
    torch.testing.assert_close(loss, expected)
    # without smoothing the model folds the same routing loss into its own loss
    plain_trainer = trainer_for(model, tmp_path)  # (a Trainer seeds torch when built)
    torch.manual_seed(0)
    plain = plain_trainer.compute_loss(model, dict(batch))
    torch.manual_seed(0)
    torch.testing.assert_close(plain, model(**batch).loss)


def test_distillation_adds_the_teachers_kl_and_never_trains_the_teacher(tmp_path):
    """`Distillation`: the training loss is the model's own plus weight * T^2 * KL(teacher || student) at temperature
    T; the teacher stays frozen through training, and evaluation adds nothing."""
    model, teacher = tiny_msvit(num_labels=3).train(), tiny_msvit(seed=1, num_labels=3)
    before = {key: value.clone() for key, value in teacher.state_dict().items()}
    data, _ = image_dataset(tiny_processor("msvit"))
    batch = collate_fn([data[i] for i in range(4)])
    distillation = Distillation(teacher, weight=0.5, temperature=2.0)
    trainer = trainer_for(model, tmp_path, train_dataset=data, max_steps=2, distillation=distillation)
    torch.manual_seed(0)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.manual_seed(0)
    own = model(**batch).loss
    with torch.no_grad():
        target = torch.softmax(teacher(pixel_values=batch["pixel_values"]).logits / 2, -1)
    kl = (target * (target.log() - torch.log_softmax(outputs.logits / 2, -1))).sum(-1).mean()
    assert kl > 1e-4
    torch.testing.assert_close(loss, own + 0.5 * 4 * kl)
    model.eval()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss)
    trainer.train()
    assert all(torch.equal(before[key], value) for key, value in teacher.state_dict().items())
    assert not teacher.training and not any(parameter.requires_grad for parameter in teacher.parameters())
    with pytest.raises(ValueError, match="positive weight and temperature"):
        Distillation(teacher, weight=0.0)
    with pytest.raises(ValueError, match="one class distribution per image"):
        distillation.loss(torch.zeros(4, 3, 8, 8), batch["pixel_values"])
