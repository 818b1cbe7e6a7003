"""The safetensors reader/writer and the key-map loader: formats, transforms, mappings and the read-ahead."""

import gc
import json
import mmap
import shutil
import sys
import struct
import threading

import ml_dtypes
import numpy as np
import pytest
from keras.ops import convert_to_numpy as to_numpy
from safetensors import safe_open
from safetensors.numpy import save_file

import zoo
from zoo.checkpoint import Checkpoint, PendingTensor, parse_size, write_checkpoint
from zoo.errors import CheckpointError, ConfigError, CorruptCheckpointError, ShapeMismatchError
from zoo.key_map import TRANSFORMS
from zoo.safetensors_file import DTYPE_SIZES, numpy_dtype, write_safetensors
from backend_storage import storage_address
from vit_reference import save_hf_vit

CONFIG = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
              image_size=16, patch_size=8, num_labels=3)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_hf_vit(tmp_path_factory.mktemp("ckpt") / "vit", seed=7, **CONFIG)


@pytest.fixture
def folder(source, tmp_path):
    """A fresh copy of the tiny checkpoint, free to damage."""
    return shutil.copytree(source, tmp_path / "copy")


# ----------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("name,target", [
    ("identity", (3, 5)), ("transpose", (4, 6)), ("rows_to_heads", (2, 5, 6)), ("cols_to_heads", (6, 2, 5)),
    ("heads_bias", (3, 4)), ("conv_patch", (4, 4, 3, 8)),
])
def test_transform_inverts(name, target):
    t = TRANSFORMS[name]
    source = np.arange(np.prod(target), dtype=np.float32).reshape(t.source_shape(target))
    forward = t.forward(source, target)
    assert forward.shape == target
    np.testing.assert_array_equal(t.inverse(forward), source)


def read(ckpt: Checkpoint, name: str) -> np.ndarray:
    return next(ckpt.read_many([name]))


