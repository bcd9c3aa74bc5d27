"""DiT: dynamic token routing for vision transformers (arXiv 2308.03409), PVTv2 as a routing grid."""

from .configuration_dit_routing import DiTConfig
from .image_processing_dit_routing import DiTImageProcessor
from .modeling_dit_routing import DiTBackbone, DiTForImageClassification, DiTModel, DiTPreTrainedModel, dit_route_macs

__all__ = [
    "DiTBackbone",
    "DiTConfig",
    "DiTForImageClassification",
    "DiTImageProcessor",
    "DiTModel",
    "DiTPreTrainedModel",
    "dit_route_macs",
]
