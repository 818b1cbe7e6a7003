"""Attention for every model: grouped-query, with masks, soft-capping and dropout, on each backend's fastest exact kernel.

Shapes: q (b, t, n, h); k and v (b, s, k, h), k dividing n (g = n // k query heads per KV head);
mask (b, t, s), True where a query may attend (its batch axis may be 1). Out: (b, t, n, h).

The kernels compute the same thing in different ways. Which one runs is the backend's choice for
its device (`zoo.backends`, its `ATTENTION` table), made per call kind: "plain" (no mask) or
"masked". Soft-capping and attention dropout run on the reference kernel, which no fused kernel
matches. `zoo.backends.use_attention(name)` forces a kernel; `zoo.backends.describe()` shows the choice.

- reference: the references' eager computation, scores and softmax in float32 (Gemma's exact
  form, masks as the float32 minimum, as transformers' masks are).
- heads_first: heads-first batched products, the softmax left unnormalised until after the
  product with v (the division then runs on t x h values instead of t x s); XLA:CPU's fastest.
- heads_first_softmax: heads-first products around the backend's one-kernel softmax (TensorFlow).
- fused: `keras.ops.dot_product_attention`, which picks the device's fused kernel (cuDNN flash
  attention under JAX on a GPU).
- sdpa: PyTorch's `scaled_dot_product_attention` (in `zoo.backends.torch`).
"""

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Kernel:
    run: object
    masks: bool  # takes a mask
    groups: bool  # takes fewer KV heads than query heads


KERNELS = {
    "reference": Kernel(reference, masks=True, groups=True),
    "heads_first": Kernel(heads_first, masks=False, groups=False),
    "heads_first_softmax": Kernel(heads_first_softmax, masks=False, groups=False),
    "fused": Kernel(fused, masks=True, groups=True),
    **{name: Kernel(run, masks=True, groups=True) for name, run in backends.attention_kernels().items()},
}


def kernel_for(masked: bool, grouped: bool) -> str:
    """The kernel a call of this kind runs on: the forced one if it can, else the backend's choice if it can."""
    for name in (backends.forced_attention(), backends.attention_kernel(masked)):
        if name is None:
            continue
        if name not in KERNELS:
            raise BackendError(f"the attention kernel {name!r} does not run on this backend (see zoo.backends.describe())")
        kernel = KERNELS[name]
        if (kernel.masks or not masked) and (kernel.groups or not grouped):
            return name
    return "reference"


def attention(q, k, v, scale: float, mask=None, softcap: float | None = None, dropout=None, training: bool = False):
    """softmax(q k^T * scale [soft-capped] [masked]) v, per query head over its KV head; see the module docstring.

    Args:
        q, k, v: (b, t, n, h), (b, s, k, h), (b, s, k, h).
        scale: multiplies the scores (1 / sqrt(h) for most models).
        mask: (b, t, s) booleans, True where a query attends; None attends everywhere.
        softcap: cap * tanh(scores / cap) before masking (Gemma 2).
        dropout: a dropout layer applied to the attention weights when `training`.
    """
    if softcap or (dropout is not None and training):
        return reference(q, k, v, scale, mask, softcap, dropout, training)
    name = kernel_for(mask is not None, k.shape[2] != q.shape[2])
    if name == "reference":
        return reference(q, k, v, scale, mask)
    return KERNELS[name].run(q, k, v, scale, mask)
