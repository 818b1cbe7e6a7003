"""Many adapters over one served base, in one continuous batch: answers, model listing, load and unload at run time."""

import asyncio
import json
import random

import httpx
import numpy as np
import pytest
from keras import ops

import zoo
from test_serve import Running, openai_client
from zoo.errors import AdapterError, ConfigError
from zoo.lora.bank import AdapterBank
from zoo.serving import Lora
from zoo.serving.protocol import APIError

BASE = "gemma_tiny_pycode"
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):", "# sort a list\n"]
# (name, rank, targets, rslora): PEFT's default targets, two others, and an rsLoRA scale
SPECS = [("sql", 8, None, False), ("py", 4, ["q_proj", "down_proj"], True), ("big", 16, "all-linear", False)]


def make_adapter(folder, rank, targets, rslora, seed, finetune_layout=False):
    """An adapter of the bundled base with random A and B (so it changes the answers), saved as PEFT does, or
    in the layout `zoo finetune` writes (adapter, tokenizer and finetune.json)."""
    lm = zoo.GemmaCausalLM.from_preset(BASE)
    lm.enable_lora(rank=rank, alpha=2 * rank, targets=targets, rslora=rslora)
    rng = np.random.default_rng(seed)
    for v in lm.trainable_weights:
        v.assign(rng.normal(0, 0.08 if "lora_B" in v.path else 0.2, v.shape).astype("float32"))
    if finetune_layout:
        zoo.finetune.save(lm, folder)
    else:
        lm.save_adapter(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {name: make_adapter(root / name, rank, targets, rslora, seed, finetune_layout=name == "py")
            for seed, (name, rank, targets, rslora) in enumerate(SPECS)}


@pytest.fixture(scope="module")
def expected(adapters):
    """Each prompt's greedy answer alone, from the base with each adapter merged into it (None: the base)."""
    answers, lm = {}, zoo.GemmaCausalLM.from_preset(BASE)
    base = [ops.convert_to_numpy(v.value).copy() for v in lm.weights]
    for name in [None, *adapters]:
        if name is not None:
            lm.load_adapter(adapters[name])
            lm.merge_adapter()  # folded into the kernels, and deleted: the base's weights, changed
        answers[name] = dict(zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=10)))  # each as if alone
        for variable, value in zip(lm.weights, base):  # the base again, for the next adapter
            variable.assign(value)
    return answers


@pytest.fixture(scope="module")
def running(adapters):
    loras = [Lora(name, str(folder)) for name, folder in adapters.items()]
    r = Running({"tiny": zoo.GemmaCausalLM.from_preset(BASE)}, loras=loras, max_batch=8, max_loras=5, max_model_len=128,
                api_key="secret")
    yield r
    r.stop()


def complete(running, model, prompt, max_tokens=10, **extra):
    response = running.http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                          "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_32_clients_over_three_adapters_and_the_base_get_each_merged_models_answer(running, expected):
    rng = random.Random(0)
    asks = [(rng.choice([None, *expected.keys() - {None}]), rng.choice(PROMPTS)) for _ in range(32)]
    assert {model for model, _ in asks} == set(expected)  # every adapter and the base in the mix

    async def ask_all():
        headers = {"Authorization": "Bearer secret"}
        async with httpx.AsyncClient(base_url=running.url, timeout=120, headers=headers) as client:
            async def one(model, prompt):
                body = {"model": model or "tiny", "prompt": prompt, "max_tokens": 10, "temperature": 0}
                response = await client.post("/v1/completions", json=body)
                assert response.status_code == 200, response.text
                return response.json()["choices"][0]["text"]
            return await asyncio.gather(*(one(m, p) for m, p in asks))

    answers = asyncio.run(ask_all())
    wrong = [(m, p, got, expected[m][p]) for (m, p), got in zip(asks, answers) if got != expected[m][p]]
    assert not wrong
    assert all(expected[m] != expected[None] for m in expected if m)  # each adapter does change some answers


