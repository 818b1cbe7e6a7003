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
import re
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from zoo import backends
from zoo import distribution as devices
from zoo.errors import AdapterError
from zoo.files import write_json
from zoo.layers.dense import LowRank, Replacement
from zoo.lora.config import ALL_LINEAR, Settings
from zoo.lora.modules import Module, by_name, examples, heads, modules, targeted
from zoo.lora.peft_files import CONFIG_FILE, PREFIX, WEIGHTS_FILE, base_model, current_names, read_adapter
from zoo.safetensors_file import write_safetensors

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
            raise AdapterError(f"enable_lora: this model has no module named {unknown}; {examples(found)}")
    chosen = targeted(settings, found, "enable_lora")
    new_heads = heads(settings.modules_to_save, found, "enable_lora")
    values = {}
    for module in chosen:
        r, fan_in = settings.rank(module.name), module.in_size
        bound = 1 / np.sqrt(fan_in)  # PEFT's default: A kaiming-uniform (a = sqrt(5)), B zero
        values[module.name] = (keras.initializers.RandomUniform(-bound, bound), keras.initializers.Zeros(), r)
    _attach(model, name, settings, chosen, values, {m.name: None for m in new_heads})
    return name


def load(model, source, name: str | None = None) -> str:
    """Reads a PEFT adapter folder (a local folder, `hf://user/adapter[@rev]` or `kaggle://...`) as a new
    adapter and makes it active; returns its name."""
    name = "default" if name is None else name
    _check_new_name(model, name)
    read = read_adapter(model, source)
    _attach(model, name, read.settings, read.targeted, read.values, read.heads, scale_names=read.spelled)
    return name


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
    base, revision = base_model(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / CONFIG_FILE, current_names(adapter.settings, adapter.parts).to_peft(model._lora_task_type, base, revision))
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


def _numpy(variable) -> np.ndarray:
    return keras.ops.convert_to_numpy(variable.value).astype(np.float32)
