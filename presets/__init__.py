"""The preset registry (`zoo.presets`): one TOML card per preset, beside this file.

This folder is shipped as the `zoo.presets` package, so the registry code lives here with
the cards it reads (DESIGN.md's `zoo/presets.py` would shadow the package of the same name).

A card is data: name, task class, description, parameter count, license, whether the
upstream repo is gated, the handles it can be downloaded from (Hugging Face first), optional
pinned revisions per handle, the architecture's config.json (so the parameter count can be
checked without downloading anything), for presets shipped inside the package the bundled
folder's name, and for a LoRA adapter preset the preset it applies to (`base`).
"""

import difflib
import tomllib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from zoo import registry
from zoo.errors import ConfigError, PresetNotFoundError
from zoo.files import read_json


@dataclass(frozen=True)
class PresetCard:
    """What `zoo list` and `zoo info` show, and where `from_preset` finds the files."""

    name: str
    task: str
    description: str
    params: int
    license: str
    gated: bool = False
    sources: tuple[str, ...] = ()
    bundled: str | None = None
    revisions: dict = field(default_factory=dict, compare=False)  # source handle -> pinned revision
    config: dict = field(default_factory=dict, compare=False)  # architecture config.json, when given
    base: str | None = None  # a LoRA adapter preset: the preset it applies to (its params and config are the base's)

    def __repr__(self) -> str:  # one line: the dataclass' own repr prints the whole config dict
        where = "bundled" if self.bundled else (self.sources[0] if self.sources else "no source")
        return f"PresetCard({self.name!r}, {self.task}, {self.params:,} parameters, {where})"

    def model_config(self):
        """The architecture config this card describes (from `config`, or the bundled folder's config.json)."""
        if self.base:
            return get(self.base).model_config()
        raw = self.config or (read_json(self.folder / "config.json") if self.folder else None)
        if not raw:
            raise ConfigError(f"preset {self.name!r}: the card has no [config] and no bundled folder")
        return registry.detect(raw, f"preset card {self.name}.toml [config]").read_config(raw)

    @property
    def folder(self) -> Path | None:
        """The bundled checkpoint folder shipped inside the package, if any."""
        return presets_dir() / self.bundled if self.bundled else None


def presets_dir() -> Path:
    return Path(__file__).resolve().parent


def read_card(path: Path) -> PresetCard:
    """One card from its TOML file, every field checked (the docs site reads the cards with it too)."""
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    known = PresetCard.__dataclass_fields__
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"{path}: unknown fields {sorted(unknown)}; expected some of {sorted(known)}")
    missing = {"name", "task", "description", "params", "license"} - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing fields {sorted(missing)}")
    raw["sources"] = tuple(raw.get("sources", ()))
    if raw["name"] != path.stem:
        raise ConfigError(f"{path}: the card's name {raw['name']!r} must match its file name")
    return PresetCard(**raw)


@cache
def _all_cards() -> dict[str, PresetCard]:
    cards = {}
    for path in sorted(presets_dir().glob("*.toml")):
        card = read_card(path)
        if card.name in cards:
            raise ConfigError(f"{path}: preset name {card.name!r} is used twice")
        cards[card.name] = card
    return cards


def list_presets(task: str | None = None) -> list[PresetCard]:
    """All preset cards, or those of one task class (e.g. "ViTImageClassifier")."""
    return [c for c in _all_cards().values() if task is None or c.task == task]


def get(name: str) -> PresetCard:
    """The card called `name`, or an error suggesting the nearest names."""
    cards = _all_cards()
    if name in cards:
        return cards[name]
    near = difflib.get_close_matches(name, cards, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else "; `zoo list` shows them all"
    raise PresetNotFoundError(f"unknown preset {name!r}{hint}")
