"""`zoo serve` over real HTTP on loopback, with httpx and the official openai client."""

import base64
import concurrent.futures
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

import zoo
from gemma_reference import save_hf_gemma
from zoo.serving import ServerConfig, create_app

SAMPLES = sorted(zoo.presets.get("vit_tiny_digits").folder.joinpath("samples").glob("digit_*.png"))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = save_hf_gemma(tmp_path_factory.mktemp("serve") / "gemma3", "gemma3", seed=2)
    return {"tiny-gemma": zoo.GemmaCausalLM.from_preset(folder),
            "digits": zoo.ViTImageClassifier.from_preset("vit_tiny_digits")}


class Running:
    def __init__(self, models, loras=(), **options):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.config = ServerConfig(port=port, **options)
        self.app = create_app(models, self.config, loras)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    timeout_graceful_shutdown=30))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {options['api_key']}"} if options.get("api_key") else {}
        self.http = httpx.Client(base_url=self.url, timeout=120, headers=headers)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if self.http.get("/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def metric(self, name: str, labels: str = "") -> float:
        total = 0.0
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + ("{" if labels or True else "")) and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def stop(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def running(models):
    r = Running(models, max_batch=4, max_queue=64)
    yield r
    r.stop()


def openai_client(running, **kw):
    from openai import OpenAI

    return OpenAI(base_url=running.url + "/v1", api_key=kw.pop("api_key", "unused"), max_retries=0, **kw)


def error_of(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


# ----------------------------------------------------------------------------- happy paths


def test_health_models_and_metrics(running):
    assert running.http.get("/health").json()["status"] == "ok"
    ids = {m.id for m in openai_client(running).models.list().data}
    assert ids == {"tiny-gemma", "digits"}
    card = openai_client(running).models.retrieve("digits")  # GET /v1/models/{id}
    assert card.id == "digits" and card.object == "model"
    missing = error_of(running.http.get("/v1/models/nope"), 404)
    assert missing["code"] == "model_not_found" and "digits, tiny-gemma" in missing["message"]
    assert "zoo_requests_total" in running.http.get("/metrics").text


def test_completion_matches_the_library(running, models):
    lm = models["tiny-gemma"]
    client = openai_client(running)
    out = client.completions.create(model="tiny-gemma", prompt="def add(a, b):", max_tokens=12, temperature=0)
    assert out.choices[0].text == lm.generate("def add(a, b):", max_new_tokens=12)
    assert out.choices[0].finish_reason in ("length", "stop") and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(lm.tokenizer.encode("def add(a, b):"))
    assert out.usage.completion_tokens <= 12 and out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    pieces = list(client.completions.create(model="tiny-gemma", prompt="def add(a, b):", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == out.choices[0].text
    assert [c.choices[0].finish_reason for c in pieces if c.choices][-1] == out.choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == out.usage.completion_tokens


def test_completion_takes_token_ids(running, models):
    # OpenAI's and vLLM's other prompt forms: token ids, and the batch form holding one prompt.
    lm = models["tiny-gemma"]
    client = openai_client(running)
    ids = lm.tokenizer.encode("def add(a, b):")
    expected = client.completions.create(model="tiny-gemma", prompt="def add(a, b):", max_tokens=12, temperature=0)
    for prompt in (ids, [ids], ["def add(a, b):"]):
        out = client.completions.create(model="tiny-gemma", prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == expected.choices[0].text and out.usage.prompt_tokens == len(ids)


def test_chat_matches_the_library(running, models):
    lm = models["tiny-gemma"]
    client = openai_client(running)
    messages = [{"role": "user", "content": "Write a function."}]
    out = client.chat.completions.create(model="tiny-gemma", messages=messages, max_tokens=10, temperature=0)
    assert out.choices[0].message.content == lm.generate("Write a function.", max_new_tokens=10, chat=True)
    assert out.choices[0].message.role == "assistant" and out.object == "chat.completion"
    chunks = list(client.chat.completions.create(model="tiny-gemma", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_sampling_is_seeded_and_stop_strings_apply(running, models):
    client = openai_client(running)
    a, b = (client.completions.create(model="tiny-gemma", prompt="for i in", max_tokens=12, temperature=1.2, top_p=0.9,
                                      seed=11).choices[0].text for _ in range(2))
    assert a == b
    full = client.completions.create(model="tiny-gemma", prompt="for i in", max_tokens=20, temperature=0).choices[0].text
    cut = full[len(full) // 2: len(full) // 2 + 2]
    stopped = client.completions.create(model="tiny-gemma", prompt="for i in", max_tokens=20, temperature=0, stop=[cut])
    assert stopped.choices[0].text == full[: full.index(cut)] and stopped.choices[0].finish_reason == "stop"


def test_classify_json_and_multipart(running, models):
    want = models["digits"].predict_labels(SAMPLES[:3], top_k=2)

    def same(got, expected):  # labels exactly; scores to float precision (batch sizes differ)
        assert [[x["label"] for x in g] for g in got] == [[x["label"] for x in e] for e in expected]
        np.testing.assert_allclose([[x["score"] for x in g] for g in got],
                                   [[x["score"] for x in e] for e in expected], atol=1e-6)

    encoded = [base64.b64encode(p.read_bytes()).decode() for p in SAMPLES[:3]]
    out = running.http.post("/v1/classify", json={"model": "digits", "images": encoded, "top_k": 2}).json()
    same([d["labels"] for d in out["data"]], want)
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in SAMPLES[:2]]
    out = running.http.post("/v1/classify", data={"model": "digits", "top_k": "2"}, files=files).json()
    same([d["labels"] for d in out["data"]], want[:2])


# ----------------------------------------------------------------------------- concurrency


def test_32_concurrent_clients_match_running_alone(running):
    prompts = ["def", "import os", "class Point:\n    def", "for i in range(10):", "x = [", "The quick brown fox jumps",
               "def add(a, b):\n    return", "print("]
    requests = []
    for i in range(32):
        body = {"model": "tiny-gemma", "prompt": prompts[i % 8] * (1 + i % 3), "max_tokens": 6 + i % 11}
        body.update({"temperature": 0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.9, "seed": i})
        requests.append(body)
    alone = [running.http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in requests]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(lambda b: running.http.post("/v1/completions", json=b), requests))
    assert all(r.status_code == 200 for r in together)
    assert [r.json()["choices"][0]["text"] for r in together] == alone  # greedy and seeded alike
    assert running.metric("zoo_batch_occupancy_count") > 0


def test_disconnect_mid_stream_frees_the_slot(models):
    r = Running(models, max_batch=1, max_queue=4)
    try:
        before = r.metric("zoo_cancelled_requests_total")
        body = {"model": "tiny-gemma", "prompt": "def", "max_tokens": 80, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with r.http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        # The only slot must be freed, or this would wait behind 80 tokens... and the metrics say so.
        deadline = time.monotonic() + 30
        while r.metric("zoo_cancelled_requests_total") <= before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.metric("zoo_cancelled_requests_total") == before + 1
        assert r.metric("zoo_busy_slots") == 0
        later = r.http.post("/v1/completions", json={"model": "tiny-gemma", "prompt": "x", "max_tokens": 3})
        assert later.status_code == 200
    finally:
        r.stop()


def test_full_queue_answers_429_and_keeps_serving(models):
    r = Running(models, max_batch=1, max_queue=1)
    engine = r.app.state.server.generators["tiny-gemma"].engine
    fast_step = engine.step

    def slow_step():  # a slow model: the tiny one would finish before the queue fills
        time.sleep(0.03)
        return fast_step()

    engine.step = slow_step
    try:
        long = {"model": "tiny-gemma", "prompt": "def", "max_tokens": 88, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with r.http.stream("POST", "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # kept: closing it would close the stream
            next(line for line in lines if line.startswith("data:"))  # holds the only slot
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                queued = pool.submit(r.http.post, "/v1/completions", json=dict(long, stream=False, max_tokens=4))
                deadline = time.monotonic() + 30
                while r.metric("zoo_queue_depth") < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                refused = r.http.post("/v1/completions", json=dict(long, stream=False, max_tokens=4))
                assert error_of(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"
                for _ in lines:
                    pass
                assert queued.result().status_code == 200
        assert r.http.post("/v1/completions", json=dict(long, stream=False, max_tokens=2)).status_code == 200
    finally:
        r.stop()


def test_classification_shares_the_limits(models):
    """The image route answers a full queue and an oversized upload as the text routes do."""
    r = Running(models, max_batch=1, max_queue=0, max_body_bytes=4096)
    try:
        image = {"model": "digits", "images": [base64.b64encode(SAMPLES[0].read_bytes()).decode()]}
        refused = r.http.post("/v1/classify", json=image)
        assert error_of(refused, 429)["code"] == "queue_full" and refused.headers["retry-after"] == "1"
        upload = {"image": ("big.png", b"\x89PNG" + bytes(8192), "image/png")}
        too_big = r.http.post("/v1/classify", data={"model": "digits"}, files=upload)
        assert error_of(too_big, 413)["message"].endswith("the limit is 4096")
    finally:
        r.stop()


# ----------------------------------------------------------------------------- bad input and auth


@pytest.mark.parametrize("body,status,fragment", [
    ({"prompt": "x"}, 400, "'model' is a required property"),
    ({"model": "nope", "prompt": "x"}, 404, "The model 'nope' does not exist"),
    ({"model": "digits", "prompt": "x"}, 404, "does not do text generation"),
    ({"model": "tiny-gemma"}, 400, "'prompt' is a required property"),
    ({"model": "tiny-gemma", "prompt": ""}, 400, "'prompt' is empty"),
    ({"model": "tiny-gemma", "prompt": []}, 400, "'prompt' is empty"),
    ({"model": "tiny-gemma", "prompt": [[]]}, 400, "'prompt[0]' is empty"),
    ({"model": "tiny-gemma", "prompt": ["a", ""]}, 400, "'prompt[1]' is empty"),
    ({"model": "tiny-gemma", "prompt": ["a"] * 65}, 400, "at most 64 per request"),
    ({"model": "tiny-gemma", "prompt": [2, "x"]}, 400, "a list of token ids"),
    ({"model": "tiny-gemma", "prompt": [2, True]}, 400, "a list of token ids"),
    ({"model": "tiny-gemma", "prompt": [2, 1.5]}, 400, "a list of token ids"),
    ({"model": "tiny-gemma", "prompt": [2, -1, 10**9]}, 400, "outside the model's vocabulary of"),
    ({"model": "tiny-gemma", "prompt": 7}, 400, "'prompt' must be a string, a list of token ids"),
    ({"model": "tiny-gemma", "prompt": "x", "max_tokens": 0}, 400, "'max_tokens' must be a positive integer (0 only "
                                                                    "with echo)"),
    ({"model": "tiny-gemma", "prompt": "x", "max_tokens": 500}, 400, "this server allows at most"),
    ({"model": "tiny-gemma", "prompt": "x " * 60, "max_tokens": 60}, 400, "maximum context length is 96"),
    ({"model": "tiny-gemma", "prompt": "x", "temperature": 5}, 400, "'temperature' must be in [0, 2]"),
    ({"model": "tiny-gemma", "prompt": "x", "top_p": 0}, 400, "'top_p' must be in (0, 1]"),
    ({"model": "tiny-gemma", "prompt": "x", "n": 0}, 400, "'n' must be an integer from 1 to 16"),
    ({"model": "tiny-gemma", "prompt": "x", "n": 2, "best_of": 3}, 400, "'best_of' is not supported"),
    ({"model": "tiny-gemma", "prompt": "x", "stop": [1, 2]}, 400, "'stop' must be a string or a list"),
    ({"model": "tiny-gemma", "prompt": "x", "stream": "yes"}, 400, "'stream' must be a boolean"),
    ({"model": "tiny-gemma", "prompt": "x", "logprobs": 21}, 400, "'logprobs' must be an integer from 0 to 20"),
    ({"model": "tiny-gemma", "prompt": "x", "logprobs": True}, 400, "'logprobs' must be an integer"),
    ({"model": "tiny-gemma", "prompt": "x", "echo": "yes"}, 400, "'echo' must be a boolean"),
    ({"model": "tiny-gemma", "prompt": "x", "bogus": 1}, 400, "Unrecognized request argument supplied: bogus"),
])
def test_completion_errors(running, body, status, fragment):
    assert fragment in error_of(running.http.post("/v1/completions", json=body), status)["message"]


def test_malformed_bodies(running, models):
    assert error_of(running.http.post("/v1/completions", content=b"{nope"), 400)["code"] == "invalid_json"
    assert "must be a JSON object" in error_of(running.http.post("/v1/completions", json=[1]), 400)["message"]
    big = b'{"model": "tiny-gemma", "prompt": "' + b"x" * (9 * 2**20) + b'"}'
    assert error_of(running.http.post("/v1/completions", content=big), 413)["code"] == "body_too_large"
    chat = {"model": "tiny-gemma", "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]}
    assert "System role not supported" in error_of(running.http.post("/v1/chat/completions", json=chat), 400)["message"]
    assert error_of(running.http.post("/v1/chat/completions", json={"model": "tiny-gemma", "messages": []}), 400)
    bad = {"model": "digits", "images": ["%%%"]}
    assert "images[0] is not valid base64" in error_of(running.http.post("/v1/classify", json=bad), 400)["message"]
    junk = {"model": "digits", "images": [base64.b64encode(b"not an image").decode()]}
    message = error_of(running.http.post("/v1/classify", json=junk), 400)["message"]
    assert "images[0] is not an image format Pillow reads" in message and "BytesIO" not in message
    deep = b'{"model": "tiny-gemma", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert error_of(running.http.post("/v1/completions", content=deep), 400)["message"] == (
        "the request body is nested too deeply")
    assert error_of(running.http.post("/v1/classify", json={"model": "tiny-gemma", "images": junk["images"]}), 404)
    assert error_of(running.http.get("/v1/nothing"), 404)
    assert error_of(running.http.get("/v1/completions"), 405)


def test_request_timeout(models):
    r = Running(models, max_batch=4, request_timeout_s=0.0)
    try:
        body = {"model": "tiny-gemma", "prompt": "def", "max_tokens": 20, "ignore_eos": True}
        assert error_of(r.http.post("/v1/completions", json=body), 504)["code"] == "timeout"
        streamed = r.http.post("/v1/completions", json=dict(body, stream=True)).text
        assert '"code": "timeout"' in streamed and streamed.rstrip().endswith("data: [DONE]")
        time.sleep(0.2)
        assert r.metric("zoo_busy_slots") == 0  # the timed-out requests gave their slots back
    finally:
        r.stop()


def test_api_key(models):
    r = Running(models, max_batch=4, api_key="s3cret")
    try:
        anonymous = httpx.Client(base_url=r.url, timeout=60)
        wrong = httpx.Client(base_url=r.url, timeout=60, headers={"Authorization": "Bearer nope"})
        protected = [("GET", "/v1/models", None), ("GET", "/metrics", None),
                     ("POST", "/v1/completions", {"model": "tiny-gemma", "prompt": "x", "max_tokens": 2}),
                     ("POST", "/v1/chat/completions", {"model": "tiny-gemma", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "x"}]}),
                     ("POST", "/v1/classify", {"model": "digits", "images": [base64.b64encode(SAMPLES[0].read_bytes()).decode()]})]
        for method, path, body in protected:
            for client in (anonymous, wrong):
                assert error_of(client.request(method, path, json=body), 401)["code"] == "invalid_api_key", path
            assert r.http.request(method, path, json=body).status_code == 200, path
        assert anonymous.get("/health").status_code == 200
        with pytest.raises(Exception, match="401|Incorrect API key"):
            openai_client(r, api_key="wrong").models.list()
        assert openai_client(r, api_key="s3cret").models.list().data
    finally:
        r.stop()


def test_graceful_shutdown_finishes_in_flight_requests(models):
    r = Running(models, max_batch=4)
    body = {"model": "tiny-gemma", "prompt": "def", "max_tokens": 40, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with r.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        r.server.should_exit = True  # as on SIGINT/SIGTERM
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    r.thread.join(timeout=60)
    assert not r.thread.is_alive()
    r.http.close()
