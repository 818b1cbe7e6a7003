"""The fence: everything that differs per Keras backend, chosen once, here.

`jax.py`, `torch.py` and `tensorflow.py` each implement the same small set of functions, and
this module imports the one Keras runs on. Nothing else in keras-zoo imports a framework or asks
which backend is in use; the rest of the package is `keras.ops`.

Each backend module provides:

- `device() -> str`: where Keras puts new tensors ("cpu", "gpu", ...).
- Kernels, the fastest exact form of an operation on this backend and device: `linear(x, weight,
  bias)` (x (m, d) @ weight (f, d).T + bias), `matmul_out_in(x, weight)` (the same without a
  bias), `gelu(x)` (exact, erf); `ATTENTION`, the attention kernel per device for calls without
  and with a mask ({device: {"plain": name, "masked": name}}, names of `zoo.layers.attention`),
  and `attention_kernels()`, the kernels it implements itself (PyTorch's SDPA).
- `write_slices(cache, rows, starts, updates)`: KV-cache rows written at their positions.
- `compile_step(model, fn, cache_arg)`: `fn(*args) -> (outputs, cache)`, a function that reads
  the model's weights, compiled (`COMPILER`: `jax.jit`, `tf.function(jit_compile=True)`, a
  TorchScript trace), the cache argument updated in place where the backend can. A compiled step
  keeps the set of weights it was made with: make it again when `weights_signature` changes.
- `make_predict_function(model, make)`: Keras' predict function (`make()` builds Keras' own), or
  one that runs faster on this backend and device.
- Loading: `placeholder(shape, dtype, shared)` (what a skipped initialiser returns while a
  checkpoint is about to fill the weight), `set_value(variable, array)` (a fresh host array
  becomes the weight, without a copy where the backend allows), `read_mapped(path, names)`
  (tensors as views of the file's mapping) or None, `adopts_host_buffers()` and
  `read_ahead_threads(bounded)`.

`describe()` says what was chosen; `use_attention(name)` overrides the attention kernel (debugging).
"""

import contextlib
import importlib

import keras

from zoo.errors import BackendError

NAME = keras.backend.backend()
_MODULES = {"jax": "zoo.backends.jax", "torch": "zoo.backends.torch", "tensorflow": "zoo.backends.tensorflow"}
if NAME not in _MODULES:
    raise BackendError(f"Keras runs on {NAME!r}; keras-zoo runs on {', '.join(_MODULES)}")
_current = importlib.import_module(_MODULES[NAME])

device = _current.device
linear, matmul_out_in, gelu = _current.linear, _current.matmul_out_in, _current.gelu
attention_kernels, write_slices = _current.attention_kernels, _current.write_slices
compile_step, make_predict_function = _current.compile_step, _current.make_predict_function
placeholder, set_value, read_mapped = _current.placeholder, _current.set_value, _current.read_mapped
adopts_host_buffers, read_ahead_threads = _current.adopts_host_buffers, _current.read_ahead_threads

ATTENTION_KERNELS = ("reference", "heads_first", "heads_first_softmax", "fused", "sdpa")  # zoo.layers.attention
_forced: list[str | None] = [None]


def attention_kernel(masked: bool) -> str:
    """The attention kernel chosen for this backend and device, for calls with or without a mask."""
    return _current.ATTENTION[device()]["masked" if masked else "plain"]


def forced_attention() -> str | None:
    return _forced[0]


@contextlib.contextmanager
def use_attention(name: str | None):
    """Within this block, every attention call the kernel `name` can run takes it (None: the usual choice).

    For debugging and the parity tests. Calls the kernel cannot run (a mask, soft-capping) keep
    their usual kernel; steps compiled inside the block keep the kernel they were compiled with.
    """
    if name is not None and name not in ATTENTION_KERNELS:
        raise BackendError(f"unknown attention kernel {name!r}; expected one of {ATTENTION_KERNELS}")
    previous, _forced[0] = _forced[0], name
    try:
        yield
    finally:
        _forced[0] = previous


def weights_signature(model) -> tuple:
    """Changes when the model's set of weights does (`enable_lora` adds adapters)."""
    return tuple(id(v) for v in model.variables)


def describe() -> dict:
    """What runs where: the backend, its device, and the paths chosen for them.

    Example:
        >>> zoo.backends.describe()["attention"]  # doctest: +SKIP
        {'plain': 'heads_first', 'masked': 'reference', 'softcapped': 'reference', 'forced': None}
    """
    return {
        "backend": NAME,
        "device": device(),
        "compile_step": _current.COMPILER,
        "predict": _current.predict_path(),
        "attention": {"plain": attention_kernel(False), "masked": attention_kernel(True), "softcapped": "reference",
                      "forced": _forced[0]},
        "small_row_products": _current.small_row_products(),
        "checkpoint_reads": "views of the file's mapping" if read_mapped else "aligned host buffers",
    }
