"""Instruction and text data for fine-tuning a causal LM: read, tokenise, mask, pack.

Three shapes of example, as users bring them (TRL's dataset formats):
- `{"text": ...}`: every token carries loss;
- `{"prompt": ..., "completion": ...}`: the completion's tokens (and the EOS after it) only;
- `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the tokenizer's chat template;
  the assistant turns only, each with what the template writes after it (its end-of-turn marker).

An example is a row of token ids and a weight per token (1: the model is trained to predict this
token; 0: it is context). A row holds `max_length + 1` tokens: the model reads the first
`max_length` and predicts the last `max_length`, as keras-hub's causal LM preprocessors do.
Longer examples are truncated (and counted). With packing, examples share rows (best fit, longest
first) and `segment_ids` keep each one attending to itself, its positions counted from 0.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zoo.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")
SHAPES = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "messages": ("messages",)}


@dataclass
class Tokenized:
    """Examples as ragged token ids and weights (weight 1: the token carries loss)."""

    ids: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    cut: list[bool] = field(default_factory=list)  # truncated to fit
    shape: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def truncated(self) -> int:
        return sum(self.cut)

    def take(self, indices) -> "Tokenized":
        return Tokenized(*([part[i] for i in indices] for part in (self.ids, self.weights, self.cut)), self.shape)


@dataclass
class TextData:
    """Rows ready for Keras `fit`: `x` (a dict of `token_ids` and `segment_ids`, (n, max_length)), `y` the next
    tokens (n, max_length) and `sample_weight` (n, max_length), 1 where a token carries loss."""

    x: dict
    y: np.ndarray
    sample_weight: np.ndarray
    examples: int
    truncated: int
    shape: str

    def __len__(self) -> int:
        return len(self.y)

    @property
    def tokens(self) -> int:
        """Input tokens that are not padding."""
        return int((self.x["segment_ids"] > 0).sum())

    @property
    def loss_tokens(self) -> int:
        return int(self.sample_weight.sum())

    def take(self, rows) -> "TextData":
        rows = np.asarray(rows)
        x = {k: v[rows] for k, v in self.x.items()}
        return TextData(x, self.y[rows], self.sample_weight[rows], self.examples, self.truncated, self.shape)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Examples from a JSONL file (one JSON object per line; blank lines skipped). Errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    examples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name}, line {number}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(example, dict):
                raise DataError(f"{path.name}, line {number}: expected a JSON object, got {type(example).__name__}")
            examples.append(example)
    if not examples:
        raise DataError(f"{path.name}: no examples (the file is empty)")
    return examples


def examples_from(data, where: str = "data") -> tuple[list[dict], str]:
    """A JSONL path or a list of dicts -> (examples, a name for errors)."""
    if isinstance(data, (str, os.PathLike)):
        return read_jsonl(data), Path(data).name
    if isinstance(data, (list, tuple)):
        if not data:
            raise DataError(f"{where}: no examples (the list is empty)")
        return list(data), where
    raise DataError(f"{where}: expected a JSONL file path or a list of dicts, got {type(data).__name__}")


def shape_of(example: dict, where: str) -> str:
    """Which of the three shapes an example has; an error names the fields it has and the ones expected."""
    if not isinstance(example, dict):
        raise DataError(f"{where}: expected a dict, got {type(example).__name__}")
    for shape, fields in SHAPES.items():
        if all(f in example for f in fields):
            return shape
    expected = " or ".join("{" + ", ".join(f'"{f}"' for f in fields) + "}" for fields in SHAPES.values())
    raise DataError(f"{where}: expected the fields {expected}; got {sorted(example)}")


def tokenize(examples: list[dict], tokenizer, max_length: int, source: str = "data") -> Tokenized:
    """Each example -> ids and weights of at most `max_length + 1` tokens (longer ones truncated, counted)."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise ConfigError(f"max_length: expected an int of at least 2, got {max_length!r}")
    out = Tokenized()
    for i, example in enumerate(examples):
        where = f"{source}, line {i + 1}" if source.endswith(".jsonl") else f"{source}[{i}]"
        shape = shape_of(example, where)
        if out.shape and shape != out.shape:
            raise DataError(f"{where}: a {shape!r} example among {out.shape!r} ones; one dataset has one shape")
        out.shape = shape
        pieces = _PIECES[shape](example, tokenizer, where)  # [(text, carries loss)], special tokens in the text
        ids, weights = [], []
        for text, loss in pieces:
            piece = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else text
            ids += piece
            weights += [int(loss)] * len(piece)
        if not any(weights):
            raise DataError(f"{where}: nothing to learn (no completion or assistant tokens)")
        out.cut.append(len(ids) > max_length + 1)
        ids, weights = ids[: max_length + 1], weights[: max_length + 1]
        out.ids.append(np.asarray(ids, np.int32))
        out.weights.append(np.asarray(weights, np.float32))
    return out


def _text(field_value, where: str, name: str) -> str:
    if not isinstance(field_value, str):
        raise DataError(f"{where}: {name!r} must be a string, got {type(field_value).__name__}")
    return field_value


def _bos(tokenizer) -> list:
    bos = tokenizer.bos_token_id
    return [([bos], False)] if bos is not None and tokenizer.config.get("add_bos_token", True) else []


def _eos(tokenizer, where: str) -> list:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token to end the example with")
    return [([tokenizer.eos_token_id], True)]


