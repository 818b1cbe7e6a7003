"""One safetensors file: its header, its tensors read into aligned buffers (ahead, in threads), writing one.

`read_header` validates a header with the safetensors library and says which part of a file it
rejected. `read_tensor` reads a tensor straight into a fresh 64-byte-aligned buffer, which JAX and
TensorFlow adopt as it is (the library cannot read into a buffer we give it). `Prefetcher` runs
those reads in threads, `FiniteCheck` the NaN/infinity check; `write_safetensors` writes a file with
aligned tensors.
"""

import json
import math
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from zoo.errors import CheckpointError, CorruptCheckpointError
from zoo.host import ALIGNMENT, aligned_empty, all_finite, astype_aligned

# Bytes per element of each safetensors dtype code.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where a checkpoint tensor lives and what its header says it is."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str
    offset: int = -1  # where its bytes start in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


FLOAT_CODES = ("F", "BF")  # safetensors dtype codes of floating-point tensors: F16, F32, BF16, F8_E4M3...


def numpy_dtype(code: str):
    """The NumPy dtype of a safetensors dtype code (bfloat16 and float8 through ml_dtypes)."""
    import ml_dtypes

    special = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
               "BOOL": np.bool_}
    if code in special:
        return np.dtype(special[code])
    return np.dtype(f"<{code[0].lower()}{int(code[1:]) // 8}")  # "F32" -> "<f4", "I64" -> "<i8"


def read_tensor(handle, info: TensorInfo) -> np.ndarray:
    """One tensor's bytes, read from an open file into a fresh 64-byte-aligned buffer."""
    buffer = aligned_empty(info.nbytes)
    try:
        handle.seek(info.offset)
        view, done = memoryview(buffer), 0
        while done < info.nbytes:
            got = handle.readinto(view[done:])
            if not got:
                raise OSError(f"the file ends {info.nbytes - done} bytes into the tensor's data")
            done += got
    except OSError as e:
        raise CorruptCheckpointError(
            f"{info.file.name}: cannot read tensor {info.name!r} (expected {info.dtype} {info.shape}): {e}"
        ) from e
    return buffer.view(numpy_dtype(info.dtype)).reshape(info.shape)


