"""Host memory that the backends adopt as it is: 64-byte-aligned NumPy buffers, and Keras dtypes on the host.

A ground module: it imports nothing of keras-zoo. JAX (XLA:CPU) and TensorFlow take a host
buffer as a weight without copying it only if its data starts on a 64-byte boundary (TensorFlow
aborts on less); NumPy's own allocations are 16-byte aligned.
"""

import mmap

import ml_dtypes
import numpy as np

ALIGNMENT = 64
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # what keras-zoo builds weights in
MAPPED_BYTES = 4 * 2**20  # from this size on, buffers are anonymous mappings of ordinary pages
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux only; elsewhere pages fault in as written


def aligned_empty(nbytes: int, zeroed: bool = False) -> np.ndarray:
    """A uint8 buffer of nbytes whose data starts on a 64-byte boundary, uninitialised unless `zeroed`.

    Zeroed buffers cost nothing until written. Large ones are anonymous mappings of ordinary pages:
    NumPy's transparent huge pages were slower to fault in (a 1 GB read: 1.23-1.56 s against
    0.81-0.89 s), and a buffer about to be written in full has its pages faulted in at once
    (`MAP_POPULATE`: 0.74-0.88 s).
    """
    if nbytes >= MAPPED_BYTES:
        if zeroed or not _MAP_POPULATE:
            return np.frombuffer(mmap.mmap(-1, nbytes), np.uint8)  # page-aligned and zero-filled
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_POPULATE
        return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags), np.uint8)
    raw = (np.zeros if zeroed else np.empty)(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes]


def astype_aligned(array: np.ndarray, dtype) -> np.ndarray:
    """`array.astype(dtype)` into a fresh 64-byte-aligned buffer, which JAX and TensorFlow adopt as it is."""
    dtype = np.dtype(dtype)
    out = aligned_empty(array.size * dtype.itemsize).view(dtype).reshape(array.shape)
    np.copyto(out, array, casting="unsafe")
    return out


def is_aligned(array: np.ndarray) -> bool:
    return bool(array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0)


def host_dtype(dtype: str) -> np.dtype:
    """The NumPy dtype of a Keras dtype name (bfloat16 through ml_dtypes)."""
    return np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)


# The exponent bits of each float dtype: all set means NaN or infinity.
_EXPONENTS = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80), np.dtype(np.float16): (np.uint16, 0x7C00),
              np.dtype(np.float32): (np.uint32, 0x7F800000), np.dtype(np.float64): (np.uint64, 0x7FF0000000000000)}
_CHUNK = 2**20  # elements checked at a time: the temporaries stay in cache (4x faster than one pass)


def all_finite(array: np.ndarray) -> bool:
    """Whether a float array holds no NaN or infinity, at ~0.06 s/GiB on 2 cores (float32 ~0.03: one dot
    product, finite unless a value is not or the squares overflow, which the exact check then settles)."""
    flat = array.reshape(-1)
    if flat.dtype == np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(np.dot(flat, flat)):
                return True
    if flat.dtype not in _EXPONENTS:  # float8 (ml_dtypes) and integers
        return flat.dtype.kind in "iub" or bool(np.isfinite(flat).all())
    view, mask = _EXPONENTS[flat.dtype]
    bits = flat.view(view)
    return not any((bits[i:i + _CHUNK] & mask).max() == mask for i in range(0, bits.size, _CHUNK))
