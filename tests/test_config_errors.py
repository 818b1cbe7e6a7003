"""Bad config.json and preprocessor_config.json values: a ConfigError naming the field, never a bare error from a layer."""

import json
import shutil

import numpy as np
import pytest

import zoo
from zoo.errors import ConfigError, ImageError
from zoo.models.fields import Fields
from gemma_reference import save_hf_gemma
from vit_reference import hf_to_timm, save_hf_vit

VIT = dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40, image_size=16,
           patch_size=8, num_labels=3)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("configs")
    hf = save_hf_vit(root / "vit", seed=3, **VIT)
    return {"vit": hf, "timm": hf_to_timm(hf, root / "timm"), "gemma2": save_hf_gemma(root / "gemma2", "gemma2"),
            "gemma3": save_hf_gemma(root / "gemma3", "gemma3")}


def _edited(sources, tmp_path, source, edit, file="config.json"):
    folder = shutil.copytree(sources[source], tmp_path / "edited")
    path = folder / file
    raw = json.loads(path.read_text()) if path.exists() else {}
    edit(raw)
    path.write_text(json.dumps(raw))
    return folder


def _set(**fields):
    return lambda raw: raw.update(fields)


def _set_in(part, **fields):
    return lambda raw: raw.setdefault(part, {}).update(fields)


VIT_CASES = [
    ("num_attention_heads", _set(num_attention_heads=0), "'num_attention_heads' should be a positive int, got 0"),
    ("hidden_size", _set(hidden_size="24"), "'hidden_size' should be a positive int, got '24'"),
    ("num_hidden_layers", _set(num_hidden_layers=-1), "'num_hidden_layers' should be an int >= 0, got -1"),
    ("layer_norm_eps", _set(layer_norm_eps="1e-6"), "'layer_norm_eps' should be a finite number >= 0"),
    ("num_channels", _set(num_channels="3"), "'num_channels' should be a positive int, got '3'"),
    ("hidden_act", _set(hidden_act=["gelu"]), "'hidden_act' should be a string"),
    ("qkv_bias", _set(qkv_bias="false"), "'qkv_bias' should be true or false, got 'false'"),
    ("patch_size", _set(patch_size=0), "'patch_size' should be a positive int or a pair of positive ints, got 0"),
    ("image_size", _set(image_size=[16]), r"'image_size' should be a positive int or a pair .*, got \[16\]"),
    ("num_labels", _set(num_labels="3"), "'num_labels' should be an int >= 0, got '3'"),
    ("id2label list", _set(id2label=["a", "b", "c"]), "'id2label' should be an object mapping ids to names"),
    ("id2label keys", _set(id2label={"a": "x"}), "'id2label' should be an object whose keys are integer ids"),
    ("id2label gaps", _set(id2label={"0": "x", "5": "y", "7": "z"}), r"'id2label' should be ids 0..2, one per output"),
    ("head_dim", _set(head_dim="12"), "'head_dim' should be a positive int, got '12'"),
]

TIMM_CASES = [
    ("model_args", _set(model_args=[1]), "config.json model_args: expected a JSON object, got list"),
    ("depth", _set_in("model_args", depth="1"), "model_args: field 'depth' should be an int >= 0, got '1'"),
    ("mlp_ratio", _set_in("model_args", mlp_ratio="2"), "model_args: field 'mlp_ratio' should be a finite number"),
    ("input_size", _set_in("pretrained_cfg", input_size=[3, 16]), r"'input_size' should be \[channels, height, width\]"),
    ("num_classes", _set(num_classes="3"), "'num_classes' should be an int >= 0, got '3'"),
    ("label_names", _set(label_names=[1, 2, 3]), "'label_names' should be a list of strings"),
    ("crop_pct", _set_in("pretrained_cfg", crop_pct=0), "pretrained_cfg: field 'crop_pct' should be a finite number above 0"),
    ("mean", _set_in("pretrained_cfg", mean=[0.5, 0.5]), r"'mean' should be a list of numbers \(1 or 3 of them\)"),
    ("std", _set_in("pretrained_cfg", std=[0.5, 0, 0.5]), "'std' should not hold a zero"),
]

PREPROCESSOR_CASES = [
    ("size", _set(size="x"), "preprocessor_config.json: field 'size' should be an int, or height and width"),
    ("size.height", _set(size={"height": "a", "width": 16}), "preprocessor_config.json size: field 'height' should be"),
    ("crop_size", _set(do_center_crop=True, crop_size={"shortest_edge": 8}), "crop_size: missing field 'height'"),
    ("resample", _set(resample=9), "field 'resample' should be a PIL filter number"),
    ("image_mean", _set(image_mean="x"), "field 'image_mean' should be a list of numbers"),
    ("rescale_factor", _set(rescale_factor="1/255"), "field 'rescale_factor' should be a finite number"),
    ("do_resize", _set(do_resize="yes"), "field 'do_resize' should be true or false"),
]

