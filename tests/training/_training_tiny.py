"""Tiny models and data shared by the training tests (not a test module)."""

import torch

from hf_msvit import MSViTConfig, MSViTForImageClassification, MSViTImageProcessor


def tiny_msvit(num_labels=10, image_size=32, seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(
        image_size=image_size,
        patch_size=8,
        coarse_patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        gate_hidden_size=16,
        num_labels=num_labels,
    )
    values.update(overrides)
    return MSViTForImageClassification(MSViTConfig(**values))


def tiny_processor(image_size=32):
    return MSViTImageProcessor(size={"height": image_size, "width": image_size})
