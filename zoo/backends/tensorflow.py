"""TensorFlow: `tf.function(jit_compile=True)` steps, oneDNN's fused kernels on a CPU, aligned buffers adopted by DLPack."""

import contextlib
import functools
import logging

import numpy as np
import tensorflow as tf
from keras import ops

from zoo.backends import _xla
from zoo.host import astype_aligned, is_aligned

COMPILER = "tf.function(jit_compile=True)"
PREDICT = "Keras' (TensorFlow's own kernels, not XLA, on a CPU unless compiled with jit_compile)"
# Keras turns XLA off for TensorFlow on a machine without GPU; for these models' training steps XLA:CPU
# is ~25% faster (benchmarks/RESULTS.md, LoRA training), so `compile` asks for it on every device.
TRAIN_JIT_COMPILE = True


@functools.cache
def device() -> str:
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


# ----------------------------------------------------------------------------- kernels


def matmul_out_in(x, weight):
    return _xla.matmul_out_in(x, weight, small_rows=device() == "cpu")


def linear(x, weight, bias):
    # MatMul then BiasAdd (not AddV2): TensorFlow's oneDNN graph rewrite runs the pair, and an
    # exact GELU after it (`gelu` below), as one fused kernel instead of passes over the output.
    return tf.nn.bias_add(matmul_out_in(x, weight), bias)


def gelu(x):
    if _portable:  # ONNX has Erf but not the Erfc that tf.nn.gelu's exact form is written with
        return 0.5 * x * (1.0 + tf.math.erf(x * 0.7071067811865476))
    return tf.nn.gelu(x, approximate=False)  # the exact form oneDNN's rewrite fuses into MatMul + BiasAdd


_portable = False


@contextlib.contextmanager
def exporting():
    """Within this block kernels take forms every exporter converts (see `gelu`)."""
    global _portable
    previous, _portable = _portable, True
    try:
        yield
    finally:
        _portable = previous


EXPORTS = ("tf_saved_model", "onnx")  # Keras' exporters that give these models back exactly on this backend


def export_options(format: str) -> dict:
    return {}  # Keras' defaults: a batch of any size


# TensorFlow's own softmax is one kernel (a ViT-B/16 layer at batch 8: 41 ms against 53 ms for the
# unnormalised form JAX prefers). With no fused attention kernel, a GPU takes the same paths.
ATTENTION = {device: {"plain": "heads_first_softmax", "masked": "reference"} for device in ("cpu", "gpu")}


def fused(q, k, v, scale, mask=None):
    """`keras.ops.dot_product_attention`, which on TensorFlow (Keras 3.15) repeats the KV heads only when
    there are several, and TF's einsum does not broadcast a single one: it is repeated here."""
    if k.shape[2] == 1 and q.shape[2] > 1:
        k, v = (tf.repeat(x, q.shape[2], axis=2) for x in (k, v))
    return ops.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale)


ATTENTION_KERNELS = {"fused": fused}
write_slices = _xla.write_slices


# ----------------------------------------------------------------------------- compiled steps


class _StepRetracing(logging.Filter):
    """Drops TensorFlow's retracing warning about keras-zoo's compiled steps, which trace once per shape bucket
    by design (an engine warms up dozens); the warning stays for every other function."""

    names: set = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        return "triggered tf.function retracing" not in message or not any(n in message for n in self.names)


_RETRACING = _StepRetracing()
tf.get_logger().addFilter(_RETRACING)


def compile_step(model, fn, cache_arg: int | None):
    """`tf.function(jit_compile=True)`, which reads the variables by reference."""
    _RETRACING.names.add(f"{getattr(fn, '__qualname__', fn)} ")  # as the warning names it: "<function name at"
    return tf.function(fn, jit_compile=True, reduce_retracing=False)


def make_predict_function(model, make):
    """On a CPU an uncompiled model's `predict` runs TensorFlow's own oneDNN kernels rather than XLA
    (a ViT-B/16 forward pass ~12% faster); `model.compile(jit_compile=...)` sets what the user asks for."""
    if device() == "cpu" and not model.compiled:
        model.jit_compile = False
    return make()


# ----------------------------------------------------------------------------- loading weights


@contextlib.contextmanager
def building():
    """While a checkpoint's model is built: each weight's TensorFlow variable is named by its leaf ("kernel"),
    outside the name scope Keras opens per layer. Eager TensorFlow builds a `VarHandleOp` kernel per distinct
    variable name (~0.4 ms each: 0.13 s for the 328 weights of a ViT-B/16), so leaf names share a few. Keras'
    own names and paths (`variable.path`, what keras-zoo reads and saves by) are not changed."""

    def leaf_named(next_creator, **kwargs):
        with tf.name_scope(""):
            return next_creator(**kwargs)

    with tf.variable_creator_scope(leaf_named):
        yield


def placeholder(shape, dtype, shared: dict | None = None, layout=None):  # (no layouts here)
    # Uninitialised memory the checkpoint's value replaces; the shape as an int32 array keeps the op
    # on TF's fast path (a list costs ~3x as much).
    return tf.raw_ops.Empty(shape=np.asarray(shape, np.int32), dtype=tf.as_dtype(str(dtype)), init=False)


def set_value(variable, array: np.ndarray) -> None:
    """The fresh host buffer becomes the variable's storage where TensorFlow allows it.

    `assign(ndarray)` copies three times (~54 ms per 64 MiB here); a DLPack import shares the
    buffer, and the assignment takes over a sole-owner input. TF aborts on data that is not 64-byte
    aligned, so a transposed or misaligned array is copied into an aligned buffer first. NumPy's
    DLPack has no bfloat16: those are assigned as they are.
    """
    value = variable.value
    if (array.size and array.dtype.name != "bfloat16" and array.dtype.name == value.dtype.name
            and tuple(array.shape) == tuple(value.shape) and value.device.endswith("CPU:0")):
        if not is_aligned(array):
            array = astype_aligned(array, array.dtype)
        value.assign(tf.experimental.dlpack.from_dlpack(array.__dlpack__()), read_value=False)
    else:
        value.assign(array)  # tf.Variable.assign converts the host array itself


read_mapped = None  # tensors are views of the file or aligned buffers (`zoo.checkpoint`), adopted by set_value


def adopts_host_buffers() -> bool:
    return device() == "cpu"


def read_ahead_threads(bounded: bool) -> int:
    return 1  # TensorFlow's variable creation competes with more readers for the CPU



# ----------------------------------------------------------------------------- distribution

DISTRIBUTES = False  # keras.distribution's layouts run on JAX only in Keras 3.15 (TensorFlow's is a prototype)
set_sharded = lay_out = None

# ----------------------------------------------------------------------------- weights added after build


def track_weights(layer, variables) -> None:
    """Nothing to do: the trainers read `layer.variables`, which lists weights added after build."""


def untrack_weights(layer, variables) -> None:
    """Nothing to do (see `track_weights`)."""
