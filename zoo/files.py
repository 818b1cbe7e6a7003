"""Reading the JSON files of a model folder, with the package's typed errors. A ground module."""

import json
from pathlib import Path

from zoo.errors import ConfigError


def read_json(path: Path, expected: type = dict, error: type[Exception] = ConfigError, holding: str = ""):
    """The parsed file, which must be a JSON `expected` (an object by default), else `error` naming the file
    (and what it should hold, if given).

    A file nested too deep for Python's parser (`RecursionError`) is malformed like any other.
    """
    try:
        value = json.loads(Path(path).read_bytes())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else e
        raise error(f"{path}: not valid JSON{f' (expected {holding})' if holding else ''}: {reason}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read: {e.strerror or e}") from None
    if not isinstance(value, expected):
        kind = {dict: "object", list: "list"}.get(expected, expected.__name__)
        raise error(f"{path}: expected a JSON {kind}, got {type(value).__name__}")
    return value


def write_json(path: Path, value) -> None:
    """Writes `value` as indented JSON, as transformers writes its files."""
    Path(path).write_text(json.dumps(value, indent=2) + "\n")
