"""PyTorch: TorchScript traces of the steps and of `predict`, SDPA and `F.linear`, weights backed by the file's mapping."""

import contextlib
import warnings

import keras
import ml_dtypes
import numpy as np
import torch
from keras import utils
from safetensors import safe_open

COMPILER = "torch.jit.trace"
PREDICT = "torch.jit.trace of the forward pass (models with traced_predict), else Keras'"
# Keras' choice (eager). jit_compile=True (torch.compile) trains ~10% faster once compiled, after a first
# step of a minute or more on a CPU: left to the user (benchmarks/RESULTS.md, LoRA training).
TRAIN_JIT_COMPILE = "auto"
MAX_TRACES = 64  # input shapes kept traced per compiled callable: an engine warms up (length x batch buckets),
# about 40 prefill shapes at 2048 positions; with fewer kept, serving re-traced evicted ones (a 0.5 s stall)


_device: str | None = None


def device() -> str:
    """Where Keras puts new tensors. Under Keras' shape inference they go to torch's "meta" device, which
    says nothing about the real one: that answer is not kept (a first call there would stick)."""
    global _device
    if _device is None:
        kind = keras.ops.zeros(()).device.type
        if kind == "meta":
            return "gpu" if torch.cuda.is_available() else "cpu"
        _device = "gpu" if kind == "cuda" else kind
    return _device


def _tensors(*xs):
    return (keras.ops.convert_to_tensor(x) for x in xs)


# ----------------------------------------------------------------------------- kernels


def matmul_out_in(x, weight):
    return keras.ops.matmul(x, keras.ops.transpose(weight))


def linear(x, weight, bias):
    # One addmm, as nn.Linear: the bias rides in the GEMM instead of a pass over the whole output.
    return torch.nn.functional.linear(*_tensors(x, weight, bias))


def gelu(x):
    return keras.ops.gelu(x, approximate=False)  # one kernel


def sdpa(q, k, v, scale: float, mask=None):
    """`scaled_dot_product_attention` on transposed views of (b, t, n, h) inputs, as transformers calls it
    (Keras' dot_product_attention first copies them into contiguous (b, n, t, h) buffers on a CPU)."""
    q, k, v = (t.transpose(1, 2) for t in _tensors(q, k, v))  # (b, n, t, h), (b, k, s, h)
    if mask is not None:
        mask = keras.ops.convert_to_tensor(mask)[:, None]  # (b, 1, t, s)
    grouped = {"enable_gqa": True} if int(k.shape[1]) != int(q.shape[1]) else {}  # ints: a trace sees sizes as tensors
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, **grouped)
    return out.transpose(1, 2)  # (b, t, n, h)


# SDPA picks the device's fastest kernel (flash or memory-efficient on a GPU). On a CPU masked calls
# keep the reference kernel, which the bundled presets' pinned outputs were recorded with.
ATTENTION = {"cpu": {"plain": "sdpa", "masked": "reference"}, "gpu": {"plain": "sdpa", "masked": "sdpa"},
             "mps": {"plain": "sdpa", "masked": "reference"}}
ATTENTION_KERNELS = {"sdpa": sdpa}


def write_slices(cache, rows, starts, updates):
    """One in-place indexed assignment (the generation engine owns the preallocated buffer)."""
    if updates.shape[1] == 1:  # decoding: one position per row
        cache[rows, starts] = updates[:, 0]
    else:
        span = starts[:, None] + torch.arange(updates.shape[1], device=cache.device)[None, :]  # (N, T)
        cache[rows[:, None], span] = updates
    return cache


# ----------------------------------------------------------------------------- compiled steps


@contextlib.contextmanager
def _frozen(model):
    """Weights that do not require gradients, so tracing can record them (by reference)."""
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


def _as_tensor(a):
    if isinstance(a, (tuple, list)):
        return tuple(_as_tensor(x) for x in a)
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))


def _shape_key(a):
    return tuple(_shape_key(x) for x in a) if isinstance(a, tuple) else (tuple(a.shape), str(a.dtype))


