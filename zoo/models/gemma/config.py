"""GemmaConfig: one config for Gemma 1 (`gemma`), Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`).

Both spellings of config.json are read: the Hub's (older transformers: `torch_dtype`,
`rope_theta`, `rope_local_base_freq`, `rope_scaling`, `sliding_window_pattern`) and
transformers 5's (`dtype`, `rope_parameters`, `layer_types`). A field whose value the model
cannot honour raises ConfigError instead of being ignored.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError
from zoo.layers import activations
from zoo.models.fields import Fields, checkpoint_dtype

FULL, SLIDING = "full_attention", "sliding_attention"
ROPE_TYPES = ("default", "linear")
# Fields that do not change inference maths, written back unchanged.
PASSTHROUGH = ("initializer_range", "use_cache", "architectures", "attention_dropout", "max_window_layers",
               "transformers_version", "cache_implementation")


@dataclass(frozen=True)
class Family:
    """What a config.json's `model_type` fixes (transformers' Gemma, Gemma2 and Gemma3 text classes)."""

    architecture: str
    sandwich_norms: bool  # norms after attention and around the MLP as well
    qk_norm: bool  # RMS norms on queries and keys
    global_every: int  # with a sliding window, every n-th layer attends globally, the others slide
    gemma2_fields: bool  # config.json has sliding_window, soft-capping and query_pre_attn_scalar
    rope_theta: float  # the default RoPE base
    local_rope_theta: float | None = None  # sliding layers' own RoPE base by default (None: they share the global one)


FAMILIES = {
    "gemma": Family("GemmaForCausalLM", False, qk_norm=False, global_every=1, gemma2_fields=False, rope_theta=1e4),
    "gemma2": Family("Gemma2ForCausalLM", True, qk_norm=False, global_every=2, gemma2_fields=True, rope_theta=1e4),
    "gemma3_text": Family("Gemma3ForCausalLM", True, qk_norm=True, global_every=6, gemma2_fields=True, rope_theta=1e6,
                          local_rope_theta=1e4),
}
MODEL_TYPES = tuple(FAMILIES)


@dataclass(frozen=True)
class Rope:
    """Rotary embedding of one layer type: base wavelength, and linear position scaling (1 = none)."""

    theta: float
    factor: float = 1.0


@dataclass(frozen=True)
class GemmaConfig:
    """A Gemma decoder's architecture.

    Example:
        >>> cfg = GemmaConfig(model_type="gemma2", vocab_size=100, hidden_size=32, intermediate_size=64,
        ...                   num_layers=4, num_heads=4, num_kv_heads=1, head_dim=16, sliding_window=8)
        >>> cfg.layer_types
        ('sliding_attention', 'full_attention', 'sliding_attention', 'full_attention')
    """

    model_type: str = "gemma"
    vocab_size: int = 256000
    hidden_size: int = 2048
    intermediate_size: int = 16384
    num_layers: int = 18
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    hidden_act: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    rope: dict[str, Rope] = field(default_factory=lambda: {FULL: Rope(10000.0), SLIDING: Rope(10000.0)})
    attention_bias: bool = False
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # None: model_type's pattern (Family.global_every)
    sandwich_norms: bool | None = None  # None: as model_type's family
    qk_norm: bool | None = None  # None: as model_type's family
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] = (1,)
    pad_token_id: int | None = 0
    dtype: str = "float32"
    extras: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
        fields = Fields(dataclasses.asdict(self), "GemmaConfig")  # as from_hf checks, for direct use
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "max_position_embeddings"):
            fields.integer(name)
        fields.integer("num_layers", minimum=0)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}")
        activations.get(self.hidden_act)
        types = self.layer_types if self.layer_types is not None else self._default_layer_types()
        if len(types) != self.num_layers or any(t not in (FULL, SLIDING) for t in types):
            raise ConfigError(f"layer_types: expected {self.num_layers} of {FULL!r}/{SLIDING!r}, got {list(types)}")
        if SLIDING in types and not self.sliding_window:
            raise ConfigError("layer_types has sliding_attention layers but sliding_window is not set")
        object.__setattr__(self, "layer_types", tuple(types))
        for name in ("sandwich_norms", "qk_norm"):  # frozen: set the family's value as dataclasses.replace would see it
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(FAMILIES[self.model_type], name))
            fields.flag(name, getattr(self, name))

    def _default_layer_types(self) -> tuple[str, ...]:
        every = FAMILIES[self.model_type].global_every if self.sliding_window else 1
        return tuple(SLIDING if (i + 1) % every else FULL for i in range(self.num_layers))

    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self, with_head: bool = True) -> int:
        """Parameter count of the model this config builds (a tied head counts once), without building it."""
        h, hd = self.hidden_size, self.head_dim
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv + h) if self.attention_bias else 0)
        norms = (4 if self.sandwich_norms else 2) * h + (2 * hd if self.qk_norm else 0)
        layer = attention + 3 * h * self.intermediate_size + norms
        head = self.vocab_size * h if with_head and not self.tie_word_embeddings else 0
        return self.vocab_size * h + self.num_layers * layer + h + head

    def replace(self, **changes) -> "GemmaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf(cls, raw: dict) -> "GemmaConfig":
        where = "config.json"
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{where}: expected model_type in {MODEL_TYPES}, got {model_type!r}")
        if raw.get("use_bidirectional_attention"):
            raise ConfigError(f"{where}: use_bidirectional_attention=true is not supported (keras-zoo's Gemma is causal)")
        get = Fields(raw, where)
        hidden, heads = get.integer("hidden_size"), get.integer("num_attention_heads")
        layers = get.integer("num_hidden_layers", minimum=0)
        act = get.text("hidden_activation", None) or get.text("hidden_act", None) or "gelu_pytorch_tanh"
        if model_type == "gemma" and act == "gelu":  # as transformers: the official releases meant the tanh form
            act = "gelu_pytorch_tanh"
        family = FAMILIES[model_type]
        gemma2_on = family.gemma2_fields
        sliding = get.integer("sliding_window", None) if gemma2_on else None
        layer_types = raw.get("layer_types")
        if layer_types is not None and not isinstance(layer_types, list):
            raise ConfigError(f"{where}: field 'layer_types' should be a list, got {layer_types!r}")
        if layer_types is None and sliding:
            every = get.integer("sliding_window_pattern", family.global_every)
            layer_types = [SLIDING if (i + 1) % every else FULL for i in range(layers)]
        eos = token_ids(raw, "eos_token_id", 1, where)
        return cls(
            model_type=model_type,
            vocab_size=get.integer("vocab_size"),
            hidden_size=hidden,
            intermediate_size=get.integer("intermediate_size"),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get.integer("num_key_value_heads", heads),
            head_dim=get.integer("head_dim", hidden // heads),
            hidden_act=act,
            max_position_embeddings=get.integer("max_position_embeddings", 8192),
            rms_norm_eps=float(get.number("rms_norm_eps", 1e-6, minimum=0.0)),  # a float: transformers 5 reads no int here
            rope=_read_rope(raw, family, where),
            attention_bias=get.flag("attention_bias", False),
            query_pre_attn_scalar=get.number("query_pre_attn_scalar", None, positive=True) if gemma2_on else None,
            attn_logit_softcapping=get.number("attn_logit_softcapping", None, positive=True) if gemma2_on else None,
            final_logit_softcapping=get.number("final_logit_softcapping", None, positive=True) if gemma2_on else None,
            sliding_window=sliding,
            layer_types=tuple(layer_types) if layer_types is not None else None,
            sandwich_norms=family.sandwich_norms,
            qk_norm=family.qk_norm,
            tie_word_embeddings=get.flag("tie_word_embeddings", True),
            bos_token_id=_token_id(raw, "bos_token_id", 2, where),
            eos_token_id=eos,
            pad_token_id=_token_id(raw, "pad_token_id", 0, where),
            dtype=checkpoint_dtype(raw, where),
            extras={
                **{k: raw[k] for k in PASSTHROUGH if k in raw},
                "spelling": "v5" if "rope_parameters" in raw or "dtype" in raw else "hub",
                "act_key": "hidden_activation" if "hidden_activation" in raw else "hidden_act",
            },
        )

    def to_hf(self) -> dict:
        family = FAMILIES[self.model_type]
        if (self.sandwich_norms, self.qk_norm) != (family.sandwich_norms, family.qk_norm):
            raise ConfigError(f"sandwich_norms={self.sandwich_norms} and qk_norm={self.qk_norm} differ from what a "
                              f"{self.model_type!r} config.json implies; transformers would build another model")
        v5 = self.extras.get("spelling") == "v5"
        out = {
            "architectures": self.extras.get("architectures", [family.architecture]),
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            self.extras.get("act_key", "hidden_act"): self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
            "dtype" if v5 else "torch_dtype": self.dtype,
        }
        if family.gemma2_fields:
            out.update(query_pre_attn_scalar=self.query_pre_attn_scalar, sliding_window=self.sliding_window,
                       attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping, layer_types=list(self.layer_types))
        out.update(_write_rope(self.rope, family, v5))
        out.update({k: v for k, v in self.extras.items() if k in PASSTHROUGH and k != "architectures"})
        return out

    def to_source(self) -> dict:
        return self.to_hf()


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_id(raw: dict, key: str, default: int, where: str) -> int | None:
    """A token id; null means none (unlike other fields, where null means the default)."""
    value = raw.get(key, default)
    if value is not None and not _is_token_id(value):
        raise ConfigError(f"{where}: field {key!r} should be a token id (an int >= 0) or null, got {value!r}")
    return value


def token_ids(raw: dict, key: str, default: int, where: str) -> tuple[int, ...]:
    """One token id, a list of them (eos_token_id) or null, as a tuple."""
    value = raw.get(key, default)
    ids = value if isinstance(value, list) else [] if value is None else [value]
    if not all(map(_is_token_id, ids)):
        raise ConfigError(f"{where}: field {key!r} should be a token id (an int >= 0), a list of them or null, "
                          f"got {value!r}")
    return tuple(ids)


def _rope_from(params: dict, default_theta: float, where: str) -> Rope:
    get = Fields(params, f"{where} rope parameters")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type {kind!r} is not supported; keras-zoo implements {ROPE_TYPES}")
    factor = float(get.number("factor", 1.0, positive=True)) if kind == "linear" else 1.0
    return Rope(float(get.number("rope_theta", default_theta, positive=True)), factor)


def _read_rope(raw: dict, family: Family, where: str) -> dict[str, Rope]:
    params = raw.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{where}: field 'rope_parameters' should be an object, got {params!r}")
    full, local = family.rope_theta, family.local_rope_theta
    if local is not None:  # a RoPE per layer type
        if isinstance(params, dict) and FULL in params:  # transformers 5: one entry per layer type
            return {FULL: _rope_from(params[FULL], full, where), SLIDING: _rope_from(params.get(SLIDING, {}), local, where)}
        scaled = dict(_rope_scaling(raw, where), rope_theta=raw.get("rope_theta", full))
        return {FULL: _rope_from(scaled, full, where),
                SLIDING: _rope_from({"rope_theta": raw.get("rope_local_base_freq", local)}, local, where)}
    if isinstance(params, dict):
        rope = _rope_from(params, full, where)
    else:
        rope = _rope_from(dict(_rope_scaling(raw, where), rope_theta=raw.get("rope_theta", full)), full, where)
    return {FULL: rope, SLIDING: rope}


def _rope_scaling(raw: dict, where: str) -> dict:
    """The Hub spelling's `rope_scaling` object ({} when absent)."""
    return Fields(raw.get("rope_scaling") or {}, f"{where} rope_scaling").raw


def _rope_dict(rope: Rope) -> dict:
    if rope.factor != 1.0:
        return {"rope_type": "linear", "factor": rope.factor, "rope_theta": rope.theta}
    return {"rope_type": "default", "rope_theta": rope.theta}


def _write_rope(rope: dict[str, Rope], family: Family, v5: bool) -> dict:
    if v5:
        if family.local_rope_theta is not None:
            return {"rope_parameters": {FULL: _rope_dict(rope[FULL]), SLIDING: _rope_dict(rope[SLIDING])}}
        return {"rope_parameters": _rope_dict(rope[FULL])}
    out = {"rope_theta": rope[FULL].theta}
    if rope[FULL].factor != 1.0:
        out["rope_scaling"] = {"rope_type": "linear", "factor": rope[FULL].factor}
    if family.local_rope_theta is not None:
        out["rope_local_base_freq"] = rope[SLIDING].theta
    return out
