"""Gemma 1/2/3 against transformers: logits, greedy generation, batching, round trips, errors, memory."""

import gc
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import psutil
import pytest
import torch

import zoo
from keras.ops import convert_to_numpy as to_numpy
from zoo.errors import ConfigError, GenerationError
from zoo.generation import Sampler, bucket, compiled_steps
from gemma_reference import VARIANTS, hf_greedy, reference, save_hf_gemma

TOL = 1e-4
NEW = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return {name: save_hf_gemma(root / name, name, seed=i) for i, name in enumerate(VARIANTS)}


@pytest.fixture(scope="module")
def models(folders):
    return {name: zoo.GemmaCausalLM.from_preset(folder) for name, folder in folders.items()}


def token_batch(seed=0, batch=2, length=20):
    return np.random.default_rng(seed).integers(3, 150, (batch, length)).astype(np.int32)


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(folders, models, variant):
    ids = token_batch()  # 20 positions: longer than the sliding window (6)
    with torch.no_grad():
        want = reference(folders[variant])(torch.from_numpy(ids).long()).logits.numpy()
    got = to_numpy(models[variant](ids))
    assert got.shape == (2, 20, 160)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_config_fields_are_read(models):
    cfg = models["gemma2"].config
    assert (cfg.sliding_window, cfg.query_pre_attn_scalar, cfg.attn_logit_softcapping) == (6, 16, 20.0)
    assert cfg.final_logit_softcapping == 15.0 and cfg.rope["full_attention"].theta == 3000.0
    assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
    cfg3 = models["gemma3"].config
    assert (cfg3.rope["full_attention"].theta, cfg3.rope["sliding_attention"].theta) == (50000.0, 2000.0)
    assert cfg3.qk_norm and cfg3.num_groups == 4 and cfg3.head_dim * cfg3.num_heads != cfg3.hidden_size


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_older_hub_config_spelling(tmp_path, folders, models, variant):
    folder = save_hf_gemma(tmp_path / variant, variant, seed=list(VARIANTS).index(variant), legacy_spelling=True)
    raw = json.loads((folder / "config.json").read_text())
    assert "torch_dtype" in raw and "rope_theta" in raw and "rope_parameters" not in raw
    ids = token_batch(1)
    np.testing.assert_allclose(to_numpy(zoo.GemmaCausalLM.from_preset(folder)(ids)), to_numpy(models[variant](ids)),
                               atol=1e-6, rtol=0)


