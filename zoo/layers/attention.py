"""Bidirectional multi-head self-attention, as in ViT: q/k/v/o projections around one attention core."""

import keras
from keras import ops

from zoo import backend
from zoo.layers.dense import einsum_dense as projection
from zoo.layers.tracking import LeanAttributes


class SelfAttention(LeanAttributes, keras.layers.Layer):
    """Multi-head self-attention without masking or positions (ViT-style).

    Weights: `q_proj`, `k_proj`, `v_proj` with kernels (n, h, d) and `o_proj` with kernel (d, n, h),
    the PyTorch Linear layouts (n*h, d) and (d, n*h) with the heads split out.
    """

    def __init__(self, num_heads: int, head_dim: int, use_bias: bool = True, dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_heads, self.head_dim, self.dropout = num_heads, head_dim, dropout
        shape, bias = (None, num_heads, head_dim), ("nh" if use_bias else None)
        self.q_proj = projection("btd,nhd->btnh", shape, bias, "q_proj", self.dtype_policy)
        self.k_proj = projection("btd,nhd->btnh", shape, bias, "k_proj", self.dtype_policy)
        self.v_proj = projection("btd,nhd->btnh", shape, bias, "v_proj", self.dtype_policy)
        self.o_proj = None  # built in build(), once the model width is known
        self.attention_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy) if dropout else None

    def build(self, input_shape):
        width = input_shape[-1]
        self.o_proj = projection("btnh,dnh->btd", (None, width), "d", "o_proj", self.dtype_policy)
        for layer in (self.q_proj, self.k_proj, self.v_proj):
            layer.build(input_shape)
        self.o_proj.build((*input_shape[:-1], self.num_heads, self.head_dim))

    def call(self, x, training=False):
        q = self.q_proj(x)  # (b, t, n, h)
        k = self.k_proj(x)  # (b, s, n, h)
        v = self.v_proj(x)  # (b, s, n, h)
        if training and self.attention_dropout is not None:
            scores = ops.einsum("btnh,bsnh->bnts", q, k) * self.head_dim**-0.5  # (b, n, t, s)
            probs = self.attention_dropout(ops.softmax(scores, axis=-1), training=True)
            out = ops.einsum("bnts,bsnh->btnh", probs, v)  # (b, t, n, h)
        else:
            out = backend.attention(q, k, v, self.head_dim**-0.5)  # (b, t, n, h)
        return self.o_proj(out)  # (b, t, d)
