"""Many LoRA adapters over one base model in one batch: what `zoo serve --lora` runs.

`AdapterBank(model, max_loras, max_rank)` holds up to `max_loras` adapters of rank up to `max_rank`.
Each linear module that a loaded adapter adapts gets a `zoo.layers.dense.Bank`: every adapter's
matrices for it, zero-padded to `max_rank`, one slot each (zeros for an adapter that leaves the
module alone). A batch row names its slot in the `adapters` argument of the model's entry points
(0: the base alone), and each projection adds that row's update, so requests for different
adapters and for the base share one batch and one compiled program.

Loading an adapter writes a free slot: the compiled steps read the banks as weights, so nothing is
compiled again unless the adapter adapts a module no loaded adapter did (a new bank: `version`
changes, and the generation engine makes its steps again). Banks are kept while the server runs:
what a batch costs depends on the modules adapted, not on which adapters a request names. A slot is
reused only once every request holding it has finished (`acquire`, `release`), so unloading an
adapter never changes an answer being generated; writes wait for the step in progress (`step_lock`,
which the engine holds around each step).

Example:
    >>> bank = AdapterBank(lm, max_loras=4, max_rank=16)  # doctest: +SKIP
    >>> bank.load("sql", "hf://someone/gemma-sql-lora")  # doctest: +SKIP
    >>> request = lm.engine(4, 256).submit(ids, 16, adapter="sql")  # doctest: +SKIP
"""

import logging
import threading

import keras
import numpy as np
from keras import ops

from zoo import backends, hub
from zoo.errors import AdapterError, DistributionError
from zoo.layers.dense import Bank
from zoo.lora import _NAME, _scope
from zoo.lora.peft_files import read_adapter
from zoo.lora.modules import modules

log = logging.getLogger("zoo.lora")
KEY = "_zoo_lora_bank"  # where the model keeps its bank (its own __dict__: it lives and dies with the model)


def of(model) -> "AdapterBank | None":
    """The model's bank of served adapters, if it has one."""
    return model.__dict__.get(KEY)


