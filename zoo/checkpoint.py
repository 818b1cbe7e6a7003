"""Safetensors checkpoints in Hugging Face layout: listed from headers, read one tensor at a time.

A folder holds `model.safetensors` or shards named by `model.safetensors.index.json`. `open`
validates every header first (a truncated or lying file fails before any weight is touched).
`read_many` streams tensors: on PyTorch as views of the file's mapping (the weights' storage, as
transformers does); elsewhere a tensor starting on a 64-byte boundary is a view of a private
mapping, which JAX and TensorFlow take as the weight itself, and the others are read into fresh
aligned buffers (one copy; the safetensors library would make two and keep the pages resident).
`prefetch` moves those reads to background threads, overlapping the building of the model.
`write_checkpoint` writes the layout back, every sizeable tensor aligned. One file's concerns
(header, aligned reads, the readers, the writer) live in `zoo.safetensors_file`.
"""

import itertools
import mmap
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zoo import backends
from zoo.errors import CorruptCheckpointError, PresetNotFoundError
from zoo.files import read_json, write_json
from zoo.host import ALIGNMENT, astype_aligned
from zoo.safetensors_file import (FLOAT_CODES, FiniteCheck, Prefetcher, TensorInfo, numpy_dtype, read_header,
                                  read_tensor, write_safetensors)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3
WEIGHT_MAP = "an object with a 'weight_map' object of tensor name -> file"


