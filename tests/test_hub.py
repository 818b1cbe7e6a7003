"""hf:// and kaggle:// loading through the real huggingface_hub and kagglehub clients, against fake hubs on loopback."""

import json
import shutil

import numpy as np
import pytest

import zoo
from conftest import FAKE_HF_PORT
from fake_hubs import FakeHFHub, FakeKaggle
from zoo import hub
from keras.ops import convert_to_numpy as to_numpy
from zoo.errors import CheckpointError, GatedModelError, HandleError, HubError

IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 1)).astype("float32")


@pytest.fixture(scope="module")
def digits():
    """The bundled model's folder and its logits on IMAGES."""
    folder = zoo.presets.get("vit_tiny_digits").folder
    return folder, to_numpy(zoo.ViTImageClassifier.from_preset(folder)(IMAGES))


@pytest.fixture
def hf(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    server = FakeHFHub(port=FAKE_HF_PORT).start()
    yield server
    server.stop()
    hub.set_offline(None)


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kaggle_cache"))
    server = FakeKaggle().start()
    yield server
    server.stop()
    hub.set_offline(None)


def logits(model):
    return to_numpy(model(IMAGES))


def relabelled(folder, tmp_path, name):
    """A copy of `folder` whose labels differ (a second commit of the same repo)."""
    out = shutil.copytree(folder, tmp_path / name)
    raw = json.loads((out / "config.json").read_text())
    raw["id2label"] = {k: f"{name}-{v}" for k, v in raw["id2label"].items()}
    raw["label2id"] = {v: int(k) for k, v in raw["id2label"].items()}
    (out / "config.json").write_text(json.dumps(raw))
    return out


# ----------------------------------------------------------------------------- Hugging Face


def test_download_and_load(hf, digits, tmp_path):
    folder, want = digits
    sha = hf.add("acme/digits", folder)
    model = zoo.ViTImageClassifier.from_preset("hf://acme/digits")
    np.testing.assert_array_equal(logits(model), want)
    assert model.source["commit"] == sha and model.source["handle"] == "hf://acme/digits"
    local = hub.resolve("hf://acme/digits")
    assert local.name == sha and not (local / "samples").exists()  # only the files a model needs
    saved = model.save_preset(tmp_path / "saved")
    assert json.loads((saved / "zoo_source.json").read_text())["derived_from"]["commit"] == sha
    # Every file came from the commit resolved up front.
    resolves = [p for _, p in hf.requests if "/resolve/" in p]
    assert resolves and all(f"/resolve/{sha}/" in p for p in resolves)


def test_adapter_download(hf, digits, tmp_path):
    """An adapter repo holds adapter_config.json and adapter_model.safetensors, not config.json."""
    folder, want = digits
    hf.add("acme/digits", folder)
    model = zoo.ViTImageClassifier.from_preset("hf://acme/digits")
    model.enable_lora(rank=2, targets=["q_proj", "fc1"])
    for v in model.trainable_weights:  # B is zero after enable_lora: make the adapter change something
        v.assign(np.full(v.shape, 0.05, "float32"))
    adapted = logits(model)
    model.save_adapter(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/digits"
    (tmp_path / "adapter" / "README.md").write_text("not downloaded")
    sha = hf.add("acme/digits-lora", tmp_path / "adapter")
    fresh = zoo.ViTImageClassifier.from_preset("hf://acme/digits")
    assert fresh.load_adapter(f"hf://acme/digits-lora@{sha}", name="sql") == "sql"
    np.testing.assert_array_equal(logits(fresh), adapted)
    assert not np.array_equal(adapted, want)
    assert sorted(p.name for p in hub.resolve("hf://acme/digits-lora", adapter=True).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(HubError, match="acme/digits@.*: the repository has no adapter_config.json"):
        fresh.load_adapter("hf://acme/digits", name="wrong")
    assert fresh.adapters == ["sql"]


def test_sharded_checkpoint(hf, digits, tmp_path):
    folder, want = digits
    sharded = zoo.ViTImageClassifier.from_preset(folder).save_preset(tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    hf.add("acme/sharded", sharded)
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("hf://acme/sharded")), want)


def test_pinned_revision_differs_from_main(hf, digits, tmp_path):
    folder, _ = digits
    main = hf.add("acme/digits", folder)
    old = hf.add("acme/digits", relabelled(folder, tmp_path, "v1"), ref="v1.0")
    assert old != main
    assert zoo.ViTImageClassifier.from_preset("hf://acme/digits").config.labels[0] == "0"
    pinned = zoo.ViTImageClassifier.from_preset("hf://acme/digits@v1.0")
    assert pinned.config.labels[0] == "v1-0" and pinned.source["commit"] == old
    assert zoo.ViTImageClassifier.from_preset(f"hf://acme/digits@{old}").config.labels[0] == "v1-0"
    assert hub.resolve("hf://acme/digits", revision="v1.0").name == old


def test_second_load_is_served_from_cache_offline(hf, digits, monkeypatch):
    from huggingface_hub import constants

    folder, want = digits
    sha = hf.add("acme/digits", folder)
    zoo.ViTImageClassifier.from_preset("hf://acme/digits")
    hf.stop()
    # The server is gone: a plain load falls back to the cache ...
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("hf://acme/digits")), want)
    # ... as do HF_HUB_OFFLINE and keras-zoo's own switch, without trying the network.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert zoo.ViTImageClassifier.from_preset("hf://acme/digits").source["commit"] == sha
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.set_offline(True)
    assert hub.resolve("hf://acme/digits").name == sha
    with pytest.raises(HubError, match="not in the local cache and downloads are off \\(HF_HUB_OFFLINE or "
                                       "ZOO_OFFLINE is set\\): unset it") as refused:
        hub.resolve("hf://acme/never-downloaded")
    assert "zoo download" not in str(refused.value)  # it would fail the same way offline
    hub.set_offline(None)  # online, but the server is gone
    with pytest.raises(HubError, match="not in the local cache and the Hub cannot be reached from here"):
        hub.resolve("hf://acme/never-downloaded")
    hf.start = lambda: None  # the fixture's stop() must not fail on a stopped server
    hf.stop = lambda: None


