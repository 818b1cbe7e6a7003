"""The bundled gemma_tiny_pycode preset, its training script, and `zoo generate`."""

import ast
import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import zoo
from zoo import cli
from zoo.checkpoints_tools import train_gemma_pycode

CARD = zoo.presets.get("gemma_tiny_pycode")


@pytest.fixture(scope="module")
def lm():
    return zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")


def test_card_matches_the_bundled_model(lm):
    assert CARD.task == "GemmaCausalLM" and CARD.params == lm.count_params() == lm.config.num_params()
    assert sum(p.stat().st_size for p in CARD.folder.rglob("*") if p.is_file()) <= 10 * 2**20
    assert lm.tokenizer is not None and lm.tokenizer.vocab_size <= lm.config.vocab_size


def test_training_report_beats_unigram_by_a_wide_margin():
    report = json.loads((CARD.folder / "training.json").read_text())
    assert report["validation_loss"] < 0.6 * report["unigram_loss"], report


def test_completion_looks_like_python(lm):
    """The completion parses as Python: the longest prefix of whole lines that `ast` accepts covers
    at least three generated lines, with a function body in it."""
    prompt = "import os\ndef read_file(path):"
    lines = (prompt + lm.generate(prompt, max_new_tokens=60)).splitlines()[:-1]  # the last line may be cut
    while lines:
        try:
            tree = ast.parse("\n".join(lines))
            break
        except SyntaxError:
            lines.pop()
    generated = len(lines) - 2
    assert generated >= 3, "\n".join(lines)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef))
    assert function.body


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="the bundled presets' scripts are run under JAX (their docstrings' command): run once")
def test_training_script_is_seeded_and_reproducible(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        report = train_gemma_pycode.train(out, steps=2, seed=5, batch=2, limit=6)
        assert report["steps"] == 2 and report["validation_loss"] > 0
    first, second = (load_file(out / "model.safetensors") for out in outs)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert zoo.GemmaCausalLM.from_preset(outs[0]).generate("def", max_new_tokens=2) is not None


def test_generate_cli_streams(capsys, lm):
    assert cli.main(["generate", "def add(a, b):", "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert out == "def add(a, b):" + lm.generate("def add(a, b):", max_new_tokens=16) + "\n"
    args = ["generate", "import", "--max-new-tokens", "12", "--temperature", "0.9", "--top-p", "0.9", "--seed", "3",
            "--no-echo"]
    assert cli.main(args) == 0
    sampled = capsys.readouterr().out
    assert cli.main(args) == 0 and capsys.readouterr().out == sampled  # seeded
    assert sampled == lm.generate("import", max_new_tokens=12, sampler="top_p", temperature=0.9, top_p=0.9, seed=3) + "\n"


def test_generate_cli_errors(capsys):
    assert cli.main(["generate", "", "--max-new-tokens", "4"]) == 1
    assert "the prompt is empty" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--temperature", "-1"]) == 1
    assert "temperature must be >= 0" in capsys.readouterr().err
    assert cli.main(["generate", "x", "--max-new-tokens", "0"]) == 1
    assert "max_new_tokens must be a positive int" in capsys.readouterr().err