def test_reads_bfloat16_and_float16(tmp_path):
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    save_file({"a": values.astype(ml_dtypes.bfloat16), "b": values.astype(np.float16)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert (ckpt.tensors["a"].dtype, ckpt.tensors["b"].dtype) == ("BF16", "F16")
    np.testing.assert_allclose(read(ckpt, "a").astype(np.float32), values, atol=2e-2)
    np.testing.assert_allclose(read(ckpt, "b").astype(np.float32), values, atol=2e-3)


def test_every_dtype_code_reads_as_its_numpy_type(tmp_path):
    assert all(numpy_dtype(code).itemsize == size for code, size in DTYPE_SIZES.items())
    rng = np.random.default_rng(0)
    arrays = {  # odd byte counts first, so later tensors start at unaligned file offsets
        "a_u8": rng.integers(0, 255, (3,), dtype=np.uint8), "b_bool": np.array([True, False, True]),
        "c_i64": rng.integers(-9, 9, (2, 3)), "d_f16": rng.standard_normal((5,)).astype(np.float16),
        "e_bf16": rng.standard_normal((4, 2)).astype(ml_dtypes.bfloat16),
        "f_f8": rng.standard_normal((7,)).astype(ml_dtypes.float8_e4m3fn),
        "g_f32": rng.standard_normal((3, 5)).astype(np.float32), "h_i32": rng.integers(-9, 9, (9,)).astype(np.int32),
    }
    save_file(arrays, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    for name, array in zip(arrays, ckpt._read_copies(tmp_path / "model.safetensors", list(arrays))):
        assert array.dtype == arrays[name].dtype and array.shape == arrays[name].shape, name
        np.testing.assert_array_equal(array.view(np.uint8), arrays[name].view(np.uint8))
        assert array.ctypes.data % 64 == 0, f"{name} is not 64-byte aligned"  # XLA adopts it without a copy


@pytest.mark.parametrize("code, size", [("F8_E8M0", 1), ("C64", 8)])
def test_dtype_the_library_knows_but_we_cannot_read(tmp_path, code, size):
    """safetensors accepts these codes; opening names the file, the tensor and the dtypes read here."""
    header = json.dumps({"scales": {"dtype": code, "shape": [2], "data_offsets": [0, 2 * size]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(2 * size))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor 'scales' is {code} \(2,\); .*'F32'"):
        Checkpoint.open(tmp_path)


def test_file_cut_short_after_opening(folder):
    ckpt = Checkpoint.open(folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: cannot read tensor .*file ends"):
        list(ckpt._read_copies(path, list(ckpt.tensors)))


def test_sharded_writer_and_reader(tmp_path):
    arrays = {f"t{i}": np.full((10, 10), i, np.float32) for i in range(5)}
    pending = [PendingTensor(k, v.nbytes, lambda v=v: v) for k, v in arrays.items()]
    files = write_checkpoint(tmp_path, pending, max_shard_size=850)
    assert len(files) == 3  # two 400-byte tensors fit under 850 bytes
    ckpt = Checkpoint.open(tmp_path)
    assert set(ckpt.tensors) == set(arrays) and len(ckpt.files) == 3
    for k, v in arrays.items():
        np.testing.assert_array_equal(read(ckpt, k), v)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000


def test_write_safetensors_aligns_the_data_and_the_library_reads_it(tmp_path):
    arrays = {
        "big": np.arange(64 * 48, dtype=np.float32).reshape(64, 48),  # 12288 bytes, a multiple of 64
        "odd_bias": np.arange(7, dtype=np.float32),  # 28 bytes: everything after it is off the 64-byte grid
        "half": np.arange(5, dtype=np.float16),
        "brain": np.arange(9, dtype=np.float32).reshape(3, 3).astype(ml_dtypes.bfloat16),
        "ids": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(3.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": np.arange(128, dtype=np.float32).reshape(8, 16).T,
        "big_endian": np.arange(6, dtype=">f4"),
        "z_last_but_aligned": np.ones((2, 16), np.float32),  # 128 bytes: placed before the odd sizes
    }
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays, metadata={"format": "pt"})
    with safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        for name, array in arrays.items():
            got = f.get_tensor(name)
            assert got.shape == array.shape and got.dtype == array.dtype.newbyteorder("<"), name
            np.testing.assert_array_equal(got, array)
    (length,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + length) % 64 == 0  # the header is padded with spaces
    for name, info in Checkpoint.open(tmp_path).tensors.items():
        assert info.offset % numpy_dtype(info.dtype).itemsize == 0, name
        assert info.offset % 64 == 0 or info.nbytes % 64 != 0, name  # every 64-byte multiple lies aligned


def test_write_safetensors_names_a_tensor_it_cannot_store(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'phase': safetensors has no dtype for complex64"):
        write_safetensors(tmp_path / "model.safetensors", {"w": np.ones(4, np.float32), "phase": np.zeros(3, np.complex64)})
    assert not (tmp_path / "model.safetensors").exists()  # nothing half-written


def _owner(array: np.ndarray):
    """The object at the bottom of an array's chain of views."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array.obj if isinstance(array, memoryview) else array


def test_aligned_tensors_are_private_views_of_the_file(tmp_path):
    values = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    arrays = {"a_weight": values, "b_bias": np.arange(5, dtype=np.float32), "c_after_bias": np.arange(3, dtype=np.float32),
              "d_half": values.astype(ml_dtypes.bfloat16)}
    path = tmp_path / "model.safetensors"
    write_safetensors(path, arrays)
    before = path.read_bytes()
    ckpt = Checkpoint.open(tmp_path)
    assert [ckpt.tensors[n].offset % 64 == 0 for n in arrays] == [True, True, False, True]  # 64-byte multiples first
    got = dict(zip(arrays, ckpt._read_copies(path, list(arrays))))
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].ctypes.data % 64 == 0, name
    assert isinstance(_owner(got["a_weight"]), mmap.mmap) and isinstance(_owner(got["d_half"]), mmap.mmap)
    assert not isinstance(_owner(got["c_after_bias"]), mmap.mmap)  # off the grid: read into a fresh buffer
    got["a_weight"][:] = -1  # the caller owns it: a write copies the page and never reaches the file
    assert path.read_bytes() == before
    casting = Checkpoint.open(tmp_path)
    casting.prefetch(cast_to=np.float32, threads=1)  # the readers cast bfloat16 off the caller's thread
    try:
        cast = dict(zip(arrays, casting._read_copies(path, list(arrays))))
    finally:
        casting.stop_prefetch()
    assert isinstance(_owner(cast["a_weight"]), mmap.mmap) and cast["d_half"].dtype == np.float32
    assert not isinstance(_owner(cast["d_half"]), mmap.mmap)
    np.testing.assert_array_equal(cast["d_half"], arrays["d_half"].astype(np.float32))


def test_mapped_file_cut_short_after_opening_names_the_tensor(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"a": np.ones((64, 16), np.float32), "b": np.ones((64, 16), np.float32)})
    ckpt = Checkpoint.open(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors: cannot read tensor 'b' \(expected F32 \(64, 16\)\): "
                                                     "the file ends 100 bytes before"):
        list(ckpt._read_copies(path, ["a", "b"]))


def _file_ranges(path) -> list[tuple[int, int]]:
    """The address ranges where this process maps `path`."""
    ranges = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == str(path):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc")
def test_saved_preset_loads_with_its_file_as_the_weights(source, tmp_path):
    original = zoo.ViTImageClassifier.from_preset(source)
    pixels = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    expected = to_numpy(original(pixels))
    saved = original.save_preset(tmp_path / "saved")
    model = zoo.ViTImageClassifier.from_preset(saved)
    np.testing.assert_array_equal(to_numpy(model(pixels)), expected)
    ranges = _file_ranges((saved / "model.safetensors").resolve())
    assert ranges, "the checkpoint file is not mapped"
    in_file = {v.path for v in model.weights if any(a <= storage_address(v) < b for a, b in ranges)}
    for i in range(CONFIG["num_hidden_layers"]):  # weights read as they lie (reshaped at most) are the file's pages
        for part in ("q_proj/kernel", "o_proj/kernel", "fc1/kernel", "fc2/kernel"):
            assert any(p.endswith(f"layers_{i}/{part}") for p in in_file), (i, part, sorted(in_file))
    model.save_preset(saved)  # over the file its own weights are mapped from: the old file is unlinked, not overwritten
    np.testing.assert_array_equal(to_numpy(model(pixels)), expected)
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(saved)(pixels)), expected)


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "zoo-checkpoint-prefetch"]


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("order", ["reverse", "shuffled", "forward"])
@pytest.mark.parametrize("window", [None, 400, 1])
def test_prefetch_serves_any_order_within_its_window(tmp_path, window, order, threads):
    arrays = {f"t{i:02d}": np.full((10, 10), i, np.float32) for i in range(24)}
    write_checkpoint(tmp_path, [PendingTensor(k, v.nbytes, lambda v=v: v) for k, v in arrays.items()], max_shard_size=2500)
    ckpt = Checkpoint.open(tmp_path)
    ckpt.prefetch(max_bytes=window, threads=threads)
    got = {}
    rng = np.random.default_rng(len(order))

    def consume():  # the readers go through the files in order; the caller may not
        files = reversed(ckpt.files) if order == "reverse" else ckpt.files
        for file in files:
            names = sorted(n for n, t in ckpt.tensors.items() if t.file == file)
            names = names[::-1] if order == "reverse" else list(rng.permutation(names)) if order == "shuffled" else names
            got.update(zip(names, ckpt._read_copies(file, names)))
        again = names[0]  # asked for twice: the second time the caller reads it itself
        got[again + "/again"] = next(ckpt._read_copies(ckpt.tensors[again].file, [again]))

    consumer = threading.Thread(target=consume)
    consumer.start()
    consumer.join(timeout=60)
    assert not consumer.is_alive(), "reading with a prefetch window deadlocked"
    ckpt.stop_prefetch()
    assert not _prefetch_threads()
    for name, array in arrays.items():
        np.testing.assert_array_equal(got[name], array)
        assert got[name].ctypes.data % 64 == 0
    again = next(k for k in got if k.endswith("/again"))
    np.testing.assert_array_equal(got[again], arrays[again.split("/")[0]])


@pytest.mark.parametrize("window", [None, 64])
def test_prefetch_casts_floating_tensors_only_without_a_window(tmp_path, window):
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    arrays = {"a_bf16": values.astype(ml_dtypes.bfloat16), "b_f16": values.astype(np.float16), "c_f32": values,
              "d_i32": values.astype(np.int32)}
    save_file(arrays, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    ckpt.prefetch(max_bytes=window, threads=2, cast_to=np.float32)
    try:
        got = dict(zip(arrays, ckpt._read_copies(tmp_path / "model.safetensors", list(arrays))))
    finally:
        ckpt.stop_prefetch()
    for name, array in got.items():
        cast = window is None and name != "d_i32"  # the readers cast floats; a window leaves casts to the caller
        assert array.dtype == (np.float32 if cast else arrays[name].dtype), name
        np.testing.assert_array_equal(array.astype(np.float32), values)
        assert array.ctypes.data % 64 == 0


def test_prefetched_read_error_names_the_tensor(folder):
    ckpt = Checkpoint.open(folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    ckpt.prefetch()
    try:
        with pytest.raises(CorruptCheckpointError, match="model.safetensors: cannot read tensor .*file ends"):
            list(ckpt._read_copies(path, list(ckpt.tensors)))
    finally:
        ckpt.stop_prefetch()
    assert not _prefetch_threads()


def test_from_preset_leaves_no_reader_behind_and_the_collector_as_it_was(folder):
    zoo.ViTImageClassifier.from_preset(folder)
    assert not _prefetch_threads() and gc.isenabled()
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "intermediate_size": 41}))
    with pytest.raises(ShapeMismatchError):
        zoo.ViTImageClassifier.from_preset(folder)
    assert not _prefetch_threads() and gc.isenabled()
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="smaller than patch_size"):  # raised while the layers are built
        zoo.ViTImageClassifier.from_preset(folder, image_size=(4, 4))
    assert not _prefetch_threads() and gc.isenabled()
    gc.disable()
    try:
        zoo.ViTImageClassifier.from_preset(folder)
        assert not gc.isenabled()  # a user's choice is kept
    finally:
        gc.enable()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(7) == 7
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")
