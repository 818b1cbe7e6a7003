"""Building weights for a checkpoint and giving them its values: placeholders, adopted buffers, casts."""

import gc
import mmap

import keras
import ml_dtypes
import numpy as np
import pytest
from keras.ops import convert_to_numpy as to_numpy

import zoo
from zoo import backends
from zoo.host import MAPPED_BYTES, aligned_empty, astype_aligned
from zoo.layers import init
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
    backends.set_value(variable, aligned)
    assert storage_address(variable) == address  # the buffer is the weight: no copy
    del aligned
    gc.collect()
    np.testing.assert_array_equal(to_numpy(variable.value), expected)
    variable.assign(variable.value + 1)  # a later update (an optimiser step) still works
    np.testing.assert_array_equal(to_numpy(variable.value), expected + 1)


def test_weights_built_under_skip_init_stay_independent():
    with init.skip_init():
        first, second = (keras.layers.Dense(8, kernel_initializer=init.normal()) for _ in range(2))
        first.build((None, 4))
        second.build((None, 4))
    # JAX's placeholders are immutable arrays, one per shape and dtype; the others write in place.
    assert (first.kernel.value is second.kernel.value) == (keras.backend.backend() == "jax")
    backends.set_value(first.kernel, np.full((4, 8), 1.0, np.float32))
    backends.set_value(second.kernel, np.full((4, 8), 2.0, np.float32))
    first.kernel.assign(first.kernel.value + 1)
    np.testing.assert_array_equal(to_numpy(first.kernel.value), np.full((4, 8), 2.0))
    np.testing.assert_array_equal(to_numpy(second.kernel.value), np.full((4, 8), 2.0))
    second.kernel.assign(second.kernel.value * 3)
    np.testing.assert_array_equal(to_numpy(first.kernel.value), np.full((4, 8), 2.0))


def test_weights_built_for_loading_take_the_checkpoint_values():
    with init.skip_init():
        layer = keras.layers.Dense(8, kernel_initializer=init.normal(), bias_initializer=init.zeros(), dtype="bfloat16")
        layer.build((None, 4))
    backends.set_value(layer.kernel, np.full((4, 8), 0.5, ml_dtypes.bfloat16))
    backends.set_value(layer.bias, np.arange(8, dtype=ml_dtypes.bfloat16))
    out = layer(np.ones((2, 4), "float32"))
    np.testing.assert_array_equal(to_numpy(keras.ops.cast(out, "float32")), np.tile(np.arange(8) + 2.0, (2, 1)))
    layer.kernel.assign(layer.kernel.value * 2)
    np.testing.assert_array_equal(to_numpy(keras.ops.cast(layer.kernel.value, "float32")), np.ones((4, 8)))
    with pytest.raises(ValueError):  # another shape is refused, as for any weight
        layer.kernel.assign(np.ones((3, 8), ml_dtypes.bfloat16))


def test_set_value_copies_unaligned_strided_and_bfloat16_arrays():
    # TensorFlow would abort on data that is not 64-byte aligned; NumPy's DLPack has no bfloat16.
    variable = keras.Variable(np.zeros((16, 8), "float32"))
    unaligned = aligned_empty(16 * 8 * 4 + 64)[16:16 + 16 * 8 * 4].view(np.float32).reshape(16, 8)
    unaligned[:] = 3.0
    backends.set_value(variable, unaligned)
    assert float(to_numpy(keras.ops.sum(variable.value * 2.0))) == 768.0
    transposed = np.arange(128, dtype=np.float32).reshape(8, 16).T
    backends.set_value(variable, transposed)
    np.testing.assert_array_equal(to_numpy(variable.value), transposed)
    half = keras.Variable(np.zeros((4, 2), "float32"), dtype="bfloat16")
    values = np.arange(8, dtype=np.float32).reshape(4, 2)
    backends.set_value(half, values.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(to_numpy(keras.ops.cast(half.value, "float32")), values)


def test_cast_weights_land_in_buffers_the_backends_adopt():
    half = np.arange(96, dtype=np.float32).reshape(8, 12).astype(ml_dtypes.bfloat16)
    for source in (half, half.T):
        cast = astype_aligned(source, "float32")
        assert cast.ctypes.data % 64 == 0 and cast.flags.c_contiguous and cast.dtype == np.float32
        np.testing.assert_array_equal(cast, source.astype(np.float32))


def test_keras_weights_files_round_trip(tmp_path):
    """Keras' own `save_weights`/`load_weights` find every weight of a model, in blocks held in lists too."""
    from zoo.models.vit.config import ViTConfig

    config = ViTConfig(hidden_size=8, num_layers=2, num_heads=2, intermediate_size=16, image_size=(8, 8),
                       patch_size=(4, 4), num_labels=3)
    model = zoo.ViTImageClassifier(config)
    before = [to_numpy(v.value).copy() for v in model.weights]
    model.save_weights(tmp_path / "model.weights.h5")
    for v in model.weights:
        v.assign(np.zeros(v.shape, v.dtype))
    model.load_weights(tmp_path / "model.weights.h5")
    for v, value in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(v.value), value, err_msg=v.path)
