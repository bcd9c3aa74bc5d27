"""Tiny random DiT models and inputs shared by the DiT tests (no network, a fraction of a second to build)."""

import torch

from hf_msvit import DiTConfig, DiTForImageClassification


def tiny_config(**overrides) -> DiTConfig:
    values = {
        "image_size": 64,
        "hidden_sizes": [8, 16, 24, 32],
        "num_attention_heads": [1, 2, 3, 4],
        "depths": [1, 2, 1, 1],
        "sr_ratios": [4, 2, 1, 1],
        "mlp_ratios": [2, 2, 2, 2],
        "num_labels": 5,
        # p(open) = 0.5 and larger gate weights: a random model routes part of the tokens and images.
        "gate_init_compute_prob": 0.5,
        "initializer_range": 0.2,
        "attn_implementation": "eager",
    }
    values.update(overrides)
    return DiTConfig(**values)


def pixels(batch=3, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(model_class=DiTForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).eval()
