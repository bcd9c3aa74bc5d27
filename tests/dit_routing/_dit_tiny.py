"""Tiny random DiT models and inputs shared by the DiT tests (no network, a fraction of a second to build)."""

import torch

from hf_msvit import DiTConfig, DiTForImageClassification

from tiny_models import tiny_dit_config


def tiny_config(**overrides) -> DiTConfig:
    """The shared tiny DiT with two blocks at scale 1 and 5 labels. p(open) = 0.5 and larger gate weights: a random
    model routes part of the tokens and images."""
    values = {"depths": [1, 2, 1, 1], "num_labels": 5, "gate_init_compute_prob": 0.5, "initializer_range": 0.2}
    return tiny_dit_config(**{**values, "attn_implementation": "eager", **overrides})


def pixels(batch=3, size=64, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(model_class=DiTForImageClassification, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(**overrides)).eval()
