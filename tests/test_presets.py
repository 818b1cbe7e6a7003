"""The preset catalogue: card schema, parameter counts without allocating weights, `zoo list/info/download`."""

import json
import tomllib

import pytest

import zoo
from conftest import FAKE_HF_PORT
from fake_hubs import FakeHFHub
from zoo import cli, hub, presets
from zoo.models.gemma import GemmaConfig
from zoo.models.gemma.config import FULL, SLIDING, Rope
from zoo.models.vit import ViTConfig

CARDS = sorted(presets.presets_dir().glob("*.toml"))
REQUIRED = {
    "gemma_2b_en", "gemma_instruct_2b_en", "gemma_7b_en", "gemma_instruct_7b_en",
    "gemma2_2b_en", "gemma2_instruct_2b_en", "gemma2_9b_en", "gemma2_instruct_9b_en",
    "gemma3_1b", "gemma3_instruct_1b",
    "vit_base_patch16_224", "vit_base_patch16_384", "vit_large_patch16_224",
    "vit_base_patch16_224_augreg2_in21k_ft_in1k", "vit_tiny_digits", "gemma_tiny_pycode",
}
SCHEMA = {  # field: (type, required)
    "name": (str, True), "task": (str, True), "description": (str, True), "params": (int, True),
    "license": (str, True), "gated": (bool, False), "sources": (list, False), "revisions": (dict, False),
    "bundled": (str, False), "config": (dict, False), "base": (str, False),
}


@pytest.mark.parametrize("path", CARDS, ids=lambda p: p.stem)
def test_card_schema(path):
    raw = tomllib.loads(path.read_text())
    for key, (kind, required) in SCHEMA.items():
        assert key in raw or not required, f"{path.name}: missing {key}"
        assert key not in raw or isinstance(raw[key], kind), f"{path.name}: {key} must be {kind.__name__}"
    assert set(raw) <= set(SCHEMA), f"{path.name}: unknown fields {set(raw) - set(SCHEMA)}"
    assert raw["name"] == path.stem and raw["params"] > 0 and raw["task"] in zoo.__all__
    assert raw.get("sources") or raw.get("bundled"), "a card needs a source or a bundled folder"
    for source in raw.get("sources", ()):
        hub.parse(source)  # a well-formed handle
    assert set(raw.get("revisions", {})) <= set(raw.get("sources", ()))
    assert raw.get("config") or raw.get("bundled"), "the architecture must be known to check params"
    if raw.get("bundled"):  # a model folder, or an adapter folder over the card's base preset
        kind = "adapter_config.json" if raw.get("base") else "config.json"
        assert (presets.presets_dir() / raw["bundled"] / kind).is_file()
    if raw.get("base"):
        assert presets.get(raw["base"]).task == raw["task"]


def test_catalogue_has_the_promised_presets():
    assert REQUIRED <= {c.name for c in zoo.list_presets()}
    assert {c.name for c in zoo.list_presets(task="ViTImageClassifier")} >= {"vit_base_patch16_224", "vit_tiny_digits"}
    assert all(c.gated for c in zoo.list_presets(task="GemmaCausalLM") if c.name.startswith("gemma") and not c.bundled)


@pytest.mark.parametrize("card", zoo.list_presets(), ids=lambda c: c.name)
def test_param_count_from_architecture(card):
    """Counted from the config alone (a 9B model is never allocated)."""
    config = card.model_config()
    assert type(config).__name__ == {"GemmaCausalLM": "GemmaConfig", "ViTImageClassifier": "ViTConfig",
                                     "ViTBackbone": "ViTConfig"}[card.task]
    assert config.num_params() == card.params


