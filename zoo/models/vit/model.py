"""ViTBackbone (patch tokens -> hidden states) and ViTImageClassifier (images -> label logits)."""

import dataclasses
from pathlib import Path

import keras
import numpy as np
from keras import ops

from zoo.errors import ConfigError
from zoo.files import read_json, write_json
from zoo.layers.dense import linear
from zoo.models.base import PresetModel
from zoo.models.vit import checkpoint_map
from zoo.models.vit.config import ViTConfig, resolution
from zoo.models.vit.layers import ViTAttentionPool, ViTEmbeddings, ViTLayer, layer_norm_layer
from zoo.models.vit.preprocess import PREPROCESSOR_FILE, ImagePreprocessor


@keras.saving.register_keras_serializable(package="zoo")
class ViTBackbone(PresetModel):
    """Vision Transformer encoder: images `(b, h, w, c)` -> hidden states `(b, prefix + patches, d)`.

    The prefix is the [CLS] and register tokens (`config.num_prefix_tokens`); the states are
    normalised unless `config.final_norm` says otherwise; `pool` gives one vector per image.
    `image_size` builds it for another resolution (position embeddings resampled bicubically, as
    transformers' `interpolate_pos_encoding`); the dropout rates apply when training.

    Example:
        >>> cfg = ViTConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
        ...                 image_size=(16, 16), patch_size=(8, 8), num_labels=3)
        >>> ViTBackbone(cfg)(np.zeros((1, 16, 16, 3), "float32")).shape
        (1, 5, 32)
    """

    family = "vit"
    traced_predict = True

    def __init__(self, config: ViTConfig, image_size=None, hidden_dropout: float = 0.0, attention_dropout: float = 0.0,
                 **kwargs):
        kwargs.setdefault("name", "vit_backbone")
        super().__init__(**kwargs)
        self.config = config
        self.image_size = resolution(image_size, config.image_size)
        self.hidden_dropout, self.attention_dropout = hidden_dropout, attention_dropout
        if any(s < p for s, p in zip(self.image_size, config.patch_size)):
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {config.patch_size}")
        dt = self.dtype_policy
        self.embeddings = ViTEmbeddings(config, self.image_size, hidden_dropout, name="embeddings", dtype=dt)
        self.encoder_layers = [
            ViTLayer(config, hidden_dropout, attention_dropout, name=f"layers_{i}", dtype=dt) for i in range(config.num_layers)
        ]
        self.pre_layernorm = layer_norm_layer(config.layer_norm_eps, "pre_layernorm", dt) if config.pre_norm else None
        self.layernorm = layer_norm_layer(config.layer_norm_eps, "layernorm", dt) if config.final_norm != "none" else None
        self.attn_pool = ViTAttentionPool(config, name="attn_pool", dtype=dt) if config.pooling == "map" else None
        self.build((None, *self.image_size, config.num_channels))

    def build(self, input_shape):
        self.embeddings.build(input_shape)
        tokens = (input_shape[0], None, self.config.hidden_size)
        for layer in self.encoder_layers:
            layer.build(tokens)
        for layer in (self.pre_layernorm, self.layernorm, self.attn_pool):
            if layer is not None:
                layer.build(tokens)
        self.built = True

    def call(self, images, training=False):
        x = self.embeddings(images, training=training)  # (b, t, d)
        if self.pre_layernorm is not None:
            x = self.pre_layernorm(x)
        for layer in self.encoder_layers:
            x = layer(x, training=training)
        return self.layernorm(x) if self.config.final_norm == "tokens" else x

    def pool(self, hidden):
        """Hidden states (b, t, d) -> one vector per image (b, d): the [CLS] token, or the patches' mean
        or attention pooling (timm's `map`)."""
        if self.config.pooling == "token":
            return hidden[:, 0]
        patches = hidden[:, self.config.num_prefix_tokens:]  # (b, p, d)
        pooled = self.attn_pool(patches) if self.attn_pool is not None else ops.mean(patches, axis=1)
        return self.layernorm(pooled) if self.config.final_norm == "pooled" else pooled

    def key_map(self, config: ViTConfig) -> list:
        return checkpoint_map.rows(config, config.source_format)

    def _export_signature(self) -> list:
        return [keras.InputSpec(shape=(None, *self.image_size, self.config.num_channels), dtype=self.input_dtype)]

    def _lora_defaults(self) -> tuple[str, ...]:
        return checkpoint_map.LORA_DEFAULTS[self.config.source_format]

    def _lora_renames(self) -> list[tuple[str, str]]:
        return checkpoint_map.HF_MODULE_RENAMES if self.config.source_format == "hf" else []

    def _export_config(self) -> ViTConfig:
        """A backbone saves as the encoder alone: HF `ViTModel`, or timm with `num_classes` 0."""
        return self.config.replace(headless=True)

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), "image_size": self.image_size,
                "hidden_dropout": self.hidden_dropout, "attention_dropout": self.attention_dropout,
                "name": self.name, "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(_config_from_dict(config.pop("config")), **config)


