"""The few things that differ per Keras backend, each chosen once here.

Nothing else in keras-zoo names a backend.
"""

import contextlib
import functools
import threading
import warnings

import keras
import numpy as np

NAME = keras.backend.backend()
XLA = NAME in ("jax", "tensorflow")  # backends whose compiled steps XLA lowers



def _torch_no_grad():
    import torch

    return torch.no_grad()


_NO_GRAD = {"torch": _torch_no_grad}


def no_grad():
    """A context in which the backend records no gradients (PyTorch autograd), else a no-op."""
    return _NO_GRAD.get(NAME, contextlib.nullcontext)()


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


# ----------------------------------------------------------------------------- dense layers


def _torch_linear(x, weight, bias, matmul_out_in):
    import torch

    # One addmm, as transformers' nn.Linear: the bias rides in the GEMM instead of a separate
    # add over the whole output (~0.25 s of a 2.4 s ViT-B/16 forward pass at batch 8 on 2 cores).
    x, weight, bias = (keras.ops.convert_to_tensor(t) for t in (x, weight, bias))
    return torch.nn.functional.linear(x, weight, bias)


def _linear(x, weight, bias, matmul_out_in):
    return keras.ops.add(matmul_out_in(x, weight), bias)  # XLA fuses the add into the product's output


def _tf_linear(x, weight, bias, matmul_out_in):
    import tensorflow as tf

    # MatMul then BiasAdd (not AddV2): TensorFlow's oneDNN graph rewrite runs the pair, and an
    # exact GELU after it (`gelu` below), as one fused kernel instead of passes over the output.
    return tf.nn.bias_add(matmul_out_in(x, weight), bias)


_LINEAR = {"torch": _torch_linear, "tensorflow": _tf_linear}


def linear(x, weight, bias, matmul_out_in):
    """x (m, d) @ weight (f, d).T + bias (f,): `matmul_out_in` for the product where nothing better fuses the bias."""
    return _LINEAR.get(NAME, _linear)(x, weight, bias, matmul_out_in)


def _torch_attention(q, k, v, scale):
    import torch

    # Keras' torch dot_product_attention copies q, k and v into contiguous (b, n, t, h) buffers
    # before SDPA on a CPU; SDPA reads the transposed views as they are (as transformers calls it).
    q, k, v = (keras.ops.convert_to_tensor(t).transpose(1, 2) for t in (q, k, v))  # (b, n, t, h)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def _heads_first_scores(q, k, v, scale):
    """(b, t, n, h) inputs -> scaled scores (b, n, t, s) and v as (b, n, s, h): plain batched products."""
    ops = keras.ops
    q, k, v = (ops.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
    return ops.matmul(q * ops.cast(scale, q.dtype), ops.transpose(k, (0, 1, 3, 2))), v


def _attention(q, k, v, scale):
    # Heads first, plain batched products, and the softmax's division after the product with v
    # (on t x h values instead of t x s). XLA:CPU runs a ViT-B/16 layer's attention (batch 8) in
    # 17.5 ms this way against 41 ms for keras.ops.dot_product_attention (jax.nn's einsums).
    ops = keras.ops
    scores, v = _heads_first_scores(q, k, v, scale)
    weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))  # unnormalised softmax
    out = ops.matmul(weights, v) / ops.sum(weights, axis=-1, keepdims=True)  # (b, n, t, h)
    return ops.transpose(out, (0, 2, 1, 3))  # (b, t, n, h)


def _tf_attention(q, k, v, scale):
    # TensorFlow's own softmax is one kernel; the unnormalised form above costs it four passes
    # over the scores (ViT-B/16 layer at batch 8: 41 vs 53 ms).
    ops = keras.ops
    scores, v = _heads_first_scores(q, k, v, scale)
    return ops.transpose(ops.matmul(ops.softmax(scores, axis=-1), v), (0, 2, 1, 3))  # (b, t, n, h)


_ATTENTION = {"torch": _torch_attention, "tensorflow": _tf_attention}


def attention(q, k, v, scale: float):
    """Unmasked attention over (b, t, n, h) queries and (b, s, n, h) keys and values -> (b, t, n, h)."""
    return _ATTENTION.get(NAME, _attention)(q, k, v, scale)


def _gelu(x):
    # The erf form, as PyTorch computes it. jax.nn.gelu's exact form goes through erfc, ~3x
    # slower on XLA:CPU (9.7 vs 3.2 ms on a ViT-B/16 MLP activation at batch 8).
    return 0.5 * x * (1.0 + keras.ops.erf(x * 0.7071067811865476))


