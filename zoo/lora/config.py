"""An adapter's settings: the part of PEFT's `LoraConfig` keras-zoo runs, read from and written to
`adapter_config.json`, and PEFT's rules for which modules an adapter targets and with what rank."""

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass

from zoo.errors import AdapterError

ALL_LINEAR = "all-linear"
# LoraConfig fields that change the maths in ways keras-zoo does not implement: a set value is refused.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "lora_bias": "a bias on lora_B", "use_qalora": "QALoRA",
    "layer_replication": "layer replication", "target_parameters": "LoRA on parameters",
    "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "BD-LoRA", "lora_ga_config": "LoRA-GA",
}


@dataclass(frozen=True)
class Settings:
    """One adapter's settings, in PEFT's terms (`r`, `lora_alpha`, ...), validated."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict = dataclasses.field(default_factory=dict)
    alpha_pattern: dict = dataclasses.field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    modules_to_save: tuple[str, ...] = ()

    def __post_init__(self):
        _check(_is_int(self.r) and self.r > 0, "r", "a positive int (the rank)", self.r)
        _check(isinstance(self.lora_alpha, numbers.Real) and not isinstance(self.lora_alpha, bool)
               and math.isfinite(self.lora_alpha), "lora_alpha", "a number", self.lora_alpha)
        _check(isinstance(self.lora_dropout, numbers.Real) and 0 <= self.lora_dropout < 1, "lora_dropout",
               "a number in [0, 1)", self.lora_dropout)
        _check(isinstance(self.use_rslora, bool), "use_rslora", "true or false", self.use_rslora)
        _check(_names(self.target_modules) or isinstance(self.target_modules, str), "target_modules",
               "a list of module names or a regular expression", self.target_modules)
        for field, check, what in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive ints"),
                                   ("alpha_pattern", lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
                                    "numbers")):
            value = getattr(self, field)
            _check(isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items()), field,
                   f"an object of module-name patterns to {what}", value)
        _check(self.layers_to_transform is None or (_is_tuple_of(self.layers_to_transform, _is_int)),
               "layers_to_transform", "a list of layer indices", self.layers_to_transform)
        _check(self.layers_pattern is None or _names(self.layers_pattern), "layers_pattern", "a list of names",
               self.layers_pattern)
        _check(self.exclude_modules is None or isinstance(self.exclude_modules, str) or _names(self.exclude_modules),
               "exclude_modules", "a list of module names or a regular expression", self.exclude_modules)
        _check(_names(self.modules_to_save), "modules_to_save", "a list of module names", self.modules_to_save)

    # PEFT's rules (peft.tuners.tuners_utils.check_target_module_exists, peft.utils.other.get_pattern_key).
    def targets(self, names: tuple[str, ...], index: int | None) -> bool:
        """Whether a module known by `names` (its spellings) gets this adapter."""
        if any(_in(self.exclude_modules, n) for n in names if self.exclude_modules):
            return False
        if any(re.match(rf"(^|.*\.){m}($|\..*)", n) for n in names for m in self.modules_to_save):
            return False
        if isinstance(self.target_modules, str):
            return any(re.fullmatch(self.target_modules, n) for n in names)
        if not any(_in(self.target_modules, n) for n in names):
            return False
        if self.layers_to_transform is None:
            return True
        if self.layers_pattern:  # the index must follow one of these names
            found = [m for n in names for p in self.layers_pattern if (m := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", n))]
            if not found:
                return False
            index = int(found[0].group(1))
        return index in self.layers_to_transform

    def rank(self, name: str) -> int:
        return self.rank_pattern[key] if (key := _pattern_key(self.rank_pattern, name)) else self.r

    def scale(self, name: str) -> float:
        alpha = self.alpha_pattern[key] if (key := _pattern_key(self.alpha_pattern, name)) else self.lora_alpha
        rank = self.rank(name)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    @classmethod
    def from_peft(cls, config: dict, where: str) -> "Settings":
        """An `adapter_config.json` as read; `where` names it in errors."""
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise AdapterError(f"{where}: peft_type is {peft_type!r}; keras-zoo loads LoRA adapters (\"LORA\")")
        for field, what in _UNSUPPORTED.items():
            if config.get(field) not in (None, False, {}, []):
                raise AdapterError(f"{where}: {field} is {config[field]!r}; keras-zoo does not run {what}")
        if config.get("bias", "none") != "none":
            raise AdapterError(f"{where}: bias is {config['bias']!r}; keras-zoo loads adapters with bias \"none\"")
        if "r" not in config or "target_modules" not in config:
            raise AdapterError(f"{where}: expected the fields r and target_modules")
        try:
            return cls(
                r=config["r"], lora_alpha=config.get("lora_alpha", 8), target_modules=_tuple(config["target_modules"]),
                lora_dropout=config.get("lora_dropout", 0.0) or 0.0, use_rslora=config.get("use_rslora", False),
                rank_pattern=config.get("rank_pattern") or {}, alpha_pattern=config.get("alpha_pattern") or {},
                layers_to_transform=_tuple(config.get("layers_to_transform"), wrap_int=True),
                layers_pattern=_tuple(config.get("layers_pattern"), wrap_str=True),
                exclude_modules=_tuple(config.get("exclude_modules")),
                modules_to_save=_tuple(config.get("modules_to_save"), wrap_str=True) or (),
            )
        except AdapterError as e:
            raise AdapterError(f"{where}: {e}") from None

    def to_peft(self, task_type: str | None, base_model: str | None, revision: str | None) -> dict:
        """The adapter_config.json PEFT writes for these settings."""
        def listed(v):
            return list(v) if isinstance(v, tuple) else v

        return {
            "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model, "revision": revision,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "target_modules": listed(self.target_modules), "exclude_modules": listed(self.exclude_modules),
            "use_rslora": self.use_rslora, "bias": "none", "use_dora": False, "fan_in_fan_out": False,
            "modules_to_save": list(self.modules_to_save) or None, "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern), "layers_to_transform": listed(self.layers_to_transform),
            "layers_pattern": listed(self.layers_pattern), "init_lora_weights": True, "inference_mode": True,
        }


def _pattern_key(patterns: dict, name: str) -> str | None:
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", name)), None)


def _in(targets, name: str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return name in targets or any(name.endswith("." + t) for t in targets)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_tuple_of(v, check) -> bool:
    return isinstance(v, tuple) and all(check(x) for x in v)


def _names(v) -> bool:
    return _is_tuple_of(v, lambda x: isinstance(x, str) and x != "")


def _tuple(v, wrap_int=False, wrap_str=False):
    """JSON lists (and sets, as PEFT's config holds them in memory) -> sorted-as-given tuples."""
    if (wrap_int and _is_int(v)) or (wrap_str and isinstance(v, str)):
        return (v,)
    return tuple(v) if isinstance(v, (list, tuple, set, frozenset)) else v


def _check(ok: bool, field: str, expected: str, got) -> None:
    if not ok:
        raise AdapterError(f"{field}: expected {expected}, got {got!r}")
