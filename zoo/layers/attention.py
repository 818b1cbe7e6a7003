"""Attention for every model: grouped-query, with masks, soft-capping and dropout, on each backend's fastest exact kernel.

q (b, t, n, h); k and v (b, s, k, h), k dividing n; mask (b, t, s), True where a query may attend.
The kernels compute the same thing; the backend picks one for its device per call kind, "plain"
or "masked" (`zoo.backends`: its `ATTENTION`); soft-capping and dropout take the reference.
`zoo.backends.use_attention(name)` forces a kernel, `zoo.backends.describe()` shows the choice.

- reference: the references' eager maths, softmax in float32, masks as float32's minimum.
- heads_first: heads-first products, the softmax normalised after the product with v; XLA:CPU's fastest.
- heads_first_softmax: the same around the backend's one-kernel softmax (TensorFlow's).
- fused: `keras.ops.dot_product_attention` (the device's fused kernel: cuDNN's under JAX on a GPU).
- sdpa: PyTorch's `scaled_dot_product_attention` (`zoo.backends.torch`).
"""

import numpy as np
from keras import ops

from zoo import backends
from zoo.errors import BackendError
from zoo.layers.dtypes import cast

MASKED = float(np.finfo(np.float32).min)  # a finite "minus infinity", as the reference's masks use


def reference(q, k, v, scale, mask=None, softcap=None, dropout=None, training=False):
    b, t, n, h = ops.shape(q)[0], ops.shape(q)[1], q.shape[2], q.shape[3]
    groups = k.shape[2]
    q = ops.reshape(q, (b, t, groups, n // groups, h))  # (b, t, k, g, h)
    scores = ops.einsum("btkgh,bskh->bkgts", q, k) * ops.cast(scale, q.dtype)  # (b, k, g, t, s)
    if softcap:
        cap = ops.cast(softcap, scores.dtype)
        scores = ops.tanh(scores / cap) * cap
    scores = cast(scores, "float32")  # the softmax in float32, as the references
    if mask is not None:
        scores = ops.where(mask[:, None, None], scores, MASKED)  # mask (b, 1, 1, t, s)
    probs = cast(ops.softmax(scores, axis=-1), v.dtype)
    if dropout is not None and training:
        probs = dropout(probs, training=True)
    out = ops.einsum("bkgts,bskh->btkgh", probs, v)  # (b, t, k, g, h)
    return ops.reshape(out, (b, t, n, h))


def _heads_first_scores(q, k, v, scale):
    """(b, t, n, h) inputs -> scaled scores (b, n, t, s) and v as (b, n, s, h): plain batched products."""
    q, k, v = (ops.transpose(x, (0, 2, 1, 3)) for x in (q, k, v))
    return ops.matmul(q * ops.cast(scale, q.dtype), ops.transpose(k, (0, 1, 3, 2))), v


def heads_first(q, k, v, scale, mask=None):
    scores, v = _heads_first_scores(q, k, v, scale)
    weights = ops.exp(scores - ops.max(scores, axis=-1, keepdims=True))  # unnormalised softmax
    out = ops.matmul(weights, v) / ops.sum(weights, axis=-1, keepdims=True)  # (b, n, t, h)
    return ops.transpose(out, (0, 2, 1, 3))  # (b, t, n, h)


def heads_first_softmax(q, k, v, scale, mask=None):
    scores, v = _heads_first_scores(q, k, v, scale)
    return ops.transpose(ops.matmul(ops.softmax(scores, axis=-1), v), (0, 2, 1, 3))  # (b, t, n, h)


def fused(q, k, v, scale, mask=None):
    return ops.dot_product_attention(q, k, v, mask=None if mask is None else mask[:, None], scale=scale)


KERNELS = {"reference": reference, "heads_first": heads_first, "heads_first_softmax": heads_first_softmax,
           "fused": fused, **backends.ATTENTION_KERNELS}
PLAIN_ONLY = {"heads_first", "heads_first_softmax"}  # no mask, and as many KV heads as query heads


def kernel_for(masked: bool, grouped: bool) -> str:
    """The kernel a call of this kind runs on: the forced one if it can, else the backend's choice if it can."""
    for name in (backends.forced_attention(), backends.attention_kernel(masked)):
        if name is not None and name not in KERNELS:
            raise BackendError(f"unknown attention kernel {name!r} on this backend; expected one of {sorted(KERNELS)}")
        if name is not None and not (name in PLAIN_ONLY and (masked or grouped)):
            return name
    return "reference"


def attention(q, k, v, scale: float, mask=None, softcap: float | None = None, dropout=None, training: bool = False):
    """softmax(q k^T * scale, soft-capped as cap * tanh(scores / cap), masked) v, each query head over its
    KV head; `dropout` (a layer) applies to the attention weights when `training`."""
    if softcap or (dropout is not None and training):
        return reference(q, k, v, scale, mask, softcap, dropout, training)
    return KERNELS[kernel_for(mask is not None, k.shape[2] != q.shape[2])](q, k, v, scale, mask)
