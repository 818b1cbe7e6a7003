"""The loop both tasks share: LoRA or full, AdamW with warm-up and cosine decay, Keras `fit` an epoch at a time,
evaluation and a checkpoint after each epoch, `resume` from the last one.

Each epoch's order (and, for images, its augmentation) comes from (seed, epoch) alone, so a run resumed
from its checkpoint after epoch k trains on what an uninterrupted run would have, from the same weights and
optimizer state, and ends where it does (adapter dropout, when on, draws other masks after a resume).
"""

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np

from zoo import backends
from zoo.errors import ConfigError
from zoo.files import read_json, write_json
from zoo.finetune.options import Options
from zoo.safetensors_file import TensorInfo, read_header, read_tensor, write_safetensors

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class Summary:
    """What a fine-tune did: data, losses before and after, speed."""

    task: str
    examples: int
    validation_examples: int
    unit: str  # what throughput counts: "tokens" or "images"
    truncated: int = 0
    skipped: int = 0
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0  # training time (fit), evaluation excluded
    units: int = 0  # tokens or images trained on
    before: dict = field(default_factory=dict)  # {"train_loss", "val_loss", "val_accuracy"}
    after: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # per epoch: loss, val_loss, ...
    backend: str = ""
    resumed_from: int = 0

    @property
    def throughput(self) -> float:
        return self.units / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        out = [f"{self.task} fine-tune on {self.backend}: {self.examples} examples"
               + (f", {self.validation_examples} for validation" if self.validation_examples else "")]
        if self.truncated:
            out.append(f"  {self.truncated} example(s) longer than max_length were truncated")
        if self.skipped:
            out.append(f"  {self.skipped} unreadable image(s) skipped")
        for key in ("train_loss", "val_loss", "val_accuracy"):
            if key in self.before or key in self.after:
                b, a = self.before.get(key), self.after.get(key)
                out.append(f"  {key:<13} {_num(b):>9} -> {_num(a)}")
        resumed = f" (resumed after epoch {self.resumed_from})" if self.resumed_from else ""
        out.append(f"  {self.epochs} epoch(s), {self.steps} steps in {self.seconds:.1f} s{resumed}: "
                   f"{self.throughput:,.0f} {self.unit}/s")
        return out

    def to_dict(self) -> dict:
        return asdict(self) | {"throughput": round(self.throughput, 2)}


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


class Feed:
    """A task's data for the loop: what `fit` and `evaluate` take, and what to count."""

    task = ""
    unit = ""
    rows = 0  # training rows (examples, or packed rows)

    def steps(self, batch_size: int) -> int:
        return math.ceil(self.rows / batch_size)

    def fit_inputs(self, epoch: int, batch_size: int, seed: int) -> dict:
        raise NotImplementedError

    def eval_inputs(self, which: str, batch_size: int, limit: int | None) -> dict | None:
        """Keyword arguments of `evaluate` for "train" (at most `limit` rows) or "val" (None: no validation)."""
        raise NotImplementedError

    def units(self, rows: int) -> int:
        """Tokens or images in `rows` training rows."""
        return rows

    def loss(self):
        raise NotImplementedError

    def metrics(self) -> list:
        return []

    def summary(self) -> Summary:
        raise NotImplementedError


class _Throughput(keras.callbacks.Callback):
    """Adds units/s to the progress bar's line, and times the epoch's training (its validation left out)."""

    def __init__(self, key: str, per_batch: float):
        super().__init__()
        self.key, self.per_batch, self.seconds = key, per_batch, 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds = max(time.perf_counter() - self.start, 1e-9)
        if logs is not None:
            logs[self.key] = (batch + 1) * self.per_batch / self.seconds


class _Progress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, numbering epochs out of the whole run (the loop calls `fit` once per epoch)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.total = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total


def prepare(model, options: Options) -> None:
    """LoRA: a new adapter (unless the model has an active one to go on training); full: every weight trains."""
    if not options.lora:
        if model.adapters:
            raise ConfigError(f"a full fine-tune of a model with LoRA adapters {model.adapters}: merge_adapter() or "
                              "delete_adapter() first, or train the adapter (lora=True)")
        model.trainable = True
        for variable in model.variables:
            if _is_float(variable):
                variable.trainable = True
        return
    if model.active_adapter is None:
        model.enable_lora(rank=options.lora_rank, alpha=options.lora_alpha, targets=options.lora_targets,
                          dropout=options.lora_dropout, rslora=options.rslora)


def _is_float(variable) -> bool:
    return "float" in str(variable.dtype)


def optimizer_for(model, options: Options, total_steps: int) -> keras.optimizers.Optimizer:
    """AdamW, linear warm-up to the learning rate then cosine decay to 0, no weight decay on weights of one axis
    (norm scales, biases: timm's and transformers' rule), the global gradient norm clipped."""
    warmup = int(options.warmup_ratio * total_steps)
    if warmup:
        schedule = keras.optimizers.schedules.CosineDecay(0.0, max(total_steps - warmup, 1), alpha=0.0,
                                                          warmup_target=options.lr, warmup_steps=warmup)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(options.lr, max(total_steps, 1), alpha=0.0)
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=options.weight_decay, global_clipnorm=options.clipnorm)
    optimizer.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if len(v.shape) <= 1])
    return optimizer


