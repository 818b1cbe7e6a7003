"""Broken checkpoints, tensors that do not fit, bad configs and folders: each a typed error naming what is wrong."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zoo
from zoo.errors import (
    ConfigError,
    CorruptCheckpointError,
    ImageError,
    MissingWeightsError,
    PresetNotFoundError,
    ShapeMismatchError,
    UnexpectedWeightsError,
    UnknownArchitectureError,
    ZooError,
)
from test_checkpoint import CONFIG, folder, source  # noqa: F401  (the tiny checkpoint and its fixtures)


def _rewrite(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _load(folder):
    return zoo.ViTImageClassifier.from_preset(folder)


# ----------------------------------------------------------------------------- corrupt files


def test_truncated_file(folder):
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*truncated"):
        _load(folder)


def test_garbage_file(folder):
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 64)
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*not valid JSON"):
        _load(folder)


def test_tiny_file(folder):
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*fewer than the 8-byte header"):
        _load(folder)


def test_header_lies_about_sizes(folder):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header["classifier.weight"]["shape"] = [3, 25]  # data spans 3 x 24 floats
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n:])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*'classifier\.weight' is declared F32 \(3, 25\)"):
        _load(folder)


def test_index_names_a_missing_shard(folder):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    names = list(load_file(folder / "model-00001-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in names}
    weight_map["classifier.bias"] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CorruptCheckpointError, match=r"'classifier\.bias' in model-00002-of-00002\.safetensors, which is not in"):
        _load(folder)


def test_broken_index(folder):
    (folder / "model.safetensors.index.json").write_text("{nope")
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json.*weight_map"):
        _load(folder)


# ----------------------------------------------------------------------------- tensors that do not fit


def test_missing_tensor(folder):
    _rewrite(folder, lambda t: t.pop("vit.encoder.layer.1.output.dense.weight"))
    with pytest.raises(MissingWeightsError) as info:
        _load(folder)
    message = str(info.value)
    assert "vit.encoder.layer.1.output.dense.weight (expected shape (24, 40)" in message
    assert "backbone/layers_1/fc2/kernel" in message


def test_unexpected_tensor(folder):
    _rewrite(folder, lambda t: t.update({"vit.encoder.layer.7.extra.weight": np.zeros((2, 2), np.float32)}))
    with pytest.raises(UnexpectedWeightsError, match=r"vit\.encoder\.layer\.7\.extra\.weight \(2, 2\) in model\.safetensors"):
        _load(folder)


def test_layer_beyond_config_is_unexpected(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnexpectedWeightsError, match=r"vit\.encoder\.layer\.1\."):
        _load(folder)


def test_wrong_shape(folder):
    _rewrite(folder, lambda t: t.update({"vit.encoder.layer.0.intermediate.dense.weight": np.zeros((24, 40), np.float32)}))
    with pytest.raises(ShapeMismatchError, match=(
        r"vit\.encoder\.layer\.0\.intermediate\.dense\.weight: expected \(40, 24\), got \(24, 40\) in model\.safetensors"
    )):
        _load(folder)


def test_no_weights_file(folder):
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(PresetNotFoundError, match=r"expected model\.safetensors.*found pytorch_model\.bin"):
        _load(folder)


# ----------------------------------------------------------------------------- configs and folders


def test_unknown_model_type(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["model_type"] = "swin"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnknownArchitectureError, match=r"config\.json: unknown model_type 'swin'; keras-zoo implements"):
        _load(folder)


def test_unknown_timm_architecture(folder):
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet50", "pretrained_cfg": {}}))
    with pytest.raises(UnknownArchitectureError, match="unknown timm architecture 'resnet50'"):
        _load(folder)


@pytest.mark.parametrize("architecture,message", [
    ("vit_base_patch16_xp_224", r"timm architecture 'vit_base_patch16_xp_224' is not supported by "
                                r"keras-zoo's ViT: it has norm_layer=RmsNorm, block_fn=ParallelScalingBlock"),
    ("vit_dwee_patch16_reg1_gap_256", r"it has attn_layer='diff'"),
    ("vit_base_patch16_rope_224", r"unsupported timm architecture 'vit_base_patch16_rope_224'.*timm 1\.0\.\d+'s table"),
])
def test_unsupported_timm_variant(folder, architecture, message):
    (folder / "config.json").write_text(json.dumps({"architecture": architecture, "pretrained_cfg": {}}))
    with pytest.raises(ConfigError, match=message):
        _load(folder)


def test_unsupported_activation(folder):
    raw = json.loads((folder / "config.json").read_text())
    raw["hidden_act"] = "mish"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="hidden_act: unsupported activation 'mish'"):
        _load(folder)


def test_folder_without_config(folder):
    (folder / "config.json").unlink()
    with pytest.raises(PresetNotFoundError, match=r"no config\.json"):
        _load(folder)


def test_config_not_json(folder):
    (folder / "config.json").write_text("{model_type: vit")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        _load(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(PresetNotFoundError, match="no such folder"):
        _load(tmp_path / "nowhere")


def test_wrong_family_for_class(folder):
    with pytest.raises(ConfigError, match="describes a 'vit' model"):
        type("Other", (zoo.ViTBackbone,), {"family": "gemma"}).from_preset(folder)


def test_errors_are_typed_not_bare(folder):
    """Nothing escapes as a bare KeyError/IndexError from deep inside."""
    _rewrite(folder, lambda t: t.pop("classifier.bias"))
    with pytest.raises(ZooError) as info:
        _load(folder)
    assert not isinstance(info.value, (KeyError, IndexError))


def test_undecodable_image(tmp_path):
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    bad = tmp_path / "photo.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    with pytest.raises(ImageError, match=r"photo\.png: cannot decode the image"):
        clf.predict_labels([bad])
    with pytest.raises(ImageError, match=r"missing\.png: no such image file"):
        clf.preprocess(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="expected a uint8 array"):
        clf.preprocess(np.zeros((8, 8, 3), np.float32))