@pytest.mark.parametrize("config", [
    GemmaConfig(model_type="gemma", vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=10),
    GemmaConfig(model_type="gemma", vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=1, num_heads=2,
                num_kv_heads=1, head_dim=8, attention_bias=True, tie_word_embeddings=False),
    GemmaConfig(model_type="gemma2", vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=2, num_heads=4,
                num_kv_heads=1, head_dim=6, sliding_window=4),
    GemmaConfig(model_type="gemma3_text", vocab_size=64, hidden_size=16, intermediate_size=24, num_layers=2,
                num_heads=2, num_kv_heads=1, head_dim=12, sliding_window=4, rope={FULL: Rope(1e6), SLIDING: Rope(1e4)}),
    ViTConfig(hidden_size=24, num_layers=2, num_heads=3, intermediate_size=40, image_size=(20, 28), patch_size=(4, 7),
              num_labels=5),
    ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, image_size=(16, 16), patch_size=(8, 8),
              num_channels=1, qkv_bias=False, num_labels=3),
    ViTConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=24, image_size=(16, 16), patch_size=(8, 8),
              num_labels=3, register_tokens=2, prefix_positions=False, layer_scale=1e-5, pre_norm=True,
              source_format="timm"),
    ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, image_size=(16, 16), patch_size=(8, 8),
              num_labels=3, class_token=False, pooling="avg", final_norm="none", source_format="timm"),
    ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=24, image_size=(16, 16), patch_size=(8, 8),
              num_labels=3, class_token=False, register_tokens=1, pooling="map", qkv_bias=False, source_format="timm"),
    ViTConfig(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=20, image_size=(16, 16), patch_size=(8, 8),
              num_labels=0, gated_mlp=True, hidden_act="silu", layer_scale=1e-5, source_format="timm"),
    ViTConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=12, image_size=(16, 16), patch_size=(8, 8),
              num_labels=3, class_token=False, pooling="map", gated_mlp=True, hidden_act="silu", source_format="timm"),
], ids=lambda c: f"{type(c).__name__}-{getattr(c, 'model_type', '')}")
def test_param_formula_matches_built_models(config):
    model = (zoo.GemmaCausalLM if isinstance(config, GemmaConfig) else zoo.ViTImageClassifier)(config)
    assert config.num_params() == model.count_params()


def test_bad_cards_are_reported(tmp_path, monkeypatch):
    (tmp_path / "x.toml").write_text('name = "y"\ntask = "ViTImageClassifier"\ndescription = ""\nparams = 1\nlicense = "MIT"\n')
    monkeypatch.setattr(presets, "presets_dir", lambda: tmp_path)
    presets._all_cards.cache_clear()
    try:
        with pytest.raises(zoo.errors.ConfigError, match="must match its file name"):
            zoo.list_presets()
        (tmp_path / "x.toml").write_text('name = "x"\ntask = "ViTImageClassifier"\nsize = 3\n')
        presets._all_cards.cache_clear()
        with pytest.raises(zoo.errors.ConfigError, match=r"unknown fields \['size'\]"):
            zoo.list_presets()
    finally:
        presets._all_cards.cache_clear()


# ----------------------------------------------------------------------------- CLI


def test_list_table_and_filter(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["NAME", "TASK", "PARAMS", "LICENSE", "NOTES"]
    assert any(line.startswith("gemma2_9b_en ") and "9.24B" in line and "gated" in line for line in out)
    assert any(line.startswith("vit_tiny_digits ") and "bundled" in line for line in out)
    assert cli.main(["list", "--task", "ViTImageClassifier", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and {r["task"] for r in rows} == {"ViTImageClassifier"}
    assert cli.main(["list", "--task", "Nope"]) == 1
    assert "no presets for task 'Nope'" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info", "gemma2_2b_en"]) == 0
    out = capsys.readouterr().out
    assert "2.61B parameters" in out and "hf://google/gemma-2-2b" in out and "gated" in out and "not downloaded" in out
    assert cli.main(["info", "vit_tiny_digits", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bundled"] and info["cached"] and info["size_bytes"] > 100_000
    assert cli.main(["info", "gemma_2b"]) == 1
    assert "did you mean gemma_2b_en" in capsys.readouterr().err


def test_download_then_info_shows_it_cached(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    server = FakeHFHub(port=FAKE_HF_PORT).start()
    try:
        folder = presets.get("vit_tiny_digits").folder
        sha = server.add("google/vit-base-patch16-224", folder)  # stands in for the real repo
        assert cli.main(["info", "vit_base_patch16_224", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["cached"] is None
        assert cli.main(["download", "vit_base_patch16_224"]) == 0
        assert sha in capsys.readouterr().out
        assert cli.main(["info", "vit_base_patch16_224", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["cached"].endswith(sha)
        assert cli.main(["download", "hf://google/vit-base-patch16-224", "--revision", "nope"]) == 1
        assert "has no revision 'nope'" in capsys.readouterr().err
    finally:
        server.stop()
