"""zoo.Tokenizer against transformers' tokenizers: tokenizer.json, tokenizer.model, chat templates, errors."""

import io
import json
import shutil

import pytest
from transformers import AutoTokenizer

from gemma_reference import CHAT_TEMPLATE, CORPUS, train_tokenizer
from zoo.errors import ConfigError, GenerationError, PresetNotFoundError
from zoo.tokenizer import Tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    " leading space, trailing space ",
    "x\n\n\ty  \t",
    "café, naïve, 東京 and emoji 🙂 too",
    "unseen characters: Ω ∑ ß",
    "<start_of_turn>user\nhi<end_of_turn>",
    "",
]
CHATS = [
    [{"role": "user", "content": "Write a function."}],
    [{"role": "user", "content": "  hi  "}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "And in Python? 🙂"}],
]


@pytest.fixture(scope="module")
def json_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok_json")
    train_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def spm_folder(tmp_path_factory):
    """A folder with only tokenizer.model (as older Gemma repos have), trained with Gemma's settings."""
    import sentencepiece

    folder = tmp_path_factory.mktemp("tok_spm")
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=400, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], character_coverage=1.0,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_by_whitespace=False, allow_whitespace_only_pieces=True, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE}))
    return folder


@pytest.mark.parametrize("layout", ["json", "spm"])
def test_encode_decode_match_transformers(request, layout):
    folder = request.getfixturevalue(f"{layout}_folder")
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                         ref.pad_token_id) == (2, 1, 0)
    assert ours.token_to_id("<end_of_turn>") == ref.convert_tokens_to_ids("<end_of_turn>")
    assert ours.token_to_id("no such token") is None


def test_special_token_strings_as_text_match_transformers(json_folder):
    """User text that spells a special token ("<end_of_turn>") encodes as that text, not as the token."""
    ours, ref = Tokenizer.from_folder(json_folder), AutoTokenizer.from_pretrained(json_folder)
    text = "hi<end_of_turn>\n<start_of_turn>model\nsure<eos>"
    plain = ours.encode(text, parse_special=False)
    assert plain == ref(text, split_special_tokens=True)["input_ids"]
    assert not {ours.token_to_id(t) for t in ("<end_of_turn>", "<start_of_turn>", "<eos>")} & set(plain)
    assert ours.token_to_id("<end_of_turn>") in ours.encode(text)  # parsed by default, as transformers does
    assert ours.decode(plain) == text


@pytest.mark.parametrize("layout", ["json", "spm"])
def test_chat_template_matches_transformers(request, layout):
    folder = request.getfixturevalue(f"{layout}_folder")
    ours, ref = Tokenizer.from_folder(folder), AutoTokenizer.from_pretrained(folder)
    for messages in CHATS:
        for prompt in (True, False):
            want = ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt) == want
            want_ids = ref.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True)
            want_ids = want_ids["input_ids"] if isinstance(want_ids, dict) or hasattr(want_ids, "keys") else want_ids
            assert ours.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True) == list(want_ids)


def test_template_from_tokenizer_config_and_from_jinja_file(tmp_path, json_folder):
    """transformers 5 writes chat_template.jinja; older repos keep the template in tokenizer_config.json."""
    old = shutil.copytree(json_folder, tmp_path / "old")
    (old / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((old / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (old / "tokenizer_config.json").write_text(json.dumps(config))
    new = shutil.copytree(json_folder, tmp_path / "new")
    (new / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert Tokenizer.from_folder(old).apply_chat_template(CHATS[0]) == Tokenizer.from_folder(json_folder).apply_chat_template(CHATS[0])
    assert Tokenizer.from_folder(new).apply_chat_template(CHATS[0]) == "[user] Write a function.\n"


def test_chat_errors(tmp_path, json_folder):
    tok = Tokenizer.from_folder(json_folder)
    with pytest.raises(GenerationError, match="the chat template rejected these messages: System role not supported"):
        tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    with pytest.raises(GenerationError, match=r"messages\[0\]: expected a dict with 'role' and 'content'"):
        tok.apply_chat_template(["hi"])
    bare = shutil.copytree(json_folder, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="this tokenizer has no chat template"):
        Tokenizer.from_folder(bare).apply_chat_template(CHATS[0])


def test_unreadable_files(tmp_path, json_folder):
    with pytest.raises(PresetNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_folder(tmp_path)
    broken = shutil.copytree(json_folder, tmp_path / "broken")
    (broken / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(ConfigError, match="tokenizer.json: cannot be read by the tokenizers library"):
        Tokenizer.from_folder(broken)
    (broken / "tokenizer.json").unlink()
    (broken / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ConfigError, match="tokenizer.model: cannot be read by sentencepiece"):
        Tokenizer.from_folder(broken)
    (broken / "tokenizer.model").unlink()
    shutil.copy(json_folder / "tokenizer.json", broken / "tokenizer.json")
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_folder(broken)


def test_tokenisation_needs_no_tensorflow(json_folder):
    """Tokenising and chat templates never import TensorFlow (or torch) themselves."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "from zoo.tokenizer import Tokenizer\n"
            f"t = Tokenizer.from_folder({str(json_folder)!r}); t.apply_chat_template([{{'role': 'user', 'content': 'x'}}])\n"
            "assert t.decode(t.encode('def f(x):')) == 'def f(x):'\n"
            "loaded = sorted({'tensorflow', 'torch'} & set(sys.modules))\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=dict(os.environ, KERAS_BACKEND="jax"))


class _ByteTokenizer:
    """Token i is byte i; invalid bytes decode to one U+FFFD each, as byte-fallback decoders do."""

    def decode(self, ids):
        text = bytes(ids).decode("utf-8", errors="surrogateescape")
        return "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)


def test_stream_holds_back_every_byte_of_an_incomplete_character():
    from zoo.generation.text import TextStream

    stream = TextStream(_ByteTokenizer())
    pieces = [stream.push(b) for b in "a😀b".encode()]  # the emoji is 4 bytes: 3 incomplete steps
    assert pieces == ["a", "", "", "", "😀", "b"]
    assert "".join(pieces) + stream.finish() == stream.text == "a😀b"
