"""The few things that differ per Keras backend, each chosen once here.

Nothing else in keras-zoo names a backend.
"""

import contextlib

import keras
import numpy as np

NAME = keras.backend.backend()


def _torch_no_grad():
    import torch

    return torch.no_grad()


_NO_GRAD = {"torch": _torch_no_grad}


def no_grad():
    """A context in which the backend records no gradients (PyTorch autograd), else a no-op."""
    return _NO_GRAD.get(NAME, contextlib.nullcontext)()


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))
