"""keras-zoo: pretrained multi-backend models for Keras 3.

Example:
    >>> import zoo
    >>> clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")  # doctest: +SKIP
    >>> clf.predict_labels(["digit.png"], top_k=3)  # doctest: +SKIP
"""

from zoo import _select_backend

_select_backend.choose()

from zoo import backends, errors, hub, loader  # noqa: E402  (the backend must be chosen before Keras is imported)
from zoo.models.gemma import GemmaBackbone, GemmaCausalLM, GemmaConfig  # noqa: E402
from zoo.models.vit import ImagePreprocessor, ViTBackbone, ViTConfig, ViTImageClassifier  # noqa: E402
from zoo.presets import PresetCard, list_presets  # noqa: E402

__version__ = "0.1.0"


def from_preset(preset, **kwargs):
    """Loads a preset with its default task class (e.g. a ViT checkpoint as a ViTImageClassifier)."""
    folder = hub.resolve(preset)  # once: a hub handle is not resolved (or downloaded) a second time
    model = loader.detect(folder).task.from_preset(folder, **kwargs)
    model.source = hub.describe(preset, folder)
    return model


__all__ = [
    "GemmaBackbone",
    "GemmaCausalLM",
    "GemmaConfig",
    "ImagePreprocessor",
    "PresetCard",
    "ViTBackbone",
    "ViTConfig",
    "ViTImageClassifier",
    "backends",
    "errors",
    "from_preset",
    "list_presets",
]