def test_models_lists_adapters_with_their_parent_and_unknown_ones_are_404(running, adapters, expected):
    cards = {c["id"]: c for c in running.http.get("/v1/models").json()["data"]}
    assert cards["tiny"]["parent"] is None
    for name in adapters:
        assert cards[name]["parent"] == "tiny" and cards[name]["root"] == name  # a folder shows by its name only
    response = running.http.post("/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "model_not_found" and all(n in error["message"] for n in ["tiny", *adapters])
    client = openai_client(running, api_key="secret")
    assert {m.id for m in client.models.list().data} == {"tiny", *adapters}
    completion = client.completions.create(model="sql", prompt=PROMPTS[3], max_tokens=10, temperature=0)
    assert completion.model == "sql" and completion.choices[0].text == expected["sql"][PROMPTS[3]]


def test_load_and_unload_at_run_time_even_while_a_stream_runs(running, adapters, expected):
    load = {"lora_name": "again", "lora_path": str(adapters["sql"])}
    assert running.http.post("/v1/load_lora_adapter", json=load, headers={"Authorization": "Bearer wrong"}
                             ).status_code == 401
    response = running.http.post("/v1/load_lora_adapter", json=load)
    assert response.status_code == 200 and "again" in response.text
    assert complete(running, "again", PROMPTS[1]) == expected["sql"][PROMPTS[1]]
    again = running.http.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and again.json()["error"]["code"] == "lora_exists"

    body = {"model": "again", "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0, "stream": True,
            "ignore_eos": True}
    pieces = []
    with running.http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        for line in lines:  # the first piece: the request is running with the adapter
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
                break
        unloaded = running.http.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
        assert unloaded.status_code == 200
        for line in lines:
            if line.startswith("data: {"):
                pieces.append(json.loads(line[6:])["choices"][0]["text"])
    whole = complete(running, "sql", PROMPTS[0], max_tokens=60, ignore_eos=True)
    assert "".join(pieces) == whole  # the stream finished with the adapter it started with
    gone = running.http.post("/v1/completions", json={"model": "again", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404
    missing = running.http.post("/v1/unload_lora_adapter", json={"lora_name": "again"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "lora_not_found"
    # the freed slot takes another adapter, whose answers are its own
    assert running.http.post("/v1/load_lora_adapter", json={**load, "lora_path": str(adapters["py"])}).status_code == 200
    assert complete(running, "again", PROMPTS[2]) == expected["py"][PROMPTS[2]]
    assert running.http.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200


def test_bad_adapters_are_refused_by_name(running, adapters, tmp_path):
    def load(name, path):
        response = running.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        assert response.status_code == 400, response.text
        return response.json()["error"]["message"]

    wide = make_adapter(tmp_path / "wide", 32, None, False, seed=9)
    assert "rank 32" in load("wide", wide) and "--max-lora-rank" in load("wide", wide)
    (tmp_path / "empty").mkdir()
    assert "adapter_config.json" in load("empty", tmp_path / "empty")
    assert str(tmp_path) not in load("empty", tmp_path / "empty")  # a folder by its name, never the server's path
    assert "'tiny'" in load("tiny", adapters["sql"])  # the name of a served model
    assert "letters, digits" in load("a b", adapters["sql"])
    names = [f"fill{i}" for i in range(2)]  # 3 loaded + 2 = max_loras 5; a sixth does not fit
    for name in names:
        assert running.http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(adapters["sql"])}
                                 ).status_code == 200
    assert "--max-loras" in load("sixth", adapters["sql"])
    for name in names:
        assert running.http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_rows_of_a_mixed_batch_match_each_adapter_alone(adapters):
    """Logits of one prefill whose rows use different adapters (and none) against the model with each adapter
    loaded the usual way (PEFT-exact, tests/test_lora.py)."""
    served = zoo.GemmaCausalLM.from_preset(BASE)
    bank = AdapterBank(served, max_loras=3, max_rank=16)
    for name, folder in adapters.items():
        bank.load(name, folder)
    ids = served.tokenizer.encode(PROMPTS[0])
    order = [None, "big", "sql", "py"]
    slots = [bank.acquire(n) for n in order]
    logits = ops.convert_to_numpy(served(np.array([ids] * 4, np.int32), adapters=np.array(slots, np.int32)))
    for row, name in enumerate(order):
        alone = zoo.GemmaCausalLM.from_preset(BASE)
        if name is not None:
            alone.load_adapter(adapters[name])
        np.testing.assert_allclose(logits[row], ops.convert_to_numpy(alone(np.array([ids], np.int32)))[0],
                                   atol=2e-5, rtol=1e-5)


def test_an_adapter_of_modules_no_other_adapts_joins_a_running_engine(adapters, expected):
    """Loading it gives those modules a bank (new weights): the engine's compiled steps are made again."""
    lm = zoo.GemmaCausalLM.from_preset(BASE)
    bank = AdapterBank(lm, max_loras=2, max_rank=8)
    bank.load("sql", adapters["sql"])  # q_proj, v_proj
    engine = lm.engine(2, 64)

    def answer(prompt, adapter):
        request = engine.submit(lm.tokenizer.encode(prompt), 10, adapter=adapter)
        while not request.finished:  # step() as a server's scheduler calls it (run() would refresh the steps)
            engine.step()
        return request.text

    assert answer(PROMPTS[1], "sql") == expected["sql"][PROMPTS[1]]
    version = bank.version
    bank.load("py", adapters["py"])  # q_proj and down_proj: down_proj is new
    assert bank.version == version + 1
    assert answer(PROMPTS[2], "py") == expected["py"][PROMPTS[2]]
    assert answer(PROMPTS[2], None) == expected[None][PROMPTS[2]]
    with pytest.raises(zoo.errors.GenerationError, match="no adapter named 'nope'"):
        engine.submit([2, 3], 4, adapter="nope")


def test_a_slot_is_reused_only_when_its_requests_finished(adapters):
    lm = zoo.GemmaCausalLM.from_preset(BASE)
    bank = AdapterBank(lm, max_loras=1, max_rank=8)
    bank.load("sql", adapters["sql"])
    slot = bank.acquire("sql")
    bank.unload("sql")
    with pytest.raises(AdapterError, match="--max-loras"):  # the request holding it still runs
        bank.load("py", adapters["py"])
    bank.release(slot)
    bank.load("py", adapters["py"])
    with pytest.raises(AdapterError, match="no adapter named 'sql'"):
        bank.acquire("sql")
    with pytest.raises(AdapterError, match="max_rank must be a positive int"):
        AdapterBank(zoo.GemmaCausalLM.from_preset(BASE), max_rank=0)


def test_the_adapters_base_is_the_one_its_folder_names(adapters):
    from zoo.serving.app import Server, ServerConfig

    def models():
        return {BASE: zoo.GemmaCausalLM.from_preset(BASE), "other": zoo.GemmaCausalLM.from_preset(BASE)}

    # finetune.json names the base as the user did; adapter_config.json's base_model_name_or_path too
    server = Server(models(), ServerConfig(), [Lora("py", str(adapters["py"])), Lora("sql", str(adapters["sql"]))])
    assert server.adapters == {"py": BASE, "sql": BASE}
    two = {"one": zoo.GemmaCausalLM.from_preset(BASE), "two": zoo.GemmaCausalLM.from_preset(BASE)}
    with pytest.raises(AdapterError, match="name its base among the served models"):
        Server(two, ServerConfig(), [Lora("sql", str(adapters["sql"]))])  # both were loaded from that base
    server = Server(models(), ServerConfig(), [Lora("sql", str(adapters["sql"]), "other")])
    assert server.adapters == {"sql": "other"}
    with pytest.raises(ConfigError, match="3 adapters given, but --max-loras is 1"):
        Server({BASE: zoo.GemmaCausalLM.from_preset(BASE)}, ServerConfig(max_loras=1),
               [Lora(n, str(p)) for n, p in adapters.items()])
    with pytest.raises(APIError, match="--enable-lora"):  # no adapters: the load route says how to allow them
        Server({"plain": zoo.GemmaCausalLM.from_preset(BASE)}, ServerConfig()).lora.check_enabled()


def test_lora_arguments_in_both_spellings():
    from zoo.cli import parser

    assert Lora.parse("sql=hf://someone/sql-lora") == Lora("sql", "hf://someone/sql-lora", None)
    assert Lora.parse('{"name": "sql", "path": "/a", "base_model_name": "g"}') == Lora("sql", "/a", "g")
    for bad, says in (("sql", "NAME=PATH"), ("=x", "NAME=PATH"), ("{nope", "not valid JSON"), ('{"name": 1}', "expected")):
        with pytest.raises(ConfigError, match=says):
            Lora.parse(bad)
    args = parser().parse_args(["serve", BASE, "--lora", "a=x", "--lora", "b=y", "--lora-modules", "c=z", "d=w",
                                "--max-lora-rank", "8"])
    assert args.lora == ["a=x", "b=y"] and args.lora_modules == ["c=z", "d=w"] and args.max_lora_rank == 8
