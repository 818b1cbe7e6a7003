"""What the loop feeds `fit` for each kind of data: text rows, an image folder, or the user's own dataset."""

import keras
import numpy as np
from keras import ops

from zoo.finetune.loop import Feed, Summary
from zoo.finetune.text_examples import TextData


class TokenLoss(keras.losses.Loss):
    """Next-token cross-entropy averaged over the tokens that carry loss (weight 1) in each batch, as TRL and
    transformers average over the labels that are not -100. Computed on 2-D views, in float32."""

    def __init__(self, name: str = "token_loss", **kwargs):
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        vocab = ops.shape(y_pred)[-1]
        flat = keras.losses.sparse_categorical_crossentropy(
            ops.reshape(y_true, (-1,)), ops.reshape(ops.cast(y_pred, "float32"), (-1, vocab)), from_logits=True)
        return ops.reshape(flat, ops.shape(y_true))  # (b, t)


def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


class TextFeed(Feed):
    task, unit = "text", "tokens"

    def __init__(self, train: TextData, validation: TextData | None):
        self.train, self.validation = train, validation
        self.rows = len(train)

    def fit_inputs(self, epoch, batch_size, seed):
        d = self.train.take(_epoch_order(self.rows, seed, epoch))
        return {"x": d.x, "y": d.y, "sample_weight": d.sample_weight, "batch_size": batch_size}

    def eval_inputs(self, which, batch_size, limit):
        d = self.train.take(np.arange(min(limit, self.rows))) if which == "train" else self.validation
        if d is None:
            return None
        return {"x": d.x, "y": d.y, "sample_weight": d.sample_weight, "batch_size": batch_size}

    def units(self, rows):
        return round(self.train.tokens * rows / self.rows)

    def loss(self):
        return TokenLoss()

    def summary(self):
        return Summary("text", self.train.examples, self.validation.examples if self.validation else 0, "tokens",
                       truncated=self.train.truncated + (self.validation.truncated if self.validation else 0))


class DatasetFeed(Feed):
    """The user's own data: a `tf.data.Dataset`, a PyTorch `DataLoader`, a `keras.utils.PyDataset` (batches of
    (x, y[, sample_weight])) or NumPy arrays `(x, y[, sample_weight])`. Its order is its own, so a resumed
    run repeats the uninterrupted one only if the dataset's order does not depend on the epoch."""

    unit = "examples"

    def __init__(self, task: str, data, validation, loss, metrics, batch_size: int):
        self.task, self._loss, self._metrics = task, loss, metrics
        self.data, self.validation = self._inputs(data), None if validation is None else self._inputs(validation)
        self.arrays = "y" in self.data
        self.rows = len(self.data["y"]) if self.arrays else len(data) * batch_size

    @staticmethod
    def _inputs(data) -> dict:
        if isinstance(data, (tuple, list)):
            return dict(zip(("x", "y", "sample_weight"), data))
        return {"x": data}

    def steps(self, batch_size):
        return super().steps(batch_size) if self.arrays else len(self.data["x"])

    def fit_inputs(self, epoch, batch_size, seed):
        if not self.arrays:
            return dict(self.data)
        order = _epoch_order(self.rows, seed, epoch)
        return {k: _take(v, order) for k, v in self.data.items()} | {"batch_size": batch_size}

    def eval_inputs(self, which, batch_size, limit):
        data = self.data if which == "train" else self.validation
        if data is None or (which == "train" and not self.arrays):
            return None  # a dataset is not cut to `limit` rows; its loss is the progress bar's
        if which == "train":
            data = {k: _take(v, np.arange(min(limit, self.rows))) for k, v in data.items()}
        return dict(data) | ({"batch_size": batch_size} if "y" in data else {})

    def units(self, rows):
        return rows

    def loss(self):
        return self._loss

    def metrics(self):
        return self._metrics

    def summary(self):
        return Summary(self.task, self.rows, 0, self.unit)


def _take(value, rows):
    if isinstance(value, dict):
        return {k: np.asarray(v)[rows] for k, v in value.items()}
    return np.asarray(value)[rows]
