"""Past one device: both model families split over 8 simulated CPU devices (JAX), against one device.

conftest.py gives the JAX run 8 CPU devices (`--xla_force_host_platform_device_count=8`); single-device
code runs on the first. On PyTorch and TensorFlow only the errors are checked: Keras 3.15 distributes on JAX.
"""

import json
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import zoo
from gemma_reference import save_hf_gemma
from vit_reference import save_hf_vit
from zoo import cli
from zoo import distribution as zd
from zoo.checkpoint import Checkpoint
from zoo.errors import DistributionError

JAX = os.environ.get("KERAS_BACKEND", "jax") == "jax"
jax_only = pytest.mark.skipif(not JAX, reason="Keras 3.15 distributes on JAX only (the errors elsewhere are tested)")
MESHES = [(1, 8), (2, 4), (8, 1)]
IDS = np.random.default_rng(0).integers(3, 150, (8, 12)).astype(np.int32)
IMAGES = np.random.default_rng(1).random((8, 32, 32, 3)).astype("float32")
CLOSE = dict(rtol=1e-5, atol=1e-5)


def assert_same_logits(got, want):
    """Within 2e-5 of the largest logit (measured: up to 1.2e-5, Gemma 2 on a model axis of 8): the sums a model
    axis splits (over heads, over the MLP's width) add in another order than on one device, as the backends'
    own sums do (they agree with transformers to ~7e-5). The greedy tokens are the same."""
    assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max(), (np.abs(got - want).max(), np.abs(want).max())


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny Gemma 1/2/3 with 8 query heads and 4 KV heads (split on a model axis of 4, replicated on 8), and a
    ViT with 8 heads."""
    root = tmp_path_factory.mktemp("distributed")
    out = {v: save_hf_gemma(root / v, v, seed=i, num_attention_heads=8, num_key_value_heads=4)
           for i, v in enumerate(["gemma", "gemma2", "gemma3"])}
    out["vit"] = save_hf_vit(root / "vit", hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                             intermediate_size=64, image_size=32, patch_size=8, num_labels=8)
    return out


def load(folders, name, distribution=None):
    cls = zoo.ViTImageClassifier if name == "vit" else zoo.GemmaCausalLM
    return cls.from_preset(folders[name], distribution=distribution)


def run(model, name):
    """The model's compiled forward pass (run eagerly, every op would be compiled for its sharding on its own)."""
    return ops.convert_to_numpy(model.predict_on_batch(IMAGES if name == "vit" else IDS))


@jax_only
def test_there_are_eight_devices():
    assert len(keras.distribution.list_devices()) == 8


@jax_only
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3", "vit"])
def test_weights_carry_their_layouts_and_logits_match_one_device(folders, name, mesh):
    distribution = zd.model_parallel(mesh)
    model = load(folders, name, distribution)
    model_axis = mesh[1]
    for v in model.weights:
        spec = tuple(v.value.sharding.spec) + (None,) * (len(v.shape) - len(v.value.sharding.spec))
        assert spec == tuple(model.distribution.get_variable_layout(v).axes), v.path
    by_path = {v.path.split("/", 1)[-1]: v for v in model.weights}
    attention = "layers_0/self_attn/" if name != "vit" else "layers_0/"
    assert tuple(by_path[attention + "q_proj/kernel"].value.sharding.spec) == ("model", None, None)
    assert tuple(by_path[attention + "o_proj/kernel"].value.sharding.spec)[:2] == (None, "model")
    if name != "vit":  # 4 KV heads: split over a model axis of 4, kept whole on every device of an axis of 8
        kv = tuple(by_path[attention + "k_proj/kernel"].value.sharding.spec)
        assert kv[:1] == (("model",) if model_axis in (1, 4) else (None,))
    shards = by_path[attention + "q_proj/kernel"].value.addressable_shards
    assert len(shards) == 8 and shards[0].data.shape[0] == 8 // model_axis
    assert_same_logits(run(model, name), run(load(folders, name), name))


