"""The fence: everything that differs per Keras backend, chosen once, here.

`jax.py`, `torch.py` and `tensorflow.py` implement the same small set of names, and this module
imports the one Keras runs on. Nothing else in keras-zoo imports a framework or asks which
backend runs; the rest of the package is `keras.ops`. Each backend module provides:

- `device()`: where Keras puts new tensors ("cpu", "gpu", ...).
- Kernels, the fastest exact form of an operation on this backend and device: `linear(x, weight,
  bias)` (x (m, d) @ weight (f, d).T + bias), `matmul_out_in(x, weight)` (the same without a
  bias), `gelu(x)` (exact); `ATTENTION`, the attention kernel by device for calls without and with
  a mask (names of `zoo.layers.attention`), and `ATTENTION_KERNELS`, the ones it implements itself.
- `write_slices(cache, rows, starts, updates)`: KV-cache rows written at their positions.
- `compile_step(model, fn, cache_arg)`: `fn(*args) -> (outputs, cache)`, which reads the model's
  weights, compiled (`COMPILER`), the cache updated in place where the backend can. A compiled
  step keeps the weights it was made with: make it again when `weights_signature` changes.
- `make_predict_function(model, make)`: Keras' predict function (`make()` builds it) or a faster one.
- Loading: `building()`, a context the model is built in before its checkpoint is read (a cheaper way to
  make variables, where the backend has one), `placeholder(shape, dtype, shared, layout=None)` (a skipped
  initialiser's value, which the checkpoint's replaces), `set_value(variable, array)` (a fresh host array becomes the weight, without a copy
  where the backend allows), `read_mapped(path, names)` (tensors as views of the file's mapping)
  or None, `adopts_host_buffers()` and `read_ahead_threads(bounded)`.
- `track_weights(layer, variables)`, `untrack_weights(layer, variables)`: weights added to a built
  layer (LoRA adapters) or removed from it, made known to the framework's own module where it keeps one.
- Distribution: `DISTRIBUTES`, whether Keras' distribution API runs on this backend;
  `set_sharded(variable, layout, read)`, a weight made shard by shard from `read(index)`, and
  `lay_out(value, layout)`, a value split as a weight's layout says (None where it does not run);
  `placeholder(..., layout)` gives each device zeros of its shard's shape.
- Export: `EXPORTS`, the formats of Keras' `export` that give these models back exactly on this
  backend (`zoo.models.exporting` makes the others it can on TensorFlow), `exporting()`, a
  context within which kernels take forms every exporter converts, and `export_options(format)`,
  the exporter's options for a batch of any size.
"""

import contextlib
import importlib

import keras

from zoo.errors import BackendError, DistributionError

NAME = keras.backend.backend()
_MODULES = {"jax": "zoo.backends.jax", "torch": "zoo.backends.torch", "tensorflow": "zoo.backends.tensorflow"}
if NAME not in _MODULES:
    raise BackendError(f"Keras runs on {NAME!r}; keras-zoo runs on {', '.join(_MODULES)}")
_current = importlib.import_module(_MODULES[NAME])

device, linear, matmul_out_in, gelu = _current.device, _current.linear, _current.matmul_out_in, _current.gelu
write_slices, compile_step, make_predict_function = (_current.write_slices, _current.compile_step,
                                                      _current.make_predict_function)
placeholder, set_value, read_mapped = _current.placeholder, _current.set_value, _current.read_mapped
building = _current.building
adopts_host_buffers, read_ahead_threads = _current.adopts_host_buffers, _current.read_ahead_threads
ATTENTION_KERNELS = _current.ATTENTION_KERNELS
EXPORTS, exporting, export_options = _current.EXPORTS, _current.exporting, _current.export_options
track_weights, untrack_weights = _current.track_weights, _current.untrack_weights
DISTRIBUTES, set_sharded, lay_out = _current.DISTRIBUTES, _current.set_sharded, _current.lay_out
TRAIN_JIT_COMPILE = _current.TRAIN_JIT_COMPILE  # what `compile(jit_compile="auto")` means for keras-zoo's models
_forced: str | None = None  # use_attention's kernel


def attention_kernel(masked: bool) -> str:
    """The attention kernel for this backend and device, for calls with or without a mask."""
    return _current.ATTENTION[device()]["masked" if masked else "plain"]


def forced_attention() -> str | None:
    return _forced


@contextlib.contextmanager
def use_attention(name: str | None):
    """Within this block, every attention call the kernel `name` (of `zoo.layers.attention.KERNELS`) can run
    takes it: for debugging and the parity tests. Calls it cannot run (a mask, soft-capping) keep their
    kernel; compiled steps keep the kernel they were compiled with."""
    global _forced
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def check_distributes() -> None:
    """A `DistributionError` where Keras' distribution API does not run on this backend."""
    if not DISTRIBUTES:
        raise DistributionError(f"keras.distribution runs on the JAX backend in Keras {keras.__version__}; this "
                                f"process runs {NAME!r} (set KERAS_BACKEND=jax), so nothing would be split")


def weights_signature(model) -> tuple:
    """Changes when the model's set of weights does (`enable_lora` adds adapters)."""
    return tuple(id(v) for v in model.variables)


def describe() -> dict:
    """What runs where: the backend, its device, and the paths chosen for them.

    Example:
        >>> zoo.backends.describe()["attention"]  # doctest: +SKIP
        {'plain': 'heads_first', 'masked': 'reference', 'softcapped': 'reference', 'forced': None}
    """
    return {"backend": NAME, "device": device(), "compile_step": _current.COMPILER, "predict": _current.PREDICT,
            "train_jit_compile": TRAIN_JIT_COMPILE,
            "attention": {"plain": attention_kernel(False), "masked": attention_kernel(True),
                          "softcapped": "reference", "forced": _forced},
            "checkpoint_reads": "views of the file's mapping" if read_mapped else "aligned host buffers"}
