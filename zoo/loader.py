"""`from_preset`'s policy: resolve the handle, read config.json, build the model uninitialised, stream the checkpoint in.

Each step fails with a typed error before the next begins: `hub.resolve` gives a folder; its
config.json names the family and layout (`zoo.registry`); the headers are read; the model is built
with skipped initialisers, every weight planned against the headers (`key_map.plan`) and streamed
in (`key_map.load`). The model class gives the hooks (`zoo.models.base.PresetModel`).
"""

import contextlib
import gc
import inspect
import math
import os
from pathlib import Path

import keras

from zoo import backends, hub, registry
from zoo import distribution as devices
from zoo.checkpoint import Checkpoint
from zoo.errors import ConfigError, PresetNotFoundError
from zoo.files import read_json
from zoo.host import WEIGHT_DTYPES, host_dtype
from zoo.key_map import load, load_sharded, plan, weights_by_path
from zoo.layers.init import skip_init
from zoo.safetensors_file import DTYPE_SIZES
from zoo.tokenizer import TOKENIZER_FILES, Tokenizer

CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
FINETUNE_FILE = "finetune.json"  # what `zoo.finetune` records beside an adapter: its base as given, the labels
READ_AHEAD_BYTES = 64 * 1024**2


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PresetNotFoundError(f"{folder}: no {CONFIG_FILE}; expected a model folder in Hugging Face or timm layout")
    return read_json(path)


def detect(folder: Path, base: str | None = None) -> registry.Format:
    """The family, layout and default task of the model in `folder` (an adapter folder: of its base)."""
    if is_adapter(folder):
        return detect(hub.resolve(adapter_base(folder, base)[0]))
    return registry.detect(read_config(folder), folder / CONFIG_FILE)


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder (adapter_config.json, no config.json): a preset over its base model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / CONFIG_FILE).is_file()


def adapter_base(folder: Path, base: str | None = None) -> tuple[str, dict]:
    """The base an adapter folder applies to, and the options to load it with (a fine-tune's new labels).

    `base` if given, else the one `zoo.finetune` recorded (the preset as the user named it), else PEFT's
    `base_model_name_or_path` (a Hub repository is read as hf://)."""
    record = read_json(folder / FINETUNE_FILE) if (folder / FINETUNE_FILE).is_file() else {}
    options = {"labels": record["labels"]} if record.get("labels") else {}
    base = base or record.get("base")
    if not base:
        base = read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
        if isinstance(base, str) and base.count("/") == 1 and not Path(base).exists():
            base = "hf://" + base
    if not isinstance(base, str) or not base:
        raise PresetNotFoundError(f"{folder.name}: an adapter folder that does not name its base model "
                                  f"(base_model_name_or_path in {ADAPTER_CONFIG}); give the base with --base")
    return base, options


def check_dtype(dtype) -> None:
    """A dtype to build weights in: a float dtype, or a Keras mixed policy (float32 weights)."""
    try:
        variable_dtype = keras.DTypePolicy(dtype).variable_dtype
    except (ValueError, TypeError):
        variable_dtype = None
    if variable_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)} or a Keras mixed policy "
                          "such as 'mixed_bfloat16'")


