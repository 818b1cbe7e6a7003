"""Handles -> local folders: preset names, local paths, `hf://` and `kaggle://` handles.

Downloads go through `huggingface_hub` and `kagglehub`, so their caches, progress bars, tokens
(`HF_TOKEN`, `KAGGLE_USERNAME`/`KAGGLE_KEY`, `~/.kaggle/kaggle.json`) and offline mode
(`HF_HUB_OFFLINE`) apply. A Hugging Face revision (branch, tag or commit) is resolved to one
commit first and every file is fetched from that commit. `ZOO_OFFLINE=1` (or `set_offline(True)`)
keeps every load on what is already cached. kagglehub needs the network to find a model's latest
version, so Kaggle downloads are recorded (`$ZOO_CACHE/kaggle.json`, by default ~/.cache/keras-zoo):
offline, or with Kaggle out of reach, a handle is answered from that record.

Example:
    >>> from zoo import hub
    >>> hub.parse("hf://google/gemma-2-2b@main")
    Handle(scheme='hf', repo='google/gemma-2-2b', revision='main', kaggle_version=None)
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from zoo import presets
from zoo.errors import GatedModelError, HandleError, HubError, PresetNotFoundError

# The files a model needs; other weights formats (.bin, .h5, .msgpack, .gguf, ONNX) are skipped.
MODEL_FILES = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "preprocessor_config.json", "adapter_config.json", "finetune.json",
)  # (*.safetensors and adapter_config.json: a PEFT adapter folder is a preset too, over its base model)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT adapter folder
# Kaggle's model frameworks; keras-zoo reads the Hugging Face layout, which Kaggle files under "transformers".
KAGGLE_FRAMEWORKS = {
    "transformers", "keras", "pytorch", "jax", "flax", "tensorflow2", "tensorflow1", "tfjs", "tflite", "onnx", "gguf",
    "ggml", "gemmacpp", "maxtext", "pax", "tensorrtllm", "triton", "coral", "scikitlearn", "mxnet", "other",
}
KAGGLE_READABLE = {"transformers"}
_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")
_KAGGLE = re.compile(r"^(?P<owner>[\w.-]+)/(?P<model>[\w.-]+)/(?P<framework>[\w.-]+)/(?P<variation>[\w.-]+)(/(?P<version>\d+))?$")
_offline: bool | None = None


@dataclass(frozen=True)
class Handle:
    scheme: str  # "hf" or "kaggle"
    repo: str  # "org/name", or "owner/model/framework/variation" for Kaggle
    revision: str | None = None
    kaggle_version: int | None = None


def set_offline(offline: bool | None) -> None:
    """Forces offline (True) or online (False) loading for this process; None follows `ZOO_OFFLINE`."""
    global _offline
    _offline = offline


def is_offline() -> bool:
    if _offline is not None:
        return _offline
    return os.environ.get("ZOO_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def parse(handle: str) -> Handle:
    """Splits an `hf://` or `kaggle://` handle, or raises HandleError saying what a handle looks like."""
    scheme, sep, rest = handle.partition("://")
    if not sep or scheme not in ("hf", "kaggle"):
        raise HandleError(f"{handle!r}: unknown handle scheme {scheme + '://'!r}; expected hf:// or kaggle://")
    if scheme == "hf":
        repo, at, revision = rest.partition("@")
        if not _REPO.match(repo) or (at and not revision):
            raise HandleError(f"{handle!r}: expected hf://org/name or hf://org/name@revision")
        return Handle("hf", repo, revision or None)
    m = _KAGGLE.match(rest)
    if not m:
        raise HandleError(f"{handle!r}: expected kaggle://owner/model/framework/variation[/version]")
    framework = m["framework"].lower()
    if framework not in KAGGLE_FRAMEWORKS:
        raise HandleError(f"{handle!r}: unknown Kaggle framework {m['framework']!r}; "
                          f"keras-zoo reads {', '.join(sorted(KAGGLE_READABLE))} (Hugging Face layout)")
    if framework not in KAGGLE_READABLE:
        raise HandleError(f"{handle!r}: the {m['framework']!r} framework's files are not in Hugging Face layout; "
                          f"use the {', '.join(sorted(KAGGLE_READABLE))} variation of this model")
    repo = f"{m['owner']}/{m['model']}/{framework}/{m['variation']}"
    return Handle("kaggle", repo, kaggle_version=int(m["version"]) if m["version"] else None)


def _is_path(preset) -> bool:
    if isinstance(preset, os.PathLike):
        return True
    if "://" in preset:
        return False
    return preset.startswith((".", "/", "~")) or os.sep in preset or Path(preset).is_dir()


def short_name(preset: str | os.PathLike) -> str:
    """What to call the model a preset, handle or folder loads: the preset's name, the repository's or Kaggle
    variation's last part (no revision or version), or the folder's name."""
    if _is_path(preset):
        return Path(preset).expanduser().name or str(preset)
    if "://" in preset:
        return parse(preset).repo.split("/")[-1]
    return preset


# Where each resolved folder came from, so `describe` can record the commit without a second call.
_SOURCES: dict[str, dict] = {}


def resolve(preset: str | os.PathLike, revision: str | None = None, adapter: bool = False) -> Path:
    """A local folder holding the preset's config.json and weights, downloading it if needed.

    With `adapter`, the handle names a PEFT adapter (adapter_config.json and its weights) instead.
    """
    if not (isinstance(preset, os.PathLike) or (isinstance(preset, str) and preset.strip())):
        raise PresetNotFoundError(f"expected a preset name, a hf:// or kaggle:// handle, or a folder; got {preset!r}")
    if _is_path(preset):
        folder = Path(preset).expanduser()
        if not folder.is_dir():
            raise PresetNotFoundError(f"{folder}: no such folder")
        return folder
    if "://" in preset:
        h = parse(preset)
        if revision and h.scheme == "hf":
            h = Handle("hf", h.repo, revision)
        return _download(h, adapter)
    if adapter:  # a bundled adapter preset (gemma_tiny_pycode_chat), else a folder or a handle
        card = next((c for c in presets.list_presets() if c.name == preset), None)
        if card is not None and card.folder is not None and (card.folder / "adapter_config.json").is_file():
            return card.folder
        raise PresetNotFoundError(f"{preset!r}: expected an adapter folder, a bundled adapter preset, or an hf:// "
                                  "or kaggle:// handle")
    card = presets.get(preset)
    if card.folder is not None:
        return card.folder
    if not card.sources:
        raise PresetNotFoundError(f"preset {preset!r} lists no sources")
    errors = []
    for source in card.sources:  # Hugging Face first; Kaggle if that fails for a reason other than access
        h = parse(source)
        if h.scheme == "hf" and (revision or card.revisions.get(source)):
            h = Handle("hf", h.repo, revision or card.revisions.get(source))
        try:
            return _download(h)
        except GatedModelError:
            raise
        except HubError as e:
            errors.append(str(e))
    raise HubError(f"preset {preset!r}: no source could be read:\n  " + "\n  ".join(errors))


def _download(h: Handle, adapter: bool = False) -> Path:
    folder, source = _download_hf(h, adapter=adapter) if h.scheme == "hf" else _download_kaggle(h)
    _SOURCES[str(folder)] = source
    return folder


def describe(preset, folder: Path) -> dict:
    """Where a loaded model came from, recorded on the model (and written by save_preset)."""
    return {"handle": str(preset), "folder": str(folder), **_SOURCES.get(str(folder), {})}


# ----------------------------------------------------------------------------- Hugging Face


def _hf_error(e: Exception, h: Handle) -> HubError:
    from huggingface_hub import errors as hf

    where = f"hf://{h.repo}" + (f"@{h.revision}" if h.revision else "")
    if isinstance(e, hf.GatedRepoError):
        return GatedModelError(
            f"{where} is a gated repository: accept its license at https://huggingface.co/{h.repo} while logged "
            "in, then give a token with access (set HF_TOKEN or run `hf auth login`)")
    if isinstance(e, hf.RevisionNotFoundError):
        return HubError(f"{where}: the repository has no revision {h.revision!r} (a branch, tag or commit hash)")
    if isinstance(e, hf.RepositoryNotFoundError):
        return HubError(f"{where}: repository not found (or private: set HF_TOKEN to a token that can read it)")
    if isinstance(e, hf.RemoteEntryNotFoundError):
        return HubError(f"{where}: a file the model needs is missing from the repository: {e}")
    if isinstance(e, (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled)):
        if _hf_offline():  # `zoo download` would fail the same way: say what will work
            return HubError(f"{where} is not in the local cache and downloads are off (HF_HUB_OFFLINE or "
                            "ZOO_OFFLINE is set): unset it on a connected machine to download it, or load a "
                            "local copy of the model's folder by its path")
        return HubError(f"{where} is not in the local cache and the Hub cannot be reached from here: connect "
                        "and try again, or load a local copy of the model's folder by its path")
    return HubError(f"{where}: download failed: {type(e).__name__}: {e}")


def _hf_offline() -> bool:
    from huggingface_hub import constants

    return is_offline() or constants.HF_HUB_OFFLINE


def _download_hf(h: Handle, cache_only: bool = False, adapter: bool = False) -> tuple[Path, dict]:
    """snapshot_download resolves the revision to a commit once and fetches every file from it; when
    the Hub cannot be reached (or offline mode is on) it answers from the cache."""
    import huggingface_hub

    try:
        files = ADAPTER_FILES if adapter else MODEL_FILES
        folder = Path(huggingface_hub.snapshot_download(h.repo, revision=h.revision, allow_patterns=list(files),
                                                        local_files_only=cache_only or _hf_offline()))
    except Exception as e:  # huggingface_hub's typed errors, and its HTTP library's for network failures
        raise _hf_error(e, h) from e
    where = f"hf://{h.repo}@{folder.name}"
    found = sorted(p.name for p in folder.iterdir())
    config = ADAPTER_FILES[0] if adapter else "config.json"
    if not (folder / config).is_file():
        raise HubError(f"{where}: the repository has no {config}; found {found[:8]}")
    if not any(name.endswith(".safetensors") for name in found):
        raise HubError(f"{where}: the repository has no .safetensors weights (keras-zoo reads safetensors only; "
                       "other weight formats are not downloaded)")
    return folder, {"commit": folder.name, "revision": h.revision or "main"}


# ----------------------------------------------------------------------------- Kaggle


def _kaggle_error(e: Exception, h: Handle) -> HubError:
    where = f"kaggle://{h.repo}" + (f"/{h.kaggle_version}" if h.kaggle_version else "")
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    owner, model = h.repo.split("/")[:2]
    if status in (401, 403):
        return GatedModelError(
            f"{where}: access denied; accept the model's license at https://www.kaggle.com/models/{owner}/{model} "
            "and give Kaggle credentials (KAGGLE_USERNAME and KAGGLE_KEY, or ~/.kaggle/kaggle.json)")
    if status == 404:
        return HubError(f"{where}: not found on Kaggle (check the owner, model, framework, variation and version)")
    if _is_connection_error(e):
        return HubError(f"{where}: Kaggle cannot be reached ({_reason(e)}), and this version is not in the local "
                        "cache; connect, or load a local folder by its path")
    return HubError(f"{where}: download failed: {type(e).__name__}: {_reason(e)}")


def _is_connection_error(e: Exception) -> bool:
    import requests

    return isinstance(e, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError))


# The cause inside requests' and urllib3's long messages (a URL, a pool repr and the cause, nested).
_CAUSES = re.compile(r"Failed to resolve '[^']+'|Name or service not known|Temporary failure in name resolution|"
                     r"Connection refused|Network is unreachable|timed out|Connection reset by peer")


def _reason(e: Exception) -> str:
    """The cause of a download error in a few words, on one line."""
    text = str(e)
    found = _CAUSES.search(text)
    if found:
        return found.group(0)
    line = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _download_kaggle(h: Handle) -> tuple[Path, dict]:
    if is_offline():
        return _kaggle_from_record(h)
    import kagglehub
    import requests

    try:
        folder = Path(kagglehub.model_download(h.repo + (f"/{h.kaggle_version}" if h.kaggle_version else "")))
    except requests.ConnectionError as e:  # Kaggle out of reach: what was downloaded before answers
        try:
            return _kaggle_from_record(h)
        except HubError:
            raise _kaggle_error(e, h) from e
    except Exception as e:  # kagglehub raises requests' errors and its own
        raise _kaggle_error(e, h) from e
    version = int(folder.name) if folder.name.isdigit() else h.kaggle_version
    _record_kaggle(h, version, folder)
    return folder, {"version": version}


def _kaggle_records() -> tuple[Path, dict]:
    """Where kagglehub put each version downloaded, and the latest version seen: {repo: {"3": folder, "latest": 3}}."""
    path = Path(os.environ.get("ZOO_CACHE") or "~/.cache/keras-zoo").expanduser() / "kaggle.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or a write cut short: the downloads themselves are still cached
        records = {}
    return path, records if isinstance(records, dict) else {}


def _record_kaggle(h: Handle, version: int | None, folder: Path) -> None:
    path, records = _kaggle_records()
    entry = records.setdefault(h.repo, {})
    entry[str(version)] = str(folder)
    if h.kaggle_version is None:
        entry["latest"] = version
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(records, indent=1))
    except OSError:  # a read-only home: the download itself worked
        pass


def _kaggle_from_record(h: Handle) -> tuple[Path, dict]:
    """The recorded folder of the version asked for, or of the latest version downloaded, if it is still there."""
    entry = _kaggle_records()[1].get(h.repo)
    entry = entry if isinstance(entry, dict) else {}
    version = h.kaggle_version or entry.get("latest")
    folder = entry.get(str(version))
    if folder and (Path(folder) / "config.json").is_file():
        return Path(folder), {"version": version}
    raise HubError(f"kaggle://{h.repo}" + (f"/{h.kaggle_version}" if h.kaggle_version else "") +
                   " is not in the local cache and downloads are off (offline, or Kaggle cannot be reached)")


def cached_folder(preset: str) -> Path | None:
    """The local folder of a preset or handle if it is already here, without any network call."""
    try:
        if _is_path(preset):
            return Path(preset) if Path(preset).is_dir() else None
        if "://" in preset:
            h = parse(preset)
            return (_download_hf(h, cache_only=True) if h.scheme == "hf" else _kaggle_from_record(h))[0]
        card = presets.get(preset)
        if card.folder is not None:
            return card.folder
        for source in card.sources:
            found = cached_folder(source)
            if found:
                return found
    except (HubError, HandleError):
        return None
    return None
