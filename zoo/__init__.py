"""keras-zoo: pretrained multi-backend models for Keras 3.

Example:
    >>> import zoo
    >>> clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")  # doctest: +SKIP
    >>> clf.predict_labels(["digit.png"], top_k=3)  # doctest: +SKIP
"""

import importlib
import importlib.util

from zoo import _select_backend

_select_backend.choose()  # before anything imports Keras; imports nothing heavy itself

__version__ = "0.1.0"

# The face is lazy: `import zoo` (or `zoo.presets` for the catalogue) loads no backend; a task class,
# `zoo.backends` or `from_preset` loads Keras on first use.
_LAZY = {
    "GemmaBackbone": "zoo.models.gemma", "GemmaCausalLM": "zoo.models.gemma", "GemmaConfig": "zoo.models.gemma",
    "ImagePreprocessor": "zoo.models.vit", "ViTBackbone": "zoo.models.vit", "ViTConfig": "zoo.models.vit",
    "ViTImageClassifier": "zoo.models.vit", "PresetCard": "zoo.presets", "list_presets": "zoo.presets",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"zoo.{name}") is not None:  # zoo.backends, ...
        value = importlib.import_module(f"zoo.{name}")
    else:
        raise AttributeError(f"module 'zoo' has no attribute {name!r}")
    globals()[name] = value
    return value


def from_preset(preset, **kwargs):
    """Loads a preset with its default task class (e.g. a ViT checkpoint as a ViTImageClassifier)."""
    from zoo import hub, loader, models

    models.register_all()
    folder = hub.resolve(preset)  # once: a hub handle is not resolved (or downloaded) a second time
    model = loader.detect(folder, kwargs.get("base")).task.from_preset(folder, **kwargs)
    model.source = {**model.source, **hub.describe(preset, folder)}  # (an adapter's keeps its "base")
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
