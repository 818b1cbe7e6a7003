"""LoRA adapters in PEFT's format on every keras-zoo model: enable, train, save, load, switch, merge.

An adapter adds `scale * B @ A` to the projections it targets (`zoo.layers.dense.LowRank`), with
PEFT's shapes (`lora_A` (r, in), `lora_B` (out, r)), scale (`alpha / r`, or `alpha / sqrt(r)` with
rsLoRA) and module names, so that a folder written here is one PEFT writes, and one PEFT wrote
loads here. The models expose these functions as methods (`model.enable_lora(...)`).

Why not Keras' `enable_lora`: it holds one unnamed adapter per layer (not several to switch
between), scales by `alpha / r` only, has no dropout on the adapter's input, factors a 3-D kernel
along its last axis (wrong for `o_proj`'s (d, n, h) kernel, whose input is (n, h)), adds its
variables after build through Keras' private tracker, and merges silently when weights are saved.
"""

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from zoo import backends, hub, presets
from zoo import distribution as devices
from zoo.errors import AdapterError, MissingWeightsError, ShapeMismatchError, UnexpectedWeightsError
from zoo.files import read_json, write_json
from zoo.layers.dense import LowRank, Replacement
from zoo.lora.config import ALL_LINEAR, Settings
from zoo.lora.modules import Module, by_name, modules
from zoo.safetensors_file import TensorInfo, read_header, read_tensor, write_safetensors

CONFIG_FILE, WEIGHTS_FILE = hub.ADAPTER_FILES
PREFIX = "base_model.model."  # PEFT's prefix of every tensor name
_NAME = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(eq=False)
class _Adapter:
    settings: Settings
    parts: list = field(default_factory=list)  # (Module, [(layer, LowRank or Replacement), ...])


@dataclass(eq=False)
class _State:
    adapters: dict = field(default_factory=dict)  # name -> _Adapter, in the order they were added
    active: str | None = None
    base_trainable: list = field(default_factory=list)  # (variable, flag) before the first adapter froze them


def _state(model) -> _State:
    """Kept in the model's own __dict__, so it lives and dies with the model."""
    return model.__dict__.setdefault("_zoo_lora", _State())


def adapters(model) -> list[str]:
    return list(_state(model).adapters)


def active(model) -> str | None:
    return _state(model).active


def enable(model, rank: int = 8, alpha: float | None = None, targets=None, dropout: float = 0.0,
           rslora: bool = False, name: str = "default", *, rank_pattern: dict | None = None,
           alpha_pattern: dict | None = None, layers_to_transform=None, modules_to_save=None) -> str:
    """Adds a new adapter (A random as PEFT's default, B zero, so the model is unchanged) and makes it active."""
    _check_new_name(model, name)
    found = modules(model)
    if targets is None:
        targets = model._lora_defaults()
    elif targets == ALL_LINEAR:  # as PEFT: every linear module but the output layer, by full name
        targets = tuple(m.name for m in found if m.name not in model._lora_output_modules())
    elif not isinstance(targets, str):
        targets = tuple(targets) if isinstance(targets, (list, tuple, set)) else targets
    save = model._lora_new_head() if modules_to_save is None else tuple(modules_to_save)
    try:
        settings = Settings(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=targets,
                            lora_dropout=dropout, use_rslora=rslora, rank_pattern=dict(rank_pattern or {}),
                            alpha_pattern=dict(alpha_pattern or {}),
                            layers_to_transform=None if layers_to_transform is None else tuple(layers_to_transform),
                            modules_to_save=save)
    except AdapterError as e:
        raise AdapterError(f"enable_lora: {e}") from None
    if not isinstance(targets, str):
        unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for m in found for n in m.names)]
        if unknown:
            raise AdapterError(f"enable_lora: this model has no module named {unknown}; {_examples(found)}")
    targeted = _targeted(settings, found, "enable_lora")
    heads = _heads(settings.modules_to_save, found, "enable_lora")
    values = {}
    for module in targeted:
        r, fan_in = settings.rank(module.name), module.in_size
        bound = 1 / np.sqrt(fan_in)  # PEFT's default: A kaiming-uniform (a = sqrt(5)), B zero
        values[module.name] = (keras.initializers.RandomUniform(-bound, bound), keras.initializers.Zeros(), r)
    _attach(model, name, settings, targeted, values, {m.name: None for m in heads})
    return name


