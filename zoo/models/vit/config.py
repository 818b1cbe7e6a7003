"""ViTConfig: the architecture, read from and written back to Hugging Face or timm `config.json`."""

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError
from zoo.layers import activations
from zoo.models.fields import Fields, checkpoint_dtype

# timm's named sizes: width, depth, heads (mlp_ratio 4).
TIMM_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
TIMM_ARCHITECTURE = re.compile(r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)$")
# timm model_args we honour, and those whose non-default value we cannot honour.
TIMM_ARGS = {"img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "global_pool", "in_chans", "num_classes"}
TIMM_UNSUPPORTED = {
    "class_token": True, "no_embed_class": False, "reg_tokens": 0, "pre_norm": False, "init_values": None,
    "qk_norm": False, "fc_norm": None, "dynamic_img_size": False, "act_layer": None, "norm_layer": None,
    "block_fn": None, "mlp_layer": None, "embed_layer": None, "pos_embed": "learn", "class_token_pos": None,
}
# Fields of a HF ViT config.json that do not change inference maths, written back unchanged.
HF_PASSTHROUGH = ("initializer_range", "encoder_stride", "pooler_output_size", "pooler_act")


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer's architecture.

    Example:
        >>> cfg = ViTConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        ...                 image_size=(32, 32), patch_size=(8, 8), num_labels=10)
        >>> cfg.num_patches, cfg.head_dim
        (16, 16)
    """

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    image_size: tuple[int, int] = (224, 224)
    patch_size: tuple[int, int] = (16, 16)
    num_channels: int = 3
    qkv_bias: bool = True
    num_labels: int = 1000
    id2label: tuple[str, ...] = ()
    pooling: str = "token"  # "token" (the [CLS] token) or "avg" (timm's mean over patches)
    dtype: str = "float32"  # the checkpoint's own dtype
    source_format: str = "hf"  # "hf" or "timm": the config.json layout to write back
    extras: dict[str, Any] = field(default_factory=dict, compare=False)  # fields written back unchanged

    def __post_init__(self):
        fields = Fields(dataclasses.asdict(self), "ViTConfig")  # as config.json's readers check, for direct use
        for name in ("hidden_size", "num_heads", "intermediate_size", "num_channels"):
            fields.integer(name)
        for name in ("num_layers", "num_labels"):
            fields.integer(name, minimum=0)
        for name in ("image_size", "patch_size"):
            fields.pair(name)
        fields.number("layer_norm_eps", minimum=0.0)
        fields.text("hidden_act")
        fields.flag("qkv_bias")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_heads}")
        if any(i < p for i, p in zip(self.image_size, self.patch_size)):
            raise ConfigError(f"image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.pooling not in ("token", "avg"):
            raise ConfigError(f"global_pool: expected 'token' or 'avg', got {self.pooling!r}")
        activations.get(self.hidden_act)
        if self.id2label and len(self.id2label) != self.num_labels:
            raise ConfigError(f"id2label has {len(self.id2label)} labels but num_labels is {self.num_labels}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def labels(self) -> tuple[str, ...]:
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def num_params(self, with_head: bool = True) -> int:
        """Parameter count of the model this config builds, computed without building it."""
        d, i, c = self.hidden_size, self.intermediate_size, self.num_channels
        ph, pw = self.patch_size
        bias = d if self.qkv_bias else 0
        embeddings = c * ph * pw * d + d + d + (self.num_patches + 1) * d  # patch conv, [CLS], positions
        layer = 2 * 2 * d + 3 * (d * d + bias) + d * d + d + d * i + i + i * d + d
        head = d * self.num_labels + self.num_labels if with_head else 0
        return embeddings + self.num_layers * layer + 2 * d + head

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, raw: dict) -> "ViTConfig":
        where = "config.json"
        if raw.get("model_type") != "vit":
            raise ConfigError(f"{where}: expected model_type 'vit', got {raw.get('model_type')!r}")
        get = Fields(raw, where)
        labels = get.labels("id2label")
        hidden, heads = get.integer("hidden_size"), get.integer("num_attention_heads")
        head_dim = get.integer("head_dim", None)
        if head_dim is not None and head_dim * heads != hidden:
            raise ConfigError(f"{where}: head_dim {head_dim} x num_attention_heads {heads} must equal hidden_size {hidden}")
        return cls(
            hidden_size=hidden,
            num_layers=get.integer("num_hidden_layers", minimum=0),
            num_heads=heads,
            intermediate_size=get.integer("intermediate_size"),
            hidden_act=get.text("hidden_act", "gelu"),
            layer_norm_eps=float(get.number("layer_norm_eps", 1e-12, minimum=0.0)),  # a float: transformers 5 reads no int here
            image_size=get.pair("image_size", 224),
            patch_size=get.pair("patch_size", 16),
            num_channels=get.integer("num_channels", 3),
            qkv_bias=get.flag("qkv_bias", True),
            num_labels=get.integer("num_labels", len(labels) or 2, minimum=0),
            id2label=labels,
            dtype=checkpoint_dtype(raw, where),
            source_format="hf",
            extras={k: raw[k] for k in (*HF_PASSTHROUGH, "architectures", "torch_dtype") if k in raw},
        )

    def to_hf(self) -> dict:
        labels = self.labels
        out = {
            "architectures": self.extras.get("architectures", ["ViTForImageClassification"]),
            "model_type": "vit",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": self.hidden_act,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "layer_norm_eps": self.layer_norm_eps,
            "image_size": list(self.image_size) if self.image_size[0] != self.image_size[1] else self.image_size[0],
            "patch_size": list(self.patch_size) if self.patch_size[0] != self.patch_size[1] else self.patch_size[0],
            "num_channels": self.num_channels,
            "qkv_bias": self.qkv_bias,
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)},
            "encoder_stride": self.patch_size[0],
        }
        out.update({k: v for k, v in self.extras.items() if k in HF_PASSTHROUGH})
        out["torch_dtype" if "torch_dtype" in self.extras else "dtype"] = self.dtype
        return out

    # ------------------------------------------------------------------ timm

    @classmethod
    def from_timm(cls, raw: dict) -> "ViTConfig":
        where = "config.json"
        arch = raw.get("architecture")
        m = TIMM_ARCHITECTURE.match(str(arch))
        if not m or m["size"] not in TIMM_SIZES:
            raise ConfigError(
                f"{where}: unsupported timm architecture {arch!r}; keras-zoo reads the plain ViTs "
                f"vit_{{{','.join(TIMM_SIZES)}}}_patch<N>_<resolution>"
            )
        width, depth, heads = TIMM_SIZES[m["size"]]
        get = Fields(raw, where)
        model_args = Fields(raw.get("model_args") or {}, f"{where} model_args")
        args = dict(model_args.raw)
        for key, default in TIMM_UNSUPPORTED.items():
            if key in args and args[key] != default:
                raise ConfigError(f"{where}: model_args.{key}={args[key]!r} is not supported (expected {default!r})")
        unknown = set(args) - TIMM_ARGS - set(TIMM_UNSUPPORTED)
        if unknown:
            raise ConfigError(f"{where}: model_args {sorted(unknown)} are not supported by keras-zoo's ViT")
        pretrained = Fields(raw.get("pretrained_cfg") or {}, f"{where} pretrained_cfg")
        res = int(m["res"])
        input_size = pretrained.sizes("input_size", [3, res, res], 3, "[channels, height, width]")
        width = model_args.integer("embed_dim", width)
        return cls(
            hidden_size=width,
            num_layers=model_args.integer("depth", depth, minimum=0),
            num_heads=model_args.integer("num_heads", heads),
            intermediate_size=int(width * model_args.number("mlp_ratio", 4.0, minimum=0.0)),
            hidden_act="gelu",
            layer_norm_eps=1e-6,
            image_size=model_args.pair("img_size", tuple(input_size[1:])),
            patch_size=model_args.pair("patch_size", int(m["patch"])),
            num_channels=model_args.integer("in_chans", input_size[0]),
            qkv_bias=model_args.flag("qkv_bias", True),
            num_labels=get.integer("num_classes", pretrained.integer("num_classes", 1000, minimum=0), minimum=0),
            id2label=_timm_labels(get),
            pooling=model_args.text("global_pool", None) or get.text("global_pool", None) or "token",
            dtype="float32",
            source_format="timm",
            extras={"architecture": arch, "pretrained_cfg": pretrained.raw, "model_args": args,
                    **{k: raw[k] for k in ("label_descriptions",) if k in raw}},
        )

    def to_timm(self) -> dict:
        pretrained = dict(self.extras.get("pretrained_cfg", {}))
        pretrained.update(num_classes=self.num_labels, input_size=[self.num_channels, *self.image_size])
        out = {
            "architecture": self.extras.get("architecture", f"vit_base_patch{self.patch_size[0]}_{self.image_size[0]}"),
            "num_classes": self.num_labels,
            "num_features": self.hidden_size,
            "global_pool": self.pooling,
        }
        if self.id2label:
            out["label_names"] = list(self.id2label)
        out.update({k: v for k, v in self.extras.items() if k == "label_descriptions"})
        args = dict(self.extras.get("model_args", {}))
        m = TIMM_ARCHITECTURE.match(out["architecture"])
        named = TIMM_SIZES.get(m["size"]) if m else None
        if named != (self.hidden_size, self.num_layers, self.num_heads) or self.intermediate_size != 4 * self.hidden_size:
            args.update(embed_dim=self.hidden_size, depth=self.num_layers, num_heads=self.num_heads,
                        mlp_ratio=self.intermediate_size / self.hidden_size)
        if args:
            out["model_args"] = args
        out["pretrained_cfg"] = pretrained
        return out

    def to_source(self) -> dict:
        """The config.json in the layout this config was read from."""
        return self.to_timm() if self.source_format == "timm" else self.to_hf()


def resolution(value, default: tuple[int, int]) -> tuple[int, int]:
    """An input resolution as a caller gives it (`image_size=`): None (the default), n (n x n) or (height, width)."""
    if value is None:
        return tuple(default)
    return Fields({"image_size": value}, "argument").pair("image_size")


def _timm_labels(get: Fields) -> tuple[str, ...]:
    """timm's `label_names`: a list of names, or an id -> name object as HF's id2label."""
    names = get.raw.get("label_names")
    if isinstance(names, list):
        if not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{get.where}: field 'label_names' should be a list of strings, got {names[:5]!r}")
        return tuple(names)
    return get.labels("label_names")
