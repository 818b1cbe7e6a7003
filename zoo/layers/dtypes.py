"""A cast that costs nothing when the dtype already matches."""

import keras
from keras import ops


def cast(x, dtype: str):
    """`ops.cast`, skipped when x already has `dtype` (a traced PyTorch graph would keep a no-op `to`)."""
    current = x.dtype if isinstance(x, keras.Variable) else keras.backend.standardize_dtype(x.dtype)
    return x if current == keras.backend.standardize_dtype(dtype) else ops.cast(x, dtype)
