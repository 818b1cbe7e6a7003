"""timm's ViT variants (DINOv2, registers, SwiGLU, CLIP, average and attention pooling without a class token) —
on the current backend."""

import json

import numpy as np
import pytest
import torch

import zoo
from timm_reference import LABELS, SIZE, VARIANTS
from keras.ops import convert_to_numpy as to_numpy
from zoo.errors import ConfigError
from zoo.layers.interpolate import bicubic_grid_matrices
from zoo.models.vit.config import ViTConfig

TOL = 1e-4


def images(batch: int = 2, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype("float32")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_timm_variant_matches_reference_and_round_trips(tmp_path, variant):
    folder, reference = VARIANTS[variant](tmp_path / variant)
    x = images()
    want = reference(x)
    backbone_only = json.loads((folder / "config.json").read_text())["num_classes"] == 0
    model = (zoo.ViTBackbone if backbone_only else zoo.ViTImageClassifier).from_preset(folder)
    got = to_numpy(model(x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    np.testing.assert_allclose(to_numpy(model.predict_on_batch(x)), want, atol=TOL, rtol=0)

    # Saved back in timm's layout: the same tensors, the same model_args, and the same outputs.
    saved = model.save_preset(tmp_path / "saved")
    raw, source = (json.loads((f / "config.json").read_text()) for f in (saved, folder))
    assert raw["architecture"] == source["architecture"]
    for key, value in source["model_args"].items():
        assert raw["model_args"][key] == value, key
    again = type(model).from_preset(saved)
    np.testing.assert_array_equal(to_numpy(again(x)), got)
    with pytest.raises(ConfigError, match="cannot describe"):  # a Hugging Face ViT config.json cannot say it
        model.config.replace(source_format="hf").to_hf()


def test_registers_and_class_token_layout(tmp_path):
    folder, _ = VARIANTS["dinov2_registers"](tmp_path / "dino")
    backbone = zoo.ViTBackbone.from_preset(folder)
    config = backbone.config
    assert (config.register_tokens, config.prefix_positions, config.num_prefix_tokens) == (2, False, 3)
    assert backbone.embeddings.position_embeddings.shape == (1, 9, 24)  # the 3x3 patches only
    assert to_numpy(backbone(images(1))).shape == (1, 3 + 9, 24)
    assert backbone.config.layer_scale == 1e-5  # vit_small_patch14_reg4_dinov2's init_values, from timm's table


def test_timm_resamples_positions_as_timm(tmp_path):
    """A timm checkpoint at another resolution: position embeddings resampled as timm's
    resample_abs_pos_embed does (bicubic, antialiased), the prefix's own positions kept."""
    folder, _ = VARIANTS["clip"](tmp_path / "clip")
    for size in (35, 14):  # up and down from the 3x3 grid
        clf = zoo.ViTImageClassifier.from_preset(folder, image_size=size)
        grid = size // 7
        pos = to_numpy(clf.backbone.embeddings.position_embeddings)  # (1, 1 + 9, d)
        want = torch.nn.functional.interpolate(
            torch.from_numpy(pos[0, 1:].T.reshape(1, -1, 3, 3).copy()), size=(grid, grid), mode="bicubic",
            align_corners=False, antialias=True)[0].reshape(pos.shape[-1], -1).T.numpy()
        got = np.kron(*clf.backbone.embeddings.resample) @ pos[0, 1:]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        assert to_numpy(clf(images(1, size))).shape == (1, LABELS)


@pytest.mark.parametrize("grid_in,grid_out", [((3, 3), (5, 5)), ((5, 4), (2, 3)), ((7, 7), (7, 3)), ((4, 4), (9, 2))])
def test_antialiased_bicubic_matrix_matches_torch(grid_in, grid_out):
    x = torch.randn(1, 4, *grid_in, dtype=torch.float64)
    want = torch.nn.functional.interpolate(x, size=grid_out, mode="bicubic", align_corners=False, antialias=True)
    got = np.kron(*bicubic_grid_matrices(grid_in, grid_out, antialias=True)).astype(np.float64) @ x[0].reshape(4, -1).T.numpy()
    np.testing.assert_allclose(got, want[0].reshape(4, -1).T.numpy(), atol=1e-6, rtol=0)


# Parameter counts of timm 1.0.31's models of these names (measured with timm, meta device), which
# ViTConfig computes from a Hub-style config.json: no model_args, so the sizes come from timm's table.
TIMM_COUNTS = [
    ("vit_small_patch14_dinov2", 0, 518, 22056192),
    ("vit_small_patch14_reg4_dinov2", 0, 518, 22057344),
    ("vit_base_patch16_clip_quickgelu_224", 1000, 224, 86568424),
    ("vit_medium_patch16_gap_256", 1000, 256, 38861288),
    ("vit_betwixt_patch16_reg4_gap_256", 1000, 256, 60398440),
    ("vit_base_patch16_224_miil", 11221, 224, 94399957),
    ("vit_so400m_patch14_siglip_384", 0, 384, 428225600),
    ("vit_so150m_patch16_reg4_map_256", 1000, 256, 141481064),
    ("vit_giant_patch14_dinov2", 0, 518, 1136479232),
]


def test_every_architecture_of_timms_table_reads():
    """Each architecture the table lists (those the README counts as loading) is accepted by ViTConfig,
    as a Hub config.json names it, and saves back with no model_args: the table generator's idea of
    what our ViT builds and the config reader's agree."""
    from zoo.models.vit import timm_architectures

    assert len(timm_architectures.ARCHITECTURES) == 128
    for architecture, args in timm_architectures.ARCHITECTURES.items():
        size = args.get("img_size", 224)
        config = ViTConfig.from_timm({"architecture": architecture, "num_classes": 0,
                                      "pretrained_cfg": {"input_size": [3, size, size]}})
        assert config.num_params(with_head=False) > 0
        assert "model_args" not in config.to_timm(), architecture


def test_a_timm_mlp_layer_we_do_not_build_is_refused(monkeypatch):
    from zoo.models.vit import timm_architectures

    table = {**timm_architectures.ARCHITECTURES,
             "vit_new": {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_layer": "SwiGLU"}}
    monkeypatch.setattr(timm_architectures, "ARCHITECTURES", table)
    with pytest.raises(ConfigError, match=r"mlp_layer 'SwiGLU' is not supported \(expected one of \[None, 'SwiGLUPacked'\]\)"):
        ViTConfig.from_timm({"architecture": "vit_new", "num_classes": 0, "pretrained_cfg": {"input_size": [3, 32, 32]}})


@pytest.mark.parametrize("architecture,classes,size,count", TIMM_COUNTS, ids=[c[0] for c in TIMM_COUNTS])
def test_hub_configs_of_named_timm_architectures(architecture, classes, size, count):
    raw = {"architecture": architecture, "num_classes": classes, "pretrained_cfg": {"input_size": [3, size, size]}}
    config = ViTConfig.from_timm(raw)
    assert config.image_size == (size, size)
    assert config.num_params() == count
    # Written back, a named architecture needs no model_args beyond what differs from its name.
    assert "model_args" not in config.to_timm()
    assert config.to_timm()["architecture"] == architecture


def test_timm_config_round_trips_changed_arguments():
    config = ViTConfig.from_timm({"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 0,
                                  "pretrained_cfg": {"input_size": [3, 518, 518]}})
    changed = config.replace(register_tokens=8, layer_scale=None, final_norm="none", num_layers=3)
    args = changed.to_timm()["model_args"]
    assert args == {"reg_tokens": 8, "init_values": None, "final_norm": False, "depth": 3}
    back = ViTConfig.from_timm({**changed.to_timm(), "num_classes": 0})
    assert (back.register_tokens, back.layer_scale, back.final_norm, back.num_layers) == (8, None, "none", 3)
    with pytest.raises(ConfigError, match="layer_norm_eps 1e-05 differs from timm's 1e-06"):
        config.replace(layer_norm_eps=1e-5).to_timm()


@pytest.mark.parametrize("model_args,message", [
    ({"reg_tokens": -1}, r"model_args: field 'reg_tokens' should be an int >= 0, got -1"),
    ({"init_values": "small"}, r"model_args: field 'init_values' should be a finite number"),
    ({"act_layer": "mish"}, r"model_args.act_layer='mish' is not supported"),
    ({"class_token": False, "global_pool": "token"}, r"global_pool 'token' needs the class token"),
    ({"global_pool": "avgmax"}, r"global_pool: expected one of \('token', 'avg', 'map'\), got 'avgmax'"),
    ({"mlp_layer": "SwiGLUPacked"}, r"model_args.mlp_layer='SwiGLUPacked' is not supported \(expected None\)"),
    ({"norm_eps": 1e-5}, r"model_args \['norm_eps'\] are not supported"),
    ({"qk_norm": True}, r"model_args.qk_norm=True is not supported"),
])
def test_bad_timm_variant_arguments(model_args, message):
    raw = {"architecture": "vit_small_patch14_dinov2", "num_classes": 0, "model_args": model_args,
           "pretrained_cfg": {"input_size": [3, 518, 518]}}
    with pytest.raises(ConfigError, match=message):
        ViTConfig.from_timm(raw)


def test_timm_layout_refuses_an_activation_timm_cannot_name():
    config = ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, image_size=(16, 16),
                       patch_size=(8, 8), num_labels=3, hidden_act="gelu_new", layer_norm_eps=1e-6,
                       source_format="timm")
    with pytest.raises(ConfigError, match="hidden_act 'gelu_new' has no timm equivalent"):
        config.to_timm()


def test_gated_mlp_needs_an_even_fc1():
    raw = {"architecture": "vit_giant_patch14_dinov2", "num_classes": 0,
           "model_args": {"embed_dim": 24, "mlp_ratio": 5.4}, "pretrained_cfg": {"input_size": [3, 518, 518]}}
    with pytest.raises(ConfigError, match=r"a gated MLP packs gate and up in fc1, whose 129 outputs"):
        ViTConfig.from_timm(raw)


def test_timm_layout_refuses_a_gated_mlp_its_architecture_lacks():
    config = ViTConfig.from_timm({"architecture": "vit_small_patch14_dinov2", "num_classes": 0,
                                  "pretrained_cfg": {"input_size": [3, 518, 518]}})
    with pytest.raises(ConfigError, match=r"gated_mlp True differs from timm's False for 'vit_small_patch14_dinov2'"):
        config.replace(gated_mlp=True).to_timm()


def test_timm_mlp_ratio_written_so_timm_builds_the_same_width():
    """timm builds fc1 with int(embed_dim * mlp_ratio) outputs; 6041 / 1408 * 1408 is 6040.99..."""
    named = ViTConfig.from_timm({"architecture": "vit_giant_patch14_224", "num_classes": 10,
                                 "pretrained_cfg": {"input_size": [3, 224, 224]}})
    assert named.intermediate_size == 6144 and "model_args" not in named.to_timm()
    for width in (6041, 6008, 6145):
        saved = named.replace(intermediate_size=width).to_timm()
        assert int(1408 * saved["model_args"]["mlp_ratio"]) == width
        assert ViTConfig.from_timm(saved).intermediate_size == width
