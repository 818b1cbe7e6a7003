"""LoRA adapters against PEFT, both ways: tiny random Gemma 1/2/3 and ViT made with transformers + peft."""

import json

import keras
import numpy as np
import peft
import pytest
import torch
from keras.ops import convert_to_numpy as to_numpy
from safetensors.numpy import load_file, save_file
from transformers import ViTForImageClassification

import zoo
from zoo.lora.modules import modules as lora_modules
from gemma_reference import hf_greedy, reference, save_hf_gemma
from vit_reference import hf_to_timm, save_hf_vit

NEW = 32
TOKENS = np.random.default_rng(0).integers(3, 150, (2, 12)).astype(np.int32)
IMAGES = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
           patch_size=8, num_labels=5)
ODD_LAYER = "model.layers.1.self_attn.q_proj"  # rank_pattern and alpha_pattern give it its own rank and alpha


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_gemma")
    return {v: save_hf_gemma(root / v, v, seed=i) for i, v in enumerate(("gemma", "gemma2", "gemma3"))}


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return save_hf_vit(tmp_path_factory.mktemp("lora_vit") / "vit", seed=3, **VIT)


def peft_adapter(base, folder, seed=0, **config):
    """A PEFT adapter with every lora_A and lora_B non-zero (B at 0.3x PEFT's init, so logits keep their scale)."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    model.save_pretrained(folder)
    return model


def torch_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def vit_logits(model, images=IMAGES):
    with torch.no_grad():
        return model(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits.numpy()


def greedy(lm, prompt, n=NEW):
    engine = lm.engine(1, 64)
    request = engine.submit(prompt, n, stop_ids=())
    for _ in engine.run([request]):
        pass
    return request.tokens


# ----------------------------------------------------------------------------- PEFT -> keras-zoo


@pytest.mark.parametrize("variant,rslora", [("gemma", False), ("gemma2", True), ("gemma3", False), ("gemma3", True)])
def test_peft_adapter_loads_with_peft_logits_and_tokens(gemma, tmp_path, variant, rslora):
    ref = peft_adapter(reference(gemma[variant]), tmp_path / "adapter", r=4, lora_alpha=8, target_modules="all-linear",
                       use_rslora=rslora, rank_pattern={ODD_LAYER: 2}, alpha_pattern={ODD_LAYER: 3})
    lm = zoo.GemmaCausalLM.from_preset(gemma[variant])
    base = to_numpy(lm(TOKENS))
    assert lm.load_adapter(tmp_path / "adapter") == "default" and lm.adapters == ["default"]
    want = torch_logits(ref)
    assert np.abs(want - base).max() > 0.1  # the adapter changes the model
    np.testing.assert_allclose(to_numpy(lm(TOKENS)), want, atol=1e-4, rtol=0)
    prompt = lm.tokenizer.encode("def add(a, b):")
    tokens = greedy(lm, prompt)
    assert tokens == hf_greedy(ref, prompt, NEW) and len(set(tokens)) >= 3


def test_vit_adapter_with_a_new_head_loads(vit, tmp_path):
    base = ViTForImageClassification.from_pretrained(vit, num_labels=3, ignore_mismatched_sizes=True)
    ref = peft_adapter(base, tmp_path / "adapter", r=4, target_modules=["q_proj", "v_proj", "fc1"],
                       modules_to_save=["classifier"])
    clf = zoo.ViTImageClassifier.from_preset(vit, num_labels=3)
    clf.load_adapter(tmp_path / "adapter")
    np.testing.assert_allclose(to_numpy(clf(IMAGES)), vit_logits(ref), atol=1e-4, rtol=0)


def test_vit_adapter_in_transformers_4_names_loads_alike(vit, tmp_path):
    """The Hub's ViT adapters name modules as transformers 4 did (query, attention.output.dense, ...)."""
    peft_adapter(ViTForImageClassification.from_pretrained(vit), tmp_path / "t5", r=2, target_modules="all-linear")
    old = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}

    def legacy(key):
        for new, before in old.items():
            key = key.replace(f".{new}.", f".{before}.")
        return key.replace("vit.layers.", "vit.encoder.layer.")

    (tmp_path / "t4").mkdir()
    save_file({legacy(k): v for k, v in load_file(tmp_path / "t5" / "adapter_model.safetensors").items()},
              tmp_path / "t4" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "t5" / "adapter_config.json").read_text())
    config["target_modules"] = ["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                "output.dense", "classifier"]
    (tmp_path / "t4" / "adapter_config.json").write_text(json.dumps(config))
    clf = zoo.ViTImageClassifier.from_preset(vit)
    clf.load_adapter(tmp_path / "t5", name="t5")
    new = to_numpy(clf(IMAGES))
    clf.load_adapter(tmp_path / "t4", name="t4")
    np.testing.assert_array_equal(to_numpy(clf(IMAGES)), new)
    clf.save_adapter(tmp_path / "resaved")  # written under the installed transformers' names, for PEFT
    assert "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight" in load_file(
        tmp_path / "resaved" / "adapter_model.safetensors")
    ref = peft.PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(vit), tmp_path / "resaved").eval()
    np.testing.assert_allclose(vit_logits(ref), new, atol=1e-4, rtol=0)


