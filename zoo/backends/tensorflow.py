"""TensorFlow: `tf.function(jit_compile=True)` steps, oneDNN's fused kernels on a CPU, aligned buffers adopted by DLPack."""

import functools

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from zoo.backends import _xla
from zoo.host import astype_aligned, is_aligned

COMPILER = "tf.function(jit_compile=True)"


@functools.cache
def device() -> str:
    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


# ----------------------------------------------------------------------------- kernels


def small_row_products() -> bool:
    return device() == "cpu"


def matmul_out_in(x, weight):
    return _xla.matmul_out_in(x, weight, small_rows=small_row_products())


def linear(x, weight, bias):
    # MatMul then BiasAdd (not AddV2): TensorFlow's oneDNN graph rewrite runs the pair, and an
    # exact GELU after it (`gelu` below), as one fused kernel instead of passes over the output.
    return tf.nn.bias_add(matmul_out_in(x, weight), bias)


def gelu(x):
    return tf.nn.gelu(x, approximate=False)  # the exact form oneDNN's rewrite fuses into MatMul + BiasAdd


# TensorFlow's own softmax is one kernel (a ViT-B/16 layer at batch 8: 41 ms against 53 ms for the
# unnormalised form JAX prefers). TensorFlow has no fused attention kernel, so a GPU takes the same
# paths (not measured: the GPU machine has no TensorFlow).
ATTENTION = {"cpu": {"plain": "heads_first_softmax", "masked": "reference"},
             "gpu": {"plain": "heads_first_softmax", "masked": "reference"}}


def fused(q, k, v, scale, mask=None):
    """`keras.ops.dot_product_attention`, which on TensorFlow (Keras 3.15) repeats the KV heads only when
    there are several, and TF's einsum does not broadcast a single one: it is repeated here."""
    if k.shape[2] == 1 and q.shape[2] > 1:
        k, v = (tf.repeat(x, q.shape[2], axis=2) for x in (k, v))
    return ops.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale)


def attention_kernels() -> dict:
    return {"fused": fused}


write_slices = _xla.write_slices


# ----------------------------------------------------------------------------- compiled steps


def compile_step(model, fn, cache_arg: int | None):
    """`tf.function(jit_compile=True)`, which reads the variables by reference."""
    return tf.function(fn, jit_compile=True, reduce_retracing=False)


def predict_path() -> str:
    return "keras, without XLA on a CPU unless compiled so" if device() == "cpu" else "keras"


def make_predict_function(model, make):
    """On a CPU, an uncompiled model's `predict` runs TensorFlow's own oneDNN kernels instead of
    Keras' default XLA: a ViT-B/16 forward pass ~12% faster (3.50 vs 3.13 img/s at batch 8,
    paired medians). `model.compile(jit_compile=...)` still sets whatever the user asks for."""
    if device() == "cpu" and not model.compiled:
        model.jit_compile = False
    return make()


# ----------------------------------------------------------------------------- loading weights


def placeholder(shape, dtype, shared: dict | None = None):
    # Uninitialised memory: a checkpoint value is about to overwrite every element. The shape as
    # an int32 array keeps the op on TF's fast path (a list costs ~3x as much).
    return tf.raw_ops.Empty(shape=np.asarray(shape, np.int32), dtype=tf.as_dtype(str(dtype)), init=False)


def set_value(variable, array: np.ndarray) -> None:
    """The fresh host buffer becomes the variable's storage where TensorFlow allows it.

    `tf.Variable.assign(ndarray)` copies three times (TF's defensive `ndarray.copy()`, the
    tensor, the variable: ~54 ms per 64 MiB here). A DLPack import shares the buffer, and the
    assignment takes over a sole-owner input instead of copying it. TF aborts the process on a
    tensor whose data is not 64-byte aligned: a transposed or misaligned array (a convolution
    kernel from PyTorch's layout) is copied once into an aligned buffer first. NumPy's DLPack has
    no bfloat16: those go through Keras' `assign`.
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
    """One reader: TensorFlow's variable creation competes with them for the CPU (`from_preset` of
    the 1 GB ViT on 2 vCPUs: 1.41-1.67 s with one reader, 1.72-2.02 s with two, 1.81-2.20 s with four)."""
    return 1
