"""What every backbone and task shares: `from_preset`, `save_preset`, and Keras (de)serialisation.

A model class names its family and implements three hooks:
`_from_folder(config, folder, dtype, **kwargs)` builds it, `key_map(config)` gives its
checkpoint table for a config, and `_save_extras(folder)` writes files besides the weights (preprocessing,
tokenizer). Everything else — resolving the handle, reading and translating config.json,
planning the load against the checkpoint headers, streaming the tensors — happens here once.
"""

import contextlib
import gc
import json
import os
from pathlib import Path

import keras
import numpy as np

from zoo import backend, hub
from zoo.checkpoint import DEFAULT_MAX_SHARD_SIZE, Checkpoint, write_checkpoint
from zoo.errors import ConfigError, PresetNotFoundError
from zoo.key_map import export, load, plan, weights_by_path
from zoo.layers.dtypes import host_dtype
from zoo.layers.init import skip_init
from zoo.layers.tracking import LeanAttributes
from zoo.models import registry
from zoo.models.fields import WEIGHT_DTYPES
from zoo.safetensors_file import DTYPE_SIZES

SOURCE_FILE = "zoo_source.json"  # where save_preset records the hub revision a model came from
CONFIG_FILE = "config.json"


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise PresetNotFoundError(f"{folder}: no {CONFIG_FILE}; expected a model folder in Hugging Face or timm layout")
    try:
        raw = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


READ_AHEAD_BYTES = 64 * 1024**2


def _weight_dtype(dtype: str) -> np.dtype:
    return host_dtype(keras.DTypePolicy(dtype).variable_dtype)


def _check_dtype(dtype) -> None:
    """A dtype to build weights in: a float dtype, or a Keras mixed policy (float32 weights)."""
    try:
        variable_dtype = keras.DTypePolicy(dtype).variable_dtype
    except (ValueError, TypeError):
        variable_dtype = None
    if variable_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype {dtype!r}: expected one of {', '.join(WEIGHT_DTYPES)} or a Keras mixed policy "
                          "such as 'mixed_bfloat16'")


