"""Resampling matrices that reproduce PyTorch's `interpolate(mode="bicubic", align_corners=False)`.

Position embeddings are resampled to a new patch grid as a matrix product with a constant
matrix built here in NumPy, so the result is identical on every backend (the backends' own
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


def bicubic_grid_matrix(grid_in: tuple[int, int], grid_out: tuple[int, int]) -> np.ndarray:
    """Matrix (out_h*out_w, in_h*in_w) resampling a row-major flattened grid."""
    return np.kron(bicubic_matrix(grid_in[0], grid_out[0]), bicubic_matrix(grid_in[1], grid_out[1])).astype(np.float32)
