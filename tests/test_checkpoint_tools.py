"""`zoo checkpoint align`: checkpoints rewritten with aligned tensors, and what it cannot read; timm's ViT table."""

import json
import shutil
import struct

import numpy as np
from keras.ops import convert_to_numpy as to_numpy
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import zoo
from zoo import cli
from zoo.checkpoints_tools.align import align_checkpoint
from zoo.errors import PresetNotFoundError
from vit_reference import save_hf_vit

CONFIG = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40,
              image_size=16, patch_size=8, num_labels=3)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A tiny ViT as transformers' own writer shards it: several files and an index."""
    from transformers import ViTForImageClassification

    source = save_hf_vit(tmp_path_factory.mktemp("ckpt") / "vit", seed=7, **CONFIG)
    folder = tmp_path_factory.mktemp("ckpt") / "sharded"
    ViTForImageClassification.from_pretrained(source).save_pretrained(folder, max_shard_size="12KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").exists()
    return folder


def _offsets(path):
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: 8 + length + entry["data_offsets"][0] for name, entry in header.items()}


def test_align_rewrites_library_files_that_still_load_everywhere(sharded, tmp_path, capsys):
    from transformers import ViTForImageClassification

    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    aligned = tmp_path / "aligned"
    assert cli.main(["checkpoint", "align", str(sharded), "--output", str(aligned)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(files)
    assert sorted(p.name for p in aligned.iterdir()) == sorted(p.name for p in sharded.iterdir())
    for name in ["config.json", "model.safetensors.index.json"]:
        assert (aligned / name).read_bytes() == (sharded / name).read_bytes()
    for name in files:
        before, after = load_file(sharded / name), load_file(aligned / name)
        assert sorted(before) == sorted(after)
        for key in before:
            np.testing.assert_array_equal(before[key], after[key])
            assert before[key].dtype == after[key].dtype
        with safe_open(sharded / name, "np") as a, safe_open(aligned / name, "np") as b:
            assert a.metadata() == b.metadata()
        sizes = {key: value.nbytes for key, value in after.items()}
        assert all(offset % 64 == 0 for key, offset in _offsets(aligned / name).items() if sizes[key] % 64 == 0)
    pixels = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype("float32")
    expected = to_numpy(zoo.ViTImageClassifier.from_preset(sharded)(pixels))
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(aligned)(pixels)), expected)
    assert ViTForImageClassification.from_pretrained(aligned) is not None  # transformers reads them too

    report = align_checkpoint(shutil.copytree(sharded, tmp_path / "in_place"))  # in place: same result
    assert [r.path.name for r in report] == files and all(r.aligned_after >= r.aligned_before for r in report)
    assert sorted(p.name for p in (tmp_path / "in_place").iterdir()) == sorted(p.name for p in sharded.iterdir())
    for name in files:
        assert (tmp_path / "in_place" / name).read_bytes() == (aligned / name).read_bytes()


def test_align_names_what_it_cannot_read(tmp_path, capsys):
    with pytest.raises(PresetNotFoundError, match="model.safetensors"):
        align_checkpoint(tmp_path / "empty")
    folder = save_hf_vit(tmp_path / "vit", seed=3, **CONFIG)
    original = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(original[: len(original) // 2])  # cut short
    assert cli.main(["checkpoint", "align", str(folder)]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == original[: len(original) // 2]  # left as it was
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_align_output_must_be_a_folder(tmp_path, capsys):
    folder = save_hf_vit(tmp_path / "vit", seed=3, **CONFIG)
    assert cli.main(["checkpoint", "align", str(folder), "--output", str(folder / "config.json")]) == 1
    assert "config.json: exists and is not a folder" in capsys.readouterr().err


# A stand-in for timm's models/vision_transformer.py, in the forms its model functions take.
TIMM_SOURCE = """
def vit_small_patch14_dinov2(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=14, embed_dim=384, depth=12, num_heads=6, init_values=1e-5)
    return _create_vision_transformer('vit_small_patch14_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_base_patch16_clip_224(pretrained: bool = False, **kwargs):
    model_args = dict(
        patch_size=16, embed_dim=768, depth=12, num_heads=12, pre_norm=True, norm_layer=partial(LayerNorm, eps=1e-5))
    return _create_vision_transformer('vit_base_patch16_clip_224', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_gigantic_patch14_224(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=14, embed_dim=1664, mlp_ratio=64/13, depth=48, num_heads=16)
    return _create_vision_transformer('vit_gigantic_patch14_224', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_base_patch16_siglip_224(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, class_token=False, global_pool='map')
    return _create_vision_transformer('vit_base_patch16_siglip_224', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_giant_patch14_dinov2(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                      mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return _create_vision_transformer('vit_giant_patch14_dinov2', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_xp(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, qk_norm=True)
    return _create_vision_transformer('vit_xp', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_unpacked_swiglu(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_layer=SwiGLU, act_layer=nn.SiLU)
    return _create_vision_transformer('vit_unpacked_swiglu', pretrained=pretrained, **dict(model_args, **kwargs))

def vit_mish(pretrained: bool = False, **kwargs):
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, act_layer=nn.Mish)
    return _create_vision_transformer('vit_mish', pretrained=pretrained, **dict(model_args, **kwargs))

def _helper():
    model_args = dict(depth=1)
"""


def test_timm_table_reads_timm_source(tmp_path):
    from zoo.checkpoints_tools import timm_vit_table

    source = tmp_path / "vision_transformer.py"
    source.write_text(TIMM_SOURCE)
    out = tmp_path / "table.py"
    assert timm_vit_table.main([str(source), "--version", "9.9", "--output", str(out)]) == 0
    table = {}
    exec(out.read_text(), table)
    assert table["TIMM_VERSION"] == "9.9"
    assert table["ARCHITECTURES"] == {
        "vit_small_patch14_dinov2": {"patch_size": 14, "embed_dim": 384, "depth": 12, "num_heads": 6, "init_values": 1e-5},
        "vit_base_patch16_clip_224": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                      "pre_norm": True, "norm_eps": 1e-5},
        "vit_gigantic_patch14_224": {"patch_size": 14, "embed_dim": 1664, "mlp_ratio": 64 / 13, "depth": 48,
                                     "num_heads": 16},
        "vit_base_patch16_siglip_224": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                        "class_token": False, "global_pool": "map"},
        # timm passes classes here; the table names them as timm does (get_act_layer's name for nn.SiLU).
        "vit_giant_patch14_dinov2": {"patch_size": 14, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                     "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp_layer": "SwiGLUPacked",
                                     "act_layer": "silu"},
    }
    assert table["REFUSED"] == {
        "vit_xp": "qk_norm=True",
        "vit_unpacked_swiglu": "mlp_layer=SwiGLU",
        "vit_mish": "act_layer=nn.Mish",
    }
