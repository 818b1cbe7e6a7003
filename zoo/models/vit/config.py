"""ViTConfig: the architecture, read from and written back to Hugging Face or timm `config.json`."""

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError
from zoo.layers import activations
from zoo.models.fields import Fields, checkpoint_dtype
from zoo.models.vit import timm_architectures

# timm's named sizes: width, depth, heads (mlp_ratio 4), for plain `vit_<size>_patch<N>_<res>` names that
# timm_architectures.ARCHITECTURES (timm's own table) does not list.
TIMM_SIZES = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}
TIMM_ARCHITECTURE = re.compile(r"^vit_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)$")
# timm model arguments we honour (and timm's table adds norm_eps, its partial(LayerNorm, eps=...), and
# mlp_layer, a class: neither can a config.json spell); those we accept at their default value only; the
# activations we build; the MLP classes we build (timm's Mlp and its fc1-packed SwiGLU); the poolings we build.
TIMM_ARGS = {
    "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "global_pool", "in_chans",
    "num_classes", "class_token", "reg_tokens", "no_embed_class", "pre_norm", "init_values", "fc_norm", "final_norm",
    "act_layer", "dynamic_img_size",
}
TIMM_UNSUPPORTED = {
    "qk_norm": False, "norm_layer": None, "block_fn": None, "mlp_layer": None, "embed_layer": None, "attn_layer": None,
    "pos_embed": "learn", "class_token_pos": None, "proj_bias": True, "scale_attn_norm": False,
    "scale_mlp_norm": False, "pool_include_prefix": False, "dynamic_img_pad": False, "embed_norm_layer": None,
}
TIMM_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh", "silu")
TIMM_MLPS = {None: False, "SwiGLUPacked": True}  # timm's mlp_layer -> gated_mlp
POOLINGS = ("token", "avg", "map")  # the [CLS] token, the patches' mean, timm's attention pooling
FINAL_NORMS = ("tokens", "pooled", "none")  # normalise every token, the pooled vector (timm's fc_norm), or neither
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
    pooling: str = "token"  # one of POOLINGS; "map": a learned query attends over the patch tokens [global_pool]
    # timm's variants (its VisionTransformer arguments in brackets); a Hugging Face ViT has the defaults.
    class_token: bool = True  # a [CLS] token in front [class_token]
    register_tokens: int = 0  # learned tokens after it, dropped by pooling [reg_tokens]
    prefix_positions: bool = True  # position embeddings cover the [CLS] and register tokens [not no_embed_class]
    layer_scale: float | None = None  # per-channel scales on each residual branch, initial value [init_values]
    pre_norm: bool = False  # a LayerNorm on the embeddings before the blocks; no patch bias then [pre_norm]
    final_norm: str | None = None  # "tokens", "pooled" or "none"; None: "pooled" for avg pooling [fc_norm, final_norm]
    gated_mlp: bool = False  # fc2(act(gate_proj(x)) * up_proj(x)), gate and up packed in timm's fc1 [mlp_layer]
    antialias_positions: bool = False  # resample position embeddings antialiased (timm's resample_abs_pos_embed)
    headless: bool = False  # the checkpoint is the encoder alone: HF's ViTModel, timm's num_classes 0
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
        if self.pooling not in POOLINGS:
            raise ConfigError(f"global_pool: expected one of {POOLINGS}, got {self.pooling!r}")
        if self.final_norm is None:  # frozen: set the derived default as dataclasses.replace would see it
            object.__setattr__(self, "final_norm", "pooled" if self.pooling == "avg" else "tokens")
        if self.final_norm not in FINAL_NORMS:
            raise ConfigError(f"final_norm: expected one of {FINAL_NORMS}, got {self.final_norm!r}")
        fields.flag("class_token")
        fields.flag("prefix_positions")
        fields.flag("pre_norm")
        fields.flag("gated_mlp")
        fields.flag("antialias_positions")
        fields.flag("headless")
        fields.integer("register_tokens", minimum=0)
        fields.number("layer_scale", None)
        if self.pooling == "token" and not self.class_token:
            raise ConfigError("global_pool 'token' needs the class token (class_token is false)")
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
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: the [CLS] token and the register tokens."""
        return int(self.class_token) + self.register_tokens

    @property
    def num_positions(self) -> int:
        return self.num_patches + (self.num_prefix_tokens if self.prefix_positions else 0)

    @property
    def is_plain(self) -> bool:
        """Whether this is the original ViT, as a Hugging Face ViT config.json can describe it."""
        return (self.class_token and not self.register_tokens and self.prefix_positions and self.layer_scale is None
                and not self.pre_norm and self.pooling == "token" and self.final_norm == "tokens"
                and not self.gated_mlp)

    @property
    def fc1_size(self) -> int:
        """Outputs of timm's fc1: the MLP's hidden width, twice it if gated (gate and up packed together)."""
        return self.intermediate_size * (2 if self.gated_mlp else 1)

    @property
    def mlp_ratio(self) -> float:
        """timm's mlp_ratio, from which timm sizes fc1 as int(embed_dim * mlp_ratio).

        fc1_size / hidden_size, one ulp up where that product would truncate to one less
        (1408 x (6041 / 1408) is 6040.99...).
        """
        ratio = self.fc1_size / self.hidden_size
        return ratio if int(self.hidden_size * ratio) == self.fc1_size else math.nextafter(ratio, math.inf)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def num_params(self, with_head: bool = True) -> int:
        """Parameter count of the model this config builds, computed without building it."""
        d, i, c = self.hidden_size, self.intermediate_size, self.num_channels
        ph, pw = self.patch_size
        bias = d if self.qkv_bias else 0
        patch_bias = 0 if self.pre_norm else d
        embeddings = c * ph * pw * d + patch_bias + self.num_prefix_tokens * d + self.num_positions * d
        fc1 = self.fc1_size
        layer = 2 * 2 * d + 3 * (d * d + bias) + d * d + d + d * fc1 + fc1 + i * d + d
        layer += 2 * d if self.layer_scale is not None else 0
        norms = 2 * d * (int(self.pre_norm) + int(self.final_norm != "none"))
        pool = 0
        if self.pooling == "map":  # query, q/kv/out projections (always with biases), norm, a plain MLP of fc1's width
            pool = d + 4 * (d * d + d) + 2 * d + d * fc1 + fc1 + fc1 * d + d
        head = d * self.num_labels + self.num_labels if with_head else 0
        return embeddings + self.num_layers * layer + norms + pool + head

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
            headless=raw.get("architectures") == ["ViTModel"],
            dtype=checkpoint_dtype(raw, where),
            source_format="hf",
            extras={k: raw[k] for k in (*HF_PASSTHROUGH, "architectures", "torch_dtype") if k in raw},
        )

    def to_hf(self) -> dict:
        if not self.is_plain:
            raise ConfigError(
                "this ViT has timm-only parts (register tokens, layer scale, pre-norm, average pooling...) that a "
                "Hugging Face ViT config.json cannot describe; it saves in timm's layout (source_format 'timm')"
            )
        labels = self.labels
        out = {
            "architectures": ["ViTModel"] if self.headless else self._hf_architectures(),
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

    def _hf_architectures(self) -> list:
        kept = self.extras.get("architectures")
        return kept if kept and kept != ["ViTModel"] else ["ViTForImageClassification"]

    # ------------------------------------------------------------------ timm

    @classmethod
    def from_timm(cls, raw: dict) -> "ViTConfig":
        where = "config.json"
        arch = raw.get("architecture")
        named = timm_architecture(arch, where)
        get = Fields(raw, where)
        args = dict(Fields(raw.get("model_args") or {}, f"{where} model_args").raw)
        for key, default in TIMM_UNSUPPORTED.items():
            if key in args and args[key] != default:
                raise ConfigError(f"{where}: model_args.{key}={args[key]!r} is not supported (expected {default!r})")
        unknown = set(args) - TIMM_ARGS - set(TIMM_UNSUPPORTED)
        if unknown:
            raise ConfigError(f"{where}: model_args {sorted(unknown)} are not supported by keras-zoo's ViT")
        model = Fields({**named, **args}, f"{where} model_args")  # the table's values are timm's own, valid
        pretrained = Fields(raw.get("pretrained_cfg") or {}, f"{where} pretrained_cfg")
        named_size = Fields(named, f"timm's {arch}").pair("img_size", 224)
        input_size = pretrained.sizes("input_size", [3, *named_size], 3, "[channels, height, width]")
        width = model.integer("embed_dim")
        act = model.text("act_layer", "gelu")
        if act not in TIMM_ACTIVATIONS:
            raise ConfigError(f"{where}: model_args.act_layer={act!r} is not supported (expected one of {TIMM_ACTIVATIONS})")
        pooling = args.get("global_pool") or get.text("global_pool", None) or model.text("global_pool", "token")
        fc_norm = model.flag("fc_norm", None)
        after_pool = pooling == "avg" if fc_norm is None else fc_norm  # timm's use_fc_norm
        final_norm = ("pooled" if after_pool else "tokens") if model.flag("final_norm", True) else "none"
        init_values = model.number("init_values", None)
        mlp_layer = model.raw.get("mlp_layer")
        if mlp_layer not in TIMM_MLPS:
            raise ConfigError(f"{where}: mlp_layer {mlp_layer!r} is not supported (expected one of {list(TIMM_MLPS)})")
        gated, fc1 = TIMM_MLPS[mlp_layer], int(width * model.number("mlp_ratio", 4.0, minimum=0.0))  # as timm's Mlp
        num_classes = get.integer("num_classes", pretrained.integer("num_classes", 1000, minimum=0), minimum=0)
        if gated and fc1 % 2:
            raise ConfigError(f"{where}: a gated MLP packs gate and up in fc1, whose {fc1} outputs "
                              f"(embed_dim x mlp_ratio) do not split in two")
        return cls(
            hidden_size=width,
            num_layers=model.integer("depth", minimum=0),
            num_heads=model.integer("num_heads"),
            intermediate_size=fc1 // 2 if gated else fc1,
            hidden_act=act,
            layer_norm_eps=float(model.number("norm_eps", 1e-6, positive=True)),
            image_size=model.pair("img_size", tuple(input_size[1:])),
            patch_size=model.pair("patch_size", 16),  # timm's default, which two TinyCLIP names rely on
            num_channels=model.integer("in_chans", input_size[0]),
            qkv_bias=model.flag("qkv_bias", True),
            num_labels=num_classes,
            id2label=_timm_labels(get),
            pooling=pooling,
            class_token=model.flag("class_token", True),
            register_tokens=model.integer("reg_tokens", 0, minimum=0),
            prefix_positions=not model.flag("no_embed_class", False),
            layer_scale=None if init_values is None else float(init_values),
            pre_norm=model.flag("pre_norm", False),
            final_norm=final_norm,
            gated_mlp=gated,
            antialias_positions=True,
            headless=num_classes == 0,
            dtype="float32",
            source_format="timm",
            extras={"architecture": arch, "pretrained_cfg": pretrained.raw, "model_args": args,
                    **{k: raw[k] for k in ("label_descriptions",) if k in raw}},
        )

    def timm_args(self) -> dict:
        """This config as timm's VisionTransformer arguments (norm_eps: its LayerNorm's epsilon)."""
        return {
            "patch_size": self.patch_size[0] if self.patch_size[0] == self.patch_size[1] else list(self.patch_size),
            "embed_dim": self.hidden_size, "depth": self.num_layers, "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio, "qkv_bias": self.qkv_bias,
            "class_token": self.class_token, "reg_tokens": self.register_tokens,
            "no_embed_class": not self.prefix_positions, "pre_norm": self.pre_norm, "init_values": self.layer_scale,
            "final_norm": self.final_norm != "none", "fc_norm": self.final_norm == "pooled",
            "act_layer": self.hidden_act, "norm_eps": self.layer_norm_eps, "global_pool": self.pooling,
        }

    def to_timm(self) -> dict:
        if self.headless and self.num_labels:  # timm's encoder alone has no classes
            return self.replace(num_labels=0, id2label=()).to_timm()
        if self.hidden_act not in TIMM_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} has no timm equivalent (expected one of {TIMM_ACTIVATIONS})")
        pretrained = dict(self.extras.get("pretrained_cfg", {}))
        pretrained.update(num_classes=self.num_labels, input_size=[self.num_channels, *self.image_size])
        arch = self.extras.get("architecture") or f"vit_base_patch{self.patch_size[0]}_{self.image_size[0]}"
        out = {"architecture": arch, "num_classes": self.num_labels, "num_features": self.hidden_size,
               "global_pool": self.pooling}
        if self.id2label:
            out["label_names"] = list(self.id2label)
        out.update({k: v for k, v in self.extras.items() if k == "label_descriptions"})
        # model_args: what the config.json said, and every argument in which this model differs from
        # what timm builds for the architecture's name alone.
        named = ViTConfig.from_timm({"architecture": arch, "pretrained_cfg": {"input_size": pretrained["input_size"]}})
        args = dict(self.extras.get("model_args", {}))
        base, own = named.timm_args(), self.timm_args()
        if own.pop("norm_eps") != base.pop("norm_eps"):
            raise ConfigError(f"layer_norm_eps {self.layer_norm_eps} differs from timm's {named.layer_norm_eps} for "
                              f"{arch!r}, and timm's config.json has no field for it")
        if self.gated_mlp != named.gated_mlp:
            raise ConfigError(f"gated_mlp {self.gated_mlp} differs from timm's {named.gated_mlp} for {arch!r}, and "
                              "timm's config.json has no field for it (mlp_layer is a class)")
        args.update({key: value for key, value in own.items() if key in args or value != base[key]})
        # Fields newer timm exports repeat in model_args (timm builds from these): this model's values.
        current = {"img_size": list(self.image_size), "num_classes": self.num_labels, "in_chans": self.num_channels}
        args.update({key: value for key, value in current.items() if key in args})
        if args:
            out["model_args"] = args
        out["pretrained_cfg"] = pretrained
        return out

    def to_source(self) -> dict:
        """The config.json in the layout this config was read from."""
        return self.to_timm() if self.source_format == "timm" else self.to_hf()


def timm_architecture(name, where: str) -> dict:
    """timm's arguments for a named ViT architecture (its table, or a plain `vit_<size>_patch<N>_<res>`)."""
    if name in timm_architectures.ARCHITECTURES:
        return dict(timm_architectures.ARCHITECTURES[name])
    if name in timm_architectures.REFUSED:
        raise ConfigError(f"{where}: timm architecture {name!r} is not supported by keras-zoo's ViT: it has "
                          f"{timm_architectures.REFUSED[name]}")
    m = TIMM_ARCHITECTURE.match(str(name))
    if not m or m["size"] not in TIMM_SIZES:
        raise ConfigError(
            f"{where}: unsupported timm architecture {name!r}; keras-zoo reads the ViTs of timm "
            f"{timm_architectures.TIMM_VERSION}'s table (zoo/models/vit/timm_architectures.py) and plain "
            f"vit_{{{','.join(TIMM_SIZES)}}}_patch<N>_<resolution>"
        )
    width, depth, heads = TIMM_SIZES[m["size"]]
    return {"patch_size": int(m["patch"]), "embed_dim": width, "depth": depth, "num_heads": heads,
            "img_size": int(m["res"])}


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