def _tf_gelu(x):
    import tensorflow as tf

    # The exact form tf.nn.gelu writes is the one oneDNN's rewrite fuses into a MatMul + BiasAdd.
    return tf.nn.gelu(x, approximate=False)


_GELU = {"torch": lambda x: keras.ops.gelu(x, approximate=False), "tensorflow": _tf_gelu}  # one fused kernel each


def gelu(x):
    """Exact (erf) GELU."""
    return _GELU.get(NAME, _gelu)(x)


# ----------------------------------------------------------------------------- Keras' predict


def set_predict_compiler(model) -> None:
    """Picks how an uncompiled model's `predict` runs where Keras' "auto" is not the fastest.

    On TensorFlow, "auto" means XLA; on a CPU, TensorFlow's own oneDNN kernels run a ViT-B/16
    forward pass ~12% faster (3.50 vs 3.13 img/s at batch 8, paired medians). `model.compile()`
    still sets whatever the user asks for.
    """
    if NAME == "tensorflow" and not _tf_has_gpu():
        model.jit_compile = False


@functools.cache
def _tf_has_gpu() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


# ----------------------------------------------------------------------------- loading weights
# `placeholder` is what a skipped initialiser returns while a checkpoint is about to overwrite
# the weight; `to_tensor` hands a host array to the backend with the fewest copies. Keras' own
# conversion (`jnp.asarray`) moves ~0.25 GB/s on a CPU where `device_put` moves ~1 GB/s.


def _jax_placeholder(shape, dtype):
    # Zeros that cost nothing: calloc'ed pages, never touched, adopted by XLA without a copy
    # (JAX arrays are immutable and `assign` replaces them). `jnp.zeros` would compile and run
    # a fill per shape (1.2 s for a ViT) and write every page.
    import jax

    from zoo.layers.dtypes import host_dtype
    from zoo.safetensors_file import aligned_empty

    np_dtype = host_dtype(str(dtype))
    buffer = aligned_empty(int(np.prod(shape)) * np_dtype.itemsize, zeroed=True)
    return jax.device_put(buffer.view(np_dtype).reshape(shape))


def _torch_placeholder(shape, dtype):
    import torch

    # calloc'ed pages are not touched until the checkpoint's values are copied in.
    if dtype == "bfloat16":
        return torch.from_numpy(np.zeros(shape, np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.zeros(shape, dtype))


def _jax_to_tensor(array):
    import jax

    return jax.device_put(np.ascontiguousarray(array))


def _torch_to_tensor(array):
    import torch

    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)  # shares memory, strides included; assign copies it in place


def _torch_adopt(variable, array):
    # The freshly read buffer becomes the parameter's storage: no copy into fresh pages.
    tensor = _torch_to_tensor(array)
    parameter = variable.value
    if tensor.is_contiguous() and tensor.dtype == parameter.dtype and tensor.shape == parameter.shape:
        parameter.data = tensor
    else:
        variable.assign(tensor)


def _assign(variable, array):
    variable.assign(to_tensor(array))


def _torch_read_mapped(path, names):
    """The tensors as NumPy views of the file mapping that torch keeps alive (no copy, no read).

    Adopted as parameter storage (`_torch_adopt`), a weight's pages are read from the page cache
    on first use and the file is never copied, as transformers does with safetensors.
    """
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in names:
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.bfloat16:
                import ml_dtypes

                yield tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                yield tensor.numpy()


def _tf_placeholder(shape, dtype):
    import tensorflow as tf

    # Uninitialised memory: a checkpoint value is about to overwrite every element. The shape as
    # an int32 array keeps the op on TF's fast path (a list costs ~3x as much: 57-79 vs 19-24 ms
    # for the 328 weights of benchmarks/load.py's ViT).
    return tf.raw_ops.Empty(shape=np.asarray(shape, np.int32), dtype=tf.as_dtype(str(dtype)), init=False)


def _tf_adopt(variable, array):
    """The fresh host buffer becomes the variable's storage where TensorFlow allows it.

    `tf.Variable.assign(ndarray)` copies three times (TF's defensive `ndarray.copy()`, the
    tensor, the variable: ~54 ms per 64 MiB here). A DLPack import shares the buffer, and
    `AssignVariableOp` takes over a sole-owner input instead of copying it (~0.2 ms), run as the
    raw op: the checks `assign` makes are made here, and its Python took 22-37 us a variable
    against 11-14 (0.1 ms with the read of the new value it returns by default). TF
    aborts the process on a tensor whose data is not 64-byte aligned: a transposed or misaligned
    array (a convolution kernel from PyTorch's layout) is copied once into an aligned buffer
    first. NumPy's DLPack has no bfloat16: those go through `assign`.
    """
    import tensorflow as tf

    from zoo.safetensors_file import ALIGNMENT, astype_aligned

    value = variable.value
    if (array.size and array.dtype.name != "bfloat16" and array.dtype.name == value.dtype.name
            and tuple(array.shape) == tuple(value.shape) and value.device.endswith("CPU:0")):
        if not (array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0):
            array = astype_aligned(array, array.dtype)
        tf.raw_ops.AssignVariableOp(resource=value.handle, value=tf.experimental.dlpack.from_dlpack(array.__dlpack__()))
    else:
        value.assign(array)  # tf.Variable.assign converts the host array itself