def test_timm_adapter_on_the_fused_qkv(vit, tmp_path):
    """timm's `qkv` is one module over three of our projections: one lora_A, lora_B split by rows.

    A PEFT adapter on the HF model's q/k/v with one shared A is the same adapter; written under timm's
    names (B stacked as timm stacks the weights), the timm-layout model must give PEFT's logits.
    """
    base = ViTForImageClassification.from_pretrained(vit)
    ref = peft_adapter(base, tmp_path / "hf", r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "fc2"])
    with torch.no_grad():  # one A for q, k and v
        for i in range(VIT["num_hidden_layers"]):
            layer = ref.base_model.model.vit.layers[i].attention
            for p in ("k_proj", "v_proj"):
                getattr(layer, p).lora_A["default"].weight.copy_(layer.q_proj.lora_A["default"].weight)
    want = vit_logits(ref)
    ref.save_pretrained(tmp_path / "hf")
    hf = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    timm = {}
    for i in range(VIT["num_hidden_layers"]):
        src, dst = f"base_model.model.vit.layers.{i}.", f"base_model.model.blocks.{i}."
        timm[dst + "attn.qkv.lora_A.weight"] = hf[src + "attention.q_proj.lora_A.weight"]
        timm[dst + "attn.qkv.lora_B.weight"] = np.concatenate(
            [hf[src + f"attention.{p}_proj.lora_B.weight"] for p in "qkv"])
        for part in "AB":
            timm[dst + f"mlp.fc2.lora_{part}.weight"] = hf[src + f"mlp.fc2.lora_{part}.weight"]
    (tmp_path / "timm").mkdir()
    save_file(timm, tmp_path / "timm" / "adapter_model.safetensors")
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    (tmp_path / "timm" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["qkv", "fc2"]}))
    clf = zoo.ViTImageClassifier.from_preset(hf_to_timm(vit, tmp_path / "timm_model"))
    clf.load_adapter(tmp_path / "timm")
    np.testing.assert_allclose(to_numpy(clf(IMAGES)), want, atol=1e-4, rtol=0)
    clf.save_adapter(tmp_path / "again")  # and written back under timm's names, B stacked again
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert sorted(again) == sorted(timm)
    for key in timm:
        np.testing.assert_array_equal(again[key], timm[key])
    assert clf.enable_lora(rank=2, name="own") == "own" and {m.name.rsplit(".", 1)[-1] for m in lora_modules(clf)
                                                          if m.layers[0].adapters.by_name.get("own")} == {"qkv"}


# ----------------------------------------------------------------------------- keras-zoo -> PEFT, training


def lm_batches(lm):
    x = np.random.default_rng(5).integers(3, 150, (4, 16)).astype(np.int32)
    return x[:, :-1], x[:, 1:]


@pytest.mark.parametrize("dtype", ["float32", "mixed_bfloat16"])
def test_training_moves_only_the_adapter_and_peft_reads_it(gemma, tmp_path, dtype):
    lm = zoo.GemmaCausalLM.from_preset(gemma["gemma3"], dtype=dtype)
    before = {v.path: to_numpy(v).copy() for v in lm.weights}
    lm.enable_lora(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], dropout=0.1)
    adapter = [v for v in lm.trainable_weights]
    assert adapter and all("/default/lora_" in v.path and v.dtype == "float32" for v in adapter)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = lm_batches(lm)
    start = lm.evaluate(x, y, verbose=0)
    lm.fit(x, y, batch_size=2, epochs=4, verbose=0)
    assert lm.evaluate(x, y, verbose=0) < start - 0.05
    assert len(lm.optimizer.variables) < 4 * len(adapter) + 4  # moments for the adapter only
    for v in lm.weights:
        if v.path in before:
            np.testing.assert_array_equal(to_numpy(v), before[v.path], err_msg=v.path)
    if dtype != "float32":
        return
    lm.save_adapter(tmp_path / "mine")
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = load_file(tmp_path / "mine" / "adapter_model.safetensors")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 48)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (80, 4)
    ref = peft.PeftModel.from_pretrained(reference(gemma["gemma3"]), tmp_path / "mine").eval()
    np.testing.assert_allclose(to_numpy(lm(TOKENS)), torch_logits(ref), atol=1e-4, rtol=0)


