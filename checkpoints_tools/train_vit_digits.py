"""Trains the bundled `vit_tiny_digits` preset: a small ViT on scikit-learn's digits, upscaled.

The data ships inside scikit-learn (no download). Images are rendered as dark ink on white,
32x32 grayscale, as a user's scanned digit would look. Training uses the package's own
`ViTImageClassifier` and Keras `fit`, seeded; it reports held-out accuracy and writes the
preset in Hugging Face layout with a few held-out sample images.

Usage:
    KERAS_BACKEND=jax python -m zoo.checkpoints_tools.train_vit_digits [--out presets/vit_tiny_digits]
"""

import argparse
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image

import zoo  # (importing it chooses the Keras backend before keras is imported)
import keras  # noqa: E402

from zoo.models.vit import ImagePreprocessor, ViTConfig, ViTImageClassifier  # noqa: E402

SIZE = 32
LABELS = tuple(str(d) for d in range(10))
CONFIG = ViTConfig(
    hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, layer_norm_eps=1e-6,
    image_size=(SIZE, SIZE), patch_size=(8, 8), num_channels=1, num_labels=10, id2label=LABELS,
    extras={"architectures": ["ViTForImageClassification"]},
)
PREPROCESSOR = ImagePreprocessor(size=(SIZE, SIZE), mean=(0.5,), std=(0.5,), num_channels=1)

log = logging.getLogger("train_vit_digits")


def render(digits_8x8: np.ndarray) -> np.ndarray:
    """sklearn's 0..16 ink intensities (n, 8, 8) -> uint8 images (n, 32, 32), dark ink on white."""
    ink = np.round(digits_8x8 * (255 / 16)).astype(np.uint8)
    return np.stack([
        255 - np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.BICUBIC)) for im in ink
    ])


def shifted(images: np.ndarray, rng: np.random.Generator, copies: int, max_shift: int = 3) -> np.ndarray:
    """Each image `copies` times, translated by up to `max_shift` pixels (white fill)."""
    out = []
    for _ in range(copies):
        dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
        moved = np.roll(images, (dy, dx), axis=(1, 2))
        if dy > 0:
            moved[:, :dy] = 255
        elif dy < 0:
            moved[:, dy:] = 255
        if dx > 0:
            moved[:, :, :dx] = 255
        elif dx < 0:
            moved[:, :, dx:] = 255
        out.append(moved)
    return np.concatenate(out)


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = render(digits.images)
    return train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=seed)


def train(out: Path, epochs: int, seed: int, limit: int | None = None) -> float:
    keras.utils.set_random_seed(seed)
    x_train, x_test, y_train, y_test = load_data(seed)
    if limit:
        x_train, y_train, x_test, y_test = x_train[:limit], y_train[:limit], x_test[:limit], y_test[:limit]
    rng = np.random.default_rng(seed)
    copies = 8
    x_aug = np.concatenate([x_train, shifted(x_train, rng, copies - 1)])
    y_aug = np.tile(y_train, copies)
    model = ViTImageClassifier(CONFIG, PREPROCESSOR)
    steps = epochs * int(np.ceil(len(x_aug) / 64))
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=steps, warmup_target=None)
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(PREPROCESSOR(x_aug[..., None]), y_aug, batch_size=64, epochs=epochs, shuffle=True, verbose=2)
    predicted = [int(r[0]["label"]) for r in model.predict_labels(x_test[..., None], top_k=1)]
    accuracy = float(np.mean(np.asarray(predicted) == y_test))
    log.info("held-out accuracy %.4f on %d images (%d epochs, %.0f s, backend %s)",
             accuracy, len(y_test), epochs, time.perf_counter() - start, zoo.backends.describe()["backend"])
    model.save_preset(out)
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    for digit in (0, 2, 3, 5, 7, 9):
        index = int(np.flatnonzero(y_test == digit)[0]) if digit in y_test else 0
        Image.fromarray(x_test[index]).save(samples / f"digit_{digit}.png", optimize=True)
    return accuracy


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "presets" / "vit_tiny_digits")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (smoke runs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    accuracy = train(args.out, args.epochs, args.seed, args.limit)
    print(f"held-out accuracy: {accuracy:.4f}")


if __name__ == "__main__":
    main()
