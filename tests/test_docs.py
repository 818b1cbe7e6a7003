"""The docs site: `mkdocs build --strict` passes (no broken link or anchor), the catalogue is the cards, and
every example on the bundled presets runs as pasted."""

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from zoo.presets import list_presets

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(os.environ.get("KERAS_BACKEND", "jax") != "jax",
                                reason="the site does not depend on the backend: built once, in the JAX run")


def text_of(page: Path) -> str:
    """A page's text as a reader sees it: tags (syntax highlighting's spans) gone, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def build(config: Path, site: Path) -> None:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "--site-dir",
                           str(site)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    build(ROOT / "mkdocs.yml", site)
    return site


def test_every_card_is_in_the_catalogue_with_its_own_facts(site):
    index = (site / "catalogue" / "index.html").read_text()
    for card in list_presets():
        page = text_of(site / "catalogue" / card.name / "index.html")
        assert f"{card.params:,}" in page and card.license in page and card.name in index
        for source in card.sources:
            assert source in page
        assert f'from_preset("{card.name}")' in page and f"zoo serve {card.name}" in page  # copy-ready snippets


def test_references_and_guides_are_there(site):
    cli = text_of(site / "reference" / "cli" / "index.html")
    for command in ("zoo serve", "zoo finetune text", "zoo checkpoint align", "--lora-modules"):
        assert command in cli
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("AdapterBank", "from_preset", "GemmaCausalLM", "create_app", "ServedAdapters", "set_offline",
                 "write_checkpoint"):  # the models, adapters, the server as a library, hubs, checkpoints
        assert name in api, name
    assert "/v1/load_lora_adapter" in text_of(site / "guides" / "serve" / "index.html")
    server = text_of(site / "reference" / "server" / "index.html")  # generated from the app and its field sets
    for route in ("/v1/completions", "/v1/chat/completions", "/v1/classify", "/v1/unload_lora_adapter", "/health"):
        assert route in server
    assert "top_logprobs" in server and "max_lora_rank" in server


def test_a_new_card_appears_after_a_rebuild(tmp_path):
    for name in ("mkdocs.yml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "RESULTS.md", tmp_path / "benchmarks" / "RESULTS.md")
    (tmp_path / "presets").mkdir()
    for card in (ROOT / "presets").glob("*.toml"):
        shutil.copy(card, tmp_path / "presets" / card.name)
    (tmp_path / "presets" / "my_new_vit.toml").write_text(
        'name = "my_new_vit"\ntask = "ViTImageClassifier"\ndescription = "A card added to a copy."\n'
        'params = 12345\nlicense = "MIT"\nsources = ["hf://someone/my-new-vit"]\n')
    build(tmp_path / "mkdocs.yml", tmp_path / "site")
    page = text_of(tmp_path / "site" / "catalogue" / "my_new_vit" / "index.html")
    assert "12,345" in page and "MIT" in page and "hf://someone/my-new-vit" in page
    assert "my_new_vit" in (tmp_path / "site" / "catalogue" / "index.html").read_text()


CODE = re.compile(r'<div class="language-(\w+) highlight"><pre>(.*?)</pre></div>', re.S)
BUNDLED = [card.name for card in list_presets() if card.bundled]
SERVER = "127.0.0.1:8000"
SAMPLES = ROOT / "presets" / "vit_tiny_digits" / "samples"


def examples(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each code block of a built page."""
    return [(lang, html.unescape(re.sub(r"<[^>]+>", "", body))) for lang, body in CODE.findall(page.read_text())]


