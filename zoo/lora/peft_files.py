"""PEFT's adapter folder: `adapter_config.json` and `adapter_model.safetensors`, read for a model with every
tensor checked against the module it adapts, and the names and base model a saved config carries."""

import contextlib
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo import hub, presets
from zoo.errors import AdapterError, MissingWeightsError, ShapeMismatchError, UnexpectedWeightsError
from zoo.files import read_json
from zoo.layers.dense import LowRank
from zoo.lora.config import Settings
from zoo.lora.modules import Module, by_name, examples, modules, targeted
from zoo.safetensors_file import TensorInfo, read_header, read_tensor

CONFIG_FILE, WEIGHTS_FILE = hub.ADAPTER_FILES
PREFIX = "base_model.model."  # PEFT's prefix of every tensor name


@dataclass(frozen=True, eq=False)
class Read:
    """A PEFT adapter folder read and checked against a model: its settings, the modules it adapts with
    their (A, B, rank) arrays, its `modules_to_save` (weight, bias), and each module as the file spells it."""

    settings: Settings
    targeted: list
    values: dict
    heads: dict
    spelled: dict

    def scale(self, module: Module) -> float:
        return self.settings.scale(self.spelled.get(module, module.name))


def read_adapter(model, source) -> Read:
    """Reads a PEFT adapter folder for `model`, every tensor checked against the module it adapts."""
    folder = hub.resolve(source, adapter=True)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise AdapterError(f"{hub.short_name(source)}: no {CONFIG_FILE} (a PEFT adapter folder holds {CONFIG_FILE} "
                           f"and {WEIGHTS_FILE}); found {found}")
    settings = Settings.from_peft(read_json(config_path, error=AdapterError), CONFIG_FILE)
    if not weights_path.is_file():
        raise AdapterError(f"{hub.short_name(source)}: no {WEIGHTS_FILE} (keras-zoo reads adapter weights in "
                           "safetensors; adapter_model.bin is not read)")
    header = read_header(weights_path)
    found = modules(model)
    names = by_name(found)
    lora, heads = {}, {}  # module -> {"A"/"B" or "weight"/"bias": TensorInfo}, and the name the file uses
    spelled = {}
    for key, (shape, dtype, offset) in header.items():
        info = TensorInfo(key, weights_path, shape, dtype, offset)
        stem = key[len(PREFIX):] if key.startswith(PREFIX) else key
        if m := re.fullmatch(r"(.+)\.lora_([AB])\.weight", stem):
            module_name, part, into = m.group(1), m.group(2), lora
        elif (m := re.fullmatch(r"(.+)\.(weight|bias)", stem)) and any(
                m.group(1).endswith(s) for s in settings.modules_to_save):
            module_name, part, into = m.group(1), m.group(2), heads
        else:
            raise UnexpectedWeightsError(f"{WEIGHTS_FILE}: tensor {key} {shape} is not a LoRA weight keras-zoo "
                                         "reads (lora_A/lora_B of a linear module, or a module in modules_to_save)")
        if module_name not in names:
            raise AdapterError(f"{WEIGHTS_FILE}: tensor {key} adapts module {module_name!r}, which this model does "
                               f"not have; {examples(found)}")
        module = names[module_name]
        into.setdefault(module, {})[part] = info
        spelled[module] = module_name
    chosen = targeted(settings, found, CONFIG_FILE)
    missing = [f"{PREFIX}{m.name}.lora_{p}.weight" for m in chosen for p in "AB" if p not in lora.get(m, {})]
    if missing:
        raise MissingWeightsError(f"{WEIGHTS_FILE}: the config targets modules whose weights are missing: "
                                  f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    untargeted = [spelled[m] for m in lora if m not in chosen]
    if untargeted:
        raise UnexpectedWeightsError(f"{WEIGHTS_FILE}: holds weights for {untargeted[:6]}, which {CONFIG_FILE}'s "
                                     f"target_modules ({settings.target_modules!r}) do not select")
    values = {}
    for module in chosen:
        r = settings.rank(spelled[module])
        a, b = lora[module]["A"], lora[module]["B"]
        for info, expected in ((a, (r, module.in_size)), (b, (sum(module.out_sizes), r))):
            if tuple(info.shape) != expected:
                raise ShapeMismatchError(f"{WEIGHTS_FILE}: {info.name}: expected {expected} (rank {r} on module "
                                         f"{spelled[module]}, whose weight is {(sum(module.out_sizes), module.in_size)}), "
                                         f"got {tuple(info.shape)}")
        values[module.name] = (read_float32(a), read_float32(b), r)
    head_values = {}
    for module, parts in heads.items():
        layer = module.layers[0]
        expected = {"weight": (sum(module.out_sizes), module.in_size),
                    "bias": (sum(module.out_sizes),) if layer.bias is not None else None}
        for part, info in parts.items():
            if tuple(info.shape) != expected[part]:
                raise ShapeMismatchError(f"{WEIGHTS_FILE}: {info.name}: expected {expected[part]} (the model's "
                                         f"{spelled[module]}.{part}), got {tuple(info.shape)}")
        head_values[module.name] = (read_float32(parts["weight"]) if "weight" in parts else None,
                                    read_float32(parts["bias"]) if "bias" in parts else None)
    return Read(settings, chosen, values, head_values, spelled)


def current_names(settings: Settings, parts: list) -> Settings:
    """The settings with module names as `save_adapter` writes them: an adapter read under other names
    (transformers 4's `query`) lists the modules it adapts by their full current names instead."""
    adapted = [m for m, placed in parts if isinstance(placed[0][1], LowRank)]
    names = [m.name for m in adapted]
    if not isinstance(settings.target_modules, str) and not all(
            any(n == t or n.endswith("." + t) for n in names) for t in settings.target_modules):
        settings = dataclasses.replace(settings, target_modules=tuple(names), layers_to_transform=None,
                                       layers_pattern=None)

    def renamed(patterns: dict) -> dict:
        out = {}
        for key, value in patterns.items():
            hits = [m for m in adapted if any(re.match(rf"(.*\.)?({key})$", n) for n in m.names)]
            if hits and not any(re.match(rf"(.*\.)?({key})$", m.name) for m in hits):
                out.update({m.name: value for m in hits})
            else:
                out[key] = value
        return out

    return dataclasses.replace(settings, rank_pattern=renamed(settings.rank_pattern),
                               alpha_pattern=renamed(settings.alpha_pattern))


def read_float32(info: TensorInfo) -> np.ndarray:
    with open(info.file, "rb") as f:
        return read_tensor(f, info).astype(np.float32)


def base_model(model) -> tuple[str | None, str | None]:
    """base_model_name_or_path and revision: the Hub repository the model came from, where known."""
    source = getattr(model, "source", None) or {}
    source = source.get("base", source)  # a model loaded from an adapter folder: the base under it
    handle = source.get("handle")
    if isinstance(handle, str) and "://" not in handle and not Path(handle).exists():
        with contextlib.suppress(Exception):  # a preset name: its card's Hugging Face source
            handle = next((s for s in presets.get(handle).sources if s.startswith("hf://")), handle)
    if isinstance(handle, str) and handle.startswith("hf://"):
        h = hub.parse(handle)
        return h.repo, source.get("commit") or h.revision
    return handle, None