@jax_only
@pytest.mark.parametrize("name", ["gemma", "gemma2", "gemma3"])
def test_split_logits_are_as_close_to_float64_as_one_devices(folders, name):
    """The split model's logits differ from one device's by float32's rounding: each is as close to the same
    model evaluated in float64 (transformers) as the other, within a third (measured: 0.71x to 1.19x)."""
    import torch
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(folders[name], dtype=torch.float64,
                                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        exact = reference(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    one = np.abs(run(load(folders, name), name) - exact).max()
    for mesh in [(1, 8), (2, 4)]:
        split = np.abs(run(load(folders, name, zd.model_parallel(mesh)), name) - exact).max()
        assert split <= 1.33 * one, (mesh, split, one)


@jax_only
@pytest.mark.parametrize("name, mesh", [("gemma", (1, 8)), ("gemma", (2, 4)), ("gemma2", (1, 8)), ("gemma2", (2, 4)),
                                        ("gemma3", (2, 4)), ("gemma3", (8, 1))], ids=str)
def test_greedy_generation_is_the_same_and_the_cache_is_split_over_kv_heads(folders, name, mesh):
    one, split = load(folders, name), load(folders, name, zd.model_parallel(mesh))
    prompts = ["def add(a, b):", "class Point:"]
    assert split.generate(prompts, max_new_tokens=32) == one.generate(prompts, max_new_tokens=32)
    cache = split.empty_cache(2, 16)
    assert tuple(cache[0].sharding.spec)[:3] == ((None, None, "model") if mesh[1] in (1, 4) else (None, None, None))


def one_step(model, name, lora: bool):
    """One SGD step on a fixed batch; the trained weights after it, by path."""
    if lora:
        model.enable_lora(rank=4, targets="all-linear", name="tuned")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
    x, y = (IMAGES, np.arange(8) % 8) if name == "vit" else (IDS[:, :-1], IDS[:, 1:])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    return {v.path: ops.convert_to_numpy(v.value) for v in model.trainable_weights}


@jax_only
@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("name", ["gemma3", "vit"])
def test_a_training_step_updates_the_weights_as_on_one_device(folders, name, mesh):
    keras.utils.set_random_seed(0)
    want = one_step(load(folders, name), name, lora=False)
    keras.distribution.set_distribution(zd.model_parallel(mesh))  # fit splits the batch as the mesh says
    try:
        keras.utils.set_random_seed(0)
        got = one_step(load(folders, name), name, lora=False)
    finally:
        keras.distribution.set_distribution(None)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], err_msg=path, **CLOSE)


@jax_only
def test_an_adapter_trained_split_saves_and_reloads_on_one_device(folders, tmp_path):
    keras.distribution.set_distribution(zd.model_parallel((2, 4)))
    try:
        keras.utils.set_random_seed(0)
        split = load(folders, "gemma2")
        trained = one_step(split, "gemma2", lora=True)
        b = next(v for v in split.trainable_weights if v.path.endswith("q_proj/tuned/lora_B"))
        assert tuple(b.value.sharding.spec) == ("model", None)  # follows q_proj's heads
        split.save_adapter(tmp_path / "adapter")
        logits = run(split, "gemma2")
    finally:
        keras.distribution.set_distribution(None)
    one = load(folders, "gemma2")
    one.load_adapter(tmp_path / "adapter")
    assert any(np.abs(w).max() > 0 for p, w in trained.items() if "lora_B" in p)
    assert_same_logits(run(one, "gemma2"), logits)


@jax_only
@pytest.mark.parametrize("kind", ["data", "model"])
def test_zoo_finetune_runs_data_and_model_parallel(folders, tmp_path, kind):
    examples = [{"prompt": f"def f{i}(a):", "completion": f"\n    return a + {i}\n"} for i in range(16)]
    distribution = zd.data_parallel() if kind == "data" else zd.model_parallel((2, 4))
    keras.distribution.set_distribution(distribution)
    try:
        lm = load(folders, "gemma")
        summary = zoo.finetune.text(lm, examples, output=tmp_path / "out", batch_size=8, max_length=16, epochs=1,
                                    lora_rank=4, learning_rate=1e-2, seed=0)
    finally:
        keras.distribution.set_distribution(None)
    assert summary.steps == 2
    again = zoo.GemmaCausalLM.from_preset(folders["gemma"])
    again.load_adapter(tmp_path / "out")
    assert again.adapters == ["default"]


