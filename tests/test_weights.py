"""Building weights for a checkpoint and giving them its values: placeholders, adopted buffers, casts."""

import collections
import gc
import mmap

import keras
import ml_dtypes
import numpy as np
import pytest

import zoo
from zoo import backend
from zoo.layers import init
from zoo.safetensors_file import MAPPED_BYTES, aligned_empty, astype_aligned
from backend_storage import storage_address


@pytest.mark.parametrize("rows", [16, MAPPED_BYTES // 32], ids=["small", "mapped"])
def test_set_value_adopts_fresh_aligned_buffers(rows):
    def fresh(nbytes, offset=0):
        return aligned_empty(nbytes + 64)[offset:offset + nbytes]

    big = aligned_empty(MAPPED_BYTES, zeroed=True)
    assert isinstance(big.base.obj, mmap.mmap) and not big.any()  # a mapping of ordinary pages, zero-filled
    expected = np.arange(rows * 8, dtype=np.float32).reshape(rows, 8)
    variable = keras.Variable(np.zeros((rows, 8), "float32"))
    aligned = fresh(rows * 8 * 4).view(np.float32).reshape(rows, 8)
    aligned[:] = expected
    address = aligned.ctypes.data
    assert address % 64 == 0
    backend.set_value(variable, aligned)
    assert storage_address(variable) == address  # the buffer is the weight: no copy
    del aligned
    gc.collect()
    np.testing.assert_array_equal(backend.to_numpy(variable.value), expected)
    variable.assign(variable.value + 1)  # a later update (an optimiser step) still works
    np.testing.assert_array_equal(backend.to_numpy(variable.value), expected + 1)


def test_weights_built_under_skip_init_stay_independent():
    with init.skip_init():
        first, second = (keras.layers.Dense(8, kernel_initializer=init.normal()) for _ in range(2))
        first.build((None, 4))
        second.build((None, 4))
    # JAX's placeholders are immutable arrays, one per shape and dtype; the others write in place.
    assert (first.kernel.value is second.kernel.value) == (keras.backend.backend() == "jax")
    backend.set_value(first.kernel, np.full((4, 8), 1.0, np.float32))
    backend.set_value(second.kernel, np.full((4, 8), 2.0, np.float32))
    first.kernel.assign(first.kernel.value + 1)
    np.testing.assert_array_equal(backend.to_numpy(first.kernel.value), np.full((4, 8), 2.0))
    np.testing.assert_array_equal(backend.to_numpy(second.kernel.value), np.full((4, 8), 2.0))
    second.kernel.assign(second.kernel.value * 3)
    np.testing.assert_array_equal(backend.to_numpy(first.kernel.value), np.full((4, 8), 2.0))


def test_variables_built_for_loading_keep_their_keras_paths_and_values():
    # Two layers of one shape whose variables share their leaf names: still two independent
    # weights with their own Keras paths, trainable, and saved and found by those paths.
    with backend.loading_variables():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, name="a"), keras.layers.Dense(4, name="b")])
    assert [v.path for v in model.weights] == ["sequential/a/kernel", "sequential/a/bias", "sequential/b/kernel",
                                               "sequential/b/bias"]
    if keras.backend.backend() == "tensorflow":
        assert [v.value.name for v in model.weights] == ["kernel:0", "bias:0", "kernel:0", "bias:0"]
        import tensorflow as tf

        with backend.loading_variables(), tf.name_scope("outer"):
            assert tf.Variable(1.0, name="given/").name == "given:0"  # a name TF takes as given stays
    model.layers[0].kernel.assign(np.ones((4, 4), np.float32))
    model.layers[1].kernel.assign(np.full((4, 4), 2.0, np.float32))
    for layer in model.layers:
        layer.bias.assign(np.zeros(4, np.float32))
    np.testing.assert_allclose(backend.to_numpy(model(np.ones((1, 4), np.float32))), np.full((1, 4), 32.0))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(np.ones((2, 4), np.float32), np.zeros((2, 4), np.float32), epochs=1, verbose=0)
    assert not np.allclose(backend.to_numpy(model.layers[1].kernel.value), 2.0)  # both layers train
    assert not np.allclose(backend.to_numpy(model.layers[0].kernel.value), 1.0)