def _plain(example: dict, tokenizer, where: str) -> list:
    return [*_bos(tokenizer), (_text(example["text"], where, "text"), True), *_eos(tokenizer, where)]


def _prompt_completion(example: dict, tokenizer, where: str) -> list:
    prompt = _text(example["prompt"], where, "prompt")
    completion = _text(example["completion"], where, "completion")
    return [*_bos(tokenizer), (prompt, False), (completion, True), *_eos(tokenizer, where)]


def _messages(example: dict, tokenizer, where: str) -> list:
    """The chat template's text cut at each assistant turn: the template is rendered for the messages before a
    turn (with the generation prompt) and through it, and the difference is the turn as the template writes it."""
    messages = example["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} dicts")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(f"{where}: messages[{j}] must be a dict with a 'role' and a string 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: messages[{j}] has the role {m['role']!r}; expected one of {', '.join(ROLES)}")
    if not tokenizer.chat_template:
        raise DataError(f"{where}: a chat-shaped example ('messages'), but this tokenizer has no chat template; "
                        "use {'prompt', 'completion'} examples, or a tokenizer with a template")
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    pieces, done = [], 0
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:j], add_generation_prompt=True) if j else ""
        through = tokenizer.apply_chat_template(messages[: j + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise DataError(f"{where}: the chat template does not render the conversation turn by turn (each "
                            "prefix of the messages as a prefix of the text), so the assistant turns cannot be found")
        pieces += [(full[done:len(before)], False), (full[len(before):len(through)], True)]
        done = len(through)
    pieces.append((full[done:], False))
    return [(text, loss) for text, loss in pieces if text]


_PIECES = {"text": _plain, "prompt-completion": _prompt_completion, "messages": _messages}


def rows(tokenized: Tokenized, max_length: int, pad_id: int, packing: bool = False) -> TextData:
    """Ragged examples -> fixed rows of `max_length + 1` tokens (one example per row, or packed)."""
    if not len(tokenized):
        raise DataError("no examples to train on")
    width = max_length + 1
    groups = _pack(tokenized.ids, width) if packing else [[i] for i in range(len(tokenized))]
    ids = np.full((len(groups), width), pad_id, np.int32)
    weights = np.zeros((len(groups), width), np.float32)
    segments = np.zeros((len(groups), width), np.int32)
    for r, group in enumerate(groups):
        at = 0
        for s, i in enumerate(group, 1):
            n = len(tokenized.ids[i])
            ids[r, at:at + n], weights[r, at:at + n], segments[r, at:at + n] = tokenized.ids[i], tokenized.weights[i], s
            at += n
    # The label at position j is token j + 1; it carries loss if that token does and belongs to the same example.
    same = segments[:, 1:] == segments[:, :-1]
    x = {"token_ids": ids[:, :-1], "segment_ids": segments[:, :-1]}
    return TextData(x, ids[:, 1:], weights[:, 1:] * same, len(tokenized), tokenized.truncated, tokenized.shape)


def _pack(ids: list[np.ndarray], width: int) -> list[list[int]]:
    """Best-fit decreasing: longest examples first, each into the fullest row it fits (TRL's "bfd")."""
    order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
    groups, free = [], []
    for i in order:
        n = len(ids[i])
        fits = [r for r in range(len(groups)) if free[r] >= n]
        if fits:
            r = min(fits, key=lambda r: (free[r], r))
            groups[r].append(i)
            free[r] -= n
        else:
            groups.append([i])
            free.append(width - n)
    return groups


def split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded `fraction` of n held out (at least one when the fraction is > 0)."""
    if not 0 <= fraction < 1:
        raise ConfigError(f"validation_split: expected a fraction in [0, 1), got {fraction!r}")
    order = np.random.default_rng(seed).permutation(n)
    held = int(round(n * fraction)) if fraction else 0
    held = max(held, 1) if fraction else 0
    if held >= n:
        raise DataError(f"validation_split {fraction}: {n} example(s) leave none to train on")
    return np.sort(order[held:]), np.sort(order[:held])


def text_data(data, tokenizer, max_length: int = 512, packing: bool = False, validation=None,
              validation_split: float = 0.0, seed: int = 0) -> tuple[TextData, TextData | None]:
    """(train, validation) rows from a JSONL file or a list of example dicts (see the module docstring).

    `validation` is a second file or list; else `validation_split` holds out a seeded fraction of the
    examples (before packing, so no example is in both).
    """
    if tokenizer is None:
        raise ConfigError("the model has no tokenizer; text fine-tuning needs one to read the examples")
    examples, source = examples_from(data)
    tokenized = tokenize(examples, tokenizer, max_length, source)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if validation is not None:
        val_examples, val_source = examples_from(validation, "validation")
        val = tokenize(val_examples, tokenizer, max_length, val_source)
        if val.shape != tokenized.shape:
            raise DataError(f"{val_source}: {val.shape!r} examples, but the training data has {tokenized.shape!r} ones")
        return rows(tokenized, max_length, pad, packing), rows(val, max_length, pad, packing)
    if not validation_split:
        return rows(tokenized, max_length, pad, packing), None
    train_idx, val_idx = split(len(tokenized), validation_split, seed)
    return (rows(tokenized.take(train_idx), max_length, pad, packing),
            rows(tokenized.take(val_idx), max_length, pad, packing))
