"""MSViT: dynamic mixed-scale tokenization for vision transformers (arXiv 2307.02321)."""

from .configuration_msvit import MSViTConfig
from .image_processing_msvit import MSViTImageProcessor
from .modeling_msvit import MSViTForImageClassification, MSViTModel, MSViTPreTrainedModel


__all__ = ["MSViTConfig", "MSViTForImageClassification", "MSViTImageProcessor", "MSViTModel", "MSViTPreTrainedModel"]
