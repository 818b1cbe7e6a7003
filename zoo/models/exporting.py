"""`model.export(path, format)` on every backend: Keras' own exporter where it gives the model back
exactly (`zoo.backends.EXPORTS`), else the same model rebuilt on TensorFlow in a child process.

A model is its weights and config, so exporting through TensorFlow loses nothing: the model is
saved as a preset, loaded by a Python process running Keras on TensorFlow, and exported there
(a model with LoRA adapters merges one first: a preset holds one set of weights). Formats:

- `tf_saved_model`: TensorFlow's SavedModel (`tf.saved_model.load(path).serve(x)`), any backend.
- `onnx`: an ONNX graph (onnxruntime), any backend.
- `torch`: a `torch.export` program (`torch.export.load(path).module()(x)`), PyTorch only.

Why the detour: on JAX Keras exports through jax2tf, whose StableHLO the TensorFlow installed
beside it cannot read (jax 0.10 writes `vhlo.composite_v2`), and ONNX from JAX needs jax2tf too;
on PyTorch, torch.onnx's exporter fails on these models. TensorFlow's exporters take them as they are.
"""

import importlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from zoo import backends
from zoo.errors import ConfigError

log = logging.getLogger("zoo.export")
THROUGH_TENSORFLOW = ("tf_saved_model", "onnx")
NAMES = {"tf_saved_model": "a TensorFlow SavedModel", "onnx": "an ONNX model",
         "torch": "a torch.export program (.pt2), written on PyTorch only: KERAS_BACKEND=torch"}


def formats() -> tuple[str, ...]:
    """The formats `export` writes on this backend."""
    return tuple(dict.fromkeys([*backends.EXPORTS, *THROUGH_TENSORFLOW]))


def check(format: str) -> None:
    """Refuses a format this backend cannot write, before anything is traced, naming what works."""
    if format in formats():
        return
    what = f" ({NAMES[format]})" if format in NAMES else ""
    raise ConfigError(f"export format {format!r}{what}: on this backend keras-zoo writes "
                      f"{', '.join(repr(f) for f in formats())}; use one of those")


def export(model, filepath, format: str, verbose, input_signature, keras_export, **kwargs):
    """Writes `model` to `filepath` in `format`; `keras_export` is Keras' own `Model.export`. Quiet unless
    `verbose=True` (then Keras' own messages; Keras' default lists every captured weight), logged at INFO."""
    check(format)
    if format in backends.EXPORTS:
        with backends.exporting():
            keras_export(filepath, format=format, verbose=bool(verbose), input_signature=input_signature,
                         **{**backends.export_options(format), **kwargs})
        made = ""
    else:
        if input_signature is not None or kwargs:
            raise ConfigError(f"export {format!r} on this backend goes through TensorFlow with the model's own "
                              f"input signature; input_signature and {sorted(kwargs) or 'options'} are not passed on")
        through_tensorflow(model, filepath, format, bool(verbose))
        made = " (made on TensorFlow)"
    log.info("saved %s at %s%s", NAMES[format].split(",")[0], filepath, made)


def through_tensorflow(model, filepath, format: str, verbose: bool = False) -> None:
    if importlib.util.find_spec("tensorflow") is None:
        raise ConfigError(f"export {format!r} on this backend runs TensorFlow's exporter in a child process, and "
                          "TensorFlow is not installed: pip install tensorflow-cpu (scripts/setup.sh installs it)")
    if model.adapters:
        raise ConfigError(f"export {format!r} on this backend goes through a saved copy of the model, which holds "
                          f"one set of weights: merge_adapter() folds the adapter in first (the model has "
                          f"{model.adapters})")
    with tempfile.TemporaryDirectory(prefix="zoo-export-") as tmp:
        model.save_preset(tmp)
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
        cmd = [sys.executable, "-m", "zoo.models.exporting", tmp, str(Path(filepath).absolute()), format,
               type(model).__module__, type(model).__name__, "verbose" if verbose else ""]
        done = subprocess.run(cmd, env=env, stdout=None if verbose else subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)  # verbose: Keras' messages from over there, on this process' stdout
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"export {format!r} through TensorFlow failed: {last}")


def _main(folder: str, filepath: str, format: str, module: str, task: str, verbose: str) -> None:
    task = getattr(importlib.import_module(module), task)
    task.from_preset(folder).export(filepath, format=format, verbose=bool(verbose))


if __name__ == "__main__":
    _main(*sys.argv[1:7])
