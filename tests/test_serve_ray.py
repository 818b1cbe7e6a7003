"""`zoo serve --ray` for real: a local Ray instance, two replicas of the bundled presets behind one endpoint, the
official `openai` client, an adapter routed to the replica holding it, and a replica stopped mid-run."""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

import zoo
from test_serve_lora import make_adapter
from zoo.errors import ConfigError, DistributionError

pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                                reason="Ray's side does not depend on the backend: run once, in the JAX run")
ray_serve = pytest.importorskip("zoo.serving.ray_serve")  # the serve-ray extra (installed by the test set-up)

BASE = "gemma_tiny_pycode"
PROMPTS = ["def add(a, b):", "class Stack:", "import os\n", "for i in range(10):", "# sort a list\n", "def main():",
           "x = [", "while True:"]
ROOT = Path(__file__).resolve().parents[1]
LONG = 100  # tokens per request while a replica is stopped: the requests are still running when it stops
START_S = 420  # Ray, two replicas, their models loaded and compiled: about 60 s on 2 cores


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    """`zoo serve --ray` in a child process; every process it starts is recorded (by pid) and stopped at the end."""

    def __init__(self, *args: str):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per replica
        # Ray's memory monitor kills workers when the node passes 95% of its memory: the test suite's other
        # processes are not Ray's to judge (a machine running two backends' tests at once comes near it).
        env.update(KERAS_BACKEND="jax", RAY_USAGE_STATS_ENABLED="0", RAY_DISABLE_DOCKER_CPU_WARNING="1",
                   RAY_memory_monitor_refresh_ms="0")
        self.process = subprocess.Popen([sys.executable, "-m", "zoo.cli", "serve", "--ray", "--port", str(self.port),
                                         *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
        self.pids: set[int] = set()
        self.lines: list[str] = []  # its output (Ray's logs from every replica), read as it comes
        self.url = f"http://127.0.0.1:{self.port}"
        started = drain(self.process.stdout, self.lines, "serving on Ray Serve")
        ready = started.wait(START_S) and self.process.poll() is None and self.answers()
        self.record()
        if not ready:
            self.stop()
            pytest.fail(f"zoo serve --ray was not serving within {START_S} s (exit code {self.process.poll()}); "
                        "its output ended with:\n" + "".join(self.lines[-80:]) + ray_logs())

    def answers(self) -> bool:
        """Whether the endpoint answers /v1/models, tried for up to 60 s."""
        for _ in range(60):
            try:
                if httpx.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(1)
        return False

    def record(self) -> None:
        try:
            self.pids |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass

    def replicas(self) -> list[psutil.Process]:
        self.record()
        return [p for p in map(_process, sorted(self.pids)) if p and "ZooReplica" in " ".join(_cmdline(p))]

    def stop(self) -> None:
        self.record()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for pid in self.pids:  # what Ray leaves behind (its node agents outlive the raylet)
            if (p := _process(pid)) is not None:
                p.kill()
        psutil.wait_procs([p for p in map(_process, self.pids) if p], timeout=30)


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def drain(stream, lines: list, marker: str) -> threading.Event:
    """Keeps the child's output lines, read as they come so its pipe never fills; the event is set at the first
    line with `marker` in it, or when the output ends."""
    seen = threading.Event()

    def read():
        for line in stream:
            lines.append(line)
            if marker in line:
                seen.set()
        seen.set()

    threading.Thread(target=read, daemon=True).start()
    return seen


def ray_logs() -> str:
    """The ends of the local Ray instance's Serve logs (controller, proxy, replicas), for a failed start-up."""
    found = sorted(Path(tempfile.gettempdir(), "ray", "session_latest", "logs", "serve").glob("*.log"))
    return "".join(f"\n--- {path.name}:\n" + "".join(path.read_text(errors="replace").splitlines(True)[-15:])
                   for path in found[-6:])


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("ray") / "sql", 8, None, False, seed=3)


@pytest.fixture(scope="module")
def expected(adapter):
    """Each prompt's greedy answer alone, from the base and from the base with the adapter merged."""
    lm = zoo.GemmaCausalLM.from_preset(BASE)
    answers = {None: dict(zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=24))),
               "long": dict(zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=LONG)))}
    lm.load_adapter(adapter)
    lm.merge_adapter()
    answers["sql"] = dict(zip(PROMPTS, lm.generate(PROMPTS, max_new_tokens=24)))
    assert answers["sql"] != answers[None]
    return answers


@pytest.fixture(scope="module")
def cluster(adapter):
    (adapter.parent / "broken").mkdir()  # no adapter in it: answered with an error when asked for
    server = RayServer(BASE, "--replicas", "2", "--lora", f"sql={adapter}", "--lora", f"broken={adapter.parent / 'broken'}",
                       "--max-loras", "2", "--max-model-len", "128")
    try:
        yield server
    finally:
        server.stop()
    assert not [pid for pid in server.pids if _process(pid) is not None]


