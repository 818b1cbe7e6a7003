"""ViT parity with transformers, timm layout, round trips, backbone and new heads — on the current backend."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import ViTModel

import zoo
from keras.ops import convert_to_numpy as to_numpy
from vit_reference import hf_hidden, hf_logits, hf_to_timm, save_hf_vit, timm_avg_pool_logits

TOL = 1e-4

# Unusual shapes and non-default values; each field here changes the maths.
VARIANTS = {
    "odd_sizes": dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=50,
                      image_size=40, patch_size=8, layer_norm_eps=1e-5, num_labels=5),
    "non_square_many_labels": dict(hidden_size=30, num_hidden_layers=3, num_attention_heads=5, intermediate_size=44,
                                   image_size=[48, 32], patch_size=[8, 16], layer_norm_eps=1e-6, num_labels=1003,
                                   hidden_act="gelu_new", qkv_bias=False),
    "one_label_quick_gelu": dict(hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=40,
                                 image_size=28, patch_size=7, layer_norm_eps=1e-3, num_labels=1, hidden_act="quick_gelu",
                                 num_channels=1),
}


def pixels(config: dict, batch: int = 2, seed: int = 0, size=None) -> np.ndarray:
    size = size or config["image_size"]
    h, w = (size, size) if isinstance(size, int) else size
    return np.random.default_rng(seed).standard_normal((batch, h, w, config.get("num_channels", 3))).astype("float32")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    return {name: save_hf_vit(root / name, seed=i, **cfg) for i, (name, cfg) in enumerate(VARIANTS.items())}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(hf_folders, variant):
    x = pixels(VARIANTS[variant])
    clf = zoo.ViTImageClassifier.from_preset(hf_folders[variant])
    got = to_numpy(clf(x))
    want = hf_logits(hf_folders[variant], x)
    assert got.shape == (2, VARIANTS[variant]["num_labels"])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    # The compiled path used by predict_labels agrees with the eager call.
    np.testing.assert_allclose(to_numpy(clf.predict_on_batch(x)), want, atol=TOL, rtol=0)


def test_every_maths_field_is_read(hf_folders):
    cfg = zoo.ViTImageClassifier.from_preset(hf_folders["non_square_many_labels"]).config
    assert (cfg.image_size, cfg.patch_size, cfg.layer_norm_eps) == ((48, 32), (8, 16), 1e-6)
    assert (cfg.hidden_act, cfg.qkv_bias, cfg.num_labels, cfg.num_heads) == ("gelu_new", False, 1003, 5)


def test_older_torch_dtype_spelling_loads(tmp_path):
    folder = save_hf_vit(tmp_path / "old", seed=3, dtype_key="torch_dtype", **VARIANTS["odd_sizes"])
    assert "torch_dtype" in json.loads((folder / "config.json").read_text())
    x = pixels(VARIANTS["odd_sizes"])
    clf = zoo.ViTImageClassifier.from_preset(folder)
    np.testing.assert_allclose(to_numpy(clf(x)), hf_logits(folder, x), atol=TOL, rtol=0)
    clf.save_preset(tmp_path / "saved")
    assert "torch_dtype" in json.loads((tmp_path / "saved" / "config.json").read_text())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_half_precision_checkpoint(tmp_path, dtype):
    folder = save_hf_vit(tmp_path / "half", seed=4, dtype=dtype, **VARIANTS["odd_sizes"])
    with safe_open(folder / "model.safetensors", "np") as f:
        assert f.get_slice("classifier.weight").get_dtype() in ("BF16", "F16")
    x = pixels(VARIANTS["odd_sizes"])
    clf = zoo.ViTImageClassifier.from_preset(folder, dtype="float32")
    np.testing.assert_allclose(to_numpy(clf(x)), hf_logits(folder, x), atol=TOL, rtol=0)
    default = zoo.ViTImageClassifier.from_preset(folder)  # the checkpoint's own dtype
    expected = "bfloat16" if dtype == torch.bfloat16 else "float16"
    assert {v.dtype for v in default.weights} == {expected}


def test_interpolated_position_embeddings(hf_folders):
    config = VARIANTS["odd_sizes"]
    x = pixels(config, size=(56, 48))
    clf = zoo.ViTImageClassifier.from_preset(hf_folders["odd_sizes"], image_size=(56, 48))
    want = hf_logits(hf_folders["odd_sizes"], x, interpolate=True)
    np.testing.assert_allclose(to_numpy(clf(x)), want, atol=TOL, rtol=0)
    assert clf.preprocessor.size == (56, 48)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_layout(tmp_path, pool):
    config = dict(VARIANTS["odd_sizes"], intermediate_size=54, layer_norm_eps=1e-6)  # timm: eps 1e-6, int mlp_ratio
    hf = save_hf_vit(tmp_path / "hf", seed=5, **config)
    timm = hf_to_timm(hf, tmp_path / "timm", global_pool=pool)
    x = pixels(config)
    clf = zoo.ViTImageClassifier.from_preset(timm)
    want = hf_logits(hf, x) if pool == "token" else timm_avg_pool_logits(hf, x)
    np.testing.assert_allclose(to_numpy(clf(x)), want, atol=TOL, rtol=0)
    assert clf.config.source_format == "timm" and clf.config.pooling == pool
    # timm's eval transform: bicubic resize of the short side to size / crop_pct, then a centre crop.
    assert (clf.preprocessor.shortest_edge, clf.preprocessor.crop_size, clf.preprocessor.resample) == (44, (40, 40), 3)
    saved = clf.save_preset(tmp_path / "timm_saved")
    raw = json.loads((saved / "config.json").read_text())
    assert raw["architecture"] == "vit_tiny_patch8_40" and raw["global_pool"] == pool
    with safe_open(saved / "model.safetensors", "np") as f:
        assert "blocks.0.attn.qkv.weight" in f.keys()
        np.testing.assert_array_equal(
            f.get_tensor("blocks.1.attn.qkv.weight"),
            safe_open(timm / "model.safetensors", "np").get_tensor("blocks.1.attn.qkv.weight"),
        )
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(saved)(x)), to_numpy(clf(x)))


def test_round_trip_and_transformers_reload(hf_folders, tmp_path):
    folder = hf_folders["non_square_many_labels"]
    x = pixels(VARIANTS["non_square_many_labels"])
    clf = zoo.ViTImageClassifier.from_preset(folder)
    saved = clf.save_preset(tmp_path / "saved")
    again = zoo.ViTImageClassifier.from_preset(saved)
    np.testing.assert_array_equal(to_numpy(again(x)), to_numpy(clf(x)))
    np.testing.assert_allclose(hf_logits(saved, x), hf_logits(folder, x), atol=1e-6, rtol=0)
    assert json.loads((saved / "preprocessor_config.json").read_text())["size"] == {"height": 48, "width": 32}


def test_sharded_round_trip(hf_folders, tmp_path):
    folder = hf_folders["odd_sizes"]
    x = pixels(VARIANTS["odd_sizes"])
    clf = zoo.ViTImageClassifier.from_preset(folder)
    saved = clf.save_preset(tmp_path / "sharded", max_shard_size="20KB")
    shards = sorted(p.name for p in saved.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (saved / "model.safetensors").exists()
    index = json.loads((saved / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(saved)(x)), to_numpy(clf(x)))
    np.testing.assert_allclose(hf_logits(saved, x), hf_logits(folder, x), atol=1e-6, rtol=0)
    # Saving again unsharded into the same folder leaves no stale shards behind.
    clf.save_preset(saved)
    assert not list(saved.glob("model-*.safetensors")) and not (saved / "model.safetensors.index.json").exists()


def test_backbone_from_classifier_and_bare_checkpoints(hf_folders, tmp_path):
    folder = hf_folders["odd_sizes"]
    x = pixels(VARIANTS["odd_sizes"])
    backbone = zoo.ViTBackbone.from_preset(folder)
    np.testing.assert_allclose(to_numpy(backbone(x)), hf_hidden(folder, x), atol=TOL, rtol=0)
    bare = backbone.save_preset(tmp_path / "bare")
    assert json.loads((bare / "config.json").read_text())["architectures"] == ["ViTModel"]
    ref = ViTModel.from_pretrained(bare, add_pooling_layer=False).eval()
    with torch.no_grad():
        hidden = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(hidden, hf_hidden(folder, x), atol=1e-6, rtol=0)
    np.testing.assert_allclose(to_numpy(zoo.ViTBackbone.from_preset(bare)(x)), hidden, atol=TOL, rtol=0)
    with pytest.raises(zoo.errors.ConfigError, match="without a classification head; pass num_labels"):
        zoo.ViTImageClassifier.from_preset(bare)


def test_new_head_keeps_backbone(hf_folders):
    folder = hf_folders["odd_sizes"]
    x = pixels(VARIANTS["odd_sizes"])
    clf = zoo.ViTImageClassifier.from_preset(folder, labels=["cat", "dog", "eel"])
    assert to_numpy(clf(x)).shape == (2, 3) and clf.config.labels == ("cat", "dog", "eel")
    assert np.abs(to_numpy(clf.classifier.kernel)).max() > 0  # initialised, not left at zero
    np.testing.assert_allclose(to_numpy(clf.backbone(x)), hf_hidden(folder, x), atol=TOL, rtol=0)
    assert to_numpy(zoo.ViTImageClassifier.from_preset(folder, num_labels=7)(x)).shape == (2, 7)


def test_new_head_is_saved(hf_folders, tmp_path):
    """A classifier given a new head (to fine-tune) saves it: it reloads here and in transformers."""
    folder = hf_folders["odd_sizes"]
    x = pixels(VARIANTS["odd_sizes"])
    clf = zoo.ViTImageClassifier.from_preset(folder, labels=["cat", "dog", "eel"])
    saved = clf.save_preset(tmp_path / "new_head")
    with safe_open(saved / "model.safetensors", "np") as f:
        assert f.get_tensor("classifier.weight").shape == (3, 36)
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(saved)(x)), to_numpy(clf(x)))
    np.testing.assert_allclose(hf_logits(saved, x), to_numpy(clf(x)), atol=TOL, rtol=0)


def test_new_head_on_an_encoder_checkpoint_is_saved_as_a_classifier(hf_folders, tmp_path):
    """A ViTModel checkpoint given labels becomes a classifier that saves, and reloads, with its head."""
    x = pixels(VARIANTS["odd_sizes"])
    bare = zoo.ViTBackbone.from_preset(hf_folders["odd_sizes"]).save_preset(tmp_path / "bare")
    clf = zoo.ViTImageClassifier.from_preset(bare, labels=["cat", "dog"])
    assert bare.joinpath("config.json").read_text().count("ViTModel") and not clf.config.headless
    saved = clf.save_preset(tmp_path / "classifier")
    assert json.loads((saved / "config.json").read_text())["architectures"] == ["ViTForImageClassification"]
    np.testing.assert_allclose(hf_logits(saved, x), to_numpy(clf(x)), atol=TOL, rtol=0)
    np.testing.assert_array_equal(to_numpy(zoo.ViTImageClassifier.from_preset(saved)(x)), to_numpy(clf(x)))


def test_keras_config_round_trip(hf_folders):
    clf = zoo.ViTImageClassifier.from_preset(hf_folders["odd_sizes"])
    clone = zoo.ViTImageClassifier.from_config(clf.get_config())
    clone.set_weights(clf.get_weights())
    x = pixels(VARIANTS["odd_sizes"])
    np.testing.assert_array_equal(to_numpy(clone(x)), to_numpy(clf(x)))


def test_lora_adapters_change_the_projections(hf_folders):
    """Keras' enable_lora on our projections: the forward pass uses kernel + (alpha / rank) * A @ B."""
    folder = hf_folders["odd_sizes"]
    x = pixels(VARIANTS["odd_sizes"])
    clf, merged = zoo.ViTImageClassifier.from_preset(folder), zoo.ViTImageClassifier.from_preset(folder)
    rng = np.random.default_rng(1)
    for layer, twin in ((clf.backbone.encoder_layers[0].fc1, merged.backbone.encoder_layers[0].fc1),
                        (clf.backbone.encoder_layers[1].q_proj, merged.backbone.encoder_layers[1].q_proj)):
        layer.enable_lora(2)
        layer.lora_kernel_b.assign(rng.standard_normal(layer.lora_kernel_b.shape).astype("float32"))
        twin.kernel.assign(to_numpy(layer.kernel))  # the merged kernel, as Keras defines it
    assert np.abs(to_numpy(clf(x)) - hf_logits(folder, x)).max() > 10 * TOL  # the adapters are in use
    np.testing.assert_allclose(to_numpy(clf(x)), to_numpy(merged(x)), atol=TOL, rtol=0)
    trainable = {v.path for v in clf.trainable_weights}
    assert "backbone/layers_0/fc1/lora_kernel_a" in trainable and "backbone/layers_0/fc1/kernel" not in trainable


