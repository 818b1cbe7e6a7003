"""Fine-tuning helpers: instruction data and image folders in, a PEFT adapter (or a merged preset) out.

`text(lm, data, ...)` and `images(classifier, data, ...)` train a model in place with good defaults
(LoRA, AdamW, warm-up and cosine decay, gradient clipping; `zoo.finetune.options.Options` lists every
setting) and, given an `output` folder, checkpoint it after each epoch and write the result there:
a PEFT adapter folder that keras-zoo, PEFT and vLLM load, or with `merge=True` a preset folder that
transformers loads. `zoo finetune text|images` is the same from the command line.

Example:
    >>> lm = zoo.GemmaCausalLM.from_preset("gemma_tiny_pycode")  # doctest: +SKIP
    >>> summary = zoo.finetune.text(lm, "train.jsonl", epochs=2, output="out/")  # doctest: +SKIP
    >>> print("\\n".join(summary.lines()))  # doctest: +SKIP
"""

import os
import shutil
from pathlib import Path

from zoo import loader
from zoo.errors import ConfigError, DataError
from zoo.files import write_json
from zoo.finetune.feeds import DatasetFeed, TextFeed, TokenLoss
from zoo.finetune.image_folders import ImageFeed, ImageFolder, image_folder, split as split_images
from zoo.finetune.loop import CHECKPOINT_PREFIX, Summary, last_checkpoint, train
from zoo.finetune.options import Options, read_config_file
from zoo.finetune.text_examples import TextData, text_data

__all__ = ["ImageFolder", "Options", "Summary", "TextData", "TokenLoss", "check_output", "image_folder", "images",
           "read_config_file", "save", "text", "text_data"]

# What `save` writes; `overwrite` clears these (and checkpoints) from an output folder, nothing else.
OUTPUTS = ("adapter_config.json", "adapter_model.safetensors", "config.json", "model.safetensors",
           "model.safetensors.index.json", "generation_config.json", "preprocessor_config.json", loader.FINETUNE_FILE)


def text(model, data, *, validation=None, output: str | os.PathLike | None = None, resume: bool = False,
         overwrite: bool = False, merge: bool = False, verbose="auto", callbacks=(), **options) -> Summary:
    """Fine-tunes a causal LM on text examples (a JSONL file, a list of dicts, a `TextData`, or your own
    dataset or arrays) and, with `output`, writes the adapter (or the merged model) there.

    Args:
        model: a `GemmaCausalLM`, trained in place.
        data: `{"text"}`, `{"prompt", "completion"}` or `{"messages"}` examples (see `text_data`).
        validation: validation examples in the same form; else `validation_split` of `data` is held out.
        output: checkpoints after each epoch (`checkpoint-N`) and the result go here.
        resume: go on from the last checkpoint in `output`.
        overwrite: write into an `output` folder that already holds a result or checkpoints.
        merge: write the model with the adapter folded in (a preset folder) instead of the adapter.
        verbose: Keras' progress output (0 silent, 1 bar, 2 a line per epoch).
        callbacks: more Keras callbacks for `fit` (called once per epoch's `fit`).
        **options: `Options` fields (epochs, batch_size, learning_rate, max_length, packing, lora_rank, ...).
    """
    opts = Options.make(**options)
    out = check_output(output, resume, overwrite)
    if isinstance(data, TextData):
        feed = TextFeed(data, validation)
    elif not _examples_like(data):
        feed = DatasetFeed("text", data, validation, TokenLoss(), [], opts.batch_size)
    else:
        train_rows, val_rows = text_data(data, getattr(model, "tokenizer", None), opts.max_length, opts.packing,
                                         validation, opts.validation_split, opts.seed)
        feed = TextFeed(train_rows, val_rows)
    return _run(model, feed, opts, out, resume, merge, verbose, callbacks)