def ask(url: str, jobs: list[dict], stop_a_replica=None, max_tokens: int = 24):
    """Sends `jobs` ({model, prompt, stream}) at once with the official client; returns (replica, text) or
    (None, error) for each. `stop_a_replica()` runs once the requests are in flight."""
    from openai import APIStatusError, AsyncOpenAI

    async def main():
        client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=180)

        async def one(job):
            try:
                if job.get("stream"):
                    async with client.completions.with_streaming_response.create(
                            model=job["model"], prompt=job["prompt"], max_tokens=max_tokens, temperature=0, stream=True) as r:
                        text = "".join([c.choices[0].text async for c in await r.parse() if c.choices])
                        return r.headers.get("x-zoo-replica"), text
                r = await client.completions.with_raw_response.create(model=job["model"], prompt=job["prompt"],
                                                                      max_tokens=max_tokens, temperature=0)
                return r.headers.get("x-zoo-replica"), r.parse().choices[0].text
            except APIStatusError as e:
                return None, e

        tasks = [asyncio.create_task(one(job)) for job in jobs]
        if stop_a_replica is not None:
            await asyncio.sleep(0.5)
            stop_a_replica()
        try:
            return await asyncio.gather(*tasks)
        finally:
            await client.close()

    return asyncio.run(main())


def test_two_replicas_answer_32_concurrent_requests_as_a_solo_run(cluster, expected):
    jobs = [{"model": BASE, "prompt": PROMPTS[i % len(PROMPTS)], "stream": i % 4 == 3} for i in range(32)]
    answers = ask(cluster.url, jobs)
    assert [text for _, text in answers] == [expected[None][job["prompt"]] for job in jobs]
    served = Counter(replica for replica, _ in answers)
    assert len(served) == 2 and min(served.values()) > 0, served  # both replicas served, through one endpoint
    listed = {m["id"]: m for m in httpx.get(cluster.url + "/v1/models", timeout=60).json()["data"]}
    assert set(listed) == {BASE, "sql", "broken"}
    broken = httpx.post(cluster.url + "/v1/completions", json={"model": "broken", "prompt": "x"}, timeout=60)
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "adapter_not_loaded", broken.text
    assert str(ROOT) not in broken.text and "/tmp" not in broken.text  # no server path in it
    missing = httpx.post(cluster.url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"  # relayed as it was
    refused = httpx.post(cluster.url + "/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_supported"


def test_an_adapter_goes_to_the_replica_holding_it(cluster, expected):
    first = ask(cluster.url, [{"model": "sql", "prompt": PROMPTS[0]}])[0]
    assert first[1] == expected["sql"][PROMPTS[0]]
    time.sleep(2)  # the replica's report of the adapter reaches Ray's router
    answers = [ask(cluster.url, [{"model": "sql", "prompt": p}])[0] for p in PROMPTS]
    assert [text for _, text in answers] == [expected["sql"][p] for p in PROMPTS]
    assert {replica for replica, _ in answers} == {first[0]}  # multiplexing: all to the replica that loaded it


def test_a_replica_stopped_mid_run_loses_no_request_that_had_not_started(cluster, expected):
    victims = cluster.replicas()
    assert len(victims) == 2
    jobs = [{"model": BASE, "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(32)]
    answers = ask(cluster.url, jobs, stop_a_replica=lambda: victims[0].kill(), max_tokens=LONG)
    retried_or_refused = [a for a in answers if a[0] is None]
    for error in (e for _, e in retried_or_refused):  # a clean 503 is allowed; nothing else is
        assert error.status_code == 503 and error.body["code"] == "replica_unavailable", error
    answered = [(job, text) for job, (replica, text) in zip(jobs, answers) if replica is not None]
    assert [text for _, text in answered] == [expected["long"][job["prompt"]] for job, _ in answered]
    assert len(answered) >= 24, f"{len(retried_or_refused)} of 32 refused"
    deadline = time.monotonic() + 20  # Ray forwards its workers' logs every few hundred ms
    while not any("stopped before answering" in line for line in cluster.lines) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any("stopped before answering" in line for line in cluster.lines)  # requests were in flight there


def test_errors():
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(DistributionError, match=f"cannot reach the Ray cluster at ray://127.0.0.1:{port}"):
        ray_serve.connect(f"ray://127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    with pytest.raises(DistributionError, match="expected ray://HOST:PORT"):
        ray_serve.connect("http://somewhere")
    with pytest.raises(ConfigError, match="MIN:MAX"):
        ray_serve.parse_autoscale("4")
    with pytest.raises(ConfigError, match="--autoscale"):
        ray_serve.RayOptions(autoscale=(3, 1))
    with pytest.raises(ConfigError, match="--replicas"):
        ray_serve.RayOptions(replicas=0)
    with pytest.raises(ConfigError, match="unknown argument"):
        ray_serve.build({"presets": BASE, "replica": "2"})
    with pytest.raises(ConfigError, match="NAME=PATH"):
        ray_serve.build({"lora": "sql"})
    with pytest.raises(ConfigError, match="max_batch='many'"):
        ray_serve.build({"max_batch": "many"})
    from zoo.cli import main

    with pytest.raises(SystemExit, match="not both"):
        main(["serve", BASE, "--replicas", "2", "--autoscale", "1:2"])
    out = subprocess.run([sys.executable, "-m", "zoo.cli", "serve", "--address", f"127.0.0.1:{port}", BASE],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert out.returncode != 0 and f"cannot reach the Ray cluster at 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_rayservice_manifest_builds_the_application():
    manifest = yaml.safe_load((ROOT / "docs" / "guides" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert module == "zoo.serving.ray_serve" and name == "build"
    built = ray_serve.build(app["args"])
    assert type(built).__name__ == "Application"
