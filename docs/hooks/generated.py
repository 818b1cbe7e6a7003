"""mkdocs hook: the pages made from the repository at build time, so no page is a hand-kept copy.

- `catalogue/index.md` and `catalogue/<name>.md`: one row and one page per card in `presets/*.toml`
  (read with `zoo.presets.read_card`, beside the `mkdocs.yml` being built);
- `reference/cli.md`: every `zoo` command's usage, from the CLI's own argparse parser;
- `reference/server.md`: `zoo serve`'s routes (from the app itself), the fields each generation route
  takes (`zoo.serving.protocol`) and the server's settings (`ServerConfig`).
"""

import argparse
import dataclasses
from pathlib import Path

from mkdocs.structure.files import File

TASK_GUIDES = {"GemmaCausalLM": "../guides/generate.md", "ViTImageClassifier": "../guides/classify.md"}


def on_files(files, config):
    root = Path(config.config_file_path).parent
    pages = [*catalogue(root / "presets"), ("reference/cli.md", cli_reference()),
             ("reference/server.md", server_reference())]
    for path, text in pages:
        files.append(File.generated(config, path, content=text))
    return files


# ----------------------------------------------------------------------------- the catalogue


def cards(folder: Path) -> list:
    from zoo.presets import read_card

    return [read_card(path) for path in sorted(folder.glob("*.toml"))]


def catalogue(folder: Path) -> list[tuple[str, str]]:
    found = cards(folder)
    rows = ["# Model catalogue", "",
            f"{len(found)} presets, one per card in `presets/`. Every name works in `from_preset`, `zoo generate`/"
            "`zoo classify --preset` and `zoo serve`; bundled ones ship inside the package and work offline.", "",
            "| name | task | parameters | license | gated | sources |", "|---|---|---:|---|---|---|"]
    for card in found:
        sources = "bundled" if card.bundled else ", ".join(f"`{s}`" for s in card.sources)
        rows.append(f"| [{card.name}]({card.name}.md) | {card.task} | {card.params:,} | {card.license} "
                    f"| {'yes' if card.gated else 'no'} | {sources} |")
    pages = [("catalogue/index.md", "\n".join(rows) + "\n")]
    pages += [(f"catalogue/{card.name}.md", card_page(card)) for card in found]
    return pages


def card_page(card) -> str:
    lines = [f"# {card.name}", "", card.description, "",
             "| | |", "|---|---|", f"| task | `{card.task}` ([guide]({TASK_GUIDES.get(card.task, '../index.md')})) |",
             f"| parameters | {card.params:,} |", f"| license | {card.license} |",
             f"| gated | {'yes: accept the license on the hub and log in first' if card.gated else 'no'} |",
             f"| bundled | {'yes, works offline' if card.bundled else 'no, downloaded on first use'} |"]
    if card.base:
        lines.append(f"| adapter over | [{card.base}]({card.base}.md) |")
    if card.sources:
        lines += ["", "Sources, tried in order:", ""]
        lines += [f"- `{s}`" + (f" at revision `{card.revisions[s]}`" if s in card.revisions else "") for s in card.sources]
    python = f'import zoo\n\nmodel = zoo.{card.task}.from_preset("{card.name}")\n'
    if card.task == "GemmaCausalLM":
        python += 'print(model.generate("def add(a, b):", max_new_tokens=32))\n'
        command = f'zoo generate "def add(a, b):" --preset {card.name} --max-new-tokens 32'
    else:
        python = ("import numpy as np\n" + python + "image = np.zeros((64, 64, 3), np.uint8)  # an RGB array or an "
                  "image file's path, resized as the checkpoint says\nprint(model.predict_labels([image], top_k=3))\n")
        images = "--samples" if card.bundled else "image.png"  # a bundled preset ships sample images
        command = f"zoo classify {images} --preset {card.name} --top-k 3"
    lines += ["", "## Use it", "", "```python", python.rstrip(), "```", "", "```bash", command,
              f"zoo serve {card.name}", "```", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the CLI


def cli_reference() -> str:
    from zoo.cli import parser

    lines = ["# Command line", "", "Generated from `zoo`'s own argument parser: what `zoo COMMAND --help` prints.", ""]
    for name, command in commands(parser(), "zoo"):
        lines += [f"## `{name}`", "", "```text", command.format_help().rstrip(), "```", ""]
    return "\n".join(lines)


def commands(p: argparse.ArgumentParser, name: str):
    """(name, parser) for the program and every subcommand, depth first (argparse lists subparsers only
    through its actions)."""
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from commands(sub, f"{name} {sub_name}")


# ----------------------------------------------------------------------------- the server


def server_reference() -> str:
    from zoo.serving import ServerConfig, create_app
    from zoo.serving.protocol import CHAT_FIELDS, COMPLETION_FIELDS

    app = create_app({}, ServerConfig())
    lines = ["# Server", "", "`zoo serve`'s routes, generated from the app. Errors are OpenAI's JSON "
             '(`{"error": {"message", "type", "param", "code"}}`); with `--api-key` every route but `/health` '
             "needs `Authorization: Bearer KEY`.", "", "| route | method | what it does |", "|---|---|---|"]
    for route in app.routes:
        doc = " ".join((route.endpoint.__doc__ or "").split())
        lines.append(f"| `{route.path}` | {', '.join(sorted(route.methods - {'HEAD'}))} | {doc} |")
    for title, fields in (("/v1/completions", COMPLETION_FIELDS), ("/v1/chat/completions", CHAT_FIELDS)):
        lines += ["", f"## Fields of `{title}`", "", ", ".join(f"`{f}`" for f in sorted(fields))]
    lines += ["", "## Settings", "", "`zoo serve`'s options set these (`zoo serve --help`).", "",
              "| setting | default |", "|---|---|"]
    lines += [f"| `{f.name}` | `{f.default!r}` |" for f in dataclasses.fields(ServerConfig)]
    return "\n".join(lines) + "\n"
