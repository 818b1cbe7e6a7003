"""Bad model folders and arguments: each gets a typed error naming the file and field, never a bare one."""

import json
import shutil
import struct
import time

import keras
import ml_dtypes
import numpy as np
import pytest

import zoo
from zoo.errors import ConfigError, CorruptCheckpointError, ImageError, PresetNotFoundError, ZooError
from zoo.host import all_finite

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def vit(tmp_path):
    return shutil.copytree(zoo.presets.get("vit_tiny_digits").folder, tmp_path / "vit")


@pytest.fixture
def gemma(tmp_path):
    return shutil.copytree(zoo.presets.get("gemma_tiny_pycode").folder, tmp_path / "gemma")


def write_header(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)


def edit_json(path, edit):
    raw = json.loads(path.read_text())
    path.write_text(json.dumps(edit(raw)))


@pytest.mark.parametrize("header, fragment", [
    (DEEP.encode(), "the header is not valid JSON"),
    (b"[1, 2]", "the header is not a JSON object"),
    (json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}).encode(),
     "the header entry for tensor 'w' is malformed"),
    (json.dumps({"w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}).encode(),
     "the header entry for tensor 'w' is malformed"),
])
def test_lying_safetensors_headers(vit, header, fragment):
    write_header(vit / "model.safetensors", header, bytes(8))
    with pytest.raises(CorruptCheckpointError, match=rf"model\.safetensors: not a valid safetensors file.*{fragment}"):
        zoo.ViTImageClassifier.from_preset(vit)


def test_config_nested_too_deep(vit):
    (vit / "config.json").write_text(DEEP)
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON: nested too deeply"):
        zoo.from_preset(vit)


def test_model_type_of_the_wrong_type(vit):
    edit_json(vit / "config.json", lambda raw: dict(raw, model_type=["vit"]))
    with pytest.raises(ConfigError, match=r"config\.json: field 'model_type' should be a string, got \['vit'\]"):
        zoo.from_preset(vit)


@pytest.mark.parametrize("edit, fragment", [
    (lambda raw: [raw], "tokenizer_config.json: expected a JSON object, got list"),
    (lambda raw: dict(raw, chat_template=[{"template": "x"}]),
     "tokenizer_config.json: field 'chat_template' should be a template or a list of"),
    (lambda raw: dict(raw, eos_token=7), "tokenizer_config.json: field 'eos_token' should be a token"),
    (lambda raw: dict(raw, bos_token=["<bos>"]), "tokenizer_config.json: field 'bos_token' should be a token"),
    (lambda raw: dict(raw, pad_token={"text": "<pad>"}), "tokenizer_config.json: field 'pad_token' should be a token"),
])
def test_tokenizer_config_of_the_wrong_shape(gemma, edit, fragment):
    edit_json(gemma / "tokenizer_config.json", edit)
    with pytest.raises(ConfigError, match=fragment):
        zoo.GemmaCausalLM.from_preset(gemma)


@pytest.mark.parametrize("content, fragment", [
    ([1], "generation_config.json: expected a JSON object, got list"),
    ({"eos_token_id": "one"}, "generation_config.json: field 'eos_token_id' should be a token id"),
    ({"eos_token_id": [1, None]}, "generation_config.json: field 'eos_token_id' should be a token id"),
])
def test_generation_config_of_the_wrong_shape(gemma, content, fragment):
    (gemma / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=fragment):
        zoo.GemmaCausalLM.from_preset(gemma)


