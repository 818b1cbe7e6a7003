"""What every backbone and task shares: `from_preset`, `save_preset`, `export`, and Keras' predict function.

A model class names its family and implements the hooks below, which the loader (`zoo.loader`)
and `save_preset` call.
"""

import os
from pathlib import Path

import keras

from zoo import backends, loader, lora
from zoo.checkpoint import DEFAULT_MAX_SHARD_SIZE, write_checkpoint
from zoo.errors import AdapterError
from zoo.files import write_json
from zoo.key_map import export, weights_by_path
from zoo.models import exporting
from zoo.models import register_all

SOURCE_FILE = "zoo_source.json"  # where save_preset records the hub revision a model came from


class PresetModel(keras.Model):
    """Base of keras-zoo's backbones and tasks."""

    family: str = ""
    traced_predict: bool = False  # the forward pass is one tensor in, one out: a backend may trace `predict`
    distribution = None  # the keras.distribution it was loaded under (`zoo.distribution`), if any

    def __repr__(self) -> str:
        """One line: the class, architecture, size, dtype, where it came from and its adapters."""
        kind = getattr(self.config, "model_type", None) or f"{self.family} ({self.config.source_format})"
        source = (getattr(self, "source", None) or {}).get("handle")
        parts = [f"{kind}", f"{self.count_params():,} parameters", self.dtype_policy.name]
        if source:
            parts.append(f"from {os.path.basename(str(source).rstrip('/')) or source}")
        if self.adapters:
            parts.append(f"adapters {self.adapters} (active: {self.active_adapter})")
        return f"<{type(self).__name__} " + ", ".join(parts) + ">"

    def make_predict_function(self, force=False):
        """Keras' predict function (or the backend's faster one), made again when the set of weights has changed.

        A compiled predict function (a tf.function, a trace) keeps the computation it recorded:
        after `enable_lora` or `set_adapter` it would go on with the previous adapters.
        """
        signature = self.program_signature()
        if self.__dict__.get("_predict_signature") != signature:
            self.__dict__["_predict_signature"] = signature
            force = True
        if self.predict_function is not None and not force:
            return self.predict_function
        return backends.make_predict_function(self, lambda: super(PresetModel, self).make_predict_function(force=True))

    def compile(self, *args, jit_compile="auto", **kwargs):
        """Keras' `compile`; "auto" takes the backend's choice for these models (`zoo.backends.TRAIN_JIT_COMPILE`)."""
        if jit_compile == "auto":
            jit_compile = backends.TRAIN_JIT_COMPILE
        return super().compile(*args, jit_compile=jit_compile, **kwargs)

    def program_signature(self) -> tuple:
        """Changes when a compiled program of the model is stale: its weights or its active adapter changed."""
        nested = getattr(self, "backbone", None)  # a backbone's own adapters (`lm.backbone.enable_lora`)
        return backends.weights_signature(self), lora.active(self), nested is not None and lora.active(nested)

    # LoRA adapters, in PEFT's format (zoo.lora).
    def enable_lora(self, rank: int = 8, alpha: float | None = None, targets=None, dropout: float = 0.0,
                    rslora: bool = False, name: str = "default", **options) -> str:
        """Adds a LoRA adapter, makes it active and freezes the base weights; returns its name.

        Args:
            rank: the adapter's rank r.
            alpha: scaling numerator (`alpha / rank`, or `alpha / sqrt(rank)` with `rslora`); defaults to `rank`.
            targets: module names as the checkpoint's reference names them (`["q_proj", "v_proj"]`),
                a regular expression over full module names, or `"all-linear"`; defaults to PEFT's
                default for the model type.
            dropout: dropout on the adapter's input, when training.
            rslora: rank-stabilised scaling.
            name: the adapter's name.
            **options: `rank_pattern`, `alpha_pattern`, `layers_to_transform`, `modules_to_save`, as in
                PEFT's `LoraConfig`.

        Example:
            >>> lm.enable_lora(rank=4, targets=["q_proj", "v_proj"])  # doctest: +SKIP
            'default'
        """
        return lora.enable(self, rank, alpha, targets, dropout, rslora, name, **options)

    def load_adapter(self, adapter: str | os.PathLike, name: str | None = None) -> str:
        """Loads a PEFT adapter folder (local, `hf://user/adapter[@rev]` or `kaggle://...`) and makes it active."""
        return lora.load(self, adapter, name)

    def save_adapter(self, folder: str | os.PathLike, name: str | None = None) -> Path:
        """Writes an adapter (by default the active one) as a PEFT adapter folder."""
        return lora.save(self, folder, name)

    @property
    def adapters(self) -> list[str]:
        """The names of the model's adapters, in the order they were added."""
        return lora.adapters(self)

    @property
    def active_adapter(self) -> str | None:
        return lora.active(self)

    def set_adapter(self, name: str | None) -> None:
        """Uses the adapter `name` from now on (None: the base model alone)."""
        lora.set_active(self, name)

    def delete_adapter(self, name: str) -> None:
        lora.delete(self, name)

    def merge_adapter(self, name: str | None = None) -> None:
        """Folds an adapter (by default the active one) into the base weights; it is then removed."""
        lora.merge(self, name)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Writes the model for other runtimes: `"tf_saved_model"` and `"onnx"` on every backend, `"torch"`
        (a `torch.export` program) on PyTorch (`zoo.models.exporting`); another format is refused up front.

        Keras infers a subclassed model's signature from its first call; these models know their
        inputs from the config and may not have been called yet (`_export_signature`).
        """
        if input_signature is None and format in backends.EXPORTS:  # Keras' own exporter traces it here
            input_signature = self._export_signature()
        return exporting.export(self, filepath, format, verbose, input_signature,
                                super(PresetModel, self).export, **kwargs)

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
        register_all()  # a config.json of another family is then named as such
        return loader.from_preset(cls, preset, dtype=dtype, **kwargs)

    def save_preset(self, folder: str | os.PathLike, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> Path:
        """Writes config.json, the weights and the model's other files in the source's own layout."""
        if self.adapters:
            raise AdapterError(
                f"the model has LoRA adapters {self.adapters}, which a checkpoint has no place for: merge_adapter() "
                "folds one into the weights before save_preset, or save_adapter() writes it as a PEFT adapter folder"
            )
        folder = Path(folder)
        config = self._export_config()
        source_config = config.to_source()  # both refuse what the layout cannot hold before anything is written
        tensors = export(self.key_map(config), weights_by_path(self))
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / loader.CONFIG_FILE, source_config)
        write_checkpoint(folder, tensors, max_shard_size)
        self._save_extras(folder)
        source = getattr(self, "source", None)
        if source and ("commit" in source or "version" in source):  # downloaded: say from which revision
            keep = {k: source[k] for k in ("handle", "revision", "commit", "version") if k in source}
            write_json(folder / SOURCE_FILE, {"derived_from": keep})
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

    # LoRA hooks (zoo.lora).
    _lora_task_type: str | None = None  # PEFT's task_type for this model

    def _lora_defaults(self) -> tuple[str, ...]:
        """The modules an adapter targets when none are named (PEFT's default for the model type)."""
        raise NotImplementedError

    def _lora_output_modules(self) -> set[str]:
        """Modules "all-linear" leaves out, as PEFT does: the output layer of a language model."""
        return set()

    def _lora_new_head(self) -> tuple[str, ...]:
        """Modules a new adapter trains and saves whole (PEFT's modules_to_save): a head that is new."""
        return ()

    def _lora_renames(self) -> list[tuple[str, str]]:
        """(pattern, replacement) from the checkpoint's module names to the installed transformers'."""
        return []
