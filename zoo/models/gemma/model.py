"""GemmaBackbone (token ids -> hidden states) and GemmaCausalLM (token ids -> logits; generate, stream).

Three entry points share one stack of layers:
- `call(token_ids, padding_mask)`: the whole sequence, no cache (parity, training, scoring);
- `prefill(token_ids, lengths, slots, cache)`: right-padded prompts, their keys and values
  written into cache rows `slots`;
- `decode(token_ids, positions, cache)`: one new token per cache row, attending over the cache.
The KV cache is a tuple (keys_0, values_0, keys_1, ...) of (rows, max_length, k, h) tensors that
goes in and comes out of every call; no layer holds state.
"""

import dataclasses
from pathlib import Path

import keras
from keras import ops

from zoo import backends, generation
from zoo import distribution as devices
from zoo.errors import ConfigError
from zoo.files import read_json, write_json
from zoo.layers import init, rotary
from zoo.layers.dense import einsum_dense
from zoo.layers.norms import RMSNorm
from zoo.models.base import PresetModel
from zoo.models.gemma import checkpoint_map
from zoo.models.gemma.config import FULL, SLIDING, GemmaConfig, Rope, token_ids
from zoo.models.gemma.layers import GemmaDecoderLayer
from zoo.tokenizer import Tokenizer


