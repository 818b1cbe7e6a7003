"""Projections as Keras `EinsumDense` layers whose kernels keep the checkpoint's own (out, in) layout.

Keeping PyTorch's layout ("btd,fd->btf", or "btd,nhd->btnh" into heads) makes loading a reshape
instead of a transpose (~2.4 s for 1 GB on 2 cores), and the products are as fast or faster in it
on every backend. Each runs as one 2-D matmul of the flattened input with a 2-D view of the
kernel: TensorFlow's batched matmul on (b, t, d) is ~30% slower, XLA:CPU copies a 3-D heads kernel
on every call, and PyTorch's einsum re-parses its equation each time. Only the float `call` is
replaced: Keras' `enable_lora` and quantisation keep working.
"""

import math

import keras
from keras import ops

from zoo import backends
from zoo.layers import init


def _parse(equation: str) -> tuple[str, str, str, bool]:
    """"btd,nhd->btnh" -> (batch "bt", contracted "d", out "nh", kernel_out_first True)."""
    inputs, rest = equation.replace("...", "").split(",")
    kernel, output = rest.split("->")
    contracted = "".join(c for c in inputs if c in kernel)
    out = "".join(c for c in kernel if c not in inputs)
    batch = inputs[: len(inputs) - len(contracted)]
    out_first = kernel == out + contracted
    if not (out_first or kernel == contracted + out) or inputs != batch + contracted or output != batch + out:
        raise ValueError(f"EinsumDense: {equation!r} must contract the input's trailing axes with one end of the kernel")
    return batch, contracted, out, out_first


@keras.saving.register_keras_serializable(package="zoo")
class EinsumDense(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` that contracts the input's trailing axes with one end of the kernel."""

    def __init__(self, equation: str, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        _, contracted, out, self._out_first = _parse(equation)
        self._num_contracted, self._num_out = len(contracted), len(out)

    def call(self, inputs, training=None):
        shape = ops.shape(inputs)
        kernel_shape = tuple(self.kernel.shape)
        bias = self.bias
        if self._out_first:
            out_shape, inner = kernel_shape[: self._num_out], math.prod(kernel_shape[self._num_out:])
            weight = ops.reshape(self.kernel, (math.prod(out_shape), inner))  # (f, d)
            x2d = ops.reshape(inputs, (-1, inner))  # (m, d)
            if bias is not None and tuple(bias.shape) == out_shape:  # a bias per output: fused where it pays
                x, bias = backends.linear(x2d, weight, ops.reshape(bias, (-1,))), None
            else:
                x = backends.matmul_out_in(x2d, weight)
        else:
            out_shape, inner = kernel_shape[self._num_contracted:], math.prod(kernel_shape[: self._num_contracted])
            x = ops.matmul(ops.reshape(inputs, (-1, inner)), ops.reshape(self.kernel, (inner, math.prod(out_shape))))
        if bias is None and self.activation is not None:  # on the 2-D product, where a backend may fuse it
            x = self.activation(x)
        x = ops.reshape(x, (*shape[: len(shape) - self._num_contracted], *out_shape))  # (b, t, *out)
        if bias is not None:
            x = ops.add(x, bias)
            if self.activation is not None:
                x = self.activation(x)
        return x


def einsum_dense(equation: str, output_shape, bias_axes: str | None, name: str, dtype=None,
                 activation=None) -> EinsumDense:
    return EinsumDense(equation, output_shape=output_shape, bias_axes=bias_axes, kernel_initializer=init.normal(),
                       bias_initializer=init.zeros(), name=name, dtype=dtype, activation=activation)


def linear(units: int, name: str, dtype=None, use_bias: bool = True, activation=None) -> EinsumDense:
    """A dense layer over the last axis with a PyTorch-layout kernel (units, in), then `activation`."""
    return einsum_dense("...d,fd->...f", (units,), "f" if use_bias else None, name, dtype, activation)