def _read_ahead_limit(checkpoint: Checkpoint, weight_dtype) -> int | None:
    """How far the checkpoint may be read ahead (None: no bound): unbounded only where each buffer read becomes
    its weight (the backend adopts host buffers, and no cast to a narrower dtype holds a wider copy)."""
    if backends.adopts_host_buffers() and all(DTYPE_SIZES[t.dtype] <= weight_dtype.itemsize
                                              for t in checkpoint.tensors.values()):
        return None
    return READ_AHEAD_BYTES


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic collector off while the model is built and loaded: building Keras layers sets off full
    collections over every object the imports left (the 1 GB ViT on JAX: 0.36-1.40 s on, 0.29-0.39 s off)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def from_preset(cls, preset: str | os.PathLike, dtype: str | None = None, allow_nonfinite: bool = False,
                distribution=None, **kwargs):
    """`cls` built from a preset name, handle or folder, every weight from its checkpoint (see the module docstring).

    A weight holding NaN or infinity is a `CorruptCheckpointError` naming its tensors, unless `allow_nonfinite`.
    Under a distribution (`distribution`, else Keras' global one; `zoo.distribution`) each weight is built
    with its layout and each device's shard read from the checkpoint by slice.
    """
    if dtype is not None:
        check_dtype(dtype)
    folder = hub.resolve(preset)
    if is_adapter(folder):
        return _with_adapter(cls, preset, folder, dtype=dtype, allow_nonfinite=allow_nonfinite,
                             distribution=distribution, **kwargs)
    if kwargs.pop("base", None) is not None:
        raise ConfigError(f"{hub.short_name(preset)}: base= names the model under an adapter folder, but this is a "
                          "model folder (no adapter_config.json)")
    raw = read_config(folder)
    fmt = registry.detect(raw, folder / CONFIG_FILE)
    if fmt.family != cls.family:
        raise ConfigError(
            f"{folder / CONFIG_FILE} describes a {fmt.family!r} model; {cls.__name__} loads {cls.family!r} models"
        )
    config = fmt.read_config(raw)
    checkpoint = Checkpoint.open(folder)
    held, declared = sum(math.prod(t.shape) for t in checkpoint.tensors.values()), config.num_params(with_head=False)
    if declared > 2 * held + 10**6:  # far too large: building it would allocate (and fail, or swap) before the
        # headers are compared; a near miss goes on to the plan, whose errors name the tensor
        raise ConfigError(f"{folder / CONFIG_FILE} describes a model of {declared:,} parameters (without a head), but "
                          f"the checkpoint holds {held:,}; does config.json belong to this checkpoint?")
    dtype = dtype or config.dtype
    weight_dtype = host_dtype(keras.DTypePolicy(dtype).variable_dtype)
    distribution = devices.active(distribution)
    if distribution is not None:
        distribution = devices.for_model(distribution, config)
    elif backends.read_mapped is None:  # reads (and casts) while the layers are built
        checkpoint.prefetch(_read_ahead_limit(checkpoint, weight_dtype), cast_to=weight_dtype)
    # The NaN/infinity check of the tensors adopted from the file's mapping runs while the layers are built, too.
    finite = checkpoint.check_finite() if distribution is None and not allow_nonfinite else None
    try:
        with _collector_paused(), distribution.scope() if distribution is not None else contextlib.nullcontext():
            with skip_init():
                model = cls._from_folder(config, folder, dtype=dtype, **kwargs)
            fresh = model._fresh_weights()
            weights = {path: v for path, v in weights_by_path(model).items() if path not in fresh}
            assignments = plan(model.key_map(model.config), checkpoint, weights)
            if distribution is None:
                load(assignments, checkpoint, weights, check_finite=not allow_nonfinite, finite=finite)
            else:
                load_sharded(assignments, checkpoint, weights, check_finite=not allow_nonfinite)
    finally:
        checkpoint.stop_prefetch()
        if finite is not None:
            finite.stop()
    model.distribution = distribution
    model._after_load()
    model.source = hub.describe(preset, folder)
    return model


def _with_adapter(cls, preset, folder: Path, base: str | None = None, **kwargs):
    """The base model with the adapter in `folder` loaded (and its tokenizer files, if it has them: a chat
    template, say), as `PeftModel.from_pretrained` does over its base."""
    base, options = adapter_base(folder, base)
    if Path(base).expanduser().resolve() == folder.resolve():
        raise PresetNotFoundError(f"{folder.name}: the adapter names itself as its base model")
    for key, value in options.items():
        kwargs.setdefault(key, value)
    if "labels" in kwargs and "labels" not in inspect.signature(cls._from_folder).parameters:
        del kwargs["labels"]
    model = from_preset(cls, base, **kwargs)
    model.load_adapter(folder)
    if getattr(model, "tokenizer", None) is not None and any((folder / f).is_file() for f in TOKENIZER_FILES):
        model.tokenizer = Tokenizer.from_folder(folder)
    model.source = hub.describe(preset, folder) | {"base": model.source}
    return model