def test_weights_built_for_loading_take_the_checkpoint_values():
    with init.skip_init(), backend.loading_variables():
        layer = keras.layers.Dense(8, kernel_initializer=init.normal(), bias_initializer=init.zeros(), dtype="bfloat16")
        layer.build((None, 4))
    if keras.backend.backend() == "tensorflow":  # no initial value made: the checkpoint's is the first
        import tensorflow as tf

        variable = layer.kernel.value
        assert not variable.is_initialized()
        # Its handle is made without a shape (one kernel for every shape); the variable, and what a
        # tf.function reading it infers, still have the weight's.
        assert variable.shape == (4, 8) and variable.dtype == tf.bfloat16
        assert tf.function(lambda: variable.read_value()).get_concrete_function().output_shapes == (4, 8)
    backend.set_value(layer.kernel, np.full((4, 8), 0.5, ml_dtypes.bfloat16))
    backend.set_value(layer.bias, np.arange(8, dtype=ml_dtypes.bfloat16))
    out = layer(np.ones((2, 4), "float32"))
    np.testing.assert_array_equal(backend.to_numpy(keras.ops.cast(out, "float32")), np.tile(np.arange(8) + 2.0, (2, 1)))
    layer.kernel.assign(layer.kernel.value * 2)
    np.testing.assert_array_equal(backend.to_numpy(keras.ops.cast(layer.kernel.value, "float32")), np.ones((4, 8)))
    with pytest.raises(ValueError):  # another shape is refused, as for any weight
        layer.kernel.assign(np.ones((3, 8), ml_dtypes.bfloat16))


