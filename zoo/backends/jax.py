"""JAX: `jax.jit` steps over the weights' values, `device_put` of aligned host buffers, XLA:CPU's fast paths."""

import contextlib
import functools

import jax
import keras
import numpy as np
from keras import ops

from zoo.backends import _xla
from zoo.host import aligned_empty, host_dtype

COMPILER = "jax.jit"
PREDICT = "Keras' (jax.jit)"
TRAIN_JIT_COMPILE = "auto"  # Keras' choice: XLA


@functools.cache
def device() -> str:
    return jax.default_backend()  # "cpu", "gpu" or "tpu"


# ----------------------------------------------------------------------------- kernels


def matmul_out_in(x, weight):
    return _xla.matmul_out_in(x, weight, small_rows=device() == "cpu")


def linear(x, weight, bias):
    return ops.add(matmul_out_in(x, weight), bias)  # XLA fuses the add into the product's output


def gelu(x):
    # The erf form, as PyTorch computes it: jax.nn.gelu's exact form goes through erfc, ~3x slower on XLA:CPU.
    return 0.5 * x * (1.0 + ops.erf(x * 0.7071067811865476))


# XLA:CPU runs heads-first products fastest (a ViT-B/16 layer at batch 8: 17.5 ms against 41 ms for
# keras.ops.dot_product_attention); on a GPU or TPU jax.nn.dot_product_attention takes the device's
# fused kernel (cuDNN's flash attention).
ATTENTION = {"cpu": {"plain": "heads_first", "masked": "reference"}, "gpu": {"plain": "fused", "masked": "fused"},
             "tpu": {"plain": "fused", "masked": "fused"}}
ATTENTION_KERNELS = {}
write_slices = _xla.write_slices


# ----------------------------------------------------------------------------- compiled steps


def compile_step(model, fn, cache_arg: int | None):
    """`jax.jit` over a stateless function of the weights' values (arguments, not constants baked into
    the program), the cache argument donated so that XLA updates it in place."""
    variables = list(model.variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    jitted = jax.jit(pure, donate_argnums=() if cache_arg is None else (cache_arg + 1,))
    return lambda *args: jitted([v.value for v in variables], *args)


def make_predict_function(model, make):
    return make()


# ----------------------------------------------------------------------------- export


# Keras' exporters on JAX go through jax2tf, whose StableHLO (jax 0.10: `vhlo.composite_v2` for erf) the
# installed TensorFlow cannot read back: `zoo.models.exporting` makes those formats on TensorFlow instead.
EXPORTS = ()  # Keras' exporters that give these models back exactly on this backend


def export_options(format: str) -> dict:
    return {}  # Keras' defaults: a batch of any size
exporting = contextlib.nullcontext


# ----------------------------------------------------------------------------- loading weights


def _zeros(shape, dtype, shared: dict | None):
    """calloc'ed pages, never touched: host zeros that cost nothing, one per shape and dtype in `shared`."""
    key = (tuple(shape), str(dtype))
    if shared is None or key not in shared:
        np_dtype = host_dtype(dtype)
        buffer = aligned_empty(int(np.prod(shape)) * np_dtype.itemsize, zeroed=True).view(np_dtype).reshape(shape)
        if shared is None:
            return buffer
        shared[key] = buffer
    return shared[key]


building = contextlib.nullcontext  # nothing to do while a checkpoint's model is built


def placeholder(shape, dtype, shared: dict | None = None, layout=None):
    """Zeros that cost nothing: calloc'ed pages adopted by XLA without a copy (`jnp.zeros` would compile and
    run a fill per shape). JAX arrays are immutable and `assign` replaces them, so the weights of one shape
    and dtype share one buffer (in `shared`, one dict per model being built). With a `layout` (Keras' sharding
    of the weight, under a distribution) each device adopts zeros of its shard's shape the same way (Keras'
    initialisation then copies them once: the loader frees each as its weight's shards arrive)."""
    if layout is None:
        if shared is None:
            return jax.device_put(_zeros(shape, dtype, None))
        key = ("device", tuple(shape), str(dtype))
        if key not in shared:
            shared[key] = jax.device_put(_zeros(shape, dtype, shared))
        return shared[key]
    sharding = jax.sharding.NamedSharding(jax.sharding.get_mesh(), layout.spec)
    shards = [jax.device_put(_zeros(tuple(len(range(*s.indices(n))) for s, n in zip(index, shape)), dtype, shared),
                             device) for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items()]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, shards)


def lay_out(value, layout):
    """A value made on one device, split as `layout` (Keras' sharding of a weight) says."""
    return jax.device_put(value, jax.sharding.NamedSharding(jax.sharding.get_mesh(), layout.spec))


def set_value(variable, array: np.ndarray) -> None:
    """`device_put` takes a 64-byte-aligned host buffer as the array itself (Keras' `jnp.asarray` copies)."""
    variable.assign(jax.device_put(np.ascontiguousarray(array)))


read_mapped = None  # `zoo.checkpoint` reads into aligned buffers, or maps aligned tensors itself


def adopts_host_buffers() -> bool:
    return device() == "cpu"


def read_ahead_threads(bounded: bool) -> int:
    # A read into fresh pages mostly waits for the kernel to fault them in: without a window four readers
    # help (the 1 GB ViT on 2 vCPUs: 0.91-1.04 s with four, 1.17-1.71 s with one); within one they only
    # take the caller's CPU.
    return 1 if bounded else 4


# ----------------------------------------------------------------------------- distribution

DISTRIBUTES = True  # Keras' distribution API (keras.distribution) runs on JAX


def set_sharded(variable, layout, read) -> None:
    """A weight's value made shard by shard: `read(index)` gives the part at `index` (a tuple of slices) as a
    fresh aligned host array, which the device adopts. The placeholder's shards are freed first, so the
    weight is never held twice (loading fails as a whole, so a weight is not left without a value)."""
    value = variable.value
    value.delete()
    variable.assign(jax.make_array_from_callback(tuple(variable.shape), layout.backend_layout, read))


# ----------------------------------------------------------------------------- weights added after build


def track_weights(layer, variables) -> None:
    """Nothing to do: the trainers read `layer.variables`, which lists weights added after build."""


def untrack_weights(layer, variables) -> None:
    """Nothing to do (see `track_weights`)."""