def load(model, source, name: str | None = None) -> str:
    """Reads a PEFT adapter folder (a local folder, `hf://user/adapter[@rev]` or `kaggle://...`) as a new
    adapter and makes it active; returns its name."""
    name = "default" if name is None else name
    _check_new_name(model, name)
    read = read_adapter(model, source)
    _attach(model, name, read.settings, read.targeted, read.values, read.heads, scale_names=read.spelled)
    return name


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
                               f"not have; {_examples(found)}")
        module = names[module_name]
        into.setdefault(module, {})[part] = info
        spelled[module] = module_name
    targeted = _targeted(settings, found, CONFIG_FILE)
    missing = [f"{PREFIX}{m.name}.lora_{p}.weight" for m in targeted for p in "AB" if p not in lora.get(m, {})]
    if missing:
        raise MissingWeightsError(f"{WEIGHTS_FILE}: the config targets modules whose weights are missing: "
                                  f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    untargeted = [spelled[m] for m in lora if m not in targeted]
    if untargeted:
        raise UnexpectedWeightsError(f"{WEIGHTS_FILE}: holds weights for {untargeted[:6]}, which {CONFIG_FILE}'s "
                                     f"target_modules ({settings.target_modules!r}) do not select")
    values = {}
    for module in targeted:
        r = settings.rank(spelled[module])
        a, b = lora[module]["A"], lora[module]["B"]
        for info, expected in ((a, (r, module.in_size)), (b, (sum(module.out_sizes), r))):
            if tuple(info.shape) != expected:
                raise ShapeMismatchError(f"{WEIGHTS_FILE}: {info.name}: expected {expected} (rank {r} on module "
                                         f"{spelled[module]}, whose weight is {(sum(module.out_sizes), module.in_size)}), "
                                         f"got {tuple(info.shape)}")
        values[module.name] = (_read(a), _read(b), r)
    head_values = {}
    for module, parts in heads.items():
        layer = module.layers[0]
        expected = {"weight": (sum(module.out_sizes), module.in_size),
                    "bias": (sum(module.out_sizes),) if layer.bias is not None else None}
        for part, info in parts.items():
            if tuple(info.shape) != expected[part]:
                raise ShapeMismatchError(f"{WEIGHTS_FILE}: {info.name}: expected {expected[part]} (the model's "
                                         f"{spelled[module]}.{part}), got {tuple(info.shape)}")
        head_values[module.name] = (_read(parts["weight"]) if "weight" in parts else None,
                                    _read(parts["bias"]) if "bias" in parts else None)
    return Read(settings, targeted, values, head_values, spelled)


def save(model, folder, name: str | None = None) -> Path:
    """Writes the adapter as PEFT does: adapter_config.json and adapter_model.safetensors."""
    name = _existing(model, name, "save_adapter")
    adapter = _state(model).adapters[name]
    tensors = {}
    for module, placed in adapter.parts:
        objects = [obj for _, obj in placed]
        if isinstance(objects[0], LowRank):
            tensors[f"{PREFIX}{module.name}.lora_A.weight"] = _numpy(objects[0].lora_A)
            tensors[f"{PREFIX}{module.name}.lora_B.weight"] = np.concatenate([_numpy(o.lora_B) for o in objects])
        else:
            layer, head = placed[0]
            tensors[f"{PREFIX}{module.name}.weight"] = _numpy(head.kernel).reshape(layer.out_in_shape)
            if head.bias is not None:
                tensors[f"{PREFIX}{module.name}.bias"] = _numpy(head.bias).reshape(-1)
    base, revision = _base_model(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, _current_names(adapter).to_peft(model._lora_task_type, base, revision))
    write_safetensors(folder / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
    return folder


def set_active(model, name: str | None) -> None:
    """Makes `name` the adapter in use (None: the base model alone)."""
    if name is not None:
        _existing(model, name, "set_adapter")
    _activate(model, name)


def delete(model, name: str) -> None:
    """Removes an adapter; if it was active, the first remaining one becomes active (as in PEFT), else none."""
    _existing(model, name, "delete_adapter")
    state = _state(model)
    for _, placed in state.adapters.pop(name).parts:
        for layer, obj in placed:
            del layer.adapters.by_name[name]
            backends.untrack_weights(layer, obj.weights)
    if not state.adapters:  # the last one: the base model trains again as it did before
        for variable, flag in state.base_trainable:
            variable.trainable = flag
        state.base_trainable = []
    _activate(model, (next(iter(state.adapters), None) if state.active == name else state.active))


def merge(model, name: str | None = None) -> None:
    """Folds an adapter into the base weights (kernel += scale * B @ A) and removes it."""
    name = _existing(model, name, "merge_adapter")
    for _, placed in _state(model).adapters[name].parts:
        for layer, obj in placed:
            if isinstance(obj, LowRank):
                delta = obj.scale * (_numpy(obj.lora_B) @ _numpy(obj.lora_A))  # (out, in)
                kernel = keras.ops.convert_to_numpy(layer.kernel.value)
                layer.kernel.assign((kernel.astype(np.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype))
            else:
                layer.kernel.assign(keras.ops.cast(obj.kernel.value, layer.kernel.dtype))
                if obj.bias is not None:
                    layer.bias.assign(keras.ops.cast(obj.bias.value, layer.bias.dtype))
    delete(model, name)


# ----------------------------------------------------------------------------- internals


def _attach(model, name: str, settings: Settings, targeted: list[Module], values: dict, heads: dict,
            scale_names: dict | None = None) -> None:
    """Makes every variable first, then puts them on the layers: an error leaves the adapters as they were."""
    adapter = _Adapter(settings)
    for module in targeted:
        a, b, r = values[module.name]
        scale = settings.scale((scale_names or {}).get(module, module.name))
        with _scope(model, module.layers[0], name):
            lora_a = _variable(a, (r, module.in_size), "lora_A")
            seed = keras.random.SeedGenerator(name="dropout_seed") if settings.lora_dropout else None
        start, placed = 0, []
        for layer, out in zip(module.layers, module.out_sizes):
            with _scope(model, layer, name):
                lora_b = _variable(b if not isinstance(b, np.ndarray) else b[start:start + out], (out, r), "lora_B")
            placed.append((layer, LowRank(lora_a, lora_b, scale, settings.lora_dropout, seed)))
            start += out
        adapter.parts.append((module, placed))
    for module_name, given in heads.items():
        module = by_name(modules(model))[module_name]
        layer = module.layers[0]
        weight, bias = given if given is not None else (None, None)
        with _scope(model, layer, name):
            # A copy of the module in its own dtype, as PEFT's modules_to_save.
            kernel = _variable(layer.kernel.value if weight is None else weight.reshape(layer.kernel.shape),
                               tuple(layer.kernel.shape), "kernel", layer.kernel.dtype)
            head_bias = None if layer.bias is None else _variable(
                layer.bias.value if bias is None else bias.reshape(layer.bias.shape), tuple(layer.bias.shape), "bias",
                layer.bias.dtype)
        adapter.parts.append((module, [(layer, Replacement(kernel, head_bias))]))
    state = _state(model)
    if not state.adapters:  # the first adapter freezes the base model
        state.base_trainable = [(v, v.trainable) for v in model.weights]
        for v, _ in state.base_trainable:
            v.trainable = False
    for _, placed in adapter.parts:
        for layer, obj in placed:
            layer.adapters.by_name[name] = obj
            backends.track_weights(layer, obj.weights)
    state.adapters[name] = adapter
    _activate(model, name)


def _activate(model, name: str | None) -> None:
    """Points every adapted layer at `name`; only the active adapter trains (as in PEFT)."""
    state = _state(model)
    for adapter_name, adapter in state.adapters.items():
        for _, placed in adapter.parts:
            for layer, obj in placed:
                layer.adapters.active = name if name in layer.adapters.by_name else None
                for w in obj.weights:
                    w.trainable = adapter_name == name
    state.active = name
    # Keras' compiled train/test/predict functions traced the previous adapter: they are made again.
    model.train_function = model.test_function = model.predict_function = None


def _targeted(settings: Settings, found: list[Module], where: str) -> list[Module]:
    targeted = [m for m in found if settings.targets(m.names, m.index)]
    if not targeted:
        raise AdapterError(f"{where}: target_modules {settings.target_modules!r} select no module of this model; "
                           f"{_examples(found)}")
    return targeted


def _heads(names: tuple[str, ...], found: list[Module], where: str) -> list[Module]:
    heads = []
    for wanted in names:
        matches = [m for m in found if any(n == wanted or n.endswith("." + wanted) for n in m.names)]
        if not matches:
            raise AdapterError(f"{where}: modules_to_save names {wanted!r}, which this model does not have; "
                               f"{_examples(found)}")
        heads += matches
    return heads


def _check_new_name(model, name) -> None:
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise AdapterError(f"adapter name: expected letters, digits, '_' or '-', got {name!r}")
    if name in _state(model).adapters:
        raise AdapterError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first, or pick "
                           f"another name (the model has {adapters(model)})")


def _existing(model, name: str | None, where: str) -> str:
    state = _state(model)
    if name is None:
        name = state.active if state.active is not None else (next(iter(state.adapters)) if len(state.adapters) == 1
                                                              else None)
        if name is None:
            raise AdapterError(f"{where}: name which adapter; the model has {adapters(model)} and none is active")
    if name not in state.adapters:
        raise AdapterError(f"{where}: no adapter named {name!r}; the model has {adapters(model)}")
    return name


def _current_names(adapter: _Adapter) -> Settings:
    """The settings with module names as `save_adapter` writes them: an adapter read under other names
    (transformers 4's `query`) lists the modules it adapts by their full current names instead."""
    settings = adapter.settings
    adapted = [m for m, placed in adapter.parts if isinstance(placed[0][1], LowRank)]
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


def _examples(found: list[Module]) -> str:
    short = sorted({m.name.rsplit(".", 1)[-1] for m in found})
    return f"its linear modules are named {short} (e.g. {found[0].name!r})" if found else "it has no linear modules"


@contextlib.contextmanager
def _scope(model, layer, adapter_name: str):
    """Variables named `<layer path>/<adapter>/lora_A`: unique, and readable in `model.weights`; under the
    model's distribution, laid out as their base weights are (`zoo.distribution`)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(devices.scope(model))
        for part in [*layer.path.split("/"), adapter_name]:
            stack.enter_context(keras.name_scope(part))
        yield


def _variable(value, shape: tuple, name: str, dtype: str = "float32") -> keras.Variable:
    """A trainable weight; LoRA's stay float32 whatever the model's dtype, as PEFT's do."""
    if not isinstance(value, keras.initializers.Initializer):
        value = keras.ops.cast(keras.ops.copy(value), dtype)  # its own buffer, never one shared with the base
    return keras.Variable(value, shape=shape, dtype=dtype, trainable=True, name=name)


def _read(info: TensorInfo) -> np.ndarray:
    with open(info.file, "rb") as f:
        return read_tensor(f, info).astype(np.float32)


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable.value).astype(np.float32)


def _base_model(model) -> tuple[str | None, str | None]:
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