def test_save_refuses_to_drop_lora_adapters(hf_folders, tmp_path):
    clf = zoo.ViTImageClassifier.from_preset(hf_folders["odd_sizes"])
    clf.backbone.encoder_layers[0].q_proj.enable_lora(2)
    with pytest.raises(zoo.errors.UnexpectedWeightsError, match=r"would lose them: backbone/layers_0/q_proj/lora_kernel_a"):
        clf.save_preset(tmp_path / "lora")
    assert not (tmp_path / "lora").exists()  # nothing written


def test_predict_follows_assigned_weights_and_new_adapters(hf_folders):
    """predict (a replayed trace on PyTorch) sees assigned values, enable_lora and new batch sizes."""
    x = pixels(VARIANTS["odd_sizes"], batch=3)
    clf = zoo.ViTImageClassifier.from_preset(hf_folders["odd_sizes"])
    np.testing.assert_allclose(clf.predict_on_batch(x), to_numpy(clf(x)), atol=1e-5, rtol=0)
    if keras.backend.backend() == "torch":
        assert "_predict_trace" in clf.__dict__  # the backend's trace served that call
    before = clf.predict_on_batch(x)
    fc1 = clf.backbone.encoder_layers[0].fc1
    fc1.kernel.assign(to_numpy(fc1.kernel) * 2.0)
    after = clf.predict_on_batch(x)
    assert np.abs(after - before).max() > 10 * TOL
    np.testing.assert_allclose(after, to_numpy(clf(x)), atol=1e-5, rtol=0)
    q_proj = clf.backbone.encoder_layers[1].q_proj
    q_proj.enable_lora(2)
    q_proj.lora_kernel_b.assign(np.random.default_rng(2).standard_normal(q_proj.lora_kernel_b.shape).astype("float32"))
    adapted = clf.predict_on_batch(x)
    assert np.abs(adapted - after).max() > 10 * TOL
    np.testing.assert_allclose(adapted, to_numpy(clf(x)), atol=1e-5, rtol=0)
    np.testing.assert_allclose(clf.predict_on_batch(x[:1]), adapted[:1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(clf.predict(x, batch_size=2, verbose=0), adapted, atol=1e-5, rtol=0)


def test_generic_from_preset_picks_the_task(hf_folders):
    assert isinstance(zoo.from_preset(hf_folders["odd_sizes"]), zoo.ViTImageClassifier)


def test_backends_agree(hf_folders, tmp_path):
    """The other two backends, each in its own process, give the same logits as this one."""
    folder = hf_folders["non_square_many_labels"]
    x = pixels(VARIANTS["non_square_many_labels"])
    np.save(tmp_path / "x.npy", x)
    here = to_numpy(zoo.ViTImageClassifier.from_preset(folder)(x))
    worker = Path(__file__).with_name("backend_worker.py")
    for other in {"jax", "torch", "tensorflow"} - {keras.backend.backend()}:
        out = tmp_path / f"{other}.npy"
        env = dict(os.environ, KERAS_BACKEND=other)
        subprocess.run([sys.executable, str(worker), "vit", str(folder), str(tmp_path / "x.npy"), str(out)],
                       env=env, check=True, timeout=300, capture_output=True)
        np.testing.assert_allclose(np.load(out), here, atol=TOL, rtol=0, err_msg=f"{other} vs {keras.backend.backend()}")


def test_export_takes_any_batch_size(tmp_path):
    """`export` needs no input_signature (the model knows its inputs), and each backend's own tracer
    takes the model for a batch of any size: TensorFlow's SavedModel (reloaded and served here),
    jax.export of `stateless_call` with a symbolic batch (a static-shape branch in the projections once
    failed it), torch.export of the model as the torch.nn.Module it is, with a dynamic batch."""
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    h, w = clf.backbone.image_size
    batches = [np.random.default_rng(n).standard_normal((n, h, w, clf.config.num_channels)).astype("float32")
               for n in (1, 3)]
    name = keras.backend.backend()
    if name == "tensorflow":
        import tensorflow as tf

        clf.export(tmp_path / "saved", verbose=False)
        loaded = tf.saved_model.load(str(tmp_path / "saved"))  # kept: its variables live as long as it does
        run = loaded.serve
    elif name == "jax":
        import jax

        # The model as a pure function of its weights (stateless_call), exported with a symbolic batch
        # (`export` itself makes formats for other runtimes: tests/test_export.py).
        weights = ([v.value for v in clf.trainable_variables], [v.value for v in clf.non_trainable_variables])
        spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {clf.config.num_channels}"), "float32")
        exported = jax.export.export(jax.jit(lambda x: clf.stateless_call(*weights, x)[0]))(spec)
        run = jax.export.deserialize(exported.serialize()).call
    else:
        exported = torch.export.export(clf, (torch.from_numpy(batches[1]),),  # Keras' forward(*args)
                                       dynamic_shapes={"args": ({0: torch.export.Dim("batch", min=1)},)}, strict=False)
        run = exported.module()
    for x in batches:
        got = run(torch.from_numpy(x) if name == "torch" else x)
        np.testing.assert_allclose(to_numpy(got), to_numpy(clf.predict_on_batch(x)), atol=1e-5, rtol=0)