def compile_step(model, fn, cache_arg: int | None):
    """A TorchScript trace of `fn` per input shapes: it replays the recorded aten ops without Keras'
    per-op Python dispatch (~50 us an op), reading the weights by reference."""
    traced = {}  # by input shapes, oldest first

    def run(*args):
        args = tuple(_as_tensor(a) for a in args)
        key = tuple(_shape_key(a) for a in args)
        if key not in traced:
            def plain(*a):  # trace refuses a bound method of a module (Keras layers are torch modules)
                return fn(*a)

            with _frozen(model), warnings.catch_warnings():
                # Shapes read while tracing are constants of this trace, which is keyed by them.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                graph = torch.jit.trace(plain, args, check_trace=False, strict=False)
            if len(traced) >= MAX_TRACES:
                traced.pop(next(iter(traced)))
            traced[key] = graph
        with torch.no_grad():
            return traced[key](*args)

    return run


def make_predict_function(model, make):
    """For a model whose forward pass is one tensor in (`traced_predict`), `predict` replays a trace of
    it per input shape (ViT-B/16 at batch 8 on 2 cores: 4-12% faster, paired). A model compiled with
    `jit_compile=True` keeps Keras' own path (torch.compile)."""
    make()
    if not model.traced_predict or model.jit_compile is True:
        return model.predict_function
    keras_step = model.predict_function
    model.__dict__["_predict_trace"] = traced = compile_step(model, lambda x: model(x, training=False), None)

    def one_step_on_data(data):
        x, _, _ = utils.unpack_x_y_sample_weight(data[0])
        return keras_step(data) if isinstance(x, (dict, list, tuple)) else traced(keras.ops.convert_to_tensor(x))

    model.predict_function = one_step_on_data
    return one_step_on_data


# ----------------------------------------------------------------------------- export


# Keras' ONNX exporter on PyTorch (torch.onnx's dynamo exporter) fails on these models' shape arithmetic;
# `zoo.models.exporting` makes ONNX and SavedModels on TensorFlow instead.
EXPORTS = ("torch",)  # Keras' exporters that give these models back exactly on this backend
exporting = contextlib.nullcontext


def export_options(format: str) -> dict:
    """A torch.export program takes a batch of any size, as the other formats do (Keras' default fixes it at 1)."""
    return {"dynamic_shapes": {0: torch.export.Dim("batch", min=1)}, "strict": False} if format == "torch" else {}


# ----------------------------------------------------------------------------- loading weights


building = contextlib.nullcontext  # nothing to do while a checkpoint's model is built


def placeholder(shape, dtype, shared: dict | None = None, layout=None):  # (no layouts here)
    # calloc'ed pages, untouched until the checkpoint's values arrive; each weight its own.
    if dtype == "bfloat16":
        return torch.from_numpy(np.zeros(shape, np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.zeros(shape, dtype))


def set_value(variable, array: np.ndarray) -> None:
    """The freshly read buffer becomes the parameter's storage (`Parameter.data`): no copy into fresh pages."""
    if array.dtype.name == "bfloat16":
        tensor = torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)  # shares memory, strides included
    parameter = variable.value
    if tensor.is_contiguous() and (tensor.dtype, tensor.shape, tensor.device) == (
            parameter.dtype, parameter.shape, parameter.device):
        parameter.data = tensor
    else:
        variable.assign(tensor)


def read_mapped(path, names):
    """Tensors as NumPy views of the file mapping torch keeps alive: adopted as the weights' storage, their
    pages are read from the page cache on first use, as transformers does with safetensors."""
    with safe_open(path, framework="pt") as f:
        for name in names:
            tensor = f.get_tensor(name)
            if tensor.dtype == torch.bfloat16:
                yield tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            else:
                yield tensor.numpy()


def adopts_host_buffers() -> bool:
    return device() == "cpu"


def read_ahead_threads(bounded: bool) -> int:
    return 1  # unused: the file's mapping serves every read



# ----------------------------------------------------------------------------- distribution

DISTRIBUTES = False  # keras.distribution's layouts run on JAX only in Keras 3.15 (TensorFlow's is a prototype)
set_sharded = lay_out = None

# ----------------------------------------------------------------------------- weights added after build


def track_weights(layer, variables) -> None:
    """Keras' torch layers list their parameters in `torch_params`; weights added after build (LoRA
    adapters) go there too, so that torch's `zero_grad`, `parameters()` and `state_dict` see them."""
    for v in variables:
        layer.torch_params[v.path.replace(".", "_")] = v.value


def untrack_weights(layer, variables) -> None:
    for v in variables:
        key = v.path.replace(".", "_")
        if key in layer.torch_params:
            layer.torch_params.pop(key)
