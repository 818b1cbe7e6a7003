"""LoRA adapters over the served generation models: `--lora` at start-up, vLLM's load and unload routes.

Each generation model gets a `zoo.lora.bank.AdapterBank` when LoRA is enabled; an adapter is served
over one of them (its base: the one generation model, else the one its folder names, else the one
the client names), in the same continuous batch as the base's requests.
"""

import asyncio
import json
import logging
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from zoo import hub, loader
from zoo.errors import AdapterError, ConfigError, ZooError
from zoo.lora.bank import AdapterBank
from zoo.serving.protocol import APIError, field

log = logging.getLogger("zoo.serving")


@dataclass(frozen=True)
class Lora:
    """An adapter to serve: its name, source (folder or handle) and base model (None: the one generation
    model, or the base the adapter names)."""

    name: str
    source: str
    base: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Lora":
        """`NAME=PATH_OR_HANDLE`, or vLLM's JSON `{"name": ..., "path": ..., "base_model_name": ...}`."""
        if text.lstrip().startswith("{"):
            try:
                given = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"--lora-modules {text!r}: not valid JSON ({e})") from None
            if not (isinstance(given, dict) and isinstance(given.get("name"), str)
                    and isinstance(given.get("path"), str)):
                raise ConfigError(f'--lora-modules {text!r}: expected {{"name": ..., "path": ...}}')
            return cls(given["name"], given["path"], given.get("base_model_name"))
        name, sep, source = text.partition("=")
        if not (sep and name and source):
            raise ConfigError(f"--lora {text!r}: expected NAME=PATH_OR_HANDLE (a PEFT adapter folder, hf://... or "
                              "kaggle://...)")
        return cls(name, source)


class ServedAdapters:
    """The adapters a server serves, by name, with the bank of the model each is served over."""

    def __init__(self, generators: dict, config, loras: list[Lora] = (), taken: set[str] = frozenset(),
                 read_body=None):
        self.generators, self.taken, self.read_body = generators, set(taken), read_body  # read_body: the server's
        self.banks: dict[str, AdapterBank] = {}
        self.bases: dict[str, str] = {}  # served adapter -> its base model's name
        if not (config.enable_lora or loras):
            return
        if not generators:
            raise ConfigError("LoRA adapters are served over a text generation model; none is served")
        if len(loras) > config.max_loras * len(generators):
            raise ConfigError(f"{len(loras)} adapters given, but --max-loras is {config.max_loras}")
        self.banks = {name: AdapterBank(s.lm, config.max_loras, config.max_lora_rank) for name, s in generators.items()}
        for lora in loras:
            self.load(lora)

    def source(self, name: str) -> str:
        return self.banks[self.bases[name]].source(name)

    def load(self, lora: Lora) -> str:
        """Loads an adapter over its base model (checked against it); returns the base's name."""
        if lora.name in self.taken or lora.name in self.bases:
            raise AdapterError(f"the name {lora.name!r} is taken by a served model; pick another name")
        base = lora.base or self._base_of(lora.source)
        if base not in self.banks:
            raise AdapterError(f"adapter {lora.name!r}: its base {base!r} is not a served text generation model "
                               f"({', '.join(sorted(self.banks))})")
        self.banks[base].load(lora.name, lora.source)
        self.bases[lora.name] = base
        log.info("adapter %s (%s) served over %s", lora.name, self.banks[base].source(lora.name), base)
        return base

    def unload(self, name: str) -> None:
        """Stops serving an adapter; requests running with it finish with it."""
        base = self.bases.pop(name)
        self.banks[base].unload(name)
        log.info("adapter %s unloaded from %s", name, base)

    def _base_of(self, source: str) -> str:
        """The served model an adapter applies to: the one generation model, else the one its folder names."""
        if len(self.banks) == 1:
            return next(iter(self.banks))
        try:
            named, _ = loader.adapter_base(hub.resolve(source, adapter=True))
        except ZooError:
            named = None
        handles = {name: (getattr(s.lm, "source", None) or {}).get("handle") for name, s in self.generators.items()}
        found = [name for name in self.banks if named and hub.short_name(named) == name] or [
            name for name, handle in handles.items() if named and handle == named]
        if len(found) != 1:
            raise AdapterError(f"adapter from {hub.short_name(source)}: name its base among the served models "
                               f"({', '.join(sorted(self.banks))}), e.g. --lora-modules "
                               '\'{"name": ..., "path": ..., "base_model_name": ...}\'')
        return found[0]

    # ------------------------------------------------------------------ vLLM's routes

    def check_enabled(self) -> None:
        if not self.banks:
            raise APIError(400, "this server serves no LoRA adapters; start it with --enable-lora (or --lora "
                                "NAME=PATH) to load them at run time", code="lora_disabled")

    async def load_route(self, request: Request):
        """vLLM's route: {"lora_name", "lora_path"} (and our "base_model_name" where several models are served)."""
        body = await self.read_body(request)
        self.check_enabled()
        name = field(body, "lora_name", str, required=True, message="the adapter's name")
        path = field(body, "lora_path", str, required=True, message="a folder or handle of a PEFT adapter")
        base = field(body, "base_model_name", str, message="the name of a served model")
        if name in self.bases:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded; unload it first",
                           param="lora_name", code="lora_exists")
        try:
            await asyncio.to_thread(self.load, Lora(name, path, base))
        except ZooError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")

    async def unload_route(self, request: Request):
        """vLLM's route: {"lora_name"}; requests running with the adapter finish with it."""
        body = await self.read_body(request)
        self.check_enabled()
        name = field(body, "lora_name", str, required=True, message="the adapter's name")
        if name not in self.bases:
            raise APIError(404, f"The lora adapter '{name}' cannot be found; loaded: "
                                f"{', '.join(sorted(self.bases)) or 'none'}", param="lora_name", code="lora_not_found")
        self.unload(name)
        return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")
