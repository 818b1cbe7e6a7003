"""Normalisation: RMS normalisation as Gemma does it (in float32, scaled by (1 + w)), and LayerNorm's maths."""

import keras
from keras import ops

from zoo.layers import init
from zoo.layers.dtypes import cast


class RMSNorm(keras.layers.Layer):
    """x / rms(x) * (1 + weight), computed in float32 and cast back, as the Gemma reference does.

    The weight is stored as the offset from one (zeros initialise it to the identity), which is
    how Gemma checkpoints store it.
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.weight = self.add_weight(shape=(input_shape[-1],), initializer=init.zeros(), name="weight")

    def call(self, x):
        x32 = cast(x, "float32")
        normed = x32 * ops.rsqrt(ops.mean(ops.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return cast(normed * (1.0 + cast(self.weight, "float32")), x.dtype)  # (1 + w), in float32

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}


def layer_norm(x, gamma, beta, epsilon: float, compute_dtype):
    """What `keras.layers.LayerNormalization` computes over the last axis, for weights a block holds itself
    (made with `autocast=False`, as that layer makes them)."""
    return ops.cast(ops.layer_normalization(x, gamma, beta, axis=-1, epsilon=epsilon), compute_dtype)