def test_gated_repo(hf, digits, monkeypatch):
    folder, want = digits
    hf.add("acme/gated", folder, gated=True)
    with pytest.raises(GatedModelError, match=r"gated repository: accept its license at .*acme/gated.*HF_TOKEN"):
        zoo.ViTImageClassifier.from_preset("hf://acme/gated")
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("hf://acme/gated")), want)


def test_missing_repo_revision_and_files(hf, digits, tmp_path):
    folder, _ = digits
    hf.add("acme/digits", folder)
    with pytest.raises(HubError, match="repository not found"):
        zoo.ViTImageClassifier.from_preset("hf://acme/nothing-here")
    with pytest.raises(HubError, match="has no revision 'v9'"):
        zoo.ViTImageClassifier.from_preset("hf://acme/digits@v9")
    no_config = shutil.copytree(folder, tmp_path / "no_config")
    (no_config / "config.json").unlink()
    hf.add("acme/no-config", no_config)
    with pytest.raises(HubError, match="has no config.json"):
        zoo.ViTImageClassifier.from_preset("hf://acme/no-config")
    sharded = zoo.ViTImageClassifier.from_preset(folder).save_preset(tmp_path / "sharded", max_shard_size="100KB")
    lost = sorted(sharded.glob("model-*.safetensors"))[1]
    lost.unlink()
    hf.add("acme/lost-shard", sharded)
    with pytest.raises(CheckpointError, match=lost.name):
        zoo.ViTImageClassifier.from_preset("hf://acme/lost-shard")


def test_download_cut_off_mid_file(hf, digits):
    folder, want = digits
    hf.add("acme/digits", folder)
    hf.cut["model.safetensors"] = 1  # the first download of the weights drops half-way: the client resumes
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("hf://acme/digits")), want)
    hf.add("acme/flaky", folder)
    hf.cut["model.safetensors"] = 1000  # always dropped: a clear error, nothing loaded
    with pytest.raises(HubError, match="download failed"):
        zoo.ViTImageClassifier.from_preset("hf://acme/flaky")
    hf.cut.clear()
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("hf://acme/flaky")), want)


# ----------------------------------------------------------------------------- Kaggle


def test_kaggle_download_versions_and_offline(kaggle, digits, tmp_path):
    folder, want = digits
    kaggle.add("acme/digits/transformers/tiny", 1, relabelled(folder, tmp_path, "v1"))
    kaggle.add("acme/digits/transformers/tiny", 2, folder)
    latest = zoo.ViTImageClassifier.from_preset("kaggle://acme/digits/transformers/tiny")
    np.testing.assert_array_equal(logits(latest), want)
    assert latest.source["version"] == 2
    first = zoo.ViTImageClassifier.from_preset("kaggle://acme/digits/transformers/tiny/1")
    assert first.source["version"] == 1 and first.config.labels[0] == "v1-0"
    kaggle.stop()
    kaggle.stop = lambda: None
    hub.set_offline(True)
    assert zoo.ViTImageClassifier.from_preset("kaggle://acme/digits/transformers/tiny").source["version"] == 2
    hub.set_offline(None)  # online, but the server is gone: the cache still answers
    assert zoo.ViTImageClassifier.from_preset("kaggle://acme/digits/transformers/tiny/1").config.labels[0] == "v1-0"


