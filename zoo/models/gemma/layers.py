"""Gemma's attention, MLP and decoder block, in keras.ops.

Shapes: b batch, t query positions, s key positions, d model width, n query heads, k KV heads,
g heads per KV head, h head width, f MLP width.
"""

import keras

from zoo import backends
from zoo.layers import activations, rotary
from zoo.layers.attention import attention
from zoo.layers.dense import einsum_dense
from zoo.layers.norms import RMSNorm
from zoo.models.gemma.config import GemmaConfig


class GemmaAttention(keras.layers.Layer):
    """Grouped-query attention with rotary positions, optional q/k norms, soft-capping and a KV cache."""

    def __init__(self, config: GemmaConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        c, dt = config, self.dtype_policy
        bias = c.attention_bias
        self.q_proj = einsum_dense("btd,nhd->btnh", (None, c.num_heads, c.head_dim), "nh" if bias else None, "q_proj", dt)
        self.k_proj = einsum_dense("btd,khd->btkh", (None, c.num_kv_heads, c.head_dim), "kh" if bias else None, "k_proj", dt)
        self.v_proj = einsum_dense("btd,khd->btkh", (None, c.num_kv_heads, c.head_dim), "kh" if bias else None, "v_proj", dt)
        self.o_proj = einsum_dense("btnh,dnh->btd", (None, c.hidden_size), "d" if bias else None, "o_proj", dt)
        self.q_norm = RMSNorm(c.rms_norm_eps, name="q_norm", dtype=dt) if c.qk_norm else None
        self.k_norm = RMSNorm(c.rms_norm_eps, name="k_norm", dtype=dt) if c.qk_norm else None

    def build(self, input_shape):
        c = self.config
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            layer.build(input_shape)
        self.o_proj.build((*input_shape[:-1], c.num_heads, c.head_dim))
        if c.qk_norm:
            self.q_norm.build((None, None, c.num_heads, c.head_dim))
            self.k_norm.build((None, None, c.num_kv_heads, c.head_dim))

    def call(self, x, cos, sin, mask, cache=None, write_index=None, read_cache=False, adapters=None):
        """x (b, t, d) -> (b, t, d), and the (keys, values) cache with this step's rows written.

        With a cache, row i of this step's keys and values is written into cache row
        `write_index[0][i]` from position `write_index[1][i]`; `read_cache` attends over the
        whole cache (decoding) rather than over this step's own keys (prefilling). `adapters` (b,)
        picks each row's served adapter (`zoo.lora.bank`).
        """
        q = self.q_proj(x, adapters=adapters)  # (b, t, n, h)
        k = self.k_proj(x, adapters=adapters)  # (b, t, k, h)
        v = self.v_proj(x, adapters=adapters)  # (b, t, k, h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)
        if cache is not None:
            keys, values = cache
            keys = backends.write_slices(keys, *write_index, k)  # (B, S, k, h)
            values = backends.write_slices(values, *write_index, v)
            cache = (keys, values)
            if read_cache:  # decoding the first b rows of the cache
                b = x.shape[0]
                k, v = (keys, values) if b == keys.shape[0] else (keys[:b], values[:b])
        c = self.config
        out = attention(q, k, v, c.attention_scale, mask, softcap=c.attn_logit_softcapping)  # (b, t, n, h)
        return self.o_proj(out, adapters=adapters), cache


class GemmaMLP(keras.layers.Layer):
    """down(act(gate(x)) * up(x)), GeGLU with the config's activation (tanh-approximate GELU)."""

    def __init__(self, config: GemmaConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        f, d = config.intermediate_size, config.hidden_size
        self.gate_proj = einsum_dense("...d,fd->...f", (f,), None, "gate_proj", dt)
        self.up_proj = einsum_dense("...d,fd->...f", (f,), None, "up_proj", dt)
        self.down_proj = einsum_dense("...f,df->...d", (d,), None, "down_proj", dt)
        self.act = activations.get(config.hidden_act)
        self.intermediate_size = f

    def build(self, input_shape):
        self.gate_proj.build(input_shape)
        self.up_proj.build(input_shape)
        self.down_proj.build((*input_shape[:-1], self.intermediate_size))

    def call(self, x, adapters=None):
        gate, up = self.gate_proj(x, adapters=adapters), self.up_proj(x, adapters=adapters)  # (b, t, f)
        return self.down_proj(self.act(gate) * up, adapters=adapters)  # (b, t, d)


class GemmaDecoderLayer(keras.layers.Layer):
    """Pre-norm attention and MLP blocks; Gemma 2 and 3 also normalise their outputs ("sandwich")."""

    def __init__(self, config: GemmaConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        dt, eps = self.dtype_policy, config.rms_norm_eps
        self.input_layernorm = RMSNorm(eps, name="input_layernorm", dtype=dt)
        self.self_attn = GemmaAttention(config, name="self_attn", dtype=dt)
        # In Gemma 1 this norm precedes the MLP; in Gemma 2 and 3 it follows attention.
        self.post_attention_layernorm = RMSNorm(eps, name="post_attention_layernorm", dtype=dt)
        self.pre_feedforward_layernorm = RMSNorm(eps, name="pre_feedforward_layernorm", dtype=dt) if config.sandwich_norms else None
        self.post_feedforward_layernorm = RMSNorm(eps, name="post_feedforward_layernorm", dtype=dt) if config.sandwich_norms else None
        self.mlp = GemmaMLP(config, name="mlp", dtype=dt)

    def build(self, input_shape):
        for layer in (self.input_layernorm, self.self_attn, self.post_attention_layernorm, self.mlp,
                      self.pre_feedforward_layernorm, self.post_feedforward_layernorm):
            if layer is not None:
                layer.build(input_shape)

    def call(self, x, cos, sin, mask, cache=None, write_index=None, read_cache=False, adapters=None):
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache=cache, write_index=write_index,
                                  read_cache=read_cache, adapters=adapters)
        if self.config.sandwich_norms:
            x = x + self.post_attention_layernorm(h)
            mlp = self.mlp(self.pre_feedforward_layernorm(x), adapters=adapters)
            return x + self.post_feedforward_layernorm(mlp), cache
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x), adapters=adapters), cache