_PLACEHOLDERS = {"jax": _jax_placeholder, "torch": _torch_placeholder, "tensorflow": _tf_placeholder}
_TO_TENSOR = {"jax": _jax_to_tensor, "torch": _torch_to_tensor}
_ADOPT = {"torch": _torch_adopt, "tensorflow": _tf_adopt}
_READ_MAPPED = {"torch": _torch_read_mapped}


def placeholder(shape, dtype, shared: dict | None = None):
    """The cheapest tensor of this shape and dtype to stand in until a checkpoint value arrives.

    JAX arrays are immutable and `assign` replaces them, so there weights of one shape and dtype
    share one placeholder, kept in `shared` (one dict per model being built): the 1 GB ViT of
    benchmarks/load.py needs 12 `device_put` calls instead of 328. The other backends write
    into a variable's storage in place, so each weight gets its own.
    """
    if NAME == "jax" and shared is not None:
        key = (tuple(shape), str(dtype))
        if key not in shared:
            shared[key] = _jax_placeholder(shape, dtype)
        return shared[key]
    if NAME == "tensorflow" and getattr(_TF_LOADING, "active", False):
        return _Unset(shape, dtype)  # the variable starts uninitialised (see loading_variables)
    make = _PLACEHOLDERS.get(NAME)
    return make(shape, dtype) if make else keras.ops.zeros(shape, dtype=dtype)