GEMMA_CASES = [
    ("gemma2", "rms_norm_eps", _set(rms_norm_eps="x"), "'rms_norm_eps' should be a finite number >= 0"),
    ("gemma2", "num_key_value_heads", _set(num_key_value_heads=0), "'num_key_value_heads' should be a positive int"),
    ("gemma2", "eos_token_id", _set(eos_token_id=[1, "x"]), "'eos_token_id' should be a token id"),
    ("gemma2", "bos_token_id", _set(bos_token_id=-1), "'bos_token_id' should be a token id"),
    ("gemma2", "softcapping", _set(attn_logit_softcapping=0), "'attn_logit_softcapping' should be a finite number above 0"),
    ("gemma2", "sliding_window", _set(sliding_window="6"), "'sliding_window' should be a positive int"),
    ("gemma2", "layer_types", _set(layer_types="full_attention"), "'layer_types' should be a list"),
    ("gemma2", "tie_word_embeddings", _set(tie_word_embeddings="false"), "'tie_word_embeddings' should be true or false"),
    ("gemma2", "rope_parameters", _set(rope_parameters=[1]), "'rope_parameters' should be an object"),
    ("gemma2", "rope_scaling", lambda raw: (raw.pop("rope_parameters", None), raw.update(rope_scaling="linear")),
     "rope_scaling: expected a JSON object"),  # the Hub's spelling
    ("gemma3", "sliding_window_pattern", lambda raw: (raw.pop("layer_types", None), raw.update(sliding_window_pattern="2")),
     "'sliding_window_pattern' should be a positive int"),
]


@pytest.mark.parametrize("name,edit,message", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_vit_config_fields(sources, tmp_path, name, edit, message):
    with pytest.raises(ConfigError, match=message):
        zoo.ViTImageClassifier.from_preset(_edited(sources, tmp_path, "vit", edit))


@pytest.mark.parametrize("name,edit,message", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_config_fields(sources, tmp_path, name, edit, message):
    with pytest.raises(ConfigError, match=message):
        zoo.ViTImageClassifier.from_preset(_edited(sources, tmp_path, "timm", edit))


@pytest.mark.parametrize("name,edit,message", PREPROCESSOR_CASES, ids=[c[0] for c in PREPROCESSOR_CASES])
def test_preprocessor_config_fields(sources, tmp_path, name, edit, message):
    folder = _edited(sources, tmp_path, "vit", edit, file="preprocessor_config.json")
    with pytest.raises(ConfigError, match=message):
        zoo.ViTImageClassifier.from_preset(folder)


@pytest.mark.parametrize("source,name,edit,message", GEMMA_CASES, ids=[c[1] for c in GEMMA_CASES])
def test_gemma_config_fields(sources, tmp_path, source, name, edit, message):
    with pytest.raises(ConfigError, match=message):
        zoo.GemmaCausalLM.from_preset(_edited(sources, tmp_path, source, edit))


def test_null_token_ids_mean_none_and_ints_stay_ints(sources, tmp_path):
    """A null bos/eos means none (not the default); numbers are kept as written, so a round trip writes them back."""
    lm = zoo.GemmaCausalLM.from_preset(_edited(sources, tmp_path, "gemma2", _set(bos_token_id=None, eos_token_id=None)))
    assert lm.config.bos_token_id is None and lm.config.eos_token_id == ()
    assert isinstance(lm.config.query_pre_attn_scalar, int)  # transformers 5 reads it back only as an int


def test_float_fields_are_written_back_as_floats(sources, tmp_path):
    """transformers 5 rejects an int in a float field: a config that wrote `"layer_norm_eps": 1` saves as 1.0."""
    from transformers import ViTForImageClassification

    clf = zoo.ViTImageClassifier.from_preset(_edited(sources, tmp_path, "vit", _set(layer_norm_eps=1)))
    saved = clf.save_preset(tmp_path / "saved")
    written = json.loads((saved / "config.json").read_text())["layer_norm_eps"]
    assert isinstance(written, float) and written == 1.0
    assert ViTForImageClassification.from_pretrained(saved).config.layer_norm_eps == 1.0


def test_direct_construction_is_checked_too():
    with pytest.raises(ConfigError, match="ViTConfig: field 'num_heads' should be a positive int, got 0"):
        zoo.ViTConfig(num_heads=0)
    with pytest.raises(ConfigError, match="GemmaConfig: field 'head_dim' should be a positive int, got 0"):
        zoo.GemmaConfig(hidden_size=4, num_heads=8, head_dim=0)


def test_fields_reader():
    get = Fields({"n": 3, "x": None, "f": 2, "pair": [2, 3]}, "demo.json")
    assert get.integer("n") == 3 and get.integer("x", 7) == 7 and get.number("f") == 2
    assert get.pair("pair") == (2, 3) and get.pair("n") == (3, 3) and get.numbers("f", lengths=(1, 3)) == (2.0,)
    with pytest.raises(ConfigError, match="demo.json: missing field 'x'"):
        get.integer("x")
    with pytest.raises(ConfigError, match=r"demo.json: field 'f' should be a finite number >= 5"):
        get.number("f", minimum=5)
    with pytest.raises(ConfigError, match="demo.json: expected a JSON object, got list"):
        Fields([1], "demo.json")


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(image_size="abc"), ConfigError, "'image_size' should be a positive int or a pair of positive ints, got 'abc'"),
    (dict(dtype="int8"), ConfigError, "dtype 'int8': expected one of float32, bfloat16, float16"),
    (dict(dtype="float99"), ConfigError, "dtype 'float99'"),
    (dict(labels="abc"), ConfigError, "labels: expected a list of label names, got the string 'abc'"),
    (dict(labels=[1, 2]), ConfigError, r"labels: expected label names \(strings\), got \[1, 2\]"),
])
def test_bad_from_preset_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        zoo.ViTImageClassifier.from_preset("vit_tiny_digits", **kwargs)


