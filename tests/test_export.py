"""`export` on every backend: a SavedModel TensorFlow reloads, ONNX onnxruntime runs, a torch.export program on
PyTorch, each giving the model's own outputs at batch 1 and 3; formats a backend cannot write are refused first."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import zoo
from zoo.errors import ConfigError

BACKEND = keras.backend.backend()
TOL = 1e-4


@pytest.fixture(scope="module")
def classifier():
    return zoo.ViTImageClassifier.from_preset("vit_tiny_digits")


@pytest.fixture(scope="module")
def batches(classifier):
    h, w = classifier.backbone.image_size
    return [np.random.default_rng(n).standard_normal((n, h, w, classifier.config.num_channels)).astype("float32")
            for n in (1, 3)]


def expected(classifier, batches):
    return [keras.ops.convert_to_numpy(classifier.predict_on_batch(x)) for x in batches]


def test_saved_model_reloads_in_tensorflow(classifier, batches, tmp_path, capsys):
    classifier.export(tmp_path / "saved")
    assert capsys.readouterr().out == ""  # quiet by default: no listing of every captured weight
    np.save(tmp_path / "x1.npy", batches[0])
    np.save(tmp_path / "x3.npy", batches[1])
    # A process of its own: TensorFlow serving the SavedModel, whatever backend made it.
    script = ("import sys, numpy as np, tensorflow as tf\n"
              "served = tf.saved_model.load(sys.argv[1])\n"
              "for n in ('1', '3'):\n"
              "    np.save(f'{sys.argv[2]}/y{n}.npy', served.serve(np.load(f'{sys.argv[2]}/x{n}.npy')).numpy())\n")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "saved"), str(tmp_path)], env=env, check=True,
                   timeout=300, capture_output=True)
    for n, want in zip((1, 3), expected(classifier, batches)):
        np.testing.assert_allclose(np.load(tmp_path / f"y{n}.npy"), want, atol=TOL, rtol=0)


def test_onnx_runs_in_onnxruntime(classifier, batches, tmp_path):
    import onnxruntime

    classifier.export(tmp_path / "vit.onnx", format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for x, want in zip(batches, expected(classifier, batches)):
        np.testing.assert_allclose(session.run(None, {name: x})[0], want, atol=TOL, rtol=0)


@pytest.mark.skipif(BACKEND != "torch", reason="a torch.export program is PyTorch's")
def test_torch_program_on_pytorch(classifier, batches, tmp_path):
    import torch

    classifier.export(tmp_path / "vit.pt2", format="torch", verbose=False)
    program = torch.export.load(str(tmp_path / "vit.pt2")).module()
    for x, want in zip(batches, expected(classifier, batches)):
        np.testing.assert_allclose(program(torch.from_numpy(x)).detach().numpy(), want, atol=TOL, rtol=0)


def test_formats_a_backend_cannot_write_are_refused_first(classifier, tmp_path):
    if BACKEND != "torch":
        with pytest.raises(ConfigError, match=r"'torch' \(a torch.export program .* on PyTorch only: KERAS_BACKEND=torch"):
            classifier.export(tmp_path / "x.pt2", format="torch")
    with pytest.raises(ConfigError, match=r"format 'openvino': on this backend keras-zoo writes .*'tf_saved_model', 'onnx'"):
        classifier.export(tmp_path / "x", format="openvino")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.pt2").exists()


def test_an_active_adapter_is_exported_by_keras_or_merged_first(batches, tmp_path):
    """Keras' own exporter takes the model as it runs, adapter and all; the detour through TensorFlow saves the
    model first, and a preset holds one set of weights, so there it asks for merge_adapter() first."""
    import onnxruntime

    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    clf.enable_lora(rank=2)
    for v in clf.trainable_weights:
        if "lora_B" in v.path:
            v.assign(np.full(v.shape, 0.05, "float32"))
    if "onnx" not in zoo.backends.EXPORTS:
        with pytest.raises(ConfigError, match=r"merge_adapter\(\) folds the adapter in first"):
            clf.export(tmp_path / "vit.onnx", format="onnx")
        assert not (tmp_path / "vit.onnx").exists()
        clf.merge_adapter()
    clf.export(tmp_path / "vit.onnx", format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    plain = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    x = batches[1]
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(clf.predict_on_batch(x)), atol=TOL, rtol=0)
    assert np.abs(got - keras.ops.convert_to_numpy(plain.predict_on_batch(x))).max() > 1e-3  # the adapter counts
