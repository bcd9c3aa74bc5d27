"""Tiny MSViT / DiT models and processors shared by the tests (not a test module): a few thousand parameters each."""

import torch

from hf_msvit import (
    DiTConfig,
    DiTForImageClassification,
    DiTImageProcessor,
    MSViTConfig,
    MSViTForImageClassification,
    MSViTImageProcessor,
)


def tiny_msvit_config(**overrides) -> MSViTConfig:
    """32x32 px, 8 px fine patches in 16 px coarse regions, 2 layers of width 32, 10 labels."""
    values = {
        "image_size": 32,
        "patch_size": 8,
        "coarse_patch_size": 16,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "gate_hidden_size": 16,
        "num_labels": 10,
    }
    return MSViTConfig(**{**values, **overrides})


def tiny_dit_config(**overrides) -> DiTConfig:
    """64x64 px, one block per scale, widths 8/16/24/32, 3 labels."""
    values = {
        "image_size": 64,
        "hidden_sizes": [8, 16, 24, 32],
        "num_attention_heads": [1, 2, 3, 4],
        "depths": [1, 1, 1, 1],
        "sr_ratios": [4, 2, 1, 1],
        "mlp_ratios": [2, 2, 2, 2],
        "num_labels": 3,
    }
    return DiTConfig(**{**values, **overrides})


def tiny_msvit(seed: int = 0, **overrides) -> MSViTForImageClassification:
    torch.manual_seed(seed)
    return MSViTForImageClassification(tiny_msvit_config(**overrides))


def tiny_dit(seed: int = 0, **overrides) -> DiTForImageClassification:
    torch.manual_seed(seed)
    return DiTForImageClassification(tiny_dit_config(**overrides))


def tiny_processor(model_type: str = "msvit", image_size: int = 32):
    processor_class = MSViTImageProcessor if model_type == "msvit" else DiTImageProcessor
    return processor_class(size={"height": image_size, "width": image_size})
