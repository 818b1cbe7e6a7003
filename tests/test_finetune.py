"""Fine-tuning end to end on every backend: learning, repeatability, resume, and outputs that PEFT and transformers load."""

import json

import keras
import numpy as np
import peft
import pytest
import torch
from keras.ops import convert_to_numpy as to_numpy
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, ViTForImageClassification

import zoo
from zoo import cli
from zoo.errors import ConfigError
from zoo.finetune import loop
from gemma_reference import reference, save_hf_gemma
from test_finetune_data import make_images

TOKENS = np.random.default_rng(0).integers(3, 150, (2, 12)).astype(np.int32)
PAIRS = [{"prompt": f"Q{i % 7}: add {i % 5} and {i % 3}?", "completion": f" {i % 5 + i % 3}"} for i in range(40)]
FAST = ["--lr", "0.02", "--max-length", "24", "--batch-size", "8", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_hf_gemma(tmp_path_factory.mktemp("finetune_base") / "gemma3", "gemma3", seed=5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_data")
    (folder / "train.jsonl").write_text("\n".join(json.dumps(e) for e in PAIRS[:32]) + "\n")
    (folder / "val.jsonl").write_text("\n".join(json.dumps(e) for e in PAIRS[32:]) + "\n")
    return folder


def run_cli(*args):
    assert cli.main(["finetune", *map(str, args)]) == 0


def train_once(base, data, **options):
    lm = zoo.GemmaCausalLM.from_preset(base)
    summary = zoo.finetune.text(lm, data / "train.jsonl", validation=data / "val.jsonl", verbose=0,
                                **{"epochs": 3, "learning_rate": 0.02, "max_length": 24, "warmup_ratio": 0.0} | options)
    return lm, summary


def test_lora_fit_lowers_validation_loss_and_a_seeded_run_repeats(base, data):
    lm, first = train_once(base, data, seed=1)
    assert first.after["val_loss"] < first.before["val_loss"] - 0.5, (first.before, first.after)
    assert first.after["train_loss"] < first.before["train_loss"] - 0.5
    assert [h["epoch"] for h in first.history] == [1, 2, 3] and first.units > 0 and first.steps == 12
    assert lm.adapters == ["default"] and all("lora" in v.path for v in lm.trainable_variables)
    _, second = train_once(base, data, seed=1)
    assert second.after["val_loss"] == pytest.approx(first.after["val_loss"], abs=1e-6)
    _, other = train_once(base, data, seed=2)
    assert other.after["val_loss"] != pytest.approx(first.after["val_loss"], abs=1e-6)


def test_full_fine_tune_and_packing_learn_too(base, data):
    lm, full = train_once(base, data, lora=False, learning_rate=2e-3, epochs=2)
    assert full.after["val_loss"] < full.before["val_loss"] - 0.3 and not lm.adapters
    assert len(lm.trainable_variables) > 10
    _, packed = train_once(base, data, packing=True, max_length=64, epochs=4)
    assert packed.after["val_loss"] < packed.before["val_loss"] - 0.3


def test_cli_adapter_output_loads_here_and_in_peft_with_the_same_logits(base, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    run_cli("text", "--preset", base, "--data", data / "train.jsonl", "--val", data / "val.jsonl", "--output", out,
            "--epochs", "2", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj,down_proj", *FAST)
    printed = capsys.readouterr().out
    assert "val_loss" in printed and "tokens/s" in printed and f"wrote {out}" in printed
    assert {"adapter_config.json", "adapter_model.safetensors", "finetune.json", "tokenizer.json",
            "checkpoint-2"} <= {p.name for p in out.iterdir()}
    lm = zoo.from_preset(out)  # an adapter folder is a preset over its base
    assert lm.adapters == ["default"] and lm.source["base"]["handle"] == str(base)
    other = zoo.GemmaCausalLM.from_preset(base)
    other.load_adapter(out)
    np.testing.assert_allclose(to_numpy(other(TOKENS)), to_numpy(lm(TOKENS)), atol=1e-6)
    ref = peft.PeftModel.from_pretrained(reference(base), out).eval()
    with torch.no_grad():
        want = ref(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(to_numpy(lm(TOKENS)), want, atol=1e-4, rtol=0)
    base_logits = to_numpy(zoo.GemmaCausalLM.from_preset(base)(TOKENS))
    assert np.abs(base_logits - want).max() > 1e-2  # the adapter learned something


def test_cli_merged_and_full_outputs_load_in_transformers(base, data, tmp_path):
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    common = ["--data", data / "train.jsonl", "--epochs", "1", *FAST]
    run_cli("text", "--preset", base, "--output", merged, "--merge", *common)
    run_cli("text", "--preset", base, "--output", adapter, *common)
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, to_numpy(zoo.from_preset(adapter)(TOKENS)), atol=1e-4, rtol=0)
    full = tmp_path / "full"
    run_cli("text", "--preset", base, "--output", full, "--full", *common, "--lr", "1e-3")
    hf = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, to_numpy(zoo.GemmaCausalLM.from_preset(full)(TOKENS)), atol=1e-4, rtol=0)


def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_does(base, data, tmp_path, monkeypatch):
    args = ["text", "--preset", base, "--data", data / "train.jsonl", "--epochs", "3", "--lora-dropout", "0", *FAST]
    run_cli(*args, "--output", tmp_path / "whole")
    save = loop._save_checkpoint

    def killed_after_epoch_2(output, model, optimizer, options, summary):
        save(output, model, optimizer, options, summary)
        if summary.epochs == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "_save_checkpoint", killed_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*args, "--output", tmp_path / "cut")
    monkeypatch.setattr(loop, "_save_checkpoint", save)
    assert [p.name for p in (tmp_path / "cut").iterdir()] == ["checkpoint-2"]
    with pytest.raises(ConfigError, match="other settings.*learning_rate"):
        zoo.finetune.text(zoo.GemmaCausalLM.from_preset(base), data / "train.jsonl", output=tmp_path / "cut",
                          resume=True, epochs=3, learning_rate=0.5, max_length=24)
    run_cli(*args, "--output", tmp_path / "cut", "--resume")
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        np.testing.assert_allclose(resumed[key], whole[key], atol=1e-6)
    record = json.loads((tmp_path / "cut" / "finetune.json").read_text())["summary"]
    assert record["resumed_from"] == 2 and record["epochs"] == 3 and len(record["history"]) == 3


def test_output_folder_rules(base, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    args = ["text", "--preset", base, "--data", data / "train.jsonl", "--output", out, *FAST]
    assert cli.main(["finetune", *map(str, args)]) == 1
    assert "the folder exists and is not empty (notes.md); pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert cli.main(["finetune", *map(str, args), "--resume"]) == 1
    assert "holds no checkpoint-N folder to resume from" in capsys.readouterr().err
    run_cli(*args, "--overwrite")
    assert (out / "notes.md").read_text() == "mine" and (out / "adapter_config.json").is_file()


def test_config_file_values_and_flags_over_them(base, data, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"preset: {base}\ndata: {data / 'train.jsonl'}\nepochs: 2\nlr: 0.02\nmax-length: 24\n"
                      "lora-rank: 2\nlora_targets: [q_proj, o_proj]\n")
    run_cli("text", "--config", config, "--output", tmp_path / "out", "--lora-rank", "3")
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["r"] == 3 and sorted(saved["target_modules"]) == ["o_proj", "q_proj"]
    summary = json.loads((tmp_path / "out" / "finetune.json").read_text())["summary"]
    assert summary["epochs"] == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = 2\nlearning_rat = 0.1\n")
    assert cli.main(["finetune", "text", "--config", str(bad), "--preset", str(base), "--data", "x", "--output",
                     str(tmp_path / "y")]) == 1
    assert "bad.toml: unknown fine-tuning option(s) ['learning_rat']" in capsys.readouterr().err


def test_own_arrays_feed_fit_too(base, data):
    lm = zoo.GemmaCausalLM.from_preset(base)
    rows, val = zoo.finetune.text_data(data / "train.jsonl", lm.tokenizer, max_length=24, validation=data / "val.jsonl")
    summary = zoo.finetune.text(lm, (rows.x, rows.y, rows.sample_weight),
                                validation=(val.x, val.y, val.sample_weight), epochs=2, learning_rate=0.02,
                                warmup_ratio=0.0, verbose=0)
    assert summary.after["val_loss"] < summary.before["val_loss"] - 0.3 and summary.unit == "examples"


# ----------------------------------------------------------------------------- images


def test_cli_images_new_labels_adapter_loads_here_and_in_peft(tmp_path, capsys):
    root = make_images(tmp_path / "shapes", {"stripes": 6, "dots": 6}, size=(20, 16))
    out = tmp_path / "out"
    run_cli("images", "--preset", "vit_tiny_digits", "--data", root, "--output", out, "--epochs", "2",
            "--val-split", "0.34", "--lr", "0.01", "--batch-size", "4")
    printed = capsys.readouterr().out
    assert "val_accuracy" in printed and "images/s" in printed
    record = json.loads((out / "finetune.json").read_text())
    assert record["labels"] == ["dots", "stripes"] and record["base"] == "vit_tiny_digits"
    clf = zoo.from_preset(out)
    assert isinstance(clf, zoo.ViTImageClassifier) and clf.config.labels == ("dots", "stripes")
    pixels = clf.preprocess(sorted(root.rglob("*.png"))[:3])
    base_folder = zoo.presets.get("vit_tiny_digits").folder
    ref = ViTForImageClassification.from_pretrained(base_folder, num_labels=2, ignore_mismatched_sizes=True)
    ref = peft.PeftModel.from_pretrained(ref, out).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits.numpy()
    np.testing.assert_allclose(to_numpy(clf(pixels)), want, atol=1e-4, rtol=0)
    assert cli.main(["classify", "--preset", str(out), "--top-k", "1", str(root / "dots" / "img0.png")]) == 0
    top = capsys.readouterr().out.splitlines()[1].split()[0]
    assert top in ("dots", "stripes")  # the new labels, not the digits
    merged = tmp_path / "merged"
    run_cli("images", "--preset", "vit_tiny_digits", "--data", root, "--output", merged, "--epochs", "1", "--merge")
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "dots", "1": "stripes"}
    assert ViTForImageClassification.from_pretrained(merged).config.id2label == {0: "dots", 1: "stripes"}


def test_images_with_labels_other_than_the_models_are_refused(tmp_path):
    root = make_images(tmp_path / "shapes", {"a": 2, "b": 2})
    clf = zoo.ViTImageClassifier.from_preset("vit_tiny_digits")
    with pytest.raises(zoo.errors.DataError, match=r"the model's labels \['0', '1', .*are not the image folder's"):
        zoo.finetune.images(clf, root, verbose=0)
    assert keras.backend.backend() in {"jax", "torch", "tensorflow"}


def test_adapter_folder_base_from_peft_config_or_given(base, data, tmp_path, capsys):
    out = tmp_path / "adapter"
    run_cli("text", "--preset", base, "--data", data / "train.jsonl", "--output", out, "--epochs", "1", *FAST)
    peft_only = tmp_path / "peft_only"  # as PEFT writes it: no finetune.json, the base by its path
    peft_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (peft_only / name).write_bytes((out / name).read_bytes())
    config = json.loads((peft_only / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base)
    want = to_numpy(zoo.from_preset(out)(TOKENS))
    np.testing.assert_allclose(to_numpy(zoo.from_preset(peft_only)(TOKENS)), want, atol=1e-6)
    (peft_only / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    with pytest.raises(zoo.errors.PresetNotFoundError, match="does not name its base model.*--base"):
        zoo.from_preset(peft_only)
    np.testing.assert_allclose(to_numpy(zoo.from_preset(peft_only, base=str(base))(TOKENS)), want, atol=1e-6)
    assert cli.main(["generate", "x", "--preset", str(peft_only), "--base", str(base), "--max-new-tokens", "2"]) == 0
    with pytest.raises(ConfigError, match="base= names the model under an adapter folder"):
        zoo.GemmaCausalLM.from_preset(base, base=str(base))


@pytest.mark.parametrize("kind", ["pydataset", "dataloader", "tf.data"])
def test_own_datasets_feed_fit(base, data, kind):
    lm = zoo.GemmaCausalLM.from_preset(base)
    rows, _ = zoo.finetune.text_data(data / "train.jsonl", lm.tokenizer, max_length=24)
    arrays = (rows.x["token_ids"], rows.y, rows.sample_weight)
    if kind == "dataloader":
        dataset = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*map(torch.from_numpy, arrays)),
                                              batch_size=8)
    elif kind == "tf.data":
        import tensorflow as tf

        dataset = tf.data.Dataset.from_tensor_slices(arrays).batch(8)
    else:
        class Batches(keras.utils.PyDataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return tuple(a[i * 8:(i + 1) * 8] for a in arrays)

        dataset = Batches()
    summary = zoo.finetune.text(lm, dataset, epochs=3, learning_rate=0.02, warmup_ratio=0.0, verbose=0)
    losses = [h["loss"] for h in summary.history]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.5 and summary.steps == 12


def test_mixed_bfloat16_on_request(base, data, tmp_path):
    out = tmp_path / "out"
    run_cli("text", "--preset", base, "--data", data / "train.jsonl", "--output", out, "--epochs", "2",
            "--precision", "mixed_bfloat16", *FAST)
    record = json.loads((out / "finetune.json").read_text())["summary"]
    assert record["history"][-1]["loss"] < record["history"][0]["loss"]
    assert load_file(out / "adapter_model.safetensors")  # float32 adapter weights, as PEFT keeps them
    lm = zoo.from_preset(out)
    assert lm.dtype_policy.name == "float32" and np.isfinite(to_numpy(lm(TOKENS))).all()
