"""Segmentation maps through both image processors, the metrics computed here, and the image-segmentation pipeline."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import UperNetConfig, pipeline
from transformers.trainer_utils import EvalPrediction

from hf_msvit import DiTConfig, DiTImageProcessor, MSViTConfig, MSViTForSemanticSegmentation, MSViTImageProcessor
from hf_msvit.segmentation import (
    DynamicUperNetForSemanticSegmentation,
    SegmentationCollator,
    SegmentationMetrics,
    SegmentationTransform,
    confusion_matrix,
    segmentation_scores,
)


PROCESSORS = [MSViTImageProcessor, DiTImageProcessor]


def label_map(height=30, width=20):
    labels = np.zeros((height, width), dtype=np.uint8)
    labels[5:20, 4:15] = 7
    labels[22:, :] = 3
    return Image.fromarray(labels, mode="L")


def image(height=30, width=20, seed=0):
    values = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(values, mode="RGB")


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_segmentation_maps_are_resized_nearest_and_kept_as_class_ids(processor_class):
    processor = processor_class(size={"height": 16, "width": 12})
    out = processor([image(), image(seed=1)], segmentation_maps=[label_map(), label_map()], return_tensors="pt")
    assert tuple(out["pixel_values"].shape) == (2, 3, 16, 12)
    labels = out["labels"]
    assert labels.dtype == torch.int64 and tuple(labels.shape) == (2, 16, 12)
    assert set(labels.unique().tolist()) == {0, 3, 7}  # nearest sampling: no value between classes, no rescaling
    expected = np.asarray(label_map().resize((12, 16), Image.NEAREST))
    assert np.array_equal(labels[0].numpy(), expected)


@pytest.mark.parametrize("processor_class", PROCESSORS)
def test_reduce_labels_and_post_processing(processor_class):
    processor = processor_class(size={"height": 16, "width": 12}, do_reduce_labels=True)
    labels = processor(image(), segmentation_maps=label_map(), return_tensors="pt")["labels"]
    assert set(labels.unique().tolist()) == {255, 2, 6}  # background -> ignored, classes shifted down by one
    logits = torch.randn(2, 5, 16, 12)
    outputs = type("Outputs", (), {"logits": logits})()  # post-processing reads only `.logits`
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(30, 20), (8, 6)])
    assert [tuple(m.shape) for m in maps] == [(30, 20), (8, 6)]
    assert torch.equal(processor.post_process_semantic_segmentation(outputs)[1], logits[1].argmax(0))


def test_transform_and_collator_build_training_batches():
    processor = MSViTImageProcessor(size={"height": 16, "width": 16})
    transform = SegmentationTransform(processor)
    rows = transform({"image": [image(), image(seed=2)], "label": [label_map(), label_map()]})
    batch = SegmentationCollator(all_fine_grid=(2, 2))([dict(zip(rows, values)) for values in zip(*rows.values())])
    assert tuple(batch["pixel_values"].shape) == (2, 3, 16, 16) and batch["labels"].dtype == torch.long
    assert batch["fine_region_mask"].shape == (2, 2, 2) and bool(batch["fine_region_mask"].all())


def test_mean_iou_and_per_class_accuracy_from_the_confusion_matrix():
    labels = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    confusion = confusion_matrix(predicted, labels, num_labels=4, ignore_index=255)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    scores = segmentation_scores(confusion.numpy(), {0: "bg", 1: "a", 2: "b", 3: "never"})
    assert scores["iou_bg"] == pytest.approx(1 / 3) and scores["iou_a"] == pytest.approx(3 / 4)
    assert scores["iou_b"] == pytest.approx(1 / 2) and np.isnan(scores["iou_never"])
    assert scores["mean_iou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores["accuracy_bg"] == pytest.approx(1 / 2)
    assert scores["mean_accuracy"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert scores["overall_accuracy"] == pytest.approx(5 / 7)


def test_metrics_by_batch_equal_metrics_on_the_whole_set():
    generator = torch.Generator().manual_seed(0)
    predicted = torch.randint(0, 3, (6, 4, 4), generator=generator)
    labels = torch.randint(0, 3, (6, 4, 4), generator=generator)
    stats = torch.tensor([[2e9, 0.5], [4e9, 0.25]] * 3)
    metric = SegmentationMetrics({0: "x", 1: "y", 2: "z"})
    for start in (0, 2, 4):
        part = slice(start, start + 2)
        result = metric(EvalPrediction((predicted[part], stats[part]), labels[part]), compute_result=start == 4)
    whole = SegmentationMetrics({0: "x", 1: "y", 2: "z"})(EvalPrediction((predicted, stats), labels))
    assert result == pytest.approx(whole, nan_ok=True)
    assert whole["gmacs"] == pytest.approx(3.0) and whole["fine_region_ratio"] == pytest.approx(0.375)


def tiny_msvit_segmenter():
    torch.manual_seed(0)
    config = MSViTConfig(image_size=32, patch_size=4, coarse_patch_size=8, hidden_size=32, num_hidden_layers=1,
                         num_attention_heads=4, intermediate_size=48, gate_hidden_size=16,
                         id2label={0: "background", 1: "thing", 2: "stuff"})  # fmt: skip
    return MSViTForSemanticSegmentation(config).eval(), MSViTImageProcessor(size={"height": 32, "width": 32})


def tiny_dit_upernet():
    torch.manual_seed(0)
    backbone = DiTConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 3, 4],
                         sr_ratios=[4, 2, 1, 1], mlp_ratios=[2, 2, 2, 2], image_size=32,
                         out_features=["stage1", "stage2", "stage3", "stage4"])  # fmt: skip
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_channels=8,
                           id2label={0: "background", 1: "thing", 2: "stuff"})  # fmt: skip
    return DynamicUperNetForSemanticSegmentation(config).eval(), DiTImageProcessor(size={"height": 32, "width": 32})


@pytest.mark.parametrize("build", [tiny_msvit_segmenter, tiny_dit_upernet], ids=["msvit", "dit_upernet"])
def test_image_segmentation_pipeline(build, tmp_path):
    model, processor = build()
    segmenter = pipeline("image-segmentation", model=model, image_processor=processor)
    picture = image(50, 70)
    results = segmenter(picture)
    with torch.no_grad():
        expected = processor.post_process_semantic_segmentation(
            model(**processor(picture, return_tensors="pt")), target_sizes=[(50, 70)]
        )[0]
    assert {result["label"] for result in results} == {model.config.id2label[int(i)] for i in expected.unique()}
    label2id = {name: class_id for class_id, name in model.config.id2label.items()}
    for result in results:
        assert result["mask"].size == (70, 50)
        class_id = label2id[result["label"]]
        assert np.array_equal(np.asarray(result["mask"]) > 0, (expected == class_id).numpy())
    # from a saved folder too (trust_remote_code=False: the installed classes, no prompt)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    from_folder = pipeline("image-segmentation", model=str(tmp_path), trust_remote_code=False)
    assert [r["label"] for r in from_folder(picture)] == [r["label"] for r in results]
