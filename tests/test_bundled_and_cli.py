"""The bundled vit_tiny_digits preset, its training script, and `zoo classify`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import zoo
from zoo import cli
from zoo.checkpoints_tools import train_vit_digits

SAMPLES = sorted(zoo.presets.get("vit_tiny_digits").folder.joinpath("samples").glob("digit_*.png"))


def test_bundled_preset_card_matches_model():
    card = zoo.presets.get("vit_tiny_digits")
    model = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    assert card.task == "ViTImageClassifier" and card.params == model.count_params()
    assert sum(p.stat().st_size for p in card.folder.rglob("*") if p.is_file()) < 3 * 2**20
    assert card in zoo.list_presets(task="ViTImageClassifier") and card.bundled == "vit_tiny_digits"


def test_bundled_preset_reads_its_samples():
    assert len(SAMPLES) >= 5
    results = zoo.from_preset("vit_tiny_digits").predict_labels(SAMPLES, top_k=3)
    for path, labels in zip(SAMPLES, results):
        assert labels[0]["label"] == path.stem.split("_")[1], (path.name, labels)
        assert labels[0]["score"] > 0.9 and len(labels) == 3
        assert labels[0]["score"] >= labels[1]["score"] >= labels[2]["score"]


def test_unknown_preset_suggests_names():
    with pytest.raises(zoo.errors.PresetNotFoundError, match="did you mean vit_tiny_digits"):
        zoo.ViTImageClassifier.from_preset("vit_tiny_digit")


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="the bundled presets' scripts are run under JAX (their docstrings' command): run once")
def test_training_script_is_seeded_and_reproducible(tmp_path):
    """Two short runs with one seed write identical weights (the full run reports >= 95%)."""
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        accuracy = train_vit_digits.train(out, epochs=1, seed=3, limit=48)
        assert 0.0 <= accuracy <= 1.0
    first, second = (load_file(out / "model.safetensors") for out in outs)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert zoo.ViTImageClassifier.from_preset(outs[0]).config.labels == tuple("0123456789")


def test_classify_samples_table(capsys):
    assert cli.main(["classify", "--samples", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    for path in SAMPLES:
        assert str(path) in out
    assert out.count("\n  ") == 2 * len(SAMPLES)


def test_classify_json(capsys):
    assert cli.main(["classify", str(SAMPLES[0]), "--top-k", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result[0]["image"] == str(SAMPLES[0])
    assert result[0]["labels"][0]["label"] == SAMPLES[0].stem.split("_")[1]


def test_classify_errors_are_reported(capsys, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert cli.main(["classify", str(bad)]) == 1
    assert "cannot decode the image" in capsys.readouterr().err
    assert cli.main(["classify", "x.png", "--preset", "no_such_preset"]) == 1
    assert "unknown preset 'no_such_preset'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, before any model loads
        cli.main(["classify", "x.png", "--top-k", "0"])
    assert exit_.value.code == 2 and "argument --top-k: expected a positive integer, got '0'" in capsys.readouterr().err


def test_serve_settings_are_checked_before_loading(capsys):
    assert cli.main(["serve", "--max-batch", "0", "no_such_preset"]) == 1
    assert "server settings: field 'max_batch' should be a positive int, got 0" in capsys.readouterr().err
    assert cli.main(["serve", "--port", "70000"]) == 1
    assert "field 'port' should be at most 65535" in capsys.readouterr().err


def test_serve_on_a_busy_port_ends_with_one_line():
    """Before any model loads (the preset below does not exist, so loading would fail differently)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "zoo.cli", "serve", "no_such_preset", "--port", str(port)],
                              capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"zoo serve: cannot listen on 127.0.0.1:{port}") and "--port" in last


def test_console_script_runs():
    """The installed `zoo` command works in a fresh process."""
    proc = subprocess.run([sys.executable, "-m", "zoo.cli", "classify", str(SAMPLES[0]), "--top-k", "1"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert SAMPLES[0].stem.split("_")[1] in proc.stdout


def test_models_print_in_one_line():
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    assert repr(clf) == "<ViTImageClassifier vit (hf), 139,978 parameters, float32, from vit_tiny_digits>"
    chat = zoo.from_preset("gemma_tiny_pycode_chat")
    assert repr(chat).startswith("<GemmaCausalLM gemma3_text, ") and "\n" not in repr(chat)
    assert repr(chat).endswith("from gemma_tiny_pycode_chat, adapters ['default'] (active: default)>")
    assert repr(chat.backbone).startswith("<GemmaBackbone gemma3_text, ")
