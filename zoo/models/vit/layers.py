"""The ViT's blocks: patch embeddings, the encoder block, and timm's attention pooling (`global_pool='map'`)."""

import functools

import keras
from keras import ops

from zoo.errors import ImageError
from zoo.layers import activations, init
from zoo.layers.attention import attention
from zoo.layers.dense import einsum_dense, linear
from zoo.layers.interpolate import bicubic_grid_matrices
from zoo.layers.norms import layer_norm
from zoo.models.vit.config import ViTConfig


def layer_norm_layer(eps: float, name: str, dtype) -> keras.layers.LayerNormalization:
    return keras.layers.LayerNormalization(epsilon=eps, gamma_initializer=init.ones(), beta_initializer=init.zeros(),
                                           name=name, dtype=dtype)


class ViTEmbeddings(keras.layers.Layer):
    """Patches -> tokens, with the [CLS] and register tokens in front, plus (possibly resampled) position embeddings.

    Position embeddings cover the front tokens too unless `config.prefix_positions` is false
    (timm's `no_embed_class`): then they are added to the patches before the front tokens join.
    """

    def __init__(self, config: ViTConfig, image_size: tuple[int, int], dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.config, self.image_size = config, tuple(image_size)
        self.patch_embeddings = keras.layers.Conv2D(
            config.hidden_size, config.patch_size, strides=config.patch_size, padding="valid",
            use_bias=not config.pre_norm,  # as timm: a CLIP-style pre-norm ViT has no patch bias
            kernel_initializer=init.normal(), bias_initializer=init.zeros(), name="patch_embeddings", dtype=self.dtype_policy,
        )
        self.dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy) if dropout else None
        grid = (self.image_size[0] // config.patch_size[0], self.image_size[1] // config.patch_size[1])
        # Resample only when the grid changes, as transformers' interpolate_pos_encoding (bicubic) and
        # timm's resample_abs_pos_embed (bicubic, antialiased) do.
        self.resample = None if grid == config.grid_size else bicubic_grid_matrices(
            config.grid_size, grid, antialias=config.antialias_positions)
        self.cls_token = self.register_tokens = None

    def build(self, input_shape):
        d, config = self.config.hidden_size, self.config
        if config.class_token:
            self.cls_token = self.add_weight(shape=(1, 1, d), initializer=init.normal(), name="cls_token")
        if config.register_tokens:
            self.register_tokens = self.add_weight(shape=(1, config.register_tokens, d), initializer=init.normal(),
                                                   name="register_tokens")
        self.position_embeddings = self.add_weight(
            shape=(1, config.num_positions, d), initializer=init.normal(), name="position_embeddings"
        )
        self.patch_embeddings.build(input_shape)

    def call(self, images, training=False):
        got = tuple(images.shape[1:3])
        if None not in got and got != self.image_size:  # else the position embeddings fail to broadcast, per backend
            raise ImageError(
                f"expected images of {self.image_size[0]}x{self.image_size[1]} (this model's image_size), got "
                f"{got[0]}x{got[1]}; `preprocess` resizes images, and `from_preset(..., image_size=(h, w))` builds "
                "the model for another resolution"
            )
        d = self.config.hidden_size
        x = self.patch_embeddings(images)  # (b, gh, gw, d)
        b = ops.shape(x)[0]
        x = ops.reshape(x, (b, -1, d))  # (b, p, d)
        front = [ops.broadcast_to(ops.cast(w, x.dtype), (b, w.shape[1], d))
                 for w in (self.cls_token, self.register_tokens) if w is not None]  # (b, 1, d), (b, r, d)
        pos = ops.cast(self.position_embeddings, x.dtype)
        if self.resample is not None:
            first = self.config.num_prefix_tokens if self.config.prefix_positions else 0
            rows, cols = (ops.cast(m, x.dtype) for m in self.resample)  # (h', h), (w', w)
            grid = ops.reshape(pos[0, first:], (*self.config.grid_size, d))  # (h, w, d)
            grid = ops.einsum("xw,ywd->yxd", cols, ops.einsum("yh,hwd->ywd", rows, grid))  # (h', w', d)
            pos = ops.concatenate([pos[:, :first], ops.reshape(grid, (1, -1, d))], axis=1)  # (1, first + p', d)
        if self.config.prefix_positions:
            x = ops.concatenate([*front, x], axis=1) + pos  # (b, prefix + p, d)
        else:
            x = ops.concatenate([*front, x + pos], axis=1) if front else x + pos
        return self.dropout(x, training=training) if self.dropout is not None else x


class ViTLayer(keras.layers.Layer):
    """Pre-norm encoder block: x + attn(norm(x)), then x + mlp(norm(x)).

    The MLP is fc2(act(fc1(x))), or with `config.gated_mlp` fc2(act(gate_proj(x)) * up_proj(x))
    (timm's SwiGLUPacked, whose fc1 holds the gate's rows, then the up projection's). The block
    holds its LayerNorms' weights itself and its projections directly, without norm or attention
    sublayers: every Keras layer costs ~0.2 ms to make on TensorFlow.
    """

    def __init__(self, config: ViTConfig, hidden_dropout: float = 0.0, attention_dropout: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        self.epsilon, self.num_heads, self.head_dim = config.layer_norm_eps, config.num_heads, config.head_dim
        heads, bias = (None, config.num_heads, config.head_dim), ("nh" if config.qkv_bias else None)
        self.q_proj = einsum_dense("btd,nhd->btnh", heads, bias, "q_proj", dt)  # kernels (n, h, d): PyTorch's rows
        self.k_proj = einsum_dense("btd,nhd->btnh", heads, bias, "k_proj", dt)
        self.v_proj = einsum_dense("btd,nhd->btnh", heads, bias, "v_proj", dt)
        self.o_proj = einsum_dense("btnh,dnh->btd", (None, config.hidden_size), "d", "o_proj", dt)
        # The activation inside fc1 (or the gate), applied to its 2-D product (TensorFlow fuses MatMul, BiasAdd, GELU).
        act, width = activations.get(config.hidden_act), config.intermediate_size
        self.fc1 = None if config.gated_mlp else linear(width, "fc1", dt, activation=act)
        self.gate_proj = linear(width, "gate_proj", dt, activation=act) if config.gated_mlp else None
        self.up_proj = linear(width, "up_proj", dt) if config.gated_mlp else None
        self.fc2 = linear(config.hidden_size, "fc2", dt)
        self.attention_dropout = keras.layers.Dropout(attention_dropout, dtype=dt) if attention_dropout else None
        self.dropout = keras.layers.Dropout(hidden_dropout, dtype=dt) if hidden_dropout else None
        self.intermediate_size = config.intermediate_size
        self.layer_scale = config.layer_scale
        self.layerscale_1 = self.layerscale_2 = None

    def build(self, input_shape):
        width = (input_shape[-1],)
        norm_weight = functools.partial(self.add_weight, shape=width, autocast=False)  # as LayerNormalization's
        self.layernorm_before_gamma = norm_weight(initializer=init.ones(), name="layernorm_before_gamma")
        self.layernorm_before_beta = norm_weight(initializer=init.zeros(), name="layernorm_before_beta")
        self.layernorm_after_gamma = norm_weight(initializer=init.ones(), name="layernorm_after_gamma")
        self.layernorm_after_beta = norm_weight(initializer=init.zeros(), name="layernorm_after_beta")
        if self.layer_scale is not None:  # timm's LayerScale (ls1, ls2): one scale per channel and branch
            scale = init.constant(self.layer_scale)
            self.layerscale_1 = self.add_weight(shape=width, initializer=scale, name="layerscale_1")
            self.layerscale_2 = self.add_weight(shape=width, initializer=scale, name="layerscale_2")
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.fc1, self.gate_proj, self.up_proj):
            if layer is not None:
                layer.build(input_shape)
        self.o_proj.build((*input_shape[:-1], self.num_heads, self.head_dim))
        self.fc2.build((*input_shape[:-1], self.intermediate_size))

    def _branch(self, x, scale, training):
        """A residual branch's output, scaled per channel (layer scale) and dropped out when training."""
        x = x if scale is None else x * ops.cast(scale, x.dtype)
        return self.dropout(x, training=training) if self.dropout is not None else x

    def _attention(self, x, training):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (b, t, n, h) each
        out = attention(q, k, v, self.head_dim**-0.5, dropout=self.attention_dropout, training=training)  # (b, t, n, h)
        return self.o_proj(out)  # (b, t, d)

    def _mlp(self, x):
        hidden = self.fc1(x) if self.fc1 is not None else self.gate_proj(x) * self.up_proj(x)  # (b, t, i), activated
        return self.fc2(hidden)  # (b, t, d)

    def call(self, x, training=False):
        normed = layer_norm(x, self.layernorm_before_gamma, self.layernorm_before_beta, self.epsilon, self.compute_dtype)
        x = x + self._branch(self._attention(normed, training), self.layerscale_1, training)  # (b, t, d)
        normed = layer_norm(x, self.layernorm_after_gamma, self.layernorm_after_beta, self.epsilon, self.compute_dtype)
        return x + self._branch(self._mlp(normed), self.layerscale_2, training)


class ViTAttentionPool(keras.layers.Layer):
    """timm's AttentionPoolLatent (`global_pool='map'`, SigLIP's head): tokens (b, s, d) -> one vector (b, d).

    A learned query (`latent`) attends over the tokens; the result, projected, gets a residual
    MLP on its LayerNorm: out + fc2(act(fc1(norm(out)))). As in timm, the projections always have
    biases and the MLP is a plain one of the model's width ratio, whatever the blocks use.
    """

    def __init__(self, config: ViTConfig, **kwargs):
        super().__init__(**kwargs)
        dt = self.dtype_policy
        d, self.num_heads, self.head_dim = config.hidden_size, config.num_heads, config.head_dim
        self.epsilon, self.mlp_width = config.layer_norm_eps, config.fc1_size  # int(d * mlp_ratio), as timm's
        heads = (None, config.num_heads, config.head_dim)
        self.q_proj = einsum_dense("btd,nhd->btnh", heads, "nh", "q_proj", dt)  # kernels (n, h, d): PyTorch's rows
        self.k_proj = einsum_dense("btd,nhd->btnh", heads, "nh", "k_proj", dt)
        self.v_proj = einsum_dense("btd,nhd->btnh", heads, "nh", "v_proj", dt)
        self.o_proj = einsum_dense("btnh,dnh->btd", (None, d), "d", "o_proj", dt)
        self.fc1 = linear(self.mlp_width, "fc1", dt, activation=activations.get(config.hidden_act))
        self.fc2 = linear(d, "fc2", dt)

    def build(self, input_shape):
        d = input_shape[-1]
        self.latent = self.add_weight(shape=(1, 1, d), initializer=init.normal(), name="latent")
        norm_weight = functools.partial(self.add_weight, shape=(d,), autocast=False)  # as LayerNormalization's
        self.norm_gamma = norm_weight(initializer=init.ones(), name="norm_gamma")
        self.norm_beta = norm_weight(initializer=init.zeros(), name="norm_beta")
        query = (input_shape[0], 1, d)
        for layer in (self.q_proj, self.fc1):
            layer.build(query)
        for layer in (self.k_proj, self.v_proj):
            layer.build(input_shape)
        self.o_proj.build((input_shape[0], 1, self.num_heads, self.head_dim))
        self.fc2.build((input_shape[0], 1, self.mlp_width))

    def call(self, x):
        b = ops.shape(x)[0]
        q = self.q_proj(ops.cast(self.latent, x.dtype))  # (1, 1, n, h)
        q = ops.broadcast_to(q, (b, 1, self.num_heads, self.head_dim))  # (b, 1, n, h)
        out = self.o_proj(attention(q, self.k_proj(x), self.v_proj(x), self.head_dim**-0.5))  # (b, 1, d)
        normed = layer_norm(out, self.norm_gamma, self.norm_beta, self.epsilon, self.compute_dtype)
        return (out + self.fc2(self.fc1(normed)))[:, 0]  # (b, d)
