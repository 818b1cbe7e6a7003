"""The few things that differ per Keras backend, each chosen once here.

Nothing else in keras-zoo names a backend.
"""

import contextlib
import functools

import keras
import numpy as np

NAME = keras.backend.backend()

# TensorFlow runs matmul on a (b, t, d) input as a broadcast batched product, ~30% slower than
# flattening to (b*t, d) first; PyTorch and XLA flatten internally, where the extra reshapes
# would only add per-op overhead.
PREFERS_2D_MATMUL = NAME == "tensorflow"


def _torch_no_grad():
    import torch

    return torch.no_grad()


_NO_GRAD = {"torch": _torch_no_grad}


def no_grad():
    """A context in which the backend records no gradients (PyTorch autograd), else a no-op."""
    return _NO_GRAD.get(NAME, contextlib.nullcontext)()


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


# ----------------------------------------------------------------------------- loading weights
# `placeholder` is what a skipped initialiser returns while a checkpoint is about to overwrite
# the weight; `to_tensor` hands a host array to the backend with the fewest copies. Keras' own
# conversion (`jnp.asarray`) moves ~0.25 GB/s on a CPU where `device_put` moves ~1 GB/s.


def _jax_placeholder(shape, dtype):
    # JAX arrays are immutable and `assign` replaces them, so weights of one shape can share one.
    return _shared_jax_zeros(tuple(shape), str(dtype))


@functools.cache
def _shared_jax_zeros(shape, dtype):
    import jax.numpy as jnp

    return jnp.zeros(shape, dtype)


def _torch_placeholder(shape, dtype):
    import torch

    # calloc'ed pages are not touched until the checkpoint's values are copied in.
    if dtype == "bfloat16":
        return torch.from_numpy(np.zeros(shape, np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.zeros(shape, dtype))


def _jax_to_tensor(array):
    import jax

    return jax.device_put(np.ascontiguousarray(array))


def _torch_to_tensor(array):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)  # shares memory, strides included; assign copies it in place


def _torch_adopt(variable, array):
    # The freshly read buffer becomes the parameter's storage: no copy into fresh pages.
    tensor = _torch_to_tensor(array)
    parameter = variable.value
    if tensor.is_contiguous() and tensor.dtype == parameter.dtype and tensor.shape == parameter.shape:
        parameter.data = tensor
    else:
        variable.assign(tensor)


def _assign(variable, array):
    variable.assign(to_tensor(array))


def _torch_read_mapped(path, names):
    """The tensors as NumPy views of the file mapping that torch keeps alive (no copy, no read).

    Adopted as parameter storage (`_torch_adopt`), a weight's pages are read from the page cache
    on first use and the file is never copied, as transformers does with safetensors.
    """
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in names:
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.bfloat16:
                import ml_dtypes

                yield tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                yield tensor.numpy()


_PLACEHOLDERS = {"jax": _jax_placeholder, "torch": _torch_placeholder}
_TO_TENSOR = {"jax": _jax_to_tensor, "torch": _torch_to_tensor}
def _tf_assign(variable, array):
    variable.value.assign(array)  # tf.Variable.assign converts the host array itself


_ADOPT = {"torch": _torch_adopt, "tensorflow": _tf_assign}
_READ_MAPPED = {"torch": _torch_read_mapped}


def placeholder(shape, dtype):
    """The cheapest tensor of this shape and dtype to stand in until a checkpoint value arrives."""
    make = _PLACEHOLDERS.get(NAME)
    return make(shape, dtype) if make else keras.ops.zeros(shape, dtype=dtype)


def to_tensor(array: np.ndarray):
    """A host array as a backend tensor, copying as little as the backend allows."""
    convert = _TO_TENSOR.get(NAME)
    return convert(array) if convert else keras.ops.convert_to_tensor(array)


def read_mapped(path, names):
    """Tensors of one safetensors file as arrays backed by its mapping, or None if the backend copies anyway."""
    read = _READ_MAPPED.get(NAME)
    return read(path, names) if read else None


def set_value(variable, array: np.ndarray) -> None:
    """Gives a weight the value of a host array that nothing else will use (it may become the storage)."""
    _ADOPT.get(NAME, _assign)(variable, array)
