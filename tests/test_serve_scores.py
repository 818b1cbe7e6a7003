"""Scores over HTTP: logprobs, echo, n and several prompts, against transformers' log-softmax, read by the openai client."""

import json

import keras
import numpy as np
import pytest
import torch

import zoo
from gemma_reference import reference, save_hf_gemma
from test_serve import Running, openai_client

PROMPT = "def add(a, b):"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_hf_gemma(tmp_path_factory.mktemp("scores") / "gemma3", "gemma3", seed=4)


@pytest.fixture(scope="module")
def running(folder):
    r = Running({"tiny": zoo.GemmaCausalLM.from_preset(folder)}, max_batch=4)
    yield r
    r.stop()


@pytest.fixture(scope="module")
def hf(folder):
    return reference(folder)


def hf_logprobs(hf, ids) -> np.ndarray:
    """transformers' log-softmax at every position of `ids` (each row predicts the next token), float64."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def post(running, route, body):
    response = running.http.post(route, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_logprobs_are_transformers_log_softmax(running, hf):
    tok = running.app.state.server.models["tiny"].tokenizer
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    choice = post(running, "/v1/completions", body)["choices"][0]
    scores = choice["logprobs"]
    assert len(scores["token_logprobs"]) == 8 and "".join(scores["tokens"]) == choice["text"]
    assert scores["text_offset"] == list(np.cumsum([0] + [len(t) for t in scores["tokens"]])[:-1])
    as_ids = post(running, "/v1/completions", {**body, "return_tokens_as_token_ids": True})["choices"][0]["logprobs"]
    assert as_ids["token_logprobs"] == scores["token_logprobs"]
    new_ids = [int(t.split(":")[1]) for t in as_ids["tokens"]]
    assert tok.decode(new_ids) == choice["text"]
    prompt_ids = tok.encode(PROMPT, parse_special=False)
    want = hf_logprobs(hf, prompt_ids + new_ids)[len(prompt_ids) - 1:-1]  # the rows that predicted each new token
    for i, (token, lp, top) in enumerate(zip(new_ids, as_ids["token_logprobs"], as_ids["top_logprobs"])):
        assert lp == pytest.approx(want[i][token], abs=1e-4)
        values = list(top.values())
        assert len(top) == 3 and values == sorted(values, reverse=True)
        assert f"token_id:{token}" in top and max(values) == pytest.approx(lp, abs=1e-9)  # greedy: the top one
        for piece, value in top.items():
            assert value == pytest.approx(want[i][int(piece.split(":")[1])], abs=1e-4)


def test_echo_scores_the_prompt_with_max_tokens_0(running, hf):
    tok = running.app.state.server.models["tiny"].tokenizer
    ids = tok.encode("for i in range(10):", parse_special=False)
    out = post(running, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                             "logprobs": 0, "temperature": 0})
    choice = out["choices"][0]
    assert choice["text"] == tok.decode(ids) and choice["finish_reason"] == "length"
    scores = choice["logprobs"]
    assert scores["token_logprobs"][0] is None and scores["top_logprobs"][0] is None
    want = hf_logprobs(hf, ids)
    np.testing.assert_allclose(scores["token_logprobs"][1:], [want[j][ids[j + 1]] for j in range(len(ids) - 1)],
                               atol=1e-4)
    assert out["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    plain = post(running, "/v1/completions", {"model": "tiny", "prompt": "for i", "max_tokens": 0, "echo": True})
    assert plain["choices"][0]["text"] == "for i" and plain["choices"][0]["logprobs"] is None


def test_chat_logprobs_shape(running, hf):
    out = post(running, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 5, "temperature": 0, "logprobs": True,
                                                  "top_logprobs": 2, "ignore_eos": True})
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and "".join(e["token"] for e in content) == out["choices"][0]["message"]["content"]
    for entry in content:
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
        assert entry["top_logprobs"][0]["token"] == entry["token"]


def test_n_samples_differ_and_repeat_with_a_seed(running):
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "n": 3, "seed": 7,
            "ignore_eos": True}
    first = post(running, "/v1/completions", body)
    texts = [c["text"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2] and len(set(texts)) == 3
    again = post(running, "/v1/completions", body)
    assert [c["text"] for c in again["choices"]] == texts
    assert first["usage"]["prompt_tokens"] == len(running.app.state.server.models["tiny"].tokenizer.encode(PROMPT))


def test_several_prompts_each_as_alone(running):
    prompts = ["import", "class A:", "x = 1"]
    out = post(running, "/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": 6, "temperature": 0,
                                             "n": 2})
    assert [c["index"] for c in out["choices"]] == list(range(6))
    for i, prompt in enumerate(prompts):
        alone = post(running, "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0})
        assert out["choices"][2 * i]["text"] == out["choices"][2 * i + 1]["text"] == alone["choices"][0]["text"]


def test_streamed_choices_and_logprobs_join_to_the_whole(running):
    body = {"model": "tiny", "prompt": [PROMPT, "import"], "max_tokens": 6, "temperature": 0, "logprobs": 1,
            "echo": True, "ignore_eos": True}
    whole = post(running, "/v1/completions", body)
    texts, tokens = {}, {}
    with running.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
                    if choice["logprobs"]:
                        tokens.setdefault(choice["index"], []).extend(choice["logprobs"]["token_logprobs"])
    for choice in whole["choices"]:
        assert texts[choice["index"]] == choice["text"]
        np.testing.assert_allclose([np.nan if v is None else v for v in tokens[choice["index"]]],
                                   [np.nan if v is None else v for v in choice["logprobs"]["token_logprobs"]],
                                   atol=1e-9)


def test_openai_client_reads_every_shape(running):
    client = openai_client(running)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=2, echo=True, temperature=0)
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) > 4
    out = client.completions.create(model="tiny", prompt=[PROMPT, "x"], max_tokens=3, n=2, temperature=0)
    assert len(out.choices) == 4
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0)
    assert chat.choices[0].logprobs.content[0].top_logprobs[0].logprob <= 0
    pieces = [c.choices[0].logprobs for c in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3,
                                                                        logprobs=1, stream=True, temperature=0)
              if c.choices]
    assert sum(len(p.tokens) for p in pieces if p) == 3


def test_a_multiple_choice_task_scored_over_http_matches_scoring_in_python(running):
    """lm-evaluation-harness' loglikelihood over an OpenAI completions endpoint: the continuation's log-probability
    from `echo` + `logprobs` with `max_tokens` 0, the context's tokens then the choice's."""
    lm = running.app.state.server.models["tiny"]
    tok = lm.tokenizer
    task = [("def add(a, b):\n    return", [" a + b", " a * b", " print"], 0),
            ("for i in", [" range(10):", " x y z", " 12"], 0),
            ("import", [" numpy as np", " the fox", " =="], 0),
            ("class Point:", ["\n    def", " 1 2", " ))"], 0)]
    client = openai_client(running)
    correct_http = correct_python = 0
    for context, options, answer in task:
        context_ids = tok.encode(context)
        by_http, by_python = [], []
        for option in options:
            option_ids = tok.encode(option, add_special_tokens=False)
            ids = context_ids + option_ids
            out = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=0,
                                            temperature=0)
            by_http.append(sum(out.choices[0].logprobs.token_logprobs[len(context_ids):]))
            logits = np.asarray(keras.ops.convert_to_numpy(lm(np.asarray([ids], np.int32))), np.float64)[0]
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            by_python.append(sum(logp[j - 1][ids[j]] for j in range(len(context_ids), len(ids))))
        np.testing.assert_allclose(by_http, by_python, atol=1e-4)
        correct_http += int(np.argmax(by_http) == answer)
        correct_python += int(np.argmax(by_python) == answer)
    assert correct_http == correct_python
