"""The settings of a fine-tune: one frozen dataclass that the functions, the CLI flags and a config file share."""

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ConfigError

@dataclass(frozen=True)
class Options:
    """How to train. `learning_rate` None: 2e-4 with LoRA, 2e-5 for a full fine-tune (PEFT's and TRL's usual)."""

    epochs: int = 1
    batch_size: int = 8
    learning_rate: float | None = None
    warmup_ratio: float = 0.05  # of all steps, linear from 0; then cosine decay to 0
    weight_decay: float = 0.01  # AdamW's, not on norms and biases (weights of one axis, as timm decides)
    clipnorm: float | None = 1.0  # the global gradient norm is clipped to this
    seed: int = 0
    lora: bool = True  # False: a full fine-tune
    lora_rank: int = 8
    lora_alpha: float | None = None  # default: the rank
    lora_targets: tuple[str, ...] | str | None = None  # default: PEFT's for the model type
    lora_dropout: float = 0.0
    rslora: bool = False
    max_length: int = 512  # text: tokens the model reads per row
    packing: bool = False  # text: several short examples per row
    validation_split: float = 0.0  # held out (seeded) when no validation data is given
    eval_rows: int = 1024  # the training loss before and after is measured on at most this many rows
    crop_scale: tuple[float, float] = (0.08, 1.0)  # images: random resized crop's area fraction (torchvision's)
    flip: bool = True  # images: random horizontal flips
    jit_compile: bool | str = "auto"  # compile the training step ("auto": the backend's choice; True on PyTorch:
    # torch.compile, minutes to compile ViT-B/16 on 2 cores, faster steps after)

    def __post_init__(self):
        ints = {"epochs": 1, "batch_size": 1, "lora_rank": 1, "max_length": 2, "eval_rows": 1}
        for name, least in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"{name}: expected an int of at least {least}, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"seed: expected an int, got {self.seed!r}")
        for name in ("learning_rate", "lora_alpha", "clipnorm"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
        for name in ("warmup_ratio", "lora_dropout", "validation_split"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"{name}: expected a fraction in [0, 1), got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"weight_decay: expected a number >= 0, got {self.weight_decay!r}")
        if self.jit_compile not in (True, False, "auto"):
            raise ConfigError(f"jit_compile: expected true, false or 'auto', got {self.jit_compile!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"crop_scale: expected (low, high) with 0 < low <= high <= 1, got {self.crop_scale!r}")

    @property
    def lr(self) -> float:
        return self.learning_rate or (2e-4 if self.lora else 2e-5)

    @classmethod
    def fields(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def make(cls, **values) -> "Options":
        """Options from keyword values, an unknown name an error that lists the known ones."""
        unknown = sorted(set(values) - cls.fields())
        if unknown:
            raise ConfigError(f"unknown fine-tuning option(s) {unknown}; expected some of {sorted(cls.fields())}")
        if isinstance(values.get("lora_targets"), list):
            values["lora_targets"] = tuple(values["lora_targets"])
        if isinstance(values.get("crop_scale"), list):
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)


def read_config_file(path: str | os.PathLike) -> dict:
    """A TOML or YAML file of option values (names as `Options`' fields or the CLI's flags, `-` or `_`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path.name}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
        else:
            raise ConfigError(f"{path.name}: expected a .toml, .yaml or .yml config file")
    except (tomllib.TOMLDecodeError, ValueError) as e:  # yaml.YAMLError derives from neither: below
        raise ConfigError(f"{path.name}: not valid {path.suffix[1:].upper()}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"{path.name}: not valid YAML: {e}") from None
        raise
    if not isinstance(values, dict):
        raise ConfigError(f"{path.name}: expected a table of option names and values")
    return {str(k).replace("-", "_"): v for k, v in values.items()}