class _Unset:
    """What a placeholder is inside `loading_variables()` on TensorFlow: the variable starts uninitialised."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


_TF_LOADING = threading.local()  # .active: inside loading_variables()'s variable creator


def _tf_unset_variable(unset: _Unset, kwargs: dict):
    """An uninitialised variable of `unset`'s shape, whose handle eager TF makes with one kernel for all shapes.

    Eager TensorFlow instantiates a kernel the first time an op runs with a new set of
    attributes and resource shapes: a `VarHandleOp` carries the variable's shape, and an
    `AssignVariableOp` is keyed on the shape its handle was made with, ~0.5 ms each for every
    distinct weight shape (~13 ms of the 1 GB ViT's first load in a process, 12 shapes). So the
    handle is made without a shape, and the variable (`set_shape`) and its handle's shape data
    (what a `tf.function` reading it infers shapes from) are given the real one.
    """
    import tensorflow as tf
    from tensorflow.python.ops import handle_data_util
    from tensorflow.python.ops.resource_variable_ops import UninitializedVariable

    dtype = tf.as_dtype(unset.dtype)
    variable = UninitializedVariable(
        shape=tf.TensorShape(None), dtype=dtype, name=kwargs["name"], trainable=kwargs.get("trainable", True),
        constraint=kwargs.get("constraint"),
        synchronization=kwargs.get("synchronization", tf.VariableSynchronization.AUTO),
        aggregation=kwargs.get("aggregation", tf.VariableAggregation.NONE))
    variable.set_shape(unset.shape)
    handle_data_util.set_handle_data(variable.handle, handle_data_util.create_handle_data(variable.shape, dtype))
    return variable


def _tf_loading_creator(next_creator, **kwargs):
    import tensorflow as tf

    name = kwargs.get("name")
    if isinstance(name, str) and name and not name.endswith("/"):  # "/" ends a name TF takes as given
        kwargs["name"] = name.rsplit("/", 1)[-1] + "/"
    initial_value = kwargs.get("initial_value")
    if callable(initial_value) and not tf.distribute.has_strategy():
        _TF_LOADING.active = True
        try:
            initial_value = initial_value()
        finally:
            _TF_LOADING.active = False
        if isinstance(initial_value, _Unset):
            return _tf_unset_variable(initial_value, kwargs)
        kwargs["initial_value"] = initial_value
    return next_creator(**kwargs)


def loading_variables():
    """Within this block, TensorFlow variables are made for a checkpoint about to fill them.

    Two costs of eager TensorFlow go: each variable takes its leaf name ("kernel") instead of
    its path, since eager TF builds one `VarHandleOp` kernel per distinct set of attributes and
    the name is one of them (~0.9 ms for each new name: ~0.3 s for the 328 weights of
    benchmarks/load.py's ViT, whose leaf names repeat from layer to layer); and a weight whose
    initialiser gives a placeholder (`init.skip_init`) starts uninitialised, without an initial
    value to make and assign (~0.2 ms instead of ~0.7 ms a variable), until `set_value` gives it
    the checkpoint's, its handle made without a shape so that one kernel serves every shape
    (`_tf_unset_variable`). Keras' names and paths (`variable.path`, what saving and loading use) are
    unchanged; only the underlying `tf.Variable.name` is short. Under a `tf.distribute`
    strategy variables are made as usual (with leaf names). A no-op on the other backends.
    """
    if NAME != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.variable_creator_scope(_tf_loading_creator)


def to_tensor(array: np.ndarray):
    """A host array as a backend tensor, copying as little as the backend allows."""
    convert = _TO_TENSOR.get(NAME)
    return convert(array) if convert else keras.ops.convert_to_tensor(array)


def maps_checkpoints() -> bool:
    """Whether `read_mapped` serves this backend (weights backed by the file's mapping, nothing to read ahead)."""
    return NAME in _READ_MAPPED


def adopts_host_buffers() -> bool:
    """Whether `set_value` makes a fresh host array the weight's own storage (no copy), so reading
    a whole checkpoint ahead of the assignments never holds a second copy of the weights."""
    if NAME == "jax":
        import jax

        return jax.default_backend() == "cpu"
    if NAME == "tensorflow":
        return not _tf_has_gpu()
    return NAME == "torch"


def read_ahead_threads(bounded: bool) -> int:
    """How many threads should read a checkpoint ahead of the assignments (`Checkpoint.prefetch`).

    A read into fresh pages mostly waits for the kernel to fault them in, so without a window
    JAX takes four readers: `from_preset` of the 1 GB ViT on 2 vCPUs, alternating fresh
    processes, 0.91-1.04 s with four, 0.89-1.09 s with two, 1.17-1.71 s with one. TensorFlow's
    variable creation competes with them for the CPU: 1.41-1.67 s with one reader, 1.72-2.02 s
    with two, 1.81-2.20 s with four. Within a window the caller's copies set the pace and extra
    readers only take its CPU (TensorFlow, before it adopted buffers: 2.8-3.3 s with one,
    3.5-4.1 s with four).
    """
    return 4 if NAME == "jax" and not bounded else 1


def read_mapped(path, names):
    """Tensors of one safetensors file as arrays backed by its mapping, or None if the backend copies anyway."""
    read = _READ_MAPPED.get(NAME)
    return read(path, names) if read else None


def set_value(variable, array: np.ndarray) -> None:
    """Gives a weight the value of a host array that nothing else will use (it may become the storage)."""
    _ADOPT.get(NAME, _assign)(variable, array)


# ----------------------------------------------------------------------------- KV cache writes


def _torch_write_slices(cache, rows, starts, updates):
    import torch

    # In place: the generation engine owns the preallocated cache buffer.
    if updates.shape[1] == 1:  # decoding: one position per row
        cache[rows, starts] = updates[:, 0]
    else:
        span = starts[:, None] + torch.arange(updates.shape[1], device=cache.device)[None, :]  # (N, T)
        cache[rows[:, None], span] = updates
    return cache


def _xla_write_slices(cache, rows, starts, updates):
    updates = keras.ops.cast(updates, cache.dtype)
    zeros = (0,) * (len(cache.shape) - 2)
    for i in range(updates.shape[0]):
        cache = keras.ops.slice_update(cache, (rows[i], starts[i], *zeros), updates[i : i + 1])
    return cache


_WRITE_SLICES = {"torch": _torch_write_slices}


def write_slices(cache, rows, starts, updates):
    """cache (B, S, ...) with cache[rows[i], starts[i] : starts[i] + T] = updates[i]; returns the cache.

    updates is (N, T, ...), with N small and static. On JAX and TensorFlow this is one
    `slice_update` per row (contiguous writes that never read the old values; XLA:CPU still
    copies the donated cache once per step when attention reads it, which costs O(cache) and is
    negligible next to the weights at the sizes we run). On PyTorch it is one in-place indexed
    assignment.
    """
    return _WRITE_SLICES.get(NAME, _xla_write_slices)(cache, rows, starts, updates)


# ----------------------------------------------------------------------------- compiled generation steps
# `compile_step(model, fn, cache_arg)` turns `fn(*args) -> (outputs, cache)`, a function that reads
# the model's weights, into a compiled callable with the same signature:
# - JAX: `jax.jit` over a stateless function of the weights' values (arguments, not constants baked
#   into the program), the cache argument donated so XLA updates it in place;
# - TensorFlow: `tf.function(jit_compile=True)`, which captures the variables by reference;
# - PyTorch: the function traced with TorchScript, which replays the recorded aten ops without
#   Keras' per-op Python dispatch (~50 us an op); "eager" (under no_grad) and "compile"
#   (torch.compile) are kept to compare — benchmarks/generate.py measures all three.
# Each compiled callable is specialised to its input shapes; the engine bounds how many it makes.

TORCH_MODES = ("trace", "eager", "compile")
MAX_TRACES = 8  # input shapes kept traced per compiled callable (a generation engine needs a handful)


def _jax(model, fn, cache_arg):
    import jax

    variables = list(model.variables)

    def pure(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    jitted = jax.jit(pure, donate_argnums=() if cache_arg is None else (cache_arg + 1,))
    return lambda *args: jitted([v.value for v in variables], *args)


def _tensorflow(model, fn, cache_arg):
    import tensorflow as tf

    return tf.function(fn, jit_compile=True, reduce_retracing=False)


@contextlib.contextmanager
def _frozen(model):
    """Weights that do not require gradients, so tracing can record them (by reference)."""
    import torch

    params = [v.value for v in model.variables]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.no_grad():
            yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def _strip_noop_casts(graph) -> int:
    """Removes `aten::to` nodes whose input already has the target dtype and device.

    Keras' torch `convert_to_tensor` calls `x.to(dtype)` on every operand of every op; at run
    time these return their input, but a traced graph still dispatches each one (~300 per
    decode step of an 8-layer model). The traced types say when they are no-ops.
    """
    import torch

    removed = 0
    for node in list(graph.nodes()):
        if node.kind() != "aten::to" or node.outputsSize() != 1:
            continue
        source, result = node.inputsAt(0).type(), node.output().type()
        if not (isinstance(source, torch._C.TensorType) and isinstance(result, torch._C.TensorType)):
            continue
        if source.scalarType() is not None and source.scalarType() == result.scalarType() \
                and source.device() == result.device():
            node.output().replaceAllUsesWith(node.inputsAt(0))
            node.destroy()
            removed += 1
    torch._C._jit_pass_dce(graph)
    return removed


def _torch(model, fn, cache_arg, mode="trace"):
    import torch

    if mode == "eager":
        def eager(*args):
            with torch.no_grad():
                return fn(*args)
        return eager
    if mode == "compile":
        compiled = torch.compile(fn, dynamic=False)

        def run(*args):
            with torch.no_grad():
                return compiled(*args)
        return run
    traced = {}  # by input shapes, oldest first

    def _torch_arg(a):
        if isinstance(a, (tuple, list)):
            return tuple(_torch_arg(x) for x in a)
        return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))

    def _shape_key(a):
        return tuple(_shape_key(x) for x in a) if isinstance(a, tuple) else (tuple(a.shape), str(a.dtype))

    def run(*args):
        args = tuple(_torch_arg(a) for a in args)
        key = tuple(_shape_key(a) for a in args)
        if key not in traced:
            def plain(*a):  # trace refuses a bound method of a module (Keras layers are torch modules)
                return fn(*a)
            with _frozen(model), warnings.catch_warnings():
                # Shapes read while tracing are constants of this trace, which is keyed by them.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.trace(plain, args, check_trace=False, strict=False)
            _strip_noop_casts(graph.graph)
            if len(traced) >= MAX_TRACES:
                traced.pop(next(iter(traced)))
            traced[key] = graph
        with torch.no_grad():
            return traced[key](*args)
    return run


def weights_signature(model) -> tuple:
    """Changes when the model's set of weights does (e.g. `enable_lora` adds adapters): a compiled
    callable made before then runs the old computation and must be made again."""
    return tuple(id(v) for v in model.variables)


def compile_step(model, fn, cache_arg: int | None, torch_mode: str = "trace"):
    """`fn` compiled for the current backend (see the module docstring)."""
    if NAME == "jax":
        return _jax(model, fn, cache_arg)
    if NAME == "tensorflow":
        return _tensorflow(model, fn, cache_arg)
    if NAME == "torch":
        if torch_mode not in TORCH_MODES:
            raise ValueError(f"torch_mode must be one of {TORCH_MODES}, got {torch_mode!r}")
        return _torch(model, fn, cache_arg, torch_mode)
    raise NotImplementedError(f"no compiled generation for backend {NAME!r}")