def train(model, feed: Feed, options: Options, output: Path | None = None, resume: bool = False,
          verbose: int | str = "auto", callbacks=()) -> Summary:
    """Trains `model` in place on `feed` (see the module docstring); checkpoints go to `output`/checkpoint-N."""
    keras.utils.set_random_seed(options.seed)
    prepare(model, options)
    steps_per_epoch = feed.steps(options.batch_size)
    optimizer = optimizer_for(model, options, steps_per_epoch * options.epochs)
    model.compile(optimizer=optimizer, loss=feed.loss(), metrics=feed.metrics(), jit_compile=options.jit_compile)
    summary = feed.summary()
    summary.backend = backends.describe()["backend"]
    start = 0
    if resume:
        start = _restore(model, optimizer, output, options, summary)
    else:
        summary.before = _evaluate(model, feed, options)
    for epoch in range(start, options.epochs):
        timer = _Throughput(f"{feed.unit}/s", feed.units(feed.rows) / steps_per_epoch)
        history = model.fit(**feed.fit_inputs(epoch, options.batch_size, options.seed), epochs=epoch + 1,
                            initial_epoch=epoch, shuffle=False, callbacks=[timer, *callbacks, _Progress(options.epochs)],
                            verbose=verbose, **_validation(feed.eval_inputs("val", options.batch_size, None)))
        summary.seconds += timer.seconds
        summary.steps += steps_per_epoch
        summary.units += feed.units(feed.rows)
        record = {"epoch": epoch + 1, "seconds": round(timer.seconds, 3),
                  f"{feed.unit}_per_second": round(feed.units(feed.rows) / timer.seconds, 1)}
        record |= {k: float(v[-1]) for k, v in history.history.items() if k != f"{feed.unit}/s"}
        summary.history.append(record)
        summary.epochs = epoch + 1
        if output is not None:
            _save_checkpoint(Path(output), model, optimizer, options, summary)
    summary.after = _evaluate(model, feed, options)
    return summary


def _validation(inputs: dict | None) -> dict:
    """`evaluate`'s keyword arguments as `fit`'s validation ones (Keras then reports val_loss in the bar)."""
    if inputs is None:
        return {}
    if "y" not in inputs:
        return {"validation_data": inputs["x"]}
    data = tuple(inputs[k] for k in ("x", "y", "sample_weight") if k in inputs)
    return {"validation_data": data, "validation_batch_size": inputs.get("batch_size")}


def _evaluate(model, feed: Feed, options: Options) -> dict:
    out = {}
    for which in ("train", "val"):
        inputs = feed.eval_inputs(which, options.batch_size, options.eval_rows if which == "train" else None)
        if inputs is None:
            continue
        results = model.evaluate(**inputs, verbose=0, return_dict=True)
        out[f"{which}_loss"] = float(results["loss"])
        if which == "val" and "accuracy" in results:
            out["val_accuracy"] = float(results["accuracy"])
    return out


# ----------------------------------------------------------------------------- checkpoints


def _fingerprint(options: Options) -> dict:
    """The options a resumed run must share with the one it resumes (the epoch count may grow)."""
    return {k: v for k, v in json.loads(json.dumps(asdict(options))).items() if k != "epochs"}


def _save_checkpoint(output: Path, model, optimizer, options: Options, summary: Summary) -> None:
    """output/checkpoint-N: the trainable weights, the optimizer's state and the summary so far; written beside
    and renamed into place, then the previous checkpoint is removed."""
    final = output / f"{CHECKPOINT_PREFIX}{summary.epochs}"
    partial = output / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_safetensors(partial / "trainable.safetensors", _arrays(model.trainable_variables))
    write_safetensors(partial / "optimizer.safetensors", _arrays(optimizer.variables))
    write_json(partial / STATE_FILE, {"epoch": summary.epochs, "options": _fingerprint(options),
                                      "summary": summary.to_dict()})
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in output.glob(f"{CHECKPOINT_PREFIX}*"):
        if old != final and old.is_dir():
            shutil.rmtree(old)


def last_checkpoint(output: Path) -> Path | None:
    found = [p for p in Path(output).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def _arrays(variables) -> dict:
    return {f"{i:05d}/{v.path}": np.asarray(keras.ops.convert_to_numpy(v.value)) for i, v in enumerate(variables)}


def _restore(model, optimizer, output: Path | None, options: Options, summary: Summary) -> int:
    """Loads the last checkpoint into the model and optimizer; returns the epochs it had done."""
    folder = last_checkpoint(output) if output is not None else None
    if folder is None:
        raise ConfigError("resume: the output folder holds no checkpoint-N folder to resume from")
    state = read_json(folder / STATE_FILE)
    if state["options"] != _fingerprint(options):
        changed = sorted(k for k in _fingerprint(options) if state["options"].get(k) != _fingerprint(options)[k])
        raise ConfigError(f"resume: {folder.name} was trained with other settings ({', '.join(changed)}); "
                          "resume with the same ones")
    optimizer.build(model.trainable_variables)
    for file, variables in (("trainable.safetensors", model.trainable_variables), ("optimizer.safetensors",
                                                                                 optimizer.variables)):
        _assign(folder / file, variables)
    saved = state["summary"]
    for key in ("before", "history", "steps", "seconds", "units"):
        setattr(summary, key, saved[key])
    summary.epochs = summary.resumed_from = state["epoch"]
    return state["epoch"]


def _assign(path: Path, variables) -> None:
    """Values in the order they were saved (the names Keras makes unique per process may differ), shapes checked."""
    header = read_header(path)
    names = sorted(header)
    shapes = [tuple(header[n][0]) for n in names]
    if shapes != [tuple(v.shape) for v in variables]:
        raise ConfigError(f"resume: {path.parent.name}/{path.name} holds other weights than this model trains "
                          f"({len(names)} saved, {len(variables)} now, or of other shapes)")
    with open(path, "rb") as f:
        for name, variable in zip(names, variables):
            shape, dtype, offset = header[name]
            variable.assign(read_tensor(f, TensorInfo(name, path, shape, dtype, offset)))
