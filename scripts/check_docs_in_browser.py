"""Builds the docs site and looks at it in headless Chromium, as a reader would: the home page, the
catalogue table (sorted by clicking a column's header), a preset's page, and the search box finding a
preset by its name.

Needs Debian's Chromium (`apt-get install chromium`) and Playwright, which drives it (`pip install
"keras-zoo[browser]"`; Playwright's own browser download is not needed). The site is served on
127.0.0.1 only. Prints one line per check and exits 1 if any fails.

Usage:
    .venv/bin/python scripts/check_docs_in_browser.py [--chromium /usr/bin/chromium]
"""

import argparse
import functools
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from playwright.sync_api import Error, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
PRESET = "gemma_tiny_pycode_chat"
TIMEOUT_MS = 15000


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def home(page, url):
    page.goto(url)
    text = page.inner_text("article")
    return "A 30-second tour" in text and page.is_visible("text=Catalogue")


def catalogue_sorts(page, url):
    """Clicking the Parameters header sorts the rows by it (tablesort), one way and then the other."""
    page.goto(url + "catalogue/")
    header = page.locator("article table th", has_text="Parameters")

    def column():
        index = page.locator("article table th").all_inner_texts().index(header.inner_text())
        cells = page.locator(f"article table tbody tr td:nth-child({index + 1})").all_inner_texts()
        return [int(c.replace(",", "")) for c in cells]

    header.click()
    first = column()
    header.click()
    second = column()
    return len(first) > 2 and sorted(first) in (first, first[::-1]) and second == first[::-1]


def preset_page(page, url):
    page.goto(url + "catalogue/gemma_tiny_pycode/")
    text = page.inner_text("article")
    return all(w in text for w in ("2,363,072", "Apache-2.0", 'from_preset("gemma_tiny_pycode")', "zoo serve"))


def search_finds_a_preset(page, url):
    page.goto(url, wait_until="networkidle")  # the search worker has read the index
    page.locator("input[data-md-component=search-query]").press_sequentially(PRESET)  # typed, as a reader does
    page.wait_for_selector(".md-search-result__item", timeout=TIMEOUT_MS)
    first = page.locator(".md-search-result__link").first.get_attribute("href")
    return f"/catalogue/{PRESET}/" in first


CHECKS = [("home page", home), ("catalogue table, sorted by a click", catalogue_sorts),
          ("a preset's page", preset_page), (f"search finds {PRESET}", search_finds_a_preset)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as site:
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                        "--site-dir", site], check=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=site))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        failed = 0
        try:
            with sync_playwright() as p:
                # no sandbox: Chromium may run as root in a container
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 900})  # the desktop layout
                page.set_default_timeout(TIMEOUT_MS)
                for what, check in CHECKS:
                    try:
                        ok, why = check(page, f"http://127.0.0.1:{port}/"), ""
                    except Error as e:
                        ok, why = False, f" ({str(e).splitlines()[0]})"
                    failed += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {what}{why}")
                browser.close()
        finally:
            server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