def images(model, data, *, validation=None, output: str | os.PathLike | None = None, resume: bool = False,
           overwrite: bool = False, merge: bool = False, verbose="auto", callbacks=(), **options) -> Summary:
    """Fine-tunes an image classifier on an image folder (`root/<label>/<image>`, or an `ImageFolder`), with
    training augmentation; the model's labels must be the folder's (load it with `labels=data.labels`).
    Arguments as `text`'s; `validation` is a folder, else `validation_split` of each label is held out."""
    import keras

    opts = Options.make(**options)
    out = check_output(output, resume, overwrite)
    if not isinstance(data, (str, os.PathLike, ImageFolder)):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        feed = DatasetFeed("images", data, validation, loss, metrics, opts.batch_size)
        return _run(model, feed, opts, out, resume, merge, verbose, callbacks)
    train_set = data if isinstance(data, ImageFolder) else image_folder(data)
    if validation is not None:
        val_set = validation if isinstance(validation, ImageFolder) else image_folder(validation, train_set.labels)
    elif opts.validation_split:
        train_set, val_set = split_images(train_set, opts.validation_split, opts.seed)
    else:
        val_set = None
    if tuple(model.config.labels) != train_set.labels:
        raise DataError(f"the model's labels {_few(model.config.labels)} are not the image folder's "
                        f"{_few(train_set.labels)}: load the model with from_preset(..., labels=data.labels)")
    return _run(model, ImageFeed(train_set, val_set, model.preprocessor, opts), opts, out, resume, merge, verbose,
                callbacks)


def save(model, output: str | os.PathLike, merge: bool = False, summary: Summary | None = None) -> Path:
    """Writes a fine-tuned model: its active adapter as a PEFT adapter folder (with the tokenizer or image
    preprocessing beside it, and `finetune.json`: the base as it was named, new labels, the summary), or,
    with `merge` or after a full fine-tune, a preset folder that transformers loads."""
    output = Path(output)
    source = getattr(model, "source", None) or {}
    source = source.get("base", source)
    base = source.get("handle")
    if isinstance(base, str) and "://" not in base and Path(base).expanduser().exists():
        base = str(Path(base).expanduser().resolve())
    record = {"base": base, "task": type(model).__name__, "summary": summary.to_dict() if summary else None}
    if merge or model.active_adapter is None:
        if model.active_adapter is not None:
            model.merge_adapter()
        model.save_preset(output)
        write_json(output / loader.FINETUNE_FILE, record)
        return output
    model.save_adapter(output)
    model._save_extras(output)  # the tokenizer (a chat template, say) or the image preprocessing
    if getattr(model, "new_head", False):
        record["labels"] = list(model.config.labels)  # the head the adapter carries (modules_to_save) has these
    write_json(output / loader.FINETUNE_FILE, record)
    return output


def _run(model, feed, opts: Options, out: Path | None, resume: bool, merge: bool, verbose, callbacks) -> Summary:
    summary = train(model, feed, opts, out, resume, verbose, callbacks)
    if out is not None:
        save(model, out, merge, summary)
    return summary


def check_output(output, resume: bool = False, overwrite: bool = False) -> Path | None:
    """The output folder, refused if it already holds a result or checkpoints (unless resuming or overwriting)."""
    if output is None:
        if resume:
            raise ConfigError("resume: give the output folder whose checkpoint to resume from")
        return None
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out.name}: exists and is not a folder")
    held = [p.name for p in out.iterdir()] if out.is_dir() else []
    if resume:
        if last_checkpoint(out) is None:
            raise ConfigError(f"resume: {out.name} holds no {CHECKPOINT_PREFIX}N folder to resume from")
        return out
    if held and not overwrite:
        raise ConfigError(f"output {out.name}: the folder exists and is not empty ({', '.join(sorted(held)[:4])}); "
                          "pass overwrite=True (--overwrite) to write over it, or resume=True (--resume) to go on")
    for name in held:
        path = out / name
        if name.startswith(CHECKPOINT_PREFIX) and path.is_dir():
            shutil.rmtree(path)
        elif name in OUTPUTS or name.startswith("model-"):
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _examples_like(data) -> bool:
    return isinstance(data, (str, os.PathLike)) or (isinstance(data, list) and all(isinstance(e, dict) for e in data))


def _few(labels) -> str:
    labels = list(labels)
    return str(labels[:6])[:-1] + (", ...]" if len(labels) > 6 else "]")
