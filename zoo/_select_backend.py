"""Pick the Keras backend once, before Keras is first imported, by one documented rule:

1. `KERAS_BACKEND`, if set;
2. else the backend in the user's own Keras config (`~/.keras/keras.json`, or `$KERAS_HOME`), if installed;
3. else keras-zoo's default: the first installed of JAX, PyTorch and TensorFlow.

The same install gives the same backend on every run. Keras writes its own defaults to keras.json
on its first import when the file is missing ("tensorflow", whatever backend that run used): such
a file is no one's choice, and rule 2 ignores it, or the second run would differ from the first.
"""

import importlib.util
import json
import os
import sys

_MODULES = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow", "numpy": "numpy"}
_PREFERENCE = ("jax", "torch", "tensorflow")


# keras.json exactly as Keras writes it when it finds none.
_KERAS_WRITTEN = {"floatx": "float32", "epsilon": 1e-07, "backend": "tensorflow", "image_data_format": "channels_last"}


def _configured_backend() -> str | None:
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    keras_home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    try:
        with open(os.path.join(keras_home, "keras.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config == _KERAS_WRITTEN:
        return None
    return config.get("backend")


def _installed(backend: str) -> bool:
    module = _MODULES.get(backend)
    return module is not None and importlib.util.find_spec(module) is not None


def choose() -> None:
    """Sets `KERAS_BACKEND` by the rule above, unless Keras is already imported (then Keras has chosen)."""
    if "keras" in sys.modules:
        return
    configured = _configured_backend()
    if configured and _installed(configured):
        os.environ["KERAS_BACKEND"] = configured  # so Keras reads the same, not its own written default
        return
    for backend in _PREFERENCE:
        if _installed(backend):
            os.environ["KERAS_BACKEND"] = backend
            return
