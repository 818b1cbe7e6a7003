"""Past one device: `keras.distribution` layouts for keras-zoo's models, and the two common cases.

A mesh has a batch axis and a model axis (`mesh(batch=2, model=4)`, or your own
`keras.distribution.DeviceMesh` with axes named "batch" and "model"). Under `model_parallel(mesh)`
each device holds a share of every large weight, in Megatron's layout: the projections into the
attention heads (queries, keys, values) and into the MLP's width are split by their outputs, the
ones out of them (`o_proj`, `down_proj`, `fc2`) by their inputs, so a device computes its own heads
and its part of the MLP and one sum joins them; the vocabulary (Gemma's embedding and LM head) is
split as keras-hub's Gemma layout splits it. Norms, positions, patch embeddings and the biases of the
output projections are replicated; every weight is replicated over the batch axis, which splits the
data. LoRA adapters follow their base: the B of an output-split projection, the A of an input-split one.

With fewer KV heads than the model axis (Gemma 2B has one), the keys and values are replicated, as
vLLM does; a model axis that does not divide the query heads, the MLP width or the vocabulary is a
`DistributionError`. `from_preset(..., distribution=...)` (or a distribution set with
`keras.distribution.set_distribution`) loads each device's shard straight from the safetensors files.
Keras 3.15 distributes on JAX only: on another backend every entry point raises `DistributionError`.
"""

import contextlib

import keras

from zoo import backends
from zoo.errors import DistributionError

BATCH, MODEL = "batch", "model"


def _rule(names: str, leaf: str) -> str:
    """A pattern over `variable.path` (which may or may not start with a parent's name)."""
    return rf"(.*/)?({names})/{leaf}"


_QUERIES = [(_rule("q_proj", "kernel"), (MODEL, None, None)), (_rule("q_proj", "bias"), (MODEL, None))]
_KEYS_VALUES = [(_rule("k_proj|v_proj", "kernel"), (MODEL, None, None)), (_rule("k_proj|v_proj", "bias"), (MODEL, None))]
_REST = [
    (_rule("o_proj", "kernel"), (None, MODEL, None)),  # (d, heads, head width)
    (_rule("gate_proj|up_proj|fc1", "kernel"), (MODEL, None)),  # (f, d)
    (_rule("gate_proj|up_proj|fc1", "bias"), (MODEL,)),
    (_rule("down_proj|fc2", "kernel"), (None, MODEL)),  # (d, f)
    (_rule("embed_tokens", "embeddings"), (MODEL, None)),  # (vocab, d)
    (_rule("lm_head", "kernel"), (MODEL, None)),
    # adapters (`<projection>/<adapter name>/lora_A`): A (r, in), B (out, r)
    (_rule("q_proj|gate_proj|up_proj|fc1", "[^/]+/lora_B"), (MODEL, None)),
    (_rule("o_proj|down_proj|fc2", "[^/]+/lora_A"), (None, MODEL)),
]
_KV_ADAPTERS = [(_rule("k_proj|v_proj", "[^/]+/lora_B"), (MODEL, None))]


class ZooLayoutMap(keras.distribution.LayoutMap):
    """keras-zoo's layouts (see the module docstring) for both model families; `replicate_kv` keeps the keys
    and values (their projections, adapters and cache) whole on every device."""

    def __init__(self, device_mesh, replicate_kv: bool = False):
        super().__init__(device_mesh)
        self.replicate_kv = replicate_kv
        for pattern, axes in _QUERIES + _REST + ([] if replicate_kv else _KEYS_VALUES + _KV_ADAPTERS):
            self[pattern] = axes


def check_backend() -> None:
    backends.check_distributes()


def mesh(batch: int | None = None, model: int = 1, devices=None) -> keras.distribution.DeviceMesh:
    """A `(batch, model)` mesh over `devices` (default: all of them); `batch` defaults to what `model` leaves."""
    check_backend()
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    if batch is None:
        batch = len(devices) // model if model and len(devices) % model == 0 else 0
    if not (isinstance(batch, int) and isinstance(model, int) and batch >= 1 and model >= 1
            and batch * model == len(devices)):
        raise DistributionError(f"a mesh of batch={batch} x model={model} needs batch * model == {len(devices)} "
                                "devices")
    return keras.distribution.DeviceMesh((batch, model), [BATCH, MODEL], devices)