@pytest.mark.parametrize("shard, fragment", [
    (3, "should be a file name in the model folder, got 3"),
    (["model.safetensors"], "should be a file name in the model folder"),
    (None, "should be a file name in the model folder, got None"),
    ("../outside/model.safetensors", "should be a file name in the model folder"),
    ("/tmp/model.safetensors", "should be a file name in the model folder"),
])
def test_index_places_tensors_in_files_of_the_folder_only(vit, tmp_path, shard, fragment):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(vit / "model.safetensors", outside / "model.safetensors")  # a real file where "../" points
    (vit / "model.safetensors").rename(vit / "model-00001-of-00001.safetensors")
    with open(vit / "model-00001-of-00001.safetensors", "rb") as f:
        names = list(json.loads(f.read(struct.unpack("<Q", f.read(8))[0])))
    weight_map = {n: "model-00001-of-00001.safetensors" for n in names if n != "__metadata__"}
    weight_map[next(iter(weight_map))] = shard
    (vit / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CorruptCheckpointError, match=rf"model\.safetensors\.index\.json: tensor '.*' {fragment}"):
        zoo.ViTImageClassifier.from_preset(vit)


@pytest.mark.parametrize("preset", ["", None, 3])
def test_presets_that_name_nothing(preset):
    with pytest.raises(PresetNotFoundError, match="expected a preset name, a hf:// or kaggle:// handle, or a folder"):
        zoo.ViTImageClassifier.from_preset(preset)
    with pytest.raises(PresetNotFoundError, match="expected a preset name"):
        zoo.from_preset(preset)


def test_classifier_arguments(vit):
    with pytest.raises(ConfigError, match="num_labels: expected a positive int, got 0"):
        zoo.ViTImageClassifier.from_preset(vit, num_labels=0)
    clf = zoo.ViTImageClassifier.from_preset(vit)
    with pytest.raises(ZooError, match="top_k must be a positive int, got 0"):
        clf.predict_labels([np.zeros((8, 8), np.uint8)], top_k=0)
    with pytest.raises(ImageError, match=r"an empty image \(0x0\)"):
        clf.predict_labels([np.zeros((0, 0, 3), np.uint8)])


@pytest.mark.parametrize("preset, edit", [
    ("gemma", lambda raw: dict(raw, vocab_size=50_000_000)),
    ("gemma", lambda raw: {**{k: v for k, v in raw.items() if k != "layer_types"}, "num_hidden_layers": 1_000_000}),
    ("vit", lambda raw: dict(raw, hidden_size=10_000_000, num_attention_heads=1)),
])
def test_a_config_larger_than_its_checkpoint_is_refused_before_building(request, preset, edit):
    """Nothing is allocated for a lying config: the refusal comes at once, naming both sizes."""
    folder = request.getfixturevalue(preset)
    edit_json(folder / "config.json", edit)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config\.json describes a model of [\d,]+ parameters .* the checkpoint holds"):
        zoo.from_preset(folder)
    assert time.perf_counter() - started < 5


def test_a_huge_resolution_builds_without_a_huge_resampling_matrix(vit):
    """image_size far beyond the checkpoint's grid: the position resampling is two small matrices."""
    backbone = zoo.ViTBackbone.from_preset(vit, image_size=100_000)
    assert sum(m.nbytes for m in backbone.embeddings.resample) < 2**20


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_unless_allowed(vit, bad):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(vit / "model.safetensors")
    name = "vit.encoder.layer.0.intermediate.dense.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][3, 5] = bad
    save_file(tensors, vit / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match=rf"{name} in model.safetensors holds NaN or infinite values; "
                                                     "pass allow_nonfinite=True"):
        zoo.ViTImageClassifier.from_preset(vit)  # found by the check that runs while the model is built
    with pytest.raises(CorruptCheckpointError, match=rf"{name} in model.safetensors holds NaN or infinite values"):
        zoo.ViTImageClassifier.from_preset(vit, dtype="bfloat16")  # cast on loading: checked after the cast
    model = zoo.ViTImageClassifier.from_preset(vit, allow_nonfinite=True)
    assert not np.isfinite(keras.ops.convert_to_numpy(model.backbone.encoder_layers[0].fc1.kernel)).all()


def test_bfloat16_non_finite_weights_are_found():
    a = np.zeros(5_000_000, ml_dtypes.bfloat16)
    assert all_finite(a)
    a[4_999_999] = np.inf
    assert not all_finite(a)
    big = np.full(4, 3e30, np.float32)  # its squares overflow float32: the exact check must still say finite
    assert all_finite(big)
