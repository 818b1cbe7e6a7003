"""Which architecture and layout a `config.json` describes.

Hugging Face configs name a `model_type`; timm configs name an `architecture` whose first
word is the family. Each model family (`zoo.models.*`) registers its formats here as data; the
loader and the preset cards look them up. It imports nothing above the errors.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ConfigError, UnknownArchitectureError


@dataclass(frozen=True)
class Format:
    """One way a family's checkpoints are laid out on disk."""

    family: str  # "vit", "gemma"
    layout: str  # "hf" or "timm"
    read_config: Callable[[dict], object]
    task: type  # the default task class (ViTImageClassifier, GemmaCausalLM)


HF_MODEL_TYPES: dict[str, Format] = {}
TIMM_FAMILIES: dict[str, Format] = {}


def register_hf(model_type: str, fmt: Format) -> None:
    HF_MODEL_TYPES[model_type] = fmt


def register_timm(prefix: str, fmt: Format) -> None:
    TIMM_FAMILIES[prefix] = fmt


def detect(raw: dict, where: Path | str = "config.json") -> Format:
    """The format a parsed config.json describes, or an error naming the field and the known values."""
    if "model_type" in raw:
        if not isinstance(raw["model_type"], str):
            raise ConfigError(f"{where}: field 'model_type' should be a string, got {raw['model_type']!r}")
        fmt = HF_MODEL_TYPES.get(raw["model_type"])
        if fmt is None:
            raise UnknownArchitectureError(
                f"{where}: unknown model_type {raw['model_type']!r}; keras-zoo implements {sorted(HF_MODEL_TYPES)}"
            )
        return fmt
    if "architecture" in raw:
        prefix = str(raw["architecture"]).split("_")[0]
        fmt = TIMM_FAMILIES.get(prefix)
        if fmt is None:
            raise UnknownArchitectureError(
                f"{where}: unknown timm architecture {raw['architecture']!r}; keras-zoo implements "
                f"{', '.join(p + '_*' for p in sorted(TIMM_FAMILIES))}"
            )
        return fmt
    raise UnknownArchitectureError(
        f"{where}: expected a 'model_type' field (Hugging Face layout) or an 'architecture' field (timm layout)"
    )