def runnable(site: Path) -> dict[str, list[tuple[str, str]]]:
    """Per page that shows the bundled presets, its examples in order: the Python blocks that name a bundled
    preset or talk to a local server, and every `zoo ...`/`curl ...` command of its shell blocks. (Usage
    synopses are `text` blocks; blocks about other checkpoints name none of the bundled presets.)"""
    pages = {}
    for page in sorted(site.rglob("index.html")):
        blocks = examples(page)
        if not any(name in code for _, code in blocks for name in BUNDLED):
            continue
        steps = []
        for lang, code in blocks:
            if lang == "python" and (any(name in code for name in BUNDLED) or SERVER in code):
                steps.append(("python", code))
            elif lang == "bash":
                for line in code.replace("\\\n", " ").splitlines():
                    if line.startswith(("zoo ", "curl ")):
                        steps.append(("shell", line))
        if steps:
            pages[str(page.parent.relative_to(site))] = steps
    return pages


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The files the examples name: a digit's picture, JSONL examples, an image folder of two labels."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(SAMPLES / "digit_7.png", folder / "digit.png")
    examples = [{"prompt": f"def {name}(a, b):", "completion": f"\n    return a {op} b\n"}
                for name, op in [("add", "+"), ("sub", "-"), ("mul", "*"), ("div", "/"), ("mod", "%"),
                                 ("power", "**"), ("floor_div", "//"), ("both", "and"), ("either", "or"),
                                 ("shift", "<<"), ("mask", "&"), ("flip", "^")]]
    (folder / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[:8]))  # one batch of 8
    (folder / "val.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[8:]))
    for sample in sorted(SAMPLES.glob("*.png")):
        label = "even" if int(sample.stem[-1]) % 2 == 0 else "odd"
        for copy in range(2):
            (folder / "digits" / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(sample, folder / "digits" / label / f"{copy}_{sample.name}")
    return folder


class Server:
    """A `zoo serve` line of an example, run on a free port (the examples' 8000 is rewritten to it) until the
    next `zoo serve` line or the end of the page."""

    def __init__(self, command: str, cwd: Path, env: dict):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log = cwd / f"server-{self.port}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(f"{command} --port {self.port}", shell=True, cwd=cwd, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        for _ in range(480):  # at most 4 minutes to load and warm up
            if self.process.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"{command!r} did not become healthy:\n{self.log.read_text()[-3000:]}")

    def stop(self):
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


RUN_PYTHON = "import sys\nfor code in sys.argv[1:]:\n    exec(compile(code, '<docs>', 'exec'), {})\n"


def run_page(steps: list[tuple[str, str]], cwd: Path) -> None:
    """Runs a page's examples in order in `cwd`, as a reader pasting them would: each Python block in a fresh
    namespace (consecutive blocks share one process), each command in a shell, servers in the background."""
    # (the servers and commands of all pages share the run's compilation cache: conftest.py)
    env = dict(os.environ, KERAS_BACKEND="jax", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    server, python = None, []

    def flush():
        if python:
            done = subprocess.run([sys.executable, "-c", RUN_PYTHON, *python], cwd=cwd, capture_output=True,
                                  text=True, env=env, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            python.clear()

    try:
        for kind, code in steps:
            if server is not None:
                code = code.replace(SERVER, f"127.0.0.1:{server.port}")
            if kind == "python":
                python.append(code)
                continue
            flush()
            if code.startswith("zoo serve"):
                if server is not None:
                    server.stop()
                server = Server(code.split("#")[0].strip(), cwd, env)
                continue
            if code.startswith("curl "):  # an HTTP error fails the example, and the body is shown
                code = "curl --fail-with-body -sS " + code[len("curl "):]
            done = subprocess.run(code, shell=True, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
            assert done.returncode == 0 and done.stdout.strip(), (code, done.stdout[-1000:], done.stderr[-2000:])
        flush()
    finally:
        if server is not None:
            server.stop()


def test_every_example_on_the_bundled_presets_runs(site, inputs, tmp_path):
    """Every page that shows the bundled presets (the home tour, the guides, their catalogue pages) runs as
    pasted, each page in its own folder holding the input files its examples name."""
    pages = runnable(site)
    assert {"guides/classify", "guides/generate", "guides/serve", "guides/lora", "guides/finetune",
            "guides/export", "guides/distribution", ".", *[f"catalogue/{name}" for name in BUNDLED]} <= set(pages)
    commands = [code for steps in pages.values() for kind, code in steps if kind == "shell"]
    assert sum(code.startswith("zoo serve") for code in commands) >= 2 + len(BUNDLED)
    assert any(code.startswith("curl ") for code in commands)
    for name, steps in pages.items():
        cwd = tmp_path / ("home" if name == "." else name.replace("/", "_"))
        shutil.copytree(inputs, cwd)
        run_page(steps, cwd)