@keras.saving.register_keras_serializable(package="zoo")
class ViTImageClassifier(PresetModel):
    """A ViT backbone and a linear head: normalised images `(b, h, w, c)` -> logits `(b, num_labels)`.

    Example:
        >>> clf = ViTImageClassifier.from_preset("vit_tiny_digits")  # doctest: +SKIP
        >>> clf.predict_labels("digit.png", top_k=1)  # doctest: +SKIP
        [[{'label': '7', 'score': 0.99}]]
    """

    family = "vit"
    traced_predict = True

    def __init__(self, config: ViTConfig, preprocessor: ImagePreprocessor | None = None, image_size=None,
                 hidden_dropout: float = 0.0, attention_dropout: float = 0.0, **kwargs):
        kwargs.setdefault("name", "vit_image_classifier")
        super().__init__(**kwargs)
        self.config = config
        self.backbone = ViTBackbone(config, image_size, hidden_dropout, attention_dropout, name="backbone",
                                    dtype=self.dtype_policy)
        self.classifier = linear(config.num_labels, "classifier", self.dtype_policy)
        self.classifier.build((None, config.hidden_size))
        self.preprocessor = preprocessor or _default_preprocessor(config, self.backbone.image_size)
        self.fresh_head = False
        self.new_head = False  # a head the checkpoint did not have: LoRA trains and saves it whole
        self.built = True

    def call(self, pixel_values, training=False):
        hidden = self.backbone(pixel_values, training=training)  # (b, t, d)
        return self.classifier(self.backbone.pool(hidden))  # (b, labels)

    def preprocess(self, images) -> np.ndarray:
        """Paths, PIL images or uint8 arrays -> the normalised float32 batch this checkpoint expects."""
        return self.preprocessor(images)

    def predict_labels(self, images, top_k: int = 5, batch_size: int = 32) -> list[list[dict]]:
        """Top-k labels per image: `[[{"label": name, "score": probability}, ...], ...]`."""
        for name, value in (("top_k", top_k), ("batch_size", batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        pixels = self.preprocess(images)
        logits = np.concatenate([
            ops.convert_to_numpy(self.predict_on_batch(pixels[i:i + batch_size]))
            for i in range(0, len(pixels), batch_size)
        ])
        probs = _softmax(logits.astype(np.float64))
        labels = self.config.labels
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        return [[{"label": labels[j], "score": float(p[j])} for j in row] for p, row in zip(probs, order)]

    def key_map(self, config: ViTConfig) -> list:
        return checkpoint_map.rows(config, config.source_format, "backbone/", head=not self.fresh_head)

    def _export_signature(self) -> list:
        return self.backbone._export_signature()

    def _lora_defaults(self) -> tuple[str, ...]:
        return self.backbone._lora_defaults()

    def _lora_renames(self) -> list[tuple[str, str]]:
        return self.backbone._lora_renames()

    def _lora_new_head(self) -> tuple[str, ...]:
        return (checkpoint_map.LORA_HEADS[self.config.source_format],) if self.new_head else ()

    @classmethod
    def _from_folder(cls, config, folder: Path, dtype: str, num_labels: int | None = None, labels=None, **kwargs):
        if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
            raise ConfigError(f"num_labels: expected a positive int, got {num_labels!r}")
        fresh = (num_labels is not None and num_labels != config.num_labels) or labels is not None
        if config.headless and not fresh:
            raise ConfigError(
                f"{folder}: this checkpoint is a ViT encoder without a classification head; "
                "pass num_labels= or labels= to ViTImageClassifier.from_preset to start a new head"
            )
        if fresh:
            if isinstance(labels, str):
                raise ConfigError(f"labels: expected a list of label names, got the string {labels!r}")
            labels = tuple(labels) if labels is not None else ()
            if not all(isinstance(name, str) for name in labels) or (labels == () and num_labels is None):
                raise ConfigError(f"labels: expected label names (strings), got {list(labels)[:5]!r}")
            config = config.replace(num_labels=len(labels) if labels else num_labels, id2label=labels)
        preprocessor = _read_preprocessor(config, folder, kwargs.get("image_size"))
        model = cls(config, preprocessor, dtype=dtype, **kwargs)
        model.fresh_head = fresh
        return model

    def _fresh_weights(self) -> set[str]:
        return {"classifier/kernel", "classifier/bias"} if self.fresh_head else set()

    def _after_load(self):
        if self.fresh_head:  # built under skip_init: give the new head its real initial values
            for variable, initializer in ((self.classifier.kernel, self.classifier.kernel_initializer),
                                          (self.classifier.bias, self.classifier.bias_initializer)):
                variable.assign(initializer.initializer(variable.shape, dtype=variable.dtype))
            self.config = self.config.replace(headless=False)  # the checkpoint had no head; the model now has one
            self.new_head = True
        self.fresh_head = False  # loaded: from here on the head is part of the model, and `save_preset` writes it

    def _save_extras(self, folder: Path):
        if self.config.source_format == "hf":
            write_json(folder / PREPROCESSOR_FILE, self.preprocessor.to_hf())

    def get_config(self):
        return {"config": dataclasses.asdict(self.config), "preprocessor": dataclasses.asdict(self.preprocessor),
                "image_size": self.backbone.image_size, "name": self.name, "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        pre = {k: tuple(v) if isinstance(v, list) else v for k, v in config.pop("preprocessor").items()}
        return cls(_config_from_dict(config.pop("config")), ImagePreprocessor(**pre), **config)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _config_from_dict(d: dict) -> ViTConfig:
    return ViTConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _default_preprocessor(config: ViTConfig, image_size) -> ImagePreprocessor:
    if config.source_format == "timm":
        return ImagePreprocessor.from_timm(config.extras.get("pretrained_cfg", {}), tuple(image_size), config.num_channels)
    return ImagePreprocessor(size=tuple(image_size), num_channels=config.num_channels)


def _read_preprocessor(config: ViTConfig, folder: Path, image_size) -> ImagePreprocessor:
    """preprocessor_config.json for HF layouts (resized to `image_size` if the user asked for another)."""
    path = folder / PREPROCESSOR_FILE
    size = resolution(image_size, config.image_size)
    if config.source_format == "hf" and path.is_file():
        pre = ImagePreprocessor.from_hf(read_json(path), config.num_channels)
        if image_size is not None:
            pre = dataclasses.replace(pre, size=size, shortest_edge=None, crop_size=None)
        return pre
    return _default_preprocessor(config, size)