class Prefetcher:
    """Background threads reading tensors ahead of their use (`zoo.checkpoint.Checkpoint.prefetch`).

    `readinto` releases the GIL, so the copies run while the caller builds Keras layers. Readers claim
    tensors in file order and reserve their bytes first, so the window bounds what is read or being
    read. An error is raised by `take` for the tensor that failed; the other readers then stop.
    """

    def __init__(self, order: list[TensorInfo], max_bytes: int | None, threads: int, cast_to=None):
        self._cond = threading.Condition()
        self._order = order
        self._index = {info.name: i for i, info in enumerate(order)}
        self._next = 0  # the next tensor in `order` to claim
        self._claimed: set[str] = set()  # being read now
        self._ready: dict[str, np.ndarray | Exception] = {}
        self._taken: set[str] = set()
        self._ahead = 0  # bytes read or being read and not yet taken
        self._max_bytes = max_bytes
        self._cast_to = None if cast_to is None else np.dtype(cast_to)
        self._waiting = 0  # readers blocked until the window has room
        self._running = threads
        self._stopped = self._failed = False
        self._threads = [threading.Thread(target=self._run, name="zoo-checkpoint-prefetch", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _claim(self) -> TensorInfo | None:
        """The next tensor to read, its bytes reserved; None once there is nothing left to read."""
        with self._cond:
            while True:
                while self._next < len(self._order) and self._order[self._next].name in self._taken:
                    self._next += 1
                if self._stopped or self._failed or self._next >= len(self._order):
                    return None
                info = self._order[self._next]
                if self._max_bytes is None or self._ahead == 0 or self._ahead + info.nbytes <= self._max_bytes:
                    self._next += 1
                    self._claimed.add(info.name)
                    self._ahead += info.nbytes
                    return info
                self._waiting += 1
                self._cond.notify_all()  # a caller waiting on this reader reads for itself
                self._cond.wait()
                self._waiting -= 1

    def _run(self) -> None:
        handles = {}
        try:
            while (info := self._claim()) is not None:
                try:
                    if info.file not in handles:
                        handles[info.file] = open(info.file, "rb", buffering=0)
                    result = read_tensor(handles[info.file], info)
                    cast = self._cast_to
                    if cast is not None and info.dtype.startswith(FLOAT_CODES) and result.dtype != cast:
                        result = astype_aligned(result, cast)
                except CorruptCheckpointError as e:
                    result = e
                except OSError:
                    result = None  # e.g. the file vanished: the caller's own read reports it
                with self._cond:
                    self._claimed.discard(info.name)
                    if isinstance(result, np.ndarray) and not self._stopped:
                        self._ready[info.name] = result
                    else:
                        self._ahead -= info.nbytes
                        if not isinstance(result, np.ndarray):  # an error, or a file that would not open
                            self._failed = True
                            if result is not None and not self._stopped:
                                self._ready[info.name] = result
                    self._cond.notify_all()
        finally:
            for handle in handles.values():
                handle.close()
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    def _coming(self, name: str) -> bool:
        """Whether a reader is reading `name` or will claim it without the caller taking anything."""
        if name in self._claimed:
            return True
        i = self._index.get(name)
        return (i is not None and i >= self._next and not (self._stopped or self._failed)
                and self._running > self._waiting)

    def take(self, name: str) -> np.ndarray | None:
        """The prefetched tensor, or None if the caller should read it itself (not reached yet)."""
        with self._cond:
            while name not in self._ready and self._coming(name):
                self._cond.wait()
            self._taken.add(name)
            result = self._ready.pop(name, None)
            if isinstance(result, np.ndarray):
                self._ahead -= self._order[self._index[name]].nbytes  # what its reader reserved
            self._cond.notify_all()
        if isinstance(result, Exception):
            raise result
        return result

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._ready.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


class FiniteCheck:
    """Whether tensors hold NaN or infinity, answered by background threads reading them in file order, so
    that the check overlaps building the model. `view(info)` gives a tensor's array: the views of the file's
    mapping that the load adopts as weights, so the pages read here are the ones the model maps anyway.
    (NumPy releases the GIL while it reads.)"""

    def __init__(self, tensors: list[TensorInfo], view, threads: int = 2):
        self._cond = threading.Condition()
        self._answers: dict[str, bool] = {}
        self._pending = {info.name for info in tensors}
        self._stopped = False
        ordered = sorted(tensors, key=lambda t: (str(t.file), t.offset))
        self._threads = [threading.Thread(target=self._run, args=(ordered[i::threads], view),
                                          name="zoo-checkpoint-finite", daemon=True) for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self, tensors: list[TensorInfo], view) -> None:
        try:
            for info in tensors:
                if self._stopped:
                    break
                try:
                    answer = all_finite(view(info))
                except CorruptCheckpointError:
                    answer = None  # the file does not hold it whole: the caller's read reports it
                with self._cond:
                    self._pending.discard(info.name)
                    if answer is not None:
                        self._answers[info.name] = answer
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._pending.difference_update(info.name for info in tensors)
                self._cond.notify_all()

    def answer(self, name: str) -> bool | None:
        """The tensor's answer, waited for; None if this check does not have one (the caller checks itself)."""
        with self._cond:
            while name in self._pending and not self._stopped:
                self._cond.wait()
            return self._answers.get(name)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """Name -> (shape, dtype, byte offset in the file), the header validated by the safetensors library."""
    try:
        with safe_open(path, framework="numpy") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            header = {name: (tuple(sl.get_shape()), sl.get_dtype()) for name, sl in slices.items()}
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            raw = json.loads(f.read(length))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptCheckpointError(_diagnose(path, e)) from e
    for name, (shape, dtype) in header.items():  # the library knows dtypes keras-zoo has no NumPy type for
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(f"{path.name}: tensor {name!r} is {dtype} {shape}; keras-zoo reads the dtypes "
                                  f"{sorted(DTYPE_SIZES)}")
    start = 8 + length
    return {name: (shape, dtype, start + raw[name]["data_offsets"][0]) for name, (shape, dtype) in header.items()}


def _ints(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _diagnose(path: Path, error: Exception) -> str:
    """Says which part of a file the safetensors library rejected, naming the tensor if one lies."""
    prefix = f"{path.name}: not a valid safetensors file ({error})"
    size = path.stat().st_size if path.exists() else 0
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{prefix}: the file has {size} bytes, fewer than the 8-byte header length"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"{prefix}: the header claims {n} bytes but the file has {size - 8} after the length; truncated?"
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            return f"{prefix}: the header is not valid JSON; the file is corrupt"
    if not isinstance(header, dict):
        return f"{prefix}: the header is not a JSON object but a {type(header).__name__}"
    data_size = size - 8 - n
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        if not (isinstance(entry, dict) and _ints(entry.get("shape")) and _ints(entry.get("data_offsets"))
                and len(entry["data_offsets"]) == 2 and isinstance(entry.get("dtype"), str)
                and entry["dtype"] in DTYPE_SIZES):
            return f"{prefix}: the header entry for tensor {name!r} is malformed: {entry!r:.200}"
        begin, stop = entry["data_offsets"]
        nbytes = math.prod(entry["shape"]) * DTYPE_SIZES[entry["dtype"]]
        if stop - begin != nbytes:
            return (
                f"{prefix}: tensor {name!r} is declared {entry['dtype']} {tuple(entry['shape'])} "
                f"({nbytes} bytes) but its data offsets span {stop - begin} bytes"
            )
        if stop > data_size:
            return (
                f"{prefix}: tensor {name!r} ends at byte {stop} of the data but the file holds only "
                f"{data_size} bytes of data; the file is truncated"
            )
        end = max(end, stop)
    if end != data_size:
        return f"{prefix}: the tensors cover {end} bytes of data but the file holds {data_size}; truncated or padded"
    return prefix


# ----------------------------------------------------------------------------- writing


def write_safetensors(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file whose sizeable tensors all lie 64-byte aligned (the library pads to 8 only).

    The header is padded with spaces to 64 bytes and the tensors whose size is a multiple of 64 come
    first, so JAX and TensorFlow can use their mapped bytes in place; the rest follow widest element
    first, each aligned to its own element size, as the library's writer does.
    """
    arrays = {name: np.asarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"), order="C")
              for name, array in arrays.items()}  # little-endian, C order; 0-d arrays stay 0-d
    order = sorted(arrays, key=lambda n: (arrays[n].nbytes % ALIGNMENT != 0, -arrays[n].dtype.itemsize, n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        array = arrays[name]
        header[name] = {"dtype": _dtype_code(array.dtype, name), "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(arrays[name].reshape(-1).view(np.uint8).data)


def _dtype_code(dtype: np.dtype, name: str) -> str:
    """The safetensors dtype code of a NumPy dtype (the inverse of `numpy_dtype`)."""
    for code in DTYPE_SIZES:
        if numpy_dtype(code) == dtype.newbyteorder("<"):
            return code
    raise CheckpointError(f"tensor {name!r}: safetensors has no dtype for {dtype}; expected one of {sorted(DTYPE_SIZES)}")