class AdapterBank:
    """Up to `max_loras` adapters of rank up to `max_rank`, served together over `model`."""

    def __init__(self, model, max_loras: int = 4, max_rank: int = 16):
        for name, value in (("max_loras", max_loras), ("max_rank", max_rank)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise AdapterError(f"{name} must be a positive int, got {value!r}")
        if of(model) is not None:
            raise AdapterError("this model serves adapters already (it has an AdapterBank)")
        if model.distribution is not None:
            raise DistributionError("served adapter banks run on one device: load the model without a distribution "
                                    "(zoo serve --ray spreads replicas over machines instead)")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        outputs = model._lora_output_modules() if hasattr(model, "_lora_output_modules") else set()
        self.adaptable = {m.name: m for m in modules(model) if m.name not in outputs}
        self.banked: list = []  # the modules with a bank, in the order they got one
        self.version = 0  # changes when a module gets a bank (the model's weights change)
        self.step_lock = threading.Lock()  # held around each generation step, and around each write of a slot
        self._lock = threading.Lock()  # the tables below
        self._slots: dict[str, int] = {}  # adapter name -> slot
        self._sources: dict[str, str] = {}
        self._users = [0] * (max_loras + 1)  # requests holding each slot (0: the base)
        self._free = list(range(1, max_loras + 1))
        self._draining: set[int] = set()  # unloaded slots whose requests have not all finished
        model.__dict__[KEY] = self

    # ------------------------------------------------------------------ adapters

    def names(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def source(self, name: str) -> str:
        """Where the adapter was loaded from, as its name on the hub or its folder's name (never a server path)."""
        return self._sources[name]

    def load(self, name: str, source) -> None:
        """Reads a PEFT adapter folder (a folder, `hf://...`, `kaggle://...`) into a free slot, as `name`."""
        if not (isinstance(name, str) and _NAME.fullmatch(name)):
            raise AdapterError(f"adapter name: expected letters, digits, '_' or '-', got {name!r}")
        with self._lock:
            self._check_new(name)
        read = read_adapter(self.model, source)  # reading and checking the files takes no lock
        if read.heads:
            raise AdapterError(f"adapter {name!r}: its modules_to_save ({', '.join(read.heads)}) replace whole "
                               "modules, which adapters sharing a batch cannot do; merge it into the base and "
                               "serve that model instead")
        outside = [m.name for m in read.targeted if m.name not in self.adaptable]
        if outside:
            raise AdapterError(f"adapter {name!r} adapts {outside[:4]}, which served adapters cannot (the model's "
                               "output layer); merge it into the base and serve that model instead")
        ranks = {read.values[m.name][2] for m in read.targeted}
        if max(ranks) > self.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {max(ranks)}; this server takes ranks up to "
                               f"{self.max_rank} (--max-lora-rank)")
        with self._lock:
            self._check_new(name)
            if not self._free:
                raise AdapterError(f"cannot load adapter {name!r}: {self.max_loras} adapters are loaded, the most "
                                   f"this server holds (--max-loras); unload one first")
            slot = self._free.pop(0)
        try:
            with self.step_lock:
                self._add_banks([self.adaptable[m.name] for m in read.targeted])
                self._write(slot, read)
        except BaseException:
            with self._lock:
                self._free.insert(0, slot)
            raise
        with self._lock:
            self._slots[name] = slot
            self._sources[name] = source if isinstance(source, str) and "://" in source else hub.short_name(source)

    def unload(self, name: str) -> None:
        """Removes the adapter: new requests cannot name it; those holding it finish with it."""
        with self._lock:
            if name not in self._slots:
                raise AdapterError(f"no adapter named {name!r}; loaded: {sorted(self._slots) or 'none'}")
            slot = self._slots.pop(name)
            self._sources.pop(name, None)
            if self._users[slot]:
                self._draining.add(slot)
            else:
                self._free.append(slot)

    # ------------------------------------------------------------------ requests

    def acquire(self, name: str | None) -> int:
        """The slot of adapter `name` (0: None, the base), held until `release`."""
        if name is None:
            return 0
        with self._lock:
            if name not in self._slots:
                raise AdapterError(f"no adapter named {name!r}; loaded: {sorted(self._slots) or 'none'}")
            slot = self._slots[name]
            self._users[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        if not slot:
            return
        with self._lock:
            self._users[slot] -= 1
            if not self._users[slot] and slot in self._draining:
                self._draining.discard(slot)
                self._free.append(slot)

    # ------------------------------------------------------------------ internals

    def _check_new(self, name: str) -> None:
        if name in self._slots:
            raise AdapterError(f"an adapter named {name!r} is loaded already; unload it first")

    def _add_banks(self, wanted: list) -> None:
        """A bank (zeros in every slot) on each module in `wanted` that has none."""
        have = {m.name for m in self.banked}
        new = [m for m in wanted if m.name not in have]
        if not new:
            return
        s, r = self.max_loras, self.max_rank
        for module in new:
            for layer, out in zip(module.layers, module.out_sizes):
                with _scope(self.model, layer, "served"):
                    layer.adapters.bank = Bank(_zeros((s, r, module.in_size), "lora_A"), _zeros((out, s * r), "lora_B"),
                                               _zeros((s,), "scale"))
                backends.track_weights(layer, layer.adapters.bank.weights)
            self.banked.append(module)
        self.version += 1
        if self.version > 1:
            log.info("served adapters: %d more modules adapted (%s...); generation steps are compiled again",
                     len(new), new[0].name)

    def _write(self, slot: int, read) -> None:
        """Every bank's slot `slot`: the adapter's matrices zero-padded to the bank's rank, or zeros where it
        does not adapt the module."""
        targeted = {m.name: m for m in read.targeted}
        r = self.max_rank
        for module in self.banked:
            found = targeted.get(module.name)
            a, b, rank = read.values[found.name] if found is not None else (None, None, 0)
            scale = read.scale(found) if found is not None else 0.0
            start = 0
            for layer, out in zip(module.layers, module.out_sizes):
                bank = layer.adapters.bank
                lora_a = np.zeros((r, module.in_size), np.float32)
                lora_b = ops.convert_to_numpy(bank.lora_B.value).copy()  # (out, S*R)
                lora_b[:, (slot - 1) * r: slot * r] = 0.0
                if found is not None:
                    lora_a[:rank] = a
                    lora_b[:, (slot - 1) * r: (slot - 1) * r + rank] = b[start:start + out]
                start += out
                _set_slot(bank.lora_A, slot - 1, lora_a)
                bank.lora_B.assign(lora_b)
                _set_slot(bank.scale, slot - 1, np.float32(scale))


def _zeros(shape: tuple, name: str) -> keras.Variable:
    return keras.Variable(np.zeros(shape, np.float32), dtype="float32", trainable=False, name=name)


def _set_slot(variable: keras.Variable, slot: int, value: np.ndarray) -> None:
    value = ops.convert_to_tensor(np.asarray(value, np.float32)[None])
    variable.assign(ops.slice_update(variable.value, (slot,) + (0,) * (len(variable.shape) - 1), value))
