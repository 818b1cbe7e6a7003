"""Pick a Keras backend that is installed, before Keras is first imported.

Keras falls back to TensorFlow when neither `KERAS_BACKEND` nor `~/.keras/keras.json`
names a backend, and keras-zoo does not depend on TensorFlow: a user who installed
`keras-zoo[jax]` would otherwise get an ImportError on `import zoo`. When the user has
chosen nothing, or chose a backend that is not installed, we choose the first installed
of JAX, PyTorch and TensorFlow. An explicit, installed choice is always kept.
"""

import importlib.util
import json
import os
import sys

_MODULES = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow", "numpy": "numpy"}
_PREFERENCE = ("jax", "torch", "tensorflow")


def _configured_backend() -> str | None:
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(keras_home, "keras.json")) as f:
            return json.load(f).get("backend")
    except (OSError, ValueError):
        return None


def _installed(backend: str) -> bool:
    module = _MODULES.get(backend)
    return module is not None and importlib.util.find_spec(module) is not None


def choose() -> None:
    """Sets `KERAS_BACKEND` to an installed backend unless Keras is already imported."""
    if "keras" in sys.modules:
        return
    configured = _configured_backend()
    if configured and _installed(configured):
        return
    for backend in _PREFERENCE:
        if _installed(backend):
            os.environ["KERAS_BACKEND"] = backend
            return