def layout_map(device_mesh: keras.distribution.DeviceMesh, replicate_kv: bool = False) -> ZooLayoutMap:
    """The layouts of both model families over a mesh with "batch" and "model" axes."""
    check_backend()
    if tuple(device_mesh.axis_names) != (BATCH, MODEL):
        raise DistributionError(f"expected a mesh with axes ({BATCH!r}, {MODEL!r}), got {tuple(device_mesh.axis_names)}")
    return ZooLayoutMap(device_mesh, replicate_kv)


def data_parallel(devices=None) -> keras.distribution.DataParallel:
    """Every weight on every device, the batch split over them (`devices`: default all)."""
    check_backend()
    return keras.distribution.DataParallel(devices=devices)


class ZooModelParallel(keras.distribution.ModelParallel):
    """Keras' `ModelParallel` over keras-zoo's layouts (`ZooLayoutMap`), which `for_model` can refit."""

    def __init__(self, device_mesh: keras.distribution.DeviceMesh, replicate_kv: bool = False):
        super().__init__(layout_map=layout_map(device_mesh, replicate_kv), batch_dim_name=BATCH)
        self.replicate_kv = replicate_kv


def model_parallel(device_mesh: keras.distribution.DeviceMesh | tuple[int, int]) -> ZooModelParallel:
    """Weights split over the mesh's model axis, data over its batch axis (a `(batch, model)` tuple: `mesh(...)`)."""
    if isinstance(device_mesh, tuple):
        device_mesh = mesh(*device_mesh)
    return ZooModelParallel(device_mesh)


def active(distribution=None):
    """The distribution a model is built under: the one given, else Keras' global one (None: one device)."""
    distribution = distribution if distribution is not None else keras.distribution.distribution()
    if distribution is not None:
        check_backend()
        if not isinstance(distribution, (keras.distribution.DataParallel, keras.distribution.ModelParallel)):
            raise DistributionError(f"distribution= takes a keras.distribution object (zoo.distribution."
                                    f"model_parallel(...), data_parallel()), got {type(distribution).__name__}")
    return distribution


def for_model(distribution, config):
    """`distribution` checked against a model of `config` (its heads, MLP width and vocabulary over the model
    axis) and, for keras-zoo's layouts, refitted to replicate the keys and values when its KV heads do not
    split over that axis."""
    if not isinstance(distribution, ZooModelParallel):
        return distribution
    names = list(distribution.device_mesh.axis_names)
    size = distribution.device_mesh.shape[names.index(MODEL)]
    counts = {"attention heads": config.num_heads, "MLP width": config.intermediate_size,
              "vocabulary": getattr(config, "vocab_size", None)}
    for what, count in counts.items():
        if count is not None and count % size:
            raise DistributionError(f"the mesh's model axis has {size} devices, which do not divide the model's "
                                    f"{count} {what}; use a model axis that divides {count}")
    kv_heads = getattr(config, "num_kv_heads", config.num_heads)
    if kv_heads % size and not distribution.replicate_kv:
        return ZooModelParallel(distribution.device_mesh, replicate_kv=True)
    return distribution


def scope(model):
    """Within this block, weights made for `model` (adapters) take its distribution's layouts."""
    distribution = getattr(model, "distribution", None)
    return distribution.scope() if distribution is not None else contextlib.nullcontext()


def place_cache(cache: tuple, distribution, key_kernel) -> tuple:
    """A KV cache (rows, positions, KV heads, head width per layer) split over the KV heads as the key
    projection's kernel (KV heads, head width, d) is under `distribution`; as it is without one."""
    if distribution is None:
        return cache
    heads = tuple(distribution.get_variable_layout(key_kernel).axes)[0]
    layout = keras.distribution.TensorLayout((None, None, heads, None), distribution.device_mesh)
    return tuple(keras.distribution.distribute_tensor(t, layout) for t in cache)
