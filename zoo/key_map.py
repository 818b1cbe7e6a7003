"""Declarative maps from checkpoint tensor names to model weights, and the one loader that walks them.

A key map is a list of `Row`s: a source name pattern (`{i}` stands for a layer index), the
model weight path(s) it fills, and a named transform. A row with several targets splits a
fused source tensor (timm's `qkv`) along its first axis. A row with no target ignores the
tensor on purpose. Every transform has an inverse, so the same table writes checkpoints back.

Loading is strict and happens in two steps: `plan` checks names and shapes against the
checkpoint headers without reading any data, and only then `load` streams the tensors in.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np

from zoo import backends
from zoo.checkpoint import Checkpoint, PendingTensor
from zoo.errors import (CheckpointError, CorruptCheckpointError, MissingWeightsError, ShapeMismatchError,
                        UnexpectedWeightsError)
from zoo.host import all_finite, astype_aligned, host_dtype
from zoo.safetensors_file import TensorInfo

Shape = tuple[int, ...]


Region = tuple[slice, ...]  # a part of a tensor: one slice per axis, each with a start and a stop


@dataclass(frozen=True)
class Transform:
    """Source tensor <-> one target weight, plus the source shape a target shape implies, and the part of
    the source a part of the target comes from: `region(target_shape, part)` gives the source's region
    and what turns that region into the part (for loading one device's shard)."""

    forward: Callable[[np.ndarray, Shape], np.ndarray]
    inverse: Callable[[np.ndarray], np.ndarray]
    source_shape: Callable[[Shape], Shape]
    region: Callable[[Shape, Region], tuple[Region, Callable[[np.ndarray], np.ndarray]]]


def _heads_region(t: Shape, part: Region, heads_axis: int):
    """Source region of a kernel whose source axis `heads_axis` holds (heads * head width): whole heads are
    read, then the part's head-width slice is taken from them."""
    n, h = part[heads_axis], part[heads_axis + 1]
    rows = slice(n.start * t[heads_axis + 1], n.stop * t[heads_axis + 1])
    source = (*part[:heads_axis], rows, *part[heads_axis + 2:])
    shape = tuple(s.stop - s.start for s in part[:heads_axis]) + (n.stop - n.start, t[heads_axis + 1]) + tuple(
        s.stop - s.start for s in part[heads_axis + 2:])
    within = (slice(None),) * (heads_axis + 1) + (slice(h.start, h.stop),)
    return source, lambda x: x.reshape(shape)[within]


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda x, t: x, lambda w: w, lambda t: t, lambda t, part: (part, lambda x: x)),
    # Linear weight (out, in) <-> kernel (in, out), for layers that keep Keras' layout.
    "transpose": Transform(lambda x, t: x.T, lambda w: w.T, lambda t: t[::-1], lambda t, part: (part[::-1], np.transpose)),
    # Linear weight (n*h, d) <-> kernel (n, h, d): the rows split into heads (a free reshape).
    "rows_to_heads": Transform(
        lambda x, t: x.reshape(t), lambda w: w.reshape(-1, w.shape[-1]), lambda t: (t[0] * t[1], t[2]),
        lambda t, part: _heads_region(t, part, 0),
    ),
    # Linear weight (d, n*h) <-> kernel (d, n, h): the columns split into heads.
    "cols_to_heads": Transform(
        lambda x, t: x.reshape(t), lambda w: w.reshape(w.shape[0], -1), lambda t: (t[0], t[1] * t[2]),
        lambda t, part: _heads_region(t, part, 1),
    ),
    # Bias (n*h,) <-> (n, h).
    "heads_bias": Transform(lambda x, t: x.reshape(t), lambda w: w.reshape(-1), lambda t: (math.prod(t),),
                            lambda t, part: _heads_region(t, part, 0)),
    # Conv2d weight (d, c, p, q) <-> Keras Conv2D kernel (p, q, c, d).
    "conv_patch": Transform(
        lambda x, t: x.transpose(2, 3, 1, 0),
        lambda w: w.transpose(3, 2, 0, 1),
        lambda t: (t[3], t[2], t[0], t[1]),
        lambda t, part: ((part[3], part[2], part[0], part[1]), lambda x: x.transpose(2, 3, 1, 0)),
    ),
}


