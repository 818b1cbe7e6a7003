"""What JAX and TensorFlow share, both compiling through XLA: KV-cache writes and products for few rows, in keras.ops."""

import keras
from keras import ops

SMALL_ROWS = 2


def matmul_out_in(x, weight, small_rows: bool):
    """x (m, d) times a PyTorch-layout weight (f, d), transposed: (m, f).

    With `small_rows` (a CPU) and one or two rows, XLA:CPU streams the weight faster as `weight @ x.T`
    than as `x @ weight.T`, which it makes a loop fusion: a batch-1 Gemma decode step ~23% faster on
    JAX, ~12% on TensorFlow. A symbolic row count (exporting for any batch) takes the plain product.
    """
    rows = x.shape[0]
    if small_rows and isinstance(rows, int) and rows <= SMALL_ROWS:
        return ops.transpose(ops.matmul(weight, ops.transpose(x)))
    return ops.matmul(x, ops.transpose(weight))


def write_slices(cache, rows, starts, updates):
    """cache (B, S, ...) with cache[rows[i], starts[i] : starts[i] + T] = updates[i] (N, T, ...), N small:
    one `slice_update` per row, contiguous writes that never read the old values."""
    updates = keras.ops.cast(updates, cache.dtype)
    zeros = (0,) * (len(cache.shape) - 2)
    for i in range(updates.shape[0]):
        cache = ops.slice_update(cache, (rows[i], starts[i], *zeros), updates[i : i + 1])
    return cache