def test_kaggle_adapter(kaggle, digits, tmp_path):
    folder, want = digits
    model = zoo.ViTImageClassifier.from_preset(folder)
    model.enable_lora(rank=2)
    for v in model.trainable_weights:
        v.assign(np.full(v.shape, 0.05, "float32"))
    model.save_adapter(tmp_path / "adapter")
    kaggle.add("acme/digits-lora/transformers/tiny", 1, tmp_path / "adapter")
    fresh = zoo.ViTImageClassifier.from_preset(folder)
    fresh.load_adapter("kaggle://acme/digits-lora/transformers/tiny/1")
    np.testing.assert_array_equal(logits(fresh), logits(model))
    assert not np.array_equal(logits(fresh), want)


def test_kaggle_errors(kaggle, digits, monkeypatch):
    folder, want = digits
    kaggle.add("acme/gated/transformers/tiny", 1, folder, gated=True)
    with pytest.raises(HubError, match="not found on Kaggle"):
        zoo.ViTImageClassifier.from_preset("kaggle://acme/missing/transformers/tiny")
    with pytest.raises(GatedModelError, match="accept the model's license at https://www.kaggle.com/models/acme/gated"):
        zoo.ViTImageClassifier.from_preset("kaggle://acme/gated/transformers/tiny")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "fake-key")
    np.testing.assert_array_equal(logits(zoo.ViTImageClassifier.from_preset("kaggle://acme/gated/transformers/tiny")), want)


# ----------------------------------------------------------------------------- handles


@pytest.mark.parametrize("handle,message", [
    ("hf://just-a-name", r"expected hf://org/name or hf://org/name@revision"),
    ("hf://org/name@", r"expected hf://org/name or hf://org/name@revision"),
    ("hf://a/b/c", r"expected hf://org/name"),
    ("s3://bucket/model", r"unknown handle scheme 's3://'"),
    ("kaggle://google/gemma/transformers", r"expected kaggle://owner/model/framework/variation\[/version\]"),
    ("kaggle://google/gemma/transformers/2b/latest", r"expected kaggle://owner/model/framework/variation"),
    ("kaggle://google/gemma/caffe/2b", r"unknown Kaggle framework 'caffe'; keras-zoo reads transformers"),
    ("kaggle://google/gemma/keras/gemma_2b_en", r"'keras' framework's files are not in Hugging Face layout"),
])
def test_malformed_handles(handle, message):
    with pytest.raises(HandleError, match=message):
        zoo.ViTImageClassifier.from_preset(handle)


def test_parse():
    assert hub.parse("hf://google/gemma-2-2b@v1.0") == hub.Handle("hf", "google/gemma-2-2b", "v1.0")
    assert hub.parse("kaggle://google/gemma/Transformers/2b/3") == hub.Handle("kaggle", "google/gemma/transformers/2b",
                                                                               kaggle_version=3)


@pytest.mark.parametrize("preset,name", [
    ("gemma_tiny_pycode", "gemma_tiny_pycode"),
    ("hf://google/gemma-2-2b@v1.0", "gemma-2-2b"),
    ("kaggle://google/gemma/transformers/2b/3", "2b"),
    ("kaggle://google/gemma/transformers/2b", "2b"),
    ("./models/my-vit/", "my-vit"),
])
def test_short_names(preset, name):
    """What `zoo serve` calls a model: the same parse as loading, without a revision or version."""
    assert hub.short_name(preset) == name


def test_kaggle_unreachable_is_one_line_naming_the_cause(monkeypatch):
    import kagglehub
    import requests

    cause = ("HTTPSConnectionPool(host='www.kaggle.com', port=443): Max retries exceeded with url: /api/v1/models/"
             "acme/tiny/transformers/tiny/get (Caused by NameResolutionError(\"<urllib3.connection.HTTPSConnection "
             "object at 0x7f00>: Failed to resolve 'www.kaggle.com' ([Errno -3] Temporary failure in name resolution)\"))")

    def unreachable(*args, **kwargs):
        raise requests.ConnectionError(cause)

    monkeypatch.setattr(kagglehub, "model_download", unreachable)
    with pytest.raises(HubError) as caught:
        hub.resolve("kaggle://acme/tiny/transformers/tiny")
    message = str(caught.value)
    assert message == ("kaggle://acme/tiny/transformers/tiny: Kaggle cannot be reached (Failed to resolve "
                       "'www.kaggle.com'), and this version is not in the local cache; connect, or load a local folder "
                       "by its path")
    assert "\n" not in message and "0x7f00" not in message

    def odd(*args, **kwargs):
        raise RuntimeError("first line\n" + "x" * 500)

    monkeypatch.setattr(kagglehub, "model_download", odd)
    with pytest.raises(HubError, match=r"download failed: RuntimeError: first line$"):
        hub.resolve("kaggle://acme/tiny/transformers/tiny")
