"""Text <-> token ids for a checkpoint folder, and its chat template.

`tokenizer.json` is read with Hugging Face `tokenizers`; a folder with only `tokenizer.model` is
read with `sentencepiece`. Special tokens come from `tokenizer_config.json` (and
`special_tokens_map.json`). The chat template comes from `chat_template.jinja` (transformers 5)
or `tokenizer_config.json` (older), and is rendered the way transformers renders it: a
sandboxed Jinja environment with trim_blocks/lstrip_blocks, loop controls, `raise_exception`,
`strftime_now` and a non-escaping `tojson`, given the special tokens as variables.
"""

import datetime
import json
import re
import shutil
from functools import cached_property
from pathlib import Path

from zoo.errors import ConfigError, GenerationError, PresetNotFoundError
from zoo.files import read_json

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _content(token) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _checked(config: dict, file: str) -> dict:
    """A tokenizer config's special tokens (strings, or objects with a 'content' string) and chat template
    (a string, or a list of {"name", "template"} strings), checked before anything uses them."""
    for name in SPECIAL_NAMES:
        if config.get(name) is not None and not isinstance(_content(config[name]), str):
            raise ConfigError(f"{file}: field {name!r} should be a token (a string, or an object with a 'content' "
                              f"string), got {config[name]!r:.100}")
    template = config.get("chat_template")
    named = isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in template)
    if template is not None and not (isinstance(template, str) or named):
        raise ConfigError(f"{file}: field 'chat_template' should be a template or a list of "
                          f"{{\"name\", \"template\"}} objects, got {template!r:.100}")
    return config


