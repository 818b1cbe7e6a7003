"""The docs site: `mkdocs build --strict` passes (no broken link or anchor), and the catalogue is the cards."""

import html
import os
import re
import shlex
import shutil
import subprocess
import sys
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
    assert "AdapterBank" in api and "from_preset" in api and "GemmaCausalLM" in api
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


def examples(page: Path) -> list[tuple[str, str]]:
    """(language, code) of each code block of a built page."""
    return [(lang, html.unescape(re.sub(r"<[^>]+>", "", body))) for lang, body in CODE.findall(page.read_text())]


def test_the_sites_own_examples_on_the_bundled_presets_run(site, tmp_path):
    """The home page's tour, the export guide and the bundled presets' catalogue pages, run as pasted (the
    Python blocks in one process, each in a fresh namespace; each `zoo generate`/`zoo classify` line on its own).
    The guides included from the README also use hub handles and your own files, and are not run here."""
    pages = [site / "index.html", site / "guides" / "export" / "index.html",
             *[site / "catalogue" / name / "index.html" for name in BUNDLED]]
    blocks = [(page, lang, code) for page in pages for lang, code in examples(page)]
    python = [code for _, lang, code in blocks if lang == "python"]
    commands = [line for _, lang, code in blocks if lang == "bash" for line in code.splitlines()
                if line.startswith(("zoo generate", "zoo classify"))]
    assert len(python) >= 2 + len(BUNDLED) and len(commands) == len(BUNDLED)
    runner = "import sys\nfor code in sys.argv[1:]:\n    exec(compile(code, '<docs>', 'exec'), {})\n"
    env = dict(os.environ, KERAS_BACKEND="jax")
    done = subprocess.run([sys.executable, "-c", runner, *python], cwd=tmp_path, capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for command in commands:
        args = shlex.split(command)
        done = subprocess.run([sys.executable, "-m", "zoo.cli", *args[1:]], cwd=tmp_path, capture_output=True,
                              text=True, env=env, timeout=300)
        assert done.returncode == 0 and done.stdout.strip(), (command, done.stderr[-2000:])
