"""Vision Transformer: Hugging Face `ViTForImageClassification` and timm `vit_*` checkpoints."""

from zoo import registry
from zoo.models.vit.config import ViTConfig
from zoo.models.vit.model import ViTBackbone, ViTImageClassifier
from zoo.models.vit.preprocess import ImagePreprocessor

registry.register_hf("vit", registry.Format("vit", "hf", ViTConfig.from_hf, ViTImageClassifier))
registry.register_timm("vit", registry.Format("vit", "timm", ViTConfig.from_timm, ViTImageClassifier))

__all__ = ["ViTBackbone", "ViTConfig", "ViTImageClassifier", "ImagePreprocessor"]
