"""Projections as Keras `EinsumDense` layers whose kernels keep the checkpoint's own (out, in) layout.

Keeping PyTorch's layout ("btd,fd->btf", or "btd,nhd->btnh" into heads) makes loading a reshape
instead of a transpose (~2.4 s for 1 GB on 2 cores), and the products are as fast or faster in it
on every backend. Each runs as one 2-D matmul of the flattened input with a 2-D view of the
kernel: TensorFlow's batched matmul on (b, t, d) is ~30% slower, XLA:CPU copies a 3-D heads kernel
on every call, and PyTorch's einsum re-parses its equation each time. Only the float `call` is
replaced: Keras' quantisation keeps working.

A projection also carries the LoRA adapters `zoo.lora` puts on it (`adapters`, `active`): named,
added and removed after the model is built, so they sit outside Keras' tracked state and are
listed by `weights`/`variables` (the trainers, the optimizer and compiled steps see them there).
A served model's projections also hold a `Bank` (`zoo.lora.bank`): many adapters stacked, one per
batch row, chosen by the `adapters` argument of the call.
"""

import math
from dataclasses import dataclass, field

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


def _dtype(x) -> str:
    return keras.backend.standardize_dtype(x.dtype)


@dataclass(eq=False)
class LowRank:
    """One LoRA adapter on one projection: adds `scale * dropout(x) @ lora_A.T @ lora_B.T`.

    `lora_A` (r, in) and `lora_B` (out, r) have PEFT's shapes over the kernel's (out, in) view;
    dropout applies to the adapter's input when training, as PEFT's does.
    """

    lora_A: keras.Variable
    lora_B: keras.Variable
    scale: float
    dropout: float = 0.0
    seed: keras.random.SeedGenerator | None = None

    @property
    def weights(self) -> list:
        return [self.lora_A, self.lora_B]

    def delta(self, x2d, training):
        """x (m, in) -> the adapter's addition (m, out), computed in the adapter's dtype (float32 unless autocast)."""
        a, b = self.lora_A.value, self.lora_B.value
        x2d = ops.cast(x2d, _dtype(a))
        if training and self.dropout:
            x2d = keras.random.dropout(x2d, self.dropout, seed=self.seed)
        return backends.matmul_out_in(backends.matmul_out_in(x2d, a), b) * self.scale  # (m, r) -> (m, out)


@dataclass(eq=False)
class Replacement:
    """An adapter's own copy of a whole projection (PEFT's `modules_to_save`: a new classifier head)."""

    kernel: keras.Variable
    bias: keras.Variable | None

    @property
    def weights(self) -> list:
        return [self.kernel] + ([self.bias] if self.bias is not None else [])


@dataclass(eq=False)
class Bank:
    """Many adapters on one projection, for a batch whose rows use different ones (`zoo.lora.bank`).

    Slot j (1..S) holds an adapter zero-padded to the bank's rank R: `lora_A` (S, R, in), `lora_B`
    (out, S*R) (slot j's (out, R) block at columns (j-1)*R...) and `scale` (S,); slot 0 is the base
    model, no adapter. Every row is multiplied through every slot's A and B with the other slots'
    ranks zeroed: two plain matmuls, no gather, which is fastest while S*R is small against the
    projection's width. Padding adds exact zeros.
    """

    lora_A: keras.Variable
    lora_B: keras.Variable
    scale: keras.Variable

    @property
    def weights(self) -> list:
        return [self.lora_A, self.lora_B, self.scale]

    def delta(self, x2d, rows, slots):
        """x (m, in), whose m = b * t rows belong to batch rows in slots `slots` (b,) -> each row's update (m, out)."""
        s, r, d = self.lora_A.shape
        x2d = ops.cast(x2d, _dtype(self.lora_A))
        low = backends.matmul_out_in(x2d, ops.reshape(self.lora_A.value, (s * r, d)))  # (m, S*R)
        mine = ops.cast(slots[:, None] == ops.arange(1, s + 1, dtype="int32")[None, :], low.dtype)  # (b, S)
        low = ops.reshape(low, (rows, -1, s, r)) * (mine * self.scale.value)[:, None, :, None]  # (b, t, S, R)
        return backends.matmul_out_in(ops.reshape(low, (-1, s * r)), self.lora_B.value)  # (m, out)


@dataclass(eq=False)
class Adapters:
    """The adapters on one projection by name, and the one in use (None: the base weights alone); and the
    served adapters' bank, if the model serves several at once."""

    by_name: dict = field(default_factory=dict)
    active: str | None = None
    bank: Bank | None = None

    def weights(self) -> list:
        return [w for a in self.by_name.values() for w in a.weights] + (self.bank.weights if self.bank else [])


@keras.saving.register_keras_serializable(package="zoo")
class EinsumDense(keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` that contracts the input's trailing axes with one end of the kernel."""

    def __init__(self, equation: str, output_shape, **kwargs):
        super().__init__(equation, output_shape, **kwargs)
        _, contracted, out, self._out_first = _parse(equation)
        self._num_contracted, self._num_out = len(contracted), len(out)
        self.adapters = Adapters()  # not Keras state: a plain object, so adding adapters after build is allowed

    @property
    def out_in_shape(self) -> tuple[int, int] | None:
        """The kernel as a PyTorch (out, in) matrix, or None if it is stored the other way round."""
        if not self._out_first:
            return None
        shape = tuple(self.kernel.shape)
        return math.prod(shape[: self._num_out]), math.prod(shape[self._num_out:])

    @property
    def weights(self):
        return super().weights + self.adapters.weights()

    @property
    def variables(self):
        seeds = [a.seed.state for a in self.adapters.by_name.values() if getattr(a, "seed", None) is not None]
        return super().variables + self.adapters.weights() + seeds

    def call(self, inputs, training=None, adapters=None):
        """`adapters` (b,): each batch row's slot in the projection's bank (0: none), if it has one."""
        shape = ops.shape(inputs)
        adapter = self.adapters.by_name.get(self.adapters.active)
        kernel, bias = (adapter.kernel, adapter.bias) if isinstance(adapter, Replacement) else (self.kernel, self.bias)
        kernel_shape = tuple(kernel.shape)
        if self._out_first:
            out_shape, inner = kernel_shape[: self._num_out], math.prod(kernel_shape[self._num_out:])
            weight = ops.reshape(kernel, (math.prod(out_shape), inner))  # (f, d)
            x2d = ops.reshape(inputs, (-1, inner))  # (m, d)
            if bias is not None and tuple(bias.shape) == out_shape:  # a bias per output: fused where it pays
                x, bias = backends.linear(x2d, weight, ops.reshape(bias, (-1,))), None
            else:
                x = backends.matmul_out_in(x2d, weight)
            if isinstance(adapter, LowRank):  # added in the adapter's dtype, then back to the layer's, as PEFT does
                delta = adapter.delta(x2d, training)
                x = ops.cast(ops.cast(x, _dtype(delta)) + delta, _dtype(x))
            if adapters is not None and self.adapters.bank is not None:
                delta = self.adapters.bank.delta(x2d, shape[0], ops.convert_to_tensor(adapters, "int32"))
                x = ops.cast(ops.cast(x, _dtype(delta)) + delta, _dtype(x))
        else:
            out_shape, inner = kernel_shape[self._num_contracted:], math.prod(kernel_shape[: self._num_contracted])
            x = ops.matmul(ops.reshape(inputs, (-1, inner)), ops.reshape(kernel, (inner, math.prod(out_shape))))
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