def test_new_vit_head_trains_and_round_trips_through_peft(vit, tmp_path):
    clf = zoo.ViTImageClassifier.from_preset(vit, labels=["cat", "dog", "eel"])
    head = to_numpy(clf.classifier.kernel).copy()
    clf.enable_lora(rank=4)
    assert {v.path.rsplit("/", 2)[-2] for v in clf.trainable_weights} == {"default"}
    assert any(v.path.endswith("classifier/default/kernel") for v in clf.trainable_weights)
    clf.compile(optimizer=keras.optimizers.Adam(1e-2),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    clf.fit(IMAGES, np.array([0, 2]), epochs=3, verbose=0)
    np.testing.assert_array_equal(to_numpy(clf.classifier.kernel), head)  # the base head stays as it was
    clf.save_adapter(tmp_path / "mine")
    config = json.loads((tmp_path / "mine" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["target_modules"] == ["q_proj", "v_proj"]
    base = ViTForImageClassification.from_pretrained(vit, num_labels=3, ignore_mismatched_sizes=True)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "mine").eval()
    np.testing.assert_allclose(to_numpy(clf(IMAGES)), vit_logits(ref), atol=1e-4, rtol=0)


def test_merge_then_save_preset_loads_in_transformers(gemma, tmp_path):
    peft_adapter(reference(gemma["gemma2"]), tmp_path / "adapter", r=4, target_modules="all-linear")
    lm = zoo.GemmaCausalLM.from_preset(gemma["gemma2"])
    lm.load_adapter(tmp_path / "adapter")
    with_adapter = to_numpy(lm(TOKENS))
    with pytest.raises(zoo.errors.AdapterError, match=r"merge_adapter\(\).*save_adapter\(\)"):
        lm.save_preset(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    lm.merge_adapter()
    assert lm.adapters == [] and all(v.trainable for v in lm.weights)  # the base model as it was before
    np.testing.assert_allclose(to_numpy(lm(TOKENS)), with_adapter, atol=1e-4, rtol=0)
    lm.save_preset(tmp_path / "merged")
    np.testing.assert_allclose(torch_logits(reference(tmp_path / "merged")), with_adapter, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- several adapters


def test_switching_adapters_reaches_every_compiled_program(gemma, tmp_path):
    for i, targets in enumerate((["q_proj", "v_proj"], ["gate_proj", "o_proj"])):
        peft_adapter(reference(gemma["gemma"]), tmp_path / f"a{i}", seed=i, r=2, target_modules=targets)
    lm = zoo.GemmaCausalLM.from_preset(gemma["gemma"])
    prompt = lm.tokenizer.encode("for i in")
    base_tokens, base_logits = greedy(lm, prompt, 12), to_numpy(lm.predict(TOKENS, verbose=0))
    lm.load_adapter(tmp_path / "a0", name="first")
    first = greedy(lm, prompt, 12), to_numpy(lm.predict(TOKENS, verbose=0))
    lm.load_adapter(tmp_path / "a1", name="second")
    assert lm.adapters == ["first", "second"] and lm.active_adapter == "second"
    second = greedy(lm, prompt, 12), to_numpy(lm.predict(TOKENS, verbose=0))
    assert np.abs(second[1] - first[1]).max() > 0.1 and np.abs(first[1] - base_logits).max() > 0.1
    lm.set_adapter("first")
    assert greedy(lm, prompt, 12) == first[0]
    np.testing.assert_array_equal(to_numpy(lm.predict(TOKENS, verbose=0)), first[1])
    lm.set_adapter(None)
    assert greedy(lm, prompt, 12) == base_tokens
    np.testing.assert_array_equal(to_numpy(lm.predict(TOKENS, verbose=0)), base_logits)
    lm.set_adapter("second")
    lm.delete_adapter("second")  # as in PEFT, the first remaining adapter takes over
    assert lm.adapters == ["first"] and lm.active_adapter == "first"
    np.testing.assert_array_equal(to_numpy(lm.predict(TOKENS, verbose=0)), first[1])


def test_backbone_takes_the_causal_lm_adapter(gemma, tmp_path):
    ref = peft_adapter(reference(gemma["gemma3"]), tmp_path / "adapter", r=2, target_modules=["k_proj", "up_proj"])
    backbone = zoo.GemmaBackbone.from_preset(gemma["gemma3"])
    backbone.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        want = ref(torch.tensor(TOKENS, dtype=torch.long), output_hidden_states=True).hidden_states[-1].numpy()
    np.testing.assert_allclose(to_numpy(backbone(TOKENS)), want, atol=1e-4, rtol=0)


def test_vit_backbone_takes_the_classifier_adapter(vit, tmp_path):
    ref = peft_adapter(ViTForImageClassification.from_pretrained(vit), tmp_path / "adapter", r=2,
                       target_modules=["q_proj", "o_proj", "fc2"])
    backbone = zoo.ViTBackbone.from_preset(vit)
    backbone.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        want = ref.base_model.model.vit(torch.from_numpy(IMAGES.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(to_numpy(backbone(IMAGES)), want, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- errors


def _state(model):
    return model.adapters, model.active_adapter, len(model.weights), sum(v.trainable for v in model.weights)


BAD_CONFIGS = [
    ({"use_dora": True}, "use_dora is True; keras-zoo does not run DoRA"),
    ({"bias": "all"}, "bias is 'all'; keras-zoo loads adapters with bias \"none\""),
    ({"peft_type": "PREFIX_TUNING"}, "peft_type is 'PREFIX_TUNING'; keras-zoo loads LoRA adapters"),
    ({"r": 0}, r"r: expected a positive int \(the rank\), got 0"),
    ({"target_modules": ["dense_h_to_4h"]}, r"select no module of this model; its linear modules are named \["),
    ({"rank_pattern": {"q_proj": "four"}}, "rank_pattern: expected an object of module-name patterns"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS)
def test_bad_adapter_configs_are_refused_and_nothing_changes(vit, tmp_path, change, message):
    peft_adapter(ViTForImageClassification.from_pretrained(vit), tmp_path / "a", r=2, target_modules=["q_proj"])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, **change}))
    clf = zoo.ViTImageClassifier.from_preset(vit)
    clf.enable_lora(rank=2, name="mine")
    state = _state(clf)
    with pytest.raises(zoo.errors.AdapterError, match=message):
        clf.load_adapter(tmp_path / "a")
    assert _state(clf) == state


def test_adapter_file_errors(vit, tmp_path):
    peft_adapter(ViTForImageClassification.from_pretrained(vit), tmp_path / "a", r=2, target_modules=["q_proj"])
    clf = zoo.ViTImageClassifier.from_preset(vit)
    state = _state(clf)
    (tmp_path / "empty").mkdir()
    with pytest.raises(zoo.errors.AdapterError, match=r"empty: no adapter_config.json \(a PEFT adapter folder"):
        clf.load_adapter(tmp_path / "empty")
    (tmp_path / "empty" / "adapter_config.json").write_text("{not json")
    with pytest.raises(zoo.errors.AdapterError, match="adapter_config.json"):
        clf.load_adapter(tmp_path / "empty")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = "base_model.model.vit.layers.1.attention.q_proj.lora_B.weight"
    save_file({**tensors, key: tensors[key][:16]}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(zoo.errors.ShapeMismatchError, match=rf"{key}: expected \(32, 2\) .* got \(16, 2\)"):
        clf.load_adapter(tmp_path / "a")
    del tensors[key]
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(zoo.errors.MissingWeightsError, match=key.replace(".", r"\.")):
        clf.load_adapter(tmp_path / "a")
    save_file({**tensors, key: tensors[key.replace("1", "0")],
               "base_model.model.vit.layers.9.mlp.fc1.lora_A.weight": np.zeros((2, 32), "float32")},
              tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(zoo.errors.AdapterError, match="adapts module 'vit.layers.9.mlp.fc1', which this model"):
        clf.load_adapter(tmp_path / "a")
    assert _state(clf) == state


def test_enable_lora_errors(vit):
    clf = zoo.ViTImageClassifier.from_preset(vit)
    clf.enable_lora(rank=2)
    state = _state(clf)
    for kwargs, error, message in [
        (dict(rank=0, name="b"), zoo.errors.AdapterError, r"enable_lora: r: expected a positive int"),
        (dict(rank=2), zoo.errors.AdapterError, r"an adapter named 'default' exists already"),
        (dict(targets=["q_proj", "gate_proj"], name="b"), zoo.errors.AdapterError,
         r"no module named \['gate_proj'\]; its linear modules are named"),
        (dict(dropout=1.5, name="b"), zoo.errors.AdapterError, r"lora_dropout: expected a number in \[0, 1\)"),
        (dict(name="a/b"), zoo.errors.AdapterError, "adapter name: expected letters"),
    ]:
        with pytest.raises(error, match=message):
            clf.enable_lora(**kwargs)
        assert _state(clf) == state
    for call, message in [(lambda: clf.set_adapter("nope"), r"set_adapter: no adapter named 'nope'"),
                          (lambda: clf.delete_adapter("nope"), r"delete_adapter: no adapter named 'nope'")]:
        with pytest.raises(zoo.errors.AdapterError, match=message):
            call()
        assert _state(clf) == state
