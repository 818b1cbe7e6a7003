"""Builds the docs site and looks at it in headless Chromium, as a reader would: the home page, the
catalogue table and a preset's page, rendered with their scripts run; and the search index the site's
search box reads, served to the browser, holding each preset's page under its name.

Needs Chromium (Debian: `apt-get install chromium`). The site is served on 127.0.0.1 only; each page
is loaded with its JavaScript run (`--dump-dom` after a virtual-time budget) and checked for what a
reader should see. Prints one line per check and exits 1 if any fails. (Typing into the search box is
not checked: under `--dump-dom` the search worker never answers, `?q=` opens an empty result list.)

Usage:
    .venv/bin/python scripts/check_docs_in_browser.py [--chromium chromium]
"""

import argparse
import functools
import http.server
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (what a reader looks at, its path, text that must be in the rendered page)
CHECKS = [
    ("home page", "", ["A 30-second tour", "Catalogue"]),
    ("catalogue table, sortable", "catalogue/", ['href="gemma_tiny_pycode/"', "2,363,072", "vit_tiny_digits",
                                                 'role="columnheader"']),  # tablesort's mark on a sortable header
    ("a preset's page", "catalogue/gemma_tiny_pycode/", ["2,363,072", "Apache-2.0", "from_preset", "Use it"]),
    ("the search index", "search/search_index.json", ['"location":"catalogue/gemma_tiny_pycode_chat/"',
                                                       '"title":"gemma_tiny_pycode_chat"']),
]


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def rendered(chromium: str, url: str) -> str:
    """The page's DOM after its scripts ran (headless Chromium, no sandbox: it may run as root in a container)."""
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                           "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return done.stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as site:
        subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
                        "--site-dir", site], check=True)
        handler = functools.partial(Quiet, directory=site)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        failed = 0
        try:
            for what, path, wanted in CHECKS:
                dom = rendered(args.chromium, f"http://127.0.0.1:{port}/{path}")
                missing = [w for w in wanted if w not in dom]
                failed += bool(missing)
                print(f"{'ok  ' if not missing else 'FAIL'} {what}: /{path}" + (f" (missing {missing})" if missing else ""))
        finally:
            server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
