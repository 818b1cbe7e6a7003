"""Rotary position embeddings in the "rotate half" convention of the Hugging Face references."""

import numpy as np
from keras import ops


def inverse_frequencies(head_dim: int, theta: float, factor: float = 1.0) -> np.ndarray:
    """(head_dim // 2,) float32, computed as transformers does (float32 exponent, linear scaling divides)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents) / np.float32(factor)).astype(np.float32)


def cos_sin(positions, inv_freq: np.ndarray, dtype):
    """Integer positions (b, t) -> cos, sin (b, t, 1, h) in `dtype`.

    Computed in float32 and cast to the activations' dtype, as the reference does; shaped to
    broadcast over heads so each layer applies them without reshaping.
    """
    angles = ops.cast(positions, "float32")[:, :, None, None] * ops.convert_to_tensor(inv_freq)  # (b, t, 1, h/2)
    angles = ops.concatenate([angles, angles], axis=-1)  # (b, t, 1, h)
    return ops.cast(ops.cos(angles), dtype), ops.cast(ops.sin(angles), dtype)


def apply(x, cos, sin):
    """x (b, t, n, h) rotated by position."""
    half = x.shape[-1] // 2
    rotated = ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin
