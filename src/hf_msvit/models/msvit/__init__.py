"""MSViT: dynamic mixed-scale tokenization for vision transformers (arXiv 2307.02321)."""

from .configuration_msvit import MSViTConfig
from .image_processing_msvit import MSViTImageProcessor
from .modeling_msvit import (
    MSViTBackbone,
    MSViTForImageClassification,
    MSViTForSemanticSegmentation,
    MSViTModel,
    MSViTPreTrainedModel,
)


__all__ = [
    "MSViTBackbone",
    "MSViTConfig",
    "MSViTForImageClassification",
    "MSViTForSemanticSegmentation",
    "MSViTImageProcessor",
    "MSViTModel",
    "MSViTPreTrainedModel",
]
