"""Activation functions by the names checkpoints' `config.json` files use."""

from collections.abc import Callable

from keras import ops

from zoo import backends
from zoo.errors import ConfigError


def _quick_gelu(x):
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "gelu": backends.gelu,
    "gelu_new": lambda x: ops.gelu(x, approximate=True),
    "gelu_fast": lambda x: ops.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: ops.gelu(x, approximate=True),
    "gelu_python_tanh": lambda x: ops.gelu(x, approximate=True),
    "gelu_tanh": lambda x: ops.gelu(x, approximate=True),  # timm's name
    "quick_gelu": _quick_gelu,
    "relu": ops.relu,
    "silu": ops.silu,
    "swish": ops.silu,
    "tanh": ops.tanh,
}


def get(name: str, field: str = "hidden_act") -> Callable:
    """The activation called `name`, or a ConfigError naming the field and the known names."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"{field}: unsupported activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