@dataclass(frozen=True)
class Row:
    """One line of a key map.

    Args:
        source: checkpoint tensor name; `{i}` matches a layer index.
        target: model weight path relative to the model (`layers_{i}/q_proj/kernel`),
            a tuple of paths to split a fused tensor along its first axis, or None to ignore it.
        transform: a name from `TRANSFORMS`, applied to each part.
    """

    source: str
    target: str | tuple[str, ...] | None
    transform: str = "identity"

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {self.transform!r}; expected one of {sorted(TRANSFORMS)}")

    @property
    def targets(self) -> tuple[str, ...]:
        if self.target is None:
            return ()
        return (self.target,) if isinstance(self.target, str) else self.target


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)") + "$")


@dataclass(frozen=True)
class Assignment:
    """One checkpoint tensor and the model weights it fills."""

    source: TensorInfo
    targets: tuple[str, ...]
    transform: str


def weights_by_path(model) -> dict:
    """The model's weights keyed by their path relative to the model (`layers_0/fc1/kernel`)."""
    prefix = model.name + "/"
    return {v.path[len(prefix):] if v.path.startswith(prefix) else v.path: v for v in model.weights}


def plan(rows: list[Row], checkpoint: Checkpoint, weights: dict) -> list[Assignment]:
    """Matches every checkpoint tensor to weights and checks every shape, reading no data."""
    compiled = [(row, _pattern(row.source)) for row in rows]
    assignments, unexpected, filled = [], [], {}
    for name, info in checkpoint.tensors.items():
        match = next(((row, m) for row, p in compiled if (m := p.match(name))), None)
        if match is None:
            unexpected.append(info)
            continue
        row, m = match
        targets = tuple(t.replace("{i}", m.group("i")) if "{i}" in t else t for t in row.targets)
        if any(t not in weights for t in targets):
            unexpected.append(info)
            continue
        for t in targets:
            if t in filled:
                raise CheckpointError(f"weight {t} would be filled by both {filled[t]!r} and {name!r}")
            filled[t] = name
        if targets:
            _check_shape(info, targets, row.transform, weights)
            assignments.append(Assignment(info, targets, row.transform))
    if unexpected:
        listing = ", ".join(f"{t.name} {t.shape} in {t.file.name}" for t in unexpected[:8])
        more = f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""
        raise UnexpectedWeightsError(
            f"{checkpoint.folder}: {len(unexpected)} checkpoint tensor(s) match no weight of the model "
            f"(does config.json describe this checkpoint?): {listing}{more}"
        )
    missing = [path for path in weights if path not in filled]
    if missing:
        listing = ", ".join(
            "{} (expected shape {}, for {})".format(*_expected_source(rows, p, weights), p) for p in missing[:8]
        )
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise MissingWeightsError(
            f"{checkpoint.folder}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {listing}{more}"
        )
    return assignments


def _check_shape(info: TensorInfo, targets: tuple[str, ...], transform: str, weights: dict) -> None:
    expected = _joint_source_shape([tuple(weights[t].shape) for t in targets], transform)
    if tuple(info.shape) != expected:
        raise ShapeMismatchError(
            f"{info.name}: expected {expected}, got {tuple(info.shape)} in {info.file.name} "
            f"(fills {', '.join(f'{t} {tuple(weights[t].shape)}' for t in targets)})"
        )


def _joint_source_shape(target_shapes: list[Shape], transform: str) -> Shape:
    parts = [TRANSFORMS[transform].source_shape(s) for s in target_shapes]
    return (sum(p[0] for p in parts), *parts[0][1:])


def _expected_source(rows: list[Row], path: str, weights: dict) -> tuple[str, Shape | None]:
    """The checkpoint tensor that would fill the weight at `path`, and its shape."""
    for row in rows:
        for t in row.targets:
            if m := _pattern(t).match(path):
                i = m.groupdict().get("i")
                targets = [t.replace("{i}", i) if i is not None else t for t in row.targets]
                shape = _joint_source_shape([tuple(weights[t].shape) for t in targets], row.transform)
                return (row.source.replace("{i}", i) if i is not None else row.source), shape
    return f"<no row of the key map fills {path}>", None