def test_set_value_copies_unaligned_strided_and_bfloat16_arrays():
    # TensorFlow would abort on data that is not 64-byte aligned; NumPy's DLPack has no bfloat16.
    variable = keras.Variable(np.zeros((16, 8), "float32"))
    unaligned = aligned_empty(16 * 8 * 4 + 64)[16:16 + 16 * 8 * 4].view(np.float32).reshape(16, 8)
    unaligned[:] = 3.0
    backend.set_value(variable, unaligned)
    assert float(backend.to_numpy(keras.ops.sum(variable.value * 2.0))) == 768.0
    transposed = np.arange(128, dtype=np.float32).reshape(8, 16).T
    backend.set_value(variable, transposed)
    np.testing.assert_array_equal(backend.to_numpy(variable.value), transposed)
    half = keras.Variable(np.zeros((4, 2), "float32"), dtype="bfloat16")
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    backend.set_value(half, values.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(backend.to_numpy(keras.ops.cast(half.value, "float32")), values)


def test_cast_weights_land_in_buffers_the_backends_adopt():
    half = np.arange(96, dtype=np.float32).reshape(8, 12).astype(ml_dtypes.bfloat16)
    for source in (half, half.T):
        cast = astype_aligned(source, "float32")
        assert cast.ctypes.data % 64 == 0 and cast.flags.c_contiguous and cast.dtype == np.float32
        np.testing.assert_array_equal(cast, source.astype(np.float32))


def _lean_and_plain_layers():
    """One layer body, as a Keras layer and with `LeanAttributes` first: every kind of attribute set."""
    from keras.src.utils.tracking import DotNotTrackScope

    from zoo.layers.tracking import LeanAttributes

    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.number, self.text, self.function = 3, "text", len
            self.items, self.table, self.group = [1], {"a": 1}, {2}
            self.ordered = collections.OrderedDict(b=2)
            self.pair, self.frozen = (1, [2]), frozenset({3})
            self.dense = keras.layers.Dense(2, name="dense")
            self.blocks = [keras.layers.Dense(2, name="listed")]
            self.holder = None
            self.holder = keras.layers.Dense(2, name="holder")  # a layer where a plain value was
            self.dense = keras.layers.Dense(2, name="dense_again")  # a layer replacing a tracked one
            if keras.backend.backend() == "tensorflow":
                from tensorflow.python.trackable.data_structures import NoDependency

                self.hidden = NoDependency([keras.layers.Dense(2, name="hidden")])
                self._self_setattr_tracking = False  # as Keras' and TF's own bookkeeping sets its lists
                self.untracked_list = [4]
                self._self_setattr_tracking = True
            with DotNotTrackScope():
                self.while_off = [5]

        def build(self, input_shape):
            self.kernel = self.add_weight(shape=(2,), initializer="zeros", name="kernel")
            self.frozen_weight = self.add_weight(shape=(2,), initializer="ones", name="frozen", trainable=False)
            self.alias = self.kernel  # the same variable under a second name
            self.child = self.child  # through the property: nothing to do
            self.items.append(keras.layers.Dense(2, name="appended"))  # tracked lists see later additions
            self.table["layer"] = keras.layers.Dense(2, name="in_dict")
            for layer in (self.dense, self.holder, *self.blocks, self.items[-1], self.table["layer"]):
                layer.build(input_shape)

        @property
        def child(self):  # a property: TF's trackers read it first and skip setting what it already gives
            return self.dense

        @child.setter
        def child(self, value):
            self.dense = value

    class LeanBlock(LeanAttributes, Block):
        pass

    return Block(name="block"), LeanBlock(name="block")


def _tracking_state(layer) -> dict:
    state = {
        "attributes": {name: type(value).__name__ for name, value in vars(layer).items()},
        "layers": [sub.name for sub in layer._layers],
        "weights": [v.path for v in layer.weights],
        "trainable": [v.path for v in layer.trainable_weights],
        "config": layer.get_config(),
    }
    if keras.backend.backend() == "tensorflow":
        state["tracked"] = list(layer._tracked)
        state["dependencies"] = [(ref.name, type(ref.ref).__name__)
                                 for ref in layer._self_unconditional_checkpoint_dependencies]
        state["children"] = {name: type(child).__name__ for name, child in layer._trackable_children().items()}
    return state


def test_lean_attributes_leave_a_layer_as_keras_would():
    # Whatever `LeanAttributes` stores directly, a layer ends up with the same attributes, Keras
    # collections and TensorFlow dependencies as without it (this also checks a newer Keras or
    # TensorFlow against the behaviour the mixin reproduces).
    plain, lean = _lean_and_plain_layers()
    for layer in (plain, lean):
        layer.build((None, 2))
        with pytest.raises(ValueError, match="already built"):  # Keras' lock holds, and nothing is set
            layer.extra = keras.layers.Dense(2, name="after_build")
    assert _tracking_state(lean) == _tracking_state(plain)
    assert "extra" not in vars(lean) and len(plain.weights) == 12


def test_lean_layers_keep_their_signatures_and_keras_configs():
    # The signatures stored on the functions are the ones inspect computes, and Keras' configs made
    # from them (the arguments given, defaults filled in) rebuild the layer.
    import inspect

    from zoo.layers.tracking import LeanAttributes
    from zoo.models.vit.layers import ViTLayer

    class Scale(LeanAttributes, keras.layers.Layer):  # no get_config: Keras makes it from the arguments
        def __init__(self, units: int, scale: float = 1.0, use_bias: bool = True, **kwargs):
            super().__init__(**kwargs)
            self.units, self.scale, self.use_bias = units, scale, use_bias

        def call(self, x):
            return x * self.scale

    for cls in (ViTLayer, Scale):
        for function in (cls.__init__, cls.call, cls.build):  # Scale.build is Keras' own
            assert "__signature__" in vars(function)
            stored = vars(function).pop("__signature__")
            try:
                assert inspect.signature(function) == stored
            finally:
                function.__signature__ = stored
    layer = Scale(4, scale=0.5, name="scale")
    config = layer.get_config()
    assert {k: config[k] for k in ("units", "scale", "use_bias", "name")} == {
        "units": 4, "scale": 0.5, "use_bias": True, "name": "scale"}
    clone = Scale.from_config(config)
    assert (clone.units, clone.scale, clone.use_bias, clone.name) == (4, 0.5, True, "scale")


def test_layers_with_lean_attributes_keep_what_keras_and_tensorflow_track(tmp_path):
    # `LeanAttributes` stores plain values directly on TensorFlow; everything a tracker wants still
    # reaches it: a layer put where a plain value was, property setters, the backend's checkpoints.
    from zoo.models.vit.config import ViTConfig
    from zoo.models.vit.layers import ViTLayer

    config = ViTConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16, image_size=(8, 8),
                       patch_size=(4, 4), num_labels=3)
    layer = ViTLayer(config, name="block")
    layer.extra = None
    layer.extra = keras.layers.Dense(3, name="extra")
    layer.scale = 2.0
    layer.build((None, None, 8))
    layer.extra.build((None, 8))
    assert any(v is layer.extra.kernel for v in layer.weights) and layer.scale == 2.0
    layer.trainable = False  # a property: its setter runs and reaches the sublayers
    assert not layer.trainable_weights and not layer.extra.trainable and len(layer.non_trainable_weights) == 18

    model = zoo.ViTImageClassifier(config)
    before = [backend.to_numpy(v.value).copy() for v in model.weights]
    model.save_weights(tmp_path / "model.weights.h5")
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        saved = tf.train.Checkpoint(model=model).write(str(tmp_path / "tf_checkpoint"))
    for v in model.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    model.load_weights(tmp_path / "model.weights.h5")
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(backend.to_numpy(v.value), value)
    if keras.backend.backend() == "tensorflow":
        # TensorFlow's own tracking still finds the weights it found without `LeanAttributes`: all but
        # those of layers held in a list, which Keras 3 leaves out of `tf.train.Checkpoint` for any
        # model (upstream; `save_weights` has them all).
        attributes = [v for v in model.weights if "/layers_" not in v.path]
        assert len(attributes) == 8  # embeddings (4), final norm (2), head (2)
        for v in attributes:
            v.assign(np.zeros(v.shape, v.dtype))
        tf.train.Checkpoint(model=model).read(saved)
        for v, value in zip(model.weights, before):
            if "/layers_" not in v.path:
                np.testing.assert_array_equal(backend.to_numpy(v.value), value)