@jax_only
def test_a_split_load_reads_each_devices_slices_only(folders, monkeypatch):
    """Under a model axis of 8 every split tensor is read in eighths, and all reads add up to the checkpoint once
    (the replicated norms and the 4 KV heads once per device, being small)."""
    reads = []
    real = Checkpoint.read_region

    def recording(self, name, region, dtype=None):
        part = real(self, name, region, dtype)
        reads.append((name, part.size, self.tensors[name].shape))
        return part

    monkeypatch.setattr(Checkpoint, "read_region", recording)
    load(folders, "gemma3", zd.model_parallel((1, 8)))
    split = [(name, size, shape) for name, size, shape in reads if "q_proj" in name or "mlp" in name
             or "embed_tokens" in name]
    assert split and all(size * 8 == np.prod(shape) for _, size, shape in split)
    assert all(size < np.prod(shape) or "norm" in name or "k_proj" in name or "v_proj" in name
               for name, size, shape in reads)


@jax_only
def test_a_sharded_checkpoint_loads_split_too(folders, tmp_path):
    load(folders, "gemma3").save_preset(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    split = zoo.GemmaCausalLM.from_preset(tmp_path / "sharded", distribution=zd.model_parallel((2, 4)))
    assert_same_logits(run(split, "gemma3"), run(load(folders, "gemma3"), "gemma3"))


@jax_only
def test_errors(folders):
    with pytest.raises(DistributionError, match="do not divide the model's 4 attention heads"):
        zoo.GemmaCausalLM.from_preset(save_hf_gemma(folders["gemma"].parent / "four", "gemma"),
                                      distribution=zd.model_parallel((1, 8)))
    with pytest.raises(DistributionError, match="batch=3 x model=3"):
        zd.mesh(batch=3, model=3)
    with pytest.raises(DistributionError, match="axes"):
        zd.model_parallel(keras.distribution.DeviceMesh((2, 4), ["data", "model"], keras.distribution.list_devices()))
    with pytest.raises(DistributionError, match="keras.distribution object"):
        load(folders, "vit", distribution="model")


@pytest.mark.skipif(JAX, reason="the error of a backend without distribution")
def test_distribution_is_refused_on_this_backend():
    for make in (zd.data_parallel, lambda: zd.model_parallel((1, 1)), lambda: zd.mesh(1, 1),
                 lambda: zoo.ViTImageClassifier.from_preset("vit_tiny_digits", distribution="anything")):
        with pytest.raises(DistributionError, match="JAX backend in Keras"):  # never a silent one-device run
            make()


@jax_only
def test_a_split_load_holds_about_one_checkpoint_not_one_per_device(tmp_path):
    """benchmarks/sharded_load.py's measure: a fresh process's peak RSS rise while loading a 200 MB checkpoint
    over 8 devices stays near the checkpoint's size (measured 1.36-1.61x, one device 1.03x; whole tensors on every
    device would be 8x). The issue's 1.2x is not reached: Keras' initialisation under a layout copies the
    placeholders (1x), which are freed as their weights' shards arrive."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import sharded_load

    size = sharded_load.make_checkpoint(tmp_path / "gemma", layers=2)
    rise = sharded_load.measure(tmp_path / "gemma", (1, 8))["rise"]
    assert rise < 2 * size, (rise, size)


def write_examples(path):
    path.write_text("".join(json.dumps({"prompt": f"def f{i}(a):", "completion": f"\n    return a + {i}\n"}) + "\n"
                            for i in range(16)))
    return path


@jax_only
def test_zoo_finetune_mesh_flag(folders, tmp_path):
    data = write_examples(tmp_path / "train.jsonl")
    args = ["finetune", "text", "--preset", folders["gemma"], "--data", data, "--output", tmp_path / "out",
            "--mesh", "2x4", "--max-length", "16", "--lora-rank", "4"]
    try:
        assert cli.main([str(a) for a in args]) == 0
        assert isinstance(keras.distribution.distribution(), zd.ZooModelParallel)
    finally:
        keras.distribution.set_distribution(None)
    assert (tmp_path / "out" / "adapter_config.json").is_file()


def test_zoo_finetune_mesh_errors(tmp_path, capsys):
    data = write_examples(tmp_path / "train.jsonl")
    for mesh, message in [("3x3", "batch=3 x model=3" if JAX else "JAX backend"), ("four", "expected BATCHxMODEL")]:
        args = ["finetune", "text", "--preset", "gemma_tiny_pycode", "--data", str(data), "--output",
                str(tmp_path / mesh), "--mesh", mesh]
        assert cli.main(args) == 1
        assert message in capsys.readouterr().err