def test_left_padding_mask(models):
    lm = models["gemma2"]
    short, full = token_batch(2, 1, 7), token_batch(3, 1, 12)
    padded = np.concatenate([np.zeros((1, 5), np.int32), short], axis=1)
    mask = np.concatenate([np.zeros((1, 5)), np.ones((1, 7))], axis=1)
    both = to_numpy(lm(np.concatenate([padded, full]), padding_mask=np.concatenate([mask, np.ones((1, 12))])))
    np.testing.assert_allclose(both[0, 5:], to_numpy(lm(short))[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(both[1], to_numpy(lm(full))[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("field,value,message", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}, "rope_type 'yarn' is not supported"),
    ("use_bidirectional_attention", True, "use_bidirectional_attention=true is not supported"),
    ("hidden_activation", "mish", "unsupported activation 'mish'"),
    ("num_key_value_heads", 3, "not a multiple of num_key_value_heads 3"),
])
def test_values_we_cannot_honour(tmp_path, folders, field, value, message):
    folder = shutil.copytree(folders["gemma2"], tmp_path / "bad")
    raw = json.loads((folder / "config.json").read_text())
    raw[field] = value
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        zoo.GemmaCausalLM.from_preset(folder)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_matches_transformers(folders, models, variant):
    lm = models[variant]
    prompt = lm.tokenizer.encode("def add(a, b):")
    engine = lm.engine(1, 64)
    request = engine.submit(prompt, NEW, stop_ids=())
    for _ in engine.run([request]):
        pass
    assert request.tokens == hf_greedy(reference(folders[variant]), prompt, NEW)
    # A varied sequence, not one token repeated: the comparison above must have something to compare.
    assert len(set(request.tokens)) >= 3


def test_batched_prompts_match_alone(folders, models):
    lm = models["gemma3"]
    prompts = [lm.tokenizer.encode(t) for t in ("for i in", "class Point:\n    def", "x", "The quick brown fox jumps")]
    engine = lm.engine(4, 64)
    requests = [engine.submit(p, NEW, stop_ids=()) for p in prompts]
    for _ in engine.run(requests):
        pass
    ref = reference(folders["gemma3"])
    for p, r in zip(prompts, requests):
        assert r.tokens == hf_greedy(ref, p, NEW)


def test_choices_of_one_prompt_share_its_prefill_and_sample_as_alone(models):
    """Requests of the same prompt admitted together: one prefill row, the others' cache rows copied from it."""
    lm = models["gemma2"]
    prompt, other = lm.tokenizer.encode("def add(a, b):"), lm.tokenizer.encode("import")
    seeded = [Sampler(temperature=0.9, top_k=50, seed=s) for s in range(3)]
    engine = lm.engine(8, 64)
    prefill, copy_rows, seen = engine.steps.prefill, engine.steps.copy_rows, []
    engine.steps.prefill = lambda tokens, *rest: seen.append(("prefill", len({tuple(t) for t in tokens}))) or prefill(
        tokens, *rest)  # the distinct rows prefilled (a batch is padded with repeats)
    engine.steps.copy_rows = lambda cache, src, dst: seen.append(("copy", len(set(dst)))) or copy_rows(cache, src, dst)
    requests = [engine.submit(prompt, 10, s, stop_ids=()) for s in seeded] + [engine.submit(other, 10, stop_ids=())]
    for _ in engine.run(requests):
        pass
    assert seen[:2] == [("prefill", 2), ("copy", 2)]  # two distinct prompts prefilled; two rows copied
    single = lm.engine(1, 64)
    for sampler, r in zip([*seeded, Sampler()], requests):
        alone = single.submit(r.prompt_ids, 10, sampler, stop_ids=())
        for _ in single.run([alone]):
            pass
        assert alone.tokens == r.tokens
    assert len({tuple(r.tokens) for r in requests[:3]}) == 3


def test_requests_join_and_leave_a_running_batch(models):
    lm = models["gemma2"]
    alone = {}
    for text in ("def add", "import numpy"):
        engine = lm.engine(1, 64)
        r = engine.submit(lm.tokenizer.encode(text), 12, stop_ids=())
        for _ in engine.run([r]):
            pass
        alone[text] = r.tokens
    engine = lm.engine(2, 64)
    first = engine.submit(lm.tokenizer.encode("def add"), 12, stop_ids=())
    for _ in range(5):
        engine.step()
    second = engine.submit(lm.tokenizer.encode("import numpy"), 12, stop_ids=())  # joins mid-way
    cancelled = engine.submit(lm.tokenizer.encode("for"), 12, stop_ids=())  # waits: no free slot
    engine.step()
    assert cancelled.slot is None and engine.busy == 2
    engine.cancel(cancelled)
    for _ in engine.run([first, second, cancelled]):
        pass
    assert (first.tokens, second.tokens) == (alone["def add"], alone["import numpy"])
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == []
    assert engine.idle()


def test_decode_steps_cover_only_the_rows_in_use(models):
    """A step decodes rows [0, highest busy slot] rounded up to a power of two, and tokens stay as alone."""
    lm = models["gemma2"]
    texts = {"def add": 3, "import numpy": 12, "for": 12, "class": 6}
    alone = {}
    single = lm.engine(1, 64)
    for text, n in texts.items():
        r = single.submit(lm.tokenizer.encode(text), n, stop_ids=())
        for _ in single.run([r]):
            pass
        alone[text] = r.tokens
    engine = lm.engine(4, 64)
    steps = compiled_steps(lm)
    decode = steps.decode
    rows_seen = []

    def spy(tokens, positions, cache):
        rows_seen.append(len(tokens))
        return decode(tokens, positions, cache)

    steps.decode = spy
    try:
        first = [engine.submit(lm.tokenizer.encode(t), texts[t], stop_ids=()) for t in ("def add", "import numpy", "for")]
        for _ in engine.run(first):
            pass
        assert [r.slot for r in first] == [0, 1, 2]
        assert rows_seen[0] == 4 and set(rows_seen) == {4}  # slot 2 stays busy until the end
        rows_seen.clear()
        last = engine.submit(lm.tokenizer.encode("class"), texts["class"], stop_ids=())
        for _ in engine.run([last]):
            pass
        assert last.slot == 0 and set(rows_seen) == {1}  # alone in the lowest slot: batch-1 steps
    finally:
        steps.decode = decode
    assert [r.tokens for r in (*first, last)] == [alone[t] for t in ("def add", "import numpy", "for", "class")]


def test_generation_follows_new_adapters(folders):
    """Steps compiled before enable_lora are made again: generation then uses the adapters."""
    lm = zoo.GemmaCausalLM.from_preset(folders["gemma3"])  # its own copy: the adapters change it

    def greedy_compiled(prompt):
        engine = lm.engine(1, 64)
        request = engine.submit(prompt, 8, stop_ids=())
        for _ in engine.run([request]):
            pass
        return request.tokens

    def greedy_eager(prompt):
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(np.argmax(to_numpy(lm(np.array([ids], np.int32)))[0, -1])))
        return ids[len(prompt):]

    prompt = lm.tokenizer.encode("def add(a, b):")
    before = greedy_compiled(prompt)
    rng = np.random.default_rng(3)
    for layer in lm.backbone.decoder_layers:
        layer.self_attn.q_proj.enable_lora(2)
        b = layer.self_attn.q_proj.lora_kernel_b
        b.assign(rng.standard_normal(b.shape).astype("float32"))
    after = greedy_eager(prompt)
    assert after != before  # the adapters change the greedy tokens, so a stale step would be caught
    assert greedy_compiled(prompt) == after


