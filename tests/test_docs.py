"""The docs site: `mkdocs build --strict` passes (no broken link or anchor), and the catalogue is the cards."""

import html
import os
import re
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
