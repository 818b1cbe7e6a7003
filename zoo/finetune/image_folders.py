"""Image folders for fine-tuning a classifier: torchvision's ImageFolder layout, timm's training augmentation.

`root/<label>/<image>`: one subfolder per label, labels in natural sort order ("class2" before
"class10"). Every image is decoded once when the folder is read; one that cannot be decoded is
skipped, counted and named in the summary (as timm's loaders would fail on it, a long run should not
stop at image 40,000 for one bad file). Training images get a random resized crop (torchvision's
defaults: 8-100 % of the area, aspect 3/4-4/3) and a horizontal flip, then the checkpoint's own
rescaling and normalisation; validation images the checkpoint's own preprocessing.
"""

import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from zoo.errors import DataError
from zoo.finetune.loop import Feed, Summary

EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class ImageFolder:
    """The images of a folder (paths and label indices) and the label names, in natural order."""

    labels: tuple[str, ...]
    paths: list[Path]
    targets: np.ndarray
    skipped: list[str] = field(default_factory=list)  # unreadable images, as label/name

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, rows) -> "ImageFolder":
        return ImageFolder(self.labels, [self.paths[i] for i in rows], self.targets[np.asarray(rows, int)], self.skipped)


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def image_folder(root: str | os.PathLike, labels: tuple[str, ...] | None = None) -> ImageFolder:
    """Reads `root/<label>/*` (see the module docstring); `labels` fixes the label order (a validation folder
    takes the training folder's)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root.name}: no such folder")
    found = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural)
    if labels is None:
        if len(found) < 2:
            raise DataError(f"{root.name}: expected one subfolder per label and at least two labels, found "
                            f"{len(found)} ({', '.join(found) or 'none'})")
        labels = tuple(found)
    elif set(found) - set(labels):
        raise DataError(f"{root.name}: labels {sorted(set(found) - set(labels))} are not among the training "
                        f"folder's {list(labels)}")
    paths, targets, skipped = [], [], []
    for index, label in enumerate(labels):
        folder = root / label
        files = sorted(folder.iterdir(), key=lambda p: _natural(p.name)) if folder.is_dir() else []
        for path in files:
            if path.suffix.lower() not in EXTENSIONS or not path.is_file():
                continue
            if _readable(path):
                paths.append(path)
                targets.append(index)
            else:
                skipped.append(f"{label}/{path.name}")
    if not paths:
        raise DataError(f"{root.name}: no readable images in {', '.join(labels)} "
                        f"(extensions {', '.join(sorted(EXTENSIONS))})")
    if skipped:
        warnings.warn(f"{root.name}: {len(skipped)} unreadable image(s) skipped: {', '.join(skipped[:5])}"
                      + (" ..." if len(skipped) > 5 else ""), stacklevel=2)
    return ImageFolder(tuple(labels), paths, np.asarray(targets, np.int32), skipped)


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def split(data: ImageFolder, fraction: float, seed: int) -> tuple[ImageFolder, ImageFolder]:
    """A seeded `fraction` of each label held out (at least one image of a label with two or more)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for label in range(len(data.labels)):
        rows = np.flatnonzero(data.targets == label)
        rng.shuffle(rows)
        held = min(max(round(len(rows) * fraction), 1), len(rows) - 1) if len(rows) > 1 else 0
        val += rows[:held].tolist()
        train += rows[held:].tolist()
    return data.take(sorted(train)), data.take(sorted(val))


def random_resized_crop(image: Image.Image, rng: np.random.Generator, scale: tuple[float, float],
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (left, top, right, bottom): ten tries at a random area and aspect,
    then the centre crop of the nearest allowed aspect."""
    width, height = image.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    aspect = width / height
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else (
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class Batches(keras.utils.PyDataset):
    """Batches of (pixels, labels): augmented for training (seeded by seed, epoch and image), else as the
    checkpoint's own preprocessing gives them."""

    def __init__(self, data: ImageFolder, preprocessor, batch_size: int, order=None, augment=None, **kwargs):
        super().__init__(**kwargs)
        self.data, self.batch_size = data, batch_size
        self.order = np.arange(len(data)) if order is None else order
        self.augment = augment  # (seed, epoch, crop_scale, flip) or None
        self.preprocessor = preprocessor
        if augment is not None:  # crop first, then resize to the model's size and normalise as the checkpoint does
            size = preprocessor.crop_size or preprocessor.size or (preprocessor.shortest_edge,) * 2
            self.preprocessor = replace(preprocessor, size=tuple(size), shortest_edge=None, crop_size=None)

    def __len__(self) -> int:
        return math.ceil(len(self.order) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return np.stack([self._image(int(r)) for r in rows]), self.data.targets[rows]

    def _image(self, row: int) -> np.ndarray:
        with Image.open(self.data.paths[row]) as image:
            image.load()
            if self.augment is not None:
                seed, epoch, scale, flip = self.augment
                rng = np.random.default_rng([seed, epoch, row])
                image = image.crop(random_resized_crop(image, rng, scale))
                if flip and rng.random() < 0.5:
                    image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return self.preprocessor([image])[0]  # (the checkpoint's own conversion to its channels)


class ImageFeed(Feed):
    task, unit = "images", "images"

    def __init__(self, train: ImageFolder, validation: ImageFolder | None, preprocessor, options):
        self.train, self.validation, self.preprocessor, self.options = train, validation, preprocessor, options
        self.rows = len(train)

    def fit_inputs(self, epoch, batch_size, seed):
        order = np.random.default_rng([seed, epoch]).permutation(self.rows)
        augment = (seed, epoch, self.options.crop_scale, self.options.flip)
        return {"x": Batches(self.train, self.preprocessor, batch_size, order, augment)}

    def eval_inputs(self, which, batch_size, limit):
        data = self.train.take(np.arange(min(limit, self.rows))) if which == "train" else self.validation
        return None if data is None else {"x": Batches(data, self.preprocessor, batch_size)}

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def metrics(self):
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def summary(self):
        skipped = len(set(self.train.skipped) | set(self.validation.skipped if self.validation else ()))
        return Summary("images", len(self.train), len(self.validation) if self.validation else 0, "images",
                       skipped=skipped)