class Checkpoint:
    """The tensors of a checkpoint folder, listed from the headers; data is read on demand.

    Example:
        >>> ckpt = Checkpoint.open("path/to/vit")  # doctest: +SKIP
        >>> ckpt.tensors["classifier.weight"].shape  # doctest: +SKIP
        (1000, 768)
    """

    def __init__(self, folder: Path, tensors: dict[str, TensorInfo]):
        self.folder = folder
        self.tensors = tensors
        self._prefetch: Prefetcher | None = None
        self._mappings: dict[Path, mmap.mmap | None] = {}  # private (copy-on-write) maps of the files
        self._cast_to: np.dtype | None = None  # what the readers cast floating tensors to

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "Checkpoint":
        folder = Path(folder)
        if (folder / INDEX_FILE).is_file():
            files = _files_from_index(folder)
        elif (folder / SINGLE_FILE).is_file():
            files = {folder / SINGLE_FILE: None}
        else:
            raise PresetNotFoundError(_no_weights_message(folder))
        tensors = {}
        for path, expected_names in files.items():
            header = read_header(path)
            if expected_names is not None:
                absent = sorted(set(expected_names) - set(header))
                if absent:
                    raise CorruptCheckpointError(
                        f"{folder / INDEX_FILE} places {absent[0]!r} in {path.name}, "
                        f"but {path.name} has no such tensor ({len(absent)} such names in all)"
                    )
            names = header if expected_names is None else expected_names
            for name in names:
                shape, dtype, offset = header[name]
                tensors[name] = TensorInfo(name, path, shape, dtype, offset)
        return cls(folder, tensors)

    def read_many(self, names: list[str]) -> Iterator[np.ndarray]:
        """Yields the tensors in order, each an array the caller owns (see the module docstring)."""
        for file, group in itertools.groupby(names, key=lambda n: self.tensors[n].file):
            group = list(group)
            yield from backends.read_mapped(file, group) if backends.read_mapped else self._read_copies(file, group)

    def read_region(self, name: str, region: tuple[slice, ...], dtype=None) -> np.ndarray:
        """One part of a tensor (a slice per axis), for loading a device's shard: copied (and cast to `dtype`)
        into a fresh 64-byte-aligned buffer, which JAX adopts as the shard itself, through a read-only mapping
        of the file opened for this read alone, so only the part's pages are read and none stay held. (The
        safetensors library's `get_slice` reads a part the same way, but has no bfloat16 in NumPy.)"""
        info = self.tensors[name]
        with open(info.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapping:
            if info.offset + info.nbytes > len(mapping):
                raise CorruptCheckpointError(f"{info.file.name}: cannot read tensor {info.name!r}: the file ends "
                                             f"{info.offset + info.nbytes - len(mapping)} bytes before its data does")
            whole = np.frombuffer(mapping, np.uint8, count=info.nbytes, offset=info.offset)
            view = whole.view(numpy_dtype(info.dtype)).reshape(info.shape)[region]
            part = astype_aligned(view, view.dtype if dtype is None else dtype)
            del whole, view  # no view may outlive the mapping
        return part

    def _read_copies(self, file: Path, names: list[str]) -> Iterator[np.ndarray]:
        with open(file, "rb", buffering=0) as handle:
            for name in names:
                info = self.tensors[name]
                if self._mappable(info):
                    yield self._view(info)
                    continue
                array = self._prefetch.take(name) if self._prefetch is not None else None
                yield array if array is not None else read_tensor(handle, info)

    def _mappable(self, info: TensorInfo) -> bool:
        """Whether `read_many` serves the tensor as a view of its file's private mapping: only a tensor
        starting on a 64-byte boundary (`write_safetensors` places every sizeable one so; the safetensors
        library's writer by chance) and not to be cast. Its pages are then the page cache's."""
        if info.offset % ALIGNMENT or not info.nbytes:
            return False
        if self._cast_to is not None and info.dtype.startswith(FLOAT_CODES) and numpy_dtype(info.dtype) != self._cast_to:
            return False
        if info.file not in self._mappings:
            try:
                with open(info.file, "rb") as f:
                    self._mappings[info.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError):  # a file system without mappings: read it instead
                self._mappings[info.file] = None
        return self._mappings[info.file] is not None

    def _view(self, info: TensorInfo) -> np.ndarray:
        mapping = self._mappings[info.file]
        if info.offset + info.nbytes > len(mapping):  # cut short since `open` read the header
            raise CorruptCheckpointError(
                f"{info.file.name}: cannot read tensor {info.name!r} (expected {info.dtype} {info.shape}): the file "
                f"ends {info.offset + info.nbytes - len(mapping)} bytes before the tensor's data does"
            )
        # Writable: a write copies the page (ACCESS_COPY) and never reaches the file.
        data = np.frombuffer(mapping, np.uint8, count=info.nbytes, offset=info.offset)
        return data.view(numpy_dtype(info.dtype)).reshape(info.shape)

    def prefetch(self, max_bytes: int | None = None, threads: int | None = None, cast_to=None) -> None:
        """Starts `threads` background readers (default: the backend's choice) of the tensors the mapping
        does not serve, so reading overlaps building the model.

        They stay at most `max_bytes` ahead of what `read_many` has taken (None: no bound, where the
        buffers become the weights, so read-ahead is never a second copy); a tensor not reached yet is
        read by the caller. Without a bound, `cast_to` has them cast floating tensors too. Mapped files
        are read ahead by the kernel instead (MADV_WILLNEED). `stop_prefetch` ends the readers.
        """
        if self._prefetch is not None:
            return
        self._cast_to = None if max_bytes is not None or cast_to is None else np.dtype(cast_to)
        order, mapped = [], set()
        for info in sorted(self.tensors.values(), key=lambda t: (str(t.file), t.offset)):
            if self._mappable(info):
                mapped.add(info.file)
            else:
                order.append(info)
        for file in mapped:  # the kernel reads a cold file in meanwhile; a warm one costs nothing
            if hasattr(mmap, "MADV_WILLNEED"):
                self._mappings[file].madvise(mmap.MADV_WILLNEED)
        if not order:
            return
        if threads is None:
            threads = backends.read_ahead_threads(bounded=max_bytes is not None)
        self._prefetch = Prefetcher(order, max_bytes, threads, cast_to if max_bytes is None else None)

    def check_finite(self) -> FiniteCheck | None:
        """Starts checking the floating tensors `read_many` serves as views of the file's mapping (stored as
        they load: none is cast) for NaN and infinity, in background threads (`FiniteCheck.answer`). The
        tensors read as copies are checked by the caller, as read (mapping them here too would count their
        pages twice while the copies are made); None where the backend maps the files itself."""
        if backends.read_mapped is not None:
            return None
        return FiniteCheck([info for info in self.tensors.values()
                            if info.dtype.startswith(FLOAT_CODES) and self._mappable(info)], self._view)

    def stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.stop()
            self._prefetch = None

    @property
    def files(self) -> list[Path]:
        return sorted({info.file for info in self.tensors.values()})


def _files_from_index(folder: Path) -> dict[Path, list[str]]:
    index_path = folder / INDEX_FILE
    weight_map = read_json(index_path, error=CorruptCheckpointError, holding=WEIGHT_MAP).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptCheckpointError(f"{index_path}: expected {WEIGHT_MAP}, got {weight_map!r:.100}")
    files: dict[Path, list[str]] = {}
    for name, file_name in weight_map.items():
        if not (isinstance(file_name, str) and file_name == Path(file_name).name and file_name not in (".", "..")):
            raise CorruptCheckpointError(f"{index_path}: tensor {name!r} should be a file name in the model folder, "
                                         f"got {file_name!r:.100}")
        path = folder / file_name
        if not path.is_file():
            raise CorruptCheckpointError(f"{index_path} places tensor {name!r} in {file_name}, which is not in {folder}")
        files.setdefault(path, []).append(name)
    return files


def _no_weights_message(folder: Path) -> str:
    others = sorted(p.name for p in folder.glob("*") if p.suffix in {".safetensors", ".bin", ".pth", ".h5"})
    found = f"; found {', '.join(others)}" if others else ""
    return (
        f"{folder}: expected {SINGLE_FILE} or {INDEX_FILE} (keras-zoo reads safetensors "
        f"checkpoints in Hugging Face layout){found}"
    )


# ----------------------------------------------------------------------------- writing


def parse_size(size: int | str) -> int:
    """`5 * 2**30`, "5GB" or "500MiB" -> bytes."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size: expected bytes or a size such as '5GB', got {size!r}")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


@dataclass(frozen=True)
class PendingTensor:
    """A tensor to write, produced only when its shard is written."""

    name: str
    nbytes: int
    produce: Callable[[], np.ndarray]


def write_checkpoint(folder: str | os.PathLike, tensors: Iterable[PendingTensor],
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE) -> list[Path]:
    """Writes tensors as `model.safetensors`, or as shards with an index above `max_shard_size`.

    Only one shard's tensors are held in memory at a time. Stale checkpoint files in the
    folder are removed first, so a folder that held more shards before stays consistent (and
    a model whose weights are views of the old files keeps them: unlinked, not overwritten).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    limit = parse_size(max_shard_size)
    shards: list[list[PendingTensor]] = [[]]
    used = 0
    for tensor in tensors:
        if shards[-1] and used + tensor.nbytes > limit:
            shards.append([])
            used = 0
        shards[-1].append(tensor)
        used += tensor.nbytes
    for stale in [*folder.glob("model*.safetensors"), folder / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map = {}
    for file_name, shard in zip(names, shards):
        write_safetensors(folder / file_name, {t.name: t.produce() for t in shard}, metadata={"format": "pt"})
        weight_map.update({t.name: file_name for t in shard})
    if count > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_json(folder / INDEX_FILE, index)
    return [folder / n for n in names]
