"""What JAX and TensorFlow share, both compiling through XLA: KV-cache writes and products for few rows, in keras.ops."""

import keras
from keras import ops

SMALL_ROWS = 2


def matmul_out_in(x, weight, small_rows: bool):
    """x (m, d) times a PyTorch-layout weight (f, d), transposed: (m, f).

    With `small_rows` (chosen on a CPU) and one or two rows, a decode step at batch 1 or 2, the
    product is bound by reading the weight, and XLA:CPU streams a row-major (f, d) weight faster
    as `weight @ x.T` than as `x @ weight.T`, which it turns into a loop fusion: a Gemma decode
    step at batch 1 (benchmarks/generate.py's shape, LM head included) is ~23% faster on JAX and
    ~12% on TensorFlow. At batch 8 the plain product is ~9% faster on JAX. The row count is
    static when compiled; a symbolic one (exporting for any batch size) takes the plain product.
    """
    rows = x.shape[0]
    if small_rows and isinstance(rows, int) and rows <= SMALL_ROWS:
        return ops.transpose(ops.matmul(weight, ops.transpose(x)))
    return ops.matmul(x, ops.transpose(weight))


def write_slices(cache, rows, starts, updates):
    """cache (B, S, ...) with cache[rows[i], starts[i] : starts[i] + T] = updates[i] (N, T, ...), N small and static.

    One `slice_update` per row: contiguous writes that never read the old values (XLA:CPU still
    copies the donated cache once per step when attention reads it, O(cache), negligible next to
    the weights at the sizes we run).
    """
    updates = keras.ops.cast(updates, cache.dtype)
    zeros = (0,) * (len(cache.shape) - 2)
    for i in range(updates.shape[0]):
        cache = ops.slice_update(cache, (rows[i], starts[i], *zeros), updates[i : i + 1])
    return cache
