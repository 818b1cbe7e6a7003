"""Rewrites a checkpoint folder so that JAX and TensorFlow load it without a copy (`zoo checkpoint align`).

Files written by the safetensors library (transformers' `save_pretrained`, most of the Hub)
place tensors 8-byte aligned, and JAX and TensorFlow use host memory in place only at
64-byte-aligned addresses, so loading such a file reads every tensor into fresh memory
(`zoo.checkpoint.Checkpoint.read_many`). The rewritten files, by `zoo.safetensors_file.write_safetensors`,
hold the same tensors (for shards, those the index names), names, shapes, dtypes and metadata in
the same shards under the same names, and load in the safetensors library and in transformers as before.

Usage:
    zoo checkpoint align FOLDER [--output DIR]
"""

import itertools
import mmap
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open

from zoo.checkpoint import Checkpoint
from zoo.errors import CheckpointError
from zoo.safetensors_file import ALIGNMENT, TensorInfo, numpy_dtype, write_safetensors


@dataclass(frozen=True)
class AlignedFile:
    """What `align_checkpoint` did to one file: how many of its tensors lay 64-byte aligned before and after."""

    path: Path
    tensors: int
    aligned_before: int
    aligned_after: int


def align_checkpoint(source: str | os.PathLike, output: str | os.PathLike | None = None) -> list[AlignedFile]:
    """Rewrites the safetensors files of a checkpoint folder with every sizeable tensor 64-byte aligned.

    Args:
        source: a checkpoint folder (`model.safetensors`, or shards with an index).
        output: where to write; by default the files in `source` are replaced. Each new file is
            written beside the old one and renamed over it, so a failure leaves the old file, and
            a model whose weights map the old file keeps it. Into another folder, the other files
            of `source` (config.json, the index, tokenizer files, ...) are copied as they are.
    """
    source = Path(source)
    checkpoint = Checkpoint.open(source)  # every header checked before anything is written
    output = source if output is None else Path(output)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"{output}: exists and is not a folder; --output names the folder to write the checkpoint to")
    output.mkdir(parents=True, exist_ok=True)
    if output.resolve() != source.resolve():
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, output / item.name)
    by_file = {path: list(infos) for path, infos in
               itertools.groupby(sorted(checkpoint.tensors.values(), key=lambda t: (t.file, t.offset)), lambda t: t.file)}
    for path, infos in by_file.items():
        _rewrite(path, infos, output / path.name)
    aligned = Checkpoint.open(output).tensors
    return [AlignedFile(output / path.name, len(infos), sum(1 for t in infos if t.offset % ALIGNMENT == 0),
                        sum(1 for t in infos if aligned[t.name].offset % ALIGNMENT == 0))
            for path, infos in by_file.items()]


def _rewrite(path: Path, infos: list[TensorInfo], target: Path) -> None:
    with safe_open(path, framework="numpy") as f:
        metadata = f.metadata()
    partial = target.with_name(f".{target.name}.partial")
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    arrays = {}
    try:
        for info in infos:  # views of the page cache, not copies
            data = np.frombuffer(mapping, np.uint8, info.nbytes, info.offset) if info.nbytes else np.empty(0, np.uint8)
            arrays[info.name] = data.view(numpy_dtype(info.dtype)).reshape(info.shape)
        try:
            write_safetensors(partial, arrays, metadata)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    finally:
        arrays = data = None  # the views go before their mapping closes
        mapping.close()