def test_generate_and_stream_text(models):
    lm = models["gemma"]
    text = lm.generate("def add(a, b):", max_new_tokens=16)
    prompt = lm.tokenizer.encode("def add(a, b):")
    engine = lm.engine(1, bucket(len(prompt) + 16))  # the engine generate() uses
    r = engine.submit(prompt, 16, stop_ids=lm.stop_token_ids)
    for _ in engine.run([r]):
        pass
    assert text == lm.tokenizer.decode([t for t in r.tokens if t not in lm.stop_token_ids])
    assert "".join(lm.stream("def add(a, b):", max_new_tokens=16)) == text
    batch = lm.generate(["def add(a, b):", "class"], max_new_tokens=16)
    assert batch[0] == text and isinstance(batch[1], str)


def test_stop_strings_and_ids(models):
    lm = models["gemma"]
    full = lm.generate("for i in", max_new_tokens=24)
    cut = full[len(full) // 3: len(full) // 3 + 2]
    assert cut and lm.generate("for i in", max_new_tokens=24, stop=[cut]) == full[: full.index(cut)]
    streamed = "".join(lm.stream("for i in", max_new_tokens=24, stop=[cut]))
    assert streamed == full[: full.index(cut)]
    prompt = lm.tokenizer.encode("for i in")
    engine = lm.engine(1, bucket(len(prompt) + 24))  # the engine generate() uses
    r = engine.submit(prompt, 24, stop_ids=lm.stop_token_ids)
    for _ in engine.run([r]):
        pass
    stop_id = r.tokens[4]
    expected = lm.tokenizer.decode(r.tokens[: r.tokens.index(stop_id)])
    assert lm.generate("for i in", max_new_tokens=24, stop=[stop_id]) == expected


def test_sampling_is_seeded_and_per_request(models):
    lm = models["gemma3"]
    a = lm.generate("def", max_new_tokens=12, sampler="top_p", temperature=1.5, top_p=0.9, seed=7)
    b = lm.generate("def", max_new_tokens=12, sampler="top_p", temperature=1.5, top_p=0.9, seed=7)
    c = lm.generate("def", max_new_tokens=12, sampler="top_k", temperature=1.5, top_k=20, seed=8)
    assert a == b and a != lm.generate("def", max_new_tokens=12)
    # A sampled request draws the same tokens whether it runs alone or beside others.
    together = lm.generate(["def", "class Point"], max_new_tokens=12, sampler="top_k", temperature=1.5, top_k=20, seed=8)
    assert together[0] == c


def test_sampler_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    draws = np.bincount([Sampler(temperature=1.0, seed=0).choose(logits, rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    hot = np.bincount([Sampler(temperature=2.0).choose(logits, rng) for _ in range(4000)], minlength=4) / 4000
    expected = np.sqrt([0.5, 0.3, 0.15, 0.05])  # softmax(log p / 2) is proportional to sqrt(p)
    np.testing.assert_allclose(hot, expected / expected.sum(), atol=0.03)
    top_p = {Sampler(temperature=1.0, top_p=0.7).choose(logits, rng) for _ in range(300)}
    assert top_p == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert {Sampler(temperature=1.0, top_k=1).choose(logits, rng) for _ in range(50)} == {0}
    # OpenAI's API allows negative seeds: they seed too, reproducibly.
    assert Sampler(seed=-3).rng().random() == Sampler(seed=-3).rng().random() != Sampler(seed=3).rng().random()


@pytest.mark.parametrize("call,message", [
    (lambda lm: lm.generate("", max_new_tokens=4), "the prompt is empty"),
    (lambda lm: lm.generate("x " * 200, max_new_tokens=4), "model's maximum is 96 positions"),
    (lambda lm: lm.generate("def", max_new_tokens=0), "max_new_tokens must be a positive int"),
    (lambda lm: lm.generate("def", max_new_tokens=4, sampler="beam"), "unknown sampler 'beam'"),
    (lambda lm: lm.generate("def", max_new_tokens=4, temperature=-1.0), "temperature must be >= 0"),
    (lambda lm: lm.generate("def", max_new_tokens=4, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (lambda lm: lm.generate([], max_new_tokens=4), "no prompts given"),
    (lambda lm: lm.generate(5, max_new_tokens=4), "prompt must be a string or a list of strings, got int"),
    (lambda lm: lm.generate("def", max_new_tokens=4, seed="x"), "seed must be an int or None, got 'x'"),
    (lambda lm: lm.generate("def", max_new_tokens=4, stop=[""]), r"stop must hold stop strings \(non-empty\)"),
    (lambda lm: lm.generate("def", max_new_tokens=4, stop=[1.5]), "and/or token ids"),
    (lambda lm: lm.generate("def", max_new_tokens=4, max_batch=0), "max_batch must be a positive int, got 0"),
])
def test_generation_errors(models, call, message):
    with pytest.raises(GenerationError, match=message):
        call(models["gemma"])


def test_engine_refuses_token_ids_outside_the_vocabulary(models):
    from zoo.generation import GenerationEngine

    lm = models["gemma"]
    engine = GenerationEngine(lm, rows=1, length=16)
    vocab = lm.config.vocab_size
    for ids, bad in (([1, vocab], vocab), ([-1, 2], -1)):
        with pytest.raises(GenerationError, match=rf"outside the model's vocabulary of {vocab}: \[{bad}\]"):
            engine.submit(ids, max_new_tokens=2)
    assert not engine.waiting  # nothing queued
    request = engine.submit([1, vocab - 1], max_new_tokens=2)
    while not request.finished:
        engine.step()
    assert len(request.tokens) == 2


def test_tokenizer_that_does_not_match_the_vocabulary(tmp_path, folders):
    folder = shutil.copytree(folders["gemma"], tmp_path / "small_vocab")
    raw = json.loads((folder / "config.json").read_text())
    raw["vocab_size"] = 100
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"the tokenizer has 15\d tokens but config.json's vocab_size is 100"):
        zoo.GemmaCausalLM.from_preset(folder)


# ----------------------------------------------------------------------------- presets


def test_round_trip_and_transformers_reload(tmp_path, folders, models):
    lm = models["gemma3"]
    saved = lm.save_preset(tmp_path / "saved")
    assert (saved / "tokenizer.json").is_file() and (saved / "generation_config.json").is_file()
    ids = token_batch(4)
    np.testing.assert_array_equal(to_numpy(zoo.GemmaCausalLM.from_preset(saved)(ids)), to_numpy(lm(ids)))
    with torch.no_grad():
        again = reference(saved)(torch.from_numpy(ids).long()).logits.numpy()
        want = reference(folders["gemma3"])(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(again, want, atol=1e-6, rtol=0)


def test_backbone_loads_causal_lm_checkpoint(folders, models):
    backbone = zoo.GemmaBackbone.from_preset(folders["gemma"])
    ids = token_batch(5)
    np.testing.assert_allclose(to_numpy(models["gemma"].logits(backbone(ids))), to_numpy(models["gemma"](ids)),
                               atol=1e-6, rtol=0)


def test_backends_agree(folders, tmp_path):
    ids = token_batch(6)
    np.save(tmp_path / "ids.npy", ids)
    here = to_numpy(zoo.GemmaCausalLM.from_preset(folders["gemma2"])(ids))
    worker = Path(__file__).with_name("backend_worker.py")
    for other in {"jax", "torch", "tensorflow"} - {keras.backend.backend()}:
        out = tmp_path / f"{other}.npy"
        subprocess.run([sys.executable, str(worker), "gemma", str(folders["gemma2"]), str(tmp_path / "ids.npy"), str(out)],
                       env=dict(os.environ, KERAS_BACKEND=other), check=True, timeout=300, capture_output=True)
        np.testing.assert_allclose(np.load(out), here, atol=TOL, rtol=0, err_msg=f"{other} vs {keras.backend.backend()}")


def test_no_leak_over_many_generate_calls(models):
    lm = models["gemma"]
    process = psutil.Process()

    def calls(n):
        for i in range(n):
            lm.generate(["def add", "for i"][i % 2], max_new_tokens=4)
        gc.collect()
        return process.memory_info().rss

    calls(30)
    after_30 = calls(30)
    after_300 = calls(270)
    assert after_300 - after_30 < 8 * 2**20, f"RSS grew by {(after_300 - after_30) / 2**20:.1f} MiB"