class Tokenizer:
    """A checkpoint's tokenizer.

    Example:
        >>> tok = Tokenizer.from_folder("path/to/gemma")  # doctest: +SKIP
        >>> tok.decode(tok.encode("def f(x):"))  # doctest: +SKIP
        'def f(x):'
    """

    def __init__(self, folder: Path, config: dict, chat_template: str | dict | None):
        self.folder = folder
        self.config = config
        self.chat_template = chat_template
        self.special_tokens = {name: _content(config.get(name)) for name in SPECIAL_NAMES if config.get(name)}
        if (folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            except Exception as e:  # tokenizers raises a bare Exception on malformed files
                raise ConfigError(f"{folder / 'tokenizer.json'}: cannot be read by the tokenizers library: {e}") from e
            self._sp = None
        else:
            import sentencepiece

            self._hf = None
            self._sp = sentencepiece.SentencePieceProcessor()
            try:
                self._sp.Load(str(folder / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise ConfigError(f"{folder / 'tokenizer.model'}: cannot be read by sentencepiece: {e}") from e

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        folder = Path(folder)
        if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
            raise PresetNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            if (folder / name).is_file():
                config.update(_checked(read_json(folder / name), name))
        template = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            template = {t["name"]: t["template"] for t in template}
        return cls(folder, config, template)

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True) if self._hf else self._sp.GetPieceSize()

    def token_to_id(self, token: str) -> int | None:
        if self._hf:
            return self._hf.token_to_id(token)
        piece = self._sp.PieceToId(token)
        return piece if self._sp.IdToPiece(piece) == token else None

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return self.token_to_id(token) if token else None

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token") if self._hf else (self._sp.bos_id() if self._sp.bos_id() >= 0 else None)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token") if self._hf else (self._sp.eos_id() if self._sp.eos_id() >= 0 else None)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of every special or added-special token (skipped when decoding)."""
        if self._hf:
            added = self._hf.get_added_tokens_decoder()
            return frozenset(i for i, t in added.items() if t.special)
        return frozenset(i for i in range(self.vocab_size) if self._sp.IsControl(i) or self._sp.IsUnknown(i))

    # ------------------------------------------------------------------ text <-> ids

    def encode(self, text: str, add_special_tokens: bool = True, parse_special: bool = True) -> list[int]:
        """Text -> token ids; BOS/EOS added as the tokenizer's config says when `add_special_tokens`.

        A special token's string in the text ("<start_of_turn>") becomes that token; with
        `parse_special=False` it is encoded as the plain text it is, as for text a user typed
        (transformers' `split_special_tokens=True`).
        """
        if self._hf:
            return (self._hf if parse_special else self._hf_plain).encode(text, add_special_tokens=add_special_tokens).ids
        ids = []
        split = self._sp_split if parse_special else None
        for i, part in enumerate(split.split(text) if split else [text]):
            if i % 2:  # a special token written in the text (a chat template's <bos>, say)
                ids.append(self._sp.PieceToId(part))
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        if add_special_tokens and self.config.get("add_bos_token", True) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        if add_special_tokens and self.config.get("add_eos_token", False) and self.eos_token_id is not None:
            ids = [*ids, self.eos_token_id]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._hf:
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            return self._sp.DecodeIds([i for i in ids if i not in self.special_ids])
        # sentencepiece drops control tokens when decoding; transformers writes them out.
        out, run = [], []
        for i in ids + [None]:
            if i is None or i in self.special_ids:
                out.append(self._sp.DecodeIds(run) if run else "")
                run = []
                if i is not None:
                    out.append(self._sp.IdToPiece(i))
            else:
                run.append(i)
        return "".join(out)

    @cached_property
    def _hf_plain(self):
        """A copy of the tokenizer that reads special tokens' strings as text."""
        from tokenizers import Tokenizer as HFTokenizer

        plain = HFTokenizer.from_str(self._hf.to_str())
        plain.encode_special_tokens = True
        return plain

    @cached_property
    def _sp_split(self):
        """A pattern splitting text around the control tokens' strings (sentencepiece cannot encode them)."""
        pieces = sorted({self._sp.IdToPiece(i) for i in self.special_ids}, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, pieces)) + ")") if pieces else None

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tokenize: bool = False,
                            template: str | None = None, content_as_text: bool = False, **kwargs) -> str | list[int]:
        """Renders messages with the checkpoint's chat template, exactly as transformers does.

        Returns the text, or its token ids (tokenized without adding special tokens, since the
        template writes them) with `tokenize=True`. `content_as_text` encodes special tokens' strings
        inside the messages' contents as text, so a user cannot forge turn markers (a server's choice).
        """
        source = self.chat_template
        if isinstance(source, dict):
            source = source.get(template or "default")
        elif template:
            source = template
        if not source:
            raise ConfigError(f"{self.folder.name}: this tokenizer has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise GenerationError(f"messages[{i}]: expected a dict with 'role' and 'content', got {m!r}")
        text = self._render(source, messages, add_generation_prompt, kwargs)
        if not tokenize:
            return text
        if content_as_text and any(isinstance(m["content"], str) and self._holds_special(m["content"]) for m in messages):
            return self._encode_content_as_text(source, messages, text, add_generation_prompt, kwargs)
        return self.encode(text, add_special_tokens=False)

    def _render(self, source: str, messages: list, add_generation_prompt: bool, kwargs: dict) -> str:
        import jinja2

        try:
            return _compile(source).render(messages=messages, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs)
        except jinja2.TemplateError as e:  # the template's own raise_exception(), or a broken template
            raise GenerationError(f"{self.folder.name}: the chat template rejected these messages: {e}") from e

    @cached_property
    def _special_strings(self) -> tuple[str, ...]:
        if self._hf:
            return tuple(t.content for t in self._hf.get_added_tokens_decoder().values() if t.special)
        return tuple(self._sp.IdToPiece(i) for i in self.special_ids)

    def _holds_special(self, text: str) -> bool:
        return any(s in text for s in self._special_strings)

    def _encode_content_as_text(self, source, messages, text, add_generation_prompt, kwargs) -> list[int]:
        """The template's own text with its special tokens, each content encoded as plain text.

        The template is rendered again with a placeholder for each content; the real rendering is then
        read piece by piece: a literal of the template, a content as written (or trimmed, as templates do).
        """
        marks = [dict(m, content=f"\ue000{i}\ue001") if isinstance(m["content"], str) else m
                 for i, m in enumerate(messages)]
        parts = re.split("\ue000(\\d+)\ue001", self._render(source, marks, add_generation_prompt, kwargs))
        ids, pos = [], 0
        for k, part in enumerate(parts):
            if k % 2 == 0:  # the template's text
                if not text.startswith(part, pos):
                    break
                ids += self.encode(part, add_special_tokens=False)
                pos += len(part)
                continue
            content = messages[int(part)]["content"]
            written = next((c for c in (content, content.strip(), content.lstrip(), content.rstrip())
                            if text.startswith(c, pos)), None)
            if written is None:
                break
            ids += self.encode(written, add_special_tokens=False, parse_special=False)
            pos += len(written)
        else:
            if pos == len(text):
                return ids
        found = sorted({s for s in self._special_strings for m in messages
                        if isinstance(m["content"], str) and s in m["content"]})
        raise GenerationError(f"{self.folder.name}: a message holds special tokens' text ({', '.join(found)}) and the "
                              "chat template changes contents in a way that cannot keep it as text")

    def save(self, folder: str | Path) -> None:
        """Copies the tokenizer's files into `folder`."""
        folder = Path(folder)
        for name in TOKENIZER_FILES:
            if (self.folder / name).is_file() and (self.folder / name).resolve() != (folder / name).resolve():
                shutil.copyfile(self.folder / name, folder / name)


_TEMPLATES: dict[str, object] = {}


def _compile(source: str):
    if source not in _TEMPLATES:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _TEMPLATES[source] = env.from_string(source)
    return _TEMPLATES[source]