@keras.saving.register_keras_serializable(package="zoo")
class GemmaBackbone(PresetModel):
    """Gemma decoder: token ids (b, t) -> hidden states (b, t, d), final norm applied.

    Example:
        >>> cfg = GemmaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
        ...                   num_heads=4, num_kv_heads=1, head_dim=8)
        >>> GemmaBackbone(cfg)(np.array([[2, 5, 7]])).shape
        (1, 3, 32)
    """

    family = "gemma"

    def __init__(self, config: GemmaConfig, **kwargs):
        kwargs.setdefault("name", "gemma_backbone")
        super().__init__(**kwargs)
        self.config = config
        dt = self.dtype_policy
        self.embed_tokens = keras.layers.Embedding(config.vocab_size, config.hidden_size,
                                                   embeddings_initializer=init.normal(), name="embed_tokens", dtype=dt)
        self.decoder_layers = [GemmaDecoderLayer(config, name=f"layers_{i}", dtype=dt) for i in range(config.num_layers)]
        self.norm = RMSNorm(config.rms_norm_eps, name="norm", dtype=dt)
        self.inv_freq = {kind: rotary.inverse_frequencies(config.head_dim, r.theta, r.factor)
                         for kind, r in config.rope.items()}
        self.build((None, None))

    def build(self, input_shape):
        self.embed_tokens.build(input_shape)
        hidden = (None, None, self.config.hidden_size)
        for layer in self.decoder_layers:
            layer.build(hidden)
        self.norm.build(hidden)
        self.built = True

    # ------------------------------------------------------------------ the three entry points

    def call(self, token_ids, padding_mask=None, segment_ids=None, adapters=None):
        """`segment_ids` (b, t) number the examples packed into a row (1, 2, ...; 0 is padding): each attends
        within itself and counts its positions from 0, as if alone. A dict of these inputs works too (`fit`).
        `adapters` (b,), in every entry point: each row's slot among the served adapters (`zoo.lora.bank`)."""
        if isinstance(token_ids, dict):
            return self.call(**token_ids)
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if segment_ids is not None:
            segment_ids = ops.convert_to_tensor(segment_ids, "int32")
            t = ops.shape(token_ids)[1]
            earlier = ops.arange(t)[None, :] <= ops.arange(t)[:, None]  # (t, s)
            same = ops.logical_and(segment_ids[:, :, None] == segment_ids[:, None, :], earlier)  # (b, t, s)
            positions = ops.sum(ops.cast(same, "int32"), axis=-1) - 1  # (b, t): earlier tokens of its example
            key_valid = ops.logical_and(same, (segment_ids > 0)[:, None, :])  # (b, t, s)
            masks = self._masks(positions[:, :, None], positions[:, None, :], key_valid)
            x, _ = self._run_layers(self._embed(token_ids), positions, masks, adapters=adapters)
            return x
        if padding_mask is None:
            valid = ops.ones_like(token_ids, dtype="bool")
        else:
            valid = ops.cast(padding_mask, "bool")
        # Positions count real tokens only, so left padding does not shift them.
        positions = ops.maximum(ops.cumsum(ops.cast(valid, "int32"), axis=1) - 1, 0)  # (b, t)
        masks = self._masks(positions[:, :, None], positions[:, None, :], valid[:, None, :])
        x, _ = self._run_layers(self._embed(token_ids), positions, masks, adapters=adapters)
        return x

    def prefill(self, token_ids, slots, cache, adapters=None):
        """Right-padded prompts (p, T) -> hidden (p, T, d), with their keys/values written into rows `slots`.

        Pad tokens are written too, beyond each prompt's end; decoding overwrites them, and the
        causal mask hides them until then.
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        p, t = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        positions = ops.broadcast_to(ops.arange(t, dtype="int32")[None, :], (p, t))  # (p, T)
        masks = self._masks(positions[:, :, None], positions[:, None, :], None)
        write_index = (ops.convert_to_tensor(slots, "int32"), ops.zeros((p,), "int32"))  # rows, start positions
        return self._run_layers(self._embed(token_ids), positions, masks, cache, write_index, read_cache=False,
                                adapters=adapters)

    def decode(self, token_ids, positions, cache, adapters=None):
        """One token for each of the first B cache rows: token_ids (B, 1) at `positions` (B,) -> hidden (B, 1, d), cache.

        B may be fewer than the cache's rows; the rows beyond are neither read nor written.
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        positions = ops.convert_to_tensor(positions, "int32")
        rows, length = token_ids.shape[0], ops.shape(cache[0])[1]
        key_positions = ops.arange(length, dtype="int32")[None, None, :]  # (1, 1, S)
        masks = self._masks(positions[:, None, None], key_positions, None)  # (B, 1, S)
        write_index = (ops.arange(rows, dtype="int32"), positions)  # every row, at its own position
        return self._run_layers(self._embed(token_ids), positions[:, None], masks, cache, write_index, read_cache=True,
                                adapters=adapters)

    # ------------------------------------------------------------------ internals

    def _embed(self, token_ids):
        x = self.embed_tokens(token_ids)  # (b, t, d)
        return x * ops.cast(self.config.hidden_size**0.5, x.dtype)  # the normaliser in the hidden dtype

    def _masks(self, query_positions, key_positions, key_valid):
        """Boolean masks (b, t, s) per layer type: causal everywhere, and within the window for sliding layers."""
        causal = key_positions <= query_positions
        if key_valid is not None:
            causal = ops.logical_and(causal, key_valid)
        masks = {FULL: causal}
        if self.config.sliding_window:
            window = key_positions > query_positions - self.config.sliding_window
            masks[SLIDING] = ops.logical_and(causal, window)
        return masks

    def _run_layers(self, x, positions, masks, cache=None, write_index=None, read_cache=False, adapters=None):
        rope = {kind: rotary.cos_sin(positions, inv, x.dtype) for kind, inv in self.inv_freq.items()}
        new_cache = []
        for i, (layer, kind) in enumerate(zip(self.decoder_layers, self.config.layer_types)):
            layer_cache = None if cache is None else (cache[2 * i], cache[2 * i + 1])
            x, layer_cache = layer(x, *rope[kind], masks[kind], cache=layer_cache, write_index=write_index,
                                   read_cache=read_cache, adapters=adapters)
            if cache is not None:
                new_cache.extend(layer_cache)
        return self.norm(x), (tuple(new_cache) if cache is not None else None)

    def empty_cache(self, rows: int, length: int) -> tuple:
        """A zeroed KV cache of `rows` sequences of up to `length` positions."""
        c = self.config
        shape = (rows, length, c.num_kv_heads, c.head_dim)
        cache = tuple(ops.zeros(shape, dtype=self.compute_dtype) for _ in range(2 * c.num_layers))
        return devices.place_cache(cache, self.distribution, self.decoder_layers[0].self_attn.k_proj.kernel)

    def key_map(self, config: GemmaConfig) -> list:
        return checkpoint_map.rows(config, target_prefix="", head=False)

    def _lora_defaults(self) -> tuple[str, ...]:
        return checkpoint_map.LORA_DEFAULTS

    def get_config(self):
        return {"config": _config_to_dict(self.config), "name": self.name, "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(_config_from_dict(config.pop("config")), **config)


def _config_to_dict(config: GemmaConfig) -> dict:
    d = dataclasses.asdict(config)
    d["rope"] = {k: dataclasses.asdict(v) for k, v in config.rope.items()}
    return d


def _config_from_dict(d: dict) -> GemmaConfig:
    d = dict(d)
    d["rope"] = {k: Rope(**v) for k, v in d["rope"].items()}
    return GemmaConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@keras.saving.register_keras_serializable(package="zoo")
class GemmaCausalLM(PresetModel):
    """A Gemma decoder with its language-model head: token ids (b, t) -> logits (b, t, vocab).

    Generation: `generate(prompt_or_prompts, max_new_tokens=..., sampler=..., stop=...)` returns
    text; `stream(prompt, ...)` yields text pieces as tokens are made. Prompts in one call are
    batched (continuous batching over up to `max_batch` slots); each gets the tokens it would
    get alone.

    Example:
        >>> lm = GemmaCausalLM.from_preset("gemma_tiny_pycode")  # doctest: +SKIP
        >>> lm.generate("def fibonacci(n):", max_new_tokens=32)  # doctest: +SKIP
    """

    family = "gemma"

    def __init__(self, config: GemmaConfig, tokenizer=None, stop_token_ids=None, **kwargs):
        kwargs.setdefault("name", "gemma_causal_lm")
        super().__init__(**kwargs)
        self.config = config
        self.backbone = GemmaBackbone(config, name="backbone", dtype=self.dtype_policy)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = einsum_dense("...d,vd->...v", (config.vocab_size,), None, "lm_head", self.dtype_policy)
            self.lm_head.build((None, None, config.hidden_size))
        self.tokenizer = tokenizer
        self.stop_token_ids = frozenset(stop_token_ids if stop_token_ids is not None else config.eos_token_id)
        self.built = True

    def call(self, token_ids, padding_mask=None, segment_ids=None, adapters=None):
        """Token ids (b, t) -> logits (b, t, vocab); the inputs as `GemmaBackbone.call`'s (a dict of them too)."""
        if isinstance(token_ids, dict):
            return self.call(**token_ids)
        return self.logits(self.backbone(token_ids, padding_mask, segment_ids, adapters=adapters))

    def logits(self, hidden):
        """Hidden states (..., d) -> logits (..., vocab), soft-capped if the config says so."""
        if self.lm_head is not None:
            logits = self.lm_head(hidden)
        else:
            embeddings = ops.cast(self.backbone.embed_tokens.embeddings, hidden.dtype)  # tied to the embedding
            # A 2-D product: TensorFlow's gradient of an einsum over "..." materialises (b, t, v, d) (16 GB
            # for a batch of 2 x 128 tokens over 32000 x 512 embeddings) before summing it.
            shape = ops.shape(hidden)
            logits = backends.matmul_out_in(ops.reshape(hidden, (-1, shape[-1])), embeddings)  # (b*t, v)
            logits = ops.reshape(logits, (*shape[:-1], embeddings.shape[0]))  # (..., v)
        if self.config.final_logit_softcapping:
            cap = ops.cast(self.config.final_logit_softcapping, logits.dtype)
            logits = ops.tanh(logits / cap) * cap
        return logits

    # ------------------------------------------------------------------ what the generation engine runs

    def prefill(self, token_ids, lengths, slots, cache, adapters=None):
        """Right-padded prompts (p, T) -> float32 logits at each prompt's last token (p, vocab), and the cache
        with their keys and values written into rows `slots`; `adapters` (p,) as in `GemmaBackbone.call`."""
        hidden, cache = self.backbone.prefill(token_ids, slots, cache, adapters)
        last = ops.convert_to_tensor(lengths, "int32") - 1
        hidden = ops.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # (p, d)
        return ops.cast(self.logits(hidden), "float32"), cache

    def decode(self, token_ids, positions, cache, adapters=None):
        """One token per cache row (B, 1) at `positions` (B,) -> float32 logits (B, vocab), and the cache."""
        hidden, cache = self.backbone.decode(token_ids, positions, cache, adapters)
        return ops.cast(self.logits(hidden[:, 0]), "float32"), cache

    def empty_cache(self, rows: int, length: int) -> tuple:
        """A zeroed KV cache of `rows` sequences of up to `length` positions (split over KV heads as the model's
        key projection is, under a distribution)."""
        cache = self.backbone.empty_cache(rows, length)
        return devices.place_cache(cache, self.distribution, self.backbone.decoder_layers[0].self_attn.k_proj.kernel)

    # ------------------------------------------------------------------ generation (zoo.generation)

    engine = generation.engine_for
    generate = generation.generate
    stream = generation.stream

    # ------------------------------------------------------------------ presets

    def key_map(self, config: GemmaConfig) -> list:
        return checkpoint_map.rows(config, target_prefix="backbone/", head=True)

    _lora_task_type = "CAUSAL_LM"

    def _lora_defaults(self) -> tuple[str, ...]:
        return checkpoint_map.LORA_DEFAULTS

    def _lora_output_modules(self) -> set[str]:
        return {"lm_head"}

    @classmethod
    def _from_folder(cls, config, folder: Path, dtype: str, **kwargs):
        tokenizer = None
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            tokenizer = Tokenizer.from_folder(folder)
            if tokenizer.vocab_size > config.vocab_size:
                raise ConfigError(
                    f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                    f"{config.vocab_size}; the tokenizer files do not belong to this checkpoint"
                )
        stop = set(config.eos_token_id)
        if (folder / "generation_config.json").is_file():
            raw = read_json(folder / "generation_config.json")
            stop |= set(token_ids(raw, "eos_token_id", None, "generation_config.json"))
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            stop.add(tokenizer.eos_token_id)
        return cls(config, tokenizer=tokenizer, stop_token_ids=stop, dtype=dtype, **kwargs)

    def _save_extras(self, folder: Path):
        if self.tokenizer is not None:
            self.tokenizer.save(folder)
        generation = {"bos_token_id": self.config.bos_token_id, "eos_token_id": sorted(self.stop_token_ids),
                      "pad_token_id": self.config.pad_token_id}
        write_json(folder / "generation_config.json", generation)

    def get_config(self):
        return {"config": _config_to_dict(self.config), "stop_token_ids": sorted(self.stop_token_ids),
                "name": self.name, "dtype": self.dtype_policy.name}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(_config_from_dict(config.pop("config")), **config)
