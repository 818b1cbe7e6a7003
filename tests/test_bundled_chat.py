"""The bundled chat preset: a LoRA adapter over gemma_tiny_pycode trained by zoo.finetune, served and used offline."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import zoo
from zoo import cli
from zoo.checkpoints_tools import train_gemma_pycode_chat
from zoo.errors import PresetNotFoundError
from zoo.serving import load_models
from test_serve import Running

CARD = zoo.presets.get("gemma_tiny_pycode_chat")
PROMPT = "Write a Python function `add`: Return the sum of a and b."


@pytest.fixture(scope="module")
def chat():
    return zoo.from_preset("gemma_tiny_pycode_chat")


def test_card_and_folder(chat):
    assert CARD.base == "gemma_tiny_pycode" and CARD.task == "GemmaCausalLM"
    size = sum(p.stat().st_size for p in CARD.folder.iterdir())
    assert size < 3 * 1024**2  # an adapter and tokenizer files, not a model
    assert isinstance(chat, zoo.GemmaCausalLM) and chat.adapters == ["default"]
    assert chat.tokenizer.chat_template and chat.source["base"]["handle"] == "gemma_tiny_pycode"
    config = json.loads((CARD.folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "gemma_tiny_pycode" and config["task_type"] == "CAUSAL_LM"


def test_training_report_shows_the_held_out_loss_well_below_the_base_models():
    report = json.loads((CARD.folder / "training.json").read_text())
    assert report["held_out_loss_adapter"] < report["held_out_loss_base"] - 0.5, report
    assert all(reply.lstrip().startswith("def ") for reply in report["samples"].values())


def test_it_follows_the_instruction_where_the_base_model_does_not(chat):
    reply = chat.generate(PROMPT, max_new_tokens=48, chat=True)
    assert reply.startswith("def add("), reply
    base = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")
    assert not base.generate(PROMPT, max_new_tokens=48).startswith("def add(")


def test_generate_chat_cli(capsys, chat):
    assert cli.main(["generate", PROMPT, "--chat", "--preset", "gemma_tiny_pycode_chat", "--max-new-tokens", "32"]) == 0
    assert capsys.readouterr().out == chat.generate(PROMPT, max_new_tokens=32, chat=True) + "\n"


def test_chat_completions_over_http(chat):
    models = load_models(["gemma_tiny_pycode_chat"])
    assert list(models) == ["gemma_tiny_pycode_chat"]
    server = Running(models, max_batch=2)
    try:
        body = {"model": "gemma_tiny_pycode_chat", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32,
                "temperature": 0}
        response = server.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["message"]["content"]
        assert content == chat.generate(PROMPT, max_new_tokens=32, chat=True)
    finally:
        server.stop()


def test_serve_with_no_argument_serves_the_chat_preset_too():
    served = load_models([])  # what `zoo serve` with no argument loads
    assert {"gemma_tiny_pycode", "gemma_tiny_pycode_chat", "vit_tiny_digits"} <= set(served)
    assert served["gemma_tiny_pycode_chat"].adapters == ["default"]


@pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                    reason="the script is run under JAX (its docstring's command); zoo.finetune's repeatability on "
                           "every backend is tests/test_finetune.py's")
def test_training_script_is_seeded_and_reproducible(tmp_path):
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        report = train_gemma_pycode_chat.train(out, epochs=1, seed=3, limit=24, verbose=0, samples=1, sample_tokens=4)
        assert report["examples"] + report["held_out_examples"] == 24
    first, second = (load_file(out / "adapter_model.safetensors") for out in outs)
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert zoo.from_preset(outs[0]).generate(PROMPT, max_new_tokens=2, chat=True) is not None


def test_the_bundled_adapter_loads_by_its_preset_name():
    lm = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")
    assert lm.load_adapter("gemma_tiny_pycode_chat", name="chat") == "chat" and lm.active_adapter == "chat"
    chat = zoo.from_preset("gemma_tiny_pycode_chat")
    assert lm.generate(PROMPT, max_new_tokens=8, chat=False) == chat.generate(PROMPT, max_new_tokens=8, chat=False)
    with pytest.raises(PresetNotFoundError, match="bundled adapter preset"):
        lm.load_adapter("vit_tiny_digits")  # a model, not an adapter
    assert lm.adapters == ["chat"]