def load(assignments: list[Assignment], checkpoint: Checkpoint, weights: dict, check_finite: bool = True,
         finite=None) -> None:
    """Streams each planned tensor into its weight(s), casting to the weight's dtype; with `check_finite`, a
    tensor holding NaN or infinity is a `CorruptCheckpointError` (a model that would answer NaN). `finite`:
    a `FiniteCheck` that has the answer for some tensors already (the others are checked here)."""
    for a, array in zip(assignments, checkpoint.read_many([a.source.name for a in assignments])):
        if check_finite:
            known = finite.answer(a.source.name) if finite is not None else None
            if not (all_finite(array) if known is None else known):
                raise CorruptCheckpointError(f"{a.source.name} in {a.source.file.name} holds NaN or infinite values; "
                                             "pass allow_nonfinite=True to from_preset to load it anyway")
        transform = TRANSFORMS[a.transform]
        shapes = [tuple(weights[t].shape) for t in a.targets]
        sizes = [transform.source_shape(s)[0] for s in shapes]
        parts = np.split(array, np.cumsum(sizes)[:-1], axis=0) if len(shapes) > 1 else [array]
        for path, part, shape in zip(a.targets, parts, shapes):
            variable = weights[path]
            value, dtype = transform.forward(part, shape), host_dtype(variable.dtype)
            if value.dtype != dtype:
                value = astype_aligned(value, dtype)
            backends.set_value(variable, value)
        del array, parts


def load_sharded(assignments: list[Assignment], checkpoint: Checkpoint, weights: dict,
                 check_finite: bool = True) -> None:
    """As `load`, under a distribution: each device's shard of each weight is read from the checkpoint by
    slice (`Checkpoint.read_region`), so no tensor meant to be split is ever read whole."""
    distribution = keras.distribution.distribution()
    for a in assignments:
        transform = TRANSFORMS[a.transform]
        offset = 0  # a fused source (timm's qkv): this target's first row
        for path in a.targets:
            variable = weights[path]
            shape, dtype = tuple(variable.shape), host_dtype(variable.dtype)

            def read(index, a=a, transform=transform, shape=shape, dtype=dtype, offset=offset):
                part = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
                region, finish = transform.region(shape, part)
                if region:  # a fused source: this target's rows start at `offset`
                    region = (slice(region[0].start + offset, region[0].stop + offset), *region[1:])
                array = finish(checkpoint.read_region(a.source.name, region, dtype))
                if check_finite and not all_finite(array):
                    raise CorruptCheckpointError(f"{a.source.name} in {a.source.file.name} holds NaN or infinite "
                                                 "values; pass allow_nonfinite=True to from_preset to load it anyway")
                return array if array.flags.c_contiguous else astype_aligned(array, dtype)

            backends.set_sharded(variable, distribution.get_variable_layout(variable), read)
            offset += transform.source_shape(shape)[0]


def export(rows: list[Row], weights: dict) -> list[PendingTensor]:
    """The checkpoint tensors the map's rows produce from the model's weights, for `write_checkpoint`."""
    pending, written = [], set()
    for row in rows:
        if not row.targets:
            continue
        for index in layer_indices(row, weights):
            targets = [t.replace("{i}", index) if index is not None else t for t in row.targets]
            written.update(targets)
            variables = [weights[t] for t in targets]
            name = row.source.replace("{i}", index) if index is not None else row.source
            transform = TRANSFORMS[row.transform]

            def produce(variables=variables, transform=transform):
                parts = [transform.inverse(keras.ops.convert_to_numpy(v.value)) for v in variables]
                return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

            nbytes = sum(math.prod(v.shape) * host_dtype(v.dtype).itemsize for v in variables)
            pending.append(PendingTensor(name, nbytes, produce))
    left = sorted(set(weights) - written)
    if left:  # e.g. LoRA adapters: the checkpoint layout has no place for them, and they must not vanish unsaid
        raise UnexpectedWeightsError(
            f"{len(left)} of the model's weights have no tensor in the checkpoint layout, so a saved checkpoint "
            f"would lose them: {', '.join(left[:8])}{' ...' if len(left) > 8 else ''}; merge LoRA adapters into "
            "their kernels before saving"
        )
    return pending


def layer_indices(row: Row, weights: dict) -> list[str | None]:
    first = row.targets[0]
    if "{i}" not in first:
        return [None] if first in weights else []
    pattern = _pattern(first)
    found = {m.group("i") for path in weights if (m := pattern.match(path))}
    return sorted(found, key=int)
