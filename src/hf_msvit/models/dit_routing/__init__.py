"""DiT: dynamic token routing for vision transformers (arXiv 2308.03409), PVTv2 as a routing grid."""

from .configuration_dit_routing import PVT_V2_SHAPE_FIELDS, DiTConfig
from .image_processing_dit_routing import DiTImageProcessor
from .modeling_dit_routing import (
    DiTBackbone,
    DiTForImageClassification,
    DiTModel,
    DiTPreTrainedModel,
    dit_route_macs,
    mean_token_keep_ratio,
)


__all__ = [
    "PVT_V2_SHAPE_FIELDS",
    "DiTBackbone",
    "DiTConfig",
    "DiTForImageClassification",
    "DiTImageProcessor",
    "DiTModel",
    "DiTPreTrainedModel",
    "dit_route_macs",
    "mean_token_keep_ratio",
]
