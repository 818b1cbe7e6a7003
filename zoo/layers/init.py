"""Weight initialisers that can be skipped while a checkpoint is about to overwrite the weights.

Random initialisers on a 1 GB model cost seconds `from_preset` would throw away: inside
`skip_init()` every `Skippable` initialiser returns the backend's cheapest placeholder
(`zoo.backends.placeholder`), as transformers' `no_init_weights` does. The loader fills every
such weight, and weights a model creates fresh are initialised after loading.
"""

import contextlib
import contextvars

import keras

from zoo import backends

_SKIP = contextvars.ContextVar("zoo_skip_init", default=None)  # while skipping: the placeholders to share


@contextlib.contextmanager
def skip_init():
    """Within this block, `Skippable` initialisers return placeholders (see `backends.placeholder`), and variables
    are made as `backends.building` makes them."""
    token = _SKIP.set({})
    try:
        with backends.building():
            yield
    finally:
        _SKIP.reset(token)


@keras.saving.register_keras_serializable(package="zoo")
class Skippable(keras.initializers.Initializer):
    """Wraps an initialiser; yields a placeholder inside `skip_init()`."""

    def __init__(self, initializer="zeros"):
        # An instance as it is: `keras.initializers.get` would first ask TensorFlow whether it is a tensor (~13 us).
        is_instance = isinstance(initializer, keras.initializers.Initializer)
        self.initializer = initializer if is_instance else keras.initializers.get(initializer)

    def __call__(self, shape, dtype=None, layout=None):
        """`layout`: under a distribution, Keras asks for the value already split as the weight will be."""
        shared = _SKIP.get()
        if shared is not None:
            return backends.placeholder(shape, keras.backend.standardize_dtype(dtype), shared, layout)
        value = self.initializer(shape, dtype=dtype)
        return value if layout is None else backends.lay_out(value, layout)

    def get_config(self):
        return {"initializer": keras.initializers.serialize(self.initializer)}


def normal(stddev: float = 0.02) -> Skippable:
    return Skippable(keras.initializers.TruncatedNormal(stddev=stddev))


def zeros() -> Skippable:
    return Skippable(keras.initializers.Zeros())


def ones() -> Skippable:
    return Skippable(keras.initializers.Ones())


def constant(value: float) -> Skippable:
    return Skippable(keras.initializers.Constant(value))
