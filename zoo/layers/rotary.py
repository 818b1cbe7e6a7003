"""Rotary position embeddings in the "rotate half" convention of the Hugging Face references."""

import numpy as np
from keras import ops


def inverse_frequencies(head_dim: int, theta: float, factor: float = 1.0) -> np.ndarray:
    """(head_dim // 2,) float32, computed as transformers does (float32 exponent, linear scaling divides)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponents) / np.float32(factor)).astype(np.float32)


def cos_sin(positions, inv_freq: np.ndarray):
    """Integer positions (b, t) -> cos, sin (b, t, h), float32."""
    angles = ops.cast(positions, "float32")[..., None] * ops.convert_to_tensor(inv_freq)  # (b, t, h/2)
    angles = ops.concatenate([angles, angles], axis=-1)  # (b, t, h)
    return ops.cos(angles), ops.sin(angles)


def apply(x, cos, sin):
    """x (b, t, n, h) rotated by position; cos/sin (b, t, h) are cast to x's dtype first, as the reference does."""
    cos = ops.cast(cos, x.dtype)[:, :, None, :]  # (b, t, 1, h)
    sin = ops.cast(sin, x.dtype)[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin
