"""Typed reads of config.json fields: a bad value is a ConfigError naming the field and what was expected.

Read unchecked, a string where a number belongs fails later, deep inside a layer or a backend
(`float("x")`, `hidden_size % 0`, a shape of strings), with a message that names neither the
file nor the field. Every field that shapes a model goes through here, before anything is built.
"""

import math

from zoo.errors import ConfigError
from zoo.host import WEIGHT_DTYPES

REQUIRED = object()  # the default of a field that must be present


class Fields:
    """One JSON object of a config (the file, or a part such as timm's `model_args`), read field by field.

    A field that is absent or null takes its default; without one it is an error.
    """

    def __init__(self, raw, where: str):
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(raw).__name__} {raw!r}")
        self.raw, self.where = raw, where

    def _value(self, key: str, default):
        value = self.raw.get(key)
        if value is None and default is REQUIRED:
            raise ConfigError(f"{self.where}: missing field {key!r}")
        return value

    def _bad(self, key: str, expected: str, value) -> ConfigError:
        return ConfigError(f"{self.where}: field {key!r} should be {expected}, got {value!r}")

    def integer(self, key: str, default=REQUIRED, minimum: int = 1):
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self._bad(key, "a positive int" if minimum == 1 else f"an int >= {minimum}", value)
        return value

    def number(self, key: str, default=REQUIRED, minimum: float | None = None, positive: bool = False):
        """A finite number, at least `minimum`, above zero if `positive`, as written (an int stays an int).

        transformers 5 checks a field's JSON type on reading (an int field rejects 16.0, a float
        field rejects 0), so a caller converts where the field is a float there.
        """
        value = self._value(key, default)
        if value is None:
            return default
        if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
                or (minimum is not None and value < minimum) or (positive and value <= 0)):
            bound = " above 0" if positive else f" >= {minimum}" if minimum is not None else ""
            raise self._bad(key, "a finite number" + bound, value)
        return value

    def flag(self, key: str, default=REQUIRED):
        return self._of_type(key, default, bool, "true or false")

    def text(self, key: str, default=REQUIRED):
        return self._of_type(key, default, str, "a string")

    def _of_type(self, key: str, default, kind: type, expected: str):
        value = self._value(key, default)
        if value is None:
            return default
        if not isinstance(value, kind):
            raise self._bad(key, expected, value)
        return value

    def numbers(self, key: str, default=REQUIRED, lengths: tuple[int, ...] | None = None) -> tuple[float, ...]:
        """A list of finite numbers (one number: a list of one) whose length is one of `lengths`."""
        value = self._value(key, default)
        if value is None:
            return default
        items = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if (not isinstance(items, (list, tuple)) or (lengths is not None and len(items) not in lengths)
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in items)):
            count = f" ({' or '.join(map(str, lengths))} of them)" if lengths else ""
            raise self._bad(key, f"a list of numbers{count}", value)
        return tuple(float(v) for v in items)

    def pair(self, key: str, default=REQUIRED) -> tuple[int, int]:
        """An int n (meaning (n, n)) or a list of two ints, each positive."""
        value = self._given(key, default)
        both = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
        return self._sizes(key, both, 2, "a positive int or a pair of positive ints", value)

    def sizes(self, key: str, default, length: int, expected: str) -> tuple[int, ...]:
        """A list of `length` positive ints; `expected` describes it in the error."""
        value = self._given(key, default)
        return self._sizes(key, value, length, expected, value)

    def _given(self, key: str, default):
        value = self._value(key, default)
        return default if value is None else value

    def _sizes(self, key: str, value, length: int, expected: str, shown) -> tuple[int, ...]:
        if (not isinstance(value, (list, tuple)) or len(value) != length
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
            raise self._bad(key, expected, shown)
        return tuple(value)

    def labels(self, key: str) -> tuple[str, ...]:
        """An id -> name object (`id2label`) as names in id order; its ids must be 0..n-1."""
        value = self._value(key, default=None)
        if not value:
            return ()
        if not isinstance(value, dict):
            raise self._bad(key, 'an object mapping ids to names ({"0": "cat", ...})', value)
        try:
            ids = {int(k): k for k in value}
        except (TypeError, ValueError):
            raise self._bad(key, "an object whose keys are integer ids", sorted(value)[:5]) from None
        if sorted(ids) != list(range(len(ids))):
            raise self._bad(key, f"ids 0..{len(ids) - 1}, one per output", sorted(ids)[:10])
        return tuple(str(value[ids[i]]) for i in range(len(ids)))


def checkpoint_dtype(raw: dict, where: str) -> str:
    """The dtype config.json gives its weights: transformers 5 writes `dtype`, older Hub configs `torch_dtype`."""
    value = raw.get("dtype", raw.get("torch_dtype")) or "float32"
    if value not in WEIGHT_DTYPES:
        raise ConfigError(f"{where}: dtype {value!r} is not one of {', '.join(WEIGHT_DTYPES)}")
    return value
