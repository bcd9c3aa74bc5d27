"""hf_msvit: MSViT (mixed-scale tokenization) and DiT (dynamic token routing) as native Hugging Face models.

Importing the package registers every model with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoImageProcessor` (and `AutoBackbone` for DiT) load our checkpoints with the
installed classes. People without this package load the same checkpoints with `trust_remote_code=True`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
)

from .models.dit_routing import (
    DiTBackbone,
    DiTConfig,
    DiTForImageClassification,
    DiTImageProcessor,
    DiTModel,
    DiTPreTrainedModel,
)
from .models.msvit import (
    MSViTConfig,
    MSViTForImageClassification,
    MSViTImageProcessor,
    MSViTModel,
    MSViTPreTrainedModel,
)


__version__ = "0.1.0"


def _register(config_class, model_class, classification_class, image_processor_class):
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageClassification.register(config_class, classification_class, exist_ok=True)
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": image_processor_class}, exist_ok=True)


_register(MSViTConfig, MSViTModel, MSViTForImageClassification, MSViTImageProcessor)
_register(DiTConfig, DiTModel, DiTForImageClassification, DiTImageProcessor)
AutoBackbone.register(DiTConfig, DiTBackbone, exist_ok=True)

__all__ = [
    "DiTBackbone",
    "DiTConfig",
    "DiTForImageClassification",
    "DiTImageProcessor",
    "DiTModel",
    "DiTPreTrainedModel",
    "MSViTConfig",
    "MSViTForImageClassification",
    "MSViTImageProcessor",
    "MSViTModel",
    "MSViTPreTrainedModel",
]
