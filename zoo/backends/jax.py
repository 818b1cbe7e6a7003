"""JAX: `jax.jit` steps over the weights' values, `device_put` of aligned host buffers, XLA:CPU's fast paths."""

import functools

import jax
import keras
import numpy as np
from keras import ops

from zoo.backends import _xla
from zoo.host import aligned_empty, host_dtype

COMPILER = "jax.jit"


@functools.cache
def device() -> str:
    return jax.default_backend()  # "cpu", "gpu" or "tpu"


# ----------------------------------------------------------------------------- kernels


def small_row_products() -> bool:
    return device() == "cpu"


def matmul_out_in(x, weight):
    return _xla.matmul_out_in(x, weight, small_rows=small_row_products())


def linear(x, weight, bias):
    return ops.add(matmul_out_in(x, weight), bias)  # XLA fuses the add into the product's output


def gelu(x):
    # The erf form, as PyTorch computes it. jax.nn.gelu's exact form goes through erfc, ~3x
    # slower on XLA:CPU (9.7 vs 3.2 ms on a ViT-B/16 MLP activation at batch 8).
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


# XLA:CPU runs the heads-first products with the softmax's division after them fastest (a ViT-B/16
# layer at batch 8: 17.5 ms against 41 ms for keras.ops.dot_product_attention); on a GPU or TPU,
# jax.nn.dot_product_attention picks the device's fused kernel (cuDNN's flash attention).
ATTENTION = {"cpu": {"plain": "heads_first", "masked": "reference"},
             "gpu": {"plain": "fused", "masked": "fused"},
             "tpu": {"plain": "fused", "masked": "fused"}}


def attention_kernels() -> dict:
    return {}


write_slices = _xla.write_slices


# ----------------------------------------------------------------------------- compiled steps


def compile_step(model, fn, cache_arg: int | None):
    """`jax.jit` over a stateless function of the weights' values (arguments, not constants baked
    into the program), the cache argument donated so that XLA updates it in place."""
    variables = list(model.variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    jitted = jax.jit(pure, donate_argnums=() if cache_arg is None else (cache_arg + 1,))
    return lambda *args: jitted([v.value for v in variables], *args)


def predict_path() -> str:
    return "keras (jax.jit)"


def make_predict_function(model, make):
    return make()


# ----------------------------------------------------------------------------- loading weights


def placeholder(shape, dtype, shared: dict | None = None):
    """Zeros that cost nothing: calloc'ed pages, never touched, adopted by XLA without a copy.

    JAX arrays are immutable and `assign` replaces them, so weights of one shape and dtype share
    one placeholder, kept in `shared` (one dict per model being built): the 1 GB ViT of
    benchmarks/load.py needs 12 `device_put` calls instead of 328. `jnp.zeros` would compile and
    run a fill per shape (1.2 s for a ViT) and write every page.
    """
    key = (tuple(shape), str(dtype))
    if shared is not None and key in shared:
        return shared[key]
    np_dtype = host_dtype(dtype)
    buffer = aligned_empty(int(np.prod(shape)) * np_dtype.itemsize, zeroed=True)
    value = jax.device_put(buffer.view(np_dtype).reshape(shape))
    if shared is not None:
        shared[key] = value
    return value


def set_value(variable, array: np.ndarray) -> None:
    """`device_put` moves ~1 GB/s on a CPU where Keras' own conversion (`jnp.asarray`) moves ~0.25 GB/s,
    and takes a 64-byte-aligned host buffer as the array itself."""
    variable.assign(jax.device_put(np.ascontiguousarray(array)))


read_mapped = None  # JAX copies tensors it cannot adopt: `zoo.checkpoint` reads into aligned buffers instead


def adopts_host_buffers() -> bool:
    return device() == "cpu"


def read_ahead_threads(bounded: bool) -> int:
    """A read into fresh pages mostly waits for the kernel to fault them in, so without a window
    JAX takes four readers: `from_preset` of the 1 GB ViT on 2 vCPUs, alternating fresh processes,
    0.91-1.04 s with four, 0.89-1.09 s with two, 1.17-1.71 s with one. Within a window the
    caller's copies set the pace and extra readers only take its CPU."""
    return 1 if bounded else 4
