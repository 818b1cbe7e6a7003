"""Casts that cost nothing when the dtype already matches, and Keras dtypes on the host."""

import keras
import numpy as np
from keras import ops


def cast(x, dtype: str):
    """`ops.cast`, skipped when x already has `dtype` (a traced PyTorch graph would keep a no-op `to`)."""
    current = x.dtype if isinstance(x, keras.Variable) else keras.backend.standardize_dtype(x.dtype)
    return x if current == keras.backend.standardize_dtype(dtype) else ops.cast(x, dtype)


def host_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a Keras dtype name (bfloat16 through ml_dtypes)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
