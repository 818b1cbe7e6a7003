"""Handles -> local folders: preset names, local paths, and (with the hub issue) hf:// and kaggle://."""

import os
from pathlib import Path

from zoo import presets
from zoo.errors import PresetNotFoundError


def _is_path(preset) -> bool:
    if isinstance(preset, os.PathLike):
        return True
    return preset.startswith((".", "/", "~")) or os.sep in preset or Path(preset).is_dir()


def resolve(preset: str | os.PathLike) -> Path:
    """A local folder holding the preset's config.json and weights."""
    if _is_path(preset):
        folder = Path(preset).expanduser()
        if not folder.is_dir():
            raise PresetNotFoundError(f"{folder}: no such folder")
        return folder
    if "://" in preset:
        scheme = preset.split("://", 1)[0]
        raise PresetNotFoundError(f"{preset}: {scheme}:// handles are not supported by this build")
    card = presets.get(preset)
    if card.folder is not None:
        return card.folder
    raise PresetNotFoundError(f"preset {preset!r} has no source this build can read: {list(card.sources)}")


def describe(preset, folder: Path) -> dict:
    """Where a loaded model came from, recorded on the model."""
    return {"handle": str(preset), "folder": str(folder)}