def test_an_int_image_size_means_square():
    assert zoo.ViTImageClassifier.from_preset("vit_tiny_digits", image_size=48).backbone.image_size == (48, 48)


def test_images_of_another_size_and_bad_prediction_arguments():
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    h, w = clf.backbone.image_size
    wrong = np.zeros((2, h + 8, w, clf.config.num_channels), "float32")
    for run in (lambda: clf(wrong), lambda: clf.predict(wrong, verbose=0)):  # the same error on every backend
        with pytest.raises(ImageError, match=rf"expected images of {h}x{w} \(this model's image_size\), got {h + 8}x{w}"):
            run()
    image = np.zeros((20, 20), np.uint8)
    with pytest.raises(ValueError, match="top_k must be a positive int, got '3'"):
        clf.predict_labels(image, top_k="3")
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        clf.predict_labels(image, batch_size=0)


GEMMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=6, num_heads=4, num_kv_heads=1, head_dim=8)


@pytest.mark.parametrize("model_type, sandwich, qk_norm, layer_types", [
    ("gemma", False, False, ("full_attention",) * 6),
    ("gemma2", True, False, ("sliding_attention", "full_attention") * 3),
    ("gemma3_text", True, True, ("sliding_attention",) * 5 + ("full_attention",)),
])
def test_gemma_families_fill_explicit_fields(model_type, sandwich, qk_norm, layer_types):
    """model_type's table fills sandwich_norms, qk_norm and the layer pattern; given, they are the model's."""
    config = zoo.GemmaConfig(model_type=model_type, sliding_window=4, **GEMMA)
    assert (config.sandwich_norms, config.qk_norm, config.layer_types) == (sandwich, qk_norm, layer_types)
    other = config.replace(sandwich_norms=not sandwich, qk_norm=not qk_norm)
    assert zoo.GemmaBackbone(other).count_params() == other.num_params() != config.num_params()
    with pytest.raises(ConfigError, match=f"differ from what a '{model_type}' config.json implies"):
        other.to_hf()
    with pytest.raises(ConfigError, match="field 'qk_norm' should be true or false, got 'yes'"):
        zoo.GemmaConfig(model_type=model_type, qk_norm="yes", **GEMMA)


def test_vit_layout_facts_are_config_fields(sources):
    """Antialiased position resampling and a checkpoint without a head are fields the readers fill."""
    hf_raw = json.loads((sources["vit"] / "config.json").read_text())
    timm_raw = json.loads((sources["timm"] / "config.json").read_text())
    hf, timm = zoo.ViTConfig.from_hf(hf_raw), zoo.ViTConfig.from_timm(timm_raw)
    assert (hf.antialias_positions, hf.headless, timm.antialias_positions, timm.headless) == (False, False, True, False)
    assert zoo.ViTConfig.from_hf({**hf_raw, "architectures": ["ViTModel"]}).headless
    assert zoo.ViTConfig.from_timm({**timm_raw, "num_classes": 0}).headless
    assert timm.replace(headless=True).to_timm()["num_classes"] == 0
    assert hf.replace(headless=True).to_hf()["architectures"] == ["ViTModel"]