def _read_ahead_limit(checkpoint: Checkpoint, dtype: str) -> int | None:
    """How far the checkpoint may be read ahead of the assignments (None: no bound).

    No bound when each buffer read ahead becomes its weight as it is: the backend adopts host
    buffers and no tensor is wider than the weights (a cast to a narrower dtype would hold the
    wider copy). Otherwise a bounded window, so that a cast or a copying backend never holds
    the checkpoint and the weights at once.
    """
    width = _weight_dtype(dtype).itemsize
    if backend.adopts_host_buffers() and all(DTYPE_SIZES[t.dtype] <= width for t in checkpoint.tensors.values()):
        return None
    return READ_AHEAD_BYTES


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector off while a model is built and its weights assigned.

    Building Keras layers allocates enough objects to set off full collections, each a walk over
    every object the imports left (~200k with JAX): building the 1 GB ViT of benchmarks/RESULTS.md
    on JAX took 0.36-1.40 s with the collector on and 0.29-0.39 s with it off. Assigning its 328
    weights on TensorFlow allocates enough more to set one off too (0.14 s, when profiled). Nothing
    is lost: the collector runs again afterwards as before.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class PresetModel(LeanAttributes, keras.Model):
    """Base of keras-zoo's backbones and tasks."""

    family: str = ""
    traced_predict: bool = False  # PyTorch: `predict` replays a trace of `call(x)` (see predict_step)

    if backend.NAME == "torch":  # the other backends' trainers give predict_step other arguments
        def predict_step(self, data):
            """Keras' predict step; on PyTorch, a TorchScript trace of the forward pass where the class allows.

            Keras dispatches each op of an eager PyTorch forward pass through Python; the trace
            replays the recorded aten ops (ViT-B/16 at batch 8 on 2 cores: 4-12% faster, paired).
            One trace per input shape and dtype, made again when the set of weights changes (see
            `make_predict_function`); the weights are read by reference, so assigned values are
            seen. A model compiled with `jit_compile=True` keeps Keras' own path (torch.compile).
            """
            x, _, _ = keras.utils.unpack_x_y_sample_weight(data)
            if not (self.traced_predict and getattr(self, "jit_compile", None) is not True
                    and not isinstance(x, (dict, list, tuple))):
                return super().predict_step(data)
            traced = self.__dict__.get("_predict_trace")
            if traced is None:
                traced = self.__dict__["_predict_trace"] = backend.compile_step(
                    self, lambda x: self(x, training=False), cache_arg=None)
            return traced(keras.ops.convert_to_tensor(x))

    def make_predict_function(self, force=False):
        """Keras' predict function, made again when the set of weights has changed since it was made.

        A compiled predict function (a tf.function, a trace) keeps the computation it recorded:
        after `enable_lora` it would go on without the adapters.
        """
        signature = backend.weights_signature(self)
        if self.__dict__.get("_predict_signature") != signature:
            self.__dict__["_predict_signature"] = signature
            self.__dict__.pop("_predict_trace", None)
            force = True
        return super().make_predict_function(force=force)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Keras' `export`, with this model's own input signature when none is given.

        Keras infers a subclassed model's signature from its first call; these models know their
        inputs from the config and may not have been called yet (`_export_signature`).
        """
        if input_signature is None:
            input_signature = self._export_signature()
        return super().export(filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs)

    @classmethod
    def from_preset(cls, preset: str | os.PathLike, *, dtype: str | None = None, **kwargs) -> "PresetModel":
        """Builds the model described by a preset and loads its weights.

        Args:
            preset: a preset name (`zoo.list_presets()`), a handle (`hf://org/name@rev`,
                `kaggle://owner/model/framework/variation/version`) or a local folder.
            dtype: weights and compute dtype; defaults to the checkpoint's own (`dtype` or
                `torch_dtype` in config.json), else float32.
            **kwargs: model-specific options (e.g. `image_size` for ViT).
        """
        if dtype is not None:
            _check_dtype(dtype)
        folder = hub.resolve(preset)
        raw = read_config(folder)
        fmt = registry.detect(raw, folder / CONFIG_FILE)
        if fmt.family != cls.family:
            raise ConfigError(
                f"{folder / CONFIG_FILE} describes a {fmt.family!r} model; {cls.__name__} loads {cls.family!r} models"
            )
        config = fmt.read_config(raw)
        checkpoint = Checkpoint.open(folder)
        dtype = dtype or config.dtype
        if not backend.maps_checkpoints():
            # Reads (and casts) while the layers are built.
            checkpoint.prefetch(_read_ahead_limit(checkpoint, dtype), cast_to=_weight_dtype(dtype))
        try:
            with _collector_paused():
                with skip_init(), backend.loading_variables():
                    model = cls._from_folder(config, folder, dtype=dtype, **kwargs)
                fresh = model._fresh_weights()
                weights = {path: v for path, v in weights_by_path(model).items() if path not in fresh}
                rows = model.key_map(model.config)
                load(plan(rows, checkpoint, weights), checkpoint, weights)
        finally:
            checkpoint.stop_prefetch()
        model._after_load()
        model.source = hub.describe(preset, folder)
        return model

    def save_preset(self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Writes config.json, the weights and the model's other files in the source's own layout."""
        folder = Path(folder)
        config = self._export_config()
        source_config = config.to_source()  # both refuse what the layout cannot hold before anything is written
        tensors = export(self.key_map(config), weights_by_path(self))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(source_config, indent=2) + "\n")
        write_checkpoint(folder, tensors, max_shard_size)
        self._save_extras(folder)
        source = getattr(self, "source", None)
        if source and ("commit" in source or "version" in source):  # downloaded: say from which revision
            keep = {k: source[k] for k in ("handle", "revision", "commit", "version") if k in source}
            (folder / SOURCE_FILE).write_text(json.dumps({"derived_from": keep}, indent=2) + "\n")
        return folder

    # Hooks for subclasses.
    @classmethod
    def _from_folder(cls, config, folder: Path, dtype: str, **kwargs) -> "PresetModel":
        return cls(config, dtype=dtype, **kwargs)

    def key_map(self, config) -> list:
        raise NotImplementedError(f"{type(self).__name__} must define its checkpoint key map")

    def _export_config(self):
        """The config that describes what `save_preset` writes."""
        return self.config

    def _export_signature(self) -> list | None:
        """The inputs `export` traces by default (None: Keras infers them from the first call)."""
        return None

    def _fresh_weights(self) -> set[str]:
        """Weight paths the checkpoint does not fill on purpose (a new head); `_after_load` initialises them."""
        return set()

    def _after_load(self) -> None:
        """Runs once the checkpoint is in (e.g. to initialise a new head)."""

    def _save_extras(self, folder: Path) -> None:
        """Writes files besides config.json and the weights."""
