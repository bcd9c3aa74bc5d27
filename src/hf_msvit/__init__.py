"""hf_msvit: MSViT (mixed-scale tokenization) and DiT (dynamic token routing) as native Hugging Face models.

Importing the package registers every model with the Auto classes, so `AutoConfig`, `AutoModel`,
`AutoModelForImageClassification`, `AutoModelForSemanticSegmentation` (MSViT), `AutoImageProcessor` and `AutoBackbone`
load our checkpoints with the installed classes. People without this package load the same checkpoints with
`trust_remote_code=True`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto.video_processing_auto import AutoVideoProcessor

from .models import dit_routing as _dit_routing
from .models import msvit as _msvit
from .models.dit_routing import (
    DiTBackbone,
    DiTConfig,
    DiTForImageClassification,
    DiTImageProcessor,
    DiTModel,
    DiTPreTrainedModel,
)
from .models.msvit import (
    MSViTBackbone,
    MSViTConfig,
    MSViTForImageClassification,
    MSViTForSemanticSegmentation,
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
    # No video processor, said explicitly. `pipeline()` also tries `AutoVideoProcessor`, which (finding no
    # `video_processor_type`) turns the image processor's `auto_map` entry into a remote `...VideoProcessor` reference;
    # with nothing registered for our config it counts as remote code only and asks "run the custom code? [y/N]". A
    # registered (empty) entry is local code, so transformers prefers it without asking and reports that there is no
    # video processor, which `pipeline()` treats as "none needed". Without hf_msvit, trust_remote_code=True loads as
    # before (the derived remote class does not exist; pipeline() skips the optional component).
    # (Imported from its module: `transformers.AutoVideoProcessor` is a placeholder when torchvision is missing.)
    AutoVideoProcessor.register(config_class, video_processor_classes={}, exist_ok=True)


_register(MSViTConfig, MSViTModel, MSViTForImageClassification, MSViTImageProcessor)
_register(DiTConfig, DiTModel, DiTForImageClassification, DiTImageProcessor)
AutoBackbone.register(DiTConfig, DiTBackbone, exist_ok=True)
AutoBackbone.register(MSViTConfig, MSViTBackbone, exist_ok=True)
AutoModelForSemanticSegmentation.register(MSViTConfig, MSViTForSemanticSegmentation, exist_ok=True)

# The public API: the classes of both model folders (their `__all__`; helpers such as `dit_route_macs` stay there).
__all__ = [name for name in (*_dit_routing.__all__, *_msvit.__all__) if isinstance(globals().get(name), type)]
