"""Fine-tuning data: which tokens carry loss for each shape (packed and not), image folders, and bad input."""

import json

import keras
import numpy as np
import pytest
from PIL import Image

import zoo
from zoo.errors import ConfigError, DataError
from zoo.finetune import image_folders as image_data, text_examples as text_data
from zoo.tokenizer import Tokenizer
from gemma_reference import train_tokenizer

CHAT = [
    {"messages": [{"role": "user", "content": "Add two numbers"}, {"role": "assistant", "content": "def add(a, b):"},
                  {"role": "user", "content": "Now print"}, {"role": "assistant", "content": " print(i) "}]},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "class Point:"}]},
]
PAIRS = [{"prompt": "def add(a, b):", "completion": "\n    return a + b"}, {"prompt": "for i", "completion": " in x"},
         {"prompt": "import numpy", "completion": " as np"}]
TEXTS = [{"text": "The quick brown fox"}, {"text": "x = 1"}, {"text": "print(i * i)"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small BPE tokenizer with Gemma's chat template (<start_of_turn>, <end_of_turn>)."""
    folder = tmp_path_factory.mktemp("finetune_tok")
    train_tokenizer(folder)
    return Tokenizer.from_folder(folder)


def weighted_runs(tok, data, row):
    """The label tokens of a row that carry loss, decoded run by run."""
    runs, run = [], []
    for label, weight in zip(data.y[row], data.sample_weight[row]):
        if weight:
            run.append(label)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    return runs + ([tok.decode(run, skip_special_tokens=False)] if run else [])


def test_text_examples_carry_loss_on_every_token_and_eos(tok):
    data, val = text_data.text_data(TEXTS, tok, max_length=48)
    assert val is None and data.shape == "text" and len(data) == 3
    for row, example in enumerate(TEXTS):
        assert weighted_runs(tok, data, row) == [example["text"] + "<eos>"]
        assert data.x["token_ids"][row, 0] == tok.bos_token_id  # the BOS is read, never predicted


def test_prompt_completion_carries_loss_on_the_completion_only(tok):
    data, _ = text_data.text_data(PAIRS, tok, max_length=48)
    for row, example in enumerate(PAIRS):
        assert weighted_runs(tok, data, row) == [example["completion"] + "<eos>"]
        n = len(tok.encode(example["prompt"], add_special_tokens=False))
        assert tok.decode(data.y[row, :n]) == example["prompt"] and not data.sample_weight[row, :n].any()
        # padding after the example: no loss, segment 0
        length = int((data.x["segment_ids"][row] > 0).sum())
        assert not data.sample_weight[row, length:].any() and (data.x["token_ids"][row, length:] == tok.pad_token_id).all()


def test_messages_carry_loss_on_assistant_turns_and_their_end_of_turn(tok):
    data, _ = text_data.text_data(CHAT, tok, max_length=160)
    assert data.shape == "messages"
    # The template trims contents and writes <end_of_turn>\n after each turn; the user turns and the
    # "<start_of_turn>model\n" before each reply are context.
    assert weighted_runs(tok, data, 0) == ["def add(a, b):<end_of_turn>\n", "print(i)<end_of_turn>\n"]
    assert weighted_runs(tok, data, 1) == ["class Point:<end_of_turn>\n"]
    rendered = tok.apply_chat_template(CHAT[0]["messages"], add_generation_prompt=False)
    length = int((data.x["segment_ids"][0] > 0).sum())
    ids = np.concatenate([data.x["token_ids"][0, :1], data.y[0, :length - 1]])
    assert tok.decode(ids, skip_special_tokens=False) == rendered  # the pieces make the template's whole text


@pytest.mark.parametrize("examples", [TEXTS, PAIRS, CHAT], ids=["text", "prompt-completion", "messages"])
def test_packing_keeps_each_examples_loss_and_isolates_examples(tok, examples):
    plain, _ = text_data.text_data(examples, tok, max_length=160)
    packed, _ = text_data.text_data(examples, tok, max_length=160, packing=True)
    assert len(packed) < len(plain) and packed.loss_tokens == plain.loss_tokens and packed.tokens == plain.tokens
    seg_x, seg_y = packed.x["segment_ids"], np.concatenate([packed.x["segment_ids"][:, 1:],
                                                            np.zeros((len(packed), 1), np.int32)], axis=1)
    # A label carries loss only inside its example: the label after an example's last token (the next
    # example's BOS, or padding) carries none.
    assert not packed.sample_weight[seg_x != seg_y].any()
    got = sorted(run for row in range(len(packed)) for run in weighted_runs(tok, packed, row))
    want = sorted(run for row in range(len(plain)) for run in weighted_runs(tok, plain, row))
    assert got == want


def test_packed_examples_attend_only_to_themselves(tok):
    lm = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")
    packed, _ = text_data.text_data(PAIRS, lm.tokenizer, max_length=48, packing=True)
    assert packed.x["segment_ids"].max() == 3
    logits = keras.ops.convert_to_numpy(lm(packed.x))
    for s in (1, 2, 3):
        where = packed.x["segment_ids"][0] == s
        alone = keras.ops.convert_to_numpy(lm(packed.x["token_ids"][0][where][None]))[0]
        np.testing.assert_allclose(logits[0][where], alone, atol=1e-4)


def test_truncation_is_counted_and_validation_split_is_seeded(tok):
    long = [{"text": "word " * 40}] + TEXTS * 4
    data, _ = text_data.text_data(long, tok, max_length=8)
    assert data.truncated == 1 + 4 * sum(len(tok.encode(t["text"])) + 1 > 9 for t in TEXTS)
    assert data.x["token_ids"].shape == (len(long), 8)
    a_train, a_val = text_data.text_data(long, tok, max_length=8, validation_split=0.25, seed=3)
    b_train, b_val = text_data.text_data(long, tok, max_length=8, validation_split=0.25, seed=3)
    assert len(a_val) == 3 and len(a_train) == 10
    np.testing.assert_array_equal(a_val.x["token_ids"], b_val.x["token_ids"])
    _, c_val = text_data.text_data(long, tok, max_length=8, validation_split=0.25, seed=4)
    assert not np.array_equal(a_val.x["token_ids"], c_val.x["token_ids"])


# ----------------------------------------------------------------------------- bad text data


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines,message", [
    (['{"text": "a"}', '{"text": "b"', '{"text": "c"}'], "train.jsonl, line 2: not valid JSON"),
    (['{"text": "a"}', '["a list"]'], "train.jsonl, line 2: expected a JSON object, got list"),
    (['{"text": "a"}', '{"prompt": "only a prompt"}'], "train.jsonl, line 2: expected the fields"),
    (['{"prompt": "a", "completion": "b"}', '{"text": "c"}'], "line 2: a 'text' example among 'prompt-completion'"),
    (['{"prompt": "a", "completion": 3}'], "line 1: 'completion' must be a string"),
    (['{"messages": [{"role": "robot", "content": "beep"}]}'], "messages[0] has the role 'robot'; expected one of"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "nothing to learn"),
    (['{"messages": []}'], "'messages' must be a non-empty list"),
    (["", "  "], "no examples"),
])
def test_bad_jsonl_names_the_line(tok, tmp_path, lines, message):
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(")):
        text_data.text_data(write_jsonl(tmp_path / "train.jsonl", lines), tok)


def test_other_bad_text_inputs(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        text_data.text_data(tmp_path / "missing.jsonl", tok)
    with pytest.raises(DataError, match="the list is empty"):
        text_data.text_data([], tok)
    with pytest.raises(ConfigError, match="max_length"):
        text_data.text_data(TEXTS, tok, max_length=1)
    with pytest.raises(DataError, match="leave none to train on"):
        text_data.text_data(TEXTS[:1], tok, validation_split=0.5)
    plain = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode").tokenizer  # no chat template
    with pytest.raises(DataError, match=r"\[0\]: a chat-shaped example \('messages'\), but this tokenizer has no chat"):
        text_data.text_data(CHAT, plain)
    with pytest.raises(DataError, match="validation.*'text' examples, but the training data has 'prompt-completion'"):
        text_data.text_data(PAIRS, tok, validation=TEXTS)


def test_options_are_checked_before_anything_runs():
    from zoo.finetune import Options

    for bad, message in ((dict(epochs=0), "epochs"), (dict(learning_rate=-1.0), "learning_rate"),
                         (dict(validation_split=1.0), "validation_split"), (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
                         (dict(lr=1e-3), "unknown fine-tuning option")):
        with pytest.raises(ConfigError, match=message):
            Options.make(**bad)
    assert Options.make(lora=False).lr == 2e-5 and Options().lr == 2e-4


# ----------------------------------------------------------------------------- image folders


def make_images(root, counts: dict, size=(12, 10)):
    rng = np.random.default_rng(0)
    for label, n in counts.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / label / f"img{i}.png")
    return root


def test_image_folder_natural_label_order_split_and_skipped_images(tmp_path):
    root = make_images(tmp_path / "data", {"class10": 3, "class2": 4, "class1": 5})
    (root / "class2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "class2" / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match="1 unreadable image"):
        data = image_data.image_folder(root)
    assert data.labels == ("class1", "class2", "class10") and len(data) == 12
    assert data.skipped == ["class2/broken.png"]
    train, val = image_data.split(data, 0.25, seed=0)
    assert len(train) + len(val) == 12 and set(val.targets.tolist()) == {0, 1, 2}  # each label held out
    again = image_data.split(data, 0.25, seed=0)[1]
    assert [p.name for p in again.paths] == [p.name for p in val.paths]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="at least two labels, found 1"):
        image_data.image_folder(make_images(tmp_path / "one", {"cat": 2}))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    with pytest.raises(DataError, match="no readable images"):
        image_data.image_folder(tmp_path / "empty")
    with pytest.raises(DataError, match="no such folder"):
        image_data.image_folder(tmp_path / "nowhere")
    train = image_data.image_folder(make_images(tmp_path / "two", {"a": 2, "b": 2}))
    with pytest.raises(DataError, match=r"labels \['c'\] are not among the training folder's"):
        image_data.image_folder(make_images(tmp_path / "val", {"a": 1, "c": 1}), train.labels)


def test_augmentation_is_seeded_and_ends_in_the_checkpoints_preprocessing(tmp_path):
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    data = image_data.image_folder(make_images(tmp_path / "d", {"a": 3, "b": 3}, size=(40, 30)))
    batches = lambda epoch: image_data.Batches(data, clf.preprocessor, 4, np.arange(6), (0, epoch, (0.3, 1.0), True))
    x, y = batches(0)[0]
    assert x.shape == (4, *clf.preprocessor.size, 1) and y.tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(x, batches(0)[0][0])
    assert not np.array_equal(x, batches(1)[0][0])  # another epoch, other crops
    plain = image_data.Batches(data, clf.preprocessor, 4)[0][0]
    np.testing.assert_array_equal(plain, clf.preprocess(data.paths[:4]))
    assert -1.0 <= x.min() and x.max() <= 1.0  # normalised as the checkpoint's own preprocessing does
