"""Resampling matrices that reproduce PyTorch's `interpolate(mode="bicubic", align_corners=False)`,
with or without `antialias` (transformers resamples ViT position embeddings without, timm with).

Position embeddings are resampled to a new patch grid as products with constant matrices
built here in NumPy, so the result is identical on every backend (the backends' own
bicubic resizes use other kernels: TensorFlow and JAX a=-0.5, PyTorch a=-0.75).
"""

import math

import numpy as np

_A = -0.75  # PyTorch's cubic convolution coefficient


def _cubic_weights(t: float) -> list[float]:
    def near(x):  # |x| <= 1
        return ((_A + 2) * x - (_A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((_A * x - 5 * _A) * x + 8 * _A) * x - 4 * _A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix M such that M @ x resamples x along one axis like PyTorch."""
    m = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        for k, w in enumerate(_cubic_weights(src - base)):
            m[i, min(max(base - 1 + k, 0), size_in - 1)] += w
    return m


def _antialias_weight(x: float) -> float:
    """PyTorch's antialiased bicubic filter: cubic convolution with a=-0.5 (as PIL), not -0.75."""
    a, x = -0.5, abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def antialiased_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of `interpolate(mode="bicubic", antialias=True)` along one axis.

    Up and down: the filter is widened by the scale when shrinking, and each row's weights are
    normalised to sum to one (PyTorch's `_compute_indices_weights_aa`).
    """
    m = np.zeros((size_out, size_in), np.float64)
    scale = size_in / size_out
    support = 2.0 * scale if scale >= 1.0 else 2.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(size_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), size_in)
        weights = [_antialias_weight((j - center + 0.5) * invscale) for j in range(lo, hi)]
        total = sum(weights)
        m[i, lo:hi] = np.asarray(weights) / (total if total else 1.0)
    return m


def bicubic_grid_matrices(grid_in: tuple[int, int], grid_out: tuple[int, int],
                          antialias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Matrices (out_h, in_h) and (out_w, in_w) resampling a grid's columns and rows: the resampling is
    separable, so their (out_h*out_w, in_h*in_w) Kronecker product never has to exist."""
    one = antialiased_bicubic_matrix if antialias else bicubic_matrix
    return one(grid_in[0], grid_out[0]).astype(np.float32), one(grid_in[1], grid_out[1]).astype(np.float32)
