"""Fuzzing what users and clients control: checkpoint headers, config.json, tokenizer_config.json, request bodies.

The only outcomes allowed are success, an error from `zoo.errors`, or (for the server) a 4xx
answer with OpenAI's error JSON. Hypothesis runs derandomized, so CI sees the same examples each
time; each target is bounded to a few seconds per backend (ZOO_FUZZ_EXAMPLES=500 searches longer).
"""

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from conftest import FUZZ_COUNTS
from test_serve import Running
from zoo.errors import ZooError

FUZZ = settings(max_examples=int(os.environ.get("ZOO_FUZZ_EXAMPLES", "40")), deadline=None, derandomize=os.environ.get("ZOO_FUZZ_RANDOM") is None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DIGITS = zoo.presets.get("vit_tiny_digits").folder
PYCODE = zoo.presets.get("gemma_tiny_pycode").folder
# JSON values of every type, with sizes that stress the checks but cannot take the machine's memory unchecked.
SCALARS = (st.none() | st.booleans() | st.integers(-3, 5000) | st.sampled_from([2**31, 2**63, 10**30, -(2**63)])
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                          max_size=4), max_leaves=8)


def _tried(target: str) -> None:
    FUZZ_COUNTS[target] = FUZZ_COUNTS.get(target, 0) + 1


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(path: Path, header_bytes: bytes, data: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


def _loads_or_zoo_error(folder: Path, cls=zoo.ViTImageClassifier):
    try:
        cls.from_preset(folder)
    except ZooError:
        pass


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as root:
        yield Path(root)


def _copy(source: Path, scratch: Path) -> Path:
    folder = scratch / "model"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("samples", "training.json"))
    return folder


@FUZZ
@given(data=st.data())
def test_safetensors_header(scratch, data):
    _tried("safetensors header")
    folder = _copy(DIGITS, scratch)
    header, body = _header(folder / "model.safetensors")
    kind = data.draw(st.sampled_from(["field", "entry", "bytes", "length"]))
    if kind == "field":  # one field of one tensor's entry replaced by any JSON value
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(VALUES)
        text = json.dumps(header).encode()
    elif kind == "entry":  # a tensor's entry replaced whole, or a new one added
        name = data.draw(st.sampled_from(sorted(header)) | st.text(max_size=20))
        header[name] = data.draw(VALUES)
        text = json.dumps(header).encode()
    else:
        text = bytearray(json.dumps(header).encode())
        for _ in range(data.draw(st.integers(1, 4))):  # raw bytes overwritten
            text[data.draw(st.integers(0, len(text) - 1))] = data.draw(st.integers(0, 255))
        text = bytes(text)
    _write(folder / "model.safetensors", text, body)
    if kind == "length":  # a header length that lies
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:])
    _loads_or_zoo_error(folder)


@FUZZ
@given(data=st.data())
def test_config_json(scratch, data):
    _tried("config.json")
    folder = _copy(DIGITS, scratch)
    config = json.loads((folder / "config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(config)) | st.text(max_size=10))
        config[key] = data.draw(VALUES)
    (folder / "config.json").write_text(json.dumps(config))
    _loads_or_zoo_error(folder)


@FUZZ
@given(data=st.data())
def test_tokenizer_config_json(scratch, data):
    _tried("tokenizer_config.json")
    folder = _copy(PYCODE, scratch)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        key = data.draw(st.sampled_from(sorted(config) + ["chat_template", "bos_token", "add_bos_token"]))
        config[key] = data.draw(VALUES | st.sampled_from(["{{ messages[0] }}", "{% for", "{{ raise_exception('x') }}"]))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    try:
        lm = zoo.GemmaCausalLM.from_preset(folder)
        lm.tokenizer.decode(lm.tokenizer.encode("def f(x):"))
        lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    except ZooError:
        pass


@pytest.fixture(scope="module")
def server():
    models = {"lm": zoo.GemmaCausalLM.from_preset(PYCODE), "digits": zoo.ViTImageClassifier.from_preset(DIGITS)}
    r = Running(models, max_batch=2, max_queue=16, max_model_len=128)
    yield r
    r.stop()


FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "stop", "stream", "seed",
          "n", "logprobs", "ignore_eos", "stream_options", "images", "user", "presence_penalty"]
GOOD = {"model": "lm", "prompt": "def", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
        "images": []}


@FUZZ
@given(data=st.data())
def test_request_bodies(server, data):
    _tried("request bodies")
    route = data.draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify"]))
    body = {k: v for k, v in GOOD.items() if data.draw(st.booleans())}
    for _ in range(data.draw(st.integers(0, 4))):
        body[data.draw(st.sampled_from(FIELDS) | st.text(max_size=8))] = data.draw(VALUES)
    if data.draw(st.booleans()) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep generation short: the point is parsing
    payload = json.dumps(body, allow_nan=True).encode() if data.draw(st.integers(0, 9)) else data.draw(st.binary(max_size=64))
    response = server.http.post(route, content=payload, headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert response.text.rstrip().endswith("data: [DONE]")
    else:
        answer = response.json()
        assert ("error" in answer) == (response.status_code >= 400), answer
